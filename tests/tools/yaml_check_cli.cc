// Test-only: runs the config validator the mount uses (ValidateConfigYaml)
// over files, for the differential test against OmegaConf.load
// (tests/yaml_corpus.py). Not installed.
//
//   yaml_check_cli FILE...     one line per file: "OK<TAB>FILE" or
//   yaml_check_cli -           "EINVAL<TAB>FILE<TAB>message"; with "-",
//                              the file names are read from stdin, one a line.
// Exit status: 0 all accepted, 1 some refused, 2 a file could not be read.
#include <cerrno>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "write/yaml_check.h"

namespace {

int Check(const std::string& path, bool* refused) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::cerr << "yaml_check_cli: cannot read " << path << "\n";
    return 2;
  }
  std::ostringstream buf;
  buf << in.rdbuf();
  auto st = nemofs::write::ValidateConfigYaml(buf.str(), path);
  if (st.ok()) {
    std::cout << "OK\t" << path << "\n";
    return 0;
  }
  *refused = true;
  std::string msg = st.error().message();
  for (char& c : msg) {
    if (c == '\n' || c == '\t') c = ' ';
  }
  std::cout << (st.error().code() == EINVAL ? "EINVAL"
                                            : "ERRNO" + std::to_string(st.error().code()))
            << "\t" << path << "\t" << msg << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-") {
      std::string line;
      while (std::getline(std::cin, line)) {
        if (!line.empty()) files.push_back(line);
      }
    } else {
      files.push_back(a);
    }
  }
  if (files.empty()) {
    std::cerr << "usage: yaml_check_cli FILE... | yaml_check_cli - (file names on stdin)\n";
    return 2;
  }
  bool refused = false;
  for (const auto& f : files) {
    if (Check(f, &refused) != 0) return 2;
  }
  std::cout.flush();
  return refused ? 1 : 0;
}
