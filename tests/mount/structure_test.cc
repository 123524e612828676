// Structural writes (issue 11): tensors added (np.save in any order and
// byte order, bfloat16 by the xattr, a raw file with user.nemofs.dtype and
// shape), deleted, renamed and replaced through the mount, stored at the
// unmount by repacking the weight file in its own format. The oracle is
// torch.load (weights_only=True where the original loads so) of the result
// against the original with the same edits applied in Python
// (structure_check.py), `nemofs verify`, and a fresh mount.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "mount_harness.h"
#include "test_util.h"
#include "write_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }
std::string Check() { return std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/structure_check.py"; }

// A private copy of a source kind: a tests/data file, or a kind of
// write_util.h ("kind:extracted_nemo_folder").
std::string Source(const std::string& what, const TempDir& dir) {
  if (what.rfind("kind:", 0) == 0) return MakeSource(Kind(what.substr(5)), dir);
  std::string to = dir.Join(std::filesystem::path(what).filename().string());
  auto r = Sh("cp -a " + Q(TestData(what)) + " " + Q(to) + " && chmod -R u+w " + Q(to));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return to;
}

class Structure : public ::testing::TestWithParam<std::string> {};

TEST_P(Structure, AddDeleteRenameReplaceAreStoredInTheWeightFilesOwnFormat) {
  TempDir dir;
  const std::string src = Source(GetParam(), dir);
  const std::string orig = dir.Join("orig");
  ASSERT_EQ(Sh("cp -a " + Q(src) + " " + Q(orig)).exit_code, 0);
  const std::string plan = dir.Join("plan.json");
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = Sh("/usr/bin/python3 " + Q(Check()) + " edit " + Q(m->path()) + " " + Q(plan), 120);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
    // Nothing is stored before the unmount (or an fsync).
    EXPECT_EQ(Sh("cmp -s " + Q(src) + " " + Q(orig) + " || diff -rq " + Q(src) + " " + Q(orig))
                  .exit_code,
              0);
    m->Unmount();
    EXPECT_NE(m->Log().find("stored tensor changes in"), std::string::npos) << m->Log();
  }
  auto r = Sh("/usr/bin/python3 " + Q(Check()) + " check " + Q(orig) + " " + Q(src) + " " +
                  Q(plan),
              120);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  // A fresh mount shows the new tensors with their dtype and shape.
  auto again = Mount::Start(src);
  ASSERT_TRUE(again);
  auto x = Sh("getfattr --only-values -n user.nemofs.shape " +
              Q(again->path() + "/tensors/nemofs.fortran") + "; echo; getfattr --only-values -n "
              "user.nemofs.dtype " + Q(again->path() + "/tensors/nemofs.bf16"));
  EXPECT_EQ(x.out, "[2,3,4]\nbfloat16") << x.err;
  again->Unmount();
}

INSTANTIATE_TEST_SUITE_P(Sources, Structure,
                         ::testing::Values("tiny_gpt.nemo", "tiny_gpt_gz.nemo",
                                           "kind:extracted_nemo_folder", "torch/lightning.ckpt",
                                           "torch/dtypes.pt", "torch/dtypes_legacy.pt"),
                         [](const auto& info) { return TestName(info.param); });

// Per-rank checkpoints (TP x PP, SwiGLU): a change of a merged tensor is
// split back to each rank file by the rules reads merge by, new tensors go
// to the ranks their name says, what the rules cannot split is EINVAL at
// once. The oracle merges the rank files torch.load reads, in Python.
class RankStructure : public ::testing::TestWithParam<std::string> {};

TEST_P(RankStructure, ChangesAreSplitBackToEveryRankFile) {
  TempDir dir;
  // "gz:F": F gzip-compressed (a compressed .nemo is rewritten whole);
  // "folder:F": F extracted by GNU tar (the rank files replaced under one
  // roll-forward journal, write/folder_txn.h).
  const bool gz = GetParam().rfind("gz:", 0) == 0;
  const bool folder = GetParam().rfind("folder:", 0) == 0;
  std::string src = Source(gz ? GetParam().substr(3) : folder ? GetParam().substr(7) : GetParam(), dir);
  if (gz) {
    ASSERT_EQ(Sh("gzip -n < " + Q(src) + " > " + Q(src) + ".gz && mv " + Q(src) + ".gz " + Q(src))
                  .exit_code,
              0);
  }
  if (folder) {
    ASSERT_EQ(Sh("mkdir " + Q(dir.Join("extracted")) + " && tar -xf " + Q(src) + " -C " +
                 Q(dir.Join("extracted"))).exit_code, 0);
    src = dir.Join("extracted");
  }
  const std::string orig = dir.Join("orig");
  ASSERT_EQ(Sh("cp -a " + Q(src) + " " + Q(orig)).exit_code, 0);
  const std::string plan = dir.Join("plan.json");
  const std::string check = std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/rank_structure_check.py";
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = Sh("/usr/bin/python3 " + Q(check) + " edit " + Q(m->path()) + " " + Q(plan), 120);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
    EXPECT_EQ(Sh((folder ? "diff -r " : "cmp -s ") + Q(src) + " " + Q(orig)).exit_code, 0);
    m->Unmount();
    EXPECT_NE(m->Log().find("stored tensor changes in"), std::string::npos) << m->Log();
    EXPECT_NE(m->Log().find("rank files)"), std::string::npos) << m->Log();
    if (folder) {
      EXPECT_NE(m->Log().find("rank files replaced under one journal"), std::string::npos)
          << m->Log();
    }
  }
  auto r = Sh("/usr/bin/python3 " + Q(check) + " check " + Q(orig) + " " + Q(src) + " " + Q(plan),
              120);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  if (folder) {
    EXPECT_EQ(Sh("ls -A " + Q(src) + " | grep nemofs").out, "") << "a commit file left behind";
  } else {
    auto tar = Sh("tar -tf " + Q(src) + " > /dev/null");
    EXPECT_EQ(tar.exit_code, 0) << tar.err;
  }
}

INSTANTIATE_TEST_SUITE_P(Sources, RankStructure,
                         ::testing::Values("torch/tiny_gpt_tp2pp2.nemo",
                                           "torch/tiny_gpt_swiglu_tp2.nemo",
                                           "gz:torch/tiny_gpt_tp2pp2.nemo",
                                           "folder:torch/tiny_gpt_tp2pp2.nemo"),
                         [](const auto& info) { return TestName(info.param); });

// PyTorch DCP / Megatron torch_dist folders (a bare one, NeMo 2's
// weights/): new items go to a new .distcp, a new .metadata is renamed
// over; the old .distcp files are not rewritten. The oracle reads the
// folder by PyTorch's read path (tests/tools/dcp_read.py).
class DcpStructure : public ::testing::TestWithParam<std::string> {};

TEST_P(DcpStructure, ChangesGoToANewDistcpAndMetadata) {
  TempDir dir;
  const std::string fixture = GetParam().substr(0, GetParam().find(':'));
  const std::string sub = GetParam().find(':') == std::string::npos
                              ? ""
                              : "/" + GetParam().substr(GetParam().find(':') + 1);
  const std::string src = Source(fixture, dir);
  const std::string orig = dir.Join("orig");
  ASSERT_EQ(Sh("cp -a " + Q(src) + " " + Q(orig)).exit_code, 0);
  const std::string plan = dir.Join("plan.json");
  const std::string check = std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/dcp_structure_check.py";
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = Sh("/usr/bin/python3 " + Q(check) + " edit " + Q(m->path()) + " " + Q(plan), 120);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
    EXPECT_EQ(Sh("diff -r " + Q(src) + " " + Q(orig)).exit_code, 0);
    m->Unmount();
    EXPECT_NE(m->Log().find("new .distcp file and .metadata rename"), std::string::npos)
        << m->Log();
  }
  auto r = Sh("/usr/bin/python3 " + Q(check) + " check " + Q(orig + sub) + " " + Q(src + sub) +
                  " " + Q(plan),
              120);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_EQ(v.out.find("orphan:"), std::string::npos) << v.out;
  // repack drops the superseded items (the deleted and replaced tensors'),
  // and PyTorch's reader reads the same tensors after it.
  const std::string digests =
      "/usr/bin/python3 " + Q(std::string(NEMOFS_SOURCE_DIR) + "/tests/tools/dcp_read.py") + " " +
      Q(src + sub) + " | /usr/bin/python3 -c \"import json,sys; d = json.load(sys.stdin); "
      "print(json.dumps({k: v['sha256'] for k, v in d['tensors'].items()}, sort_keys=True))\"";
  const std::string before_repack = Sh(digests).out;
  auto rp = Sh(Q(NemofsBinary()) + " repack " + Q(src));
  EXPECT_EQ(rp.exit_code, 0) << rp.out << rp.err;
  EXPECT_NE(rp.out.find("bytes of superseded distributed-checkpoint items reclaimed"),
            std::string::npos) << rp.out;
  EXPECT_EQ(rp.out.find(": 0 bytes of superseded"), std::string::npos) << rp.out;
  EXPECT_EQ(Sh(digests).out, before_repack);
  EXPECT_GT(before_repack.size(), 10u);
  // A fresh mount shows the new tensor.
  auto again = Mount::Start(src);
  ASSERT_TRUE(again);
  EXPECT_EQ(Sh("getfattr --only-values -n user.nemofs.shape " +
               Q(again->path() + "/tensors/model.nemofs_head.weight")).out,
            "[10,4]");
  again->Unmount();
}

INSTANTIATE_TEST_SUITE_P(Sources, DcpStructure,
                         ::testing::Values("dist/torch_dist_v23", "dist/torch_dist_v22",
                                           "dist/nemo2:weights"),
                         [](const auto& info) { return TestName(info.param); });

// A torch_dist checkpoint inside a NeMo 1 .nemo (model_weights/): the new
// .distcp and the new .metadata are two members stored in one commit of
// the archive (one append to a plain tar, the old members untouched; one
// rewrite of a gzip one). GNU tar extracts the result; PyTorch's read
// path reads the extracted folder as the original plus the changes.
class DcpInNemoStructure : public ::testing::TestWithParam<std::string> {};

TEST_P(DcpInNemoStructure, ChangesAreANewDistcpAndMetadataMember) {
  TempDir dir;
  std::string src = Source("dist/model_weights_dist.nemo", dir);
  const bool gz = GetParam() == "gzip";
  if (gz) {
    ASSERT_EQ(Sh("gzip -c " + Q(src) + " > " + Q(dir.Join("gz.nemo"))).exit_code, 0);
    src = dir.Join("gz.nemo");
  }
  const std::string orig = dir.Join("orig"), after = dir.Join("after");
  ASSERT_EQ(Sh("mkdir " + Q(orig) + " " + Q(after) + " && tar -xf " + Q(src) + " -C " + Q(orig))
                .exit_code,
            0);
  const std::string orig_copy = dir.Join("orig.nemo");
  ASSERT_EQ(Sh("cp " + Q(src) + " " + Q(orig_copy)).exit_code, 0);
  const std::string plan = dir.Join("plan.json");
  const std::string check = std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/dcp_structure_check.py";
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = Sh("/usr/bin/python3 " + Q(check) + " edit " + Q(m->path()) + " " + Q(plan), 120);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
    m->Unmount();
    EXPECT_NE(m->Log().find("of a new .distcp and .metadata"), std::string::npos) << m->Log();
  }
  auto r = Sh("tar -xf " + Q(src) + " -C " + Q(after));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh("/usr/bin/python3 " + Q(check) + " check " + Q(orig + "/model_weights") + " " +
             Q(after + "/model_weights") + " " + Q(plan),
         120);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  // NeMo's restore contract: the config and the tokenizer files are as they were.
  EXPECT_EQ(Sh("cmp " + Q(orig + "/model_config.yaml") + " " + Q(after + "/model_config.yaml"))
                .exit_code,
            0);
  if (!gz) {
    // An append: every byte before the old end-of-archive marker is as it was.
    const std::string n =
        Sh("/usr/bin/python3 -c \"import tarfile, sys; m = tarfile.open(sys.argv[1]).getmembers()"
           "[-1]; print((m.offset_data + m.size + 511) // 512 * 512)\" " + Q(orig_copy)).out;
    ASSERT_GT(n.size(), 1u);
    EXPECT_EQ(Sh("cmp -n " + n.substr(0, n.size() - 1) + " " + Q(orig_copy) + " " + Q(src))
                  .exit_code,
              0);
  }
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  if (!gz) {
    // repack drops the superseded .metadata member.
    EXPECT_EQ(Sh("tar -tf " + Q(src) + " | grep -c 'model_weights/.metadata$'").out, "2\n");
    auto rp = Sh(Q(NemofsBinary()) + " repack " + Q(src));
    EXPECT_EQ(rp.exit_code, 0) << rp.out << rp.err;
    EXPECT_EQ(Sh("tar -tf " + Q(src) + " | grep -c 'model_weights/.metadata$'").out, "1\n");
  }
  auto again = Mount::Start(src);
  ASSERT_TRUE(again);
  EXPECT_EQ(Sh("getfattr --only-values -n user.nemofs.shape " +
               Q(again->path() + "/tensors/model.nemofs_head.weight")).out,
            "[10,4]");
  again->Unmount();
}

INSTANTIATE_TEST_SUITE_P(Archives, DcpInNemoStructure, ::testing::Values("plain", "gzip"),
                         [](const auto& info) { return info.param; });

// Megatron-Core zarr folders: each new or reshaped tensor a new array
// folder, deleted ones removed, renamed ones moved, all under one
// roll-forward journal (write/folder_txn.h). The oracle is the zarr
// library; the arrays left alone keep their chunk files byte for byte.
class ZarrStructure : public ::testing::TestWithParam<std::string> {};

TEST_P(ZarrStructure, ChangesAreArrayFoldersMovedInByOneJournal) {
  TempDir dir;
  const std::string src = Source(GetParam(), dir);
  // A user's checkpoint, mounted by root: new arrays are the user's too.
  ASSERT_EQ(Sh("chown -R 1234:1234 " + Q(src)).exit_code, 0);
  const std::string orig = dir.Join("orig");
  ASSERT_EQ(Sh("cp -a " + Q(src) + " " + Q(orig)).exit_code, 0);
  const std::string plan = dir.Join("plan.json");
  const std::string check = std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/dcp_structure_check.py";
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = Sh("/usr/bin/python3 " + Q(check) + " edit " + Q(m->path()) + " " + Q(plan), 120);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
    EXPECT_EQ(Sh("diff -r " + Q(src) + " " + Q(orig)).exit_code, 0) << "stored before the commit";
    // A key that cannot name an array folder: refused at its close.
    r = Sh("/usr/bin/python3 -c \"import numpy as np; np.save('" + m->path() +
           "/tensors/a%2Fb.npy', np.ones(2, np.float32))\"");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << r.err;
    // An optimizer key in tensors/ would show in optimizer/ once stored: refused.
    r = Sh("/usr/bin/python3 -c \"import numpy as np; np.save('" + m->path() +
           "/tensors/optimizer.x.npy', np.ones(2, np.float32))\"");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(m->Log().find("are optimizer state by their 'optimizer.' prefix"), std::string::npos)
        << m->Log();
    m->Unmount();
    EXPECT_NE(m->Log().find("zarr arrays staged and moved in by one journal"), std::string::npos)
        << m->Log();
  }
  auto r = Sh("/usr/bin/python3 " + Q(check) + " check-zarr " + Q(orig) + " " + Q(src) + " " +
                  Q(plan),
              120);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(Sh("stat -c %u:%g " + Q(src + "/model.nemofs_head.weight") + " " +
               Q(src + "/model.nemofs_head.weight/.zarray")).out,
            "1234:1234\n1234:1234\n");
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_EQ(v.out.find("orphan:"), std::string::npos) << v.out;
  auto again = Mount::Start(src);
  ASSERT_TRUE(again);
  EXPECT_EQ(Sh("getfattr --only-values -n user.nemofs.shape " +
               Q(again->path() + "/tensors/model.nemofs_head.weight")).out,
            "[10,4]");
  again->Unmount();
}

INSTANTIATE_TEST_SUITE_P(Sources, ZarrStructure, ::testing::Values("dist/zarr"),
                         [](const auto& info) { return TestName(info.param); });

// A NeMo 1 .nemo whose model_weights/ is the zarr fixture (GNU tar;
// gzip-compressed with `gz`), in `dir`; its extracted copy in dir/orig.
std::string MakeZarrNemo(const TempDir& dir, bool gz) {
  const std::string stage = dir.Join("stage"), out = dir.Join(gz ? "zarr_gz.nemo" : "zarr.nemo");
  auto r = Sh("mkdir -p " + Q(stage) + " " + Q(dir.Join("orig")) + " && tar -xf " +
              Q(TestData("dist/model_weights_dist.nemo")) + " -C " + Q(stage) + " && rm -r " +
              Q(stage + "/model_weights") + " && cp -r " + Q(TestData("dist/zarr")) + " " +
              Q(stage + "/model_weights") + " && tar -cf " + Q(out) + " -C " + Q(stage) + " . " +
              (gz ? "&& gzip " + Q(out) + " && mv " + Q(out) + ".gz " + Q(out) : "") +
              " && tar -xf " + Q(out) + " -C " + Q(dir.Join("orig")));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return out;
}

// A zarr inside a .nemo (plain or gzip): members cannot be deleted by
// appending, so a commit rewrites the archive (atomic replace) without the
// deleted and renamed arrays' members and with the new arrays; GNU tar
// extracts it, the zarr library reads it as the original plus the changes,
// and a later config edit in the same mount appends after the new end.
class ZarrInNemoStructure : public ::testing::TestWithParam<std::string> {};

TEST_P(ZarrInNemoStructure, ACommitRewritesTheArchive) {
  TempDir dir;
  const bool gz = GetParam() == "gzip";
  const std::string src = MakeZarrNemo(dir, gz);
  const std::string plan = dir.Join("plan.json"), after = dir.Join("after");
  const std::string check = std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/dcp_structure_check.py";
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = Sh("/usr/bin/python3 " + Q(check) + " edit " + Q(m->path()) + " " + Q(plan), 120);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
    r = Sh("cd " + Q(m->path() + "/tensors") + " && /usr/bin/python3 -c \"import os; "
           "f = open('model.nemofs_head.weight', 'rb+'); os.fsync(f.fileno())\"");
    ASSERT_EQ(r.exit_code, 0) << r.err << m->Log();
    EXPECT_NE(m->Log().find("a tar cannot delete members by appending"), std::string::npos)
        << m->Log();
    // The config after the rewrite: appended (plain) or rewritten again.
    r = Sh("sed -i 's/^precision: bf16/precision: 32/' " + Q(m->path() + "/config.yaml"));
    ASSERT_EQ(r.exit_code, 0) << r.err << m->Log();
    m->Unmount();
  }
  auto r = Sh("mkdir " + Q(after) + " && tar -xf " + Q(src) + " -C " + Q(after));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh("/usr/bin/python3 " + Q(check) + " check-zarr " + Q(dir.Join("orig/model_weights")) +
             " " + Q(after + "/model_weights") + " " + Q(plan),
         120);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(Sh("cmp " + Q(dir.Join("orig/model_config.yaml")) + " " +
               Q(after + "/model_config.yaml")).exit_code,
            1)
      << "the config edit after the rewrite was not stored";
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_EQ(v.out.find("orphan:"), std::string::npos) << v.out;
}

INSTANTIATE_TEST_SUITE_P(Archives, ZarrInNemoStructure, ::testing::Values("plain", "gzip"),
                         [](const auto& info) { return info.param; });

// A crash in that rewrite: before its rename the archive is the old one
// (and the temp an orphan repack removes), after it the new one.
class ZarrInNemoCrash : public ::testing::TestWithParam<std::pair<std::string, bool>> {};

TEST_P(ZarrInNemoCrash, LeavesTheOldArchiveOrTheNew) {
  const auto& [step, committed] = GetParam();
  TempDir dir;
  const std::string src = MakeZarrNemo(dir, false);
  const std::string before = SourceDigest(src);
  {
    auto m = Mount::StartWritable(src, {"NEMOFS_FAULT=" + step});
    ASSERT_TRUE(m);
    Sh("rm " + Q(m->path() + "/tensors/model.output_layer.weight") + " && cd " +
       Q(m->path() + "/tensors") + " && /usr/bin/python3 -c \"import os; "
       "f = open('model.embedding.position_ids', 'rb+'); os.fsync(f.fileno())\"", 60);
    int status = m->ExpectDeath();
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 77) << status << "\n" << m->Log();
  }
  EXPECT_EQ(Sh("tar -tf " + Q(src) + " > /dev/null").exit_code, 0);
  const std::string ls = Sh(Q(NemofsBinary()) + " ls " + Q(src)).out;
  EXPECT_EQ(ls.find("model.output_layer.weight") == std::string::npos, committed) << ls;
  if (!committed) {
    EXPECT_EQ(SourceDigest(src), before);
  }
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_EQ(v.out.find("orphan: ") != std::string::npos, !committed) << v.out;
  EXPECT_EQ(Sh(Q(NemofsBinary()) + " repack " + Q(src)).exit_code, 0);
  EXPECT_EQ(Sh(Q(NemofsBinary()) + " verify " + Q(src)).out.find("orphan: "), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Steps, ZarrInNemoCrash,
                         ::testing::Values(std::make_pair(std::string("rewrite:written"), false),
                                           std::make_pair(std::string("rewrite:renamed"), true)),
                         [](const auto& info) { return TestName(info.param.first); });

// A zstd-compressed array renamed: its folder moves whole (the compressed
// chunks as they were), and the zarr library reads it under the new key.
TEST(ZarrStructureZstd, ARenamedCompressedArrayKeepsItsChunks) {
  TempDir dir;
  const std::string src = Source("dist/zarr_zstd", dir);
  const std::string orig = dir.Join("orig");
  ASSERT_EQ(Sh("cp -a " + Q(src) + " " + Q(orig)).exit_code, 0);
  const std::string key = "model.embedding.word_embeddings.weight";
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    ASSERT_EQ(Sh("mv " + Q(m->path() + "/tensors/" + key) + " " +
                 Q(m->path() + "/tensors/" + key + ".renamed")).exit_code, 0) << m->Log();
    m->Unmount();
  }
  const std::string plan = dir.Join("plan.json");
  std::ofstream(plan) << "{\"deleted\": [], \"renamed\": {\"" << key << "\": \"" << key
                      << ".renamed\"}, \"added\": {}, \"grown\": {}, \"optimizer_deleted\": []}";
  auto r = Sh("/usr/bin/python3 " +
                  Q(std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/dcp_structure_check.py") +
                  " check-zarr " + Q(orig) + " " + Q(src) + " " + Q(plan),
              120);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(Sh("diff -r " + Q(orig + "/" + key) + " " + Q(src + "/" + key + ".renamed")).exit_code,
            0);
}

// model.safetensors written back whole (copied out, changed: a key
// dropped, values changed, a shape changed, a key added, and copied in):
// its close stores the changes it implies; torch.load of the result is
// the original with the same changes.
class SafetensorsWriteBack : public ::testing::TestWithParam<std::string> {};

TEST_P(SafetensorsWriteBack, ItsCloseStoresTheChangesItImplies) {
  TempDir dir;
  const std::string src = Source(GetParam(), dir);
  const std::string orig = dir.Join("orig");
  ASSERT_EQ(Sh("cp -a " + Q(src) + " " + Q(orig)).exit_code, 0);
  const std::string plan = dir.Join("plan.json");
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("/usr/bin/python3 " + Q(Check()) + " safetensors " + Q(m->path()) + " " + Q(plan),
              120);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  // Stored at the close, shown at once.
  auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src) + " written.back");
  EXPECT_NE(ls.out.find("written.back"), std::string::npos) << ls.out << ls.err << m->Log();
  EXPECT_EQ(Sh("getfattr --only-values -n user.nemofs.shape " +
               Q(m->path() + "/tensors/written.back")).out,
            "[4]");
  // An invalid file: EINVAL at its close, nothing changes.
  const std::string before = Sh("sha256sum < " + Q(src) + " 2>/dev/null || true").out;
  r = Sh("/usr/bin/python3 -c \"f = open('" + m->path() + "/model.safetensors', 'wb'); "
         "f.write((64).to_bytes(8, 'little') + b'{not json'); f.close()\"");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << r.err;
  EXPECT_EQ(Sh("sha256sum < " + Q(src) + " 2>/dev/null || true").out, before);
  m->Unmount();
  EXPECT_NE(m->Log().find("model.safetensors not applied"), std::string::npos) << m->Log();
  r = Sh("/usr/bin/python3 " + Q(Check()) + " check " + Q(orig) + " " + Q(src) + " " + Q(plan),
         120);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(Sh(Q(NemofsBinary()) + " verify " + Q(src)).exit_code, 0);
}

INSTANTIATE_TEST_SUITE_P(Sources, SafetensorsWriteBack,
                         ::testing::Values("tiny_gpt.nemo", "tiny_gpt_gz.nemo",
                                           "kind:extracted_nemo_folder", "torch/lightning.ckpt"),
                         [](const auto& info) { return TestName(info.param); });

// During the mount, after an fsync stored them: index.json and
// model.safetensors list the new tensor, the renamed one keeps its inode
// under its new name, and a second round of changes is stored too.
TEST(StructureLive, AnFsyncStoresAndTheTreeShowsItAtOnce) {
  TempDir dir;
  const std::string src = Source("tiny_gpt.nemo", dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  const std::string t = m->path() + "/tensors/";
  auto r = Sh("cd " + Q(t) + " && k=$(ls | head -1) && stat -c %i \"$k\" > " +
              Q(dir.Join("ino")) + " && mv \"$k\" renamed.weight && /usr/bin/python3 -c \""
              "import numpy as np, os; f = open('new.weight.npy', 'wb'); "
              "np.save(f, np.ones((4, 4), np.float32)); f.flush(); os.fsync(f.fileno()); f.close()\"");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  EXPECT_EQ(Sh("stat -c %i " + Q(t + "renamed.weight")).out, ReadFile(dir.Join("ino")));
  auto idx = Sh("/usr/bin/python3 -c \"import json,sys; t = json.load(open(sys.argv[1]))['tensors'];"
                " print('new.weight' in t, 'renamed.weight' in t, t['new.weight']['shape'])\" " +
                Q(m->path() + "/index.json"));
  EXPECT_EQ(idx.out, "True True [4, 4]\n") << idx.err << m->Log();
  EXPECT_NE(Sh("grep -c new.weight " + Q(m->path() + "/model.safetensors")).out, "0\n");
  // The stored source already has them (before the unmount).
  auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src) + " 'new.*'");
  EXPECT_NE(ls.out.find("new.weight"), std::string::npos) << ls.out << ls.err;
  // A second round: delete what the first one added.
  ASSERT_EQ(Sh("rm " + Q(t + "new.weight")).exit_code, 0);
  EXPECT_NE(Sh("stat " + Q(t + "new.weight")).exit_code, 0);
  m->Unmount();
  ls = Sh(Q(NemofsBinary()) + " ls " + Q(src));
  EXPECT_EQ(ls.out.find("new.weight"), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("renamed.weight"), std::string::npos) << ls.out;
  EXPECT_EQ(Sh(Q(NemofsBinary()) + " verify " + Q(src)).exit_code, 0);
}

// What cannot be a tensor is refused at its close, nothing stored: a .npy
// whose data does not match its header, a raw file whose size does not
// match its dtype and shape, a bad xattr value; a new optimizer tensor
// cannot be added (EINVAL at the store, the source unchanged).
TEST(StructureRules, WhatIsNoTensorIsRefusedAtItsClose) {
  TempDir dir;
  const std::string src = Source("tiny_gpt.nemo", dir);
  const std::string digest = Sh("sha256sum < " + Q(src)).out;
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  const std::string t = m->path() + "/tensors/";
  auto r = Sh("cd " + Q(t) + " && /usr/bin/python3 -c \"import numpy as np; "
              "np.save('short.npy', np.zeros(10, np.float32)); "
              "np.save('" + dir.Join("cut.npy") + "', np.zeros(10, np.float32))\" && head -c -4 " +
              Q(dir.Join("cut.npy")) + " > cut.npy");
  EXPECT_NE(r.exit_code, 0) << "a truncated .npy must fail at its close";
  EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << r.err;
  EXPECT_NE(Sh("stat " + Q(t + "cut.npy")).exit_code, 0) << "the refused file is gone";
  r = Sh("cd " + Q(t) + " && touch raw && setfattr -n user.nemofs.dtype -v float32 raw && "
         "setfattr -n user.nemofs.shape -v 3 raw && /usr/bin/python3 -c \"f = open('raw', 'ab');"
         " f.write(b'12345'); f.close()\"");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(Sh("stat " + Q(t + "raw")).exit_code, 0);
  r = Sh("cd " + Q(t) + " && touch raw2 && setfattr -n user.nemofs.dtype -v floaty raw2");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << r.err;
  // Tensors cannot be made elsewhere than in their directories.
  EXPECT_NE(Sh("touch " + Q(m->path() + "/tokenizer/x")).exit_code, 0);
  m->Unmount();
  const std::string log = m->Log();
  EXPECT_NE(log.find("new tensor file 'cut.npy' refused"), std::string::npos) << log;
  EXPECT_NE(log.find("not stored: tensors/raw2"), std::string::npos) << log;
  // short.npy was a valid tensor: stored; nothing else.
  auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src));
  EXPECT_NE(ls.out.find("short "), std::string::npos) << ls.out;
  EXPECT_EQ(ls.out.find("cut"), std::string::npos) << ls.out;
  EXPECT_NE(Sh("sha256sum < " + Q(src)).out, digest);
}

// A crash inside a structural commit leaves the weight file old or new,
// never broken: the next mount and `verify` read one of them whole.
struct CrashCase {
  std::string source;
  std::string step;
  bool committed;
};
void PrintTo(const CrashCase& c, std::ostream* os) { *os << c.source << " at " << c.step; }
class StructureCrash : public ::testing::TestWithParam<CrashCase> {};

TEST_P(StructureCrash, LeavesTheOldWeightsOrTheNew) {
  const CrashCase& c = GetParam();
  TempDir dir;
  const std::string src = Source(c.source, dir);
  {
    auto m = Mount::StartWritable(src, {"NEMOFS_FAULT=" + c.step});
    ASSERT_TRUE(m);
    auto r = Sh("cd " + Q(m->path() + "/tensors") + " && /usr/bin/python3 -c \"import numpy as np,"
                " os; f = open('crash.new.npy', 'wb'); np.save(f, np.ones(3, np.float32)); "
                "f.flush(); os.fsync(f.fileno())\"",
                60);
    EXPECT_NE(r.exit_code, 0) << "the daemon should have died in the commit";
    int status = m->ExpectDeath();
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 77) << status << "\n" << m->Log();
  }
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src));
  EXPECT_EQ(ls.exit_code, 0) << ls.err;
  EXPECT_EQ(ls.out.find("crash.new") != std::string::npos, c.committed) << ls.out;
  // A crash before the rename leaves the temp file: verify names it (the
  // checkpoint is fine: exit 0), repack removes it.
  const bool temp_left = c.step == "rewrite:written" || c.step == "folder:written" ||
                         c.step == "file:written" || c.step == "dcp:distcp-written" ||
                         c.step == "dcp:metadata-written" || c.step == "folder-commit:staged";
  EXPECT_EQ(v.out.find("orphan: ") != std::string::npos, temp_left) << v.out;
  auto rp = Sh(Q(NemofsBinary()) + " repack " + Q(src));
  EXPECT_EQ(rp.exit_code, 0) << rp.out << rp.err;
  EXPECT_EQ(rp.out.find("left by interrupted commits") != std::string::npos, temp_left) << rp.out;
  v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_EQ(v.out.find("orphan: "), std::string::npos) << v.out;
  EXPECT_EQ(Sh(Q(NemofsBinary()) + " ls " + Q(src)).out, ls.out) << "repack changed the tensors";
}

INSTANTIATE_TEST_SUITE_P(
    Steps, StructureCrash,
    ::testing::Values(CrashCase{"tiny_gpt.nemo", "tar-append:data-written", false},
                      CrashCase{"tiny_gpt.nemo", "tar-append:committed", true},
                      CrashCase{"tiny_gpt_gz.nemo", "rewrite:written", false},
                      CrashCase{"tiny_gpt_gz.nemo", "rewrite:renamed", true},
                      CrashCase{"kind:extracted_nemo_folder", "folder:written", false},
                      CrashCase{"kind:extracted_nemo_folder", "folder:renamed", true},
                      CrashCase{"torch/lightning.ckpt", "file:written", false},
                      CrashCase{"torch/lightning.ckpt", "file:renamed", true},
                      CrashCase{"dist/torch_dist_v23", "dcp:distcp-written", false},
                      CrashCase{"dist/torch_dist_v23", "dcp:metadata-written", false},
                      CrashCase{"dist/torch_dist_v23", "dcp:metadata-renamed", true},
                      CrashCase{"dist/model_weights_dist.nemo", "tar-append:data-written", false},
                      CrashCase{"dist/model_weights_dist.nemo", "tar-append:committed", true},
                      CrashCase{"dist/zarr", "folder-commit:staged", false},
                      CrashCase{"dist/zarr", "folder-commit:journal", true},
                      CrashCase{"dist/zarr", "folder-commit:half", true},
                      CrashCase{"dist/zarr", "folder-commit:applied", true}),
    [](const auto& info) { return TestName(info.param.source + "_" + info.param.step); });

}  // namespace
}  // namespace nemofs::testing

namespace nemofs::testing {
namespace {

// npy/: every tensor numpy has a type for, as KEY.npy that np.load reads
// with mmap_mode='r' (bfloat16 as uint16, its dtype in the xattr), the same
// bytes as tensors/KEY; in a writable mount rm and np.save there are those
// of tensors/.
TEST(NpyView, NpLoadReadsEveryTensorAndWritesGoToTensors) {
  TempDir dir;
  const std::string src = Source("torch/dtypes.pt", dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("/usr/bin/python3 -c \"\nimport numpy as np, os, json, sys\nm = sys.argv[1]\n"
              "idx = json.load(open(m + '/index.json'))['tensors']\nn = 0\n"
              "for name in sorted(os.listdir(m + '/npy')):\n"
              "    key = name[:-4]\n"
              "    a = np.load(m + '/npy/' + name, mmap_mode='r')\n"
              "    raw = open(m + '/tensors/' + key, 'rb').read()\n"
              "    assert list(a.shape) == idx[key]['shape'], (key, a.shape)\n"
              "    assert a.tobytes() == raw, key\n"
              "    assert os.getxattr(m + '/npy/' + name, 'user.nemofs.dtype').decode() == "
              "idx[key]['dtype']\n"
              "    n += 1\n"
              "print(n, len(idx))\n\" " + Q(m->path()));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  // Every tensor has its .npy (dtypes.pt has none of the dtypes numpy lacks:
  // quantized, float8, complex32).
  EXPECT_EQ(r.out, "31 31\n") << r.out;
  const std::string npy = m->path() + "/npy/";
  r = Sh("cd " + Q(npy) + " && rm float32.npy && mv int8.npy int8.moved.npy && "
         "/usr/bin/python3 -c \"import numpy as np; np.save('added.npy', np.arange(3.0))\" && "
         "ls ../tensors | grep -c -e '^float32$' -e '^int8.moved$' -e '^added$'");
  EXPECT_EQ(r.out, "2\n") << r.out << r.err << m->Log();
  EXPECT_NE(Sh("stat " + Q(npy + "float32.npy")).exit_code, 0);
  m->Unmount();
  auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src) + " | grep -c -e '^float32 ' -e '^int8 ' "
              "-e '^int8.moved ' -e '^added '");
  EXPECT_EQ(ls.out, "2\n") << "int8.moved and added, not float32 or int8";
}

}  // namespace
}  // namespace nemofs::testing

namespace nemofs::testing {
namespace {

// A full disk during a structural commit: the fsync that commits fails
// with ENOSPC, the source is byte for byte as it was with nothing left
// beside it, and with room again the same mount stores the change.
class StructureFullDisk : public ::testing::TestWithParam<std::string> {};

TEST_P(StructureFullDisk, TheCommitFailsWithEnospcAndChangesNothing) {
  TempDir dir;
  const std::string fs_dir = dir.Join("fs");
  SmallTmpfs tmpfs(fs_dir, "4m");
  ASSERT_TRUE(tmpfs.mounted());
  std::string src;
  if (GetParam().rfind("kind:", 0) == 0) {
    const SourceKind& kind = Kind(GetParam().substr(5));
    src = MakeSourceAt(kind, fs_dir + "/" + (kind.tar ? "src.nemo" : "src"));
  } else {
    src = fs_dir + "/" + std::filesystem::path(GetParam()).filename().string();
    ASSERT_EQ(Sh("cp -a " + Q(TestData(GetParam())) + " " + Q(src)).exit_code, 0);
  }
  Sh("dd if=/dev/zero of=" + Q(fs_dir + "/fill") + " bs=4k");
  ASSERT_EQ(Sh("stat -f -c %a " + Q(fs_dir)).out, "0\n") << "the tmpfs is not full";
  const std::string digest = SourceDigest(src);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  const std::string add =
      "cd " + Q(m->path() + "/tensors") + " && /usr/bin/python3 -c \"import numpy as np, os; "
      "f = open('full.new.npy', 'wb'); np.save(f, np.ones((64, 64), np.float32)); f.flush(); "
      "os.fsync(f.fileno())\"";
  auto r = Sh(add);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("No space left on device"), std::string::npos) << r.err << m->Log();
  EXPECT_EQ(SourceDigest(src), digest) << "the source changed after the failed commit";
  EXPECT_EQ(Sh("find " + Q(fs_dir) + " -name '*.nemofs-*'").out, "");
  ASSERT_EQ(Sh("rm " + Q(fs_dir + "/fill")).exit_code, 0);
  m->Unmount();  // room again: the staged change is stored now
  auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src) + " 'full.*'");
  EXPECT_NE(ls.out.find("full.new"), std::string::npos) << ls.out << ls.err << m->Log();
  EXPECT_EQ(Sh(Q(NemofsBinary()) + " verify " + Q(src)).exit_code, 0);
}

INSTANTIATE_TEST_SUITE_P(Sources, StructureFullDisk,
                         ::testing::Values("kind:plain_tar", "kind:gzip_tar",
                                           "kind:extracted_nemo_folder", "torch/lightning.ckpt",
                                           "dist/torch_dist_v23", "dist/zarr"),
                         [](const auto& info) { return TestName(info.param); });

// kill -9 of the daemon at random instants while a 32 MiB tensor is being
// added: every time, the next open reads the old weights or the new ones
// whole (verify passes, `nemofs ls` works), and nothing is left beside.
TEST(StructureKill, SigkillLoopLeavesTheOldWeightsOrTheNew) {
  TempDir dir;
  const std::string src = Source("tiny_gpt.nemo", dir);
  ASSERT_EQ(Sh("/usr/bin/python3 -c \"import numpy as np; np.save('" + dir.Join("big.npy") +
               "', np.ones((8192, 1024), np.float32))\"").exit_code, 0);
  int stored = 0;
  for (int round = 0; round < 6; ++round) {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    const std::string name = "kill" + std::to_string(round);
    Sh("(cd " + Q(m->path() + "/tensors") + " && /usr/bin/python3 -c \"import os, shutil; "
       "f = open('" + name + ".npy', 'wb'); shutil.copyfileobj(open('" + dir.Join("big.npy") +
       "', 'rb'), f); f.flush(); os.fsync(f.fileno())\" >/dev/null 2>&1 &); sleep " +
       std::to_string(0.02 + 0.03 * round));
    m->ExpectDeath(SIGKILL);
    auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
    EXPECT_EQ(v.exit_code, 0) << "round " << round << ": " << v.out << v.err;
    auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src) + " 'kill*'");
    EXPECT_EQ(ls.exit_code, 0) << ls.err;
    if (ls.out.find(name) != std::string::npos) ++stored;
  }
  // Every round either stored its tensor whole or not at all; the archive
  // is still one GNU tar reads.
  EXPECT_EQ(Sh("tar -tf " + Q(src) + " > /dev/null").exit_code, 0);
  RecordProperty("rounds_killed_after_the_commit_point", stored);
}

}  // namespace
}  // namespace nemofs::testing
