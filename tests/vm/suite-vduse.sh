#!/usr/bin/env bash
# End-to-end VDUSE suite: boots the 6.12 test kernel under QEMU and runs guest/vduse-e2e.sh
# against the release virtiod (and virtiod-blkcheck for the vhost-vdpa path), then, in a second
# VM, guest/vduse-net.sh (VDUSE net devices on one switch, pinging across two netns).
# usage: tests/vm/suite-vduse.sh   (env VIRTIOD_BIN_DIR, default target/release)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${VIRTIOD_BIN_DIR:-$here/../../target/release}
for b in virtiod virtiod-blkcheck; do
  [ -x "$bin/$b" ] || { echo "suite-vduse: $bin/$b missing: cargo build --release -p virtiod -p virtiod-blkcheck" >&2; exit 2; }
done
# The guest skips a check only without VIRTIOD_NO_SKIP=1; its "SKIPPED:" lines go to
# VIRTIOD_SKIP_LOG (scripts/test.sh counts them).
out=$(mktemp); trap 'rm -f "$out"' EXIT
set +e
bash "$here/run-in-vm.sh" --timeout "${VM_TIMEOUT:-600}" --env "VIRTIOD_NO_SKIP=${VIRTIOD_NO_SKIP:-0}" \
  --bin "$bin/virtiod" --bin "$bin/virtiod-blkcheck" --bin "$(command -v resize2fs)" \
  "$here/guest/vduse-e2e.sh" | tee "$out"
rc=${PIPESTATUS[0]}
if [ "$rc" = 0 ]; then
  # VDUSE net: two interfaces on one in-process switch, one netns each, ping both ways.
  bash "$here/run-in-vm.sh" --timeout "${VM_TIMEOUT:-600}" --bin "$bin/virtiod" \
    "$here/guest/vduse-net.sh" | tee -a "$out"
  rc=${PIPESTATUS[0]}
fi
set -e
if [ -n "${VIRTIOD_SKIP_LOG:-}" ]; then
  tr -d '\r' <"$out" | grep -a '^SKIPPED:' | sed 's/^/suite-vduse: /' >>"$VIRTIOD_SKIP_LOG" || true
fi
exit "$rc"
