#!/usr/bin/env bash
# Benchmarks structural writes (issue 11) through a read-write nemofs mount of a plain .nemo:
# adding a tensor (a .npy copied into tensors/, fsynced), deleting one (rm, then an fsync
# commits), and writing model.safetensors back whole (one tensor fewer). Each commit writes
# model_weights.ckpt again (a torch.save zip cannot grow in place) and appends it to the tar,
# so the baseline is a `dd conv=fsync` copy of that member to a new file: the bytes that must
# be written. Both in the same run; medians of --reps. See scripts/bench/README.md.
#
#   scripts/bench/bench_structure.sh [--nemofs PATH] [--workdir DIR] [--size-gib N]
#                                    [--tensor-mib N] [--reps N] [--keep]
set -euo pipefail

BENCH_NAME=bench_structure
WORKDIR=/tmp/nemofs-bench-structure
SIZE_GIB=${SIZE_GIB:-4}
TENSOR_MIB=${TENSOR_MIB:-256}
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
REPS=1

usage() {
  cat <<EOF
usage: $0 [--nemofs PATH] [--workdir DIR] [--size-gib N] [--tensor-mib N] [--reps N] [--keep]

  --size-gib N    tensor bytes of model_weights.ckpt in GiB (default: \$SIZE_GIB or 4)
  --tensor-mib N  size of the tensor added, MiB, a multiple of 4 (default: \$TENSOR_MIB or 256)
  --reps N        repetitions of each measure, on a fresh copy of the .nemo each (default: 1)
  --keep          keep the test .nemo (a rerun with the same sizes reuses it)
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
check_common fusermount3 getfattr dd stat awk df
"$PY" -c 'import torch, numpy' 2>/dev/null || die "$PY cannot import torch and numpy"

TOTAL_BYTES=$(awk -v g="$SIZE_GIB" 'BEGIN { printf "%.0f", int(g * 256 + 0.5) * 4194304 }')
TENSOR_BYTES=$((TENSOR_MIB * 1048576))
setup_workdir
TAR="$WORKDIR/structure_${SIZE_GIB}gib.nemo"
BENCH_TARS=("$TAR")
# the tar, a working copy that grows by one member, the baseline copy, the safetensors
# files (out and modified), the payload; + 1 GiB
NEED_KIB=$(((7 * TOTAL_BYTES + TENSOR_BYTES) / 1024 + 1048576))
avail_kib=$(free_kib "$WORKDIR")
((avail_kib >= NEED_KIB)) || die "$WORKDIR: $((avail_kib / 1048576)) GiB free, need about $(((NEED_KIB + 1048575) / 1048576)) GiB"
setup_run
install_cleanup
WORK="$RUN_DIR/work.nemo"
BASE="$RUN_DIR/baseline.ckpt"
NPY="$RUN_DIR/added.npy"
ST_OUT="$RUN_DIR/out.safetensors"
ST_NEW="$RUN_DIR/new.safetensors"

ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) * 1000 }'; }

echo "== test .nemo: $TAR ($TOTAL_BYTES tensor bytes); workdir $WORKDIR"
info=$(nice "$PY" "$SCRIPT_DIR/make_tensor_nemo.py" write "$TAR" "$TOTAL_BYTES" "$TENSOR_BYTES") || die "make_tensor_nemo.py failed"
read -r TAR_BYTES CKPT_OFF CKPT_SIZE KEY COUNT < <(json_get "$info" tar_bytes ckpt_offset ckpt_size big.key count)
echo "   $TAR_BYTES bytes, $COUNT tensors; model_weights.ckpt: $CKPT_SIZE bytes"
"$PY" -c "import numpy as np; np.save('$NPY', np.full(($TENSOR_BYTES // 4096, 1024), 3.5, np.float32))"

# fresh_copy: the working .nemo, a copy of the test one, in the page cache (not timed)
fresh_copy() {
  rm -f "$WORK"
  cp "$TAR" "$WORK"
  sync
  cat "$WORK" >/dev/null
}
# baseline: the member's bytes written to a new file and fsynced (what any commit must write)
baseline() {
  local t0 t1
  rm -f "$BASE"
  t0=$EPOCHREALTIME
  dd if="$WORK" of="$BASE" iflag=skip_bytes,count_bytes skip="$CKPT_OFF" count="$CKPT_SIZE" bs=4M conv=fsync 2>/dev/null
  t1=$EPOCHREALTIME
  rm -f "$BASE"
  ms_between "$t0" "$t1"
}
FSYNC_PY='import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.close(fd)'
COPY_PY='import os, shutil, sys
with open(sys.argv[1], "rb") as s, open(sys.argv[2], "wb") as d:
    shutil.copyfileobj(s, d, 4 << 20)
    d.flush()
    if len(sys.argv) > 3: os.fsync(d.fileno())'
check_has() {  # KEY EXPECTED(0|1): nemofs ls of the working .nemo lists KEY or not
  local n
  n=$("$BIN" ls "$WORK" "$1" 2>/dev/null | grep -c "^$1 " || true)
  [[ $n == "$2" ]] || die "after the commit, $1 is listed $n times in $WORK (expected $2)"
}

ADD_MS=() DEL_MS=() ST_MS=() BASE_MS=()
for ((rep = 1; rep <= REPS; ++rep)); do
  # 1. add a tensor: the .npy copied in, fsync commits
  fresh_copy
  BASE_MS+=("$(baseline)")
  mount_fresh "$WORK"
  t0=$EPOCHREALTIME
  timeout "$T" "$PY" -c "$COPY_PY" "$NPY" "$MNT/tensors/bench.added.npy" fsync || die "add failed (see $DAEMON_LOG)"
  t1=$EPOCHREALTIME
  ADD_MS+=("$(ms_between "$t0" "$t1")")
  umount_now
  check_has bench.added 1
  # 2. delete a tensor: rm, then an fsync of a tensor file commits
  fresh_copy
  mount_fresh "$WORK"
  other=$(ls "$MNT/tensors" | grep -v -x "$KEY" | head -1)
  t0=$EPOCHREALTIME
  rm "$MNT/tensors/$KEY"
  timeout "$T" "$PY" -c "$FSYNC_PY" "$MNT/tensors/$other" || die "fsync after rm failed (see $DAEMON_LOG)"
  t1=$EPOCHREALTIME
  DEL_MS+=("$(ms_between "$t0" "$t1")")
  umount_now
  check_has "$KEY" 0
  # 3. model.safetensors written back with that tensor left out (made outside the timing)
  fresh_copy
  mount_fresh "$WORK"
  cp "$MNT/model.safetensors" "$ST_OUT"
  safetensors_without "$ST_OUT" "$ST_NEW" "$KEY" || die "cannot write new.safetensors"
  rm -f "$ST_OUT"
  cat "$ST_NEW" >/dev/null
  t0=$EPOCHREALTIME
  timeout "$T" "$PY" -c "$COPY_PY" "$ST_NEW" "$MNT/model.safetensors" || die "safetensors write-back failed (see $DAEMON_LOG)"
  t1=$EPOCHREALTIME
  ST_MS+=("$(ms_between "$t0" "$t1")")
  umount_now
  rm -f "$ST_NEW"
  check_has "$KEY" 0
done

base=$(median "${BASE_MS[@]}")
add=$(median "${ADD_MS[@]}")
del=$(median "${DEL_MS[@]}")
st=$(median "${ST_MS[@]}")
echo
echo "== results (median of $REPS; $(nproc) cores, load at start/end: $(cut -d' ' -f1-3 /proc/loadavg))"
printf '  %-58s %12s %8s\n' "measure" "time" "vs cp"
printf '  %-58s %12s %8s\n' "baseline: dd conv=fsync of model_weights.ckpt ($((CKPT_SIZE >> 20)) MiB)" "$(dur "$base")" "1"
printf '  %-58s %12s %8s\n' "add a $TENSOR_MIB MiB tensor (copy .npy in + fsync)" "$(dur "$add")" "$(rel "$add" "$base")"
printf '  %-58s %12s %8s\n' "delete a tensor (rm + fsync)" "$(dur "$del")" "$(rel "$del" "$base")"
printf '  %-58s %12s %8s\n' "write model.safetensors back (one tensor fewer)" "$(dur "$st")" "$(rel "$st" "$base")"
echo "  nemofs: $BIN_INFO"
