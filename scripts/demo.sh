#!/usr/bin/env bash
# The whole path in the test VM (Debian 6.12 kernel with VDUSE, under QEMU): virtiod doctor,
# serve a disk image through VDUSE with metrics on, mkfs.ext4, mount, write a file, read the
# Prometheus metrics with busybox wget, and stop cleanly with SIGTERM.
#
# usage: scripts/demo.sh            (env VIRTIOD_BIN: a virtiod binary to use instead of
#                                     building target/release/virtiod)
# Needs what tests/vm/run-in-vm.sh needs (scripts/setup.sh installs it; the first run downloads
# and caches the kernel). Takes about a minute under TCG.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

bin=${VIRTIOD_BIN:-}
if [ -z "$bin" ]; then
  echo "demo: building virtiod (release)"
  (cd "$root" && cargo build --release -q -p virtiod)
  bin=${CARGO_TARGET_DIR:-$root/target}/release/virtiod
fi
[ -x "$bin" ] || { echo "demo: no virtiod at $bin" >&2; exit 2; }

guest=$(mktemp /tmp/virtiod-demo-guest.XXXXXX.sh)
trap 'rm -f "$guest"' EXIT
cat >"$guest" <<'GUEST'
#!/bin/sh
# Guest half of scripts/demo.sh (busybox ash, as root, in /tmp).
set -u
say() { printf '\n=== %s\n' "$*"; }
fail() { echo "GUEST-FAIL: $*"; tail -20 /tmp/virtiod.log 2>/dev/null; exit 1; }
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up

say "virtiod doctor: can this host serve VDUSE?"
virtiod doctor || fail "doctor found a FAIL"

say "a 256 MiB image, served through VDUSE with metrics on 127.0.0.1:9810"
dd if=/dev/zero of=/tmp/disk.img bs=1M count=256 2>/dev/null
echo '$ virtiod serve --vduse demo0 --metrics 127.0.0.1:9810 --serial demo-disk /tmp/disk.img &'
virtiod serve --vduse demo0 --metrics 127.0.0.1:9810 --serial demo-disk /tmp/disk.img \
  >/tmp/node 2>/tmp/virtiod.log &
pid=$!
i=0; while [ ! -s /tmp/node ]; do
  kill -0 $pid 2>/dev/null || fail "virtiod exited"
  i=$((i+1)); [ $i -le 300 ] || fail "no device node"; sleep 0.1
done
node=$(cat /tmp/node)
echo "virtiod printed $node; the kernel sees: $(cat /sys/block/${node#/dev/}/size) sectors, serial $(cat /sys/block/${node#/dev/}/serial)"

say "mkfs.ext4, mount, write"
mkfs.ext4 -q -F "$node" || fail mkfs
mkdir -p /mnt/demo && mount -t ext4 "$node" /mnt/demo || fail mount
dd if=/dev/urandom of=/mnt/demo/data.bin bs=1M count=16 2>/dev/null
echo "hello from a virtio-blk device served by virtiod" >/mnt/demo/hello.txt
sync
df -h /mnt/demo | tail -1
ls -l /mnt/demo
sum=$(md5sum </mnt/demo/data.bin)
umount /mnt/demo && echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 "$node" /mnt/demo || fail remount
[ "$(md5sum </mnt/demo/data.bin)" = "$sum" ] || fail "data differs after remount"
cat /mnt/demo/hello.txt
umount /mnt/demo

say "metrics: busybox wget -qO- http://127.0.0.1:9810/metrics"
wget -qO- http://127.0.0.1:9810/metrics >/tmp/metrics || fail "metrics"
grep -E '^virtiod_(requests_total|bytes_total)\{.*op="(read|write|flush)"|^virtiod_(errors_total|in_flight|queues|device_up)|^virtiod_request_latency_seconds_(count|sum)' /tmp/metrics
writes=$(sed -n 's/^virtiod_requests_total{device="demo0",op="write"} //p' /tmp/metrics)
[ "${writes:-0}" -gt 0 ] || fail "no writes counted"

say "SIGTERM: complete, flush, detach, destroy"
kill -TERM $pid; wait $pid; rc=$?
echo "virtiod exited $rc; $node present: $([ -e "$node" ] && echo yes || echo no); /dev/vduse/demo0 present: $([ -e /dev/vduse/demo0 ] && echo yes || echo no)"
[ $rc -eq 0 ] || fail "exit $rc"
echo "demo: done"
GUEST

exec bash "$root/tests/vm/run-in-vm.sh" --timeout "${VM_TIMEOUT:-600}" --bin "$bin" "$guest"
