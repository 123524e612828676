// The pickle VM against Python's own pickler and unpickler.
//
// Oracle: CPython's pure-Python unpickler (pickle._Unpickler) with every
// global replaced by an inert stub class and the result rendered in
// ToDebugString's format, so whole object graphs (real checkpoints included)
// are compared as strings, together with `consumed` and the globals list.
// Pickles are made at test time with /usr/bin/python3's stdlib `pickle`, for
// protocols 0-5; opcodes Python no longer writes (INST, OBJ, PERSID, EXT*,
// NEXT_BUFFER, ...) and hostile inputs are written by hand.
#include "torch/pickle.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <sstream>

#include "test_util.h"

namespace nemofs::torch {
namespace {

using namespace std::string_literals;
using testing::ReadFile;
using testing::RealFixture;
using testing::Sh;
using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;
using testing::WriteFile;

constexpr char kOracle[] = R"PY(
import codecs, collections, pickle, sys

MAX_DEPTH = 50
NAMES = {}
STRUCTURAL = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'dict'): dict,
    ('collections', 'defaultdict'): collections.defaultdict,
    ('_codecs', 'encode'): codecs.encode,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'bytes'): bytes,
    ('builtins', 'bytearray'): bytearray,
}
STUBS = {}

class PID:
    def __init__(self, pid):
        self.pid = pid

def stub(module, name):
    key = (module, name)
    if key not in STUBS:
        def new(cls, *args, **kwargs):
            o = object.__new__(cls)
            o.__dict__.update(_kind='object', _args=args, _kwargs=kwargs, _items=[],
                              _entries=[], _has_state=False, _state=None)
            return o
        def init(self, *args, **kwargs):
            self._kind = 'call'
        def setstate(self, state):
            self._has_state, self._state = True, state
        def setitem(self, k, v):
            self._entries.append((k, v))
        def append(self, x):
            self._items.append(x)
        def extend(self, xs):
            self._items.extend(xs)
        STUBS[key] = type(name, (), {'__new__': new, '__init__': init, '__setstate__': setstate,
                                     '__setitem__': setitem, 'append': append, 'extend': extend,
                                     '_stub': key})
    return STUBS[key]

class Oracle(pickle._Unpickler):
    def __init__(self, f):
        super().__init__(f, encoding='utf-8')
        self.seen = []
    def find_class(self, module, name):
        if self.proto < 3:
            module = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}.get(module, module)
        if (module, name) not in self.seen:
            self.seen.append((module, name))
        real = STRUCTURAL.get((module, name))
        if real is not None:
            NAMES[id(real)] = module + '.' + name
            return real
        return stub(module, name)
    def persistent_load(self, pid):
        return PID(pid)

def is_stub_instance(o):
    return hasattr(type(o), '_stub') and not isinstance(o, type)

def dbg(o, d=0, path=()):
    if d > MAX_DEPTH or any(o is p for p in path):
        return '...'
    path = path + (o,)
    s = body(o, d + 1, path)
    if is_stub_instance(o):
        if o._has_state:
            s += ' state=' + dbg(o._state, d + 1, path)
    elif isinstance(o, dict) and getattr(o, '__dict__', None):
        s += ' state=' + dbg(vars(o), d + 1, path)
    return s

def seq(xs, d, path):
    return ', '.join(dbg(x, d, path) for x in xs)

def entries(kv, d, path):
    return '{' + ', '.join(dbg(k, d, path) + ': ' + dbg(v, d, path) for k, v in kv) + '}'

def body(o, d, path):
    if isinstance(o, type) and hasattr(o, '_stub'):
        return '%s.%s' % o._stub
    if id(o) in NAMES:
        return NAMES[id(o)]
    if isinstance(o, PID):
        return 'pid(' + dbg(o.pid, d, path) + ')'
    if isinstance(o, bytearray):
        return repr(bytes(o))
    if isinstance(o, list):
        return '[' + seq(o, d, path) + ']'
    if isinstance(o, tuple):
        return '(' + seq(o, d, path) + (',' if len(o) == 1 else '') + ')'
    if isinstance(o, (set, frozenset)):
        return '{' + seq(o, d, path) + '}' if o else 'set()'
    if isinstance(o, dict):
        return entries(o.items(), d, path)
    if is_stub_instance(o):
        s = dbg(type(o), d, path) + ('.__new__(' if o._kind == 'object' else '(')
        s += seq(o._args, d, path)
        if o._kwargs:
            s += (', ' if o._args else '') + '**' + dbg(dict(o._kwargs), d, path)
        s += ')'
        if o._items:
            s += ' items=[' + seq(o._items, d, path) + ']'
        if o._entries:
            s += ' entries=' + entries(o._entries, d, path)
        return s
    return repr(o)

args = sys.argv[1:]
for path, count in zip(args[::2], args[1::2]):
    with open(path, 'rb') as f:
        for _ in range(int(count)):
            u = Oracle(f)
            root = u.load()
            print('@@consumed', f.tell())
            for m, n in u.seen:
                print('@@global', m, n)
            print('@@repr')
            print(dbg(root))
)PY";

// Writes one pickle per (case, protocol) into argv[1] and prints the paths.
constexpr char kCases[] = R"PY(
import collections, os, pickle, sys
out = sys.argv[1]

class Point:
    def __init__(self, x):
        self.x = x
        self.y = [x, 'two']

class Slotted:
    __slots__ = ('a', 'b')
    def __init__(self):
        self.a, self.b = 1, 'b'

class KwNew:
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)
    def __init__(self, a, k=None):
        self.a, self.k = a, k
    def __getnewargs_ex__(self):
        return ((self.a,), {'k': self.k})

class Evil:
    def __reduce__(self):
        return (os.system, ('touch ' + os.path.join(out, 'pwned'),))

ALL = range(6)
shared = [1, 2]
d = {}
t = (d,)
d['self'] = t
selfref = [1]
selfref.append(selfref)
cases = {
    'scalars': (ALL, [None, True, False, 0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -2**31,
                      2**31, -2**31 - 1, 2**63 - 1, -2**63, 2**63, -2**63 - 1, 2**64, 2**100,
                      -2**70, 2**3000, -2**3000 + 1, 0.0, -0.0, 1.5, 1e16, 1e15, 1e-5, 1e-4,
                      123.456, float('inf'), -float('inf'), float('nan'), 1 / 3, 5e-324,
                      1.7976931348623157e308, -2.5e-300]),
    'strings': (ALL, ['', 'ascii', 'h\u00e9llo w\u00f6rld', '\u65e5\u672c\u8a9e', '\U0001F600',
                      "a'b", 'a"b', 'a\'"b', 'tab\tnl\nret\r', 'back\\slash \\u0041',
                      '\x00\x01\x1f\x7f', '\x85\xa0\xad', 'x' * 300]),
    'bytes': (ALL, [b'', b'abc', bytes(range(256)), b"'\"", bytearray(b'xy\x00\xff'),
                    bytearray(), b'z' * 300]),
    'containers': (ALL, {'a': [1, (2, 3), {'b': None}], 'c': (), 'd': (1,), 'e': {1, 2, 3},
                         'f': frozenset({4}), 'g': set(), 'h': [[]], (1, 2): 'tuple key',
                         3: 'int key', 'od': collections.OrderedDict([('x', 1), ('y', [2])]),
                         'dd': collections.defaultdict(list, {'k': [1]}),
                         'ed': collections.OrderedDict()}),
    'shared': (ALL, [shared, shared, {'k': shared}, (shared,)]),
    'recursive': (ALL, [t, d]),
    'selfref': (ALL, selfref),
    'instances': (ALL, [Point(1), Point(2.5)]),
    'slots': (range(2, 6), Slotted()),
    'kwnew': (range(4, 6), KwNew(7, k='kw')),
    'evil': (ALL, Evil()),
    'big': (ALL, list(range(1500)) + [str(i) for i in range(300)] +
            [{i: str(i) for i in range(1200)}]),
}
for name, (protos, obj) in cases.items():
    for p in protos:
        path = os.path.join(out, '%s_p%d.pkl' % (name, p))
        with open(path, 'wb') as f:
            f.write(pickle.dumps(obj, protocol=p))
        print(path)
)PY";

struct Expected {
  size_t consumed = 0;  // absolute offset in the file
  std::vector<std::pair<std::string, std::string>> globals;
  std::string repr;
};

// Runs the oracle over (path, number of pickles in a row) inputs.
std::vector<Expected> RunOracle(const std::vector<std::pair<std::string, int>>& inputs) {
  TempDir dir;
  WriteFile(dir.Join("oracle.py"), kOracle);
  std::string cmd =
      "PYTHONIOENCODING=utf-8 /usr/bin/python3 -W ignore " + ShellQuote(dir.Join("oracle.py"));
  for (const auto& [path, count] : inputs)
    cmd += " " + ShellQuote(path) + " " + std::to_string(count);
  auto r = Sh(cmd);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<Expected> out;
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("@@consumed ", 0) == 0) {
      out.emplace_back();
      out.back().consumed = std::stoul(line.substr(11));
    } else if (line.rfind("@@global ", 0) == 0) {
      std::string rest = line.substr(9);
      size_t sp = rest.find(' ');
      out.back().globals.emplace_back(rest.substr(0, sp), rest.substr(sp + 1));
    } else if (line == "@@repr") {
      std::getline(in, out.back().repr);
    }
  }
  return out;
}

// Unpickles data[offset..] and compares with the oracle.
void ExpectMatchesOracle(const std::string& data, size_t offset, const Expected& want,
                         const std::string& label) {
  SCOPED_TRACE(label);
  auto u = Unpickle(std::string_view(data).substr(offset), label);
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_EQ(offset + u->consumed, want.consumed);
  EXPECT_EQ(u->globals, want.globals);
  EXPECT_EQ(ToDebugString(u->root), want.repr);
}

// Every proper prefix must fail as truncated, never crash. Inputs over 4 KiB
// are cut at a few hundred evenly spaced offsets plus every offset near both
// ends (every offset of every input would take minutes under ASan).
void ExpectEveryPrefixIsTruncated(std::string_view data, const std::string& label) {
  size_t stride = data.size() <= 4096 ? 1 : data.size() / (data.size() <= (64 << 10) ? 512 : 128);
  size_t ends = data.size() <= (64 << 10) ? 128 : 16;
  for (size_t n = 0; n < data.size(); ++n) {
    if (stride > 1 && n > ends && n + ends < data.size() && n % stride != 0) continue;
    auto u = Unpickle(data.substr(0, n), label);
    ASSERT_FALSE(u.ok()) << label << " cut at " << n;
    ASSERT_NE(u.error().message().find("unexpected end of data"), std::string::npos)
        << label << " cut at " << n << ": " << u.error().message();
    EXPECT_EQ(u.error().code(), EINVAL);
  }
}

Result<Unpickled> U(std::string_view data, const Limits& limits = {}) {
  return Unpickle(data, "t", limits);
}

std::string ErrorOf(std::string_view data, const Limits& limits = {}) {
  auto u = U(data, limits);
  if (u.ok()) return "ok: " + ToDebugString(u->root);
  EXPECT_EQ(u.error().code(), EINVAL);
  return u.error().message();
}

std::string DebugOf(std::string_view data) {
  auto u = U(data);
  if (!u.ok()) return "error: " + u.error().message();
  return ToDebugString(u->root);
}

// ---- pickles made by Python's pickler --------------------------------------

class PickleGenerated : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir;
    WriteFile(dir_->Join("cases.py"), kCases);
    auto r = Sh("/usr/bin/python3 " + ShellQuote(dir_->Join("cases.py")) + " " +
                ShellQuote(dir_->path()));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::istringstream in(r.out);
    std::string path;
    files_ = new std::vector<std::string>;
    while (std::getline(in, path)) files_->push_back(path);
  }
  static void TearDownTestSuite() {
    delete dir_;
    delete files_;
    dir_ = nullptr;
    files_ = nullptr;
  }
  static std::string Path(const std::string& name, int proto) {
    return dir_->Join(name + "_p" + std::to_string(proto) + ".pkl");
  }
  static Unpickled Load(const std::string& name, int proto) {
    auto u = Unpickle(ReadFile(Path(name, proto)), name);
    EXPECT_TRUE(u.ok()) << u.error().message();
    return u.ok() ? std::move(*u) : Unpickled{};
  }

  static TempDir* dir_;
  static std::vector<std::string>* files_;
};
TempDir* PickleGenerated::dir_ = nullptr;
std::vector<std::string>* PickleGenerated::files_ = nullptr;

TEST_F(PickleGenerated, EveryCaseAndProtocolMatchesPython) {
  ASSERT_GE(files_->size(), 60u);
  std::vector<std::pair<std::string, int>> inputs;
  for (const auto& f : *files_) inputs.emplace_back(f, 1);
  auto want = RunOracle(inputs);
  ASSERT_EQ(want.size(), files_->size());
  for (size_t i = 0; i < files_->size(); ++i) {
    ExpectMatchesOracle(ReadFile((*files_)[i]), 0, want[i], (*files_)[i]);
  }
}

TEST_F(PickleGenerated, SpotChecksOfTheRendering) {
  for (int p = 0; p <= 5; ++p) {
    SCOPED_TRACE(p);
    std::string s = ToDebugString(Load("scalars", p).root);
    EXPECT_NE(s.find(", 1267650600228229401496703205376, -1180591620717411303424, "),
              std::string::npos);  // 2**100, -2**70
    EXPECT_NE(s.find(", 1e+16, 1000000000000000.0, 1e-05, 0.0001, 123.456, inf, -inf, nan, "),
              std::string::npos);
    s = ToDebugString(Load("strings", p).root);
    EXPECT_NE(s.find("'h\u00e9llo w\u00f6rld', '\u65e5\u672c\u8a9e', '\U0001F600', \"a'b\", "
                     "'a\"b', 'a\\'\"b', 'tab\\tnl\\nret\\r', 'back\\\\slash \\\\u0041'"),
              std::string::npos)
        << s;
    s = ToDebugString(Load("bytes", p).root);
    EXPECT_EQ(s.substr(0, 32), "[b'', b'abc', b'\\x00\\x01\\x02\\x03") << s;
    EXPECT_NE(s.find("b'xy\\x00\\xff', b'', b'zzz"), std::string::npos) << s;
  }
}

TEST_F(PickleGenerated, KindsOfScalars) {
  for (int p = 0; p <= 5; ++p) {
    SCOPED_TRACE(p);
    auto u = Load("scalars", p);
    ASSERT_TRUE(u.root && u.root->Is(Kind::kList));
    const auto& it = u.root->items;
    EXPECT_TRUE(it[0]->Is(Kind::kNone));
    EXPECT_TRUE(it[1]->Is(Kind::kBool) && it[1]->boolean);
    EXPECT_TRUE(it[2]->Is(Kind::kBool) && !it[2]->boolean);
    EXPECT_TRUE(it[15]->Is(Kind::kInt) && it[15]->integer == INT64_MIN);
    EXPECT_TRUE(it[14]->Is(Kind::kInt) && it[14]->integer == INT64_MAX);
    EXPECT_TRUE(it[16]->Is(Kind::kBigInt) && it[16]->str == "9223372036854775808");
    EXPECT_TRUE(it[17]->Is(Kind::kBigInt) && it[17]->str == "-9223372036854775809");
    EXPECT_TRUE(it[20]->Is(Kind::kBigInt) && it[20]->str == "-1180591620717411303424");
    EXPECT_TRUE(it[25]->Is(Kind::kFloat) && it[25]->real == 1.5);
    EXPECT_TRUE(std::signbit(it[24]->real));
  }
}

TEST_F(PickleGenerated, BytesBecomeBytesInEveryProtocol) {
  for (int p = 0; p <= 5; ++p) {
    auto u = Load("bytes", p);
    ASSERT_TRUE(u.root);
    const auto& it = u.root->items;
    for (const Value* v : it) EXPECT_TRUE(v->Is(Kind::kBytes)) << p << " " << ToDebugString(v);
    EXPECT_EQ(it[2]->str.size(), 256u);
    for (int i = 0; i < 256; ++i) EXPECT_EQ(static_cast<uint8_t>(it[2]->str[i]), i);
    // Protocols below 3 write bytes as _codecs.encode(latin-1 text, 'latin1').
    bool codecs = std::find(u.globals.begin(), u.globals.end(),
                            std::make_pair("_codecs"s, "encode"s)) != u.globals.end();
    EXPECT_EQ(codecs, p < 3) << p;
  }
}

TEST_F(PickleGenerated, ContainersKeepOrderAndKinds) {
  for (int p = 0; p <= 5; ++p) {
    SCOPED_TRACE(p);
    auto u = Load("containers", p);
    const Value* r = u.root;
    ASSERT_TRUE(r && r->Is(Kind::kDict));
    EXPECT_TRUE(r->Get("e")->Is(Kind::kSet));
    EXPECT_EQ(r->Get("e")->items.size(), 3u);
    EXPECT_TRUE(r->Get("f")->Is(Kind::kSet));
    EXPECT_TRUE(r->Get("g")->Is(Kind::kSet));
    EXPECT_TRUE(r->Get("d")->Is(Kind::kTuple));
    EXPECT_TRUE(r->Get("od")->Is(Kind::kDict));
    EXPECT_EQ(ToDebugString(r->Get("od")), "{'x': 1, 'y': [2]}");
    EXPECT_EQ(ToDebugString(r->Get("dd")), "{'k': [1]}");
    EXPECT_TRUE(r->Get("ed")->Is(Kind::kDict));
    EXPECT_EQ(r->Get("missing"), nullptr);
    EXPECT_EQ(r->Get("a")->Get("x"), nullptr);  // not a dict
    EXPECT_EQ(ToDebugString(r->entries[7].first), "(1, 2)");
  }
}

TEST_F(PickleGenerated, SharedReferencesAreOneValue) {
  for (int p = 0; p <= 5; ++p) {
    auto u = Load("shared", p);
    ASSERT_TRUE(u.root);
    const auto& it = u.root->items;
    EXPECT_EQ(it[0], it[1]) << p;
    EXPECT_EQ(it[2]->Get("k"), it[0]) << p;
    EXPECT_EQ(it[3]->items[0], it[0]) << p;
    EXPECT_EQ(ToDebugString(u.root), "[[1, 2], [1, 2], {'k': [1, 2]}, ([1, 2],)]");
  }
}

TEST_F(PickleGenerated, CyclesThroughTheMemo) {
  for (int p = 0; p <= 5; ++p) {
    SCOPED_TRACE(p);
    auto self = Load("selfref", p);
    ASSERT_TRUE(self.root);
    EXPECT_EQ(self.root->items.size(), 2u);
    EXPECT_EQ(self.root->items[1], self.root);
    EXPECT_EQ(ToDebugString(self.root), "[1, ...]");

    // d = {}; t = (d,); d['self'] = t; [t, d]: the tuple is finished before
    // the dict is filled, and both must see each other.
    auto rec = Load("recursive", p);
    ASSERT_TRUE(rec.root);
    const Value* t = rec.root->items[0];
    const Value* d = rec.root->items[1];
    ASSERT_TRUE(t->Is(Kind::kTuple) && d->Is(Kind::kDict));
    EXPECT_EQ(t->items[0], d);
    EXPECT_EQ(d->Get("self"), t);
    EXPECT_EQ(ToDebugString(rec.root), "[({'self': ...},), {'self': (...,)}]");
  }
}

TEST_F(PickleGenerated, ClassInstances) {
  for (int p = 0; p <= 5; ++p) {
    SCOPED_TRACE(p);
    auto u = Load("instances", p);
    ASSERT_TRUE(u.root);
    const Value* pt = u.root->items[0];
    if (p >= 2) {  // NEWOBJ + BUILD
      EXPECT_TRUE(pt->Is(Kind::kObject));
      EXPECT_TRUE(pt->IsCallOf("__main__", "Point"));
      EXPECT_EQ(ToDebugString(pt), "__main__.Point.__new__() state={'x': 1, 'y': [1, 'two']}");
    } else {  // copy_reg._reconstructor REDUCE + BUILD, module renamed
      EXPECT_TRUE(pt->Is(Kind::kCall));
      EXPECT_TRUE(pt->IsCallOf("copyreg", "_reconstructor"));
      EXPECT_EQ(ToDebugString(pt),
                "copyreg._reconstructor(__main__.Point, builtins.object, None) "
                "state={'x': 1, 'y': [1, 'two']}");
    }
    ASSERT_TRUE(pt->state);
    EXPECT_EQ(pt->state->Get("x")->integer, 1);
    EXPECT_EQ(u.root->items[1]->state->Get("x")->real, 2.5);
    EXPECT_NE(std::find(u.globals.begin(), u.globals.end(), std::make_pair("__main__"s, "Point"s)),
              u.globals.end());
  }
  auto kw = Load("kwnew", 4);
  ASSERT_TRUE(kw.root);
  EXPECT_EQ(ToDebugString(kw.root),
            "__main__.KwNew.__new__(7, **{'k': 'kw'}) state={'a': 7, 'k': 'kw'}");
  EXPECT_EQ(ToDebugString(Load("slots", 2).root),
            "__main__.Slotted.__new__() state=(None, {'a': 1, 'b': 'b'})");
}

TEST_F(PickleGenerated, OsSystemIsRecordedNotRun) {
  std::string marker = dir_->Join("pwned");
  for (int p = 0; p <= 5; ++p) {
    SCOPED_TRACE(p);
    auto u = Load("evil", p);
    ASSERT_TRUE(u.root);
    EXPECT_TRUE(u.root->Is(Kind::kCall));
    EXPECT_TRUE(u.root->IsCallOf("posix", "system") || u.root->IsCallOf("os", "system"));
    EXPECT_EQ(ToDebugString(u.root), "posix.system('touch " + marker + "')");
    ASSERT_EQ(u.globals.size(), 1u);
    EXPECT_EQ(u.globals[0], std::make_pair("posix"s, "system"s));
    struct stat st;
    EXPECT_NE(::stat(marker.c_str(), &st), 0) << "the pickle's command ran";
  }
}

TEST_F(PickleGenerated, EveryPrefixIsTruncated) {
  for (const auto& f : *files_) ExpectEveryPrefixIsTruncated(ReadFile(f), f);
}

TEST_F(PickleGenerated, RandomCorruptionNeverCrashes) {
  std::mt19937 rng(1234);
  int parsed = 0;
  int failed = 0;
  for (const auto& f : *files_) {
    std::string data = ReadFile(f);
    if (data.size() > 20000) data.resize(20000);
    for (int round = 0; round < 150; ++round) {
      std::string bad = data;
      int flips = 1 + static_cast<int>(rng() % 3);
      for (int i = 0; i < flips; ++i) {
        bad[rng() % bad.size()] = static_cast<char>(rng() & 0xff);
      }
      auto u = Unpickle(bad, "fuzz");
      if (u.ok()) {
        ++parsed;
        EXPECT_LE(u->consumed, bad.size());
        (void)ToDebugString(u->root, 100);
      } else {
        ++failed;
        EXPECT_EQ(u.error().code(), EINVAL);
        EXPECT_EQ(u.error().message().rfind("fuzz: pickle ", 0), 0u) << u.error().message();
      }
    }
  }
  EXPECT_GT(parsed, 0);
  EXPECT_GT(failed, 0);
}

// ---- hand-written opcodes ----------------------------------------------------

// Pickles Python can still load, compared with the oracle. (Adjacent string
// literals keep a hex escape from swallowing a following hex digit.)
TEST(PickleHandWritten, MatchPython) {
  const std::vector<std::string> cases = {
      "S'a\\x41\\n\\'b\\101\\\\z\\q'\n."s,
      "S\"dq\"\n."s,
      "U\x03"
      "abc."s,
      "T\x03\x00\x00\x00"
      "abc."s,
      "V\\u00e9t\\u00e9 \xe9 \\\\u0041 \\U0001f600\n."s,
      "I-5\n."s,
      "I 7\n."s,
      "I0x1f\n."s,
      "I99999999999999999999\n."s,
      "I00\n."s,
      "I01\n."s,
      "L123L\n."s,
      "L-0x8000000000000000L\n."s,
      "L-0x8000000000000001L\n."s,
      "L0b101\n."s,
      "L0o17L\n."s,
      "L-9223372036854775808L\n."s,
      "L9223372036854775808\n."s,
      "L-0\n."s,
      "L000\n."s,
      "F1.5\n."s,
      "F-inf\n."s,
      "Fnan\n."s,
      "F1e+16\n."s,
      "F-0.0\n."s,
      "\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff."s,
      "\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00."s,
      "\x8a\x00."s,
      "\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80."s,
      "\x8a\x01\x80."s,
      "\x8b\x02\x00\x00\x00\x00\x01."s,
      "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19."s,  // torch's legacy magic
      "(K\x01K\x02"
      "d."s,
      "(K\x01K\x02l."s,
      "(K\x01t."s,
      "\x80\x04(K\x01K\x02\x91."s,
      "\x80\x04\x8f(K\x01\x90."s,
      "(0N."s,
      "K\x01(K\x02"
      "1."s,
      "]2a."s,
      "K\x05p7\ng7\n\x86."s,
      "]r\xff\xff\xff\xffj\xff\xff\xff\xff\x86."s,
      "\x80\x04\x8c\x01"
      "a\x94\x8c\x01"
      "b\x94h\x00h\x01\x87."s,
      "\x80\x05\x96\x02\x00\x00\x00\x00\x00\x00\x00hi."s,
      "\x80\x04\x8d\x02\x00\x00\x00\x00\x00\x00\x00hi."s,
      "\x80\x04\x8e\x02\x00\x00\x00\x00\x00\x00\x00hi."s,
      "\x80\x03"
      "C\x02hi."s,
      "\x80\x03"
      "B\x02\x00\x00\x00hi."s,
      "\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01K\x02\x86."s,
      "\x80\x02"
      "c__builtin__\nset\n]K\x01"
      "a\x85R."s,
      "\x80\x03"
      "c__builtin__\nset\n]K\x01"
      "a\x85R."s,  // no rename from protocol 3 on
      "cbuiltins\nbytes\n(]K\x01"
      "aK\xff"
      "atR."s,
      "ccollections\nOrderedDict\n(((K\x01K\x02lltR."s,  // Python 2's [[k, v]] form
      "\x80\x02"
      "c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xa9X\x06\x00\x00\x00latin1\x86R."s,
      "\x80\x02"
      "c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xa9\x85R."s,  // utf-8 default
      "\x80\x04\x8c\x01m\x8c\x01"
      "C\x93)}\x8c\x01k\x94K\x01s\x92."s,  // NEWOBJ_EX
      "Pfoo\n."s,
      "\x80\x02X\x01\x00\x00\x00kQ."s,
      "ccollections\ndefaultdict\ncbuiltins\nlist\n\x85R."s,
      "}q\x00\x85q\x01h\x00K\x05K\x06s0h\x01."s,  // SETITEM after the dict went into a tuple
      "cm\nC\n)\x81}b."s,                         // BUILD
      "cm\nf\n)RK\x01"
      "aK\x02K\x03s."s,  // APPEND/SETITEM on a call result
  };
  TempDir dir;
  std::vector<std::pair<std::string, int>> inputs;
  for (size_t i = 0; i < cases.size(); ++i) {
    inputs.emplace_back(dir.Join(std::to_string(i) + ".pkl"), 1);
    WriteFile(inputs.back().first, cases[i]);
  }
  auto want = RunOracle(inputs);
  ASSERT_EQ(want.size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    ExpectMatchesOracle(cases[i], 0, want[i], "case " + std::to_string(i));
  }
}

TEST(PickleHandWritten, SpotChecks) {
  EXPECT_EQ(DebugOf("V\\u00e9t\\u00e9 \xe9 \\\\u0041 \\U0001f600\n."s),
            "'\u00e9t\u00e9 \u00e9 \\\\\\\\u0041 \U0001f600'");
  EXPECT_EQ(DebugOf("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19."s),
            "119547037146038801333356");
  EXPECT_EQ(DebugOf("\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00."s), "9223372036854775808");
  EXPECT_EQ(DebugOf("ccollections\nOrderedDict\n(((K\x01K\x02lltR."s), "{1: 2}");
  EXPECT_EQ(DebugOf("}q\x00\x85q\x01h\x00K\x05K\x06s0h\x01."s), "({5: 6},)");
  EXPECT_EQ(DebugOf("\x80\x02"
                    "c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xa9X\x06\x00\x00\x00latin1\x86R."s),
            "b'\\xe9'");
  EXPECT_EQ(DebugOf("\x80\x02"
                    "c_codecs\nencode\nX\x02\x00\x00\x00\xc3\xa9X\x07\x00\x00\x00latin-1\x86R."s),
            "b'\\xe9'");
  EXPECT_EQ(DebugOf("Pfoo\n."s), "pid('foo')");
  EXPECT_EQ(DebugOf("\x80\x02X\x01\x00\x00\x00kQ."s), "pid('k')");
  EXPECT_EQ(DebugOf("K\x01K\x02\x86q\x00h\x00\x86."s), "((1, 2), (1, 2))");
  // A global that no opcode calls is a symbol.
  auto g =
      U("\x80\x04\x8c\x05torch\x8c\x08"
        "bfloat16\x93."s);
  ASSERT_TRUE(g.ok()) << g.error().message();
  EXPECT_TRUE(g->root->IsGlobal("torch", "bfloat16"));
  EXPECT_FALSE(g->root->IsGlobal("torch", "float16"));
  EXPECT_FALSE(g->root->IsCallOf("torch", "bfloat16"));
  EXPECT_EQ(g->consumed, 21u);
}

// INST and OBJ (protocols 0/1, never written by Python 3) make objects.
TEST(PickleHandWritten, InstAndObj) {
  EXPECT_EQ(DebugOf("(I1\nI2\ni__main__\nPoint\n."s), "__main__.Point.__new__(1, 2)");
  EXPECT_EQ(DebugOf("(c__main__\nPoint\nI1\nI2\no."s), "__main__.Point.__new__(1, 2)");
  EXPECT_EQ(DebugOf("(i__main__\nPoint\n(dS'x'\nI1\nsb."s),
            "__main__.Point.__new__() state={'x': 1}");
  auto u = U("(c__builtin__\nobject\no(i__builtin__\nint\n\x86."s);
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_TRUE(u->root->items[0]->IsCallOf("builtins", "object"));
  EXPECT_TRUE(u->root->items[1]->Is(Kind::kObject));
  EXPECT_EQ(u->globals, (std::vector<std::pair<std::string, std::string>>{{"builtins", "object"},
                                                                          {"builtins", "int"}}));
}

TEST(PickleHandWritten, GlobalsAreDeduplicatedInOrder) {
  auto u =
      U("\x80\x02"
        "cb\nB\nca\nA\ncb\nB\nca\nZ\n(t."s);
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_EQ(u->globals,
            (std::vector<std::pair<std::string, std::string>>{{"b", "B"}, {"a", "A"}, {"a", "Z"}}));
}

TEST(PickleHandWritten, SeveralPicklesInARow) {
  std::string two = "\x80\x02K\x01.\x80\x02K\x02.trailing"s;
  auto a = U(two);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->consumed, 5u);
  EXPECT_EQ(a->root->integer, 1);
  auto b = U(std::string_view(two).substr(a->consumed));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->consumed, 5u);
  EXPECT_EQ(b->root->integer, 2);
}

// ---- hostile input -------------------------------------------------------------

TEST(PickleHostile, ErrorsNameOpcodeOffsetAndProblem) {
  struct Case {
    std::string data;
    std::string error;
  };
  const std::vector<Case> cases = {
      {"", "t: pickle at offset 0: unexpected end of data before STOP"},
      {"K\x01"s, "t: pickle at offset 2: unexpected end of data before STOP"},
      {"\x85."s, "t: pickle opcode 0x85 at offset 0: stack underflow"},
      {"s."s, "t: pickle opcode 0x73 at offset 0: stack underflow"},
      {"K\x01s."s, "t: pickle opcode 0x73 at offset 2: stack underflow"},
      {"(."s, "t: pickle opcode 0x2e at offset 1: stack underflow"},
      {"K\x01(R."s, "t: pickle opcode 0x52 at offset 3: stack underflow"},
      {"K\x01(K\x02"
       "e."s,
       "t: pickle opcode 0x65 at offset 5: cannot append to int (not a list)"},
      {"(e."s, "t: pickle opcode 0x65 at offset 1: stack underflow"},
      {"1."s, "t: pickle opcode 0x31 at offset 0: no MARK on the stack"},
      {"0."s, "t: pickle opcode 0x30 at offset 0: stack underflow"},
      {"K\x01K\x02"
       "a."s,
       "t: pickle opcode 0x61 at offset 4: cannot append to int (not a list)"},
      {"]K\x01K\x02s."s,
       "t: pickle opcode 0x73 at offset 5: cannot set items on list (not a dict)"},
      {"K\x01(K\x02\x90."s,
       "t: pickle opcode 0x90 at offset 5: cannot add items to int (not a set)"},
      {"(K\x01"
       "d."s,
       "t: pickle opcode 0x64 at offset 3: odd number of items for SETITEMS"},
      {"X\xff\xff\xff\xff"
       "abc"s,
       "t: pickle opcode 0x58 at offset 0: unexpected end of data: 4294967295 bytes needed at "
       "offset 5, 3 left"},
      {"\x8d\xff\xff\xff\xff\xff\xff\xff\x7f"
       "abc"s,
       "unexpected end of data: 9223372036854775807"},
      {"\x8e\xff\xff\xff\xff\xff\xff\xff\xff"s, "unexpected end of data: 18446744073709551615"},
      {"\x96\x00\x00\x00\x00\x00\x00\x00\x01"s, "unexpected end of data"},
      {"T\xff\xff\xff\xff"s, "t: pickle opcode 0x54 at offset 0: negative BINSTRING length"},
      {"\x8b\xff\xff\xff\x7f"s,
       "t: pickle opcode 0x8b at offset 0: LONG4 of 2147483647 bytes exceeds the limit of 65536"},
      {"\x8b\xff\xff\xff\xff"s, "t: pickle opcode 0x8b at offset 0: negative LONG4 length -1"},
      {"h\x05."s, "t: pickle opcode 0x68 at offset 0: memo index 5 is not set"},
      {"j\x00\x00\x01\x00."s, "t: pickle opcode 0x6a at offset 0: memo index 65536 is not set"},
      {"g3\n."s, "t: pickle opcode 0x67 at offset 0: memo index 3 is not set"},
      {"]g-1\n."s, "t: pickle opcode 0x67 at offset 1: invalid memo index '-1'"},
      {"p0\n."s, "t: pickle opcode 0x70 at offset 0: stack underflow"},
      {"\x82\x01."s,
       "t: pickle opcode 0x82 at offset 0: the extension registry (EXT1/EXT2/EXT4) is not "
       "supported"},
      {"\x83\x01\x00."s, "pickle opcode 0x83 at offset 0: the extension registry"},
      {"\x84\x01\x00\x00\x00."s, "pickle opcode 0x84 at offset 0: the extension registry"},
      {"\x80\x05\x97."s,
       "t: pickle opcode 0x97 at offset 2: out-of-band buffers (NEXT_BUFFER/READONLY_BUFFER) are "
       "not supported"},
      {"\x80\x05"
       "C\x01x\x98."s,
       "pickle opcode 0x98 at offset 5: out-of-band buffers"},
      {"\xff"s, "t: pickle opcode 0xff at offset 0: unknown opcode"},
      {"K\x01Z."s, "t: pickle opcode 0x5a at offset 2: unknown opcode"},
      {"\x80\x06."s, "t: pickle opcode 0x80 at offset 0: unsupported pickle protocol 6"},
      {"\x80\x04K\x01K\x02\x93."s,
       "t: pickle opcode 0x93 at offset 6: STACK_GLOBAL needs two str, got int and int"},
      {"S'abc\n."s, "t: pickle opcode 0x53 at offset 0: the STRING argument must be quoted"},
      {"S'\\x4'\n."s, "t: pickle opcode 0x53 at offset 0: invalid escape in STRING argument"},
      {"S'ab\\'\n."s, "invalid escape in STRING argument"},
      {"V\\u12\n."s, "t: pickle opcode 0x56 at offset 0: invalid \\u escape in UNICODE argument"},
      {"V\\U00110000\n."s, "invalid \\u escape in UNICODE argument"},
      {"Iabc\n."s, "t: pickle opcode 0x49 at offset 0: invalid integer 'abc'"},
      {"I\n."s, "t: pickle opcode 0x49 at offset 0: invalid integer ''"},
      {"L0x\n."s, "invalid integer '0x'"},
      {"I" + std::string(5000, '9') + "\n.", "invalid integer"},  // Python's 4300-digit limit
      {"Fxyz\n."s, "t: pickle opcode 0x46 at offset 0: invalid FLOAT 'xyz'"},
      {"I1"s,
       "t: pickle opcode 0x49 at offset 0: unexpected end of data: no end of line after "
       "offset 1"},
      {"\x95\xff\x00\x00\x00\x00\x00\x00\x00N."s,
       "t: pickle opcode 0x95 at offset 0: unexpected end of data: FRAME of 255 bytes at offset "
       "9, 2 left"},
      {"\x80\x02"
       "c_codecs\nencode\nX\x03\x00\x00\x00\xe2\x82\xacX\x06\x00\x00\x00latin1\x86R."s,
       "t: pickle opcode 0x52 at offset 38: cannot encode U+20AC as latin-1"},
      {"\x80\x02"
       "c_codecs\nencode\nX\x01\x00\x00\x00\xffX\x06\x00\x00\x00latin1\x86R."s,
       "cannot encode a str that is not valid UTF-8"},
  };
  for (const auto& c : cases) {
    std::string got = ErrorOf(c.data);
    EXPECT_NE(got.find(c.error), std::string::npos)
        << "input " << ::testing::PrintToString(c.data) << "\n  got: " << got;
  }
}

TEST(PickleHostile, NameOfTheSourceLeadsTheError) {
  auto u = Unpickle("\x85."s, "x.nemo:model_weights.ckpt:data.pkl");
  ASSERT_FALSE(u.ok());
  EXPECT_EQ(u.error().message(),
            "x.nemo:model_weights.ckpt:data.pkl: pickle opcode 0x85 at offset 0: stack underflow");
}

TEST(PickleHostile, MarkDepthLimit) {
  Limits limits;
  limits.max_depth = 50;
  EXPECT_EQ(ErrorOf(std::string(100, '(') + "N.", limits),
            "t: pickle opcode 0x28 at offset 50: MARKs nested deeper than 50");
  EXPECT_EQ(ErrorOf(std::string(50, '(') + "N.", limits), "ok: None");
  EXPECT_NE(ErrorOf(std::string(3000, '(') + "N.").find("MARKs nested deeper than 2000"),
            std::string::npos);
}

TEST(PickleHostile, MemoLimit) {
  Limits limits;
  limits.max_memo = 2;
  EXPECT_EQ(ErrorOf("\x80\x02]q\x00q\x01q\x02."s, limits),
            "t: pickle opcode 0x71 at offset 7: memo exceeds 2 entries");
  EXPECT_EQ(ErrorOf("\x80\x04]\x94\x94\x94."s, limits),
            "t: pickle opcode 0x94 at offset 5: memo exceeds 2 entries");
  // Overwriting an index is not a new entry; sparse indices count too.
  EXPECT_EQ(ErrorOf("]q\x00q\x00q\x00r\xff\xff\xff\xff."s, limits), "ok: []");
  EXPECT_EQ(ErrorOf("]r\xff\xff\xff\xffr\xfe\xff\xff\xffq\x00."s, limits),
            "t: pickle opcode 0x71 at offset 11: memo exceeds 2 entries");
  // A memo flood with the default limit works and stays addressable.
  std::string flood = "\x80\x04]"s;
  for (int i = 0; i < 100000; ++i) flood += "\x94";
  flood += "j\x9f\x86\x01\x00."s;  // LONG_BINGET 99999
  EXPECT_EQ(ErrorOf(flood), "ok: []");
}

TEST(PickleHostile, BytesLimit) {
  Limits limits;
  limits.max_bytes = 10;
  EXPECT_EQ(ErrorOf("X\x0b\x00\x00\x00hello world."s, limits),
            "t: pickle opcode 0x58 at offset 0: str/bytes payloads exceed 10 bytes in total");
  EXPECT_EQ(ErrorOf("X\x05\x00\x00\x00helloC\x05world\x86."s, limits), "ok: ('hello', b'world')");
  EXPECT_EQ(ErrorOf("X\x05\x00\x00\x00helloC\x06worlds\x86."s, limits),
            "t: pickle opcode 0x43 at offset 10: str/bytes payloads exceed 10 bytes in total");
}

TEST(PickleHostile, ValueAndStackLimits) {
  Limits limits;
  limits.max_values = 5;
  EXPECT_EQ(ErrorOf("(K\x01K\x02K\x03K\x04K\x05K\x06l."s, limits),
            "t: pickle opcode 0x4b at offset 11: more than 5 values");
  limits = {};
  limits.max_stack = 4;
  EXPECT_EQ(ErrorOf("K\x01K\x02K\x03K\x04K\x05."s, limits),
            "t: pickle opcode 0x4b at offset 8: stack exceeds 4 entries");
  EXPECT_EQ(ErrorOf("((((N."s, limits),
            "t: pickle opcode 0x4e at offset 4: stack exceeds 4 entries");
  EXPECT_EQ(ErrorOf("K\x01K\x02K\x03K\x04\x87."s, limits), "ok: (2, 3, 4)");
  // dict(d) copies d's entries: repeated copies count against max_values.
  limits = {};
  limits.max_values = 1000;
  std::string copies =
      "(K\x01K\x02K\x03K\x04"
      "d\x94"
      "cbuiltins\ndict\n\x94"s;
  for (int i = 0; i < 100; ++i) copies += "h\x01h\x00\x85R0"s;
  EXPECT_EQ(ErrorOf(copies + "h\x00."s, limits), "ok: {1: 2, 3: 4}");
  for (int i = 0; i < 400; ++i) copies += "h\x01h\x00\x85R0"s;
  EXPECT_NE(ErrorOf(copies + "h\x00."s, limits).find("more than 1000 values"), std::string::npos);
}

TEST(PickleHostile, HugeLong4IsConvertedOrRefused) {
  std::string payload(65536, '\x00');
  payload.back() = '\x01';  // 2**524280
  auto start = std::chrono::steady_clock::now();
  auto u = U("\x8b\x00\x00\x01\x00"s + payload + ".");
  double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_TRUE(u->root->Is(Kind::kBigInt));
  EXPECT_EQ(u->root->str.size(), 157825u);
  EXPECT_EQ(u->root->str.substr(0, 10), "1014207253");  // str(2**524280)[:10]
  RecordProperty("long4_64k_ms", std::to_string(ms));
  EXPECT_NE(ErrorOf("\x8b\x01\x00\x01\x00"s + payload + "x.").find("exceeds the limit of 65536"),
            std::string::npos);
  // One such integer per pickle; a second one would double the work.
  std::string two = "\x8b\x00\x00\x01\x00"s + payload + "\x8b\x00\x00\x01\x00"s + payload + "\x86.";
  EXPECT_NE(ErrorOf(two).find("big integers exceed the conversion budget"), std::string::npos);
}

TEST(PickleHostile, DeepNestingWithoutMarks) {
  // 100,000 nested lists need no MARK; the VM is iterative and ToDebugString
  // stops at its depth limit.
  std::string deep = "\x80\x02"s;
  for (int i = 0; i < 100000; ++i) deep += "]";
  for (int i = 0; i < 99999; ++i) deep += "a";
  deep += ".";
  auto u = U(deep);
  ASSERT_TRUE(u.ok()) << u.error().message();
  std::string s = ToDebugString(u->root);
  EXPECT_EQ(s, std::string(51, '[') + "..." + std::string(51, ']'));
  EXPECT_EQ(ToDebugString(u->root, 2), "[[[...]]]");
  EXPECT_LT(ToDebugString(u->root, SIZE_MAX).size(), 10000u);
}

TEST(PickleHostile, SharedSubtreesDoNotExplodeTheRendering) {
  // x = []; 60 times x = (x, x): 2**60 paths through a 62-value graph.
  std::string dag = "]"s;
  for (int i = 0; i < 60; ++i) dag += "2\x86";
  dag += ".";
  auto u = U(dag);
  ASSERT_TRUE(u.ok()) << u.error().message();
  auto start = std::chrono::steady_clock::now();
  std::string s = ToDebugString(u->root);
  double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LE(s.size(), (4u << 20) + 1000);
  EXPECT_EQ(s.substr(s.size() - 3), "...");
  EXPECT_LT(ms, 5000);
}

TEST(PickleHostile, CycleThroughBuildState) {
  auto u =
      U("]q\x00h\x00"
        "b."s);  // l.state = l
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_EQ(u->root->state, u->root);
  EXPECT_EQ(ToDebugString(u->root), "[] state=...");
}

// ---- real checkpoints ----------------------------------------------------------

std::string ZipMember(const std::string& zip, const std::string& member) {
  auto r =
      Sh("/usr/bin/python3 -c 'import zipfile,sys; "
         "sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' " +
         ShellQuote(zip) + " " + ShellQuote(member));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

void ExpectRebuildTensorV2(const Value* t, const std::string& storage_class) {
  ASSERT_TRUE(t->Is(Kind::kCall)) << ToDebugString(t);
  EXPECT_TRUE(t->IsCallOf("torch._utils", "_rebuild_tensor_v2"));
  ASSERT_TRUE(t->args && t->args->Is(Kind::kTuple));
  ASSERT_GE(t->args->items.size(), 6u);
  const Value* pid = t->args->items[0];
  ASSERT_TRUE(pid->Is(Kind::kPersistentId));
  ASSERT_TRUE(pid->args->Is(Kind::kTuple));
  const auto& id = pid->args->items;
  ASSERT_GE(id.size(), 5u);
  EXPECT_TRUE(id[0]->Is(Kind::kString) && id[0]->str == "storage");
  EXPECT_TRUE(id[1]->IsGlobal("torch", storage_class)) << ToDebugString(id[1]);
  EXPECT_TRUE(id[2]->Is(Kind::kString));
  EXPECT_TRUE(id[3]->Is(Kind::kString));
  EXPECT_TRUE(id[4]->Is(Kind::kInt) && id[4]->integer > 0);
  EXPECT_TRUE(t->args->items[1]->Is(Kind::kInt));
  EXPECT_TRUE(t->args->items[2]->Is(Kind::kTuple));
  EXPECT_TRUE(t->args->items[3]->Is(Kind::kTuple));
  EXPECT_TRUE(t->args->items[4]->Is(Kind::kBool));
  EXPECT_TRUE(t->args->items[5]->Is(Kind::kDict));
}

TEST(PickleReal, TinyGptNemoWeights) {
  TempDir dir;
  std::string pkl = dir.Join("data.pkl");
  auto r = Sh("tar -xOf " + ShellQuote(TestData("tiny_gpt.nemo")) + " ./model_weights.ckpt > " +
              ShellQuote(dir.Join("w.ckpt")) +
              " && /usr/bin/python3 -c 'import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); "
              "sys.stdout.buffer.write(z.read(\"model_weights/data.pkl\"))' " +
              ShellQuote(dir.Join("w.ckpt")) + " > " + ShellQuote(pkl));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string data = ReadFile(pkl);
  auto u = Unpickle(data, "tiny_gpt.nemo:model_weights.ckpt:data.pkl");
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_EQ(u->consumed, data.size());
  const Value* root = u->root;
  ASSERT_TRUE(root->Is(Kind::kDict));
  ASSERT_TRUE(root->state && root->state->Is(Kind::kDict));
  ASSERT_TRUE(root->state->Get("_metadata"));
  EXPECT_TRUE(root->state->Get("_metadata")->Is(Kind::kDict));
  EXPECT_GE(root->entries.size(), 10u);
  std::set<std::string> keys;
  for (const auto& [k, v] : root->entries) {
    ASSERT_TRUE(k->Is(Kind::kString));
    ASSERT_NO_FATAL_FAILURE(ExpectRebuildTensorV2(v, "BFloat16Storage"));
    keys.insert(v->args->items[0]->args->items[2]->str);
    EXPECT_EQ(v->args->items[0]->args->items[3]->str, "cpu");
  }
  EXPECT_EQ(keys.size(), root->entries.size());  // one storage per tensor, keys '0', '1', ...
  EXPECT_TRUE(keys.count("0"));
  const Value* emb = root->Get("model.embedding.word_embeddings.weight");
  ASSERT_TRUE(emb);
  EXPECT_EQ(ToDebugString(emb->args->items[2]), "(128, 64)");
  EXPECT_EQ(emb->args->items[0]->args->items[4]->integer, 128 * 64);

  auto want = RunOracle({{pkl, 1}});
  ASSERT_EQ(want.size(), 1u);
  ExpectMatchesOracle(data, 0, want[0], "tiny_gpt data.pkl");
  ExpectEveryPrefixIsTruncated(data, "tiny_gpt data.pkl");
}

TEST(PickleReal, LegacyTorchSaveStream) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  std::string path = RealFixture("legacy-torch-save/JasperDecoderForCTC-STEP-243800.pt");
  std::string data = ReadFile(path);
  std::vector<Unpickled> parts;
  size_t offset = 0;
  for (int i = 0; i < 5; ++i) {
    auto u = Unpickle(std::string_view(data).substr(offset), path);
    ASSERT_TRUE(u.ok()) << u.error().message();
    offset += u->consumed;
    parts.push_back(std::move(*u));
  }
  EXPECT_EQ(offset, 621u);
  EXPECT_EQ(ToDebugString(parts[0].root), "119547037146038801333356");  // 0x1950a86a20f9469cfc6c
  EXPECT_EQ(parts[1].root->integer, 1001);
  EXPECT_EQ(parts[2].root->Get("protocol_version")->integer, 1001);
  EXPECT_TRUE(parts[2].root->Get("little_endian")->boolean);
  const Value* sd = parts[3].root;
  ASSERT_TRUE(sd->Is(Kind::kDict));
  ASSERT_EQ(sd->entries.size(), 2u);
  std::set<std::string> ids;
  for (const auto& [k, v] : sd->entries) {
    ASSERT_NO_FATAL_FAILURE(ExpectRebuildTensorV2(v, "FloatStorage"));
    const auto& id = v->args->items[0]->args->items;
    ASSERT_EQ(id.size(), 6u);  // legacy ids carry view metadata
    EXPECT_TRUE(id[5]->Is(Kind::kNone));
    ids.insert(id[2]->str);
  }
  const Value* keys = parts[4].root;
  ASSERT_TRUE(keys->Is(Kind::kList));
  std::set<std::string> listed;
  for (const Value* k : keys->items) listed.insert(k->str);
  EXPECT_EQ(listed, ids);

  auto want = RunOracle({{path, 5}});
  ASSERT_EQ(want.size(), 5u);
  offset = 0;
  for (int i = 0; i < 5; ++i) {
    ExpectMatchesOracle(data, offset, want[i], "pickle " + std::to_string(i));
    offset = want[i].consumed;
  }
}

class PickleRealDcp : public ::testing::TestWithParam<std::string> {};

TEST_P(PickleRealDcp, MetadataUnpicklesLikePython) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  std::string path = RealFixture(GetParam() + "/.metadata");
  std::string data = ReadFile(path);
  auto u = Unpickle(data, path);
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_EQ(u->consumed, data.size());
  const Value* root = u->root;
  ASSERT_TRUE(root->Is(Kind::kObject));
  EXPECT_TRUE(root->IsCallOf("torch.distributed.checkpoint.metadata", "Metadata"));
  ASSERT_TRUE(root->state && root->state->Is(Kind::kDict));
  const Value* sdm = root->state->Get("state_dict_metadata");
  ASSERT_TRUE(sdm && sdm->Is(Kind::kDict));
  EXPECT_GT(sdm->entries.size(), 5u);
  const Value* storage = root->state->Get("storage_data");
  ASSERT_TRUE(storage && storage->Is(Kind::kDict));
  for (const auto& [index, info] : storage->entries) {
    ASSERT_TRUE(index->IsCallOf("torch.distributed.checkpoint.metadata", "MetadataIndex"));
    ASSERT_TRUE(info->IsCallOf("torch.distributed.checkpoint.filesystem", "_StorageInfo"));
    EXPECT_TRUE(info->state->Get("offset")->Is(Kind::kInt));
  }
  RecordProperty("root", ToDebugString(root).substr(0, 300));

  auto want = RunOracle({{path, 1}});
  ASSERT_EQ(want.size(), 1u);
  ExpectMatchesOracle(data, 0, want[0], path);
  ExpectEveryPrefixIsTruncated(data, path);

  double best = 1e9;
  for (int i = 0; i < 10; ++i) {
    auto start = std::chrono::steady_clock::now();
    auto again = Unpickle(data, path);
    best = std::min(
        best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                  .count());
    ASSERT_TRUE(again.ok());
  }
  RecordProperty("unpickle_ms", std::to_string(best));
  std::printf("%s: %zu bytes unpickled in %.3f ms\n", GetParam().c_str(), data.size(), best);
  EXPECT_LT(best, 250.0);
}

TEST_P(PickleRealDcp, CommonPtUnpicklesLikePython) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  TempDir dir;
  std::string pkl = dir.Join("data.pkl");
  WriteFile(pkl, ZipMember(RealFixture(GetParam() + "/common.pt"), "common/data.pkl"));
  std::string data = ReadFile(pkl);
  auto u = Unpickle(data, "common.pt");
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_TRUE(u->root->Is(Kind::kDict));
  EXPECT_EQ(u->consumed, data.size());
  auto want = RunOracle({{pkl, 1}});
  ASSERT_EQ(want.size(), 1u);
  ExpectMatchesOracle(data, 0, want[0], "common.pt");
  ExpectEveryPrefixIsTruncated(data, "common.pt");
}

INSTANTIATE_TEST_SUITE_P(
    PickleReal, PickleRealDcp,
    ::testing::Values("nemo2-dcp-metadata-only/esm2_model_checkpoint/weights",
                      "megatron-torch_dist-metadata-only/deepseek_mtp_dummy_ckpt/checkpoints/"
                      "iter_0000001"));

}  // namespace
}  // namespace nemofs::torch
