#!/usr/bin/env bash
# VDUSE side by side in the test VM: fio inside the guest on /dev/vda served by virtiod and by
# qemu-storage-daemon --export vduse-blk (same kernel, same image in the guest's RAM,
# alternating). Prints a table of median IOPS and the virtiod/qsd ratio. Under TCG the absolute
# figures are emulation-bound: compare the ratios only.
# usage: tests/vm/bench-vduse.sh   (env ROUNDS=2 SECONDS_PER_RUN=5 VIRTIOD_ARGS="--poll-us 32")
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${VIRTIOD_BIN_DIR:-$here/../../target/release}
out=$(mktemp); trap 'rm -f "$out"' EXIT
bash "$here/run-in-vm.sh" --with-fio --timeout 900 --env "ROUNDS=${ROUNDS:-2}" \
  --env "SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}" --env "VIRTIOD_ARGS=${VIRTIOD_ARGS:-}" \
  --bin "$bin/virtiod" \
  --bin /usr/bin/qemu-storage-daemon "$here/guest/bench-vduse.sh" >"$out" 2>&1 || {
  grep -E "GUEST-FAIL|BENCH" "$out" || tail -20 "$out"; exit 1; }
grep '^BENCH' "$out" | tr -d '\r' | awk '
  { key = $3; v[$2 "," key] = v[$2 "," key] " " $4; keys[key] = 1 }
  function median(s,   a, n, i, j, t) { n = split(s, a, " ");
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
  END { printf "%-14s %12s %12s %8s\n", "workload", "virtiod IOPS", "qsd IOPS", "ratio";
    for (k in keys) { a = median(v["virtiod," k]); b = median(v["qsd," k]);
      printf "%-14s %12.0f %12.0f %8.2f\n", k, a, b, (b > 0 ? a / b : 0) } }' | sort
