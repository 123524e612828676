# shellcheck shell=bash disable=SC2034  # it sets variables for the sourcing script
# Shared by the nemofs benchmarks (bench_archive.sh, bench_tensors.sh); sourced, not run.
# The sourcing script sets BENCH_NAME (the prefix of its messages, e.g. bench_archive),
# WORKDIR (its default work directory) and defines usage(). See scripts/bench/README.md.
#
# Flow of a benchmark script:
#   parse the options (common_arg for the shared ones), check_common TOOLS...,
#   setup_workdir, set its test .nemo paths (BENCH_TARS), setup_run, install_cleanup;
#   then mount_fresh SOURCE / umount_now around its measurements, and summary_* to print.

: "${BENCH_NAME:?set BENCH_NAME before sourcing lib.sh}"

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
PY=/usr/bin/python3
T=300  # seconds: timeout for every command that touches a mount

# defaults of the shared options
NEMOFS="$REPO/build/nemofs"
KEEP=0
REPS=3
TRACE=0

BENCH_TARS=()    # the test .nemo files: removed at exit unless --keep (and their .stage/.tmp)
TEMP_PATHS=()    # more files or directories to remove at exit
SHM_DIR=/dev/shm
SHM_FILE=""      # tmpfs file for the "dd into tmpfs" reference; empty: not used
BDI_RA="?"       # read_ahead_kb of the mount's bdi (read_bdi_ra)
FUSE_INIT=""     # the daemon's last logged FUSE init line (read_fuse_init)

die() { echo "$BENCH_NAME: $*" >&2; exit 1; }

# ---- options and setup -------------------------------------------------------------
# common_arg ARGS...: handles the shared option at $1 (or -h/--help, or an unknown
# option: usage and exit); sets ARG_SHIFT to the number of words it used.
common_arg() {
  ARG_SHIFT=1
  case $1 in
    --nemofs) NEMOFS=${2:?--nemofs needs a path}; ARG_SHIFT=2 ;;
    --workdir) WORKDIR=${2:?--workdir needs a directory}; ARG_SHIFT=2 ;;
    --keep) KEEP=1 ;;
    --reps) REPS=${2:?--reps needs a number}; ARG_SHIFT=2 ;;
    --trace-requests) TRACE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
}

# check_common TOOLS...: the binary, --reps, the TOOLS, and strace for --trace-requests.
check_common() {
  local tool
  [[ -x $NEMOFS ]] || die "$NEMOFS: not an executable (build it, or pass --nemofs)"
  [[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps: not a positive integer: $REPS"
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup.sh)"
  done
  ((TRACE == 0)) || command -v strace >/dev/null || die "--trace-requests needs strace"
}

# Creates WORKDIR, makes it absolute and takes its lock (one run per workdir).
setup_workdir() {
  mkdir -p "$WORKDIR"
  WORKDIR=$(cd "$WORKDIR" && pwd)
  [[ $WORKDIR != *[[:space:]]* ]] || die "--workdir must not contain whitespace"
  exec 9>"$WORKDIR/.lock"
  flock -n 9 || die "another $BENCH_NAME.sh is running with workdir $WORKDIR"
}

# Fresh LOGDIR; RUN_DIR with the mount point MNT and BIN, a copy of NEMOFS.
setup_run() {
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
  CLI_LOG="$LOGDIR/cli.log"        # stderr of the nemofs commands (mount, umount, info)
}

free_kib() { df -Pk "$1" | awk 'NR == 2 { print $4 }'; }

# shm_has_room KIB: true if SHM_DIR has more than KIB KiB free.
shm_has_room() {
  local kib
  kib=$(free_kib "$SHM_DIR" 2>/dev/null) || kib=0
  ((${kib:-0} > $1))
}

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
    timeout 30 fusermount3 -u "$MNT" 2>>"$CLI_LOG" || echo "$BENCH_NAME: fusermount3 -u $MNT failed" >&2
  fi
  if [[ -n $pid ]] && ! wait_gone "$pid" 30; then
    echo "$BENCH_NAME: daemon $pid still running 30 s after unmount; killing it" >&2
    kill "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || kill -9 "$pid" 2>/dev/null || true
  fi
  if is_mounted; then
    timeout 30 fusermount3 -u "$MNT" 2>>"$CLI_LOG" || timeout 30 fusermount3 -uz "$MNT" 2>>"$CLI_LOG" || true
  fi
  if is_mounted; then echo "$BENCH_NAME: WARNING: $MNT is still mounted" >&2; fi
  CUR_PID=""
}

# At exit: unmount, remove the run directory, SHM_FILE, TEMP_PATHS and (unless --keep)
# BENCH_TARS; on failure say where the logs are.
cleanup() {
  local rc=$? f
  trap - EXIT INT TERM
  force_unmount || true
  if ! is_mounted; then rm -rf "$RUN_DIR"; fi
  if [[ -n $SHM_FILE ]]; then rm -f "$SHM_FILE"; fi
  rm -rf "${TEMP_PATHS[@]}"
  for f in "${BENCH_TARS[@]}"; do rm -rf "$f.stage" "$f.tmp"; done
  if ((KEEP == 0)); then
    rm -f "${BENCH_TARS[@]}"
  else
    for f in "${BENCH_TARS[@]}"; do
      if [[ -e $f ]]; then echo "$BENCH_NAME: kept $f"; fi
    done
  fi
  ((rc == 0)) || echo "$BENCH_NAME: failed (rc=$rc); logs in $LOGDIR" >&2
  exit "$rc"
}
install_cleanup() {
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# Starts a mount of SOURCE (the mount point must be free). Leaves CUR_PID unset.
mount_start() {
  is_mounted && die "$MNT is already mounted"
  timeout "$T" "$BIN" mount "$1" "$MNT" --log-level debug --log-file "$DAEMON_LOG" 2>>"$CLI_LOG" ||
    die "nemofs mount $1 failed (see $CLI_LOG, $DAEMON_LOG)"
}
record_pid() {
  CUR_PID=$(timeout "$T" getfattr --only-values -n user.nemofs.pid "$MNT" 2>>"$CLI_LOG") ||
    die "cannot read user.nemofs.pid on $MNT"
  [[ $CUR_PID =~ ^[0-9]+$ ]] || die "bad daemon pid '$CUR_PID'"
}
mount_fresh() { mount_start "$1"; record_pid; }  # SOURCE; leaves CUR_PID set

# Records the daemon's VmHWM, then unmounts with nemofs umount (waits for the daemon).
umount_now() {
  local hwm
  hwm=$(status_kib VmHWM) || hwm=""
  if [[ -n $hwm ]]; then RSS_ALL+=("$hwm"); fi
  if ! timeout "$T" "$BIN" umount "$MNT" 2>>"$CLI_LOG"; then
    echo "$BENCH_NAME: nemofs umount failed; forcing" >&2
    force_unmount
  fi
  CUR_PID=""
}

# status_kib FIELD: FIELD (VmRSS, VmHWM, ...) of the current daemon's /proc status, in KiB.
status_kib() { awk -v k="$1:" '$1 == k { print $2; f = 1 } END { exit !f }' "/proc/$CUR_PID/status" 2>/dev/null; }

# Sets BDI_RA from the current mount's bdi, if the kernel shows it.
read_bdi_ra() {
  local dev
  dev=$(timeout "$T" mountpoint -d "$MNT" 2>/dev/null) || dev=""
  if [[ -n $dev && -r /sys/class/bdi/$dev/read_ahead_kb ]]; then
    BDI_RA=$(cat "/sys/class/bdi/$dev/read_ahead_kb")
  fi
}
read_fuse_init() { FUSE_INIT=$(grep -o 'init: .*' "$DAEMON_LOG" 2>/dev/null | tail -1) || FUSE_INIT=""; }

# strace_daemon NAME SOURCE SYSCALLS CMD...: fresh mount of SOURCE, strace SYSCALLS
# (comma-separated) in every daemon thread, one file per thread ($LOGDIR/strace_NAME.*,
# so no interleaved lines), while CMD runs; then unmount.
strace_daemon() {
  local name=$1 src=$2 calls=$3 spid
  shift 3
  mount_fresh "$src"
  rm -f "$LOGDIR/strace_$name".*
  strace -ff -qq -y -e trace="$calls" -o "$LOGDIR/strace_$name" -p "$CUR_PID" 2>>"$CLI_LOG" &
  spid=$!
  sleep 1
  timeout "$T" "$@" >/dev/null 2>&1 || echo "$BENCH_NAME: trace command failed: $*" >&2
  sleep 0.5
  kill -INT "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  umount_now
}
# strace_reads NAME SOURCE SYSCALLS: the lines of strace_daemon NAME that are SYSCALLS on SOURCE.
strace_reads() {
  cat "$LOGDIR/strace_$1".* 2>/dev/null | grep -E "^(${3//,/|})\([0-9]+<$2>"
}

# ---- measuring and arithmetic --------------------------------------------------------
now_ns() { date +%s%N; }

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print ((NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
maxof() { printf '%s\n' "$@" | sort -g | tail -1; }
minof() { printf '%s\n' "$@" | sort -g | head -1; }
dur() { awk -v m="$1" 'BEGIN { if (m < 1000) printf "%.2f ms", m; else printf "%.2f s", m / 1000 }'; }
rel() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3g", a / b; else print "-" }'; }
# line_row BASE_MS MEASURE SAMPLES_MS...: a markdown table row of MEASURE: the
# median, min – max and the median's ratio to BASE_MS.
line_row() {
  local base=$1 what=$2 m
  shift 2
  m=$(median "$@")
  printf '| %s | %s | %s – %s | %s |\n' "$what" "$(dur "$m")" "$(dur "$(minof "$@")")" "$(dur "$(maxof "$@")")" "$(rel "$m" "$base")"
}
fmt() { awk -v x="$1" -v f="${2:-%.2f}" 'BEGIN { printf f, x }'; }
ms_since() { awk -v d="$(($(now_ns) - $1))" 'BEGIN { printf "%.2f", d / 1e6 }'; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

# dd ARGS... -> prints "GB/s" (decimal, as dd does) from dd's own byte count and
# seconds; checks dd copied EXPECT bytes. Output goes to /dev/null unless DD_OUT names a file.
dd_rate() {
  local out line bytes secs
  out=$(LC_ALL=C timeout "$T" dd bs=1M of="${DD_OUT:-/dev/null}" "$@" 2>&1) || die "dd $* failed: $out"
  line=$(grep ' copied, ' <<<"$out" | tail -1)
  bytes=${line%% bytes*}
  secs=$(sed -n 's/.* copied, \([0-9.e+-]*\) s,.*/\1/p' <<<"$line")
  [[ $bytes == "$EXPECT" ]] || die "dd $*: read $bytes bytes, expected $EXPECT"
  awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.3f", b / s / 1e9 }'
}

# seq_baselines TAR OFFSET COUNT: one repetition of the sequential-read references,
# dd of COUNT bytes of TAR at OFFSET to /dev/null (appended to SEQ_BASE) and, if
# SHM_FILE is set, into that new tmpfs file (to SEQ_SHM); shm_msg = the latter or n/a.
seq_baselines() {
  SEQ_BASE+=("$(dd_rate if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3")")
  if [[ -n $SHM_FILE ]]; then
    SEQ_SHM+=("$(DD_OUT=$SHM_FILE dd_rate if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3")")
    rm -f "$SHM_FILE"
  fi
  shm_msg=n/a
  if ((${#SEQ_SHM[@]})); then shm_msg=${SEQ_SHM[-1]}; fi
}

# json_get JSON KEY...: the values of KEYs (a.b for nested objects), space-separated.
json_get() { "$PY" -c 'import json, sys; d = json.loads(sys.argv[1]); print(*(eval("d" + "".join("[%r]" % p for p in k.split("."))) for k in sys.argv[2:]))' "$@"; }

# ---- summary -------------------------------------------------------------------------
# row FIGURE NEMOFS BASELINE RATIO: one line of the table, in the script's ROW_FMT.
row() {
  # shellcheck disable=SC2059  # ROW_FMT is the script's printf format
  printf "$ROW_FMT" "$@"
}

# summary_head TITLE: a blank line, the title bar, then the machine and date lines.
summary_head() {
  echo
  echo "$1"
  echo "machine:   $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r)"
  echo "date:      $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
}
summary_nemofs() {
  local version
  version=$("$BIN" --version 2>/dev/null | head -1) || version="?"
  echo "nemofs:    $NEMOFS ($version, $BIN_INFO; copied at start of run)"
}
# The FUSE settings, what the figures mean, and the table's header.
summary_table_start() {
  echo "fuse:      ${FUSE_INIT:-init line not logged}; bdi read_ahead_kb $BDI_RA"
  echo "medians of $REPS; GB/s = 1e9 bytes/s; ratio = nemofs / baseline (time: >1 slower, GB/s: <1 slower)"
  echo
  row "figure" "nemofs" "baseline" "ratio"
  row "------" "------" "--------" "-----"
}

# Writes DST: the safetensors file SRC without tensor KEY (the offsets of the others redone).
safetensors_without() {  # SRC DST KEY
  "$PY" - "$@" <<'EOF'
import json, sys
src, dst, drop = sys.argv[1:4]
with open(src, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    h = json.loads(f.read(n))
    base = 8 + n
    meta = h.pop("__metadata__", None)
    out, at = {}, 0
    for k, v in h.items():
        if k == drop: continue
        b, e = v["data_offsets"]
        out[k] = dict(v, data_offsets=[at, at + e - b]); at += e - b
    if meta: out["__metadata__"] = meta
    hj = json.dumps(out).encode(); hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(dst, "wb") as o:
        o.write(len(hj).to_bytes(8, "little") + hj)
        for k, v in h.items():
            if k == drop: continue
            b, e = v["data_offsets"]; f.seek(base + b)
            left = e - b
            while left:
                chunk = f.read(min(left, 4 << 20)); o.write(chunk); left -= len(chunk)
EOF
}
