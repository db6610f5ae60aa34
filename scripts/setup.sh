#!/usr/bin/env bash
# Install what building and testing virtiod needs on a Debian 12 (bookworm) machine.
# Idempotent; runs as root; a no-op (well under a second) when everything is present.
#
# usage: scripts/setup.sh            # install what is missing
#        scripts/setup.sh --check    # only report what is missing; exit 1 if anything is
#
# Installs: build deps (build-essential, pkg-config), librbd1 (the RBD backend loads it at run time),
# Ceph for the RBD tests' single-node cluster (ceph-mon, ceph-osd, ceph-common: tests/ceph/),
# test tools (fio, e2fsprogs, nbdkit; qemu-nbd for
# the NBD tests comes with qemu-utils), and the VM harness deps of tests/vm/run-in-vm.sh
# (qemu-system-x86 from the SAME suite as the installed qemu-utils -- normally
# bookworm-backports, see scripts/lib-apt.sh -- plus busybox-static, cpio, iproute2 (the vdpa
# tool), xz-utils). The Rust toolchain itself is not installed here (rustup).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib-apt.sh
. "$here/lib-apt.sh"

CHECK=0
case "${1:-}" in
  --check) CHECK=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

PKGS=(build-essential pkg-config fio e2fsprogs xfsprogs busybox-static cpio iproute2 xz-utils zstd nbdkit
  librbd1 ceph-mon ceph-osd ceph-common)

mapfile -t missing < <(missing_pkgs qemu-utils qemu-system-x86 "${PKGS[@]}")
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all packages present"
else
  echo "setup: missing: ${missing[*]}"
  [ "$CHECK" = 0 ] || exit 1
  [ "$(id -u)" = 0 ] || { echo "setup: run as root to install" >&2; exit 1; }
  install_qemu          # first: it may add the backports source before the single apt-get update
  install_missing "${PKGS[@]}"
fi

# sanity: the QEMU pieces the tests use, on one version
for c in qemu-system-x86_64 qemu-storage-daemon qemu-img qemu-nbd nbdkit fio mkfs.ext4 busybox cpio vdpa xz; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/bin/$c" ] || { echo "setup: $c still missing" >&2; exit 1; }
done
qu=$(dpkg-query -W -f='${Version}' qemu-utils) qs=$(dpkg-query -W -f='${Version}' qemu-system-x86)
[ "$qu" = "$qs" ] || echo "setup: warning: qemu-utils $qu != qemu-system-x86 $qs" >&2
command -v cargo >/dev/null 2>&1 || echo "setup: note: no cargo on PATH (install Rust with rustup)" >&2
echo "setup: ok (qemu $qu)"
