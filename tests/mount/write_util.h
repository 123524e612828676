// What the write tests (write_test.cc, write_safety_test.cc) share: the
// kinds of source a config can be saved into, private copies of them, and
// the ways to read a config back.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "test_util.h"

namespace nemofs::testing {

// For texts too big for gtest's diff (it is quadratic): equal, else sizes
// and the first difference.
::testing::AssertionResult SameText(const std::string& actual, const std::string& expected);

struct SourceKind {
  std::string name;
  std::string data;      // tests/data/<data>
  std::string member;    // the config as stored: tar member or folder-relative path
  bool tar = false;
  bool extract = false;  // a folder made by extracting the .nemo `data`
};

// plain_tar, gnu_tar, gzip_tar, nemo2_folder, extracted_nemo_folder.
const std::vector<SourceKind>& Kinds();
const SourceKind& Kind(const std::string& name);
std::vector<std::string> KindNames();

// One source per way of saving (append, rewrite, folder replace), and the
// test-name printer for parameters that are kind names.
const std::vector<std::string>& OneKindPerCommit();
std::string KindParamName(const ::testing::TestParamInfo<std::string>& info);

// A private copy of the source kind in `dir` (never the committed fixture),
// or at `path`.
std::string MakeSource(const SourceKind& kind, const TempDir& dir);
std::string MakeSourceAt(const SourceKind& kind, const std::string& path);

// The config as a fresh `nemofs cat` sees it.
std::string CatConfig(const std::string& source);

// The config as the format's own readers see it: Python tarfile and GNU
// tar -x for archives (both must agree), the file itself for folders.
std::string StoredConfig(const SourceKind& kind, const std::string& source);

// The names the source holds, sorted: `tar -tf` (GNU tar, the oracle)
// without "./", once each; a folder's paths.
std::string Members(const SourceKind& kind, const std::string& src);

// The content of member `name` as the format's own tool extracts it (GNU
// tar -x: the last copy wins), or the folder's file.
std::string Extracted(const SourceKind& kind, const std::string& src, const std::string& name);

// sha256 of the source file, or of every file of a source folder.
std::string SourceDigest(const std::string& source);

}  // namespace nemofs::testing
