#!/usr/bin/env bash
# Benchmarks nemofs's tensor views (tensors/<key>, model.safetensors) of a .nemo
# against baselines run in the same command on the same tar: one 1 GiB tensor
# (sequential throughput) and 10,000 small tensors (mount, listing, many small
# files, daemon memory). See scripts/bench/README.md.
#
#   scripts/bench/bench_tensors.sh [--nemofs PATH] [--workdir DIR] [--reps N] [--keep]
#                                  [--trace-requests]
set -euo pipefail

BENCH_NAME=bench_tensors
WORKDIR=/tmp/nemofs-bench-tensors
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

BIG_KEY=model.embedding.word_embeddings.weight
MANY_COUNT=10000

usage() {
  cat <<EOF
usage: $0 [--nemofs PATH] [--workdir DIR] [--reps N] [--keep] [--trace-requests]

  --nemofs PATH      nemofs binary (default: $REPO/build/nemofs); copied into the
                     run directory first so a concurrent rebuild cannot change it mid-run
  --workdir DIR      where the test .nemo files, mount point and logs live
                     (default: /tmp/nemofs-bench-tensors)
  --reps N           repetitions per figure; medians are reported (default: 3)
  --keep             keep big_tensor.nemo and many_tensors.nemo (reruns reuse them)
  --trace-requests   extra untimed passes: strace the daemon during 512 MiB sequential reads
                     (tensors/ and model.safetensors) and during the cat of all small
                     tensors; print histograms of the sizes it read from the tar
EOF
}

while (($#)); do
  common_arg "$@"
  shift "$ARG_SHIFT"
done

check_common fusermount3 getfattr dd tar awk cmp find
"$PY" -c 'import torch' 2>/dev/null || die "$PY cannot import torch (apt-get install python3-torch)"

setup_workdir

BIG_TAR="$WORKDIR/big_tensor.nemo"
MANY_TAR="$WORKDIR/many_tensors.nemo"
BENCH_TARS=("$BIG_TAR" "$MANY_TAR")
setup_run
CLK_TCK=$(getconf CLK_TCK)

# tmpfs for the "into tmpfs" and "tar -xf" references, if there is room
SHM_OK=0
if shm_has_room $((1048576 + 524288)); then SHM_OK=1 SHM_FILE="$SHM_DIR/nemofs-bench-tensors.$$"; fi
SHM_XDIR="$SHM_DIR/nemofs-bench-tensors-x.$$"     # tar -xf of many_tensors.nemo
SHM_TREE="$SHM_DIR/nemofs-bench-tensors-tree.$$"  # copy of the mount's tensors/ (10k small files)
if ((SHM_OK == 0)); then SHM_XDIR="$RUN_DIR/x" SHM_TREE="$RUN_DIR/tree"; fi
TEMP_PATHS+=("$SHM_XDIR" "$SHM_TREE")
xwhere=tmpfs
((SHM_OK)) || xwhere="$WORKDIR (no room in /dev/shm)"

install_cleanup

# ---- tensor helpers (the shared ones are in lib.sh) ------------------------------------
# CPU time (user + system, all threads) of the current daemon, in clock ticks.
cpu_ticks() { sed 's/^.*) //' "/proc/$CUR_PID/stat" | awk '{ print $12 + $13 }'; }
ticks_to_s() { awk -v t="$1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f", t / h }'; }

# strace_pass NAME SOURCE CMD...: fresh mount of SOURCE, strace every daemon thread while
# CMD runs, unmount (strace_daemon); writes to $LOGDIR/hist_NAME.txt a histogram of the
# lengths the daemon read from SOURCE (splice, pread64, preadv, read on its fd), which
# for the sequential passes are the kernel's FUSE read request sizes.
strace_pass() {
  local name=$1 src=$2 calls=splice,pread64,preadv,preadv2,read
  shift 2
  strace_daemon "$name" "$src" "$calls" "$@"
  { strace_reads "$name" "$src" "$calls" |
    awk '$(NF - 1) == "=" { split($1, a, "("); c[a[1] " " $NF]++; n++ }
         END { for (k in c) { split(k, p, " "); printf "    %-8s %10d bytes x %d\n", p[1], p[2], c[k] }; if (!n) print "    (none seen)" }' |
    sort -k5,5 -nr | head -8; } >"$LOGDIR/hist_$name.txt" || true
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- 0. disk space ------------------------------------------------------------------
avail_kib=$(free_kib "$WORKDIR")
if [[ ! -e $BIG_TAR ]] && ((avail_kib < 3 * 1048576)); then
  die "$WORKDIR: $((avail_kib / 1048576)) GiB free, need about 3 GiB (staged 1 GiB ckpt + 1 GiB tar + margin)"
fi

# ---- 1. big_tensor.nemo -------------------------------------------------------------
echo "== big tensor .nemo: $BIG_TAR"
info=$("$PY" "$SCRIPT_DIR/make_tensor_nemo.py" big "$BIG_TAR") || die "make_tensor_nemo.py big failed"
read -r BIG_BYTES BIG_REUSED CKPT_OFF BIG_NBYTES BIG_TAROFF BIG_RECORD BIG_RECOFF BIG_DTYPE < <(json_get "$info" \
  tar_bytes reused ckpt_offset big.nbytes big.tar_offset big.record big.record_data_offset big.dtype)
BIG_SHAPE=$(json_get "$info" big.shape | tr -d ' ')
if [[ $BIG_REUSED == True ]]; then how=reused; else how=created; fi
echo "   $how: $BIG_BYTES bytes; ./model_weights.ckpt at offset_data=$CKPT_OFF; $BIG_KEY ($BIG_DTYPE $BIG_SHAPE," \
  "$BIG_NBYTES bytes) = zip record $BIG_RECORD, data at +$BIG_RECOFF in the ckpt -> tar offset $BIG_TAROFF"
((BIG_NBYTES == 1073741824)) || die "unexpected big tensor size $BIG_NBYTES"
EXPECT=$BIG_NBYTES
TENSOR_PATH="tensors/$BIG_KEY"

echo "== warming the page cache (cat big_tensor.nemo > /dev/null)"
cat "$BIG_TAR" >/dev/null

echo "== verifying the byte range against the mount"
mount_fresh "$BIG_TAR"
BIG_RSS_MOUNT=$(status_kib VmRSS) BIG_HWM_MOUNT=$(status_kib VmHWM)
size=$(timeout "$T" stat -c %s "$MNT/$TENSOR_PATH") || die "stat $TENSOR_PATH failed"
[[ $size == "$BIG_NBYTES" ]] || die "$TENSOR_PATH: size $size, expected $BIG_NBYTES"
# data offset of the tensor inside model.safetensors: 8 + header_len + data_offsets[0]
st=$(timeout "$T" "$PY" - "$MNT/model.safetensors" "$BIG_KEY" <<'EOF'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    h = json.loads(f.read(n))
e = h[sys.argv[2]]
print(8 + n + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0], e["dtype"], n)
EOF
) || die "cannot read the model.safetensors header"
read -r ST_OFF ST_LEN ST_DTYPE ST_HDR <<<"$st"
[[ $ST_LEN == "$BIG_NBYTES" ]] || die "model.safetensors: $BIG_KEY spans $ST_LEN bytes, expected $BIG_NBYTES"
last=$((BIG_NBYTES - 1048576))
chk() {  # FILE TAR_SKIP FILE_SKIP: 1 MiB of MNT/FILE at FILE_SKIP must equal the tar at TAR_SKIP
  cmp -s <(dd if="$BIG_TAR" iflag=skip_bytes,count_bytes skip="$2" count=1048576 bs=1M 2>/dev/null) \
    <(timeout "$T" dd if="$MNT/$1" iflag=skip_bytes,count_bytes skip="$3" count=1048576 bs=1M 2>/dev/null) ||
    die "$1 at $3: 1 MiB differs from the tar at $2"
}
chk "$TENSOR_PATH" "$BIG_TAROFF" 0
chk "$TENSOR_PATH" "$((BIG_TAROFF + last))" "$last"
chk model.safetensors "$BIG_TAROFF" "$ST_OFF"
chk model.safetensors "$((BIG_TAROFF + last))" "$((ST_OFF + last))"
zero=$(dd if="$BIG_TAR" iflag=skip_bytes,count_bytes skip="$BIG_TAROFF" count=4096 2>/dev/null | od -An -tx4 -v | tr ' ' '\n' | grep -c '^00000000$') || true
((zero == 0)) || die "tar range at $BIG_TAROFF starts with zero words: wrong offset?"
umount_now
echo "   ok: first and last MiB of $TENSOR_PATH and of model.safetensors at +$ST_OFF (header $ST_HDR bytes," \
  "dtype $ST_DTYPE) equal the tar at $BIG_TAROFF"

# ---- 2. sequential reads of the big tensor --------------------------------------------
echo "== 2. sequential read of the 1 GiB tensor (dd bs=1M), fresh mounts, vs dd of the tar range (x$REPS)"
SEQ_BASE=() SEQ_SHM=() T_FIRST=() T_AGAIN=() S_FIRST=() S_AGAIN=()
CPU_TF=() CPU_TA=() CPU_SF=() CPU_SA=() BIG_HWM=()
# One fresh mount: dd the big tensor twice through tensors/<key> (first pass, then
# from the mount's page cache), recording GB/s and the daemon's CPU time per pass.
seq_tensors() {
  local c0 c1 c2
  mount_fresh "$BIG_TAR"
  if [[ $BDI_RA == "?" ]]; then read_bdi_ra; fi
  c0=$(cpu_ticks)
  T_FIRST+=("$(dd_rate if="$MNT/$TENSOR_PATH")")
  c1=$(cpu_ticks)
  T_AGAIN+=("$(dd_rate if="$MNT/$TENSOR_PATH")")
  c2=$(cpu_ticks)
  CPU_TF+=("$(ticks_to_s $((c1 - c0)))") CPU_TA+=("$(ticks_to_s $((c2 - c1)))")
  umount_now
  BIG_HWM+=("${RSS_ALL[-1]:-0}")
}
# The same through model.safetensors at the tensor's data offset.
seq_safetensors() {
  local c0 c1 c2
  mount_fresh "$BIG_TAR"
  c0=$(cpu_ticks)
  S_FIRST+=("$(dd_rate if="$MNT/model.safetensors" iflag=skip_bytes,count_bytes skip="$ST_OFF" count="$BIG_NBYTES")")
  c1=$(cpu_ticks)
  S_AGAIN+=("$(dd_rate if="$MNT/model.safetensors" iflag=skip_bytes,count_bytes skip="$ST_OFF" count="$BIG_NBYTES")")
  c2=$(cpu_ticks)
  CPU_SF+=("$(ticks_to_s $((c1 - c0)))") CPU_SA+=("$(ticks_to_s $((c2 - c1)))")
  umount_now
  BIG_HWM+=("${RSS_ALL[-1]:-0}")
}
for ((i = 1; i <= REPS; i++)); do
  seq_baselines "$BIG_TAR" "$BIG_TAROFF" "$BIG_NBYTES"

  # The two views alternate which goes first: the first GiBs of new page cache after
  # the tar was (re)cached are often much slower to fill on VMs, whatever reads them.
  if ((i % 2)); then seq_tensors; seq_safetensors; else seq_safetensors; seq_tensors; fi

  echo "   rep $i: baseline ${SEQ_BASE[-1]} GB/s, into tmpfs $shm_msg GB/s;" \
    "tensors/ ${T_FIRST[-1]} then ${T_AGAIN[-1]} GB/s (daemon CPU ${CPU_TF[-1]} / ${CPU_TA[-1]} s);" \
    "model.safetensors ${S_FIRST[-1]} then ${S_AGAIN[-1]} GB/s (daemon CPU ${CPU_SF[-1]} / ${CPU_SA[-1]} s)"
done
read_fuse_init

TRACE_T="" TRACE_S=""
if ((TRACE)); then
  echo "== request sizes: strace of the daemon during 512 MiB dd of tensors/ and of model.safetensors (fresh mounts)"
  strace_pass tensor "$BIG_TAR" dd if="$MNT/$TENSOR_PATH" bs=1M count=512 of=/dev/null
  strace_pass safetensors "$BIG_TAR" dd if="$MNT/model.safetensors" iflag=skip_bytes,count_bytes \
    skip="$ST_OFF" count=$((512 * 1048576)) bs=1M of=/dev/null
  TRACE_T=$(cat "$LOGDIR/hist_tensor.txt") TRACE_S=$(cat "$LOGDIR/hist_safetensors.txt")
fi
if ((KEEP == 0)); then rm -f "$BIG_TAR"; fi  # free 1 GiB of disk and page cache early

# ---- 3. many_tensors.nemo -----------------------------------------------------------
echo "== many small tensors .nemo: $MANY_TAR"
info=$("$PY" "$SCRIPT_DIR/make_tensor_nemo.py" many "$MANY_TAR") || die "make_tensor_nemo.py many failed"
read -r MANY_BYTES MANY_REUSED MANY_N MANY_NBYTES MANY_CKPT < <(json_get "$info" tar_bytes reused count total_nbytes ckpt_size)
if [[ $MANY_REUSED == True ]]; then how=reused; else how=created; fi
echo "   $how: $MANY_BYTES bytes; $MANY_N tensors, $MANY_NBYTES tensor bytes, model_weights.ckpt $MANY_CKPT bytes"
((MANY_N == MANY_COUNT)) || die "expected $MANY_COUNT tensors, got $MANY_N"
cat "$MANY_TAR" >/dev/null

echo "== checking the mount (untimed): file count and bytes under tensors/"
mount_fresh "$MANY_TAR"
n=$(timeout "$T" find "$MNT/tensors" -type f | wc -l)
b=$(timeout "$T" find "$MNT/tensors" -type f -exec cat {} + | wc -c)
rm -rf "$SHM_TREE"
timeout "$T" cp -r "$MNT/tensors" "$SHM_TREE" || die "cp -r tensors/ to $SHM_TREE failed"
umount_now
[[ $n == "$MANY_COUNT" && $b == "$MANY_NBYTES" ]] || die "tensors/: $n files, $b bytes; expected $MANY_COUNT, $MANY_NBYTES"
echo "   ok: $n files, $b bytes (copied to $SHM_TREE for the small-files reference)"

echo "== 3. mount -> ls tensors/ | wc -l, nemofs info, cat of all $MANY_COUNT files, vs tar (x$REPS)"
M_MOUNT=() M_TARTF=() M_INFO=() M_CAT1=() M_CAT2=() M_XREF=() M_TREE=() M_CPU_CAT=() M_RSS0=() M_HWM0=() M_HWM=()
for ((i = 1; i <= REPS; i++)); do
  t0=$(now_ns)
  timeout "$T" tar -tf "$MANY_TAR" >/dev/null
  M_TARTF+=("$(ms_since "$t0")")

  t0=$(now_ns)
  timeout "$T" "$BIN" info "$MANY_TAR" >/dev/null 2>>"$CLI_LOG" || die "nemofs info failed"
  M_INFO+=("$(ms_since "$t0")")

  rm -rf "$SHM_XDIR" && mkdir -p "$SHM_XDIR"
  t0=$(now_ns)
  timeout "$T" tar -xf "$MANY_TAR" -C "$SHM_XDIR"
  cat "$SHM_XDIR/model_weights.ckpt" >/dev/null
  M_XREF+=("$(ms_since "$t0")")
  rm -rf "$SHM_XDIR"

  t0=$(now_ns)
  find "$SHM_TREE" -type f -exec cat {} + >/dev/null
  M_TREE+=("$(ms_since "$t0")")

  t0=$(now_ns)
  mount_start "$MANY_TAR"
  n=$(timeout "$T" ls "$MNT/tensors/" | wc -l)
  M_MOUNT+=("$(ms_since "$t0")")
  [[ $n == "$MANY_COUNT" ]] || die "ls tensors/ | wc -l = $n, expected $MANY_COUNT"
  record_pid
  M_RSS0+=("$(status_kib VmRSS)") M_HWM0+=("$(status_kib VmHWM)")

  c0=$(cpu_ticks)
  t0=$(now_ns)
  timeout "$T" find "$MNT/tensors" -type f -exec cat {} + >/dev/null
  M_CAT1+=("$(ms_since "$t0")")
  c1=$(cpu_ticks)
  t0=$(now_ns)
  timeout "$T" find "$MNT/tensors" -type f -exec cat {} + >/dev/null
  M_CAT2+=("$(ms_since "$t0")")
  M_CPU_CAT+=("$(ticks_to_s $((c1 - c0)))")
  umount_now
  M_HWM+=("${RSS_ALL[-1]:-0}")
  echo "   rep $i: mount+ls ${M_MOUNT[-1]} ms (tar -tf ${M_TARTF[-1]} ms), info ${M_INFO[-1]} ms;" \
    "cat all ${M_CAT1[-1]} then ${M_CAT2[-1]} ms (daemon CPU ${M_CPU_CAT[-1]} s; tar -xf + cat ${M_XREF[-1]} ms;" \
    "same files in $xwhere ${M_TREE[-1]} ms);" \
    "RSS after mount $(kib_to_mib "${M_RSS0[-1]}") MiB, VmHWM after reading $(kib_to_mib "${M_HWM[-1]}") MiB"
done

TRACE_M=""
if ((TRACE)); then
  echo "== reads from the tar: strace of the daemon during the cat of all $MANY_COUNT files (fresh mount)"
  strace_pass many "$MANY_TAR" find "$MNT/tensors" -type f -exec cat {} +
  TRACE_M=$(cat "$LOGDIR/hist_many.txt")
fi

# ---- 4. summary ----------------------------------------------------------------------
m_base=$(median "${SEQ_BASE[@]}")
m_tf=$(median "${T_FIRST[@]}") m_ta=$(median "${T_AGAIN[@]}")
m_sf=$(median "${S_FIRST[@]}") m_sa=$(median "${S_AGAIN[@]}")
m_ctf=$(median "${CPU_TF[@]}") m_cta=$(median "${CPU_TA[@]}") m_csf=$(median "${CPU_SF[@]}") m_csa=$(median "${CPU_SA[@]}")
m_mount=$(median "${M_MOUNT[@]}") m_tartf=$(median "${M_TARTF[@]}") m_info=$(median "${M_INFO[@]}")
m_cat1=$(median "${M_CAT1[@]}") m_cat2=$(median "${M_CAT2[@]}") m_xref=$(median "${M_XREF[@]}")
m_ccat=$(median "${M_CPU_CAT[@]}") m_tree=$(median "${M_TREE[@]}")

ROW_FMT='%-54s %12s %12s %9s\n'
summary_head "==================================== nemofs tensor benchmark ===================================="
echo "load:      1/5/15-min load average $LOAD_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end (other work on the machine adds noise)"
summary_nemofs
echo "big:       $BIG_TAR ($BIG_BYTES bytes); $BIG_KEY $BIG_DTYPE $BIG_SHAPE at tar offset $BIG_TAROFF;"
echo "           in model.safetensors at $ST_OFF"
echo "many:      $MANY_TAR ($MANY_BYTES bytes); $MANY_N tensors, $MANY_NBYTES bytes"
summary_table_start
row "1 GiB tensor: tensors/<key>, fresh mount (GB/s) [dd tar]" "$(fmt "$m_tf")" "$(fmt "$m_base")" "$(ratio "$m_tf" "$m_base")"
if ((${#SEQ_SHM[@]})); then
  m_shm=$(median "${SEQ_SHM[@]}")
  row "  ... fresh mount vs [dd tar range into tmpfs]" "$(fmt "$m_tf")" "$(fmt "$m_shm")" "$(ratio "$m_tf" "$m_shm")"
fi
row "  ... same mount again (GB/s) [dd tar]" "$(fmt "$m_ta")" "$(fmt "$m_base")" "$(ratio "$m_ta" "$m_base")"
row "  ... daemon CPU, fresh / again (s)" "$m_ctf / $m_cta" "-" "-"
row "1 GiB via model.safetensors, fresh mount (GB/s) [dd tar]" "$(fmt "$m_sf")" "$(fmt "$m_base")" "$(ratio "$m_sf" "$m_base")"
if ((${#SEQ_SHM[@]})); then
  row "  ... fresh mount vs [dd tar range into tmpfs]" "$(fmt "$m_sf")" "$(fmt "$m_shm")" "$(ratio "$m_sf" "$m_shm")"
fi
row "  ... same mount again (GB/s) [dd tar]" "$(fmt "$m_sa")" "$(fmt "$m_base")" "$(ratio "$m_sa" "$m_base")"
row "  ... daemon CPU, fresh / again (s)" "$m_csf / $m_csa" "-" "-"
row "  daemon RSS after mount (MiB)" "$(kib_to_mib "$BIG_RSS_MOUNT")" "-" "-"
row "  daemon VmHWM after mount / after reading (MiB)" "$(kib_to_mib "$BIG_HWM_MOUNT") / $(kib_to_mib "$(maxof "${BIG_HWM[@]}")")" "-" "-"
row "10k tensors: mount -> ls tensors/|wc -l (ms) [tar -tf]" "$(fmt "$m_mount")" "$(fmt "$m_tartf")" "$(ratio "$m_mount" "$m_tartf")"
row "  nemofs info, no FUSE (ms) [tar -tf]" "$(fmt "$m_info")" "$(fmt "$m_tartf")" "$(ratio "$m_info" "$m_tartf")"
row "  cat all 10k files, 1st (ms) [tar -xf + cat ckpt]" "$(fmt "$m_cat1")" "$(fmt "$m_xref")" "$(ratio "$m_cat1" "$m_xref")"
row "  cat all 10k files, again (ms) [tar -xf + cat ckpt]" "$(fmt "$m_cat2")" "$(fmt "$m_xref")" "$(ratio "$m_cat2" "$m_xref")"
row "  cat all 10k files, 1st (ms) [same 10k files, $xwhere]" "$(fmt "$m_cat1")" "$(fmt "$m_tree")" "$(ratio "$m_cat1" "$m_tree")"
row "  cat all 10k files, again (ms) [same, $xwhere]" "$(fmt "$m_cat2")" "$(fmt "$m_tree")" "$(ratio "$m_cat2" "$m_tree")"
row "  ... daemon CPU during the 1st cat (s)" "$m_ccat" "-" "-"
row "  daemon RSS right after mount (MiB)" "$(kib_to_mib "$(median "${M_RSS0[@]}")")" "-" "-"
row "  daemon VmHWM after mount / after reading all (MiB)" "$(kib_to_mib "$(median "${M_HWM0[@]}")") / $(kib_to_mib "$(maxof "${M_HWM[@]}")")" "-" "-"
echo
echo "samples: seq GB/s baseline [${SEQ_BASE[*]}]  into tmpfs [${SEQ_SHM[*]}]"
echo "         tensors/ fresh [${T_FIRST[*]}] again [${T_AGAIN[*]}]; model.safetensors fresh [${S_FIRST[*]}] again [${S_AGAIN[*]}]"
echo "         daemon CPU s: tensors/ [${CPU_TF[*]}] [${CPU_TA[*]}]; model.safetensors [${CPU_SF[*]}] [${CPU_SA[*]}]"
echo "         10k: mount+ls ms [${M_MOUNT[*]}]  tar -tf [${M_TARTF[*]}]  info [${M_INFO[*]}]"
echo "         10k: cat ms [${M_CAT1[*]}] again [${M_CAT2[*]}]  tar -xf+cat ($xwhere) [${M_XREF[*]}]  same files ($xwhere) [${M_TREE[*]}]"
echo "         VmHWM KiB, all mounts [${RSS_ALL[*]}]"
if ((TRACE)); then
  echo "reads from the tar by the daemon (most frequent first; strace, so not timed):"
  echo "  dd bs=1M 512 MiB of tensors/$BIG_KEY, fresh mount:"
  echo "$TRACE_T"
  echo "  dd bs=1M 512 MiB of model.safetensors at the tensor, fresh mount:"
  echo "$TRACE_S"
  echo "  cat of all $MANY_COUNT tensors/ files, fresh mount:"
  echo "$TRACE_M"
fi
echo "logs:      $LOGDIR"
