#!/usr/bin/env bash
# Benchmarks a tensor write committed through a read-write nemofs mount of a plain .nemo
# (the tensor's bytes patched in place under a rollback journal, issue 10) against a direct
# `dd conv=notrunc,fsync` of the same bytes into the archive at the tensor's offset and
# against `nemofs repack` of the archive (the O(checkpoint) rewrite), all in the same run.
# See scripts/bench/README.md.
#
#   scripts/bench/bench_tensor_write.sh [--nemofs PATH] [--workdir DIR] [--size-gib N]
#                                       [--tensor-mib N] [--reps N] [--keep]
#   SIZE_GIB=1 TENSOR_MIB=64 scripts/bench/bench_tensor_write.sh   (sizes by environment)
set -euo pipefail

BENCH_NAME=bench_tensor_write
WORKDIR=/tmp/nemofs-bench-tensor-write
SIZE_GIB=${SIZE_GIB:-4}
TENSOR_MIB=${TENSOR_MIB:-256}
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
REPS=5

usage() {
  cat <<EOF
usage: $0 [--nemofs PATH] [--workdir DIR] [--size-gib N] [--tensor-mib N] [--reps N] [--keep]

  --nemofs PATH      nemofs binary (default: $REPO/build/nemofs); copied into the run
                     directory first so a concurrent rebuild cannot change it mid-run
  --workdir DIR      where the test .nemo, the payloads, the repack output, the mount point
                     and the logs live (default: /tmp/nemofs-bench-tensor-write)
  --size-gib N       tensor bytes of model_weights.ckpt in GiB, may be fractional
                     (default: \$SIZE_GIB or 4)
  --tensor-mib N     size of the tensor that is overwritten, MiB, a multiple of 4
                     (default: \$TENSOR_MIB or 256)
  --reps N           timed repetitions of each measure; medians are reported (default: 5)
  --keep             keep the test .nemo (a rerun with the same sizes reuses it)
EOF
}

while (($#)); do
  case $1 in
    --size-gib) SIZE_GIB=${2:?--size-gib needs a number}; shift 2 ;;
    --tensor-mib) TENSOR_MIB=${2:?--tensor-mib needs a number}; shift 2 ;;
    *) common_arg "$@"; shift "$ARG_SHIFT" ;;
  esac
done
((TRACE == 0)) || die "--trace-requests is not supported by this benchmark"
[[ $SIZE_GIB =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--size-gib: not a number: $SIZE_GIB"
if ! [[ $TENSOR_MIB =~ ^[1-9][0-9]*$ ]] || ((TENSOR_MIB % 4)); then die "--tensor-mib: not a positive multiple of 4: $TENSOR_MIB"; fi
check_common fusermount3 getfattr dd cmp stat awk df
"$PY" -c 'import torch, numpy' 2>/dev/null || die "$PY cannot import torch and numpy (apt-get install python3-torch python3-numpy)"

# sizes in bytes, the total rounded to 4 MiB (the generator's unit)
TOTAL_BYTES=$(awk -v g="$SIZE_GIB" 'BEGIN { printf "%.0f", int(g * 256 + 0.5) * 4194304 }')
TENSOR_BYTES=$((TENSOR_MIB * 1048576))
((TOTAL_BYTES >= TENSOR_BYTES)) || die "--size-gib $SIZE_GIB is smaller than the $TENSOR_MIB MiB tensor"

setup_workdir
TAR="$WORKDIR/write_${SIZE_GIB}gib_${TENSOR_MIB}mib.nemo"
BENCH_TARS=("$TAR")
# Disk: while the .nemo is built, the staged ckpt + the tar (2 x total); later the tar, one
# repack output (deleted after each repetition), two payloads and the journal; + 1 GiB slack.
NEED_KIB=$(((2 * TOTAL_BYTES + 3 * TENSOR_BYTES) / 1024 + 1048576))
if [[ -e $TAR ]]; then NEED_KIB=$((NEED_KIB - $(stat -c %s "$TAR") / 1024)); fi
avail_kib=$(free_kib "$WORKDIR")
((avail_kib >= NEED_KIB)) || die "$WORKDIR: $((avail_kib / 1048576)) GiB free, need about $(((NEED_KIB + 1048575) / 1048576)) GiB (pass a smaller --size-gib or SIZE_GIB, or another --workdir)"
setup_run
install_cleanup
CLK_TCK=$(getconf CLK_TCK)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
OUT="$RUN_DIR/repacked.nemo"   # in RUN_DIR: removed at exit
CUR="$RUN_DIR/cur.bin"         # the tensor's bytes as stored at the start
NEW="$RUN_DIR/new.bin"         # the same floats with their sign bits flipped: every word differs
JOURNAL="$TAR.nemofs-journal"
JPOLL_STOP="$RUN_DIR/jpoll.stop"
JPOLL_OUT="$RUN_DIR/jpoll.out"

# ms_between T0 T1: milliseconds from T0 to T1 ($EPOCHREALTIME values); no fork while timing.
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) * 1000 }'; }
cpu_ticks() { sed 's/^.*) //' "/proc/$CUR_PID/stat" | awk '{ print $12 + $13 }'; }
ticks_to_s() { awk -v t="$1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f", t / h }'; }
fsize() { stat -c %s "$1"; }
# the local time zone's offset in seconds (the daemon log's timestamps are local time)
TZ_SEC=$(date +%z | awk '{ s = substr($0, 1, 1) == "-" ? -1 : 1; print s * (substr($0, 2, 2) * 3600 + substr($0, 4, 2) * 60) }')

# The journal's peak size: a background poller stats it every 10 ms until told to stop and
# prints the largest size seen (0: never seen) and how often it was seen.
JPOLL_PY='
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
peak = seen = 0
end = time.monotonic() + 600  # never outlive the script: also stops when its run dir is gone
while not os.path.exists(stop) and os.path.isdir(os.path.dirname(stop)) and time.monotonic() < end:
    try:
        peak = max(peak, os.stat(path).st_size)
        seen += 1
    except FileNotFoundError:
        pass
    time.sleep(0.01)
print(peak, seen)
'
JPOLL_PID=""
jpoll_start() {
  rm -f "$JPOLL_STOP" "$JPOLL_OUT"
  "$PY" -c "$JPOLL_PY" "$JOURNAL" "$JPOLL_STOP" >"$JPOLL_OUT" &
  JPOLL_PID=$!
}
jpoll_stop() {  # sets JPEAK, JSEEN
  touch "$JPOLL_STOP"
  wait "$JPOLL_PID" || die "the journal poller failed"
  JPOLL_PID=""
  read -r JPEAK JSEEN <"$JPOLL_OUT"
}

# check_stored PAYLOAD: the archive holds PAYLOAD at the tensor's offset, is still its size,
# has no journal left, and a fresh mount's tensors/<key> equals PAYLOAD (cmp).
check_stored() {
  [[ ! -e $JOURNAL ]] || die "WRITE DID NOT COMMIT CLEANLY: $JOURNAL is still there"
  [[ $(fsize "$TAR") == "$TAR_BYTES" ]] || die "$TAR changed size: $(fsize "$TAR"), was $TAR_BYTES"
  cmp -s "$1" <(dd if="$TAR" iflag=skip_bytes,count_bytes skip="$TENSOR_OFF" count="$TENSOR_BYTES" bs=4M 2>/dev/null) ||
    die "WRITE DID NOT LAND: the tar's bytes at $TENSOR_OFF differ from $(basename "$1")"
  mount_fresh "$TAR"
  timeout "$T" cmp "$1" "$MNT/$TENSOR_PATH" >/dev/null 2>&1 ||
    die "WRITE DID NOT LAND: a fresh mount's $TENSOR_PATH differs from $(basename "$1")"
  umount_now
}

# ---- 1. the test .nemo ---------------------------------------------------------------------
echo "== test .nemo: $TAR ($TOTAL_BYTES tensor bytes, one tensor of $TENSOR_BYTES); workdir $WORKDIR, $((avail_kib / 1048576)) GiB free"
info=$(nice "$PY" "$SCRIPT_DIR/make_tensor_nemo.py" write "$TAR" "$TOTAL_BYTES" "$TENSOR_BYTES") || die "make_tensor_nemo.py write failed"
read -r TAR_BYTES REUSED CKPT_OFF CKPT_SIZE NBYTES TENSOR_OFF RECORD RECOFF KEY COUNT < <(json_get "$info" \
  tar_bytes reused ckpt_offset ckpt_size big.nbytes big.tar_offset big.record big.record_data_offset big.key count)
if [[ $REUSED == True ]]; then how=reused; else how=created; fi
echo "   $how: $TAR_BYTES bytes, $COUNT tensors; ./model_weights.ckpt ($CKPT_SIZE bytes) at offset_data=$CKPT_OFF;"
echo "   $KEY ($NBYTES bytes) = zip record $RECORD, data at +$RECOFF in the ckpt -> tar offset $TENSOR_OFF"
((NBYTES == TENSOR_BYTES)) || die "the tensor has $NBYTES bytes, expected $TENSOR_BYTES"
TENSOR_PATH="tensors/$KEY"

echo "== payloads: the stored bytes (cur.bin) and the same floats negated (new.bin)"
dd if="$TAR" iflag=skip_bytes,count_bytes skip="$TENSOR_OFF" count="$TENSOR_BYTES" bs=4M of="$CUR" 2>/dev/null
"$PY" - "$CUR" "$NEW" <<'EOF' || die "cannot write new.bin"
import sys
import numpy as np
a = np.fromfile(sys.argv[1], dtype="<u4")
if not a.size or (a == 0).any():
    sys.exit("cur.bin holds zero words: wrong offset?")
(a ^ np.uint32(0x80000000)).tofile(sys.argv[2])
EOF
[[ $(fsize "$NEW") == "$TENSOR_BYTES" ]] || die "new.bin has the wrong size"
mount_fresh "$TAR"
timeout "$T" cmp "$CUR" "$MNT/$TENSOR_PATH" >/dev/null 2>&1 || die "$TENSOR_PATH differs from the tar's bytes at $TENSOR_OFF: wrong offset?"
if awk -v m="$MNT" '$5 == m && $6 ~ /^ro(,|$)/ { f = 1 } END { exit !f }' /proc/self/mountinfo; then
  die "$MNT is mounted read-only (source not writable?): see $DAEMON_LOG"
fi
umount_now
echo "   ok: $TENSOR_PATH on a fresh mount equals the tar's bytes at $TENSOR_OFF"

echo "== warming the page cache (cat tar > /dev/null)"
cat "$TAR" >/dev/null

# ---- 2. the measures ------------------------------------------------------------------------
# The nemofs writes alternate between new.bin and cur.bin so that every one changes every
# byte (a commit skips regions whose bytes are unchanged). The direct dd writes the payload
# that is stored at that moment: the same 256 MiB of page cache dirtied and fsynced, while the
# archive (and its CRC fields) stays consistent for the next nemofs write.
WRITE_MS=() WRITE_CPU=() JPEAKS=() DD_MS=() REPACK_MS=() LOGSPLIT=()
STORED=$CUR
# nemofs_write PAYLOAD: mount, time the dd through the mount (commit at fsync included), unmount.
nemofs_write() {
  local t0 t1 c0 c1 l0 lchanged ldone
  mount_fresh "$TAR"
  l0=$(wc -l <"$DAEMON_LOG")
  jpoll_start
  c0=$(cpu_ticks)
  t0=$EPOCHREALTIME
  timeout "$T" dd if="$1" of="$MNT/$TENSOR_PATH" bs=4M conv=notrunc,fsync 2>>"$CLI_LOG" ||
    die "dd through the mount failed (see $CLI_LOG, $DAEMON_LOG)"
  t1=$EPOCHREALTIME
  c1=$(cpu_ticks)
  jpoll_stop
  umount_now
  STORED=$1
  LAST_MS=$(ms_between "$t0" "$t1") LAST_CPU=$(ticks_to_s $((c1 - c0)))
  # where the time went, from the daemon log's ms timestamps: dd start -> "N bytes changed"
  # (FUSE writes + staging + reading the old bytes + CRC patch), -> "100%" (journal written
  # and fsynced, new bytes written), -> dd end (CRC fields, fsync, journal removed, page
  # cache invalidation, the reply)
  LAST_LOG=$(tail -n +"$((l0 + 1))" "$DAEMON_LOG")
  LAST_CHANGED=$(grep -m1 -o '[0-9]* bytes changed in [0-9]* region(s), [0-9]* CRC field(s)' <<<"$LAST_LOG") ||
    die "no 'bytes changed' line in $DAEMON_LOG for this write"
  lchanged=$(grep -m1 'bytes changed in' <<<"$LAST_LOG" | awk '{ print $2 }')
  ldone=$(grep 'saving tensor .* 100%' <<<"$LAST_LOG" | tail -1 | awk '{ print $2 }') || ldone=""
  LAST_SPLIT=$(awk -v t0="$t0" -v t1="$t1" -v a="$lchanged" -v b="$ldone" -v z="$TZ_SEC" '
    function sec(hms) { split(hms, p, ":"); return p[1] * 3600 + p[2] * 60 + p[3] }
    BEGIN {
      d0 = (t0 + z) % 86400; d1 = (t1 + z) % 86400  # local seconds of the day, as in the log
      if (a == "") { print "-"; exit }
      ca = sec(a)
      if (b == "") { printf "%.0f/-/-", (ca - d0) * 1000; exit }
      cb = sec(b)
      printf "%.0f/%.0f/%.0f", (ca - d0) * 1000, (cb - ca) * 1000, (d1 - cb) * 1000
    }')
}
direct_dd() {  # PAYLOAD: the baseline, timed
  local t0 t1
  t0=$EPOCHREALTIME
  timeout "$T" dd if="$1" of="$TAR" bs=4M conv=notrunc,fsync oflag=seek_bytes seek="$TENSOR_OFF" 2>>"$CLI_LOG" ||
    die "dd into $TAR failed"
  t1=$EPOCHREALTIME
  LAST_MS=$(ms_between "$t0" "$t1")
}
repack_once() {
  local t0 t1
  t0=$EPOCHREALTIME
  timeout "$T" "$BIN" repack -q "$TAR" -o "$OUT" >>"$CLI_LOG" 2>&1 || die "nemofs repack failed (see $CLI_LOG)"
  t1=$EPOCHREALTIME
  [[ -s $OUT ]] || die "nemofs repack wrote no $OUT"
  rm -f "$OUT"
  LAST_MS=$(ms_between "$t0" "$t1")
}
other() { if [[ $1 == "$CUR" ]]; then echo "$NEW"; else echo "$CUR"; fi; }

echo "== untimed warm-up: one write through the mount (new.bin; verified), one direct dd, one repack"
nemofs_write "$NEW"
WARM_MS=$LAST_MS WARM_CHANGED=$LAST_CHANGED WARM_JPEAK=$JPEAK WARM_SPLIT=$LAST_SPLIT
check_stored "$NEW"
echo "   write $(dur "$WARM_MS") ($WARM_CHANGED; journal peak $WARM_JPEAK bytes); verified: the tar's bytes and a fresh mount's $TENSOR_PATH equal new.bin"
direct_dd "$STORED"
repack_once
sync "$TAR"

echo "== $REPS rounds of [write through the mount (timed), verify (untimed), direct dd (timed), repack (timed)]"
for ((r = 1; r <= REPS; r++)); do
  payload=$(other "$STORED")
  nemofs_write "$payload"
  WRITE_MS+=("$LAST_MS") WRITE_CPU+=("$LAST_CPU") JPEAKS+=("$JPEAK") LOGSPLIT+=("$LAST_SPLIT")
  check_stored "$payload"
  direct_dd "$STORED"
  DD_MS+=("$LAST_MS")
  repack_once
  REPACK_MS+=("$LAST_MS")
  echo "   round $r: write $(basename "$payload") through the mount $(dur "${WRITE_MS[-1]}") (daemon CPU ${WRITE_CPU[-1]} s;" \
    "journal peak ${JPEAKS[-1]} bytes, seen $JSEEN x; log split ms ${LOGSPLIT[-1]}), direct dd $(dur "${DD_MS[-1]}")," \
    "repack $(dur "${REPACK_MS[-1]}")"
done
read_fuse_init

# One untimed pass with dd under strace (-T: time in each system call): how long the writes
# (FUSE requests, staged in the daemon's memory) take, and how long the fsync (the commit).
STRACE_SPLIT="strace not found: not measured"
if command -v strace >/dev/null; then
  echo "== untimed pass: dd through the mount under strace -T (write phase vs fsync)"
  payload=$(other "$STORED")
  mount_fresh "$TAR"
  timeout "$T" strace -tt -T -e trace=write,fsync,close -o "$LOGDIR/dd.strace" \
    dd if="$payload" of="$MNT/$TENSOR_PATH" bs=4M conv=notrunc,fsync 2>>"$CLI_LOG" || die "strace dd through the mount failed"
  umount_now
  STORED=$payload
  check_stored "$payload"
  STRACE_SPLIT=$(awk '
    function sec(hms) { split(hms, p, ":"); return p[1] * 3600 + p[2] * 60 + p[3] }
    { d = $NF; gsub(/[<>]/, "", d) }
    /^[0-9:.]+ write\(1,/ { if (!n++) w0 = sec($1); w1 = sec($1) + d; ws += d }
    /^[0-9:.]+ fsync\(1\)/ { f = d }
    /^[0-9:.]+ close\(1\)/ { c = d }
    END { printf "%d writes: %.0f ms from the first to the end of the last (%.0f ms inside write()), fsync %.0f ms, close %.0f ms", n, (w1 - w0) * 1000, ws * 1000, f * 1000, c * 1000 }' "$LOGDIR/dd.strace")
  echo "   $STRACE_SPLIT"
fi

echo "== final check: zip CRC of $RECORD (python zipfile) and a fresh mount's bytes"
check_stored "$STORED"
"$PY" - "$TAR" "$CKPT_OFF" "$CKPT_SIZE" "$RECORD" "$SCRIPT_DIR" <<'EOF' || die "CRC CHECK FAILED: the zip record's CRC-32 does not match its bytes"
import sys, zipfile
sys.path.insert(0, sys.argv[5])
from benchio import Window
with open(sys.argv[1], "rb") as raw:
    zf = zipfile.ZipFile(Window(raw, int(sys.argv[2]), int(sys.argv[3])))
    with zf.open(sys.argv[4]) as f:  # zipfile checks the CRC-32 at the end of the record
        while f.read(1 << 24):
            pass
EOF
echo "   ok: the CRC-32 of $RECORD matches its bytes ($(basename "$STORED") is stored)"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- 3. summary -----------------------------------------------------------------------------
m_write=$(median "${WRITE_MS[@]}") m_dd=$(median "${DD_MS[@]}") m_repack=$(median "${REPACK_MS[@]}")
m_jpeak=$(median "${JPEAKS[@]}")
summary_head "================================ nemofs tensor-write benchmark ================================"
summary_nemofs
echo "load:      1/5/15-min load average $LOAD_START at start, $LOAD_END at end (other work on the machine adds noise)"
echo "archive:   $TAR: $TAR_BYTES bytes ($how), file system $(df -PT "$WORKDIR" | awk 'NR == 2 { print $2 }');"
echo "           $KEY: $TENSOR_BYTES bytes at tar offset $TENSOR_OFF (zip record $RECORD)"
echo "fuse:      ${FUSE_INIT:-init line not logged}"
echo "caching:   the tar was read once (cat > /dev/null); one untimed warm-up of each measure"
echo "rounds:    $REPS rounds of [write through the mount, direct dd, repack]; medians"
echo
echo "| measure | median | min – max | ratio to direct dd |"
echo "|---|---|---|---|"
line_row "$m_dd" "\`dd bs=4M conv=notrunc,fsync\` of $TENSOR_MIB MiB over \`tensors/<key>\`, commit included ($REPS runs)" "${WRITE_MS[@]}"
line_row "$m_dd" "direct: the same \`dd\` into the archive at the tensor's offset ($REPS runs)" "${DD_MS[@]}"
line_row "$m_dd" "\`nemofs repack SRC -o OUT\` ($REPS runs)" "${REPACK_MS[@]}"
echo
echo "commit / direct dd:  $(ratio "$m_write" "$m_dd")x (target from issue 10: <= 3x)"
echo "repack / commit:     $(ratio "$m_repack" "$m_write")x"
echo "journal:             peak $m_jpeak bytes (median; polled every 10 ms) = $(awk -v a="$m_jpeak" -v b="$TENSOR_BYTES" 'BEGIN { printf "%.4f", a / b }') x the tensor's bytes;"
echo "                     daemon log: $WARM_CHANGED (warm-up)"
echo "daemon CPU:          $(median "${WRITE_CPU[@]}") s per write (median)"
echo "time split (ms):     dd start -> 'bytes changed' log line (FUSE writes, staging, old bytes read, CRC patch) /"
echo "                     -> '100%' (journal written + fsynced, new bytes written) / -> dd end (CRC fields, fsync,"
echo "                     journal removed, invalidation): [${LOGSPLIT[*]}] (ms log timestamps)"
echo "warm-up write:       $(dur "$WARM_MS"), split $WARM_SPLIT"
echo "dd under strace -T:  $STRACE_SPLIT (one untimed pass)"
echo
echo "commands measured (wall time, \$EPOCHREALTIME before and after; each under timeout $T):"
echo "  write:   dd if=PAYLOAD of=$MNT/$TENSOR_PATH bs=4M conv=notrunc,fsync"
echo "           on a fresh mount: $BIN mount $TAR $MNT --log-level debug --log-file $DAEMON_LOG"
echo "           (PAYLOAD alternates new.bin / cur.bin; each write is checked untimed: tar bytes, fresh mount cmp)"
echo "  direct:  dd if=STORED of=$TAR bs=4M conv=notrunc,fsync oflag=seek_bytes seek=$TENSOR_OFF"
echo "  repack:  $BIN repack -q $TAR -o $OUT  (then rm OUT)"
echo
echo "samples ms: write [${WRITE_MS[*]}]"
echo "            direct dd [${DD_MS[*]}]  repack [${REPACK_MS[*]}]"
echo "            journal peak bytes [${JPEAKS[*]}]  daemon CPU s [${WRITE_CPU[*]}]"
echo "logs:      $LOGDIR"
