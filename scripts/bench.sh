#!/usr/bin/env bash
# virtiod vs qemu-storage-daemon, side by side, on the same client (tools/bench, libblkio).
#
#   bash scripts/bench.sh                  # 3 alternating rounds of 5 s per workload (~5 min)
#   BENCH_ROUNDS=5 BENCH_SECONDS=10 bash scripts/bench.sh
#   BENCH_QUICK=1 bash scripts/bench.sh    # CI smoke: 1 round of 1 s, null workloads + 1 file + 1 NBD
#   VIRTIOD_ARGS="--poll-us 0" bash scripts/bench.sh   # extra virtiod flags (default: none —
#                                          # both servers run with their defaults)
#   BENCH_ONLY=qcow2 bash scripts/bench.sh # only the workloads whose name matches (grep -E),
#                                          # e.g. BENCH_ONLY='nbd|qcow2' (NBD rows: virtiod and
#                                          # qsd both clients of one qemu-nbd)
#
# Builds release binaries, then for every round and workload runs virtiod, then qsd (then fio
# for the device limit), each server freshly started and stopped. Prints one table of medians
# over the rounds, then the ratios the performance targets are expressed in.
# Exit status: 0 if every server and client run succeeded (figures are never asserted).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  ROUNDS=1 RUN_SECONDS=1
else
  ROUNDS=${BENCH_ROUNDS:-3} RUN_SECONDS=${BENCH_SECONDS:-5}
fi
TARGET_DIR=${CARGO_TARGET_DIR:-target}
IMG=$TARGET_DIR/bench-disk-1G.img
QIMG=$TARGET_DIR/bench-disk-1G.qcow2
QSD=${QSD:-qemu-storage-daemon}
VIRTIOD_ARGS=${VIRTIOD_ARGS:-}

command -v "$QSD" >/dev/null || { echo "bench: $QSD not found (scripts/setup.sh installs it)" >&2; exit 2; }
HAVE_FIO=0; command -v fio >/dev/null && HAVE_FIO=1

echo "bench: cargo build --release -p virtiod -p virtiod-bench" >&2
cargo build --release -q -p virtiod -p virtiod-bench
VIRTIOD=$TARGET_DIR/release/virtiod
CLIENT=$TARGET_DIR/release/virtiod-bench

# The 1 GiB raw file, written once with real blocks (fallocate alone leaves unwritten extents,
# which O_DIRECT reads answer without touching the device).
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" != 1073741824 ]; then
  echo "bench: writing $IMG (1 GiB, once)" >&2
  mkdir -p "$TARGET_DIR"
  fallocate -l 1G "$IMG.tmp" 2>/dev/null || true
  dd if=/dev/zero of="$IMG.tmp" bs=1M count=1024 oflag=direct conv=notrunc status=none
  mv "$IMG.tmp" "$IMG"
fi

# The 1 GiB qcow2 image, preallocated with real blocks (preallocation=full writes zeroes):
# every cluster is allocated, as in an image that has been in use for a while.
if [ "$QUICK" != 1 ] && [ ! -f "$QIMG" ]; then
  echo "bench: writing $QIMG (1 GiB qcow2, preallocation=full, once)" >&2
  qemu-img create -q -f qcow2 -o preallocation=full "$QIMG.tmp" 1G
  mv "$QIMG.tmp" "$QIMG"
fi

WORK=$(mktemp -d /tmp/virtiod-bench.XXXXXX)
RESULTS=$WORK/results.tsv
: > "$RESULTS"
SERVER_PID=
FAILED=0

NBD_SOCK=$WORK/nbd.sock
NBD_PID=

cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -KILL "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  if [ -n "$NBD_PID" ]; then kill -TERM "$NBD_PID" 2>/dev/null || true; wait "$NBD_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# utime+stime of PID, in clock ticks (fields 14 and 15; comm may hold spaces, so cut at ")").
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
json_field() { sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1"; }

# start_server virtiod|qsd null|file|qcow2 SOCKET LOG: start it in the background, wait for its socket.
start_server() {
  local kind=$1 backend=$2 sock=$3 log=$4
  rm -f "$sock"
  local cmd
  case $kind/$backend in
    # shellcheck disable=SC2206
    virtiod/null) cmd=("$VIRTIOD" serve --vhost-user "$sock" $VIRTIOD_ARGS null:1G) ;;
    # shellcheck disable=SC2206
    virtiod/file) cmd=("$VIRTIOD" serve --vhost-user "$sock" $VIRTIOD_ARGS "$IMG") ;;
    # read-zeroes=on: qsd's null device then zero-fills reads as virtiod's null: does.
    virtiod/qcow2) cmd=("$VIRTIOD" serve --vhost-user "$sock" $VIRTIOD_ARGS "qcow2:$QIMG") ;;
    qsd/qcow2) cmd=("$QSD" --blockdev driver=file,node-name=f0,filename="$QIMG",aio=io_uring,cache.direct=on
      --blockdev driver=qcow2,node-name=n0,file=f0
      --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$sock",writable=on) ;;
    qsd/null) cmd=("$QSD" --blockdev driver=null-co,node-name=n0,size=1073741824,read-zeroes=on
      --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$sock",writable=on) ;;
    qsd/file) cmd=("$QSD" --blockdev driver=file,node-name=n0,filename="$IMG",aio=io_uring,cache.direct=on
      --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$sock",writable=on) ;;
    # Both clients of the same qemu-nbd (start_nbd_server), each with its defaults.
    # shellcheck disable=SC2206
    virtiod/nbd) cmd=("$VIRTIOD" serve --vhost-user "$sock" $VIRTIOD_ARGS "nbd+unix:///?socket=$NBD_SOCK") ;;
    qsd/nbd) cmd=("$QSD" --blockdev driver=nbd,node-name=n0,server.type=unix,server.path="$NBD_SOCK"
      --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$sock",writable=on) ;;
  esac
  # A simple command (not a compound one) so that $! is the server itself, not a subshell.
  "${cmd[@]}" </dev/null >"$log" 2>&1 &
  SERVER_PID=$!
  local i
  for i in $(seq 200); do
    [ -S "$sock" ] && { sleep 0.1; return 0; }
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "bench: $kind ($backend) did not start; log:" >&2; tail -5 "$log" >&2
  return 1
}

stop_server() {
  local i
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

# The NBD workloads' server: one qemu-nbd on the 1 GiB file (O_DIRECT, io_uring) for the whole
# run, serving virtiod and qsd alike.
start_nbd_server() {
  [ -n "$NBD_PID" ] && return 0
  qemu-nbd --persistent --shared=8 -f raw --cache=none --aio=io_uring -k "$NBD_SOCK" "$IMG" \
    </dev/null >"$WORK/qemu-nbd.log" 2>&1 &
  NBD_PID=$!
  local i
  for i in $(seq 200); do
    [ -S "$NBD_SOCK" ] && return 0
    kill -0 "$NBD_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "bench: qemu-nbd did not start; log:" >&2; tail -5 "$WORK/qemu-nbd.log" >&2
  return 1
}

# record WORKLOAD SERVER ROUND IOPS P50 P99 CPU_US_PER_IO RSS_MIB
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }

fail() { echo "bench: FAILED: $*" >&2; FAILED=1; }

# run_server WORKLOAD ROUND SERVER BACKEND CLIENT_ARGS...
run_server() {
  local wl=$1 round=$2 kind=$3 backend=$4; shift 4
  local sock=$WORK/$kind.sock log=$WORK/$kind-$wl-$round.log out cpu0 cpu1 rss ios
  if [ "$backend" = nbd ]; then start_nbd_server || { fail "qemu-nbd start"; return; }; fi
  start_server "$kind" "$backend" "$sock" "$log" || { fail "$kind $wl: server start"; stop_server; return; }
  cpu0=$(cpu_ticks "$SERVER_PID")
  # VmRSS while serving: sampled half-way through the run.
  ( sleep "$(awk -v s="$RUN_SECONDS" 'BEGIN { print s / 2 }')"; rss_kib "$SERVER_PID" >"$WORK/rss" 2>/dev/null ) &
  local sampler=$!
  if ! out=$(RUST_LIB_BACKTRACE=0 "$CLIENT" --socket "$sock" --seconds "$RUN_SECONDS" "$@" 2>"$WORK/client.err"); then
    fail "$kind $wl round $round: client: $(head -3 "$WORK/client.err" | tr '\n' ' ')"
    wait "$sampler" 2>/dev/null || true; stop_server; return
  fi
  wait "$sampler" 2>/dev/null || true
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail "$kind $wl round $round: server died; log: $(tail -3 "$log" | tr '\n' ' ')"; stop_server; return
  fi
  cpu1=$(cpu_ticks "$SERVER_PID")
  stop_server
  rss=$(cat "$WORK/rss" 2>/dev/null || echo 0)
  ios=$(json_field "$out" ios)
  record "$wl" "$kind" "$round" "$(json_field "$out" iops)" "$(json_field "$out" lat_p50_us)" \
    "$(json_field "$out" lat_p99_us)" \
    "$(awk -v c=$((cpu1 - cpu0)) -v t="$(getconf CLK_TCK)" -v n="$ios" 'BEGIN { printf "%.2f", n ? c * 1e6 / t / n : 0 }')" \
    "$(awk -v k="$rss" 'BEGIN { printf "%.1f", k / 1024 }')"
  printf 'bench: round %s %-22s %-8s %s\n' "$round" "$wl" "$kind" "$out" >&2
}

# run_fio WORKLOAD ROUND: fio io_uring O_DIRECT randread QD32 straight on the file.
run_fio() {
  local wl=$1 round=$2 out iops p50 p99
  if ! out=$(fio --name=dev --filename="$IMG" --ioengine=io_uring --direct=1 --rw=randread \
      --bs=4k --iodepth=32 --runtime="$RUN_SECONDS" --time_based --output-format=terse \
      --terse-version=3 2>"$WORK/fio.err"); then
    fail "fio $wl round $round: $(head -3 "$WORK/fio.err" | tr '\n' ' ')"; return
  fi
  # terse v3: field 8 = read IOPS; clat percentiles are "P%=usec" fields.
  iops=$(awk -F';' '{ print $8 }' <<<"$out")
  p50=$(tr ';' '\n' <<<"$out" | sed -n 's/^50.000000%=//p' | head -1)
  p99=$(tr ';' '\n' <<<"$out" | sed -n 's/^99.000000%=//p' | head -1)
  record "$wl" fio "$round" "$iops" "$p50" "$p99" - -
  printf 'bench: round %s %-22s %-8s iops=%s p50=%s p99=%s\n' "$round" "$wl" fio "$iops" "$p50" "$p99" >&2
}

# Workloads: NAME BACKEND CLIENT_ARGS (all 4 KiB random).
WORKLOADS=(
  "null-qd1-irq     null --queue-depth 1 --rw randread"
  "null-qd32-irq    null --queue-depth 32 --rw randread"
  "null-qd1-poll    null --queue-depth 1 --rw randread --poll"
  "null-qd32-poll   null --queue-depth 32 --rw randread --poll"
  "file-qd1-randread   file --queue-depth 1 --rw randread"
  "file-qd32-randread  file --queue-depth 32 --rw randread"
  "file-qd1-randwrite  file --queue-depth 1 --rw randwrite"
  "file-qd32-randwrite file --queue-depth 32 --rw randwrite"
  "nbd-qd1-randread    nbd --queue-depth 1 --rw randread"
  "nbd-qd32-randread   nbd --queue-depth 32 --rw randread"
  "nbd-qd1-randwrite   nbd --queue-depth 1 --rw randwrite"
  "nbd-qd32-randwrite  nbd --queue-depth 32 --rw randwrite"
  "qcow2-qd1-randread   qcow2 --queue-depth 1 --rw randread"
  "qcow2-qd32-randread  qcow2 --queue-depth 32 --rw randread"
  "qcow2-qd1-randwrite  qcow2 --queue-depth 1 --rw randwrite"
  "qcow2-qd32-randwrite qcow2 --queue-depth 32 --rw randwrite"
)
if [ "$QUICK" = 1 ]; then
  WORKLOADS=("${WORKLOADS[@]:0:4}" "${WORKLOADS[5]}" "${WORKLOADS[9]}")
fi
if [ -n "${BENCH_ONLY:-}" ]; then
  mapfile -t WORKLOADS < <(printf '%s\n' "${WORKLOADS[@]}" | grep -E "^[^ ]*(${BENCH_ONLY})")
  [ "${#WORKLOADS[@]}" -gt 0 ] || { echo "bench: no workload matches BENCH_ONLY=$BENCH_ONLY" >&2; exit 2; }
fi

CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
echo "bench: CPU: ${CPU_MODEL:-unknown}; kernel $(uname -r)" >&2
echo "bench: $ROUNDS round(s) x ${RUN_SECONDS}s, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), virtiod flags: ${VIRTIOD_ARGS:-none}" >&2
for round in $(seq "$ROUNDS"); do
  for w in "${WORKLOADS[@]}"; do
    # shellcheck disable=SC2086
    set -- $w
    wl=$1 backend=$2; shift 2
    run_server "$wl" "$round" virtiod "$backend" --block-size 4096 "$@"
    run_server "$wl" "$round" qsd "$backend" --block-size 4096 "$@"
    if [ "$wl" = file-qd32-randread ] && [ "$QUICK" != 1 ] && [ "$HAVE_FIO" = 1 ]; then
      run_fio "$wl" "$round"
    fi
  done
done

# Medians over rounds, one row per (workload, server), in run order; then the target ratios.
awk -F'\t' -v rounds="$ROUNDS" -v secs="$RUN_SECONDS" -v cpu="${CPU_MODEL:-unknown}" -v vargs="${VIRTIOD_ARGS:-defaults}" '
  function median(list,   n, a, i, j, t) {
    n = split(list, a, " ")
    if (n == 0 || a[1] == "-") return "-"
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  {
    k = $1 SUBSEP $2
    if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
    for (f = 4; f <= 8; f++) v[k, f] = v[k, f] " " $f
  }
  END {
    printf "\n%d round(s) x %ss, medians over rounds; 4 KiB random I/O, one queue\n", rounds, secs
    printf "CPU: %s; virtiod flags: %s; qsd: defaults\n\n", cpu, vargs
    printf "| %-19s | %-7s | %9s | %8s | %8s | %15s | %8s |\n", "workload", "server", "IOPS", "p50 us", "p99 us", "srv CPU us/IO", "RSS MiB"
    printf "|%s|%s|%s|%s|%s|%s|%s|\n", "---------------------", "---------", "----------:", "---------:", "---------:", "-----------------:", "---------:"
    for (i = 1; i <= nk; i++) {
      k = order[i]; split(k, p, SUBSEP)
      for (f = 4; f <= 8; f++) m[k, f] = median(v[k, f])
      printf "| %-19s | %-7s | %9.0f | %8s | %8s | %15s | %8s |\n", p[1], p[2], m[k, 4], num(m[k, 5], 1), num(m[k, 6], 1), num(m[k, 7], 2), num(m[k, 8], 1)
    }
    print "\nTargets (virtiod vs peer, medians):\n"
    ratio("null QD32 interrupt IOPS virtiod/qsd", "null-qd32-irq", "virtiod", "qsd", 4, ">=", 1.5)
    ratio("null QD1 polling IOPS virtiod/qsd", "null-qd1-poll", "virtiod", "qsd", 4, ">=", 2.5)
    ratio("null QD32 polling IOPS virtiod/qsd", "null-qd32-poll", "virtiod", "qsd", 4, ">=", 2.5)
    ratio("null QD1 p50 latency virtiod/qsd", "null-qd1-irq", "virtiod", "qsd", 5, "<=", 0.8)
    ratio("file QD32 randread IOPS virtiod/fio", "file-qd32-randread", "virtiod", "fio", 4, ">=", 0.97)
    ratio("file QD1 randread IOPS virtiod/qsd", "file-qd1-randread", "virtiod", "qsd", 4, ">=", 1.1)
    ratio("NBD QD1 randread IOPS virtiod/qsd", "nbd-qd1-randread", "virtiod", "qsd", 4, ">=", 1.1)
    ratio("NBD QD32 randread IOPS virtiod/qsd", "nbd-qd32-randread", "virtiod", "qsd", 4, ">=", 1.1)
    ratio("NBD QD1 randwrite IOPS virtiod/qsd", "nbd-qd1-randwrite", "virtiod", "qsd", 4, ">=", 1.1)
    ratio("NBD QD32 randwrite IOPS virtiod/qsd", "nbd-qd32-randwrite", "virtiod", "qsd", 4, ">=", 1.1)
    ratio("qcow2 QD32 randread IOPS virtiod/qsd", "qcow2-qd32-randread", "virtiod", "qsd", 4, ">=", 1.3)
    ratio("qcow2 QD32 randwrite IOPS virtiod/qsd", "qcow2-qd32-randwrite", "virtiod", "qsd", 4, ">=", 1.3)
    ratio("qcow2 QD1 randread IOPS virtiod/qsd", "qcow2-qd1-randread", "virtiod", "qsd", 4, ">=", 1.1)
    ratio("qcow2 QD1 randwrite IOPS virtiod/qsd", "qcow2-qd1-randwrite", "virtiod", "qsd", 4, ">=", 1.1)
    for (i = 1; i <= nk; i++) {
      split(order[i], p, SUBSEP)
      if (p[2] == "virtiod") ratio("server CPU/IO " p[1] " virtiod/qsd", p[1], "virtiod", "qsd", 7, "<=", 0.7)
    }
    rss = 0
    for (i = 1; i <= nk; i++) { split(order[i], p, SUBSEP); if (p[2] == "virtiod" && m[order[i], 8] + 0 > rss) rss = m[order[i], 8] + 0 }
    printf "  %-40s %8.1f MiB  target <= 8 MiB  %s\n", "virtiod RSS (max over workloads)", rss, rss <= 8 ? "MET" : "MISSED"
  }
  function num(x, d) { return x == "-" ? x : sprintf("%." d "f", x) }
  # Ratio of the medians, and the median of the per-round ratios (each round runs the two
  # back to back, so the paired ratio cancels slow drifts of the machine load).
  function ratio(label, wl, a, b, f, op, want,   x, y, r, ok, va, vb, na, nb, i, pr) {
    x = m[wl SUBSEP a, f]; y = m[wl SUBSEP b, f]
    if (x == "" || y == "" || x == "-" || y == "-" || y + 0 == 0) { printf "  %-40s %8s       (not measured)\n", label, "-"; return }
    na = split(v[wl SUBSEP a, f], va, " "); nb = split(v[wl SUBSEP b, f], vb, " "); pr = ""
    for (i = 1; i <= na && i <= nb; i++) if (vb[i] + 0 > 0) pr = pr " " va[i] / vb[i]
    r = x / y; ok = (op == ">=") ? r >= want : r <= want
    printf "  %-40s %8.2f      target %s %-4s  %-6s  (paired per-round median %.2f)\n", label, r, op, want, ok ? "MET" : "MISSED", median(pr)
  }
' "$RESULTS"

if [ "$FAILED" != 0 ]; then
  echo "bench: some runs FAILED (see above)" >&2
  exit 1
fi
