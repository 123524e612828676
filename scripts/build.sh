#!/usr/bin/env bash
# Configures and builds nemofs. Usage: scripts/build.sh [BUILD_DIR] [extra cmake args...]
# NEMOFS_SANITIZE=1 builds with AddressSanitizer + UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build}
shift || true
sanitize=OFF
if [[ "${NEMOFS_SANITIZE:-0}" == 1 ]]; then sanitize=ON; fi
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNEMOFS_SANITIZE="$sanitize" "$@" >/dev/null
cmake --build "$build_dir" -j"$(nproc)"
