#include <archive.h>
#include <spdlog/version.h>
#include <zstd.h>

#include <nlohmann/json.hpp>

#include "nemofs/filesystem.h"

namespace nemofs {

std::string CoreLibraryVersions() {
  return fmt::format(
      "{}\nspdlog {}.{}.{}\nfmt {}.{}.{}\nyaml-cpp {}\nzstd {}\nnlohmann-json {}.{}.{}",
      archive_version_details(), SPDLOG_VER_MAJOR, SPDLOG_VER_MINOR, SPDLOG_VER_PATCH,
      FMT_VERSION / 10000, FMT_VERSION / 100 % 100, FMT_VERSION % 100,
      NEMOFS_YAMLCPP_VERSION[0] ? NEMOFS_YAMLCPP_VERSION : "(version unknown)",
      ZSTD_versionString(), NLOHMANN_JSON_VERSION_MAJOR, NLOHMANN_JSON_VERSION_MINOR,
      NLOHMANN_JSON_VERSION_PATCH);
}

}  // namespace nemofs
