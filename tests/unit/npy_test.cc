// checkpoint/npy: headers numpy writes (every dtype of the tree, C and
// Fortran order, both byte orders, format 1.0 and 2.0) parsed, their data
// converted to what numpy's ascontiguousarray(...).astype('<...') gives,
// and our headers loaded by np.load. numpy is the oracle.
#include "checkpoint/npy.h"

#include <gtest/gtest.h>

#include <string>

#include "test_util.h"

namespace nemofs::checkpoint {
namespace {

using nemofs::testing::ReadFile;
using nemofs::testing::ShellQuote;
using nemofs::testing::Sh;
using nemofs::testing::TempDir;

struct Case {
  const char* expr;  // numpy expression of the array
  torch::DType dtype;
  bool big = false;
  bool fortran = false;
  int version = 1;  // of the .npy format
};

TEST(Npy, HeadersNumpyWritesParseAndConvertToCOrderLittleEndian) {
  const Case cases[] = {
      {"np.arange(12, dtype='<f4').reshape(3, 4)", torch::DType::kFloat32},
      {"np.arange(12, dtype='>f8').reshape(3, 4)", torch::DType::kFloat64, true},
      {"np.asfortranarray(np.arange(24, dtype='<i2').reshape(2, 3, 4))", torch::DType::kInt16,
       false, true},
      {"np.asfortranarray(np.arange(24, dtype='>i8').reshape(4, 3, 2))", torch::DType::kInt64,
       true, true},
      {"np.array([True, False, True])", torch::DType::kBool},
      {"np.arange(6, dtype='u1')", torch::DType::kUInt8},
      {"np.arange(6, dtype='i1') - 3", torch::DType::kInt8},
      {"np.arange(6, dtype='<f2').reshape(2, 3)", torch::DType::kFloat16},
      {"(np.arange(6) * (1 + 2j)).astype('>c8')", torch::DType::kComplex64, true},
      {"(np.arange(4) * (1 - 1j)).astype('<c16')", torch::DType::kComplex128},
      {"np.arange(5, dtype='<u2')", torch::DType::kUInt16},
      {"np.zeros((0, 3), dtype='<f4')", torch::DType::kFloat32},
      {"np.float32(2.5)", torch::DType::kFloat32},
      // Format 2.0 (a 4-byte header length), as numpy writes it when asked.
      {"np.arange(7, dtype='<f4')", torch::DType::kFloat32, false, false, 2},
  };
  TempDir dir;
  for (const Case& c : cases) {
    const std::string npy = dir.Join("a.npy"), want = dir.Join("a.raw");
    auto r = Sh("/usr/bin/python3 -c " +
                ShellQuote(std::string("import numpy as np\na = ") + c.expr +
                           "\nnp.lib.format.write_array(open('" + npy + "', 'wb'), a, version=(" +
                           std::to_string(c.version) + ", 0))\n"
                           "open('" + want + "', 'wb').write(np.ascontiguousarray(a).astype("
                           "a.dtype.newbyteorder('<')).tobytes())\n"));
    ASSERT_EQ(r.exit_code, 0) << c.expr << ": " << r.err;
    const std::string file = ReadFile(npy);
    auto h = ParseNpyHeader(file, "a.npy");
    ASSERT_TRUE(h.ok()) << c.expr << ": " << h.error().message();
    EXPECT_EQ(h->dtype, c.dtype) << c.expr;
    EXPECT_EQ(h->big_endian, c.big) << c.expr;
    EXPECT_EQ(h->fortran_order, c.fortran) << c.expr;
    ASSERT_EQ(file.size(), h->data_offset + h->nbytes()) << c.expr;
    EXPECT_EQ(ToCOrderLittleEndian(*h, std::string_view(file).substr(h->data_offset)),
              ReadFile(want))
        << c.expr;
    // Window by window (5 elements at a time), the same bytes.
    std::string windows;
    const std::string_view data = std::string_view(file).substr(h->data_offset);
    for (uint64_t e = 0; e < h->numel(); e += 5) windows += ToCOrderLittleEndianRange(*h, data, e, 5);
    EXPECT_EQ(windows, ReadFile(want)) << c.expr;
    // Our own header for the same array: np.load gives it back.
    auto ours = MakeNpyHeader(h->dtype, h->shape);
    ASSERT_TRUE(ours.ok()) << ours.error().message();
    EXPECT_EQ(ours->size() % 64, 0u);
    nemofs::testing::WriteFile(dir.Join("b.npy"), *ours + ReadFile(want));
    auto back = Sh("/usr/bin/python3 -c " +
                   ShellQuote("import numpy as np\na = " + std::string(c.expr) +
                              "\nb = np.load('" + dir.Join("b.npy") +
                              "')\nassert b.shape == a.shape and b.dtype.kind == a.dtype.kind and "
                              "(b == a).all(), (b, a)\n"));
    EXPECT_EQ(back.exit_code, 0) << c.expr << ": " << back.err;
  }
}

TEST(Npy, BadHeadersAreEinvalNamingTheFile) {
  const std::string good = std::string("\x93NUMPY\x01\x00", 8) + std::string(1, 't') +
                           std::string(1, '\0');
  for (std::string bad : {std::string("PK\x03\x04 not npy"), std::string("\x93NUMPY\x09\x00", 8),
                          good,  // announces 116 header bytes it lacks
                          std::string("\x93NUMPY\x01\x00\x10\x00{'descr': 5}    ", 26)}) {
    auto h = ParseNpyHeader(bad, "x.npy");
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(h.error().code(), EINVAL);
    EXPECT_NE(h.error().message().find("x.npy"), std::string::npos) << h.error().message();
  }
  // A structured dtype and an object array are no tensors.
  TempDir dir;
  for (const char* expr : {"np.zeros(2, dtype=[('a', '<f4')])", "np.array([1, 'x'], dtype=object)",
                           "np.zeros(3, dtype='<M8[s]')"}) {
    const std::string npy = dir.Join("s.npy");
    ASSERT_EQ(Sh("/usr/bin/python3 -c " +
                 ShellQuote(std::string("import numpy as np\nnp.save('") + npy + "', " + expr +
                            ", allow_pickle=True)\n"))
                  .exit_code,
              0);
    auto h = ParseNpyHeader(ReadFile(npy), "s.npy");
    EXPECT_FALSE(h.ok()) << expr;
  }
}

TEST(Npy, ShapeText) {
  EXPECT_EQ(*ParseShapeText("[4096, 1024]"), (std::vector<int64_t>{4096, 1024}));
  EXPECT_EQ(*ParseShapeText("32064,4096"), (std::vector<int64_t>{32064, 4096}));
  EXPECT_EQ(*ParseShapeText("(5,)"), (std::vector<int64_t>{5}));
  EXPECT_EQ(*ParseShapeText("[]"), (std::vector<int64_t>{}));
  for (const char* bad : {"[-1, 3]", "3x4", "[1e9]", "99999999999999999999", "[4294967296,4294967296]"}) {
    EXPECT_FALSE(ParseShapeText(bad).ok()) << bad;
  }
  EXPECT_EQ(ShapeString({2, 3}), "[2, 3]");
}

}  // namespace
}  // namespace nemofs::checkpoint
