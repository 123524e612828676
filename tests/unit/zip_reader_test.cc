// The torch.save zip reader and tensor location, including offsets beyond
// 4 GiB (ZIP64) on a sparse file, and hostile zips.
#include "torch/zip_reader.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include "test_util.h"
#include "torch/torch_file.h"
#include "util/fd.h"
#include "util/io.h"

namespace nemofs::torch {
namespace {

using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;

void Put16(std::string* s, uint16_t v) {
  s->push_back(static_cast<char>(v & 0xff));
  s->push_back(static_cast<char>(v >> 8));
}
void Put32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void Put64(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// Writes a zip like torch.save's (stored records, ZIP64 everywhere) with
// records placed at chosen offsets; holes between them stay sparse.
class SparseZipWriter {
 public:
  explicit SparseZipWriter(int fd) : fd_(fd) {}
  // A record whose data starts exactly at `data_offset` (header just before).
  void Add(const std::string& name, uint64_t data_offset, uint64_t size, const std::string& data) {
    std::string lh;
    Put32(&lh, 0x04034b50);
    Put16(&lh, 0);
    Put16(&lh, 0x0808);
    Put16(&lh, 0);
    Put32(&lh, 0);
    Put32(&lh, 0);
    Put32(&lh, 0);
    Put32(&lh, 0);
    Put16(&lh, static_cast<uint16_t>(name.size()));
    Put16(&lh, 0);
    lh += name;
    uint64_t header_at = data_offset - lh.size();
    ASSERT_EQ(::pwrite(fd_, lh.data(), lh.size(), static_cast<off_t>(header_at)),
              static_cast<ssize_t>(lh.size()));
    if (!data.empty()) {
      ASSERT_EQ(::pwrite(fd_, data.data(), data.size(), static_cast<off_t>(data_offset)),
                static_cast<ssize_t>(data.size()));
    }
    records_.push_back({name, header_at, size});
    end_ = std::max(end_, data_offset + size);
  }
  void Finish() {
    std::string cd;
    for (const auto& r : records_) {
      Put32(&cd, 0x02014b50);
      Put16(&cd, 0);
      Put16(&cd, 0);
      Put16(&cd, 0x0808);
      Put16(&cd, 0);
      Put32(&cd, 0);
      Put32(&cd, 0);  // crc
      Put32(&cd, 0xFFFFFFFF);
      Put32(&cd, 0xFFFFFFFF);
      Put16(&cd, static_cast<uint16_t>(r.name.size()));
      Put16(&cd, 28);
      Put16(&cd, 0);
      Put16(&cd, 0);
      Put16(&cd, 0);
      Put32(&cd, 0);
      Put32(&cd, 0xFFFFFFFF);
      cd += r.name;
      Put16(&cd, 1);
      Put16(&cd, 24);
      Put64(&cd, r.size);
      Put64(&cd, r.size);
      Put64(&cd, r.header);
    }
    uint64_t cd_at = end_;
    std::string tail = cd;
    uint64_t z64_at = cd_at + cd.size();
    Put32(&tail, 0x06064b50);
    Put64(&tail, 44);
    Put16(&tail, 0x031e);
    Put16(&tail, 0x2d);
    Put32(&tail, 0);
    Put32(&tail, 0);
    Put64(&tail, records_.size());
    Put64(&tail, records_.size());
    Put64(&tail, cd.size());
    Put64(&tail, cd_at);
    Put32(&tail, 0x07064b50);
    Put32(&tail, 0);
    Put64(&tail, z64_at);
    Put32(&tail, 1);
    Put32(&tail, 0x06054b50);
    Put16(&tail, 0);
    Put16(&tail, 0);
    Put16(&tail, 0xFFFF);
    Put16(&tail, 0xFFFF);
    Put32(&tail, 0xFFFFFFFF);
    Put32(&tail, 0xFFFFFFFF);
    Put16(&tail, 0);
    ASSERT_EQ(::pwrite(fd_, tail.data(), tail.size(), static_cast<off_t>(cd_at)),
              static_cast<ssize_t>(tail.size()));
    size_ = cd_at + tail.size();
  }
  uint64_t size() const { return size_; }

 private:
  struct Rec {
    std::string name;
    uint64_t header;
    uint64_t size;
  };
  int fd_;
  std::vector<Rec> records_;
  uint64_t end_ = 0;
  uint64_t size_ = 0;
};

// Protocol-2 pickle of OrderedDict{'w': float32 tensor [numel] on storage '0'}.
std::string TensorPickle(uint32_t numel) {
  std::string p =
      "\x80\x02"
      "ccollections\nOrderedDict\n)R(";
  auto unicode = [&](const std::string& s) {
    p += 'X';
    Put32(&p, static_cast<uint32_t>(s.size()));
    p += s;
  };
  unicode("w");
  p += "ctorch._utils\n_rebuild_tensor_v2\n(";
  p += "(";
  unicode("storage");
  p += "ctorch\nFloatStorage\n";
  unicode("0");
  unicode("cpu");
  p += 'J';
  Put32(&p, numel);
  p += "tQ";                     // TUPLE, BINPERSID
  p += std::string("K\x00", 2);  // storage offset 0
  p += 'J';
  Put32(&p, numel);
  p += "\x85";       // size (numel,)
  p += "K\x01\x85";  // stride (1,)
  p += "\x89";       // requires_grad False
  p += "ccollections\nOrderedDict\n)R";
  p += "tRu.";
  return p;
}

// Protocol-2 pickle of {'f8': float8_e4m3fn [4] via _rebuild_tensor_v3 on an UntypedStorage}.
std::string Float8Pickle() {
  std::string p = "\x80\x02}(";  // EMPTY_DICT, MARK
  auto unicode = [&](const std::string& s) {
    p += 'X';
    Put32(&p, static_cast<uint32_t>(s.size()));
    p += s;
  };
  unicode("f8");
  p += "ctorch._utils\n_rebuild_tensor_v3\n((";
  unicode("storage");
  p += "ctorch\nUntypedStorage\n";
  unicode("0");
  unicode("cpu");
  p += "K\x04tQ";                                      // numel 4 (bytes, for an UntypedStorage)
  p += std::string("K\x00K\x04\x85K\x01\x85\x89", 9);  // offset 0, size (4,), stride (1,), False
  p += "ccollections\nOrderedDict\n)R";
  p += "ctorch\nfloat8_e4m3fn\n";
  p += "tRu.";
  return p;
}

TEST(ZipReader, Float8ThroughRebuildTensorV3) {
  TempDir dir;
  std::string path = dir.Join("f8.pt");
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
  ASSERT_TRUE(fd.valid());
  SparseZipWriter w(fd.get());
  std::string pickle = Float8Pickle();
  w.Add("archive/data.pkl", 30 + 16, pickle.size(), pickle);  // header at 0
  w.Add("archive/data/0", 1024, 4, "\x38\x40\xb8\x00");
  w.Finish();
  auto file = LoadTorchFile(fd.get(), 0, w.size(), path);
  ASSERT_TRUE(file.ok()) << file.error().message();
  ASSERT_EQ(file->tensors.size(), 1u)
      << (file->bad_tensors.empty() ? "" : file->bad_tensors.begin()->second);
  const StoredTensor& t = file->tensors.begin()->second;
  EXPECT_EQ(t.dtype, DType::kFloat8E4M3FN);
  EXPECT_EQ(t.storage_start, 1024u);
  EXPECT_EQ(t.nbytes(), 4u);
  EXPECT_EQ(Info(t.dtype).safetensors, "F8_E4M3");
}

TEST(ZipReader, RealTorchSaveFile) {
  TempDir dir;
  auto r = testing::Sh("tar -xOf " + ShellQuote(TestData("tiny_gpt.nemo")) +
                       " ./model_weights.ckpt > " + ShellQuote(dir.Join("w.ckpt")));
  ASSERT_EQ(r.exit_code, 0);
  auto fd = OpenReadOnly(dir.Join("w.ckpt"));
  ASSERT_TRUE(fd.ok());
  uint64_t size = testing::ReadFile(dir.Join("w.ckpt")).size();
  FdReader reader(fd->get(), 0, size);
  auto zip = ZipArchive::Open(reader, "w.ckpt");
  ASSERT_TRUE(zip.ok()) << zip.error().message();
  EXPECT_EQ(zip->prefix(), "model_weights");
  const ZipEntry* pkl = zip->FindRecord("data.pkl");
  ASSERT_NE(pkl, nullptr);
  EXPECT_EQ(pkl->data_offset % 64, 0u) << "torch.save aligns record data to 64 bytes";
  for (const auto& e : zip->entries()) EXPECT_EQ(e.data_offset % 64, 0u) << e.name;
  // Same bytes as Python's zipfile gives.
  auto data = zip->Read(*pkl, 1 << 20);
  ASSERT_TRUE(data.ok());
  r = testing::Sh(
      "/usr/bin/python3 -c 'import zipfile,sys; "
      "sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(\"model_weights/data.pkl\"))' " +
      ShellQuote(dir.Join("w.ckpt")));
  EXPECT_EQ(*data, r.out);
}

TEST(ZipReader, Zip64OffsetsBeyond4GiBOnASparseFile) {
  TempDir dir;
  std::string path = dir.Join("big.pt");
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644));
  ASSERT_TRUE(fd.valid());
  const uint32_t numel = 1200000000;  // 4.8 GB of float32, a hole in the file
  const uint64_t storage_at = 4096;
  const uint64_t storage_bytes = uint64_t{numel} * 4;
  SparseZipWriter w(fd.get());
  w.Add("archive/version", 30 + 15, 2, "3\n");  // the first record starts the file with "PK\3\4"
  w.Add("archive/data/0", storage_at, storage_bytes, "\x01\x02\x03\x04");
  const uint64_t pkl_at = ((storage_at + storage_bytes + 4096) / 64 + 1) * 64;  // beyond 4 GiB
  std::string pickle = TensorPickle(numel);
  w.Add("archive/data.pkl", pkl_at, pickle.size(), pickle);
  w.Finish();
  ASSERT_GT(pkl_at, uint64_t{1} << 32);

  FdReader reader(fd.get(), 0, w.size());
  auto zip = ZipArchive::Open(reader, path);
  ASSERT_TRUE(zip.ok()) << zip.error().message();
  const ZipEntry* pkl = zip->FindRecord("data.pkl");
  ASSERT_NE(pkl, nullptr);
  EXPECT_EQ(pkl->data_offset, pkl_at);
  EXPECT_EQ(*zip->Read(*pkl, 1 << 20), pickle);

  auto file = LoadTorchFile(fd.get(), 0, w.size(), path);
  ASSERT_TRUE(file.ok()) << file.error().message();
  ASSERT_EQ(file->tensors.size(), 1u);
  const StoredTensor& t = file->tensors.begin()->second;
  EXPECT_EQ(t.storage_start, storage_at);
  EXPECT_EQ(t.nbytes(), storage_bytes);
  EXPECT_EQ(t.shape, std::vector<int64_t>{numel});

  // The same zip embedded at an offset inside a bigger file (as in a tar or .distcp).
  std::string path2 = dir.Join("embedded.bin");
  auto r = testing::Sh("dd if=/dev/zero of=" + ShellQuote(path2) + " bs=1000 count=1 2>/dev/null");
  ASSERT_EQ(r.exit_code, 0);
  UniqueFd fd2(::open(path2.c_str(), O_RDWR));
  ASSERT_TRUE(fd2.valid());
  // Copy the zip's metadata-bearing regions at +1000 (the hole stays a hole).
  for (uint64_t at : {uint64_t{0}, pkl_at - 512}) {
    uint64_t len = at == 0 ? storage_at + 4 : w.size() - at;
    std::string buf(len, '\0');
    ASSERT_TRUE(PreadFull(fd.get(), buf.data(), len, at, path).ok());
    ASSERT_EQ(::pwrite(fd2.get(), buf.data(), len, static_cast<off_t>(1000 + at)),
              static_cast<ssize_t>(len));
  }
  auto inner = LoadTorchFile(fd2.get(), 1000, w.size(), path2);
  ASSERT_TRUE(inner.ok()) << inner.error().message();
  EXPECT_EQ(inner->tensors.begin()->second.storage_start, storage_at);
}

TEST(ZipReaderHostile, GarbageAndTruncation) {
  TempDir dir;
  std::string good;
  auto r =
      testing::Sh("tar -xOf " + ShellQuote(TestData("tiny_gpt.nemo")) + " ./model_weights.ckpt");
  ASSERT_EQ(r.exit_code, 0);
  good = r.out;
  for (size_t cut :
       {size_t{0}, size_t{10}, size_t{100}, good.size() / 2, good.size() - 30, good.size() - 1}) {
    std::string path = dir.Join("cut.pt");
    testing::WriteFile(path, good.substr(0, cut));
    auto fd = OpenReadOnly(path);
    auto file = LoadTorchFile(fd->get(), 0, cut, path);
    ASSERT_FALSE(file.ok()) << "cut " << cut;
    EXPECT_EQ(file.error().code(), EINVAL) << file.error().message();
    EXPECT_NE(file.error().message().find(path), std::string::npos);
  }
  // Central directory offset pointing outside the file.
  std::string bad = good;
  size_t eocd = bad.rfind(std::string("PK\x05\x06", 4));
  ASSERT_NE(eocd, std::string::npos);
  size_t z64 = bad.rfind(std::string("PK\x06\x06", 4));
  ASSERT_NE(z64, std::string::npos);
  for (int i = 0; i < 8; ++i) bad[z64 + 48 + i] = '\x7f';
  std::string path = dir.Join("cd.pt");
  testing::WriteFile(path, bad);
  auto fd = OpenReadOnly(path);
  auto file = LoadTorchFile(fd->get(), 0, bad.size(), path);
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.error().message().find("central directory"), std::string::npos)
      << file.error().message();
}

}  // namespace
}  // namespace nemofs::torch
