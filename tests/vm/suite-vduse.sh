#!/usr/bin/env bash
# End-to-end VDUSE suite: boots the 6.12 test kernel under QEMU and runs guest/vduse-e2e.sh
# against the release virtiod (and virtiod-blkcheck for the vhost-vdpa path), then, in a second
# VM, guest/vduse-net.sh (VDUSE net devices on one switch across two netns: ping, a 64 MiB TCP
# transfer, iperf3, SIGKILL + restart mid-transfer; a tap; --attach vhost), then a short smoke
# of tests/vm/bench-net.sh (its figures printed, never asserted; BENCH_NET_SMOKE=0 skips it).
# usage: tests/vm/suite-vduse.sh   (env VIRTIOD_BIN_DIR, default target/release)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${VIRTIOD_BIN_DIR:-$here/../../target/release}
for b in virtiod virtiod-blkcheck; do
  [ -x "$bin/$b" ] || { echo "suite-vduse: $bin/$b missing: cargo build --release -p virtiod -p virtiod-blkcheck" >&2; exit 2; }
done
# The guest skips a check only without VIRTIOD_NO_SKIP=1; its "SKIPPED:" lines go to
# VIRTIOD_SKIP_LOG (scripts/test.sh counts them).
out=$(mktemp); q=$(mktemp -d); trap 'rm -rf "$out" "$q"' EXIT
# qcow2 images for the guest (it has no qemu-img): a qcow2 overlay on a raw backing file.
head -c 8M /dev/urandom >"$q/base.raw"
qemu-img create -q -f qcow2 -b base.raw -F raw "$q/over.qcow2" 32M
set +e
bash "$here/run-in-vm.sh" --timeout "${VM_TIMEOUT:-600}" --env "VIRTIOD_NO_SKIP=${VIRTIOD_NO_SKIP:-0}" \
  --bin "$bin/virtiod" --bin "$bin/virtiod-blkcheck" --bin "$(command -v resize2fs)" \
  --file "$q:/qimg" "$here/guest/vduse-e2e.sh" | tee "$out"
rc=${PIPESTATUS[0]}
if [ "$rc" = 0 ]; then
  # VDUSE net: two interfaces on one in-process switch, one netns each; a tap; vhost-vdpa.
  # (two 64 MiB transfers: ~2 min under TCG, up to 10 on a loaded machine)
  bash "$here/run-in-vm.sh" --timeout "${VM_TIMEOUT:-900}" --bin "$bin/virtiod" \
    "$here/guest/vduse-net.sh" | tee -a "$out"
  rc=${PIPESTATUS[0]}
fi
if [ "$rc" = 0 ] && [ "${BENCH_NET_SMOKE:-1}" = 1 ]; then
  # the benchmark must keep running; its figures are not judged here
  ROUNDS=1 SECONDS_PER_RUN=2 PINGS=10 VIRTIOD_BIN_DIR=$bin bash "$here/bench-net.sh"
  rc=$?
fi
set -e
if [ -n "${VIRTIOD_SKIP_LOG:-}" ]; then
  tr -d '\r' <"$out" | grep -a '^SKIPPED:' | sed 's/^/suite-vduse: /' >>"$VIRTIOD_SKIP_LOG" || true
fi
exit "$rc"
