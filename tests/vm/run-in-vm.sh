#!/usr/bin/env bash
# Boot a throw-away Linux VM that has VDUSE/vDPA, run one guest script in it, and exit with that
# script's exit code.
#
# usage: tests/vm/run-in-vm.sh [--bin HOST_BINARY]... [--file HOST_PATH:GUEST_PATH]...
#            [--env NAME=VALUE]... [--with-fio] [--mem MiB] [--cpus N] [--timeout SECONDS]
#            [--qemu-arg ARG]... GUEST_SCRIPT
#
# The guest is Debian's 6.12 cloud kernel under QEMU TCG (no KVM needed) booted into an
# initramfs with busybox, the vdpa tool, e2fsprogs (mkfs.ext4/mke2fs, e2fsck/fsck.ext4,
# resize2fs), util-linux's blkid and unshare, xfsprogs' mkfs.xfs and xfs_growfs, blkdiscard,
# iproute2's ip (netns, tuntap), iperf3, socat and ethtool, and the modules vhost_iotlb vdpa
# vduse virtio_vdpa irqbypass vhost vhost_vdpa virtio_blk loop virtio-rng failover net_failover
# virtio_net tun veth llc stp bridge libcrc32c xfs already loaded (ext4 is built into that kernel). /dev/vduse/control exists when
# the script starts; the script runs as root with cwd /tmp (a tmpfs in RAM).
#   --bin       copy a binary (with its shared libraries) to /bin
#   --file      copy a host file or directory to GUEST_PATH
#   --env       export NAME=VALUE to the guest script
#   --with-fio  add the host's fio with all its shared libraries (~80 MiB unpacked: a separate
#               cached layer, so runs without it stay small). Also VM_WITH_FIO=1.
#   --qemu-arg  one more argument for QEMU, e.g. to give the guest a vhost-user-blk disk served on
#               the host (guest RAM is a shared memfd, as vhost-user needs).
# The whole serial console is printed on stdout; the guest's exit code is the last line
# "GUEST-EXIT-CODE: N". Exit 125 when the guest gave none (boot failure, timeout).
#
# Cache: ${VM_CACHE:-$HOME/.cache/virtiod-vm} holds vmlinuz (bzImage), vmlinux (its ELF, booted
# with PVH when present), base.cpio.gz, kernel.config, kernel.pkg and base.stamp; a base whose stamp differs from BASE_STAMP below is rebuilt (bump BASE_VERSION
# when changing what goes into it). VM_KERNEL_PKG picks the kernel package (default: the newest
# linux-image-6.12.*-cloud-amd64-unsigned apt knows). Missing host packages are installed with
# scripts/lib-apt.sh (QEMU from the same suite as qemu-utils; see scripts/setup.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VM_CACHE:-$HOME/.cache/virtiod-vm}
KPKG=${VM_KERNEL_PKG:-}
BASE_VERSION=5
MODULES="vhost_iotlb vdpa vduse virtio_vdpa irqbypass vhost vhost_vdpa virtio_blk loop virtio-rng failover net_failover virtio_net tun veth llc stp bridge libcrc32c xfs"
BASE_TOOLS="/usr/sbin/vdpa /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/resize2fs /usr/sbin/blkdiscard /usr/sbin/ip /usr/bin/iperf3 /usr/bin/socat /usr/sbin/ethtool /usr/sbin/blkid /usr/bin/unshare /usr/sbin/mkfs.xfs /usr/sbin/xfs_growfs"
BASE_STAMP="base v$BASE_VERSION; kernel=${KPKG:-newest}; modules=$MODULES; tools=$BASE_TOOLS"

MEM=1024 CPUS=2 TIMEOUT=600 WITH_FIO=${VM_WITH_FIO:-0}
BINS=() FILES=() QARGS=() ENVS=()
while [ $# -gt 1 ]; do
  case "$1" in
    --bin) BINS+=("$2"); shift 2 ;;
    --file) FILES+=("$2"); shift 2 ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --with-fio) WITH_FIO=1; shift ;;
    --mem) MEM=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --qemu-arg) QARGS+=("$2"); shift 2 ;;
    *) echo "run-in-vm: unknown option $1" >&2; exit 2 ;;
  esac
done
SCRIPT=${1:?usage: run-in-vm.sh [options] GUEST_SCRIPT}
[ -f "$SCRIPT" ] || { echo "run-in-vm: no guest script $SCRIPT" >&2; exit 2; }

need() { command -v "$1" >/dev/null 2>&1; }
if ! need qemu-system-x86_64 || ! need cpio || ! [ -x /bin/busybox ] || ! [ -x /usr/sbin/vdpa ] \
   || ! need xz || ! [ -x /usr/sbin/mke2fs ] || ! [ -x /usr/sbin/blkdiscard ] \
   || ! [ -x /usr/bin/iperf3 ] || ! [ -x /usr/bin/socat ] || ! [ -x /usr/sbin/ethtool ] \
   || ! [ -x /usr/sbin/mkfs.xfs ] || ! [ -x /usr/sbin/blkid ] || ! [ -x /usr/bin/unshare ]; then
  [ "$(id -u)" = 0 ] || { echo "run-in-vm: host tools missing; run scripts/setup.sh as root" >&2; exit 125; }
  # shellcheck source=../../scripts/lib-apt.sh
  . "$HERE/../../scripts/lib-apt.sh"
  install_qemu   # qemu-system-x86 from the suite qemu-utils came from (never 7.2 over 10.x)
  install_missing busybox-static cpio iproute2 xz-utils e2fsprogs util-linux iperf3 socat ethtool xfsprogs
fi
if [ "$WITH_FIO" = 1 ] && ! need fio; then
  echo "run-in-vm: --with-fio but no fio on the host (scripts/setup.sh installs it)" >&2; exit 125
fi

# copy_with_libs ROOT FILE...: copy binaries into ROOT/bin with the shared libraries ldd lists
# (kept at their host paths; the dynamic loader is one of them).
copy_with_libs() {
  local root=$1 b l; shift
  mkdir -p "$root/bin"
  for b in "$@"; do
    cp -L "$b" "$root/bin/"
    # static binaries and scripts have no shared libraries to copy
    { ldd "$b" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r l; do
      [ -e "$root$l" ] || { mkdir -p "$root$(dirname "$l")"; cp -L "$l" "$root$l"; }
    done
  done
}

# extract_vmlinux BZIMAGE OUT: the ELF kernel inside a bzImage (zstd, xz or gzip payload)
extract_vmlinux() {
  local magic off dec
  for magic in '\x28\xb5\x2f\xfd:zstd' '\xfd\x37\x7a\x58\x5a\x00:xz' '\x1f\x8b\x08:gzip'; do
    dec=${magic##*:}; need "$dec" || continue
    for off in $(LC_ALL=C grep -obUaP "${magic%:*}" "$1" | cut -d: -f1 | head -5); do
      # the payload is followed by other data: the decoder complains at its end; check the output
      tail -c +$((off + 1)) "$1" | "$dec" -dc 2>/dev/null > "$2" || true
      if [ "$(head -c 4 "$2" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && [ "$(stat -c %s "$2")" -gt 1000000 ]; then
        return 0
      fi
    done
  done
  rm -f "$2"; return 1
}

# --- base image: kernel + modules + busybox + tools, built once and cached ---
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"; flock 9   # parallel runs (e.g. cargo test) must not race on the cache
if [ "$(cat "$CACHE/base.stamp" 2>/dev/null)" != "$BASE_STAMP" ] || [ ! -f "$CACHE/base.cpio.gz" ] \
   || [ ! -f "$CACHE/vmlinuz" ]; then
  echo "run-in-vm: building the base image in $CACHE" >&2
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  newest_kernel() { apt-cache pkgnames linux-image-6.12 \
    | grep -E '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-cloud-amd64-unsigned$' | sort -V | tail -1; }
  [ -n "$KPKG" ] || KPKG=$(newest_kernel)
  [ -n "$KPKG" ] || { apt-get update -qq >/dev/null; KPKG=$(newest_kernel); }
  [ -n "$KPKG" ] || { echo "run-in-vm: no linux-image-6.12.*-cloud-amd64-unsigned package found" >&2; exit 125; }
  chmod 755 "$work"   # let apt's _apt user write the download
  (cd "$work" && apt-get download -qq "$KPKG" >/dev/null 2>&1) || {
    apt-get update -qq >/dev/null; (cd "$work" && apt-get download -qq "$KPKG" >/dev/null); }
  dpkg-deb -x "$work"/*.deb "$work/k"
  root="$work/root"; mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,lib/modules}
  # real tools first: busybox links only fill the names still free
  copy_with_libs "$root" $BASE_TOOLS
  ln -s mke2fs "$root/bin/mkfs.ext4"; ln -s mke2fs "$root/bin/mkfs.ext2"
  ln -s e2fsck "$root/bin/fsck.ext4"
  [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
  cp /bin/busybox "$root/bin/"
  for a in $("$root/bin/busybox" --list); do [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"; done
  for m in $MODULES; do
    f=$(find "$work/k/lib/modules" -name "$m.ko*" | head -1)
    [ -n "$f" ] || { echo "run-in-vm: module $m not in $KPKG" >&2; exit 125; }
    case "$f" in *.xz) xz -dc "$f" ;; *.zst) zstd -dc "$f" ;; *) cat "$f" ;; esac > "$root/lib/modules/$m.ko"
  done
  cat > "$root/init" <<INIT
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
for m in $MODULES; do
  insmod /lib/modules/\$m.ko || echo "run-in-vm: insmod \$m failed"
done
echo "run-in-vm: guest up after \$(cut -d' ' -f1 /proc/uptime)s"
[ -f /guest.env ] && { set -a; . /guest.env; set +a; }
cd /tmp; sh /guest.sh; rc=\$?
echo "GUEST-EXIT-CODE: \$rc"
sync; poweroff -f
INIT
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$CACHE/base.cpio.gz.tmp"
  cp "$work"/k/boot/vmlinuz-* "$CACHE/vmlinuz.tmp"
  cp "$work"/k/boot/config-* "$CACHE/kernel.config"
  # PVH boot of the uncompressed ELF skips the bzImage decompressor: ~1 s less per run under TCG
  rm -f "$CACHE/vmlinux"
  if grep -qx 'CONFIG_PVH=y' "$CACHE/kernel.config" && extract_vmlinux "$CACHE/vmlinuz.tmp" "$CACHE/vmlinux.tmp"; then
    mv "$CACHE/vmlinux.tmp" "$CACHE/vmlinux"
  fi
  mv "$CACHE/base.cpio.gz.tmp" "$CACHE/base.cpio.gz"; mv "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
  echo "$KPKG" > "$CACHE/kernel.pkg"
  rm -f "$CACHE"/fio.cpio.*   # layers are rebuilt against the new base
  echo "$BASE_STAMP" > "$CACHE/base.stamp"
  rm -rf "$work"   # the EXIT trap below replaces the one that would have removed it
fi

# --- optional fio layer (large: its libraries pull in ceph, glusterfs, icu), cached apart ---
run=$(mktemp -d); trap 'rm -rf "$run"' EXIT
layers=("$CACHE/base.cpio.gz")
if [ "$WITH_FIO" = 1 ]; then
  fio_stamp="fio $(fio --version) $(stat -c %Y "$(command -v fio)")"
  if [ "$(cat "$CACHE/fio.stamp" 2>/dev/null)" != "$fio_stamp" ] || [ ! -f "$CACHE/fio.cpio.z" ]; then
    echo "run-in-vm: building the fio layer in $CACHE" >&2
    copy_with_libs "$run/fio" "$(command -v fio)"
    if need zstd; then z=(zstd -q -3 -T0); else z=(gzip -1); fi
    (cd "$run/fio" && find . | cpio -o -H newc 2>/dev/null | "${z[@]}") > "$CACHE/fio.cpio.z.tmp"
    mv "$CACHE/fio.cpio.z.tmp" "$CACHE/fio.cpio.z"; rm -rf "$run/fio"
    echo "$fio_stamp" > "$CACHE/fio.stamp"
  fi
  layers+=("$CACHE/fio.cpio.z")
fi
# take this run's copy of kernel and layers under the lock: a concurrent rebuild swaps them
cat "${layers[@]}" > "$run/initrd"
kernel=vmlinuz; [ -f "$CACHE/vmlinux" ] && kernel=vmlinux
ln "$CACHE/$kernel" "$run/kernel" 2>/dev/null || cp "$CACHE/$kernel" "$run/kernel"
flock -u 9

# --- per-run overlay: the script, env, binaries and files (one more cpio archive) ---
mkdir -p "$run/root/bin"
cp "$SCRIPT" "$run/root/guest.sh"
for e in "${ENVS[@]}"; do
  case "$e" in [A-Za-z_]*=*) ;; *) echo "run-in-vm: bad --env $e" >&2; exit 2 ;; esac
  v=${e#*=}; printf "%s='%s'\n" "${e%%=*}" "${v//\'/\'\\\'\'}" >> "$run/root/guest.env"
done
[ ${#BINS[@]} -eq 0 ] || copy_with_libs "$run/root" "${BINS[@]}"
for f in "${FILES[@]}"; do
  src=${f%%:*} dst=${f#*:}; mkdir -p "$run/root$(dirname "$dst")"; cp -a "$src" "$run/root$dst"
done
(cd "$run/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >> "$run/initrd"

log="$run/console.log"
set +e
# --foreground keeps QEMU in our process group: stopping the group stops QEMU too
timeout --foreground "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m "$MEM" -smp "$CPUS" -nographic -no-reboot \
  -object memory-backend-memfd,id=mem,size="${MEM}M",share=on -machine memory-backend=mem \
  -kernel "$run/kernel" -initrd "$run/initrd" \
  -nic none -append "console=ttyS0 quiet panic=-1" "${QARGS[@]}" </dev/null >"$log" 2>&1
qrc=$?
set -e
tr -d '\r' < "$log" | sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | grep -v '^$' || true
rc=$(tr -d '\r' < "$log" | sed -n 's/.*GUEST-EXIT-CODE: \([0-9]*\).*/\1/p' | tail -1)
if [ -z "$rc" ]; then
  echo "run-in-vm: no exit code from the guest (qemu exit $qrc; 124 means the $TIMEOUT s timeout)" >&2
  exit 125
fi
exit "$rc"
