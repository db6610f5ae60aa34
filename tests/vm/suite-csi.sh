#!/usr/bin/env bash
# CSI suite: boots the 6.12 test kernel under QEMU and runs, in the same boot:
# - guest/csi.sh: virtiod-csi driven through its socket in the kubelet's order for ext4, xfs and
#   block volumes (a "pod" in its own mount namespace writes and reads back; nothing is left
#   behind), the restart promise (plugin and daemon SIGKILLed and restarted, the daemon upgraded
#   in place and stopped with SIGTERM under --on-stop keep and started, under a pod writing
#   with O_DIRECT + fsync: no error, the data verifies) and online expansion of a mounted ext4
#   volume;
# - guest/csi-sanity.sh: the csi-sanity conformance checks against the plugin and daemon, the
#   node checks included (stage, publish, expand, unpublish, unstage on real VDUSE devices).
# usage: tests/vm/suite-csi.sh   (env VIRTIOD_BIN_DIR, default target/release)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${VIRTIOD_BIN_DIR:-$here/../../target/release}
for b in virtiod virtiod-csi csi-sanity; do
  [ -x "$bin/$b" ] || { echo "suite-csi: $bin/$b missing: cargo build --release -p virtiod -p virtiod-csi -p virtiod-csi-sanity" >&2; exit 2; }
done
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# csi-sanity without its debug information: less to pack into the initramfs and hold in RAM.
objcopy --strip-debug "$bin/csi-sanity" "$tmp/csi-sanity" 2>/dev/null || cp "$bin/csi-sanity" "$tmp/"
# run-in-vm.sh runs one guest script: this one runs both parts, the second only if the first passed.
cat >"$tmp/guest.sh" <<'GUEST'
sh /guest/csi.sh || exit $?
sh /guest/csi-sanity.sh
GUEST
bash "$here/run-in-vm.sh" --timeout "${VM_TIMEOUT:-600}" --mem 1536 \
  --env "VIRTIOD_NO_SKIP=${VIRTIOD_NO_SKIP:-0}" \
  --bin "$bin/virtiod" --bin "$bin/virtiod-csi" --bin "$tmp/csi-sanity" \
  --file "$here/guest/csi.sh:/guest/csi.sh" --file "$here/guest/csi-sanity.sh:/guest/csi-sanity.sh" \
  "$tmp/guest.sh"
