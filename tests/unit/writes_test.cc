// The write path of the core without FUSE: YAML validation, the config edit
// life cycle (handles, snapshots, commit on flush, drop on release), scratch
// files and renames, identity checks (ESTALE).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/fs.h>

#include <fstream>

#include "nemofs/filesystem.h"
#include "test_util.h"
#include "write/yaml_check.h"

namespace nemofs {
namespace {

using testing::Sh;
using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;

// ---- validation ------------------------------------------------------------

TEST(ValidateConfigYaml, AcceptsMappingsAndNamesLineAndColumnOfProblems) {
  EXPECT_TRUE(write::ValidateConfigYaml("a: 1\nb:\n  c: [1, 2]\n", "cfg").ok());
  EXPECT_TRUE(write::ValidateConfigYaml("name: caf\xc3\xa9 \xe2\x9c\x93\n", "cfg").ok());
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"a: 1\nb: [1, 2\nc: 3\n", "cfg: line 3, column 2: end of sequence flow not found"},
      {"a: 1\nb\x01: 2\n", "cfg: line 2, column 2: control character 0x01"},
      {"a: 1\n\xc3\x28: 2\n", "cfg: line 2, column 1: not valid UTF-8"},
      {"a: \xed\xa0\x80\n", "cfg: line 1, column 4: not valid UTF-8"},  // a surrogate
      {"a: \xc0\xaf\n", "cfg: line 1, column 4: not valid UTF-8"},      // overlong
      {"- a\n- b\n", "cfg: line 1, column 1: a config must be a mapping (key: value lines), this is a list"},
      {"", "this is nothing"},
      {"42\n", "this is a plain value"},  // OmegaConf.load: "Invalid loaded object type: int"
      {"a:\n  b: 1\n  b: 2\n", "cfg: line 3, column 3: key 'b' appears twice in one mapping"},
      {"x: [{k: 1, k: 2}]\n", "key 'k' appears twice"},
  };
  for (const auto& [text, message] : bad) {
    auto st = write::ValidateConfigYaml(text, "cfg");
    ASSERT_FALSE(st.ok()) << text;
    EXPECT_EQ(st.error().code(), EINVAL);
    EXPECT_NE(st.error().message().find(message), std::string::npos) << st.error().message();
  }
}

// What OmegaConf.load refuses (issue 16 §1), and what it loads.
TEST(ValidateConfigYaml, RefusesWhatOmegaConfRefusesAndAcceptsWhatItLoads) {
  const std::vector<std::string> refused = {
      "precision: \"bf16\n", "precision: 'bf16\n", "a: 1\napply_query_key_",
      "key: v\t# comment\n", "a: 1\n---\nb: 2\n", "a:\tb\n", "~: 1\n", "a: =\n",
      "a: !!set {x, y}\n", "a: !foo x\n", "a: ${foo\n", "a: &x {b: *x}\n",
      "a: &x 1\nb: &x 2\n", "[a]: 1\n", "<<: 1\n", "a: *nope\n", "{}\n", "a: 0b_\n",
      "a: !!int x\n", "a: \xc2\x80\n", "'a': 1\na: 2\n"};
  for (const auto& text : refused) {
    auto st = write::ValidateConfigYaml(text, "cfg");
    ASSERT_FALSE(st.ok()) << text;
    EXPECT_EQ(st.error().code(), EINVAL);
    EXPECT_NE(st.error().message().find("cfg: line "), std::string::npos) << st.error().message();
  }
  const std::vector<std::string> loaded = {
      "a: |\n  text\n  more\nb: >\n  folded\n", "x: &a {p: 1}\ny:\n  <<: *a\n  q: 2\n",
      "a: {b: 1, c: [1, 2]}\n", "a: ${x.y}\nb: ${oc.env:HOME,/tmp}\nc: pre_${a}_post\n",
      "a: \"#not a comment\"\n", "a: 'x\ty'\n", "a: b # c\td\n", "\xef\xbb\xbf" "a: 1\n",
      "a: 1\r\nb: 2\r\n", "1: a\n1.5: b\ntrue: c\n", "a: !!str 1\nb: !!binary aGk=\n",
      "a: 1\n...\n", "a: 1\n<<: {b: 2}\n"};
  for (const auto& text : loaded) {
    auto st = write::ValidateConfigYaml(text, "cfg");
    EXPECT_TRUE(st.ok()) << text << ": " << st.error().message();
  }
}

// The gaps the differential corpus (tests/yaml_corpus.py, ctest
// Yaml.CorpusDifferential) found, each checked against OmegaConf.load 2.2.2.
TEST(ValidateConfigYaml, MatchesOmegaConfWhereLibyamlDiffers) {
  const std::vector<std::string> loaded = {
      // PyYAML takes any %YAML 1.x and skips reserved directives.
      "%YAML 1.3\n---\na: 1\n", "%YAML 1.0\n---\na: 1\n", "%YAML 1.10 # c\n---\na: 1\n",
      "%YAML  01.1  \r\n---\r\na: 1\r\n", "%FOO bar\tbaz\n---\na: 1\n",
      "# c\n%FOO\n%YAML 1.2\n---\na: 1\n",
      // A BOM after the start is an ordinary character (here: part of a key).
      "a: 1\n\xef\xbb\xbf"
      "b: 2\n",
      "a: x\xef\xbb\xbfy\n",
      "\xef\xbb\xbf\xef\xbb\xbf"
      "a: 1\n",
      "a: 1\n\xef\xbb\xbf"
      "a: 2\n",                            // two different keys
      "a:\n  b: 1\n\xef\xbb\xbf  c: 2\n",  // a top-level key "\ufeff  c", not a.c
      // A top-level string is loaded again as YAML (OmegaConf.create).
      "text\n", "\"a: 1\"\n", "|\n  a: 1\n  b: [1, 2]\n", "'${a'\n", "'\"\"'\n",
      // 64 levels of nesting load.
      std::string(63, '[') + "1" + std::string(63, ']') + "\n",  // "a: " + it: root + 63 = 64
      "a: ${ x }\nb: ${a :b}\nc: ${ ${a} }\n",
      // Surrogate escapes: PyYAML makes lone surrogates (libyaml refuses them).
      "n: \"\\ud800\"\n", "n: \"\\ud83d\\ude00\"\n", "n: \"\\U0000DFFF x\"\n",
      "a: \"\\ud800\"\nb: \"\\ue000\"\n",  // a stand-in block in use: the next one
      "\"\\ud800\": 1\n\"\\udc00\": 2\n",   // two different keys
      "a: \"\\ud800\\ufeff\"\nb: \"\xef\xbb\xbf x\"\n"};
  for (std::string text : loaded) {
    if (text[0] == '[') text = "a: " + text;
    auto st = write::ValidateConfigYaml(text, "cfg");
    EXPECT_TRUE(st.ok()) << text << ": " << st.error().message();
  }
  const std::vector<std::pair<std::string, std::string>> refused = {
      {"%YAML 2.0\n---\na: 1\n", "line 1, column 1: found incompatible YAML document"},
      {"%YAML 1.1#c\n---\na: 1\n", "line 1, column 10: while scanning a directive"},
      {"%YAML 1.1\n%YAML 1.3\n---\na: 1\n", "duplicate"},
      {"%FOO\na: 1\n", "expected '<document start>'"},
      {"a:\n\xef\xbb\xbf- 1\n", "cfg: line "},
      {"'[1, 2]'\n",
       "read again as YAML): line 1, column 1: a config must be a mapping (key: value "
       "lines), this is a list"},
      {"'{}'\n", "this is an empty mapping"},
      {"!!str 123\n", "this is a plain value"},
      {"\"x: ${a\"\n", "read again as YAML): line 1, column 4: invalid interpolation"},
      // nemofs's bound, not OmegaConf's verdict: from a shallow stack OmegaConf
      // still loads 65-80 levels, inside a NeMo restore fewer (README).
      {"a: " + std::string(64, '[') + "1" + std::string(64, ']') + "\n",
       "nested deeper than 64 levels"},
      {"a: " + std::string(100000, '[') + "\n", "nested deeper than 64 levels"},
      {"x: &x " + std::string(40, '[') + std::string(40, ']') + "\ny: " + std::string(30, '[') +
           "*x" + std::string(30, ']') + "\n",
       "nested deeper than 64 levels"},  // through an alias
      {"a: ${a. b}\n", "invalid interpolation"},
      {"a: ${a .b}\n", "invalid interpolation"},
      {"a: ${[ a ]}\n", "invalid interpolation"},
      {"a: ${a.[0]}\n", "invalid interpolation"},
      {"a: ${. a}\n", "invalid interpolation"},
      {"\"\\ud800\": 1\n\"\\uD800\": 2\n", "line 2, column 1: key"},  // the same key
      {"n: \"\\ud80\"\n", "line 1"}};
  for (const auto& [text, message] : refused) {
    auto st = write::ValidateConfigYaml(text, "cfg");
    ASSERT_FALSE(st.ok()) << text;
    EXPECT_EQ(st.error().code(), EINVAL);
    EXPECT_NE(st.error().message().find(message), std::string::npos) << text << ": " << st.error().message();
  }
}

// ---- the edit life cycle through the Filesystem API ----------------------

std::string ReadAllOf(const Filesystem& fs, uint64_t ino, uint64_t fh = 0) {
  auto attr = fs.GetAttr(ino);
  std::string out;
  for (uint64_t off = 0;; off += 4096) {
    std::string buf(4096, '\0');
    auto plan = fs.Read(ino, off, buf.size(), fh);
    EXPECT_TRUE(plan.ok());
    if (!plan.ok() || plan->size() == 0) break;
    EXPECT_TRUE(ExecuteReadPlan(*plan, buf.data()).ok());
    out.append(buf.data(), plan->size());
  }
  return out;
}

std::string StoredConfig(const std::string& nemo) {
  auto r = Sh("/usr/bin/python3 -c 'import sys,tarfile; sys.stdout.write(tarfile.open(sys.argv[1])"
              ".extractfile(\"./model_config.yaml\").read().decode())' " +
              ShellQuote(nemo));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

class WritableFs : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = dir_.Join("m.nemo");
    ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " + ShellQuote(src_)).exit_code,
              0);
    FilesystemOptions o;
    o.source = src_;
    o.cache_dir = dir_.Join("cache");
    o.writable = true;
    auto fs = Filesystem::Open(o);
    ASSERT_TRUE(fs.ok()) << fs.error().message();
    fs_ = std::move(*fs);
    ASSERT_TRUE(fs_->writable());
    auto ino = fs_->Resolve("config.yaml");
    ASSERT_TRUE(ino.ok());
    config_ = *ino;
    old_ = ReadAllOf(*fs_, config_);
  }
  TempDir dir_;
  std::string src_;
  std::unique_ptr<Filesystem> fs_;
  uint64_t config_ = 0;
  std::string old_;
};

TEST_F(WritableFs, AnEditIsCommittedOnFlushAndReadersKeepTheirSnapshot) {
  auto reader = fs_->OpenFile(config_, O_RDONLY);
  ASSERT_TRUE(reader.ok());
  EXPECT_TRUE(reader->direct_io);
  auto writer = fs_->OpenFile(config_, O_WRONLY | O_TRUNC);
  ASSERT_TRUE(writer.ok());
  EXPECT_EQ(fs_->GetAttr(config_)->size, 0u);  // the edit is what stat sees
  ASSERT_TRUE(fs_->Write(config_, writer->fh, 0, "a: 1\n").ok());
  ASSERT_TRUE(fs_->Write(config_, writer->fh, 5, "b: 2\n").ok());
  // Nothing committed yet: the source and other readers have the old text.
  EXPECT_EQ(StoredConfig(src_), old_);
  EXPECT_EQ(ReadAllOf(*fs_, config_, reader->fh), old_);
  EXPECT_EQ(ReadAllOf(*fs_, config_, writer->fh), "a: 1\nb: 2\n");
  ASSERT_TRUE(fs_->Flush(config_, writer->fh).ok());
  EXPECT_EQ(StoredConfig(src_), "a: 1\nb: 2\n");
  // A reader opened before the commit still reads the text it opened.
  EXPECT_EQ(ReadAllOf(*fs_, config_, reader->fh), old_);
  EXPECT_EQ(ReadAllOf(*fs_, config_), "a: 1\nb: 2\n");
  fs_->Release(config_, writer->fh);
  fs_->Release(config_, reader->fh);
  // The archive/ name is the same node.
  EXPECT_EQ(*fs_->Resolve("archive/model_config.yaml"), config_);
  EXPECT_TRUE(fs_->Volatile(config_));
}

TEST_F(WritableFs, AnInvalidEditIsEinvalAndDroppedAtRelease) {
  auto writer = fs_->OpenFile(config_, O_RDWR);
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE(fs_->Write(config_, writer->fh, 0, "[[[").ok());
  auto st = fs_->Flush(config_, writer->fh);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), EINVAL);
  EXPECT_EQ(ReadAllOf(*fs_, config_, writer->fh).substr(0, 3), "[[[");  // still the edit
  fs_->Release(config_, writer->fh);
  EXPECT_EQ(ReadAllOf(*fs_, config_), old_);
  EXPECT_EQ(fs_->GetAttr(config_)->size, old_.size());
  EXPECT_EQ(StoredConfig(src_), old_);
}

TEST_F(WritableFs, ScratchFilesAndARenameOverTheConfigCommit) {
  auto created = fs_->Create(Filesystem::kRootIno, ".config.yaml.swp", 0600, O_WRONLY | O_EXCL);
  ASSERT_TRUE(created.ok()) << created.error().message();
  uint64_t ino = created->first.ino;
  EXPECT_GT(ino, fs_->node_count());
  EXPECT_EQ(created->first.perm, 0600u);
  ASSERT_TRUE(fs_->Write(ino, created->second.fh, 0, "swap: 1\n").ok());
  fs_->Release(ino, created->second.fh);
  EXPECT_EQ(fs_->Create(Filesystem::kRootIno, ".config.yaml.swp", 0600, O_WRONLY | O_EXCL)
                .error()
                .code(),
            EEXIST);
  EXPECT_EQ(fs_->Create(Filesystem::kRootIno, "index.json", 0644, O_WRONLY).error().code(),
            EEXIST);
  auto tensors = fs_->Resolve("tensors");
  EXPECT_EQ(fs_->Create(*fs_->Resolve("tokenizer"), "x", 0644, O_WRONLY).error().code(), EPERM);
  // Listed after the checkpoint's own entries.
  std::vector<std::string> names;
  ASSERT_TRUE(fs_->ReadDir(Filesystem::kRootIno, 0, [&](const DirEntry& e, uint64_t) {
                   names.emplace_back(e.name);
                   return true;
                 }).ok());
  EXPECT_EQ(names.back(), ".config.yaml.swp");
  // Renaming it over either name of the config commits its content.
  ASSERT_TRUE(fs_->Rename(Filesystem::kRootIno, ".config.yaml.swp",
                          *fs_->Resolve("archive"), "model_config.yaml", 0)
                  .ok());
  EXPECT_EQ(StoredConfig(src_), "swap: 1\n");
  EXPECT_EQ(fs_->Lookup(Filesystem::kRootIno, ".config.yaml.swp").error().code(), ENOENT);
  EXPECT_EQ(fs_->Unlink(Filesystem::kRootIno, "config.yaml").error().code(), EPERM);
  EXPECT_EQ(fs_->Rename(Filesystem::kRootIno, "index.json", Filesystem::kRootIno, "i2", 0)
                .error()
                .code(),
            EPERM);
  EXPECT_EQ(fs_->Rename(Filesystem::kRootIno, "config.yaml", Filesystem::kRootIno, "c2",
                        RENAME_EXCHANGE)
                .error()
                .code(),
            EINVAL);
}

TEST_F(WritableFs, NewFilesAreStoredAtFsyncOrStoreNewFilesInOneAppend) {
  const uint64_t archive = *fs_->Resolve("archive");
  auto a = fs_->Create(Filesystem::kRootIno, "notes.txt", 0640, O_WRONLY | O_EXCL);
  ASSERT_TRUE(a.ok()) << a.error().message();
  ASSERT_TRUE(fs_->Write(a->first.ino, a->second.fh, 0, "hi\n").ok());
  // The same member from archive/ (top level, where the config is): EEXIST.
  auto twin = fs_->Create(archive, "notes.txt", 0644, O_WRONLY | O_EXCL);
  ASSERT_FALSE(twin.ok());
  EXPECT_EQ(twin.error().code(), EEXIST);
  // Nor over a member the checkpoint has (from the root, where it is not shown).
  auto member = fs_->Create(Filesystem::kRootIno, "model_weights.ckpt", 0644, O_WRONLY);
  ASSERT_FALSE(member.ok());
  EXPECT_EQ(member.error().code(), EEXIST);
  // Temp files never conflict and are never stored.
  auto swp = fs_->Create(archive, ".notes.txt.swp", 0600, O_WRONLY);
  ASSERT_TRUE(swp.ok());
  ASSERT_TRUE(fs_->Fsync(swp->first.ino, swp->second.fh).ok());
  ASSERT_TRUE(fs_->Fsync(a->first.ino, a->second.fh).ok());
  fs_->Release(a->first.ino, a->second.fh);
  auto list = Sh("tar -tvf " + ShellQuote(src_));
  EXPECT_NE(list.out.find("-rw-r----- "), std::string::npos) << list.out;  // its mode
  EXPECT_NE(list.out.find("./notes.txt\n"), std::string::npos) << list.out;
  EXPECT_EQ(list.out.find(".swp"), std::string::npos) << list.out;
  // Stored: part of the checkpoint now.
  EXPECT_EQ(fs_->Unlink(Filesystem::kRootIno, "notes.txt").error().code(), EPERM);
  EXPECT_EQ(
      fs_->Rename(Filesystem::kRootIno, "notes.txt", Filesystem::kRootIno, "n2", 0).error().code(),
      EPERM);
  // Two more, stored together by one append (one copy each).
  for (const char* n : {"b.txt", "c.txt"}) {
    auto f = fs_->Create(archive, n, 0644, O_WRONLY);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE(fs_->Write(f->first.ino, f->second.fh, 0, n).ok());
    fs_->Release(f->first.ino, f->second.fh);
  }
  ASSERT_TRUE(fs_->StoreNewFiles().ok());
  ASSERT_TRUE(fs_->StoreNewFiles().ok());  // nothing changed: nothing written
  list = Sh("tar -tf " + ShellQuote(src_) + " | grep -c -e b.txt -e c.txt -e notes.txt");
  EXPECT_EQ(list.out, "3\n");
  fs_->Release(swp->first.ino, swp->second.fh);
  // A fresh Filesystem shows them in archive/ and the root file in the root.
  FilesystemOptions o;
  o.source = src_;
  o.cache_dir = dir_.Join("cache");
  auto fresh = Filesystem::Open(o);
  ASSERT_TRUE(fresh.ok()) << fresh.error().message();
  for (const char* p : {"notes.txt", "archive/notes.txt", "archive/b.txt", "b.txt"}) {
    EXPECT_TRUE((*fresh)->Resolve(p).ok()) << p;
  }
  EXPECT_EQ(ReadAllOf(**fresh, *(*fresh)->Resolve("notes.txt")), "hi\n");
  EXPECT_FALSE((*fresh)->Resolve("model_weights.ckpt").ok());  // layout files stay in archive/
}

TEST_F(WritableFs, AFailedWritePoisonsItsHandle) {
  auto w = fs_->OpenFile(config_, O_WRONLY | O_TRUNC);
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE(fs_->Write(config_, w->fh, 0, "a: 1\n").ok());
  auto big = fs_->Write(config_, w->fh, 64ull << 20, "x");
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.error().code(), EFBIG);
  auto st = fs_->Flush(config_, w->fh);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), EFBIG);
  EXPECT_EQ(fs_->Fsync(config_, w->fh).error().code(), EFBIG);
  fs_->Release(config_, w->fh);
  EXPECT_EQ(StoredConfig(src_), old_);
  EXPECT_EQ(ReadAllOf(*fs_, config_), old_);
}

TEST_F(WritableFs, ASourceChangedUnderneathIsEstale) {
  // Something else appends to the archive: its size and mtime change.
  ASSERT_EQ(Sh("printf x >> " + ShellQuote(src_)).exit_code, 0);
  std::string digest = Sh("sha256sum < " + ShellQuote(src_)).out;
  auto writer = fs_->OpenFile(config_, O_WRONLY | O_TRUNC);
  ASSERT_TRUE(fs_->Write(config_, writer->fh, 0, "a: 1\n").ok());
  auto st = fs_->Flush(config_, writer->fh);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), ESTALE);
  EXPECT_NE(st.error().message().find(src_), std::string::npos);
  fs_->Release(config_, writer->fh);
  EXPECT_EQ(Sh("sha256sum < " + ShellQuote(src_)).out, digest);
}

TEST(ReadOnlyFs, WritesAreEroFsWithoutTheOptionOrOnAReadOnlySource) {
  TempDir dir;
  std::string src = dir.Join("m.nemo");
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " + ShellQuote(src)).exit_code, 0);
  for (bool chmod_ro : {false, true}) {
    FilesystemOptions o;
    o.source = src;
    o.cache_dir = dir.Join("cache");
    o.writable = chmod_ro;  // writable requested, but the file is 0444
    if (chmod_ro) {
      ASSERT_EQ(Sh("chmod 0444 " + ShellQuote(src)).exit_code, 0);
    }
    auto fs = Filesystem::Open(o);
    ASSERT_TRUE(fs.ok());
    EXPECT_FALSE((*fs)->writable());
    uint64_t config = *(*fs)->Resolve("config.yaml");
    EXPECT_EQ((*fs)->OpenFile(config, O_WRONLY).error().code(), EROFS);
    EXPECT_EQ((*fs)->CheckOpen(config, O_RDONLY | O_TRUNC).error().code(), EROFS);
    EXPECT_EQ((*fs)->Create(Filesystem::kRootIno, "x", 0644, O_WRONLY).error().code(), EROFS);
    EXPECT_FALSE((*fs)->Volatile(config));
  }
}

// The daemon's anonymous memory (heap), in bytes.
uint64_t RssAnon() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("RssAnon:", 0) == 0) return std::stoull(line.substr(8)) << 10;
  }
  ADD_FAILURE() << "no RssAnon in /proc/self/status";
  return 0;
}

// New files have no size limit but the spill folder's free space: past a
// few MiB their bytes live in an unlinked file under <cache>/spill, not in
// memory; 10,000 files at most.
TEST_F(WritableFs, NewFilesSpillToDiskPastAFewMiBAndAreLimitedTo10000Files) {
  const uint64_t before = RssAnon();
  std::string chunk(1 << 20, 'y');
  std::vector<uint64_t> inos;
  for (int i = 0; i < 3; ++i) {
    auto f = fs_->Create(Filesystem::kRootIno, "s" + std::to_string(i) + "~", 0644, O_WRONLY);
    ASSERT_TRUE(f.ok());
    for (int k = 0; k < 100; ++k) {
      chunk[0] = static_cast<char>('a' + i);
      chunk[1] = static_cast<char>(k);
      auto n = fs_->Write(f->first.ino, f->second.fh, uint64_t(k) << 20, chunk);
      ASSERT_TRUE(n.ok()) << n.error().message();
    }
    fs_->Release(f->first.ino, f->second.fh);
    inos.push_back(f->first.ino);
  }
  // 300 MiB written and still linked; a buffer in memory would show.
  EXPECT_LT(RssAnon(), before + (64u << 20)) << "the new files' bytes are in the heap";
  for (int i = 0; i < 3; ++i) {
    auto attr = fs_->GetAttr(inos[i]);
    ASSERT_TRUE(attr.ok());
    EXPECT_EQ(attr->size, 100u << 20);
    auto plan = fs_->Read(inos[i], (99u << 20), 4);
    ASSERT_TRUE(plan.ok());
    std::string got(plan->size(), '\0');
    ASSERT_TRUE(ExecuteReadPlan(*plan, got.data()).ok());
    const std::string want{static_cast<char>('a' + i), static_cast<char>(99), 'y', 'y'};
    EXPECT_EQ(got, want);
  }
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(fs_->Unlink(Filesystem::kRootIno, "s" + std::to_string(i) + "~").ok());
  }
  int files = 0;
  for (;; ++files) {
    auto f = fs_->Create(Filesystem::kRootIno, "n" + std::to_string(files), 0644, O_WRONLY);
    if (!f.ok()) {
      EXPECT_EQ(f.error().code(), ENOSPC);
      break;
    }
    fs_->Release(f->first.ino, f->second.fh);
    ASSERT_LT(files, 20000);
  }
  EXPECT_EQ(files, 10000);
}

TEST(ReadOnlyFs, ASourceWithoutAConfigWritesTensorsOnlyOneOnAReadOnlyFileSystemNothing) {
  FilesystemOptions o;
  TempDir copy;
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("torch/dtypes.pt")) + " " +
               ShellQuote(copy.Join("d.pt")))
                .exit_code,
            0);
  o.source = copy.Join("d.pt");
  o.writable = true;
  auto fs = Filesystem::Open(o);
  ASSERT_TRUE(fs.ok());
  EXPECT_TRUE((*fs)->writable());  // its tensor files
  auto created = (*fs)->Create(Filesystem::kRootIno, "notes.txt", 0644, O_WRONLY);
  EXPECT_FALSE(created.ok()) << "no new files beside a single-file checkpoint";
  auto tensors = (*fs)->Resolve("tensors");
  ASSERT_TRUE(tensors.ok());
  uint64_t first = 0;
  ASSERT_TRUE((*fs)->ReadDir(*tensors, 0, [&](const DirEntry& e, uint64_t) {
                      first = e.ino;
                      return false;
                    }).ok());
  EXPECT_TRUE((*fs)->CheckOpen(first, O_WRONLY).ok());

  TempDir dir;
  std::string mnt = dir.Join("ro");
  auto r = Sh("mkdir " + ShellQuote(mnt) + " && mount -t tmpfs -o size=4m tmpfs " +
              ShellQuote(mnt) + " && cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " +
              ShellQuote(mnt) + "/m.nemo && mount -o remount,ro " + ShellQuote(mnt));
  struct Unmount {
    std::string path;
    ~Unmount() { Sh("umount -l " + ShellQuote(path) + " 2>/dev/null"); }
  } unmount{mnt};  // even when an assertion below fails
  if (r.exit_code != 0) GTEST_SKIP() << "cannot make a read-only tmpfs here: " << r.err;
  o.source = mnt + "/m.nemo";
  o.cache_dir = dir.Join("cache");
  {
    auto ro = Filesystem::Open(o);
    ASSERT_TRUE(ro.ok());
    EXPECT_FALSE((*ro)->writable());
  }
}

}  // namespace
}  // namespace nemofs
