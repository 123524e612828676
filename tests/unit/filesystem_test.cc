// The unified tree without FUSE: node sharing, reads, read-only rules, and
// lazy extraction of compressed archives.
#include "nemofs/filesystem.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "source/sources_internal.h"
#include "test_util.h"

namespace nemofs {
namespace {

using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;

std::unique_ptr<Filesystem> OpenFs(const std::string& path, const std::string& cache = "") {
  auto fs = Filesystem::Open({path, cache});
  EXPECT_TRUE(fs.ok()) << fs.error().message();
  return fs.ok() ? std::move(fs).value() : nullptr;
}

std::string ReadAll(const Filesystem& fs, uint64_t ino) {
  auto attr = fs.GetAttr(ino);
  EXPECT_TRUE(attr.ok());
  auto plan = fs.Read(ino, 0, attr->size + 100);
  EXPECT_TRUE(plan.ok()) << plan.error().message();
  std::string out(plan->size(), '\0');
  EXPECT_TRUE(ExecuteReadPlan(*plan, out.data()).ok());
  return out;
}

std::string TarMember(const std::string& tar, const std::string& member) {
  auto r = testing::Sh("tar -xOf " + ShellQuote(tar) + " " + ShellQuote(member));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

TEST(Filesystem, ConfigIsTheSameNodeAsItsMember) {
  auto fs = OpenFs(TestData("tiny_gpt.nemo"));
  ASSERT_TRUE(fs);
  auto a = fs->Resolve("config.yaml");
  auto b = fs->Resolve("archive/model_config.yaml");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_EQ(fs->GetAttr(*a)->nlink, 2u);
  EXPECT_EQ(ReadAll(*fs, *a), TarMember(TestData("tiny_gpt.nemo"), "./model_config.yaml"));
  auto tok = fs->Resolve("tokenizer/tokenizer.model");
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(*tok, *fs->Resolve("archive/73a06e1aa17c45d28419c66d295163b8_tokenizer.model"));
}

TEST(Filesystem, RootListingAndDotDot) {
  auto fs = OpenFs(TestData("tiny_gpt.nemo"));
  ASSERT_TRUE(fs);
  std::vector<std::string> names;
  ASSERT_TRUE(fs->ReadDir(Filesystem::kRootIno, 0, [&](const DirEntry& e, uint64_t) {
                  names.emplace_back(e.name);
                  return true;
                }).ok());
  EXPECT_EQ(names,
            (std::vector<std::string>{"archive", "checkpoint.json", "config.yaml", "index.json",
                                      "model.safetensors", "npy", "tensors", "tokenizer"}));
  // Resuming from an offset continues after the entries already returned.
  names.clear();
  uint64_t expected_next = 6;
  ASSERT_TRUE(fs->ReadDir(Filesystem::kRootIno, 5, [&](const DirEntry& e, uint64_t next) {
                  names.emplace_back(e.name);
                  EXPECT_EQ(next, expected_next++);
                  return true;
                }).ok());
  EXPECT_EQ(names, (std::vector<std::string>{"npy", "tensors", "tokenizer"}));
  auto archive = fs->Lookup(Filesystem::kRootIno, "archive");
  ASSERT_TRUE(archive.ok());
  EXPECT_EQ(fs->Lookup(archive->ino, "..")->ino, Filesystem::kRootIno);
  EXPECT_EQ(fs->Lookup(Filesystem::kRootIno, "nope").error().code(), ENOENT);
  EXPECT_EQ(fs->Lookup(*fs->Resolve("config.yaml"), "x").error().code(), ENOTDIR);
}

TEST(Filesystem, ReadsAtOffsetsAndPastTheEnd) {
  auto fs = OpenFs(TestData("tiny_gpt.nemo"));
  ASSERT_TRUE(fs);
  uint64_t ino = *fs->Resolve("archive/model_weights.ckpt");
  std::string whole = TarMember(TestData("tiny_gpt.nemo"), "./model_weights.ckpt");
  ASSERT_EQ(fs->GetAttr(ino)->size, whole.size());
  for (uint64_t off :
       {0ull, 1ull, 511ull, 4097ull, static_cast<unsigned long long>(whole.size() - 3)}) {
    auto plan = fs->Read(ino, off, 1000);
    ASSERT_TRUE(plan.ok());
    std::string got(plan->size(), '\0');
    ASSERT_TRUE(ExecuteReadPlan(*plan, got.data()).ok());
    EXPECT_EQ(got, whole.substr(off, 1000)) << off;
  }
  EXPECT_EQ(fs->Read(ino, whole.size(), 10)->size(), 0u);
  EXPECT_EQ(fs->Read(ino, whole.size() + 100, 10)->size(), 0u);
}

TEST(Filesystem, EverythingIsReadOnly) {
  auto fs = OpenFs(TestData("tiny_gpt.nemo"));
  ASSERT_TRUE(fs);
  uint64_t ino = *fs->Resolve("config.yaml");
  EXPECT_TRUE(fs->CheckOpen(ino, O_RDONLY).ok());
  EXPECT_EQ(fs->CheckOpen(ino, O_WRONLY).error().code(), EROFS);
  EXPECT_EQ(fs->CheckOpen(ino, O_RDWR).error().code(), EROFS);
  EXPECT_EQ(fs->CheckOpen(ino, O_RDONLY | O_TRUNC).error().code(), EROFS);
  EXPECT_EQ(fs->CheckOpen(Filesystem::kRootIno, O_WRONLY).error().code(), EISDIR);
}

TEST(Filesystem, GzipMembersAreExtractedOnlyWhenRead) {
  TempDir cache;
  auto fs = OpenFs(TestData("tiny_gpt_gz.nemo"), cache.path());
  ASSERT_TRUE(fs);
  auto member = [](const std::filesystem::directory_entry& e) {
    // Extracted members: neither the listing index nor the entry's record.
    return e.is_regular_file() && e.path().filename() != "index.cbor" &&
           e.path().filename() != source::kCacheEntryRecord;
  };
  auto count_files = [&] {
    int n = 0;
    for (const auto& e : std::filesystem::recursive_directory_iterator(cache.path())) {
      n += member(e);
    }
    return n;
  };
  EXPECT_EQ(count_files(), 0) << "nothing may be extracted at open";
  // The tensors were catalogued from what the listing pass captured.
  EXPECT_EQ(fs->info().tensors, 20u);
  EXPECT_TRUE(fs->Resolve("tensors/model.output_layer.weight").ok());
  // The config was kept from the listing pass: still nothing extracted.
  EXPECT_EQ(ReadAll(*fs, *fs->Resolve("config.yaml")),
            TarMember(TestData("tiny_gpt.nemo"), "./model_config.yaml"));
  EXPECT_EQ(count_files(), 0);
  uint64_t weights = *fs->Resolve("archive/model_weights.ckpt");
  EXPECT_EQ(ReadAll(*fs, weights), TarMember(TestData("tiny_gpt.nemo"), "./model_weights.ckpt"));
  EXPECT_EQ(count_files(), 1);

  // A second open of the same source reuses the extracted member.
  std::string cached;
  for (const auto& e : std::filesystem::recursive_directory_iterator(cache.path())) {
    if (member(e)) cached = e.path();
  }
  auto before = std::filesystem::last_write_time(cached);
  auto fs2 = OpenFs(TestData("tiny_gpt_gz.nemo"), cache.path());
  ASSERT_TRUE(fs2);
  EXPECT_EQ(ReadAll(*fs2, *fs2->Resolve("archive/model_weights.ckpt")), ReadAll(*fs, weights));
  EXPECT_EQ(std::filesystem::last_write_time(cached), before);
  EXPECT_EQ(count_files(), 1);
}

TEST(Filesystem, RemountOfACompressedArchiveReusesTheListing) {
  TempDir cache;
  auto first = source::OpenSource(TestData("tiny_gpt_gz.nemo"), {cache.path()});
  ASSERT_TRUE(first.ok()) << first.error().message();
  EXPECT_FALSE(dynamic_cast<source::ArchiveSource&>(**first).index_from_cache());
  auto second = source::OpenSource(TestData("tiny_gpt_gz.nemo"), {cache.path()});
  ASSERT_TRUE(second.ok()) << second.error().message();
  EXPECT_TRUE(dynamic_cast<source::ArchiveSource&>(**second).index_from_cache())
      << "the second open must not decompress the archive again";
  ASSERT_EQ((*first)->entries().size(), (*second)->entries().size());
  for (size_t i = 0; i < (*first)->entries().size(); ++i) {
    EXPECT_EQ((*first)->entries()[i].path, (*second)->entries()[i].path);
    EXPECT_EQ((*first)->entries()[i].size, (*second)->entries()[i].size);
  }
  // The whole tree (tensors catalogued from the cached zip metadata) is the same.
  auto a = OpenFs(TestData("tiny_gpt_gz.nemo"), cache.path());
  ASSERT_TRUE(a);
  EXPECT_EQ(a->info().tensors, 20u);
  EXPECT_EQ(ReadAll(*a, *a->Resolve("tensors/model.output_layer.weight")).size(), 16384u);
  // A damaged index is ignored and rewritten.
  for (const auto& e : std::filesystem::recursive_directory_iterator(cache.path())) {
    if (e.path().filename() == "index.cbor") testing::WriteFile(e.path(), "garbage");
  }
  auto third = source::OpenSource(TestData("tiny_gpt_gz.nemo"), {cache.path()});
  ASSERT_TRUE(third.ok()) << third.error().message();
  EXPECT_FALSE(dynamic_cast<source::ArchiveSource&>(**third).index_from_cache());
  EXPECT_EQ((*third)->entries().size(), (*first)->entries().size());
}

TEST(Filesystem, OtherCompressionsThroughLibarchive) {
  for (const std::string tool : {"xz", "zstd", "bzip2"}) {
    TempDir dir;
    std::string path = dir.Join("m.nemo");
    auto r = testing::Sh(tool + " -c < " + ShellQuote(TestData("tiny_gpt.nemo")) + " > " +
                         ShellQuote(path));
    ASSERT_EQ(r.exit_code, 0) << tool << ": " << r.err;
    auto fs = OpenFs(path, dir.Join("cache"));
    ASSERT_TRUE(fs) << tool;
    EXPECT_EQ(fs->info().source_kind, "tar (" + (tool == "xz" ? std::string("xz") : tool) + ")");
    EXPECT_EQ(ReadAll(*fs, *fs->Resolve("archive/model_weights.ckpt")),
              TarMember(TestData("tiny_gpt.nemo"), "./model_weights.ckpt"))
        << tool;
    EXPECT_EQ(fs->info().tokenizer.size(), 4u) << tool;
  }
}

TEST(Filesystem, InfoCounts) {
  auto fs = OpenFs(TestData("tiny_gpt_tp2.nemo"));
  ASSERT_TRUE(fs);
  const CheckpointInfo& info = fs->info();
  EXPECT_EQ(info.format, "nemo");
  EXPECT_EQ(info.files, 7u);
  EXPECT_EQ(info.directories, 2u);
  EXPECT_EQ(info.config, "model_config.yaml");
  EXPECT_EQ(info.tokenizer.size(), 4u);
  EXPECT_EQ(*fs->GetXattr(Filesystem::kRootIno, "user.nemofs.format"), "nemo");
  EXPECT_EQ(fs->GetXattr(Filesystem::kRootIno, "user.nope").error().code(), ENODATA);
}

TEST(Filesystem, ResolveRejectsEscapes) {
  auto fs = OpenFs(TestData("tiny_gpt.nemo"));
  ASSERT_TRUE(fs);
  EXPECT_EQ(fs->Resolve("../x").error().code(), EINVAL);
  EXPECT_EQ(fs->Resolve("archive/missing").error().code(), ENOENT);
  EXPECT_EQ(*fs->Resolve(""), Filesystem::kRootIno);
}

}  // namespace
}  // namespace nemofs

namespace nemofs {
namespace {

// README: symbolic links in a folder source are followed to files; links to
// directories and dangling links are skipped with a warning.
TEST(FolderSource, SymlinksToFilesAreFollowedOthersSkipped) {
  TempDir dir;
  testing::WriteFile(dir.Join("model_config.yaml"), "a: 1\n");
  testing::WriteFile(dir.Join("real.bin"), "payload");
  std::filesystem::create_directory(dir.Join("sub"));
  std::filesystem::create_symlink("real.bin", dir.Join("link.bin"));
  std::filesystem::create_symlink("sub", dir.Join("dirlink"));
  std::filesystem::create_symlink("missing", dir.Join("dangling"));
  auto fs = OpenFs(dir.path());
  ASSERT_TRUE(fs);
  auto link = fs->Resolve("archive/link.bin");
  ASSERT_TRUE(link.ok());
  EXPECT_EQ(fs->GetAttr(*link)->type, NodeType::kFile);
  EXPECT_EQ(ReadAll(*fs, *link), "payload");
  EXPECT_EQ(fs->Resolve("archive/dirlink").error().code(), ENOENT);
  EXPECT_EQ(fs->Resolve("archive/dangling").error().code(), ENOENT);
  std::string warnings;
  for (const auto& w : fs->info().warnings) warnings += w + "\n";
  EXPECT_NE(warnings.find("'dirlink': symbolic link to a directory"), std::string::npos)
      << warnings;
  EXPECT_NE(warnings.find("'dangling': dangling symbolic link"), std::string::npos) << warnings;
}

// README: modes are 0444, 0555 when the stored member is executable; directories 0555.
TEST(Filesystem, ModesFollowTheExecutableBit) {
  TempDir dir;
  testing::TarBuilder t;
  t.AddDir("./").AddFile("./model_config.yaml", "a: 1\n");
  t.AddHeader({"./run.sh", '0', 3, "", 0755}).AddData("ls\n").End();
  testing::WriteFile(dir.Join("x.nemo"), t.bytes());
  auto fs = OpenFs(dir.Join("x.nemo"));
  ASSERT_TRUE(fs);
  EXPECT_EQ(fs->GetAttr(*fs->Resolve("archive/run.sh"))->perm, 0555u);
  EXPECT_EQ(fs->GetAttr(*fs->Resolve("config.yaml"))->perm, 0444u);
  EXPECT_EQ(fs->GetAttr(*fs->Resolve("archive"))->perm, 0555u);
}

}  // namespace
}  // namespace nemofs
