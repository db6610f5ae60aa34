#!/usr/bin/env bash
# virtio-net over VDUSE in the test VM: iperf3 TCP throughput and ping round trip (p50) between
# two network namespaces joined by (switch) two virtiod VDUSE ports on its in-process switch,
# (veth) a veth pair, the kernel's own path, (veth-nooff) the same without offloads (as
# virtiod's frames are today: at most 1514 bytes, checksummed in software), and (bridge) two virtiod VDUSE ports on taps on a
# kernel bridge; the four alternate ROUNDS times in one VM. Prints a table of medians with the
# ratios to veth, and virtiod's CPU use during the iperf3 run. Under TCG the absolute figures
# are emulation-bound: compare the ratios. A benchmark: it asserts nothing about the figures.
# usage: tests/vm/bench-net.sh   (env ROUNDS=2 SECONDS_PER_RUN=5 PINGS=50 VM_CPUS=2, POLL_US=N
#        for virtiod's poll-us, default its own; PERF=1 profiles each path's first iperf3 run
#        with the host's perf (apt-get install linux-perf) and prints the top entries)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${VIRTIOD_BIN_DIR:-$here/../../target/release}
[ -x "$bin/virtiod" ] || { echo "bench-net: $bin/virtiod missing: cargo build --release -p virtiod" >&2; exit 2; }
out=$(mktemp); trap 'rm -f "$out"' EXIT
bash "$here/run-in-vm.sh" --timeout 900 --cpus "${VM_CPUS:-2}" --env "ROUNDS=${ROUNDS:-2}" \
  --env "SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}" --env "PINGS=${PINGS:-50}" --env "POLL_US=${POLL_US:-}" \
  --bin "$bin/virtiod" ${PERF:+--env PERF=1 --bin /usr/bin/perf} "$here/guest/bench-net.sh" >"$out" 2>&1 || {
  grep -a -A40 "GUEST-FAIL" "$out" || tail -20 "$out"; exit 1; }
echo "host CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1) ($(nproc) CPUs);" \
  "guest: ${VM_CPUS:-2} vCPUs under QEMU TCG; rounds: ${ROUNDS:-2}, iperf3 -t ${SECONDS_PER_RUN:-5}, ping -c ${PINGS:-50} -i 0.05${POLL_US:+, poll-us $POLL_US}"
grep -a '^BENCH' "$out" | tr -d '\r' | awk '
  { v[$2 "," $3] = v[$2 "," $3] " " $4 }
  function median(s,   a, n, i, j, t) { n = split(s, a, " "); if (!n) return -1;
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
  END {
    bt = median(v["veth,tcp_mbps"]); bl = median(v["veth,rtt_p50_us"])
    printf "%-10s %10s %8s %12s %8s %12s\n", "path", "TCP Mbit/s", "x veth", "RTT p50 us", "x veth", "virtiod CPU"
    n = split("switch veth veth-nooff bridge", paths, " ")
    for (i = 1; i <= n; i++) { p = paths[i]; t = median(v[p ",tcp_mbps"]); l = median(v[p ",rtt_p50_us"])
      c = median(v[p ",cpu_pct"])
      printf "%-10s %10.0f %8.2f %12.0f %8.2f %12s\n", p, t, (bt > 0 ? t / bt : 0), l, (bl > 0 ? l / bl : 0),
        (c >= 0 ? c "%" : "-") }
    printf "\nguest CPU during iperf3: %% busy, and µs of guest CPU per frame (both directions; a veth\n"
    printf "with offloads counts a GSO super-frame of up to 64 KiB as one)\n"
    for (i = 1; i <= n; i++) { p = paths[i]
      d = median(v[p ",drops"])
      printf "%-10s %4.0f%% busy %8.0f us/frame %s\n", p, median(v[p ",guest_busy_pct"]), median(v[p ",guest_us_per_frame"]),
        (d >= 0 ? sprintf("%8d frames dropped by virtiod'"'"'s ports", d) : "") } }'
echo
echo "virtiod threads (summed over both devices; last round): CPU us and context switches per frame"
grep -a '^PROFILE' "$out" | tr -d '\r' | awk '{ last[$2 " " $3] = $0 } END { for (k in last) print last[k] }' | sort \
  | awk '{ printf "%-10s %-14s %6s us/frame %6s switches/frame\n", $2, $3, $5, $7 }'
if grep -aq '^PERF ' "$out"; then
  echo
  echo "perf (cpu-clock, whole guest) during each path's first iperf3 run: top entries by comm,dso and comm,sym"
  grep -a '^PERF ' "$out" | tr -d '\r' | cut -d' ' -f2-
fi
