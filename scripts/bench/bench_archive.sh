#!/usr/bin/env bash
# Benchmarks nemofs serving a large uncompressed .nemo (plain tar) against
# baselines run in the same command on the same tar. See scripts/bench/README.md.
#
#   scripts/bench/bench_archive.sh [--nemofs PATH] [--workdir DIR] [--size-gib N] [--keep]
#                                  [--reps N] [--trace-requests]
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
PY=/usr/bin/python3
T=300  # seconds: timeout for every command that touches a mount

NEMOFS="$REPO/build/nemofs"
WORKDIR=/tmp/nemofs-bench
SIZE_GIB=4
KEEP=0
REPS=3
TRACE=0

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

die() { echo "bench_archive: $*" >&2; exit 1; }

while (($#)); do
  case $1 in
    --nemofs) NEMOFS=${2:?--nemofs needs a path}; shift 2 ;;
    --workdir) WORKDIR=${2:?--workdir needs a directory}; shift 2 ;;
    --size-gib) SIZE_GIB=${2:?--size-gib needs a number}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --reps) REPS=${2:?--reps needs a number}; shift 2 ;;
    --trace-requests) TRACE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

[[ -x $NEMOFS ]] || die "$NEMOFS: not an executable (build it, or pass --nemofs)"
[[ $SIZE_GIB =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--size-gib: not a number: $SIZE_GIB"
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps: not a positive integer: $REPS"
for tool in fusermount3 getfattr dd tar awk; do
  command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup.sh)"
done
((TRACE == 0)) || command -v strace >/dev/null || die "--trace-requests needs strace"

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
[[ $WORKDIR != *[[:space:]]* ]] || die "--workdir must not contain whitespace"
exec 9>"$WORKDIR/.lock"
flock -n 9 || die "another bench_archive.sh is running with workdir $WORKDIR"

SIZE_BYTES=$(awk -v g="$SIZE_GIB" 'BEGIN { printf "%.0f", int(g * 1024 + 0.5) * 1048576 }')  # %.0f: mawk clamps %d to 2^31-1
((SIZE_BYTES > 0)) || die "--size-gib too small"
TAR="$WORKDIR/bench_${SIZE_GIB}gib.nemo"
LOGDIR="$WORKDIR/logs"
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
RUN_DIR=$(mktemp -d "$WORKDIR/run.XXXXXX")
MNT="$RUN_DIR/mnt"
mkdir "$MNT"
BIN="$RUN_DIR/nemofs"
cp "$NEMOFS" "$BIN"
BIN_INFO="$(date -u -r "$NEMOFS" '+built %Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$BIN" | cut -c1-12)"
"$BIN" --version >/dev/null 2>&1 || die "$NEMOFS --version failed (being rebuilt right now?)"
DAEMON_LOG="$LOGDIR/daemon.log"  # nemofs --log-file (debug level)
CLI_LOG="$LOGDIR/cli.log"        # stderr of nemofs mount/umount

# ---- mount bookkeeping and cleanup ---------------------------------------------
CUR_PID=""       # daemon of the mount currently up (started by this script)
RSS_ALL=()       # VmHWM (KiB) of every daemon, read just before its unmount

is_mounted() { awk -v m="$MNT" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# True if PID is still a live (non-zombie) nemofs daemon serving our mount point.
our_daemon_alive() {
  local pid=$1 cmd state
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  state=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmd == "$BIN "*" $MNT"* ]]
}

wait_gone() {  # PID SECONDS
  local pid=$1 deadline=$((SECONDS + $2))
  while our_daemon_alive "$pid"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

# Unmounts MNT whatever state it is in; kills only the daemon this script started.
force_unmount() {
  local pid=$CUR_PID
  if [[ -z $pid ]] && is_mounted; then
    pid=$(timeout 10 getfattr --only-values -n user.nemofs.pid "$MNT" 2>/dev/null) || pid=""
  fi
  if is_mounted; then
    timeout 30 fusermount3 -u "$MNT" 2>>"$CLI_LOG" || echo "bench_archive: fusermount3 -u $MNT failed" >&2
  fi
  if [[ -n $pid ]] && ! wait_gone "$pid" 30; then
    echo "bench_archive: daemon $pid still running 30 s after unmount; killing it" >&2
    kill "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || kill -9 "$pid" 2>/dev/null || true
  fi
  if is_mounted; then
    timeout 30 fusermount3 -u "$MNT" 2>>"$CLI_LOG" || timeout 30 fusermount3 -uz "$MNT" 2>>"$CLI_LOG" || true
  fi
  if is_mounted; then echo "bench_archive: WARNING: $MNT is still mounted" >&2; fi
  CUR_PID=""
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  force_unmount || true
  if ! is_mounted; then rm -rf "$RUN_DIR"; fi
  rm -rf "$TAR.stage" "$TAR.tmp"
  if [[ -n ${SHM_FILE:-} ]]; then rm -f "$SHM_FILE"; fi
  if ((KEEP == 0)); then
    rm -f "$TAR"
  elif [[ -e $TAR ]]; then
    echo "bench_archive: kept $TAR"
  fi
  ((rc == 0)) || echo "bench_archive: failed (rc=$rc); logs in $LOGDIR" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now_ns() { date +%s%N; }

# Starts a mount (the mount point must be free). Leaves CUR_PID set.
mount_start() {
  is_mounted && die "$MNT is already mounted"
  timeout "$T" "$BIN" mount "$TAR" "$MNT" --log-level debug --log-file "$DAEMON_LOG" 2>>"$CLI_LOG" ||
    die "nemofs mount failed (see $CLI_LOG, $DAEMON_LOG)"
}
record_pid() {
  CUR_PID=$(timeout "$T" getfattr --only-values -n user.nemofs.pid "$MNT" 2>>"$CLI_LOG") ||
    die "cannot read user.nemofs.pid on $MNT"
  [[ $CUR_PID =~ ^[0-9]+$ ]] || die "bad daemon pid '$CUR_PID'"
}
mount_fresh() { mount_start; record_pid; }

# Records the daemon's VmHWM, then unmounts with nemofs umount (waits for the daemon).
umount_now() {
  local hwm
  hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$CUR_PID/status" 2>/dev/null) || hwm=""
  if [[ -n $hwm ]]; then RSS_ALL+=("$hwm"); fi
  if ! timeout "$T" "$BIN" umount "$MNT" 2>>"$CLI_LOG"; then
    echo "bench_archive: nemofs umount failed; forcing" >&2
    force_unmount
  fi
  CUR_PID=""
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print ((NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
maxof() { printf '%s\n' "$@" | sort -g | tail -1; }
fmt() { awk -v x="$1" -v f="${2:-%.2f}" 'BEGIN { printf f, x }'; }
ms_since() { awk -v d="$(($(now_ns) - $1))" 'BEGIN { printf "%.2f", d / 1e6 }'; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

# dd ARGS... -> prints "GB/s" (decimal, as dd does) from dd's own byte count and
# seconds. Output goes to /dev/null unless DD_OUT names a file.
dd_rate() {
  local out line bytes secs
  out=$(LC_ALL=C timeout "$T" dd bs=1M of="${DD_OUT:-/dev/null}" "$@" 2>&1) || die "dd $* failed: $out"
  line=$(grep ' copied, ' <<<"$out" | tail -1)
  bytes=${line%% bytes*}
  secs=$(sed -n 's/.* copied, \([0-9.e+-]*\) s,.*/\1/p' <<<"$line")
  [[ $bytes == "$SIZE_BYTES" ]] || die "dd $*: read $bytes bytes, expected $SIZE_BYTES"
  awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.3f", b / s / 1e9 }'
}

json_get() { "$PY" -c 'import json, sys; d = json.loads(sys.argv[1]); print(*(d[k] for k in sys.argv[2:]))' "$@"; }

# ---- 1. the test .nemo ----------------------------------------------------------
need_kib=$(((SIZE_BYTES / 1024) * 2 + 1048576))  # staged weights + tar + 1 GiB
avail_kib=$(df -Pk "$WORKDIR" | awk 'NR == 2 { print $4 }')
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
  mount_start
  timeout "$T" ls "$MNT" >/dev/null
  MOUNT_MS+=("$(ms_since "$t0")")
  record_pid
  umount_now
  echo "   rep $i: mount+ls ${MOUNT_MS[-1]} ms, tar -tf ${TARTF_MS[-1]} ms"
done

# ---- 2b. sequential read -----------------------------------------------------------
echo "== b. sequential read of archive/model_weights.ckpt (dd bs=1M), vs dd of the tar byte range (x$REPS)"
SEQ_BASE=() SEQ_FIRST=() SEQ_AGAIN=() SEQ_RSS=() SEQ_SHM=()
BDI_RA="?" FUSE_INIT=""
# Reference for the fresh-mount pass: a first read through the mount has to fill
# N GiB of new page cache (the mounted file's, separate from the tar's). Copying the
# same range into a new tmpfs file costs that allocation + copy without FUSE.
SHM_DIR=/dev/shm
SHM_FILE=""
shm_avail_kib=$(df -Pk "$SHM_DIR" 2>/dev/null | awk 'NR == 2 { print $4 }') || shm_avail_kib=0
if ((${shm_avail_kib:-0} > SIZE_BYTES / 1024 + 524288)); then
  SHM_FILE="$SHM_DIR/nemofs-bench.$$"
fi
for ((i = 1; i <= REPS; i++)); do
  SEQ_BASE+=("$(dd_rate if="$TAR" iflag=skip_bytes,count_bytes skip="$OFFSET" count="$SIZE_BYTES")")
  if [[ -n $SHM_FILE ]]; then
    SEQ_SHM+=("$(DD_OUT=$SHM_FILE dd_rate if="$TAR" iflag=skip_bytes,count_bytes skip="$OFFSET" count="$SIZE_BYTES")")
    rm -f "$SHM_FILE"
  fi
  mount_fresh
  if ((i == 1)); then
    dev=$(timeout "$T" mountpoint -d "$MNT" 2>/dev/null) || dev=""
    [[ -n $dev && -r /sys/class/bdi/$dev/read_ahead_kb ]] && BDI_RA=$(cat "/sys/class/bdi/$dev/read_ahead_kb")
  fi
  SEQ_FIRST+=("$(dd_rate if="$MNT/archive/model_weights.ckpt")")
  SEQ_AGAIN+=("$(dd_rate if="$MNT/archive/model_weights.ckpt")")
  umount_now
  if ((${#RSS_ALL[@]})); then SEQ_RSS+=("${RSS_ALL[-1]}"); fi
  shm_msg=n/a
  if ((${#SEQ_SHM[@]})); then shm_msg=${SEQ_SHM[-1]}; fi
  echo "   rep $i: baseline ${SEQ_BASE[-1]} GB/s, into tmpfs $shm_msg GB/s, fresh mount ${SEQ_FIRST[-1]} GB/s, repeated ${SEQ_AGAIN[-1]} GB/s"
done
FUSE_INIT=$(grep -o 'init: .*' "$DAEMON_LOG" 2>/dev/null | tail -1) || FUSE_INIT=""

# ---- 2c. random 4 KiB reads --------------------------------------------------------
NRAND=1000
echo "== c. $NRAND random 4 KiB preads (fixed seed), fresh mount vs the tar at offset_data+off (x$REPS)"
RND_BASE=() RND_FUSE=() RND_BASE_US=() RND_FUSE_US=()
for ((i = 1; i <= REPS; i++)); do
  b=$("$PY" "$SCRIPT_DIR/rand_read.py" "$TAR" "$OFFSET" "$SIZE_BYTES" --count "$NRAND")
  mount_fresh
  f=$(timeout "$T" "$PY" "$SCRIPT_DIR/rand_read.py" "$MNT/archive/model_weights.ckpt" 0 "$SIZE_BYTES" --count "$NRAND")
  umount_now
  read -r bms bus bcrc < <(json_get "$b" total_ms us_per_read crc32)
  read -r fms fus fcrc < <(json_get "$f" total_ms us_per_read crc32)
  [[ -n $bcrc && $bcrc == "$fcrc" ]] || die "random reads differ: crc32 tar $bcrc, mount $fcrc"
  RND_BASE+=("$bms") RND_FUSE+=("$fms") RND_BASE_US+=("$bus") RND_FUSE_US+=("$fus")
  echo "   rep $i: mount $(fmt "$fms") ms ($(fmt "$fus") us/read), tar $(fmt "$bms") ms ($(fmt "$bus") us/read), crc32 $fcrc"
done

# ---- optional: request sizes seen by the daemon -----------------------------------
# strace_pass NAME CMD...: fresh mount, strace every daemon thread (one file per
# thread, so no interleaved lines) while CMD runs, unmount; writes to $LOGDIR/hist_NAME.txt a
# histogram of the lengths the daemon read from the tar (splice or pread64 on its fd):
# one per FUSE read request, so these are the kernel's read request sizes.
strace_pass() {
  local name=$1 spid
  shift
  mount_fresh
  rm -f "$LOGDIR/strace_$name".*
  strace -ff -qq -y -e trace=splice,pread64 -o "$LOGDIR/strace_$name" -p "$CUR_PID" 2>>"$CLI_LOG" &
  spid=$!
  sleep 1
  timeout "$T" "$@" >/dev/null 2>&1 || echo "bench_archive: trace command failed: $*" >&2
  sleep 0.5
  kill -INT "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  umount_now
  { cat "$LOGDIR/strace_$name".* 2>/dev/null | grep -E "^(splice|pread64)\([0-9]+<$TAR>" |
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
version=$("$BIN" --version 2>/dev/null | head -1) || version="?"

row() { printf '%-46s %14s %14s %9s\n' "$@"; }
echo
echo "================================ nemofs archive benchmark ================================"
echo "machine:   $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r)"
echo "date:      $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "nemofs:    $NEMOFS ($version, $BIN_INFO; copied at start of run)"
echo "archive:   $TAR ($TAR_BYTES bytes); model_weights.ckpt = $MEMBER_SIZE bytes at offset $OFFSET"
echo "fuse:      ${FUSE_INIT:-init line not logged}; bdi read_ahead_kb $BDI_RA"
echo "medians of $REPS; GB/s = 1e9 bytes/s; ratio = nemofs / baseline (time: >1 slower, GB/s: <1 slower)"
echo
row "figure" "nemofs" "baseline" "ratio"
row "------" "------" "--------" "-----"
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
