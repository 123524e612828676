// Structural re-emission of torch.save files: edits (add, delete, rename,
// replace with another shape/dtype) on every fixture kind, checked by
// torch.load of the output against the original loaded by torch with the
// same edits applied in Python; unchanged re-emission is byte-identical;
// random edits never crash and always give files torch loads.
#include "torch/torch_repack.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <deque>
#include <random>

#include "test_util.h"
#include "util/fd.h"
#include "util/io.h"

namespace nemofs::torch {
namespace {

using testing::ReadFile;
using testing::RealFixture;
using testing::RealFixturesPresent;
using testing::Sh;
using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;
using testing::WriteFile;

// Applies edits (JSON) to torch.load(original) and compares with
// torch.load(output): weights_only=True whenever the original loads so.
constexpr char kCheck[] = R"PY(
import io, json, sys, torch
orig_path, out_path, edits_path = sys.argv[1:4]
edits = json.load(open(edits_path))
def loads_safely(p):
    try:
        torch.load(p, weights_only=True, map_location='cpu')
        return True
    except Exception:
        return False
wo = loads_safely(orig_path)
out_wo = loads_safely(out_path)
want = torch.load(orig_path, weights_only=wo, map_location='cpu')
got = torch.load(out_path, weights_only=wo, map_location='cpu')
def walk(o, path):
    for k in path:
        o = o[k]
    return o
for e in edits:
    d = walk(want, e['path'])
    if e['op'] == 'remove':
        del d[e['key']]
    elif e['op'] == 'rename':
        items = [(e['new'] if k == e['key'] else k, v) for k, v in d.items()]
        d.clear(); d.update(items)
    else:
        data = bytearray(open(e['file'], 'rb').read())
        dt = getattr(torch, e['dtype'])
        t = torch.frombuffer(data, dtype=dt) if data else torch.empty(0, dtype=dt)
        d[e['key']] = t.reshape(e['shape']).clone()
def diff(a, b, p):
    if type(a) is not type(b):
        return '%s: type %s vs %s' % (p, type(a), type(b))
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride() or \
           a.storage_offset() != b.storage_offset() or a.requires_grad != b.requires_grad:
            return '%s: %s%s%s vs %s%s%s' % (p, a.dtype, list(a.shape), a.stride(), b.dtype, list(b.shape), b.stride())
        if not torch.equal(a, b):
            return '%s: values differ' % p
        return None
    if isinstance(a, dict):
        if list(a.keys()) != list(b.keys()):
            return '%s: keys %s vs %s' % (p, list(a.keys())[:8], list(b.keys())[:8])
        if getattr(a, '__dict__', {}).keys() != getattr(b, '__dict__', {}).keys():
            return '%s: attributes differ' % p
        for k in a:
            r = diff(a[k], b[k], p + '.' + str(k))
            if r: return r
        for k in getattr(a, '__dict__', {}):
            r = diff(a.__dict__[k], b.__dict__[k], p + '@' + k)
            if r: return r
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return '%s: length %d vs %d' % (p, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            r = diff(x, y, p + '.' + str(i))
            if r: return r
        return None
    if isinstance(a, io.BytesIO):
        return None if a.getvalue() == b.getvalue() else p + ': BytesIO differs'
    if isinstance(a, (int, float, str, bytes, bool, type(None))):
        return None if (a == b or (a != a and b != b)) else '%s: %r vs %r' % (p, a, b)
    return None if repr(a) == repr(b) else '%s: %r vs %r' % (p, a, b)
r = diff(want, got, '')
if r is None and wo and not out_wo:
    r = 'the original loads with weights_only=True, the output does not'
print('same weights_only=%s' % wo if r is None else 'DIFF ' + r)
)PY";

// Extracts a tar member (gzip or plain) with Python's tarfile.
std::string Member(const TempDir& dir, const std::string& tar, const std::string& member) {
  std::string out = dir.Join("member.pt");
  auto r = Sh("/usr/bin/python3 -c " +
              ShellQuote("import sys, tarfile\n"
                         "t = tarfile.open(sys.argv[1])\n"
                         "open(sys.argv[3], 'wb').write(t.extractfile(sys.argv[2]).read())") +
              " " + ShellQuote(tar) + " " + ShellQuote(member) + " " + ShellQuote(out));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return out;
}

struct Case {
  std::string label;
  std::string file;    // under tests/data or real-fixtures
  std::string member;  // tar member, or ""
  std::vector<std::string> dict_path;
  bool real = false;
};

std::vector<Case> Cases() {
  return {
      {"zip_pt", "torch/dtypes.pt", "", {}},
      {"legacy_pt", "torch/dtypes_legacy.pt", "", {}},
      {"protocol4_pt", "torch/dtypes_p4.pt", "", {}},
      {"lightning_ckpt", "torch/lightning.ckpt", "", {"state_dict"}},
      {"nemo_model_weights", "tiny_gpt.nemo", "./model_weights.ckpt", {}},
      {"per_rank", "torch/tiny_gpt_tp2pp2.nemo", "./tp_rank_01_pp_rank_001/model_weights.ckpt", {}},
      {"megatron_lm",
       "torch/megatron_lm_tp2/iter_0000010/mp_rank_01/model_optim_rng.pt",
       "",
       {"model"}},
      {"real_legacy", "legacy-torch-save/JasperDecoderForCTC-STEP-243800.pt", "", {}, true},
      {"real_nemo_gz", "nemo-tar/vad_marblenet.nemo", "./model_weights.ckpt", {}, true},
  };
}

struct Loaded {
  std::string path;
  UniqueFd fd;
  uint64_t size = 0;
  std::unique_ptr<FdReader> reader;
  TorchFile file;
  const Value* dict = nullptr;
};

void Load(const TempDir& dir, const Case& c, Loaded* l) {
  std::string src = c.real ? RealFixture(c.file) : TestData(c.file);
  l->path = c.member.empty() ? src : Member(dir, src, c.member);
  auto fd = OpenReadOnly(l->path);
  ASSERT_TRUE(fd.ok());
  l->fd = std::move(*fd);
  l->size = ReadFile(l->path).size();
  l->reader = std::make_unique<FdReader>(l->fd.get(), 0, l->size);
  auto f = LoadTorchFile(*l->reader, l->path);
  ASSERT_TRUE(f.ok()) << f.error().message();
  l->file = std::move(*f);
  l->dict = l->file.pickle.root;
  for (const auto& k : c.dict_path) l->dict = l->dict ? l->dict->Get(k) : nullptr;
  ASSERT_NE(l->dict, nullptr);
}

std::string PathJson(const std::vector<std::string>& path) {
  std::string s = "[";
  for (size_t i = 0; i < path.size(); ++i) s += (i ? ", \"" : "\"") + path[i] + "\"";
  return s + "]";
}

// Entries of `dict` holding a tensor no other tensor shares storage with.
std::vector<std::pair<const Value*, const Value*>> LoneTensors(const TorchFile& f,
                                                               const Value* dict) {
  std::map<std::string, int> uses;
  for (const auto& [v, t] : f.tensors) ++uses[t.storage_key];
  std::vector<std::pair<const Value*, const Value*>> out;
  for (const auto& kv : dict->entries) {
    auto it = f.tensors.find(kv.second);
    if (it != f.tensors.end() && uses[it->second.storage_key] == 1 && kv.first->Is(Kind::kString)) {
      out.push_back(kv);
    }
  }
  return out;
}

std::string Pattern(size_t n, int seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i)
    s[i] = static_cast<char>((i * 37 + static_cast<size_t>(seed) * 11 + 3) & 0x7f);
  return s;
}

class TorchRepackCase : public ::testing::TestWithParam<Case> {};

TEST_P(TorchRepackCase, EditsLoadInTorchAsExpected) {
  const Case& c = GetParam();
  if (c.real && !RealFixturesPresent()) GTEST_SKIP() << "../shared/real-fixtures is absent";
  TempDir dir;
  Loaded l;
  ASSERT_NO_FATAL_FAILURE(Load(dir, c, &l));
  auto lone = LoneTensors(l.file, l.dict);
  ASSERT_GE(lone.size(), 2u);
  // With only two, the renamed one is then replaced (found by its new name).
  std::string replaced = lone.size() >= 3 ? lone[2].first->str : lone[1].first->str + ".renamed";
  std::string path = PathJson(c.dict_path);

  std::vector<TorchEdit> edits;
  std::string json = "[";
  edits.push_back(TorchEdit::Remove(l.dict, lone[0].first));
  json += fmt::format("{{\"op\": \"remove\", \"path\": {}, \"key\": \"{}\"}}", path,
                      lone[0].first->str);
  edits.push_back(TorchEdit::Rename(l.dict, lone[1].first, lone[1].first->str + ".renamed"));
  json += fmt::format(
      ", {{\"op\": \"rename\", \"path\": {}, \"key\": \"{}\", \"new\": \"{}.renamed\"}}", path,
      lone[1].first->str, lone[1].first->str);
  // Replaced by bfloat16 [3, 2] from memory; two new ones: float32 [2, 3]
  // from a descriptor (CRC computed), int64 [4] from memory; an empty one.
  std::string bf16 = Pattern(12, 1), f32 = Pattern(24, 2), i64 = Pattern(32, 3);
  WriteFile(dir.Join("bf16"), bf16);
  WriteFile(dir.Join("f32"), f32);
  WriteFile(dir.Join("i64"), i64);
  WriteFile(dir.Join("empty"), "");
  auto f32_fd = OpenReadOnly(dir.Join("f32"));
  ASSERT_TRUE(f32_fd.ok());
  NewTensor t1{DType::kBFloat16, {3, 2}, -1, 0, 0, bf16, std::nullopt};
  edits.push_back(TorchEdit::SetTensor(l.dict, replaced, t1));
  json += fmt::format(
      ", {{\"op\": \"set\", \"path\": {}, \"key\": \"{}\", \"dtype\": \"bfloat16\", "
      "\"shape\": [3, 2], \"file\": \"{}\"}}",
      path, replaced, dir.Join("bf16"));
  NewTensor t2{DType::kFloat32, {2, 3}, f32_fd->get(), 0, 24, {}, std::nullopt};
  edits.push_back(TorchEdit::SetTensor(l.dict, "nemofs.added", t2));
  json += fmt::format(
      ", {{\"op\": \"set\", \"path\": {}, \"key\": \"nemofs.added\", \"dtype\": \"float32\", "
      "\"shape\": [2, 3], \"file\": \"{}\"}}",
      path, dir.Join("f32"));
  NewTensor t3{DType::kInt64, {4}, -1, 0, 0, i64, std::nullopt};
  edits.push_back(TorchEdit::SetTensor(l.dict, "nemofs.added_i64", t3));
  json += fmt::format(
      ", {{\"op\": \"set\", \"path\": {}, \"key\": \"nemofs.added_i64\", \"dtype\": \"int64\", "
      "\"shape\": [4], \"file\": \"{}\"}}",
      path, dir.Join("i64"));
  NewTensor t4{DType::kFloat16, {0, 5}, -1, 0, 0, {}, std::nullopt};
  edits.push_back(TorchEdit::SetTensor(l.dict, "nemofs.empty", t4));
  json += fmt::format(
      ", {{\"op\": \"set\", \"path\": {}, \"key\": \"nemofs.empty\", \"dtype\": \"float16\", "
      "\"shape\": [0, 5], \"file\": \"{}\"}}]",
      path, dir.Join("empty"));
  WriteFile(dir.Join("edits.json"), json);

  // The output at an offset of a file, as a tar append would place it.
  std::string out = dir.Join("out.bin");
  UniqueFd ofd(::open(out.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  ASSERT_TRUE(ofd.valid());
  const uint64_t at = 512;
  ASSERT_TRUE(PwriteFull(ofd.get(), std::string(at, 'H'), 0, "out").ok());
  TorchSource src{*l.reader, l.fd.get(), 0};
  auto r = RepackTorchFile(l.file, src, edits, ofd.get(), at, l.path);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(l.file.format == "legacy",
            !r->notes.empty() && r->notes[0].find("legacy") != std::string::npos);
  ASSERT_EQ(r->new_keys.size(), 4u);
  std::string all = ReadFile(out);
  ASSERT_EQ(all.size(), at + r->bytes);
  std::string zip_bytes = all.substr(at);
  EXPECT_EQ(zip_bytes.substr(r->storage_data.at(r->new_keys[0]), 12), bf16);
  EXPECT_EQ(zip_bytes.substr(r->storage_data.at(r->new_keys[1]), 24), f32);
  WriteFile(dir.Join("out.pt"), zip_bytes);

  // Re-parsed by nemofs: every tensor's storage where the result says.
  auto again = LoadTorchFile(ofd.get(), at, r->bytes, out);
  ASSERT_TRUE(again.ok()) << again.error().message();
  EXPECT_TRUE(again->bad_tensors.empty());
  for (const auto& [v, t] : again->tensors) {
    EXPECT_EQ(t.storage_start, r->storage_data.at(t.storage_key)) << t.storage_key;
  }
  // Byte-identical storages for everything kept.
  for (const auto& [v, t] : l.file.tensors) {
    if (l.file.format == "legacy") break;
    auto it = r->storage_data.find(t.storage_key);
    if (it == r->storage_data.end()) continue;
    std::string orig = ReadFile(l.path);
    EXPECT_EQ(zip_bytes.substr(it->second, t.storage_bytes),
              orig.substr(t.storage_start, t.storage_bytes));
  }

  WriteFile(dir.Join("check.py"), kCheck);
  auto py = Sh("/usr/bin/python3 -W ignore " + ShellQuote(dir.Join("check.py")) + " " +
               ShellQuote(l.path) + " " + ShellQuote(dir.Join("out.pt")) + " " +
               ShellQuote(dir.Join("edits.json")));
  ASSERT_EQ(py.exit_code, 0) << py.err;
  EXPECT_EQ(py.out.rfind("same", 0), 0u) << py.out;
  // weights_only=True is used where the original loads so (torch 1.13's
  // restricted unpickler refuses BINFLOAT and any non-allow-listed global,
  // so of these only the .nemo weights and the real files qualify).
  GTEST_LOG_(INFO) << c.label << ": " << py.out;
}

TEST_P(TorchRepackCase, UnchangedReEmission) {
  const Case& c = GetParam();
  if (c.real && !RealFixturesPresent()) GTEST_SKIP() << "../shared/real-fixtures is absent";
  TempDir dir;
  Loaded l;
  ASSERT_NO_FATAL_FAILURE(Load(dir, c, &l));
  std::string out = dir.Join("out.pt");
  UniqueFd ofd(::open(out.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  TorchSource src{*l.reader};  // through the reader this time
  auto r = RepackTorchFile(l.file, src, {}, ofd.get(), 0, l.path);
  ASSERT_TRUE(r.ok()) << r.error().message();
  if (l.file.format == "zip") {
    EXPECT_EQ(ReadFile(out), ReadFile(l.path));
    EXPECT_TRUE(r->notes.empty());
  } else {
    std::string edits = dir.Join("none.json");
    WriteFile(edits, "[]");
    WriteFile(dir.Join("check.py"), kCheck);
    auto py = Sh("/usr/bin/python3 -W ignore " + ShellQuote(dir.Join("check.py")) + " " +
                 ShellQuote(l.path) + " " + ShellQuote(out) + " " + ShellQuote(edits));
    ASSERT_EQ(py.exit_code, 0) << py.err;
    EXPECT_EQ(py.out.rfind("same", 0), 0u) << py.out;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TorchRepackCase, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.label; });

const Value* Key(const Value* dict, const std::string& k) {
  for (const auto& kv : dict->entries) {
    if (kv.first->Is(Kind::kString) && kv.first->str == k) return kv.first;
  }
  return nullptr;
}

TEST(TorchRepack, RefusesWhatCannotBeRepresented) {
  TempDir dir;
  Loaded l;
  ASSERT_NO_FATAL_FAILURE(Load(dir, {"zip_pt", "torch/dtypes.pt", "", {}}, &l));
  UniqueFd ofd(::open(dir.Join("o").c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  TorchSource src{*l.reader, l.fd.get(), 0};
  const Value* root = l.dict;
  std::string two(4, 'x');
  NewTensor t{DType::kFloat16, {2}, -1, 0, 0, two, std::nullopt};
  auto expect_einval = [&](std::vector<TorchEdit> edits, const std::string& words) {
    auto r = RepackTorchFile(l.file, src, edits, ofd.get(), 0, "dtypes.pt");
    ASSERT_FALSE(r.ok()) << words;
    EXPECT_EQ(r.error().code(), EINVAL);
    EXPECT_NE(r.error().message().find("dtypes.pt"), std::string::npos) << r.error().message();
    EXPECT_NE(r.error().message().find(words), std::string::npos) << r.error().message();
  };
  expect_einval({TorchEdit::SetTensor(root, "tied.a", t)}, "tied.a");       // tied weight
  expect_einval({TorchEdit::SetTensor(root, "view.offset", t)}, "shared");  // a view of view.base
  expect_einval({TorchEdit::Rename(root, Key(root, "int8"), "int16")}, "int16");
  expect_einval(
      {TorchEdit::Remove(root, Key(root, "int8")), TorchEdit::Remove(root, Key(root, "int8"))},
      "'int8'");
  NewTensor wrong{DType::kFloat32, {3}, -1, 0, 0, two, std::nullopt};
  expect_einval({TorchEdit::SetTensor(root, "new", wrong)}, "'new'");
  expect_einval({TorchEdit::SetTensor(root->Get("meta"), "x", t)}, "not a dict");
  // Allowed: replacing both views of one storage and its base together, and
  // deleting a view whose storage stays.
  std::vector<TorchEdit> ok = {TorchEdit::SetTensor(root, "tied.a", t),
                               TorchEdit::SetTensor(root, "tied.b", t),
                               TorchEdit::Remove(root, Key(root, "shared.a"))};
  auto r = RepackTorchFile(l.file, src, ok, ofd.get(), 0, "dtypes.pt");
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto again = LoadTorchFile(ofd.get(), 0, r->bytes, "o");
  ASSERT_TRUE(again.ok()) << again.error().message();
  const Value* shared_b = again->pickle.root->Get("shared.b");
  ASSERT_TRUE(shared_b && again->tensors.count(shared_b));
  EXPECT_EQ(again->tensors.at(shared_b).storage_offset, 4);
}

TEST(TorchRepack, RandomEditsNeverCrashAndAlwaysLoad) {
  TempDir dir;
  std::mt19937 rng(20240611);
  std::vector<Case> cases = Cases();
  std::vector<std::string> outputs;
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kInt64,
                          DType::kUInt8,   DType::kBool,     DType::kFloat64, DType::kInt8};
  int refused = 0;
  for (int iter = 0; iter < 36; ++iter) {
    const Case& c = cases[rng() % cases.size()];
    if (c.real && !RealFixturesPresent()) continue;
    TempDir work;
    Loaded l;
    ASSERT_NO_FATAL_FAILURE(Load(work, c, &l));
    // Any dict of the graph that holds at least one string key.
    std::vector<const Value*> dicts;
    for (const auto& v : l.file.pickle.arena) {
      if (v->Is(Kind::kDict) && !v->entries.empty() && v->entries[0].first->Is(Kind::kString)) {
        dicts.push_back(v.get());
      }
    }
    ASSERT_FALSE(dicts.empty());
    std::vector<TorchEdit> edits;
    std::deque<std::string> buffers;
    int n = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < n; ++k) {
      const Value* d = dicts[rng() % dicts.size()];
      const Value* key = d->entries[rng() % d->entries.size()].first;
      switch (rng() % 3) {
        case 0:
          edits.push_back(TorchEdit::Remove(d, key));
          break;
        case 1:
          edits.push_back(TorchEdit::Rename(d, key, fmt::format("renamed{}", k)));
          break;
        default: {
          NewTensor t;
          t.dtype = dtypes[rng() % std::size(dtypes)];
          uint64_t numel = 1;
          for (int dim = static_cast<int>(rng() % 3); dim > 0; --dim) {
            t.shape.push_back(static_cast<int64_t>(rng() % 4));
            numel *= static_cast<uint64_t>(t.shape.back());
          }
          buffers.push_back(Pattern(numel * Info(t.dtype).itemsize, k));
          if (t.dtype == DType::kBool)
            for (auto& ch : buffers.back()) ch &= 1;
          t.bytes = buffers.back();
          std::string name =
              rng() % 2 ? fmt::format("new{}", k) : (key->Is(Kind::kString) ? key->str : "x");
          edits.push_back(TorchEdit::SetTensor(d, name, t));
        }
      }
    }
    std::string out = dir.Join(fmt::format("out{}.pt", iter));
    UniqueFd ofd(::open(out.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    TorchSource src{*l.reader, iter % 2 ? l.fd.get() : -1, 0};
    auto r = RepackTorchFile(l.file, src, edits, ofd.get(), 0, l.path);
    if (!r.ok()) {
      EXPECT_EQ(r.error().code(), EINVAL) << r.error().message();
      ++refused;
      continue;
    }
    auto again = LoadTorchFile(ofd.get(), 0, r->bytes, out);
    ASSERT_TRUE(again.ok()) << again.error().message();
    EXPECT_TRUE(again->bad_tensors.empty()) << c.label;
    outputs.push_back(out);
  }
  EXPECT_GE(outputs.size(), 15u) << refused << " refused";
  std::string cmd = "/usr/bin/python3 -W ignore -c " +
                    ShellQuote(
                        "import sys, zipfile, torch\n"
                        "for p in sys.argv[1:]:\n"
                        "    assert zipfile.ZipFile(p).testzip() is None, p\n"
                        "    torch.load(p, weights_only=False, map_location='cpu')\n"
                        "print(len(sys.argv) - 1)");
  for (const auto& o : outputs) cmd += " " + ShellQuote(o);
  auto py = Sh(cmd);
  ASSERT_EQ(py.exit_code, 0) << py.err;
  EXPECT_EQ(py.out, std::to_string(outputs.size()) + "\n");
}

}  // namespace
}  // namespace nemofs::torch
