#!/usr/bin/env bash
# Test Docs.ReadmePaths: the README does not point at things that are not there.
#  1. Every repository path it names (scripts/..., tests/..., packaging/...,
#     src/..., include/..., mount/..., and relative Markdown links) exists.
#     A Markdown file it names (FORMATS.md, tests/data/README.md) is in the
#     repository.
#  2. Every package of its dependency table is installed by scripts/setup.sh,
#     and every package scripts/setup.sh installs has a row.
#  3. Every find_package / pkg_check_modules of the CMakeLists.txt files has a
#     row: the package is found by asking dpkg which package owns the file
#     CMake found (from BUILD_DIR/CMakeCache.txt), and the row must name that
#     package or one that depends on it (pkg-config -> pkgconf).
# Usage: check_readme_paths.sh SOURCE_DIR BUILD_DIR
set -uo pipefail
src=$(cd "$1" && pwd)
build=$(cd "$2" && pwd)
readme="$src/README.md"
cache="$build/CMakeCache.txt"
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# ---- 1. paths ----------------------------------------------------------------
paths=$(
  {
    # A path starts a word (not inside build-fuzz/tests/... or /mnt/...).
    grep -oE '(^|[^A-Za-z0-9_./-])(scripts|tests|packaging|src|include|mount)/[A-Za-z0-9_./*-]*' "$readme" |
      sed -E 's/^[^a-z]//'
    # Relative Markdown links: [text](path), not #anchors or URLs.
    grep -oE '\]\([^)#][^)]*\)' "$readme" | sed -E 's/^\]\((.*)\)$/\1/' | grep -vE '^[a-z]+:'
  } | sed -E 's/[.,:;]+$//' | sort -u
)
n=0
for p in $paths; do
  n=$((n + 1))
  # A pattern such as tests/unit/*_test.cc must match something.
  if ! compgen -G "$src/$p" >/dev/null; then fail "README names $p, which does not exist"; fi
done
echo "checked $n paths named by README.md"
((n >= 10)) || fail "found only $n paths in README.md: the extraction is broken"

# A Markdown file named bare (`FORMATS.md §4`) must be one the repository has:
# a user cannot follow a pointer to design notes kept outside it.
md=$(grep -oE '(^|[^A-Za-z0-9_./-])[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b' "$readme" |
  sed -E 's/^[^A-Za-z0-9_.]//' | sort -u)
nmd=0
for p in $md; do
  nmd=$((nmd + 1))
  if [[ $p == */* ]]; then
    [[ -e $src/$p ]] || fail "README names $p, which is not in the repository"
  else
    # A bare name is any file of that name in the repository.
    [[ -n $(cd "$src" && git ls-files -- "$p" "*/$p" 2>/dev/null | head -n1) || -e $src/$p ]] ||
      fail "README names $p, which is not in the repository"
  fi
done
echo "checked $nmd Markdown file names in README.md"
((nmd >= 1)) || fail "found no *.md name in README.md: the extraction is broken"

# ---- 2. dependency table ⊆ setup.sh ---------------------------------------------
table=$(awk '/^## Dependencies/ { on = 1; next } on && /^## / { on = 0 } on && /^\| `/' "$readme" |
  cut -d'|' -f2 | grep -oE '`[^`]+`' | tr -d '`' | sort -u)
[[ $(wc -w <<<"$table") -ge 10 ]] || fail "dependency table not found or too small: '$table'"
setup_packages=$(sed -n '/^PACKAGES=(/,/^)/p' "$src/scripts/setup.sh" | sed -e 's/#.*//' -e '1d;$d' |
  tr -s ' \t' '\n' | grep -v '^$' | sort -u)
[[ $(wc -w <<<"$setup_packages") -ge 10 ]] || fail "PACKAGES=( ... ) not found in scripts/setup.sh"
for p in $table; do
  grep -qx -- "$p" <<<"$setup_packages" || fail "README dependency table lists $p; scripts/setup.sh does not install it"
done
echo "checked $(wc -w <<<"$table") packages of the dependency table against scripts/setup.sh"

# ---- 2b. setup.sh ⊆ dependency table ---------------------------------------------
for p in $setup_packages; do
  grep -qx -- "$p" <<<"$table" || fail "scripts/setup.sh installs $p; the README dependency table has no row naming it"
done
echo "checked $(wc -w <<<"$setup_packages") packages of scripts/setup.sh against the dependency table"

# ---- 3. CMake dependencies ⊆ dependency table --------------------------------------
cache_get() { sed -n "s/^$1:[A-Z]*=//p" "$cache" | head -n1; }
owner() { dpkg -S "$1" 2>/dev/null | head -n1 | cut -d: -f1 || true; }
# The file CMake used for a dependency.
file_of_find_package() {
  local name=$1 v dir
  case $name in
    PkgConfig) cache_get PKG_CONFIG_EXECUTABLE; return ;;
    Threads) echo /usr/include/pthread.h; return ;;  # POSIX threads: the C library's
  esac
  dir=$(cache_get "${name}_DIR")
  if [[ -n $dir && $dir != *NOTFOUND ]]; then
    ls "$dir"/*[Cc]onfig.cmake 2>/dev/null | head -n1
    return
  fi
  for v in LIBRARY LIBRARY_RELEASE EXECUTABLE; do
    v=$(cache_get "${name}_$v")
    if [[ -n $v && $v != *NOTFOUND ]]; then echo "$v"; return; fi
  done
}
file_of_pkg_module() { echo "$(pkg-config --variable=pcfiledir "$1" 2>/dev/null)/$1.pc"; }

calls=$(cd "$src" && grep -rhoE --include=CMakeLists.txt --exclude-dir='build*' \
  '^\s*(find_package|pkg_check_modules)\([^)]*\)' . | sed -E 's/^\s+//')
ncalls=0
while read -r call; do
  [[ -z $call ]] && continue
  ncalls=$((ncalls + 1))
  args=$(sed -E 's/^[a-z_]+\((.*)\)$/\1/' <<<"$call")
  if [[ $call == find_package* ]]; then
    f=$(file_of_find_package "$(awk '{print $1}' <<<"$args")")
  else
    # pkg_check_modules(PREFIX [REQUIRED|QUIET|IMPORTED_TARGET...] module...)
    module=$(tr ' ' '\n' <<<"$args" | tail -n +2 | grep -vE '^[A-Z_]+$' | head -n1)
    f=$(file_of_pkg_module "$module")
  fi
  pkg=""
  [[ -n $f && -e $f ]] && pkg=$(owner "$f")
  [[ -z $pkg && -n $f && -e $f ]] && pkg=$(owner "$(realpath "$f")")
  if [[ -z $pkg ]]; then fail "$call: cannot tell which Debian package provides it (file '$f')"; continue; fi
  ok=0
  if grep -qx -- "$pkg" <<<"$table"; then ok=1; else
    for t in $table; do
      if dpkg-query -W -f='${Depends},${Pre-Depends}\n' "$t" 2>/dev/null | tr ',|' '\n\n' |
          sed -E 's/^ *//; s/[ :].*//' | grep -qx -- "$pkg"; then ok=1; break; fi
    done
  fi
  if ((ok)); then echo "ok: $call -> $pkg"; else
    fail "$call needs $pkg ($f); the README dependency table has no row naming it"; fi
done <<<"$calls"
((ncalls >= 5)) || fail "found only $ncalls find_package/pkg_check_modules calls: the extraction is broken"

if ((failures)); then echo "$failures check(s) failed"; exit 1; fi
echo "README paths and dependency table are consistent"
