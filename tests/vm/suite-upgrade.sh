#!/usr/bin/env bash
# Upgrade in place through VDUSE: boots the 6.12 test kernel under QEMU and runs
# guest/upgrade.sh (ten `virtiod ctl upgrade`s under a verified 4 KiB O_DIRECT write stream,
# a second device on a qcow2 image written across them, two failed upgrades, SIGKILL +
# restart cycles for comparison, SIGTERM + start cycles with `--on-stop keep`; prints the
# pauses).
# usage: tests/vm/suite-upgrade.sh   (env VIRTIOD_BIN_DIR, default target/release)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${VIRTIOD_BIN_DIR:-$here/../../target/release}
for b in virtiod virtiod-blkcheck; do
  [ -x "$bin/$b" ] || { echo "suite-upgrade: $bin/$b missing: cargo build --release -p virtiod -p virtiod-blkcheck" >&2; exit 2; }
done
# A qcow2 image for the second device (the guest has no qemu-img): an empty 32 MiB image.
q=$(mktemp -d); trap 'rm -rf "$q"' EXIT
qemu-img create -q -f qcow2 "$q/q.qcow2" 32M
bash "$here/run-in-vm.sh" --timeout "${VM_TIMEOUT:-400}" \
  --bin "$bin/virtiod" --bin "$bin/virtiod-blkcheck" --file "$q:/qimg" "$here/guest/upgrade.sh"
