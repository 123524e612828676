#include "test_util.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace nemofs::testing {

std::string TestData(const std::string& rel) { return std::string(NEMOFS_TEST_DATA) + "/" + rel; }
std::string RealFixture(const std::string& rel) {
  return std::string(NEMOFS_REAL_FIXTURES) + "/" + rel;
}
bool RealFixturesPresent() { return std::filesystem::is_directory(NEMOFS_REAL_FIXTURES); }

TempDir::TempDir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/nemofs-test-XXXXXX";
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}
TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string TestName(std::string text) {
  for (auto& c : text) {
    if (!isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return text;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

CommandResult Sh(const std::string& script, int timeout_s) {
  TempDir dir;
  WriteFile(dir.Join("script.sh"), "set -o pipefail\n" + script + "\n");
  std::string cmd = "timeout -k 5 " + std::to_string(timeout_s) + " bash " +
                    ShellQuote(dir.Join("script.sh")) + " >" + ShellQuote(dir.Join("out")) + " 2>" +
                    ShellQuote(dir.Join("err")) + " </dev/null";
  int status = std::system(cmd.c_str());
  CommandResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = ReadFile(dir.Join("out"));
  r.err = ReadFile(dir.Join("err"));
  return r;
}

namespace {

void PutOctal(char* field, size_t len, uint64_t value) {
  std::string s(len - 1, '0');
  for (size_t i = len - 1; i-- > 0 && value;) {
    s[i] = static_cast<char>('0' + (value & 7));
    value >>= 3;
  }
  std::memcpy(field, s.data(), len - 1);
  field[len - 1] = '\0';
}

}  // namespace

TarBuilder& TarBuilder::AddHeader(const Header& h, bool corrupt_checksum) {
  char block[512] = {};
  std::memcpy(block, h.name.data(), std::min<size_t>(h.name.size(), 100));
  PutOctal(block + 100, 8, h.mode);
  PutOctal(block + 108, 8, 0);
  PutOctal(block + 116, 8, 0);
  if (h.base256_size) {
    block[124] = static_cast<char>(0x80);
    uint64_t v = h.size;
    for (int i = 11; i >= 1; --i) {
      block[124 + i] = static_cast<char>(v & 0xff);
      v >>= 8;
    }
  } else {
    PutOctal(block + 124, 12, h.size);
  }
  PutOctal(block + 136, 12, static_cast<uint64_t>(h.mtime));
  block[156] = h.type;
  std::memcpy(block + 157, h.link.data(), std::min<size_t>(h.link.size(), 100));
  std::memcpy(block + 257,
              "ustar\0"
              "00",
              8);
  std::memcpy(block + 345, h.prefix.data(), std::min<size_t>(h.prefix.size(), 155));
  std::memset(block + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : std::string(block, 512)) sum += c;
  if (corrupt_checksum) sum += 1;
  PutOctal(block + 148, 7, sum);
  block[155] = ' ';
  bytes_.append(block, 512);
  return *this;
}

TarBuilder& TarBuilder::AddData(const std::string& data) {
  bytes_ += data;
  bytes_.append((512 - data.size() % 512) % 512, '\0');
  return *this;
}

TarBuilder& TarBuilder::AddFile(const std::string& name, const std::string& data, char type) {
  AddHeader({name, type, data.size()});
  return AddData(data);
}
TarBuilder& TarBuilder::AddDir(const std::string& name) {
  return AddHeader({name, '5', 0, "", 0755});
}
TarBuilder& TarBuilder::AddSymlink(const std::string& name, const std::string& target) {
  return AddHeader({name, '2', 0, target, 0777});
}
TarBuilder& TarBuilder::AddHardlink(const std::string& name, const std::string& target) {
  return AddHeader({name, '1', 0, target});
}

std::string TarBuilder::PaxRecord(const std::string& key, const std::string& value) {
  std::string body = " " + key + "=" + value + "\n";
  size_t len = body.size() + 1;
  while (std::to_string(len).size() + body.size() != len) ++len;
  return std::to_string(len) + body;
}

TarBuilder& TarBuilder::AddPax(const std::string& records, char type) {
  AddHeader({"././@PaxHeader", type, records.size()});
  return AddData(records);
}

TarBuilder& TarBuilder::AddGnuLongName(const std::string& name) {
  std::string data = name + '\0';
  AddHeader({"././@LongLink", 'L', data.size()});
  return AddData(data);
}

TarBuilder& TarBuilder::AddRaw(const std::string& bytes) {
  bytes_ += bytes;
  return *this;
}

TarBuilder& TarBuilder::End() {
  bytes_.append(1024, '\0');
  return *this;
}

SmallTmpfs::SmallTmpfs(const std::string& dir, const std::string& size) : dir_(dir) {
  auto r = Sh("mkdir -p " + ShellQuote(dir) + " && mount -t tmpfs -o size=" + size + " tmpfs " +
              ShellQuote(dir));
  mounted_ = r.exit_code == 0;
  EXPECT_TRUE(mounted_) << "mount -t tmpfs: " << r.err;
}

SmallTmpfs::~SmallTmpfs() {
  if (mounted_) {
    auto r = Sh("umount -l " + ShellQuote(dir_));
    EXPECT_EQ(r.exit_code, 0) << "umount -l " << dir_ << ": " << r.err;
  }
}

}  // namespace nemofs::testing
