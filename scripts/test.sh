#!/usr/bin/env bash
# Installs dependencies (Debian packages), builds, and runs the whole test
# suite: unit tests, then real FUSE mount tests; then the same suite again in
# an AddressSanitizer + UndefinedBehaviorSanitizer build.
# NEMOFS_SKIP_SANITIZE=1 skips the sanitizer pass (for quick local runs).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== build (RelWithDebInfo)"
scripts/build.sh build
echo "== tests"
ctest --test-dir build --output-on-failure --timeout 600 -j2

if [[ "${NEMOFS_SKIP_SANITIZE:-0}" != 1 ]]; then
  echo "== build (ASan + UBSan)"
  NEMOFS_SANITIZE=1 scripts/build.sh build-asan
  echo "== tests (ASan + UBSan)"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure --timeout 900 -j2
fi
