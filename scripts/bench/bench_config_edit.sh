#!/usr/bin/env bash
# Benchmarks committing a one-line config.yaml edit through a read-write nemofs mount of a
# large plain-tar .nemo (an appended tar member, O(config)) against `nemofs repack` of the
# same archive (the O(size) rewrite) and a plain `cp`, all measured in the same run.
# See scripts/bench/README.md.
#
#   scripts/bench/bench_config_edit.sh [WORKDIR] [--nemofs PATH] [--workdir DIR] [--size-gib N]
#                                      [--reps N] [--edit-reps N] [--keep]
#   KEEP=1 scripts/bench/bench_config_edit.sh ...   (same as --keep)
set -euo pipefail

ENV_KEEP=${KEEP:-0}  # lib.sh resets KEEP; KEEP=1 in the environment means --keep
BENCH_NAME=bench_config_edit
WORKDIR=""           # default chosen below: /var/tmp or /tmp, whichever has room
SIZE_GIB=4
EDIT_REPS=15
MIN_FREE_GIB=10
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
KEEP=$ENV_KEEP
REPS=5

usage() {
  cat <<EOF
usage: $0 [WORKDIR] [--nemofs PATH] [--workdir DIR] [--size-gib N] [--reps N] [--edit-reps N] [--keep]

  WORKDIR, --workdir DIR  where the test .nemo, its copies, mount point and logs live (default:
                     nemofs-bench-config-edit under /var/tmp, else /tmp: the first with
                     $MIN_FREE_GIB GiB free); needs $MIN_FREE_GIB GiB free for the default size
  --nemofs PATH      nemofs binary (default: $REPO/build/nemofs); copied into the run
                     directory first so a concurrent rebuild cannot change it mid-run
  --size-gib N       size of model_weights.ckpt in GiB, may be fractional (default: 4)
  --reps N           timed repetitions of each baseline (repack, cp) (default: 5)
  --edit-reps N      timed config edits through the mount (default: 15, at least 7)
  --keep, KEEP=1     keep the test .nemo and the logs (a rerun with the same size reuses the .nemo)
EOF
}

while (($#)); do
  case $1 in
    --size-gib) SIZE_GIB=${2:?--size-gib needs a number}; shift 2 ;;
    --edit-reps) EDIT_REPS=${2:?--edit-reps needs a number}; shift 2 ;;
    -*) common_arg "$@"; shift "$ARG_SHIFT" ;;
    *) [[ -z $WORKDIR ]] || { usage >&2; exit 2; }; WORKDIR=$1; shift ;;
  esac
done
((TRACE == 0)) || die "--trace-requests is not supported by this benchmark"
[[ $KEEP =~ ^[01]$ ]] || die "KEEP must be 0 or 1, not '$KEEP'"
[[ $SIZE_GIB =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--size-gib: not a number: $SIZE_GIB"
if ! [[ $EDIT_REPS =~ ^[0-9]+$ ]] || ((EDIT_REPS < 7)); then die "--edit-reps: need an integer >= 7, not '$EDIT_REPS'"; fi
check_common fusermount3 getfattr sed cp sync stat awk df

SIZE_BYTES=$(awk -v g="$SIZE_GIB" 'BEGIN { printf "%.0f", int(g * 1024 + 0.5) * 1048576 }')  # %.0f: mawk clamps %d
((SIZE_BYTES > 0)) || die "--size-gib too small"
# Disk: while the .nemo is built, the staged weights + the tar (2 x N); later the tar plus one
# 4 GiB copy at a time (repack output or cp copy, each deleted after its repetition); + slack.
NEED_KIB=$((SIZE_BYTES * 2 / 1024 + 2 * 1048576))  # 10 GiB for the default 4 GiB
kib_free_at() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }'; }
if [[ -z $WORKDIR ]]; then
  for base in /var/tmp /tmp; do
    if [[ -d $base ]] && (($(kib_free_at "$base") >= NEED_KIB)); then WORKDIR=$base/nemofs-bench-config-edit; break; fi
  done
  [[ -n $WORKDIR ]] || die "neither /var/tmp ($(($(kib_free_at /var/tmp) / 1048576)) GiB free) nor /tmp ($(($(kib_free_at /tmp) / 1048576)) GiB free) has the $((NEED_KIB / 1048576)) GiB this benchmark needs; pass a WORKDIR on a bigger file system"
fi
CREATED_WORKDIR=0
[[ -e $WORKDIR ]] || CREATED_WORKDIR=1
setup_workdir
TAR="$WORKDIR/bench_${SIZE_GIB}gib.nemo"
avail_kib=$(free_kib "$WORKDIR")
if [[ -e $TAR ]]; then NEED_KIB=$((NEED_KIB - $(stat -c %s "$TAR") / 1024)); fi  # a kept .nemo is reused
if ((avail_kib < NEED_KIB)); then
  if ((CREATED_WORKDIR)); then rm -f "$WORKDIR/.lock"; rmdir "$WORKDIR" 2>/dev/null || true; fi
  die "$WORKDIR: only $((avail_kib / 1048576)) GiB free, need at least $((NEED_KIB / 1048576)) GiB (the .nemo, its staging copy while it is built, then one full copy for repack/cp); pass another WORKDIR"
fi
BENCH_TARS=("$TAR")
setup_run
install_cleanup
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
OUT="$RUN_DIR/repacked.nemo"   # in RUN_DIR: removed at exit with any repack temp file
COPY="$RUN_DIR/copy.nemo"
PLAIN="$RUN_DIR/plain/config.yaml"
RUN_TAG=$(date +%Y%m%d%H%M%S)  # edit keys are unique across runs on a kept .nemo

# ms_between T0 T1: milliseconds since T0 (an $EPOCHREALTIME value); no fork while timing.
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) * 1000 }'; }
# dur MS: "3.14 ms" below a second, "8.41 s" above.
fsize() { stat -c %s "$1"; }

# check_config PREV_LINES [LINE]: reads the archive's config with Python tarfile (the last
# model_config.yaml member wins, as in tarfile/NeMo) and prints "LINES MEMBER_TAR_BYTES
# N_CONFIG_MEMBERS". With LINE: fails unless the config is the previous one plus LINE as
# its last line (PREV_LINES + 1 lines) and still holds the precision line sed rewrote.
CHECK_PY='
import os, sys, tarfile
path, prev, line = sys.argv[1], int(sys.argv[2]), sys.argv[3]
last, n = None, 0
with tarfile.open(path, "r:") as t:
    for m in t:
        if m.isfile() and os.path.normpath(m.name) == "model_config.yaml":
            last, n = m, n + 1
    if last is None:
        sys.exit("no model_config.yaml member in " + path)
    text = t.extractfile(last).read().decode()
lines = text.splitlines()
if line:
    if not lines or lines[-1] != line:
        sys.exit("the archive config does not end with %r (last line: %r)" % (line, lines[-1] if lines else None))
    if len(lines) != prev + 1:
        sys.exit("the archive config has %d lines, expected %d" % (len(lines), prev + 1))
    if "precision: bf16-mixed" not in lines:
        sys.exit("the archive config lost its precision line")
print(len(lines), last.offset_data - last.offset + (last.size + 511) // 512 * 512, n)
'
check_config() {
  local out
  out=$(timeout "$T" "$PY" -c "$CHECK_PY" "$TAR" "$1" "${2:-}" 2>&1) ||
    die "EDIT DID NOT LAND in $TAR: ${out:-python3 tarfile check failed}"
  echo "$out"
}

# shellcheck disable=SC2016  # the $ and \1 are sed's
SED_EXPR() { printf 's/^\\(precision: .*\\)$/\\1/; $a %s' "$1"; }

# ---- 1. the test .nemo ----------------------------------------------------------
echo "== test .nemo: $TAR (model_weights.ckpt = $SIZE_GIB GiB); workdir $WORKDIR, $((avail_kib / 1048576)) GiB free"
info=$("$PY" "$SCRIPT_DIR/make_bench_nemo.py" "$TAR" "$SIZE_BYTES") || die "make_bench_nemo.py failed"
read -r MEMBER_SIZE TAR_BYTES REUSED < <(json_get "$info" size tar_bytes reused)
if [[ $REUSED == True ]]; then how=reused; else how=created; fi
echo "   $how: $TAR_BYTES bytes"
[[ $MEMBER_SIZE == "$SIZE_BYTES" ]] || die "member size $MEMBER_SIZE != $SIZE_BYTES"
SIZE_BUILT=$(fsize "$TAR")

echo "== warming the page cache (cat tar > /dev/null), then one untimed warm-up of each measure"
cat "$TAR" >/dev/null
REPACK_CMD=("$BIN" repack -q "$TAR" -o "$OUT")
timeout "$T" "${REPACK_CMD[@]}" >>"$CLI_LOG" 2>&1 || die "warm-up: nemofs repack failed (see $CLI_LOG)"
rm -f "$OUT"
timeout "$T" cp "$TAR" "$COPY" || die "warm-up: cp failed"
timeout "$T" sync "$COPY" || die "warm-up: sync failed"
rm -f "$COPY"

# ---- 2. mount read-write -----------------------------------------------------------
mount_fresh "$TAR"
[[ -f $MNT/config.yaml ]] || die "$MNT/config.yaml missing"
if awk -v m="$MNT" '$5 == m && $6 ~ /^ro(,|$)/ { f = 1 } END { exit !f }' /proc/self/mountinfo; then
  die "$MNT is mounted read-only (source not writable?): see $DAEMON_LOG"
fi
mkdir -p "$(dirname "$PLAIN")"
timeout "$T" cat "$MNT/config.yaml" >"$PLAIN"
res=$(check_config -1)
read -r CFG_LINES _ NCFG_START <<<"$res"
NCFG=$NCFG_START
PLAIN_LINES=$(wc -l <"$PLAIN")
((PLAIN_LINES == CFG_LINES)) || die "mounted config.yaml has $PLAIN_LINES lines, archive config $CFG_LINES"

# edit_once N: one sed -i through the mount, timed; appends to EDIT_MS, GROWTH, MEMBER_BYTES.
EDIT_MS=() GROWTH=() MEMBER_BYTES=() PLAIN_MS=()
edit_once() {
  local n=$1 line expr before after t0 t1 res nl mb nc
  line="bench_edit_${RUN_TAG}_$n: $n"
  expr=$(SED_EXPR "$line")
  before=$(fsize "$TAR")
  t0=$EPOCHREALTIME
  timeout "$T" sed -i "$expr" "$MNT/config.yaml" 2>>"$CLI_LOG" || die "edit $n: sed -i through the mount failed (see $CLI_LOG, $DAEMON_LOG)"
  t1=$EPOCHREALTIME
  after=$(fsize "$TAR")
  res=$(check_config "$CFG_LINES" "$line")  # dies (set -e) if the edit is not in the archive
  read -r nl mb nc <<<"$res"
  ((nc == NCFG + 1)) || die "EDIT DID NOT LAND as a new member: $nc model_config.yaml members after edit $n, expected $((NCFG + 1))"
  CFG_LINES=$nl NCFG=$nc
  LAST_EDIT_MS=$(ms_between "$t0" "$t1") LAST_GROWTH=$((after - before)) LAST_MB=$mb
}
# plain_once N: the same sed -i on a copy of the config in the run directory (no FUSE, no commit).
plain_once() {
  local t0 t1
  t0=$EPOCHREALTIME
  timeout "$T" sed -i "$(SED_EXPR "bench_edit_${RUN_TAG}_$1: $1")" "$PLAIN" || die "sed -i on $PLAIN failed"
  t1=$EPOCHREALTIME
  PLAIN_MS+=("$(ms_between "$t0" "$t1")")
}

echo "== untimed warm-up edit through the mount"
edit_once 0
plain_once 0
WARM_EDIT_MS=$LAST_EDIT_MS WARM_GROWTH=$LAST_GROWTH
echo "   warm-up edit: $LAST_EDIT_MS ms, archive +$LAST_GROWTH bytes, config member $LAST_MB tar bytes; verified with tarfile"
PLAIN_MS=()
SIZE_BEFORE=$(fsize "$TAR")
LOG_BEFORE=$(wc -l <"$DAEMON_LOG" 2>/dev/null || echo 0)

# ---- 3/4. interleaved rounds: baselines, then a block of edits ----------------------
echo "== $REPS rounds: nemofs repack (timed), cp (timed, then sync timed), then edits; $EDIT_REPS edits in all"
REPACK_MS=() CP_MS=() CPSYNC_MS=()
n=0
for ((r = 1; r <= REPS; r++)); do
  t0=$EPOCHREALTIME
  timeout "$T" "${REPACK_CMD[@]}" >>"$CLI_LOG" 2>&1 || die "nemofs repack failed (see $CLI_LOG)"
  t1=$EPOCHREALTIME
  REPACK_MS+=("$(ms_between "$t0" "$t1")")
  [[ -s $OUT ]] || die "nemofs repack wrote no $OUT"
  rm -f "$OUT"

  t0=$EPOCHREALTIME
  timeout "$T" cp "$TAR" "$COPY" || die "cp failed"
  t1=$EPOCHREALTIME
  timeout "$T" sync "$COPY" || die "sync $COPY failed"
  t2=$EPOCHREALTIME
  CP_MS+=("$(ms_between "$t0" "$t1")") CPSYNC_MS+=("$(ms_between "$t0" "$t2")")
  rm -f "$COPY"
  sleep 1  # let the file system finish freeing the copy before the small fsyncs

  target=$(((r * EDIT_REPS + REPS - 1) / REPS))
  edits=""
  while ((n < target)); do
    n=$((n + 1))
    plain_once "$n"
    edit_once "$n"
    EDIT_MS+=("$LAST_EDIT_MS") GROWTH+=("$LAST_GROWTH") MEMBER_BYTES+=("$LAST_MB")
    edits+=" $LAST_EDIT_MS"
  done
  echo "   round $r: repack $(dur "${REPACK_MS[-1]}"), cp $(dur "${CP_MS[-1]}") (+sync $(dur "${CPSYNC_MS[-1]}")), edits ms:$edits"
done
SIZE_AFTER=$(fsize "$TAR")
LOG_AFTER=$(wc -l <"$DAEMON_LOG" 2>/dev/null || echo 0)
CFG_IN_MOUNT=$(timeout "$T" tail -1 "$MNT/config.yaml")
[[ $CFG_IN_MOUNT == "bench_edit_${RUN_TAG}_$n: $n" ]] || die "the mount's config.yaml does not end with the last edit"
umount_now
res=$(check_config -1)
read -r _ _ nc <<<"$res"
((nc == NCFG)) || die "after unmounting: $nc model_config.yaml members, expected $NCFG"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- 5. summary ----------------------------------------------------------------------
m_edit=$(median "${EDIT_MS[@]}") m_plain=$(median "${PLAIN_MS[@]}")
m_repack=$(median "${REPACK_MS[@]}")
uniq_range() { local lo hi; lo=$(minof "$@") hi=$(maxof "$@"); if ((lo == hi)); then echo "$lo"; else echo "$lo-$hi"; fi; }
growth_total=$((SIZE_AFTER - SIZE_BEFORE))
nonzero=0
for g in "${GROWTH[@]}"; do ((g == 0)) || nonzero=$((nonzero + 1)); done

summary_head "================================ nemofs config-edit benchmark ================================"
summary_nemofs
echo "load:      1/5/15-min load average $LOAD_START at start, $LOAD_END at end (other work on the machine adds noise)"
echo "archive:   $TAR: $SIZE_BUILT bytes at start ($how), model_weights.ckpt = $MEMBER_SIZE bytes; file system $(df -PT "$WORKDIR" | awk 'NR == 2 { print $2 }')"
echo "caching:   dropping the page cache is not portable, so the tar was read once (cat > /dev/null) and"
echo "           each measure had one untimed warm-up (a repack, a cp + sync, an edit) before the timed runs"
echo "rounds:    $REPS rounds of [repack, cp + sync, then $EDIT_REPS/$REPS of the edits], so baselines and edits interleave"
echo
echo "| measure | median | min – max | ratio to repack median |"
echo "|---|---|---|---|"
line_row "$m_repack" "config edit through the mount: \`sed -i\` on config.yaml, commit included ($EDIT_REPS runs)" "${EDIT_MS[@]}"
line_row "$m_repack" "... reference: the same \`sed -i\` on a plain file, no FUSE, no commit ($EDIT_REPS runs)" "${PLAIN_MS[@]}"
line_row "$m_repack" "\`nemofs repack SRC -o OUT\` ($REPS runs)" "${REPACK_MS[@]}"
line_row "$m_repack" "\`cp SRC copy\` ($REPS runs)" "${CP_MS[@]}"
line_row "$m_repack" "\`cp SRC copy\` then \`sync copy\` (fsync, as repack does) ($REPS runs)" "${CPSYNC_MS[@]}"
echo
echo "repack / edit (medians): $(awk -v a="$m_repack" -v b="$m_edit" 'BEGIN { printf "%.0f", a / b }')x; edit - plain-file sed (medians): $(awk -v a="$m_edit" -v b="$m_plain" 'BEGIN { printf "%.2f", a - b }') ms (FUSE + commit)"
echo "archive growth: $growth_total bytes over $EDIT_REPS timed edits = $(awk -v a="$growth_total" -v b="$EDIT_REPS" 'BEGIN { printf "%.0f", a / b }') bytes per commit on average"
echo "                (the file grows in 10240-byte tar records: $nonzero of $EDIT_REPS edits grew it, the others fit in the"
echo "                record's padding; each commit's member, header + data padded, is $(uniq_range "${MEMBER_BYTES[@]}") bytes of tar)"
echo "                per edit: [${GROWTH[*]}]"
echo "archive size:   $SIZE_BUILT bytes at start -> $SIZE_BEFORE after the warm-up edit -> $SIZE_AFTER after all edits ($NCFG_START -> $NCFG model_config.yaml members; repack keeps only the last)"
echo "warm-up edit:   the first (untimed) edit of the mount took $(dur "$WARM_EDIT_MS") and grew the archive by $WARM_GROWTH bytes"
echo "daemon log:     debug level (lib.sh), $(((LOG_AFTER - LOG_BEFORE) / EDIT_REPS)) lines per edit on average"
echo
echo "commands measured (wall time, \$EPOCHREALTIME before and after; each under timeout $T):"
echo "  edit:    sed -i '$(SED_EXPR "bench_edit_${RUN_TAG}_N: N")' $MNT/config.yaml  (N = 1..$EDIT_REPS)"
echo "           on the mount: $BIN mount $TAR $MNT --log-level debug --log-file $DAEMON_LOG"
echo "           each followed (untimed) by a python3 tarfile read of the archive's last model_config.yaml: must end with the new line"
echo "  plain:   sed -i '$(SED_EXPR "bench_edit_${RUN_TAG}_N: N")' $PLAIN"
echo "  repack:  ${REPACK_CMD[*]}  (then rm OUT)"
echo "  cp:      cp $TAR $COPY  ; cp+sync adds: sync $COPY  (then rm copy)"
echo
echo "samples ms: edit [${EDIT_MS[*]}]"
echo "            plain [${PLAIN_MS[*]}]"
echo "            repack [${REPACK_MS[*]}]  cp [${CP_MS[*]}]  cp+sync [${CPSYNC_MS[*]}]"

# ---- 6. clean up ---------------------------------------------------------------------
if ((KEEP)); then
  echo "logs:      $LOGDIR (kept)"
else
  echo "logs:      removed (KEEP=1 or --keep keeps them and the .nemo)"
  TEMP_PATHS+=("$LOGDIR" "$WORKDIR/.lock")
  # The whole WORKDIR only if this run created it (never rm -rf a directory given to us).
  if ((CREATED_WORKDIR)) && ! is_mounted; then TEMP_PATHS+=("$WORKDIR"); fi
fi
