// The pickle writer against CPython's pickler: pickles of real checkpoints
// (every torch.save fixture, the DCP .metadata files) and a corpus written at
// test time by /usr/bin/python3's pickle for protocols 2-5 must come back
// byte-identical after Unpickle -> WritePickle; values the VM did not read
// (edited or synthesised ones) must come back equivalent, checked by
// re-unpickling and by Python.
#include "torch/pickle_writer.h"

#include <gtest/gtest.h>

#include <sstream>

#include "test_util.h"
#include "torch/value_arena.h"

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

// Writes every pickle of the fixtures under the given roots to files, one
// "label<TAB>path" line each: data.pkl of torch.save zips (also inside
// tars), the object pickle of legacy files, DCP .metadata files.
constexpr char kExtract[] = R"PY(
import io, os, sys, tarfile, zipfile, pickletools
LEGACY = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
out_dir = sys.argv[1]
n = 0
def emit(label, data):
    global n
    p = os.path.join(out_dir, "%04d.pkl" % n); n += 1
    open(p, "wb").write(data)
    print(label + "\t" + p)
def legacy_object(data):
    pos = 0
    for i in range(4):
        start = pos
        for op, arg, at in pickletools.genops(io.BytesIO(data[pos:])):
            if op.name == "STOP":
                end = pos + at + 1
        pos = end
    return data[start:end]
def blob(label, data):
    if data[:4] == b"PK\x03\x04":
        try:
            z = zipfile.ZipFile(io.BytesIO(data))
        except Exception:
            return
        for name in z.namelist():
            if name.endswith("/data.pkl"):
                emit(label + ":" + name, z.read(name))
    elif data[:14] == LEGACY:
        emit(label + ":legacy", legacy_object(data))
    elif label.endswith(".metadata") and data[:1] == b"\x80":
        emit(label, data)
for root in sys.argv[2:]:
    for dp, dn, fn in os.walk(root):
        dn.sort()
        for f in sorted(fn):
            path = os.path.join(dp, f)
            if "/hostile/" in path and not f == "evil_reduce.pt":
                continue
            data = open(path, "rb").read()
            if tarfile.is_tarfile(path) and not data[:4] == b"PK\x03\x04":
                with tarfile.open(path) as t:
                    for m in t.getmembers():
                        if m.isfile():
                            blob(path + ":" + m.name, t.extractfile(m).read())
            else:
                blob(path, data)

)PY";

constexpr char kCorpus[] = R"PY(
import argparse, collections, os, pickle, sys
out_dir = sys.argv[1]
class Plain: pass
class Slots:
    __slots__ = ('a', 'b')
shared = [1, 2]
p = Plain(); p.x = 1; p.y = [shared]
s = Slots(); s.a = 1; s.b = 'two'
rec = []; rec.append(rec)
od_state = collections.OrderedDict(a=1); od_state._metadata = {'v': 1}
objs = {
 'ints': [0, 1, 127, 128, 255, 256, 65535, 65536, -1, -128, -129, -255, -256, 2**31-1, 2**31, -2**31,
          -2**31-1, 2**40+3, 2**63-1, 2**63, -2**63, -2**63-1, 2**64, -(2**64), 2**1000, -(2**1000)+1,
          2**2100, -(2**2100)],
 'floats': [0.0, -0.0, 1.5, float('inf'), float('-inf'), float('nan'), 1e308, 5e-324],
 'strs': ['', 'a', '\u00e9\u20ac\U0001f600', 'x'*255, 'y'*256, 'z'*70000],
 'bytes': [b'', b'\x00\xff', bytes(range(256)), b'q'*70000, b'\x80'*3],
 'atoms': [True, False, None],
 'tuples': [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((), ((),))],
 'lists': [[], [1], list(range(1000)), list(range(1001)), list(range(2000)), list(range(2001))],
 'dicts': [{}, {'a': 1}, {i: i for i in range(1000)}, {i: i for i in range(1001)},
           {i: str(i) for i in range(2000)}],
 'od': [collections.OrderedDict(), collections.OrderedDict([('a', 1)]),
        collections.OrderedDict((str(i), i) for i in range(1000)),
        collections.OrderedDict((str(i), i) for i in range(1001)), od_state],
 'dd': collections.defaultdict(list, {'k': [1]}),
 'sets': [set(), {1}, set(range(1000)), set(range(1001)), frozenset(), frozenset({1, 2}),
          frozenset(range(1000))],
 'shared': [shared, shared, (shared,), p, p],
 'ns': argparse.Namespace(a=1, b='x'), 'slots': s,
 'complex': 1 + 2j, 'bytearray': bytearray(b'abc'),
 'memo': [str(i) for i in range(300)], 'rec': rec,
}
many = [('k%d' % i, i * 0.5, b'v' * (i % 7)) for i in range(20000)]
n = 0
for proto in (2, 3, 4, 5):
    for name, obj in [('all', objs), ('many', many)] + list(objs.items()):
        path = os.path.join(out_dir, 'p%d_%s.pkl' % (proto, name))
        open(path, 'wb').write(pickle.dumps(obj, protocol=proto))
        print(path)

)PY";

// "" if equal, else where and how the two differ.
std::string Diff(const std::string& want, const std::string& got) {
  if (want == got) return "";
  size_t i = 0;
  while (i < want.size() && i < got.size() && want[i] == got[i]) ++i;
  auto hex = [](const std::string& s, size_t at) {
    std::string out;
    for (size_t k = at; k < std::min(s.size(), at + 24); ++k) {
      out += fmt::format("{:02x} ", static_cast<uint8_t>(s[k]));
    }
    return out;
  };
  size_t from = i >= 8 ? i - 8 : 0;
  return fmt::format("sizes {} vs {}, first difference at {}: want [{}] got [{}]", want.size(),
                     got.size(), i, hex(want, from), hex(got, from));
}

void ExpectRoundTrip(const std::string& label, const std::string& pickle) {
  auto u = Unpickle(pickle, label);
  ASSERT_TRUE(u.ok()) << u.error().message();
  int proto = PickleProtocol(pickle);
  auto w = WritePickle(u->root, proto);
  ASSERT_TRUE(w.ok()) << label << ": " << w.error().message();
  EXPECT_EQ(Diff(pickle, *w), "") << label << " (protocol " << proto << ")";
}

std::vector<std::pair<std::string, std::string>> Lines(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    size_t tab = line.find('\t');
    if (tab == std::string::npos) {
      out.emplace_back(line, line);
    } else {
      out.emplace_back(line.substr(0, tab), line.substr(tab + 1));
    }
  }
  return out;
}

TEST(PickleWriter, FixturesByteIdentical) {
  TempDir dir;
  WriteFile(dir.Join("extract.py"), kExtract);
  std::string cmd = "/usr/bin/python3 " + ShellQuote(dir.Join("extract.py")) + " " +
                    ShellQuote(dir.path()) + " " + ShellQuote(TestData(""));
  if (RealFixturesPresent()) cmd += " " + ShellQuote(RealFixture(""));
  auto r = Sh(cmd);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto files = Lines(r.out);
  // tests/data alone holds over 60 pickles (zip, legacy, per-rank, DCP).
  ASSERT_GE(files.size(), 60u) << r.out;
  size_t legacy = 0, real = 0;
  for (const auto& [label, path] : files) {
    SCOPED_TRACE(label);
    legacy += label.find(":legacy") != std::string::npos;
    real += label.find("real-fixtures") != std::string::npos;
    ExpectRoundTrip(label, ReadFile(path));
  }
  EXPECT_GE(legacy, 1u);
  if (RealFixturesPresent()) {
    EXPECT_GE(real, 8u);
  } else {
    GTEST_LOG_(INFO) << "../shared/real-fixtures is absent: only tests/data was checked";
  }
}

TEST(PickleWriter, PythonCorpusByteIdentical) {
  TempDir dir;
  WriteFile(dir.Join("corpus.py"), kCorpus);
  auto r =
      Sh("/usr/bin/python3 " + ShellQuote(dir.Join("corpus.py")) + " " + ShellQuote(dir.path()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto files = Lines(r.out);
  ASSERT_EQ(files.size(), 80u);
  for (const auto& [label, path] : files) {
    SCOPED_TRACE(label);
    ExpectRoundTrip(label, ReadFile(path));
  }
}

// Values built by hand (as torch_repack builds new tensors): checked by
// Python's unpickler and by Unpickle -> ToDebugString.
class Graph : public ValueArena {
 public:
  using ValueArena::Str;
  Value* Str(std::string s, Kind k) {
    Value* v = New(k);
    v->str = std::move(s);
    return v;
  }
  Value* Global(std::string m, std::string n) {
    Value* v = New(Kind::kGlobal);
    v->str = std::move(m);
    v->name = std::move(n);
    return v;
  }
};

std::string PythonLoads(const std::string& pickle, const std::string& expr) {
  TempDir dir;
  WriteFile(dir.Join("p.pkl"), pickle);
  auto r = Sh("/usr/bin/python3 -c " +
              ShellQuote("import pickle,sys,collections,copyreg\n"
                         "x = pickle.load(open(sys.argv[1], 'rb'))\n"
                         "want = " +
                         expr +
                         "\n"
                         "print('same' if x == want and type(x) == type(want) else repr(x))") +
              " " + ShellQuote(dir.Join("p.pkl")));
  return r.exit_code == 0 ? r.out : r.err;
}

TEST(PickleWriter, SynthesisedValuesLoadInPython) {
  for (int proto = 2; proto <= 5; ++proto) {
    SCOPED_TRACE(proto);
    Graph g;
    Value* root = g.New(Kind::kDict);
    Value* bytes = g.Str(std::string("\x00\x7f\x80\xff", 4), Kind::kBytes);
    Value* empty = g.Str("", Kind::kBytes);
    Value* set = g.New(Kind::kSet);
    set->items = {g.Int(1), g.Int(2)};
    Value* od = g.New(Kind::kDict);
    od->opcode = 'R';
    od->callable = g.Global("collections", "OrderedDict");
    od->args = g.New(Kind::kTuple);
    od->entries = {{g.Str("w"), g.Int(-70000)}};
    Value* big = g.New(Kind::kBigInt);
    big->str = "-1267650600228229401496703205376";  // -2**100
    Value* list = g.New(Kind::kList);
    list->items = {bytes, bytes, empty, big};
    root->entries = {{g.Str("b"), bytes},
                     {g.Str("l"), list},
                     {g.Str("s"), set},
                     {g.Str("od"), od},
                     {g.Str("g"), g.Global("copyreg", "_reconstructor")}};
    auto w = WritePickle(root, proto);
    ASSERT_TRUE(w.ok()) << w.error().message();
    EXPECT_EQ(PythonLoads(*w,
                          "{'b': b'\\x00\\x7f\\x80\\xff', 'l': [b'\\x00\\x7f\\x80\\xff', "
                          "b'\\x00\\x7f\\x80\\xff', b'', -2**100], 's': {1, 2}, "
                          "'od': collections.OrderedDict(w=-70000), 'g': copyreg._reconstructor}"),
              "same\n");
    auto u = Unpickle(*w, "synth");
    ASSERT_TRUE(u.ok()) << u.error().message();
    EXPECT_EQ(ToDebugString(u->root), ToDebugString(root));
    // The shared bytes object is written once and fetched from the memo.
    const Value* l = u->root->Get("l");
    ASSERT_TRUE(l && l->items.size() == 4);
    EXPECT_EQ(l->items[0], l->items[1]);
    EXPECT_EQ(u->root->Get("b"), l->items[0]);
  }
}

TEST(PickleWriter, ReplacementsAndEditedReducedDicts) {
  // An OrderedDict whose entries came from its REDUCE arguments (Python 2
  // style), edited afterwards: written as OrderedDict() + SETITEMS.
  static constexpr char kPickle[] =
      "\x80\x02"
      "ccollections\nOrderedDict\n"
      "]"
      "("
      "X\x01\x00\x00\x00"
      "a"
      "K\x01"
      "\x86"
      "X\x01\x00\x00\x00"
      "b"
      "K\x02"
      "\x86"
      "e"
      "\x85"
      "R"
      ".";
  const std::string pickle(kPickle, sizeof kPickle - 1);
  auto u = Unpickle(pickle, "t");
  ASSERT_TRUE(u.ok()) << u.error().message();
  ASSERT_EQ(ToDebugString(u->root), "{'a': 1, 'b': 2}");
  auto same = WritePickle(u->root, 2);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(PythonLoads(*same, "collections.OrderedDict(a=1, b=2)"), "same\n");

  Value edited = *u->root;
  edited.entries.erase(edited.entries.begin());
  std::unordered_map<const Value*, const Value*> replace{{u->root, &edited}};
  PickleWriteOptions options;
  options.replace = &replace;
  auto w = WritePickle(u->root, 2, options);
  ASSERT_TRUE(w.ok()) << w.error().message();
  EXPECT_EQ(PythonLoads(*w, "collections.OrderedDict(b=2)"), "same\n");
  auto back = Unpickle(*w, "edited");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(ToDebugString(back->root), "{'b': 2}");
}

TEST(PickleWriter, Refusals) {
  Graph g;
  Value* root = g.New(Kind::kList);
  EXPECT_EQ(WritePickle(root, 1).error().code(), EINVAL);
  EXPECT_EQ(WritePickle(root, 6).error().code(), EINVAL);
  EXPECT_EQ(WritePickle(nullptr, 2).error().code(), EINVAL);
  // Deeper than the limit: an error, not a stack overflow.
  Value* v = root;
  for (int i = 0; i < 100000; ++i) {
    Value* inner = g.New(Kind::kList);
    v->items.push_back(inner);
    v = inner;
  }
  auto w = WritePickle(root, 2);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.error().code(), EINVAL);
  EXPECT_NE(w.error().message().find("deeper"), std::string::npos) << w.error().message();
  // A newline in a GLOBAL name cannot be written below protocol 4.
  Value* bad = g.Global("os\nx", "system");
  EXPECT_EQ(WritePickle(bad, 2).error().code(), EINVAL);
  EXPECT_TRUE(WritePickle(bad, 4).ok());
}

}  // namespace
}  // namespace nemofs::torch
