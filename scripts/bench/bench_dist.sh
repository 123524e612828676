#!/usr/bin/env bash
# Benchmarks nemofs's stitching of a distributed (torch_dist / DCP) checkpoint's chunks
# into one global tensor file: sequential reads of tensors/model.w (2 GiB, 8 chunks)
# when the tensor is split on dim 1 (every row crosses all 8 chunks) and on dim 0
# (every row lies in one chunk), against dd of the chunks' raw bytes in the .distcp
# files, measured in the same command. See scripts/bench/README.md.
#
#   scripts/bench/bench_dist.sh [--nemofs PATH] [--workdir DIR] [--reps N] [--keep]
set -euo pipefail

BENCH_NAME=bench_dist
WORKDIR=/tmp/nemofs-bench-dist
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

KEY=model.w
TRACE_MIB=512  # MiB read in each untimed strace pass

usage() {
  cat <<EOF
usage: $0 [--nemofs PATH] [--workdir DIR] [--reps N] [--keep]

  --nemofs PATH      nemofs binary (default: $REPO/build/nemofs); copied into the
                     run directory first so a concurrent rebuild cannot change it mid-run
  --workdir DIR      where the two checkpoint folders, mount point and logs live
                     (default: /tmp/nemofs-bench-dist)
  --reps N           repetitions per figure; medians are reported (default: 3)
  --keep             keep dist_dim1/ and dist_dim0/ (reruns reuse them)

The untimed strace pass that records the FUSE request sizes always runs
(--trace-requests is accepted and changes nothing).
EOF
}

while (($#)); do
  common_arg "$@"
  shift "$ARG_SHIFT"
done

check_common fusermount3 getfattr dd awk cmp strace
"$PY" -c 'import torch' 2>/dev/null || die "$PY cannot import torch (apt-get install python3-torch)"

setup_workdir

DIR_A="$WORKDIR/dist_dim1"  # A: 8 x [16384, 4096] at (0, 4096 k)
DIR_B="$WORKDIR/dist_dim0"  # B: 8 x [2048, 32768] at (2048 k, 0)
# The checkpoints are folders: removed by the cleanup through TEMP_PATHS (BENCH_TARS is
# for files). Their half-written .tmp always goes.
TEMP_PATHS+=("$DIR_A.tmp" "$DIR_B.tmp")
if ((KEEP == 0)); then TEMP_PATHS+=("$DIR_A" "$DIR_B"); fi
setup_run
CLK_TCK=$(getconf CLK_TCK)
if shm_has_room $((2 * 1048576 + 524288)); then SHM_FILE="$SHM_DIR/nemofs-bench-dist.$$"; fi

install_cleanup

# ---- helpers (the shared ones are in lib.sh) -----------------------------------------
# CPU time (user + system, all threads) of the current daemon, in clock ticks.
cpu_ticks() { sed 's/^.*) //' "/proc/$CUR_PID/stat" | awk '{ print $12 + $13 }'; }
ticks_to_s() { awk -v t="$1" -v h="$CLK_TCK" 'BEGIN { printf "%.2f", t / h }'; }
addf() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", a + b }'; }
gbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.3f", b / s / 1e9 }'; }  # BYTES SECONDS

# dd_secs BYTES ARGS...: dd's own seconds for copying BYTES (checked); output to /dev/null
# unless DD_OUT names a file.
dd_secs() {
  local want=$1 out line bytes secs
  shift
  out=$(LC_ALL=C timeout "$T" dd bs=1M of="${DD_OUT:-/dev/null}" "$@" 2>&1) || die "dd $* failed: $out"
  line=$(grep ' copied, ' <<<"$out" | tail -1)
  bytes=${line%% bytes*}
  secs=$(sed -n 's/.* copied, \([0-9.e+-]*\) s,.*/\1/p' <<<"$line")
  [[ $bytes == "$want" ]] || die "dd $*: read $bytes bytes, expected $want"
  echo "$secs"
}

# ranges_rate RANGES [SHM]: dd of every chunk's raw tensor bytes (RANGES = PATH:OFF:LEN,...)
# one after the other; prints the GB/s of the sum (total bytes / summed dd seconds). With
# SHM, each range goes into SHM_FILE at its place in the global tensor's chunk order
# (a new 2 GiB tmpfs file, removed afterwards) instead of /dev/null.
ranges_rate() {
  local r f off len secs total=0 bytes=0
  for r in ${1//,/ }; do
    IFS=: read -r f off len <<<"$r"
    if [[ -n ${2:-} ]]; then
      secs=$(DD_OUT=$SHM_FILE dd_secs "$len" if="$f" iflag=skip_bytes,count_bytes skip="$off" count="$len" \
        oflag=seek_bytes seek="$bytes" conv=notrunc)
    else
      secs=$(dd_secs "$len" if="$f" iflag=skip_bytes,count_bytes skip="$off" count="$len")
    fi
    total=$(addf "$total" "$secs")
    bytes=$((bytes + len))
  done
  if [[ -n ${2:-} ]]; then rm -f "$SHM_FILE"; fi
  ((bytes == NBYTES)) || die "ranges cover $bytes bytes, expected $NBYTES"
  gbps "$bytes" "$total"
}

# hist: "SYSCALL LENGTH" lines -> the 8 most frequent (syscall, length) pairs.
hist() {
  awk 'NF { c[$1 " " $2]++; n++ }
       END { for (k in c) { split(k, p, " "); printf "    %-8s %10d bytes x %d\n", p[1], p[2], c[k] }; if (!n) print "    (none seen)" }' |
    sort -k5,5 -nr | head -8
}

# trace_pass X DIR: fresh mount of DIR, strace every daemon thread during a dd of the first
# TRACE_MIB MiB of tensors/model.w (strace_daemon), unmount; writes $LOGDIR/hist_X.txt:
# the sizes of the FUSE read replies (= request sizes served: splice or writev to /dev/fuse,
# minus the 16-byte reply header; replies under 4 KiB are lookup/getattr/xattr ones, not
# counted) and what the daemon read from the .distcp files.
trace_pass() {
  local x=$1 dir=$2 calls=splice,pread64,preadv,preadv2,read,writev replies reads nrep nread brep
  strace_daemon "$x" "$dir" "$calls" dd if="$MNT/tensors/$KEY" bs=1M count="$TRACE_MIB" of=/dev/null
  replies=$(cat "$LOGDIR/strace_$x".* 2>/dev/null |
    grep -E '^(splice\([0-9]+<pipe:\[[0-9]+\]>, NULL, [0-9]+</dev/fuse>|writev\([0-9]+</dev/fuse>)' |
    awk '$(NF - 1) == "=" && $NF >= 4096 + 16 { split($1, a, "("); print a[1], $NF - 16 }') || replies=""
  reads=$(strace_reads "$x" "$dir/__[0-9]+_[0-9]+\\.distcp" "$calls" |
    awk '$(NF - 1) == "=" { split($1, a, "("); print a[1], $NF }') || reads=""
  nrep=$(grep -c . <<<"$replies") || nrep=0
  nread=$(grep -c . <<<"$reads") || nread=0
  brep=$(awk '{ s += $2 } END { printf "%d", s }' <<<"$replies")
  {
    echo "    FUSE read replies: $nrep, $brep bytes ($((brep / (nrep > 0 ? nrep : 1))) bytes/reply);" \
      "reads from .distcp: $nread ($(ratio "$nread" "$((nrep > 0 ? nrep : 1))")/reply)"
    echo "    FUSE read replies to /dev/fuse (data bytes):"
    hist <<<"$replies"
    echo "    reads from the .distcp files:"
    hist <<<"$reads"
  } >"$LOGDIR/hist_$x.txt"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- 0. disk space ------------------------------------------------------------------
need_kib=0
for d in "$DIR_A" "$DIR_B"; do
  if [[ ! -e $d/.nemofs-bench-dist ]]; then need_kib=$((need_kib + 2 * 1048576 + 262144)); fi
done
avail_kib=$(free_kib "$WORKDIR")
((avail_kib >= need_kib)) ||
  die "$WORKDIR: $((avail_kib / 1048576)) GiB free, need about $((need_kib / 1048576 + 1)) GiB (2 GiB + margin per checkpoint folder)"

# ---- 1. the two checkpoints -----------------------------------------------------------
declare -A INFO RANGES DIRBYTES
for x in A B; do
  if [[ $x == A ]]; then kind=dim1 dir=$DIR_A; else kind=dim0 dir=$DIR_B; fi
  echo "== $x: $kind split: $dir"
  info=$("$PY" "$SCRIPT_DIR/make_dist_bench.py" build "$kind" "$dir") || die "make_dist_bench.py build $kind failed"
  read -r reused nbytes dbytes < <(json_get "$info" reused nbytes dir_bytes)
  RANGES[$x]=$(json_get "$info" ranges)
  DIRBYTES[$x]=$dbytes
  INFO[$x]=$("$PY" -c 'import json, sys; d = json.loads(sys.argv[1]); c = d["chunks"]
print("%d chunks of %s in %d files; data offsets in the items %s" % (len(c), "x".join(map(str, c[0]["sizes"])),
      len({x["file"] for x in c}), sorted({x["data_offset"] - x["item_offset"] for x in c})))' "$info")
  if [[ $reused == True ]]; then how=reused; else how=created; fi
  echo "   $how: $dbytes bytes; $KEY float32 [16384, 32768], $nbytes bytes; ${INFO[$x]}"
  ((nbytes == 2147483648)) || die "unexpected tensor size $nbytes"
done
NBYTES=2147483648
EXPECT=$NBYTES

echo "== warming the page cache (cat *.distcp > /dev/null)"
cat "$DIR_A"/*.distcp "$DIR_B"/*.distcp >/dev/null

# ---- 2. correctness ------------------------------------------------------------------
MIB=1048576
MID=$((8188 * 131072))  # rows 8188..8195: crosses B's chunk boundary at row 8192
CHECKS=("0:$MIB" "$MID:$MIB" "$((NBYTES - MIB)):$MIB")
echo "== verifying tensors/$KEY against the chunks (1 MiB at 0, at $MID, at the end)"
for x in A B; do
  if [[ $x == A ]]; then dir=$DIR_A; else dir=$DIR_B; fi
  "$PY" "$SCRIPT_DIR/make_dist_bench.py" expect "$dir" "$RUN_DIR/expect_$x" "${CHECKS[@]}" ||
    die "make_dist_bench.py expect $dir failed"
  mount_fresh "$dir"
  size=$(timeout "$T" stat -c %s "$MNT/tensors/$KEY") || die "$x: stat tensors/$KEY failed"
  [[ $size == "$NBYTES" ]] || die "$x: tensors/$KEY: size $size, expected $NBYTES"
  for i in "${!CHECKS[@]}"; do
    off=${CHECKS[$i]%%:*}
    cmp -s "$RUN_DIR/expect_$x.$i" <(timeout "$T" dd if="$MNT/tensors/$KEY" iflag=skip_bytes,count_bytes \
      skip="$off" count="$MIB" bs=1M 2>/dev/null) || die "$x: tensors/$KEY: 1 MiB at $off differs from the chunks"
  done
  umount_now
  rm -f "$RUN_DIR/expect_$x".*
  echo "   ok: $x (expected bytes from torch.load of the .distcp items, also checked against the value formula)"
done

# ---- 3. sequential reads -------------------------------------------------------------
echo "== sequential read of tensors/$KEY (dd bs=1M, 2 GiB), fresh mounts, vs dd of the chunks' .distcp ranges (x$REPS)"
declare -A BASE SHM FIRST AGAIN CPUF CPUA HWM
for x in A B; do BASE[$x]="" SHM[$x]="" FIRST[$x]="" AGAIN[$x]="" CPUF[$x]="" CPUA[$x]="" HWM[$x]=""; done
# seq_pass X DIR: one fresh mount; dd tensors/model.w twice (first pass, then from the
# mount's page cache), recording GB/s and the daemon CPU time of each pass.
seq_pass() {
  local x=$1 c0 c1 c2 r1 r2
  mount_fresh "$2"
  c0=$(cpu_ticks)
  r1=$(dd_rate if="$MNT/tensors/$KEY")
  c1=$(cpu_ticks)
  if [[ $BDI_RA == "?" ]]; then read_bdi_ra; fi  # after a read: the daemon raises it at its first request
  r2=$(dd_rate if="$MNT/tensors/$KEY")
  c2=$(cpu_ticks)
  umount_now
  FIRST[$x]+=" $r1" AGAIN[$x]+=" $r2"
  CPUF[$x]+=" $(ticks_to_s $((c1 - c0)))" CPUA[$x]+=" $(ticks_to_s $((c2 - c1)))"
  HWM[$x]+=" ${RSS_ALL[-1]:-0}"
}
last() { awk '{ print $NF }' <<<"$1"; }
for ((i = 1; i <= REPS; i++)); do
  for x in A B; do
    BASE[$x]+=" $(ranges_rate "${RANGES[$x]}")"
    if [[ -n $SHM_FILE ]]; then SHM[$x]+=" $(ranges_rate "${RANGES[$x]}" shm)"; fi
  done
  # alternate which layout goes first (the first GiBs of new page cache can be slower to fill)
  if ((i % 2)); then seq_pass A "$DIR_A"; seq_pass B "$DIR_B"; else seq_pass B "$DIR_B"; seq_pass A "$DIR_A"; fi
  for x in A B; do
    shm_msg=n/a
    if [[ -n $SHM_FILE ]]; then shm_msg=$(last "${SHM[$x]}"); fi
    echo "   rep $i $x: baseline $(last "${BASE[$x]}") GB/s, into tmpfs $shm_msg GB/s;" \
      "tensors/$KEY $(last "${FIRST[$x]}") then $(last "${AGAIN[$x]}") GB/s" \
      "(daemon CPU $(last "${CPUF[$x]}") / $(last "${CPUA[$x]}") s)"
  done
done
read_fuse_init

echo "== request sizes: strace of the daemon during a $TRACE_MIB MiB dd of tensors/$KEY (fresh mounts, untimed)"
trace_pass A "$DIR_A"
trace_pass B "$DIR_B"

# ---- 4. summary ----------------------------------------------------------------------
# shellcheck disable=SC2086  # med SAMPLES: the median of a space-separated sample list
med() { median $1; }
declare -A M
for x in A B; do
  M[base$x]=$(med "${BASE[$x]}") M[first$x]=$(med "${FIRST[$x]}") M[again$x]=$(med "${AGAIN[$x]}")
  M[cpuf$x]=$(med "${CPUF[$x]}") M[cpua$x]=$(med "${CPUA[$x]}")
  # shellcheck disable=SC2086
  M[hwm$x]=$(maxof ${HWM[$x]})
  if [[ -n $SHM_FILE ]]; then M[shm$x]=$(med "${SHM[$x]}"); fi
done

ROW_FMT='%-62s %12s %12s %9s\n'
summary_head "=========================================== nemofs dist-checkpoint benchmark ==========================================="
echo "load:      1/5/15-min load average $LOAD_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end (other work on the machine adds noise)"
summary_nemofs
echo "A:         $DIR_A (${DIRBYTES[A]} bytes): $KEY float32 [16384, 32768] split on dim 1, every row crosses 8 chunks;"
echo "           ${INFO[A]}"
echo "B:         $DIR_B (${DIRBYTES[B]} bytes): the same tensor split on dim 0, every row in one chunk;"
echo "           ${INFO[B]}"
echo "baseline:  dd bs=1M of each chunk's raw tensor bytes in its .distcp (item offset + data offset of"
echo "           archive/data/0), the 8 ranges one after the other: total bytes / summed seconds"
summary_table_start
for x in A B; do
  row "$x: tensors/$KEY, fresh mount (GB/s) [dd .distcp]" "$(fmt "${M[first$x]}")" "$(fmt "${M[base$x]}")" "$(ratio "${M[first$x]}" "${M[base$x]}")"
  if [[ -n $SHM_FILE ]]; then
    row "  ... fresh mount vs [dd the ranges into tmpfs]" "$(fmt "${M[first$x]}")" "$(fmt "${M[shm$x]}")" "$(ratio "${M[first$x]}" "${M[shm$x]}")"
  fi
  row "  ... same mount again (GB/s) [dd .distcp]" "$(fmt "${M[again$x]}")" "$(fmt "${M[base$x]}")" "$(ratio "${M[again$x]}" "${M[base$x]}")"
  row "  ... daemon CPU, fresh / again (s)" "${M[cpuf$x]} / ${M[cpua$x]}" "-" "-"
  row "  ... daemon VmHWM, max over mounts (MiB)" "$(kib_to_mib "${M[hwm$x]}")" "-" "-"
done
row "A vs B: fresh mount (GB/s) [B fresh mount]" "$(fmt "${M[firstA]}")" "$(fmt "${M[firstB]}")" "$(ratio "${M[firstA]}" "${M[firstB]}")"
row "A vs B: daemon CPU, fresh mount (s) [B]" "${M[cpufA]}" "${M[cpufB]}" "$(ratio "${M[cpufA]}" "${M[cpufB]}")"
echo
echo "samples: GB/s  A: baseline [${BASE[A]# }] into tmpfs [${SHM[A]# }] fresh [${FIRST[A]# }] again [${AGAIN[A]# }]"
echo "               B: baseline [${BASE[B]# }] into tmpfs [${SHM[B]# }] fresh [${FIRST[B]# }] again [${AGAIN[B]# }]"
echo "         daemon CPU s  A: [${CPUF[A]# }] / [${CPUA[A]# }]   B: [${CPUF[B]# }] / [${CPUA[B]# }]"
echo "         VmHWM KiB, all mounts [${RSS_ALL[*]}]"
echo "request sizes (strace of the daemon during a $TRACE_MIB MiB dd bs=1M, fresh mount; not timed):"
echo "  A (dim-1 split):"
cat "$LOGDIR/hist_A.txt"
echo "  B (dim-0 split):"
cat "$LOGDIR/hist_B.txt"
if ((KEEP)); then echo "kept:      $DIR_A $DIR_B"; fi
echo "logs:      $LOGDIR"
