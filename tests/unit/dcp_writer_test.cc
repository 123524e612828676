// Structural edits of DCP / Megatron torch_dist folders (dist/dcp_writer.h),
// checked with PyTorch's own loader path (tests/tools/dcp_read.py: the real
// pickle module, torch.Size and dtypes, torch.load(weights_only=True) of
// every item), with ParseDcpMetadata and with the nemofs tree.
#include "dist/dcp_writer.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "nemofs/filesystem.h"
#include "test_util.h"
#include "torch/dtype.h"
#include "torch/pickle.h"
#include "util/fd.h"
#include "write/fault.h"

namespace nemofs::dist {
namespace {

using nemofs::testing::ReadFile;
using nemofs::testing::RealFixture;
using nemofs::testing::Sh;
using nemofs::testing::ShellQuote;
using nemofs::testing::TempDir;
using nemofs::testing::TestData;
using nemofs::testing::WriteFile;
using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr char kV23[] = "dist/torch_dist_v23";
constexpr char kEmb[] = "model.embedding.word_embeddings.weight";
constexpr char kOut[] = "model.output_layer.weight";
constexpr char kNorm[] = "model.decoder.final_layernorm.weight";
constexpr char kExtra[] = "model.output_layer._extra_state/shard_0_1";

void RequireTorch() {
  static const bool ok = Sh("/usr/bin/python3 -c 'import torch'").exit_code == 0;
  ASSERT_TRUE(ok) << "/usr/bin/python3 cannot import torch: these tests read the result with "
                     "PyTorch; install python3-torch (bash scripts/setup.sh)";
}

// A copy of tests/data/<rel> in a temp dir; `dir` is the checkpoint folder.
struct Copy {
  TempDir tmp;
  std::string dir;
  UniqueFd fd;
  explicit Copy(const std::string& rel) {
    dir = tmp.Join("ckpt");
    auto r = Sh("cp -a " + ShellQuote(TestData(rel)) + " " + ShellQuote(dir));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    fd = UniqueFd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    EXPECT_TRUE(fd.valid()) << dir;
  }
};

// dcp_read.py's view of `dir` (expect: key -> file holding its raw bytes).
json Read(const std::string& dir, const std::map<std::string, std::string>& expect = {}) {
  std::string cmd =
      "/usr/bin/python3 " + ShellQuote(TestData("../tools/dcp_read.py")) + " " + ShellQuote(dir);
  for (const auto& [k, f] : expect) cmd += " " + ShellQuote("--expect-raw=" + k + "=" + f);
  auto r = Sh(cmd);
  EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.out << r.err;
  if (r.exit_code != 0) return json::object();
  return json::parse(r.out);
}

// Little-endian bytes of floats.
std::string FloatBytes(size_t n, float start) {
  std::string out(n * 4, '\0');
  for (size_t i = 0; i < n; ++i) {
    float f = start + static_cast<float>(i) * 0.5f;
    std::memcpy(out.data() + i * 4, &f, 4);
  }
  return out;
}

torch::NewTensor Tensor(torch::DType dtype, std::vector<int64_t> shape, const std::string& bytes) {
  torch::NewTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.bytes = bytes;
  return t;
}

std::map<std::string, std::string> Shas(const json& j) {
  std::map<std::string, std::string> out;
  for (const auto& [k, v] : j["tensors"].items()) out[k] = v["sha256"];
  for (const auto& [k, v] : j["bytes"].items()) out["bytes:" + k] = v["sha256"];
  return out;
}

LoadedDcp Load(int fd, const std::string& dir) {
  auto l = LoadDcpMetadata(fd, dir);
  EXPECT_TRUE(l.ok()) << l.error().message();
  return l.ok() ? std::move(*l) : LoadedDcp{};
}

std::map<std::string, uint64_t> DistcpSizes(const std::string& dir) {
  std::map<std::string, uint64_t> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".distcp") out[e.path().filename()] = e.file_size();
  }
  return out;
}

const DcpTensor* FindTensor(const DcpMetadata& md, const std::string& key) {
  for (const auto& t : md.tensors) {
    if (t.key == key) return &t;
  }
  return nullptr;
}

class DcpWriter : public ::testing::Test {
 protected:
  void SetUp() override { RequireTorch(); }
};

// No edits: the re-emitted .metadata is the same bytes, for every flavour.
TEST_F(DcpWriter, NoOpCommitIsByteIdentical) {
  for (const char* rel : {"dist/torch_dist_v23", "dist/torch_dist_v22", "dist/mcore015_flattened",
                          "dist/nemo2/weights"}) {
    SCOPED_TRACE(rel);
    Copy c(rel);
    const std::string before = ReadFile(c.dir + "/.metadata");
    LoadedDcp l = Load(c.fd.get(), c.dir);
    auto r = CommitDcpEdits(c.fd.get(), c.dir, l, {});
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->distcp_file, "");
    EXPECT_EQ(r->bytes_written, before.size());
    EXPECT_EQ(ReadFile(c.dir + "/.metadata"), before);
    EXPECT_TRUE(ListDcpOrphans(c.fd.get(), Load(c.fd.get(), c.dir)).empty());
  }
}

// The real NVIDIA-written .metadata files (Megatron-LM, bionemo NeMo 2).
TEST_F(DcpWriter, NoOpCommitIsByteIdenticalOnRealMetadata) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  for (const char* rel :
       {"megatron-torch_dist-metadata-only/deepseek_mtp_dummy_ckpt/checkpoints/iter_0000001",
        "nemo2-dcp-metadata-only/esm2_model_checkpoint/weights"}) {
    SCOPED_TRACE(rel);
    TempDir tmp;
    const std::string before = ReadFile(RealFixture(std::string(rel) + "/.metadata"));
    WriteFile(tmp.Join(".metadata"), before);
    UniqueFd fd(::open(tmp.path().c_str(), O_RDONLY | O_DIRECTORY));
    LoadedDcp l = Load(fd.get(), tmp.path());
    auto r = CommitDcpEdits(fd.get(), tmp.path(), l, {});
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(ReadFile(tmp.Join(".metadata")), before);
    // A rename there keeps every other entry (and parses to the same table).
    LoadedDcp l2 = Load(fd.get(), tmp.path());
    ASSERT_FALSE(l2.md.tensors.empty());
    std::string key = l2.md.tensors[0].key;
    ASSERT_TRUE(CommitDcpEdits(fd.get(), tmp.path(), l2, {DcpEdit::Rename(key, key + ".x")}).ok());
    LoadedDcp l3 = Load(fd.get(), tmp.path());
    ASSERT_EQ(l3.md.tensors.size(), l2.md.tensors.size());
    EXPECT_EQ(l3.md.tensors[0].key, key + ".x");
    EXPECT_EQ(l3.md.tensors[0].chunks.size(), l2.md.tensors[0].chunks.size());
    for (size_t i = 0; i < l3.md.tensors[0].chunks.size(); ++i) {
      ASSERT_TRUE(l3.md.tensors[0].chunks[i].storage.has_value());
      EXPECT_EQ(l3.md.tensors[0].chunks[i].storage->offset,
                l2.md.tensors[0].chunks[i].storage->offset);
    }
    EXPECT_EQ(l3.md.bytes.size(), l2.md.bytes.size());
  }
}

// Add (from memory and from a descriptor), delete, rename, reshape in one
// commit; PyTorch reads the result; only new bytes were written.
TEST_F(DcpWriter, AddDeleteRenameReshape) {
  Copy c(kV23);
  const json before = Read(c.dir);
  ASSERT_TRUE(before["errors"].empty());
  const auto sizes_before = DistcpSizes(c.dir);
  LoadedDcp l = Load(c.fd.get(), c.dir);

  const std::string head = FloatBytes(10 * 6, 1.0f);
  WriteFile(c.tmp.Join("head.bin"), head);
  // bf16 [130, 32] for the embedding (2 more rows), from a file descriptor.
  std::string emb(130 * 32 * 2, '\0');
  for (size_t i = 0; i < emb.size(); ++i) emb[i] = static_cast<char>((i * 7 + 3) & 0x7f);
  WriteFile(c.tmp.Join("emb.bin"), "PAD" + emb);
  WriteFile(c.tmp.Join("emb_raw.bin"), emb);
  UniqueFd emb_fd(::open(c.tmp.Join("emb.bin").c_str(), O_RDONLY));
  torch::NewTensor emb_t;
  emb_t.dtype = torch::DType::kBFloat16;
  emb_t.shape = {130, 32};
  emb_t.fd = emb_fd.get();
  emb_t.offset = 3;
  emb_t.length = emb.size();
  const std::string scalar = FloatBytes(1, 42.0f);
  WriteFile(c.tmp.Join("scalar.bin"), scalar);

  auto r = CommitDcpEdits(
      c.fd.get(), c.dir, l,
      {DcpEdit::SetTensor("model.new.head", Tensor(torch::DType::kFloat32, {10, 6}, head)),
       DcpEdit::Remove(kOut), DcpEdit::Remove(kExtra),
       DcpEdit::Rename(kNorm, "model.decoder.final_norm.weight"), DcpEdit::SetTensor(kEmb, emb_t),
       DcpEdit::SetTensor("model.new.scalar", Tensor(torch::DType::kFloat32, {}, scalar))});
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->distcp_file, "__nemofs_0_0.distcp");
  const auto sizes_after = DistcpSizes(c.dir);
  // The old files are untouched; one new file holds exactly the three new items.
  for (const auto& [f, s] : sizes_before) EXPECT_EQ(sizes_after.at(f), s) << f;
  ASSERT_EQ(sizes_after.size(), sizes_before.size() + 1);
  const uint64_t new_size = sizes_after.at(r->distcp_file);
  EXPECT_EQ(r->bytes_written, new_size + fs::file_size(c.dir + "/.metadata"));
  EXPECT_LT(new_size, head.size() + emb.size() + scalar.size() + 3 * 2048);  // zip overhead

  const json after = Read(c.dir, {{"model.new.head", c.tmp.Join("head.bin")},
                                  {kEmb, c.tmp.Join("emb_raw.bin")},
                                  {"model.new.scalar", c.tmp.Join("scalar.bin")}});
  EXPECT_TRUE(after["errors"].empty()) << after["errors"].dump();
  // Same classes as before (no new module paths).
  EXPECT_EQ(after["classes"], before["classes"]);
  const json& t = after["tensors"];
  ASSERT_TRUE(t.contains("model.new.head"));
  EXPECT_EQ(t["model.new.head"]["dtype"], "float32");
  EXPECT_EQ(t["model.new.head"]["shape"], json::parse("[10, 6]"));
  EXPECT_EQ(t["model.new.head"]["raw_match"], true);
  EXPECT_EQ(t[kEmb]["dtype"], "bfloat16");
  EXPECT_EQ(t[kEmb]["shape"], json::parse("[130, 32]"));
  EXPECT_EQ(t[kEmb]["chunks"], 1);
  EXPECT_EQ(t[kEmb]["raw_match"], true);
  EXPECT_EQ(t["model.new.scalar"]["shape"], json::array());
  EXPECT_EQ(t["model.new.scalar"]["raw_match"], true);
  EXPECT_FALSE(t.contains(kOut));
  EXPECT_FALSE(t.contains(kNorm));
  EXPECT_FALSE(after["bytes"].contains(kExtra));
  EXPECT_EQ(t["model.decoder.final_norm.weight"]["sha256"], before["tensors"][kNorm]["sha256"]);
  // Every other tensor and byte item is what it was.
  auto b = Shas(before), a = Shas(after);
  for (const std::string& gone :
       {std::string(kOut), std::string(kNorm), std::string(kEmb), "bytes:" + std::string(kExtra)}) {
    b.erase(gone);
  }
  for (const std::string& added :
       {std::string("model.new.head"), std::string("model.new.scalar"),
        std::string("model.decoder.final_norm.weight"), std::string(kEmb)}) {
    a.erase(added);
  }
  EXPECT_EQ(a, b);
  EXPECT_EQ(a.size(), 6u);

  // ParseDcpMetadata of the new file: the expected table.
  LoadedDcp n = Load(c.fd.get(), c.dir);
  const DcpTensor* head_t = FindTensor(n.md, "model.new.head");
  ASSERT_NE(head_t, nullptr);
  ASSERT_TRUE(head_t->dtype.has_value());
  EXPECT_EQ(*head_t->dtype, torch::DType::kFloat32);
  EXPECT_EQ(head_t->shape, (std::vector<int64_t>{10, 6}));
  ASSERT_EQ(head_t->chunks.size(), 1u);
  EXPECT_EQ(head_t->chunks[0].offsets, (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(head_t->chunks[0].sizes, (std::vector<int64_t>{10, 6}));
  ASSERT_TRUE(head_t->chunks[0].storage.has_value());
  EXPECT_EQ(head_t->chunks[0].storage->relative_path, "__nemofs_0_0.distcp");
  EXPECT_EQ(head_t->chunks[0].storage->offset, 0u);
  const DcpTensor* emb_md = FindTensor(n.md, kEmb);
  ASSERT_NE(emb_md, nullptr);
  ASSERT_TRUE(emb_md->chunks[0].storage.has_value());
  EXPECT_EQ(emb_md->chunks[0].storage->offset, head_t->chunks[0].storage->length);
  const DcpTensor* sc = FindTensor(n.md, "model.new.scalar");
  ASSERT_NE(sc, nullptr);
  EXPECT_EQ(sc->chunks[0].storage->offset + sc->chunks[0].storage->length, new_size);
  EXPECT_EQ(n.md.tensors.size(), 9u);  // 8 - 2 + 2 ... minus output_layer, plus head/scalar
  EXPECT_EQ(n.md.bytes.size(), 1u);
  // The emitted graph keeps the old module paths, nothing else.
  std::set<std::pair<std::string, std::string>> g_before(l.pickle.globals.begin(),
                                                         l.pickle.globals.end()),
      g_after(n.pickle.globals.begin(), n.pickle.globals.end());
  EXPECT_EQ(g_after, g_before);

  // The nemofs tree shows the result.
  TempDir cache;
  auto tree = Filesystem::Open({c.dir, cache.path()});
  ASSERT_TRUE(tree.ok()) << tree.error().message();
  std::map<std::string, std::string> listed;
  for (const auto& lt : (*tree)->ListTensors()) listed[lt.key] = lt.dtype;
  EXPECT_EQ(listed.count("model.new.head"), 1u);
  EXPECT_EQ(listed.count(kOut), 0u);
  EXPECT_EQ(listed.count("model.decoder.final_norm.weight"), 1u);
}

// The new item is torch.save's own output for that tensor (data.pkl
// byte-identical to what the installed torch writes).
TEST_F(DcpWriter, ItemIsTorchSaveOfTheTensor) {
  Copy c(kV23);
  LoadedDcp l = Load(c.fd.get(), c.dir);
  const std::string bytes = FloatBytes(12, -3.0f);
  auto r = CommitDcpEdits(c.fd.get(), c.dir, l,
                          {DcpEdit::SetTensor("x", Tensor(torch::DType::kFloat32, {3, 4}, bytes))});
  ASSERT_TRUE(r.ok()) << r.error().message();
  WriteFile(c.tmp.Join("check.py"), R"(import io, sys, torch, zipfile
item = open(sys.argv[1], 'rb').read()
ours = zipfile.ZipFile(io.BytesIO(item))
buf = io.BytesIO()
torch.save(torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 3.0, buf)
theirs = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
pre = theirs.namelist()[0].split('/')[0]
assert ours.read('archive/data.pkl') == theirs.read(pre + '/data.pkl'), 'data.pkl differs'
assert ours.read('archive/data/0') == theirs.read(pre + '/data/0'), 'data differs'
t = torch.load(io.BytesIO(item), weights_only=True)
assert torch.equal(t, torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 3.0)
print('ok', sorted(ours.namelist()))
)");
  auto py = Sh("/usr/bin/python3 " + ShellQuote(c.tmp.Join("check.py")) + " " +
               ShellQuote(c.dir + "/" + r->distcp_file));
  EXPECT_EQ(py.exit_code, 0) << py.out << py.err;
  EXPECT_NE(py.out.find("ok"), std::string::npos) << py.out;
}

// Old module paths (torch 2.2) and Megatron's MCoreMetadata root with
// mcore_data: a new tensor and a rename load, the flattened tensor is
// untouched and cannot be edited.
TEST_F(DcpWriter, OtherFlavours) {
  {
    Copy c("dist/torch_dist_v22");
    const json before = Read(c.dir);
    LoadedDcp l = Load(c.fd.get(), c.dir);
    const std::string bytes(5 * 2, '\x11');
    WriteFile(c.tmp.Join("b.bin"), bytes);
    auto r =
        CommitDcpEdits(c.fd.get(), c.dir, l,
                       {DcpEdit::SetTensor("k.bf16", Tensor(torch::DType::kBFloat16, {5}, bytes))});
    ASSERT_TRUE(r.ok()) << r.error().message();
    const json after = Read(c.dir, {{"k.bf16", c.tmp.Join("b.bin")}});
    EXPECT_TRUE(after["errors"].empty()) << after["errors"].dump();
    EXPECT_EQ(after["classes"], before["classes"]);  // _shard TensorProperties kept
    EXPECT_EQ(after["tensors"]["k.bf16"]["raw_match"], true);
  }
  {
    Copy c("dist/mcore015_flattened");
    LoadedDcp l = Load(c.fd.get(), c.dir);
    const std::string flat = "optimizer.state.exp_avg.model.decoder.layers.mlp.linear_fc1.weight";
    const std::string before_md = ReadFile(c.dir + "/.metadata");
    for (const auto& e : {DcpEdit::Remove(flat), DcpEdit::Rename(flat, "y"),
                          DcpEdit::SetTensor(flat, Tensor(torch::DType::kFloat32, {1}, "abcd"))}) {
      auto r = CommitDcpEdits(c.fd.get(), c.dir, l, {e});
      ASSERT_FALSE(r.ok());
      EXPECT_EQ(r.error().code(), EINVAL);
      EXPECT_NE(r.error().message().find("flattened"), std::string::npos) << r.error().message();
      EXPECT_NE(r.error().message().find(flat), std::string::npos) << r.error().message();
    }
    EXPECT_EQ(ReadFile(c.dir + "/.metadata"), before_md);
    EXPECT_EQ(DistcpSizes(c.dir).size(), 8u);

    const json before = Read(c.dir);
    const std::string bytes = FloatBytes(4, 2.0f);
    WriteFile(c.tmp.Join("n.bin"), bytes);
    auto r = CommitDcpEdits(
        c.fd.get(), c.dir, l,
        {DcpEdit::Rename("model.decoder.layers.mlp.linear_fc1.weight", "model.fc1.renamed"),
         DcpEdit::SetTensor("model.n", Tensor(torch::DType::kFloat32, {2, 2}, bytes))});
    ASSERT_TRUE(r.ok()) << r.error().message();
    const json after = Read(c.dir, {{"model.n", c.tmp.Join("n.bin")}});
    EXPECT_TRUE(after["errors"].empty()) << after["errors"].dump();
    EXPECT_EQ(after["tensors"]["model.n"]["raw_match"], true);
    EXPECT_EQ(after["tensors"]["model.fc1.renamed"]["sha256"],
              before["tensors"]["model.decoder.layers.mlp.linear_fc1.weight"]["sha256"]);
    EXPECT_EQ(after["tensors"][flat]["sha256"], before["tensors"][flat]["sha256"]);
    // mcore_data follows the keys; the flattened entry is as it was.
    LoadedDcp n = Load(c.fd.get(), c.dir);
    const DcpTensor* ft = FindTensor(n.md, flat);
    ASSERT_NE(ft, nullptr);
    EXPECT_EQ(ft->original_shape, (std::vector<int64_t>{2, 64, 32}));
    const torch::Value* mcore = n.pickle.root->state->Get("mcore_data");
    ASSERT_NE(mcore, nullptr);
    EXPECT_NE(mcore->Get("model.fc1.renamed"), nullptr);
    EXPECT_NE(mcore->Get("model.n"), nullptr);
    EXPECT_EQ(mcore->Get("model.decoder.layers.mlp.linear_fc1.weight"), nullptr);
  }
}

// Refusals: nothing is written, .metadata unchanged.
TEST_F(DcpWriter, Refusals) {
  Copy c(kV23);
  const std::string before = ReadFile(c.dir + "/.metadata");
  LoadedDcp l = Load(c.fd.get(), c.dir);
  struct Case {
    DcpEdit edit;
    std::string needle;
  };
  std::vector<Case> cases;
  cases.push_back({DcpEdit::SetTensor("model.bad", Tensor(torch::DType::kFloat32, {3}, "12345678")),
                   "model.bad"});
  cases.push_back({DcpEdit::Remove("model.nope"), "model.nope"});
  cases.push_back({DcpEdit::Rename("model.nope", "model.x"), "model.nope"});
  cases.push_back({DcpEdit::Rename(kNorm, kOut), "exists"});
  for (const auto& cs : cases) {
    // A valid edit first: the refusal must undo nothing (nothing was written).
    auto r = CommitDcpEdits(
        c.fd.get(), c.dir, l,
        {DcpEdit::SetTensor("ok", Tensor(torch::DType::kFloat32, {1}, "abcd")), cs.edit});
    ASSERT_FALSE(r.ok()) << cs.needle;
    EXPECT_EQ(r.error().code(), EINVAL);
    EXPECT_NE(r.error().message().find(cs.needle), std::string::npos) << r.error().message();
  }
  EXPECT_EQ(ReadFile(c.dir + "/.metadata"), before);
  EXPECT_EQ(DistcpSizes(c.dir).size(), 4u);
  // A stale load is refused.
  ASSERT_TRUE(CommitDcpEdits(c.fd.get(), c.dir, l, {DcpEdit::Remove(kOut)}).ok());
  auto stale = CommitDcpEdits(c.fd.get(), c.dir, l, {DcpEdit::Remove(kNorm)});
  ASSERT_FALSE(stale.ok());
  EXPECT_EQ(stale.error().code(), ESTALE);
}

// A crash at each fault point leaves a folder that loads the old or the new
// state (never a broken one); the orphans are listed and repack removes them.
TEST_F(DcpWriter, FaultInjection) {
  const struct {
    const char* point;
    bool committed;
    bool distcp_orphan;
    bool temp_orphan;
  } points[] = {{"dcp:distcp-written", false, true, false},
                {"dcp:metadata-written", false, true, true},
                {"dcp:metadata-renamed", true, false, false}};
  for (const auto& p : points) {
    SCOPED_TRACE(p.point);
    Copy c(kV23);
    const json before = Read(c.dir);
    const std::string bytes = FloatBytes(8, 0.25f);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::setenv("NEMOFS_FAULT", p.point, 1);
      auto l = LoadDcpMetadata(c.fd.get(), c.dir);
      if (!l.ok()) ::_exit(1);
      auto r =
          CommitDcpEdits(c.fd.get(), c.dir, *l,
                         {DcpEdit::SetTensor("model.f", Tensor(torch::DType::kFloat32, {8}, bytes)),
                          DcpEdit::Remove(kOut)});
      ::_exit(r.ok() ? 0 : 1);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), write::kFaultExitCode);

    const json after = Read(c.dir);
    EXPECT_TRUE(after["errors"].empty()) << after["errors"].dump();
    if (p.committed) {
      EXPECT_TRUE(after["tensors"].contains("model.f"));
      EXPECT_FALSE(after["tensors"].contains(kOut));
    } else {
      EXPECT_EQ(Shas(after), Shas(before));
    }
    LoadedDcp l = Load(c.fd.get(), c.dir);
    std::vector<std::string> want;
    if (p.distcp_orphan) want.push_back("__nemofs_0_0.distcp");
    if (p.temp_orphan) want.insert(want.begin(), "..metadata.nemofs-tmp." + std::to_string(pid));
    EXPECT_EQ(ListDcpOrphans(c.fd.get(), l), want);
    // The next commit does not reuse an orphan's name; repack removes orphans.
    auto r =
        CommitDcpEdits(c.fd.get(), c.dir, l,
                       {DcpEdit::SetTensor("model.g", Tensor(torch::DType::kFloat32, {8}, bytes))});
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->distcp_file, "__nemofs_1_0.distcp");       // 0 is taken (orphan or live)
    auto freed = RepackDcp(c.fd.get(), c.dir, UINT64_MAX);  // orphans only
    ASSERT_TRUE(freed.ok()) << freed.error().message();
    EXPECT_TRUE(ListDcpOrphans(c.fd.get(), Load(c.fd.get(), c.dir)).empty());
    EXPECT_EQ(fs::exists(c.dir + "/__nemofs_0_0.distcp"), p.committed);
    const json final_state = Read(c.dir);
    EXPECT_TRUE(final_state["errors"].empty()) << final_state["errors"].dump();
    EXPECT_TRUE(final_state["tensors"].contains("model.g"));
  }
}

// Repack copies the live items of files with dead bytes into a fresh file,
// commits, unlinks the old ones; PyTorch reads the same tensors.
TEST_F(DcpWriter, RepackReclaimsDeadItems) {
  Copy c(kV23);
  LoadedDcp l = Load(c.fd.get(), c.dir);
  // Supersede the embedding (both its chunks), drop a tensor, add and then
  // replace a new one (its first item is dead in the nemofs file).
  const std::string e1(128 * 32 * 2, '\x01');
  ASSERT_TRUE(
      CommitDcpEdits(
          c.fd.get(), c.dir, l,
          {DcpEdit::SetTensor(kEmb, Tensor(torch::DType::kBFloat16, {128, 32}, e1)),
           DcpEdit::Remove(kOut),
           DcpEdit::SetTensor("model.t", Tensor(torch::DType::kFloat32, {4}, FloatBytes(4, 1)))})
          .ok());
  l = Load(c.fd.get(), c.dir);
  ASSERT_TRUE(CommitDcpEdits(c.fd.get(), c.dir, l,
                             {DcpEdit::SetTensor(
                                 "model.t", Tensor(torch::DType::kFloat32, {2}, FloatBytes(2, 9)))})
                  .ok());
  const json before = Read(c.dir);
  ASSERT_TRUE(before["errors"].empty()) << before["errors"].dump();
  uint64_t total_before = 0;
  for (const auto& [f, s] : DistcpSizes(c.dir)) total_before += s;

  // A threshold above every file's dead bytes: nothing to do.
  auto none = RepackDcp(c.fd.get(), c.dir, 1ull << 40);
  ASSERT_TRUE(none.ok()) << none.error().message();
  EXPECT_EQ(*none, 0u);

  auto freed = RepackDcp(c.fd.get(), c.dir, 1);
  ASSERT_TRUE(freed.ok()) << freed.error().message();
  EXPECT_GT(*freed, 0u);
  uint64_t total_after = 0;
  for (const auto& [f, s] : DistcpSizes(c.dir)) total_after += s;
  EXPECT_EQ(total_before - total_after, *freed);
  // Every file left is exactly covered by live items.
  LoadedDcp n = Load(c.fd.get(), c.dir);
  std::map<std::string, uint64_t> live;
  for (const auto& t : n.md.tensors) {
    for (const auto& ch : t.chunks) live[ch.storage->relative_path] += ch.storage->length;
  }
  for (const auto& b : n.md.bytes) live[b.storage->relative_path] += b.storage->length;
  EXPECT_EQ(live, DistcpSizes(c.dir));
  EXPECT_TRUE(ListDcpOrphans(c.fd.get(), n).empty());

  const json after = Read(c.dir);
  EXPECT_TRUE(after["errors"].empty()) << after["errors"].dump();
  EXPECT_EQ(Shas(after), Shas(before));
  // Nothing dead is left: a second repack frees nothing.
  auto again = RepackDcp(c.fd.get(), c.dir, 0);
  ASSERT_TRUE(again.ok()) << again.error().message();
  EXPECT_EQ(*again, 0u);
}

}  // namespace
}  // namespace nemofs::dist
