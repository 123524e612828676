#!/usr/bin/env bash
# Benchmarks structural writes (issue 11) through a read-write nemofs mount of a PyTorch DCP /
# Megatron torch_dist checkpoint folder: adding a tensor (a .npy copied into tensors/, fsynced),
# deleting one (rm, then an fsync commits), and writing model.safetensors back whole (one tensor
# fewer). A DCP commit writes only the new items, into a new __nemofs_<n>_0.distcp, and a
# re-emitted .metadata renamed over (src/dist/dcp_writer.h), so the baseline is a
# `dd conv=fsync` of exactly those bytes: the new tensor's bytes plus a .metadata for the add,
# a .metadata alone for the others. Both in the same run; medians of --reps (the nemofs times
# are taken inside the Python process that does the operation). The bytes each commit wrote
# to the folder are measured too, and every old .distcp is checked untouched.
# See scripts/bench/README.md.
#
#   scripts/bench/bench_structure_dcp.sh [--nemofs PATH] [--workdir DIR] [--size-gib N]
#                                        [--tensor-mib N] [--reps N] [--keep]
set -euo pipefail

BENCH_NAME=bench_structure_dcp
WORKDIR=/tmp/nemofs-bench-structure-dcp
SIZE_GIB=${SIZE_GIB:-4}
TENSOR_MIB=${TENSOR_MIB:-256}
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<EOF
usage: $0 [--nemofs PATH] [--workdir DIR] [--size-gib N] [--tensor-mib N] [--reps N] [--keep]

  --size-gib N    tensor bytes of the torch_dist folder in GiB, in 256 MiB tensors
                  (default: \$SIZE_GIB or 4)
  --tensor-mib N  size of the tensor added, MiB, a multiple of 4 (default: \$TENSOR_MIB or 256)
  --reps N        repetitions of each measure, each on a fresh working copy (default: 3)
  --keep          keep the test folder (a rerun with the same size reuses it)

The working copy of each measure hard-links the folder's .distcp files (a DCP commit
never writes them; the script checks that their inode, size, mtime and ctime did not
change) and copies the rest, so a repetition costs no copy of the checkpoint.
EOF
}

while (($#)); do
  case $1 in
    --size-gib) SIZE_GIB=${2:?--size-gib needs a number}; shift 2 ;;
    --tensor-mib) TENSOR_MIB=${2:?--tensor-mib needs a number}; shift 2 ;;
    *) common_arg "$@"; shift "$ARG_SHIFT" ;;
  esac
done
[[ $SIZE_GIB =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--size-gib: not a number: $SIZE_GIB"
if ! [[ $TENSOR_MIB =~ ^[1-9][0-9]*$ ]] || ((TENSOR_MIB % 4)); then die "--tensor-mib: not a positive multiple of 4"; fi
check_common fusermount3 getfattr dd awk df cmp
"$PY" -c 'import torch, numpy' 2>/dev/null || die "$PY cannot import torch and numpy"

NTENSORS=$(awk -v g="$SIZE_GIB" 'BEGIN { n = int(g * 4 + 0.5); print (n < 1 ? 1 : n) }')
TOTAL_BYTES=$((NTENSORS * 268435456))
TENSOR_BYTES=$((TENSOR_MIB * 1048576))
setup_workdir
SRC="$WORKDIR/structure_dcp_${NTENSORS}x256mib"
# A folder: removed by the cleanup through TEMP_PATHS (BENCH_TARS is for files).
TEMP_PATHS+=("$SRC.tmp")
if ((KEEP == 0)); then TEMP_PATHS+=("$SRC"); fi
# the folder, the safetensors files (out and modified) and nemofs's spill of the one written
# back, the payload, the added tensor and the baseline's copy of it; + 1 GiB
NEED_KIB=$(((4 * TOTAL_BYTES + 3 * TENSOR_BYTES) / 1024 + 1048576))
avail_kib=$(free_kib "$WORKDIR")
((avail_kib >= NEED_KIB)) || die "$WORKDIR: $((avail_kib / 1048576)) GiB free, need about $(((NEED_KIB + 1048575) / 1048576)) GiB"
setup_run
install_cleanup
WORK="$RUN_DIR/work"
NPY="$RUN_DIR/added.npy"
BASE_T="$RUN_DIR/baseline.distcp"
BASE_M="$RUN_DIR/baseline.metadata"
ST_OUT="$RUN_DIR/out.safetensors"
ST_NEW="$RUN_DIR/new.safetensors"
SNAP="$RUN_DIR/snapshot.json"

ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) * 1000 }'; }

echo "== test folder: $SRC ($NTENSORS tensors of 256 MiB, $TOTAL_BYTES tensor bytes); workdir $WORKDIR"
info=$(nice "$PY" "$SCRIPT_DIR/make_dist_bench.py" structure "$SRC" "$SIZE_GIB") || die "make_dist_bench.py structure failed"
read -r META_BYTES DIR_BYTES REUSED < <(json_get "$info" metadata_bytes dir_bytes reused)
KEY=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["keys"][0])' "$info")  # the one deleted
echo "   $DIR_BYTES bytes (reused: $REUSED); .metadata: $META_BYTES bytes"
"$PY" -c "import numpy as np; np.save('$NPY', np.full(($TENSOR_BYTES // 4096, 1024), 3.5, np.float32))"
NPY_HDR=$(($(stat -c %s "$NPY") - TENSOR_BYTES))
# everything in the page cache: the measures are of nemofs, not of the disk; and no dirty
# pages left from writing it (the first measures would pay for their writeback)
cat "$SRC"/* "$SRC"/.metadata >/dev/null
sync

# fresh_copy: the working folder: the .distcp files hard-linked, the rest copied; then a
# snapshot of every file's (inode, size, mtime, ctime) for after_commit (not timed)
fresh_copy() {
  local f
  rm -rf "$WORK"
  mkdir "$WORK"
  for f in "$SRC"/* "$SRC"/.metadata; do
    if [[ $f == *.distcp ]]; then ln "$f" "$WORK/"; else cp "$f" "$WORK/"; fi
  done
  sync
  "$PY" - snap "$WORK" "$SNAP" <<<"$SNAP_PY"
}
SNAP_PY='import json, os, sys
def state(d):
    out = {}
    for n in os.listdir(d):
        s = os.stat(os.path.join(d, n))
        out[n] = [s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]
    return out
mode, d, path = sys.argv[1:4]
if mode == "snap":
    json.dump(state(d), open(path, "w"))
    sys.exit(0)
before, after = json.load(open(path)), state(d)
new = sorted(n for n in after if n not in before)
gone = sorted(n for n in before if n not in after)
changed = sorted(n for n in after if n in before and after[n] != before[n])
touched = [n for n in changed + gone if n.endswith(".distcp")]
written = sum(after[n][1] for n in new + changed)
grew = sum(v[1] for v in after.values()) - sum(v[1] for v in before.values())
print(written, grew, "untouched" if not touched else "TOUCHED:" + ",".join(touched),
      "new:" + (",".join("%s=%d" % (n, after[n][1]) for n in new) or "-"),
      "changed:" + (",".join("%s=%d" % (n, after[n][1]) for n in changed) or "-"))'
# after_commit WHAT: what the commit did to the working folder, against fresh_copy's snapshot:
# appends to WRITTEN[WHAT] (bytes of new and changed files), GREW[WHAT] (the folder's
# growth) and HWM[WHAT] (the VmHWM of the mount just unmounted); dies if an old .distcp
# was written, renamed or removed
after_commit() {
  local what=$1 written grew touched newf changedf
  read -r written grew touched newf changedf < <(printf '%s' "$SNAP_PY" | "$PY" - diff "$WORK" "$SNAP")
  [[ $touched == untouched ]] || die "$what: an old .distcp changed: ${touched#TOUCHED:} (see $DAEMON_LOG)"
  WRITTEN[$what]+=" $written"
  if ((${#RSS_ALL[@]})); then HWM[$what]+=" ${RSS_ALL[-1]}"; fi
  GREW[$what]+=" $grew"
  FILES_MSG[$what]="$newf; $changedf"
}
# commit_line: the last "stored tensor changes" line of the daemon log, and its count
commit_count() { grep -c 'stored tensor changes in' "$DAEMON_LOG" 2>/dev/null || true; }
# expect_commit WHAT COUNT_BEFORE: the timed call itself committed (a new line, before the
# unmount), by the DCP path; appends the logged ms and MiB to LOGMS[WHAT], LOGMIB[WHAT]
expect_commit() {
  local what=$1 n0=$2 line ms mib
  (($(commit_count) == n0 + 1)) || die "$what: no commit logged during the timed call (see $DAEMON_LOG)"
  line=$(grep 'stored tensor changes in' "$DAEMON_LOG" | tail -1)
  [[ $line == *"new .distcp file and .metadata rename"* ]] || die "$what: not a DCP commit: $line"
  mib=$(sed -n 's/.*(\([0-9.]*\) MiB written) in \([0-9.]*\) ms.*/\1/p' <<<"$line")
  ms=$(sed -n 's/.*(\([0-9.]*\) MiB written) in \([0-9.]*\) ms.*/\2/p' <<<"$line")
  [[ -n $mib && -n $ms ]] || die "$what: cannot read the commit line: $line"
  LOGMS[$what]+=" $ms"
  LOGMIB[$what]+=" $mib"
  LINE_MSG[$what]=${line#*stored tensor changes in }
}
# baselines: the bytes the commit must write, each to a new file with dd conv=fsync
baseline_add() {
  local t0 t1
  rm -f "$BASE_T" "$BASE_M"
  t0=$EPOCHREALTIME
  dd if="$NPY" of="$BASE_T" iflag=skip_bytes,count_bytes skip="$NPY_HDR" count="$TENSOR_BYTES" bs=4M conv=fsync 2>/dev/null
  dd if="$SRC/.metadata" of="$BASE_M" bs=4M conv=fsync 2>/dev/null
  t1=$EPOCHREALTIME
  rm -f "$BASE_T" "$BASE_M"
  ms_between "$t0" "$t1"
}
baseline_meta() {
  local t0 t1
  rm -f "$BASE_M"
  t0=$EPOCHREALTIME
  dd if="$SRC/.metadata" of="$BASE_M" bs=4M conv=fsync 2>/dev/null
  t1=$EPOCHREALTIME
  rm -f "$BASE_M"
  ms_between "$t0" "$t1"
}
# OP_PY copy SRC DST [fsync] | rm-fsync RM FSYNC: the operation, timed inside Python (the
# interpreter's start, some 30 ms, is left out: it would dominate the small commits); prints ms
OP_PY='import os, shutil, sys, time
op = sys.argv[1]
t0 = time.perf_counter()
if op == "copy":
    with open(sys.argv[2], "rb") as s, open(sys.argv[3], "wb") as d:
        shutil.copyfileobj(s, d, 4 << 20)
        d.flush()
        if len(sys.argv) > 4: os.fsync(d.fileno())
else:
    os.unlink(sys.argv[2])
    fd = os.open(sys.argv[3], os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
print("%.1f" % ((time.perf_counter() - t0) * 1000))'
# check_has KEY EXPECTED(0|1): nemofs ls of the working folder lists KEY or not, and
# nemofs verify passes with no orphan (an unreferenced __nemofs_*.distcp or .metadata temp)
check_has() {
  local n out
  n=$("$BIN" ls "$WORK" "$1" 2>/dev/null | grep -c "^$1 " || true)
  [[ $n == "$2" ]] || die "after the commit, $1 is listed $n times in $WORK (expected $2)"
  out=$(timeout "$T" "$BIN" verify "$WORK" 2>&1) || die "nemofs verify $WORK failed: $out"
  [[ $out != *orphan:* ]] || die "nemofs verify $WORK: $out"
}
# check_add: untimed, on the first repetition: a fresh mount's tensors/bench.added has the
# .npy's bytes, and PyTorch's read path (tests/tools/dcp_read.py) reads every tensor of
# the folder, the added one with the same sha256
check_add() {
  local want got
  mount_fresh "$WORK"
  timeout "$T" cmp -n "$TENSOR_BYTES" -i "$NPY_HDR:0" "$NPY" "$MNT/tensors/bench.added" ||
    die "add: tensors/bench.added on a fresh mount differs from the .npy's data"
  umount_now
  want=$(tail -c "$TENSOR_BYTES" "$NPY" | sha256sum | cut -d' ' -f1)
  got=$(timeout "$T" nice "$PY" "$REPO/tests/tools/dcp_read.py" "$WORK" | "$PY" -c '
import json, sys
d = json.load(sys.stdin)
if d["errors"]: sys.exit("dcp_read.py: %s" % d["errors"])
if len(d["tensors"]) != int(sys.argv[1]) + 1: sys.exit("dcp_read.py: %d tensors" % len(d["tensors"]))
print(d["tensors"]["bench.added"]["sha256"])' "$NTENSORS") || die "add: PyTorch's read path failed on the result"
  [[ $got == "$want" ]] || die "add: dcp_read.py reads bench.added as sha256 $got, expected $want"
  echo "   checked: a fresh mount's tensors/bench.added = the .npy data; dcp_read.py reads all $((NTENSORS + 1)) tensors"
}

# per measure (add, del, st): space-separated samples, and the last repetition's messages
declare -A WRITTEN GREW LOGMS LOGMIB HWM FILES_MSG LINE_MSG
ADD_MS=() DEL_MS=() ST_MS=() BASE_ADD_MS=() BASE_META_MS=()
for ((rep = 1; rep <= REPS; ++rep)); do
  echo "== repetition $rep of $REPS"
  # 1. add a tensor: the .npy copied in, fsync commits
  fresh_copy
  BASE_ADD_MS+=("$(baseline_add)")
  mount_fresh "$WORK"
  n0=$(commit_count)
  ms=$(timeout "$T" "$PY" -c "$OP_PY" copy "$NPY" "$MNT/tensors/bench.added.npy" fsync) || die "add failed (see $DAEMON_LOG)"
  ADD_MS+=("$ms")
  expect_commit add "$n0"
  umount_now
  after_commit add
  check_has bench.added 1
  if ((rep == 1)); then check_add; fi
  # 2. delete a tensor: rm, then an fsync of a tensor file commits
  fresh_copy
  BASE_META_MS+=("$(baseline_meta)")
  mount_fresh "$WORK"
  other=""
  for f in "$MNT"/tensors/*; do
    if [[ ${f##*/} != "$KEY" ]]; then other=${f##*/}; break; fi
  done
  [[ -n $other ]] || die "no tensor besides $KEY in $MNT/tensors"
  n0=$(commit_count)
  ms=$(timeout "$T" "$PY" -c "$OP_PY" rm-fsync "$MNT/tensors/$KEY" "$MNT/tensors/$other") || die "rm + fsync failed (see $DAEMON_LOG)"
  DEL_MS+=("$ms")
  expect_commit del "$n0"
  umount_now
  after_commit del
  check_has "$KEY" 0
  # 3. model.safetensors written back with that tensor left out (made outside the timing)
  fresh_copy
  BASE_META_MS+=("$(baseline_meta)")
  mount_fresh "$WORK"
  timeout "$T" cp "$MNT/model.safetensors" "$ST_OUT"
  safetensors_without "$ST_OUT" "$ST_NEW" "$KEY" || die "cannot write new.safetensors"
  rm -f "$ST_OUT"
  cat "$ST_NEW" >/dev/null
  sync  # its dirty pages written out before the timed copy
  n0=$(commit_count)
  ms=$(timeout "$T" "$PY" -c "$OP_PY" copy "$ST_NEW" "$MNT/model.safetensors") || die "safetensors write-back failed (see $DAEMON_LOG)"
  ST_MS+=("$ms")
  expect_commit st "$n0"
  umount_now
  rm -f "$ST_NEW"
  after_commit st
  check_has "$KEY" 0
  echo "   add $(dur "${ADD_MS[-1]}") (dd ${BASE_ADD_MS[-1]} ms), delete $(dur "${DEL_MS[-1]}"), write-back $(dur "${ST_MS[-1]}") (.metadata dd ${BASE_META_MS[-1]} ms)"
done
rm -rf "$WORK"

size() { awk -v b="$1" 'BEGIN { a = b < 0 ? -b : b; if (a < 1048576) printf "%d bytes", b; else printf "%.2f MiB", b / 1048576 }'; }
base_add=$(median "${BASE_ADD_MS[@]}")
base_meta=$(median "${BASE_META_MS[@]}")
echo
echo "== results: $NTENSORS x 256 MiB torch_dist folder ($DIR_BYTES bytes, .metadata $META_BYTES bytes), median of $REPS"
echo "   $(nproc) cores, load at end: $(cut -d' ' -f1-3 /proc/loadavg); nemofs: $BIN_INFO"
echo
echo "| measure | median | min – max | vs baseline |"
echo "|---|---|---|---|"
line_row "$base_add" "baseline (add): \`dd conv=fsync\` of the $TENSOR_MIB MiB of tensor bytes + of a .metadata" "${BASE_ADD_MS[@]}"
line_row "$base_meta" "baseline (delete, write-back): \`dd conv=fsync\` of a .metadata ($META_BYTES bytes)" "${BASE_META_MS[@]}"
line_row "$base_add" "add a $TENSOR_MIB MiB tensor (copy .npy in + fsync)" "${ADD_MS[@]}"
line_row "$base_meta" "delete a tensor (rm + fsync)" "${DEL_MS[@]}"
line_row "$base_meta" "write model.safetensors back (one tensor fewer)" "${ST_MS[@]}"
echo
echo "| measure | commit (daemon log) | written (log) | new + changed files | folder grew by | daemon VmHWM |"
echo "|---|---|---|---|---|---|"
med() { local a; read -ra a <<<"$1"; median "${a[@]}"; }  # median of a space-separated list
for w in add del st; do
  case $w in add) name="add" ;; del) name="delete" ;; st) name="write-back" ;; esac
  hwm=-
  if [[ -n ${HWM[$w]:-} ]]; then hwm="$(kib_to_mib "$(med "${HWM[$w]}")") MiB"; fi
  printf '| %s | %s | %s MiB | %s | %s | %s |\n' "$name" "$(dur "$(med "${LOGMS[$w]}")")" "$(fmt "$(med "${LOGMIB[$w]}")" %.1f)" \
    "$(size "$(med "${WRITTEN[$w]}")")" "$(size "$(med "${GREW[$w]}")")" "$hwm"
done
echo
echo "daemon VmHWM: the peak resident set of each measure's mount, file-backed pages included: the"
echo "write-back's counts the pages of the mapped spill file the staged model.safetensors is in"
echo "old .distcp files: inode, size, mtime and ctime unchanged after every commit"
echo "files of the last repetition (name=bytes):"
for w in add del st; do echo "  $w: ${FILES_MSG[$w]}"; done
echo "commit lines of the last repetition:"
for w in add del st; do echo "  $w: ${LINE_MSG[$w]}"; done
