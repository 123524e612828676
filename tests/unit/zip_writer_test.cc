// The torch.save zip writer: a rewrite of real torch.save files record by
// record is byte-identical to them (so the layout is PyTorch's); zips read
// back with ZipArchive, Python's zipfile (testzip: CRCs) and torch.load; a
// record over 4 GiB (sparse, cheap) and headers past 4 GiB get ZIP64.
#include "torch/zip_writer.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "test_util.h"
#include "torch/zip_reader.h"
#include "util/fd.h"
#include "util/io.h"

namespace nemofs::torch {
namespace {

using testing::ReadFile;
using testing::Sh;
using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;

UniqueFd Create(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  EXPECT_TRUE(fd.valid()) << path;
  return fd;
}

// Rewrites every record of `path` (in order, copied from the file with the
// CRC of its central directory) into a new zip at `base` of `out`.
void Rewrite(const std::string& path, int out, uint64_t base, bool known_crc, bool via_reader,
             uint64_t* size) {
  auto in = OpenReadOnly(path);
  ASSERT_TRUE(in.ok());
  FdReader reader(in->get(), 0, ReadFile(path).size());
  auto zip = ZipArchive::Open(reader, path);
  ASSERT_TRUE(zip.ok()) << zip.error().message();
  std::vector<ZipEntry> entries = zip->entries();
  std::sort(entries.begin(), entries.end(), [](const ZipEntry& a, const ZipEntry& b) {
    return a.local_header_offset < b.local_header_offset;
  });
  ZipWriter w(out, base, "out.zip");
  for (const auto& e : entries) {
    std::optional<uint32_t> crc;
    if (known_crc) crc = e.crc32;
    Status s = via_reader ? w.AddCopy(e.name, e.size, reader, e.data_offset, crc)
                          : w.AddCopy(e.name, e.size, in->get(), e.data_offset, crc);
    ASSERT_TRUE(s.ok()) << s.error().message();
    const auto& r = w.records().back();
    EXPECT_EQ(r.data, e.data_offset) << e.name;
    EXPECT_EQ(r.crc32, e.crc32) << e.name;
    EXPECT_EQ(r.data % 64, 0u);
  }
  auto total = w.Finish();
  ASSERT_TRUE(total.ok()) << total.error().message();
  EXPECT_EQ(*total, w.size());
  *size = *total;
}

TEST(ZipWriter, RewriteOfTorchSaveFilesIsByteIdentical) {
  for (const char* rel :
       {"torch/dtypes.pt", "torch/lightning.ckpt", "torch/complex.pt", "torch/dtypes_p4.pt",
        "torch/megatron_lm_tp2/iter_0000010/mp_rank_00/model_optim_rng.pt"}) {
    for (int mode = 0; mode < 3; ++mode) {
      SCOPED_TRACE(std::string(rel) + " mode " + std::to_string(mode));
      TempDir dir;
      std::string out = dir.Join("out.pt");
      UniqueFd fd = Create(out);
      uint64_t size = 0;
      Rewrite(TestData(rel), fd.get(), 0, mode != 1, mode == 2, &size);
      EXPECT_EQ(ReadFile(out), ReadFile(TestData(rel)));
    }
  }
}

TEST(ZipWriter, AtAnOffsetReadsBackEverywhere) {
  TempDir dir;
  std::string out = dir.Join("member.bin");
  UniqueFd fd = Create(out);
  const std::string prefix(1000, 'T');  // e.g. the tar header before a member
  ASSERT_TRUE(PwriteFull(fd.get(), prefix, 0, "out").ok());
  uint64_t size = 0;
  Rewrite(TestData("torch/lightning.ckpt"), fd.get(), prefix.size(), false, false, &size);
  std::string all = ReadFile(out);
  ASSERT_EQ(all.size(), prefix.size() + size);
  EXPECT_EQ(all.substr(prefix.size()), ReadFile(TestData("torch/lightning.ckpt")));

  // Records from memory, an empty one, a new name: ZipArchive, zipfile, torch.
  std::string zip_path = dir.Join("new.pt");
  UniqueFd z = Create(zip_path);
  ZipWriter w(z.get(), 0, "new.pt");
  std::string pkl = ReadFile(TestData("torch/complex.pt"));
  auto in = OpenReadOnly(TestData("torch/complex.pt"));
  ASSERT_TRUE(in.ok());
  FdReader reader(in->get(), 0, pkl.size());
  auto src = ZipArchive::Open(reader, "complex.pt");
  ASSERT_TRUE(src.ok());
  for (const auto& e : src->entries()) {
    std::string name = "renamed/" + e.name.substr(e.name.find('/') + 1);
    auto bytes = src->Read(e, 1 << 20);
    ASSERT_TRUE(bytes.ok());
    ASSERT_TRUE(w.Add(name, *bytes).ok());
  }
  ASSERT_TRUE(w.Add("renamed/extra/empty", "").ok());
  ASSERT_TRUE(w.Finish().ok());
  ASSERT_FALSE(w.Add("late", "x").ok());

  auto back = OpenReadOnly(zip_path);
  ASSERT_TRUE(back.ok());
  FdReader rd(back->get(), 0, ReadFile(zip_path).size());
  auto zip = ZipArchive::Open(rd, zip_path);
  ASSERT_TRUE(zip.ok()) << zip.error().message();
  EXPECT_EQ(zip->prefix(), "renamed");
  ASSERT_EQ(zip->entries().size(), src->entries().size() + 1);
  for (size_t i = 0; i < w.records().size(); ++i) {
    const auto* e = zip->Find(w.records()[i].name);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->data_offset, w.records()[i].data);
    EXPECT_EQ(e->crc32, w.records()[i].crc32);
    EXPECT_EQ(e->cd_offset, w.records()[i].central);
  }
  auto r = Sh("/usr/bin/python3 -c " +
              ShellQuote("import sys, zipfile, torch\n"
                         "z = zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None\n"
                         "d = torch.load(sys.argv[1], weights_only=True)\n"
                         "print(sorted(d), d['filter.scale'].tolist())") +
              " " + ShellQuote(zip_path));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto want = Sh("/usr/bin/python3 -c " +
                 ShellQuote("import sys, torch\n"
                            "d = torch.load(sys.argv[1], weights_only=True)\n"
                            "print(sorted(d), d['filter.scale'].tolist())") +
                 " " + ShellQuote(TestData("torch/complex.pt")));
  EXPECT_EQ(r.out, want.out);
}

// CRC-32 of n zero bytes without reading them (zlib's combine, doubling).
uint32_t ZerosCrc(uint64_t n) {
  uLong crc = crc32(0, Z_NULL, 0);
  std::string block(1 << 20, '\0');
  uLong block_crc = crc32(0, reinterpret_cast<const Bytef*>(block.data()), block.size());
  for (; n >= block.size(); n -= block.size()) crc = crc32_combine64(crc, block_crc, block.size());
  return static_cast<uint32_t>(crc32(crc, reinterpret_cast<const Bytef*>(block.data()), n));
}

TEST(ZipWriter, Zip64RecordAndOffsetsPastFourGiB) {
  TempDir dir;
  const uint64_t big = (4ull << 30) + 100;  // >= 0xFFFFFFFF: ZIP64 sizes
  std::string src_path = dir.Join("zeros.bin");
  {
    UniqueFd s = Create(src_path);
    ASSERT_EQ(::ftruncate(s.get(), static_cast<off_t>(big)), 0);  // a hole: no disk used
  }
  auto src = OpenReadOnly(src_path);
  ASSERT_TRUE(src.ok());
  std::string out = dir.Join("big.pt");
  UniqueFd fd = Create(out);
  ZipWriter w(fd.get(), 0, "big.pt");
  ASSERT_TRUE(w.Add("archive/data.pkl", "\x80\x02N.").ok());
  ASSERT_TRUE(w.AddCopy("archive/data/0", big, src->get(), 0, ZerosCrc(big)).ok());
  ASSERT_TRUE(w.Add("archive/version", "3\n").ok());  // its header lies past 4 GiB
  auto total = w.Finish();
  ASSERT_TRUE(total.ok()) << total.error().message();
  struct stat st {};
  ASSERT_EQ(::fstat(fd.get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), *total);
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, 16u << 20) << "the copy was not sparse";
  const auto& rec = w.records();
  ASSERT_EQ(rec.size(), 3u);
  EXPECT_GE(rec[2].local_header, 0xFFFFFFFFull);
  EXPECT_EQ(rec[2].data % 64, 0u);

  FdReader reader(fd.get(), 0, *total);
  auto zip = ZipArchive::Open(reader, out);
  ASSERT_TRUE(zip.ok()) << zip.error().message();
  const ZipEntry* e = zip->Find("archive/data/0");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->size, big);
  EXPECT_EQ(e->data_offset, rec[1].data);
  const ZipEntry* v = zip->Find("archive/version");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->local_header_offset, rec[2].local_header);
  auto bytes = zip->Read(*v, 16);
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(*bytes, "3\n");
  // Python's zipfile: the ZIP64 extras and end records, and the CRC of the
  // record past 4 GiB (the big one is not read: 4 GiB of zeros).
  auto r = Sh("/usr/bin/python3 -c " +
              ShellQuote("import sys, zipfile\n"
                         "z = zipfile.ZipFile(sys.argv[1])\n"
                         "i = {x.filename: x for x in z.infolist()}\n"
                         "print(i['archive/data/0'].file_size, i['archive/version'].header_offset,"
                         " z.read('archive/version'), z.read('archive/data.pkl'))") +
              " " + ShellQuote(out));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, fmt::format("{} {} b'3\\n' b'\\x80\\x02N.'\n", big, rec[2].local_header));
}

TEST(ZipWriter, CopyErrorsNameTheRecord) {
  TempDir dir;
  std::string path = dir.Join("small.bin");
  testing::WriteFile(path, "abc");
  auto src = OpenReadOnly(path);
  ASSERT_TRUE(src.ok());
  UniqueFd fd = Create(dir.Join("o.zip"));
  ZipWriter w(fd.get(), 0, "o.zip");
  Status s = w.AddCopy("archive/data/0", 10, src->get(), 0, std::nullopt);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("archive/data/0"), std::string::npos) << s.error().message();
  ZipWriter w2(fd.get(), 0, "o.zip");
  EXPECT_FALSE(w2.AddCopy("archive/data/0", 10, src->get(), 0, 0u).ok());
  EXPECT_EQ(w2.Add(std::string(70000, 'n'), "x").error().code(), EINVAL);
}

}  // namespace
}  // namespace nemofs::torch
