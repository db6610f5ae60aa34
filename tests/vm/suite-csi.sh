#!/usr/bin/env bash
# CSI suite: boots the 6.12 test kernel under QEMU and runs guest/csi.sh: virtiod-csi driven
# through its socket in the kubelet's order for ext4, xfs and block volumes (a "pod" in its own
# mount namespace writes and reads back; nothing is left behind), the restart promise (plugin
# and daemon SIGKILLed and restarted under a pod writing with O_DIRECT + fsync: no error, the
# data verifies) and online expansion of a mounted ext4 volume.
# usage: tests/vm/suite-csi.sh   (env VIRTIOD_BIN_DIR, default target/release)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${VIRTIOD_BIN_DIR:-$here/../../target/release}
for b in virtiod virtiod-csi; do
  [ -x "$bin/$b" ] || { echo "suite-csi: $bin/$b missing: cargo build --release -p virtiod -p virtiod-csi" >&2; exit 2; }
done
exec bash "$here/run-in-vm.sh" --timeout "${VM_TIMEOUT:-600}" --mem 1536 \
  --env "VIRTIOD_NO_SKIP=${VIRTIOD_NO_SKIP:-0}" \
  --bin "$bin/virtiod" --bin "$bin/virtiod-csi" "$here/guest/csi.sh"
