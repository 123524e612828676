#!/usr/bin/env bash
# Installs every Debian package that building nemofs, its tests, its fixture
# generators and its benchmarks need. Idempotent; Debian's archive only.
set -euo pipefail

PACKAGES=(
  # build
  build-essential cmake pkg-config git
  libfuse3-dev fuse3
  libarchive-dev liblzma-dev liblz4-dev libbz2-dev libzstd-dev zlib1g-dev
  libyaml-cpp-dev libyaml-dev libspdlog-dev libfmt-dev
  nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev
  # packaging: the .deb test inspects what CPack builds and renders its man page
  dpkg-dev file man-db groff-base
  # tests: real tools driven against real mounts
  attr coreutils tar gzip xz-utils zstd bzip2 xxd procps psmisc util-linux vim-tiny nano
  # fixture generators and cross-checks (run with /usr/bin/python3)
  python3 python3-numpy python3-torch python3-zarr python3-omegaconf python3-yaml
  # benchmarks
  fio time strace
)

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all ${#PACKAGES[@]} packages already installed"
fi
