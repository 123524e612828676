#!/usr/bin/env bash
# Benchmarks nemofs serving a large uncompressed .nemo (plain tar) against
# baselines run in the same command on the same tar. See scripts/bench/README.md.
#
#   scripts/bench/bench_archive.sh [--nemofs PATH] [--workdir DIR] [--size-gib N] [--keep]
#                                  [--reps N] [--trace-requests]
set -euo pipefail

BENCH_NAME=bench_archive
WORKDIR=/tmp/nemofs-bench
SIZE_GIB=4
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<EOF
usage: $0 [--nemofs PATH] [--workdir DIR] [--size-gib N] [--keep] [--reps N] [--trace-requests]

  --nemofs PATH      nemofs binary (default: $REPO/build/nemofs); copied into the
                     run directory first so a concurrent rebuild cannot change it mid-run
  --workdir DIR      where the test .nemo, mount point and logs live (default: /tmp/nemofs-bench)
  --size-gib N       size of model_weights.ckpt in GiB, may be fractional (default: 4)
  --keep             keep the test .nemo (reruns with the same size reuse it)
  --reps N           repetitions per figure; medians are reported (default: 3)
  --trace-requests   extra passes: strace the daemon during a 512 MiB sequential read and
                     during random 4 KiB reads; print histograms of the read request sizes
EOF
}

while (($#)); do
  case $1 in
    --size-gib) SIZE_GIB=${2:?--size-gib needs a number}; shift 2 ;;
    *) common_arg "$@"; shift "$ARG_SHIFT" ;;
  esac
done

[[ $SIZE_GIB =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--size-gib: not a number: $SIZE_GIB"
check_common fusermount3 getfattr dd tar awk
setup_workdir

SIZE_BYTES=$(awk -v g="$SIZE_GIB" 'BEGIN { printf "%.0f", int(g * 1024 + 0.5) * 1048576 }')  # %.0f: mawk clamps %d to 2^31-1
((SIZE_BYTES > 0)) || die "--size-gib too small"
TAR="$WORKDIR/bench_${SIZE_GIB}gib.nemo"
BENCH_TARS=("$TAR")
EXPECT=$SIZE_BYTES  # for dd_rate: every dd reads the whole member
setup_run
install_cleanup

# ---- 1. the test .nemo ----------------------------------------------------------
need_kib=$(((SIZE_BYTES / 1024) * 2 + 1048576))  # staged weights + tar + 1 GiB
avail_kib=$(free_kib "$WORKDIR")
if [[ ! -e $TAR ]] && ((avail_kib < need_kib)); then
  die "$WORKDIR: $((avail_kib / 1048576)) GiB free, need about $((need_kib / 1048576)) GiB; use a smaller --size-gib"
fi
echo "== test .nemo: $TAR (model_weights.ckpt = $SIZE_GIB GiB)"
info=$("$PY" "$SCRIPT_DIR/make_bench_nemo.py" "$TAR" "$SIZE_BYTES") || die "make_bench_nemo.py failed"
read -r OFFSET MEMBER_SIZE TAR_BYTES REUSED < <(json_get "$info" offset_data size tar_bytes reused)
if [[ $REUSED == True ]]; then how=reused; else how=created; fi
echo "   $how: $TAR_BYTES bytes, ./model_weights.ckpt at offset_data=$OFFSET, size=$MEMBER_SIZE"
[[ $MEMBER_SIZE == "$SIZE_BYTES" ]] || die "member size $MEMBER_SIZE != $SIZE_BYTES"

mem_avail_kib=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
if ((mem_avail_kib < (TAR_BYTES / 1024) * 2 + 1048576)); then
  echo "   WARNING: MemAvailable $((mem_avail_kib / 1024)) MiB < 2 x tar + 1 GiB: the tar and the" \
    "mount's page cache may not both stay cached; repeated-pass and baseline figures will suffer" >&2
fi
echo "== warming the page cache (cat tar > /dev/null)"
cat "$TAR" >/dev/null

# ---- 2a. mount until first ls ------------------------------------------------------
echo "== a. mount -> first ls, vs tar -tf (x$REPS)"
MOUNT_MS=() TARTF_MS=()
for ((i = 1; i <= REPS; i++)); do
  t0=$(now_ns)
  timeout "$T" tar -tf "$TAR" >/dev/null
  TARTF_MS+=("$(ms_since "$t0")")

  t0=$(now_ns)
  mount_start "$TAR"
  timeout "$T" ls "$MNT" >/dev/null
  MOUNT_MS+=("$(ms_since "$t0")")
  record_pid
  umount_now
  echo "   rep $i: mount+ls ${MOUNT_MS[-1]} ms, tar -tf ${TARTF_MS[-1]} ms"
done

# ---- 2b. sequential read -----------------------------------------------------------
echo "== b. sequential read of archive/model_weights.ckpt (dd bs=1M), vs dd of the tar byte range (x$REPS)"
SEQ_BASE=() SEQ_FIRST=() SEQ_AGAIN=() SEQ_RSS=() SEQ_SHM=()
# Reference for the fresh-mount pass: a first read through the mount has to fill
# N GiB of new page cache (the mounted file's, separate from the tar's). Copying the
# same range into a new tmpfs file costs that allocation + copy without FUSE.
if shm_has_room $((SIZE_BYTES / 1024 + 524288)); then
  SHM_FILE="$SHM_DIR/nemofs-bench.$$"
fi
for ((i = 1; i <= REPS; i++)); do
  seq_baselines "$TAR" "$OFFSET" "$SIZE_BYTES"
  mount_fresh "$TAR"
  if ((i == 1)); then read_bdi_ra; fi
  SEQ_FIRST+=("$(dd_rate if="$MNT/archive/model_weights.ckpt")")
  SEQ_AGAIN+=("$(dd_rate if="$MNT/archive/model_weights.ckpt")")
  umount_now
  if ((${#RSS_ALL[@]})); then SEQ_RSS+=("${RSS_ALL[-1]}"); fi
  echo "   rep $i: baseline ${SEQ_BASE[-1]} GB/s, into tmpfs $shm_msg GB/s, fresh mount ${SEQ_FIRST[-1]} GB/s, repeated ${SEQ_AGAIN[-1]} GB/s"
done
read_fuse_init

# ---- 2c. random 4 KiB reads --------------------------------------------------------
NRAND=1000
echo "== c. $NRAND random 4 KiB preads (fixed seed), fresh mount vs the tar at offset_data+off (x$REPS)"
RND_BASE=() RND_FUSE=() RND_BASE_US=() RND_FUSE_US=()
for ((i = 1; i <= REPS; i++)); do
  b=$("$PY" "$SCRIPT_DIR/rand_read.py" "$TAR" "$OFFSET" "$SIZE_BYTES" --count "$NRAND")
  mount_fresh "$TAR"
  f=$(timeout "$T" "$PY" "$SCRIPT_DIR/rand_read.py" "$MNT/archive/model_weights.ckpt" 0 "$SIZE_BYTES" --count "$NRAND")
  umount_now
  read -r bms bus bcrc < <(json_get "$b" total_ms us_per_read crc32)
  read -r fms fus fcrc < <(json_get "$f" total_ms us_per_read crc32)
  [[ -n $bcrc && $bcrc == "$fcrc" ]] || die "random reads differ: crc32 tar $bcrc, mount $fcrc"
  RND_BASE+=("$bms") RND_FUSE+=("$fms") RND_BASE_US+=("$bus") RND_FUSE_US+=("$fus")
  echo "   rep $i: mount $(fmt "$fms") ms ($(fmt "$fus") us/read), tar $(fmt "$bms") ms ($(fmt "$bus") us/read), crc32 $fcrc"
done

# ---- optional: request sizes seen by the daemon -----------------------------------
# strace_pass NAME CMD...: fresh mount, strace every daemon thread while CMD runs, unmount
# (strace_daemon); writes to $LOGDIR/hist_NAME.txt a histogram of the lengths the daemon
# read from the tar (splice or pread64 on its fd): one per FUSE read request, so these are
# the kernel's read request sizes.
strace_pass() {
  local name=$1
  shift
  strace_daemon "$name" "$TAR" splice,pread64 "$@"
  { strace_reads "$name" "$TAR" splice,pread64 |
    awk '$(NF - 1) == "=" { c[$NF]++; n++ } END { for (k in c) printf "    %8d bytes x %d\n", k, c[k]; if (!n) print "    (none seen)" }' |
    sort -k4,4 -nr | head -6; } >"$LOGDIR/hist_$name.txt" || true
}
TRACE_SEQ="" TRACE_RND=""
if ((TRACE)); then
  echo "== request sizes: strace of the daemon during a 512 MiB dd, then 200 random 4 KiB preads (fresh mounts)"
  strace_pass seq dd if="$MNT/archive/model_weights.ckpt" bs=1M count=512 of=/dev/null
  strace_pass rnd "$PY" "$SCRIPT_DIR/rand_read.py" "$MNT/archive/model_weights.ckpt" 0 "$SIZE_BYTES" --count 200
  TRACE_SEQ=$(cat "$LOGDIR/hist_seq.txt") TRACE_RND=$(cat "$LOGDIR/hist_rnd.txt")
fi

# ---- 3. summary ----------------------------------------------------------------------
m_mount=$(median "${MOUNT_MS[@]}") m_tartf=$(median "${TARTF_MS[@]}")
m_base=$(median "${SEQ_BASE[@]}") m_first=$(median "${SEQ_FIRST[@]}") m_again=$(median "${SEQ_AGAIN[@]}")
m_rb=$(median "${RND_BASE[@]}") m_rf=$(median "${RND_FUSE[@]}")
m_rbu=$(median "${RND_BASE_US[@]}") m_rfu=$(median "${RND_FUSE_US[@]}")
rss_max_mib=$(kib_to_mib "$(maxof "${RSS_ALL[@]}")")
rss_seq_mib=$(kib_to_mib "$(maxof "${SEQ_RSS[@]}")")

ROW_FMT='%-46s %14s %14s %9s\n'
summary_head "================================ nemofs archive benchmark ================================"
summary_nemofs
echo "archive:   $TAR ($TAR_BYTES bytes); model_weights.ckpt = $MEMBER_SIZE bytes at offset $OFFSET"
summary_table_start
row "a. mount -> first ls (ms) [base: tar -tf]" "$(fmt "$m_mount")" "$(fmt "$m_tartf")" "$(ratio "$m_mount" "$m_tartf")"
row "b. seq read, fresh mount (GB/s) [base: dd]" "$(fmt "$m_first")" "$(fmt "$m_base")" "$(ratio "$m_first" "$m_base")"
if ((${#SEQ_SHM[@]})); then
  m_shm=$(median "${SEQ_SHM[@]}")
  row "b. ... fresh mount vs [base: dd into tmpfs]" "$(fmt "$m_first")" "$(fmt "$m_shm")" "$(ratio "$m_first" "$m_shm")"
fi
row "b. seq read, same mount again (GB/s)" "$(fmt "$m_again")" "$(fmt "$m_base")" "$(ratio "$m_again" "$m_base")"
row "c. $NRAND x 4 KiB random pread, total (ms)" "$(fmt "$m_rf")" "$(fmt "$m_rb")" "$(ratio "$m_rf" "$m_rb")"
row "c. ... per read (us)" "$(fmt "$m_rfu")" "$(fmt "$m_rbu")" "$(ratio "$m_rfu" "$m_rbu")"
row "d. daemon peak RSS, max of all mounts (MiB)" "$rss_max_mib" "-" "-"
row "d. ... max of the seq-read mounts (MiB)" "$rss_seq_mib" "-" "-"
echo
echo "samples: mount+ls ms [${MOUNT_MS[*]}]  tar -tf ms [${TARTF_MS[*]}]"
echo "         seq GB/s baseline [${SEQ_BASE[*]}]  into tmpfs [${SEQ_SHM[*]}]  fresh [${SEQ_FIRST[*]}]  again [${SEQ_AGAIN[*]}]"
echo "         random ms mount [${RND_FUSE[*]}]  tar [${RND_BASE[*]}]"
echo "         VmHWM KiB [${RSS_ALL[*]}]"
if ((TRACE)); then
  echo "FUSE read request sizes served (daemon reads from the tar, most frequent first; strace, so not timed):"
  echo "  dd bs=1M count=512, fresh mount:"
  echo "$TRACE_SEQ"
  echo "  200 random 4 KiB preads, fresh mount:"
  echo "$TRACE_RND"
fi
echo "logs:      $LOGDIR"
