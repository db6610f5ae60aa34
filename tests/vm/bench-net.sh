#!/usr/bin/env bash
# virtio-net over VDUSE in the test VM: iperf3 TCP throughput and ping round trip (p50) between
# two network namespaces joined by (switch) two virtiod VDUSE ports on its in-process switch,
# (veth) a veth pair, the kernel's own path, (veth-nooff) the same without offloads (as
# virtiod's frames are today: at most 1514 bytes, checksummed in software), and (bridge) two virtiod VDUSE ports on taps on a
# kernel bridge; the four alternate ROUNDS times in one VM. Prints a table of medians with the
# ratios to veth, and virtiod's CPU use during the iperf3 run. Under TCG the absolute figures
# are emulation-bound: compare the ratios. A benchmark: it asserts nothing about the figures.
# usage: tests/vm/bench-net.sh   (env ROUNDS=2 SECONDS_PER_RUN=5 PINGS=50 VM_CPUS=2, POLL_US=N
#        for virtiod's poll-us, default its own)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${VIRTIOD_BIN_DIR:-$here/../../target/release}
[ -x "$bin/virtiod" ] || { echo "bench-net: $bin/virtiod missing: cargo build --release -p virtiod" >&2; exit 2; }
out=$(mktemp); trap 'rm -f "$out"' EXIT
bash "$here/run-in-vm.sh" --timeout 900 --cpus "${VM_CPUS:-2}" --env "ROUNDS=${ROUNDS:-2}" \
  --env "SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}" --env "PINGS=${PINGS:-50}" --env "POLL_US=${POLL_US:-}" \
  --bin "$bin/virtiod" "$here/guest/bench-net.sh" >"$out" 2>&1 || {
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
        (c >= 0 ? c "%" : "-") } }'
