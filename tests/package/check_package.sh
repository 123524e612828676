#!/usr/bin/env bash
# Test Package.Deb: builds the .deb with CPack into a temporary folder (nothing
# is written into the source or build tree) and checks what a user gets from
# `apt install ./nemofs_*.deb`: the files, the Depends line, a man page that
# renders without warnings and documents every option of every command, a bash
# completion that completes every command and option, and a binary that runs.
# Usage: check_package.sh BUILD_DIR NEMOFS_BINARY
set -uo pipefail
build_dir=$(cd "$1" && pwd)
built_nemofs=$2

tmp=$(mktemp -d /tmp/nemofs-package-test.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
pass() { echo "ok: $*"; }

# ---- the package ------------------------------------------------------------
if ! (cd "$tmp" && cpack -G DEB -B "$tmp/out" --config "$build_dir/CPackConfig.cmake") \
    >"$tmp/cpack.log" 2>&1; then
  cat "$tmp/cpack.log"
  echo "FAIL: cpack -G DEB failed"
  exit 1
fi
version=$("$built_nemofs" --version | sed -n '1s/^nemofs //p')
arch=$(dpkg --print-architecture)
deb="$tmp/out/nemofs_${version}_${arch}.deb"
if [[ -f $deb ]]; then pass "cpack made $(basename "$deb")"; else
  fail "no $(basename "$deb") in the output folder: $(ls "$tmp/out")"
  exit 1
fi

contents=$(dpkg-deb -c "$deb") || fail "dpkg-deb -c failed"
for f in ./usr/bin/nemofs ./usr/share/man/man1/nemofs.1.gz \
         ./usr/share/bash-completion/completions/nemofs; do
  if grep -qE "[[:space:]]${f//./\\.}\$" <<<"$contents"; then pass "package holds $f"; else
    fail "package lacks $f"; fi
done
if grep -qE '^-rwxr-xr-x root/root .* \./usr/bin/nemofs$' <<<"$contents"; then
  pass "usr/bin/nemofs is root-owned 0755"; else fail "usr/bin/nemofs mode/owner: $contents"; fi

depends=$(dpkg-deb -f "$deb" Depends)
echo "Depends: $depends"
for p in libfuse3-3 fuse3; do
  if grep -qE "(^|, )$p( |,|$)" <<<"$depends"; then pass "Depends names $p"; else
    fail "Depends lacks $p"; fi
done
[[ $(dpkg-deb -f "$deb" Package) == nemofs ]] || fail "Package is not nemofs"
[[ $(dpkg-deb -f "$deb" Version) == "$version" ]] || fail "Version is not $version"
[[ -n $(dpkg-deb -f "$deb" Description) ]] || fail "no Description"
[[ -n $(dpkg-deb -f "$deb" Maintainer) ]] || fail "no Maintainer"

# ---- the extracted binary -----------------------------------------------------
root="$tmp/root"
dpkg -x "$deb" "$root" || fail "dpkg -x failed"
nemofs="$root/usr/bin/nemofs"
if out=$("$nemofs" --version 2>&1) && [[ $(head -n1 <<<"$out") == "nemofs $version" ]]; then
  pass "extracted nemofs --version says nemofs $version"
else
  fail "extracted nemofs --version: $out"
fi
commands=$("$nemofs" --help | sed -n '/^Subcommands:/,/^$/s/^  \([a-z]\+\) .*/\1/p')
if [[ $(wc -w <<<"$commands") -ge 7 ]]; then pass "commands: $(echo $commands)"; else
  fail "could not read the commands from --help: '$commands'"; fi
if [[ "$("$nemofs" --help)" == "$("$built_nemofs" --help)" ]]; then
  pass "extracted --help equals the build's"; else fail "extracted --help differs from the build's"; fi
# Writes are supported (config.yaml, new files): no help text may still call
# nemofs a read-only filesystem.
for c in "" $commands; do
  if "$nemofs" $c --help | grep -qiE 'read-only (file ?system|fs)'; then
    fail "nemofs $c --help still says read-only filesystem"; fi
done
# The long and short options of a command, as its --help lists them.
options_of() {
  "$nemofs" "$@" --help | sed -n '/^Options:/,/^$/p' | grep -oE '^  -[^ ]+' |
    tr ',' '\n' | tr -d ' ' | grep -vE '^-h$|^--help$'
}

# ---- the man page -------------------------------------------------------------
man_src="$tmp/nemofs.1"
zcat "$root/usr/share/man/man1/nemofs.1.gz" >"$man_src" || fail "man page is not gzip"
LC_ALL=C.UTF-8 MANWIDTH=80 MANPAGER=cat PAGER=cat man --warnings -E UTF-8 -l "$man_src" \
  >"$tmp/man.txt" 2>"$tmp/man.err"
rc=$?
if ((rc == 0)) && [[ ! -s $tmp/man.err ]]; then pass "man -l renders without warnings"; else
  fail "man -l (exit $rc) warned:"; cat "$tmp/man.err"; fi
# groff's own check, all warnings on, in case man-db filtered any.
if groff -man -Tutf8 -ww -z "$man_src" 2>"$tmp/groff.err" && [[ ! -s $tmp/groff.err ]]; then
  pass "groff -ww is silent"; else fail "groff -ww:"; cat "$tmp/groff.err"; fi
for section in NAME SYNOPSIS DESCRIPTION COMMANDS OPTIONS FILES EXAMPLES "EXIT STATUS" "SEE ALSO"; do
  grep -qx "$section" "$tmp/man.txt" || fail "man page lacks section $section"
done
if grep -q "^nemofs $version " "$tmp/man.txt"; then pass "man page footer names nemofs $version"; else
  fail "man page footer does not name nemofs $version: $(tail -n1 "$tmp/man.txt")"; fi
# Every command its --help lists is in SYNOPSIS and COMMANDS, and every option
# of each is a tag (a line of its own) of the OPTIONS subsection "C options".
section() {  # the rendered lines of section $1 (or subsection, with $2)
  awk -v s="$1" -v sub_="${2:-}" '
    /^[A-Z]/ { in_s = ($0 == s); in_sub = 0; next }
    in_s && sub_ != "" && /^   [^ ]/ { in_sub = ($0 == "   " sub_); next }
    in_s && (sub_ == "" || in_sub)' "$tmp/man.txt"
}
for c in $commands; do
  section SYNOPSIS | grep -qE "^       nemofs $c( |$)" || fail "man SYNOPSIS lacks 'nemofs $c'"
  section COMMANDS | grep -qE "^       $c( |$)" || fail "man COMMANDS lacks $c"
  for o in $(options_of "$c"); do
    section OPTIONS "$c options" | grep -qE -- "^       (-[^ ]+, )?$o( |,|$)" ||
      fail "man OPTIONS, '$c options', does not document $o"
  done
done
for o in $(options_of); do
  section OPTIONS "Global options" | grep -qE -- "^       (-[^ ]+, )?$o( |,|$)" ||
    fail "man OPTIONS, 'Global options', does not document $o"
done
pass "man page checked against the --help of: $(echo $commands)"

# ---- the bash completion ------------------------------------------------------
# Completions for the words "$@" (the last one is the word being completed),
# from the extracted file, in a bash without the bash-completion package.
complete_words() {
  bash --norc --noprofile -c '
    source "$1"; shift
    COMP_WORDS=(nemofs "$@"); COMP_CWORD=$#
    _nemofs nemofs "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf "%s\n" "${COMPREPLY[@]}"' _ "$root/usr/share/bash-completion/completions/nemofs" "$@"
}
got=$(complete_words "" | sort | xargs)
want=$(echo $commands | tr ' ' '\n' | sort | xargs)
if [[ $got == "$want" ]]; then pass "completes the commands"; else
  fail "completion of commands: got '$got', want '$want'"; fi
for c in $commands; do
  got=$(complete_words "$c" - | sort | xargs)
  want=$( (options_of "$c"; echo -h; echo --help) | sort | xargs)
  if [[ $got == "$want" ]]; then :; else fail "completion of '$c -': got '$got', want '$want'"; fi
done
pass "completes the options of: $(echo $commands)"
got=$(complete_words mount --log-level "" | xargs)
[[ $got == "trace debug info warn error off" ]] || fail "completion of --log-level: '$got'"
mkdir -p "$tmp/comp/dir1" && touch "$tmp/comp/file1"
got=$(complete_words mount "$tmp/comp/" | sort | xargs)
[[ $got == "$tmp/comp/dir1 $tmp/comp/file1" ]] || fail "completion of mount SOURCE: '$got'"
got=$(complete_words mount "$tmp/comp/file1" "$tmp/comp/" | xargs)
[[ $got == "$tmp/comp/dir1" ]] || fail "completion of mount MOUNTPOINT (directories only): '$got'"
got=$(complete_words umount "$tmp/comp/" | xargs)
[[ $got == "$tmp/comp/dir1" ]] || fail "completion of umount MOUNTPOINT: '$got'"
got=$(complete_words info --cache-dir "$tmp/comp/" | xargs)
[[ $got == "$tmp/comp/dir1" ]] || fail "completion of --cache-dir: '$got'"
got=$(complete_words cat "$tmp/comp/file1" "" | xargs)
[[ -z $got ]] || fail "completion of cat PATH (a path inside the source) offered local files: '$got'"
mkdir -p "$tmp/comp2/a dir" && touch "$tmp/comp2/a file"
got=$(complete_words mount "$tmp/comp2/a")
[[ $got == "$tmp/comp2/a dir"$'\n'"$tmp/comp2/a file" || $got == "$tmp/comp2/a file"$'\n'"$tmp/comp2/a dir" ]] ||
  fail "completion of names with spaces: '$got'"
pass "completes files and directories"

if ((failures)); then echo "$failures check(s) failed"; exit 1; fi
echo "all package checks passed"
