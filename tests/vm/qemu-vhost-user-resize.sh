#!/usr/bin/env bash
# Online resize over vhost-user with a real guest: QEMU (TCG) boots run-in-vm.sh's guest with a
# vhost-user-blk-pci disk served by virtiod (64 MiB image file). The guest (guest/blk-resize.sh)
# mounts ext4 and writes a marker into the disk; the host sees it in the image and runs
# `virtiod ctl resize vu 128M`, which must report "driver notified" (CONFIG_CHANGE_MSG on
# QEMU's backend channel; QEMU reads the config again and interrupts the guest). The guest sees
# 128 MiB without a detach, grows the mounted ext4 with resize2fs and writes past the old end.
# The host then checks the image: 128 MiB, e2fsck clean, the guest's file intact (debugfs).
#
# usage: tests/vm/qemu-vhost-user-resize.sh   (env VIRTIOD, default target/release/virtiod;
#        VM_TIMEOUT 300 s; --keep keeps the work directory)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VIRTIOD=${VIRTIOD:-${CARGO_TARGET_DIR:-$HERE/../../target}/release/virtiod}
KEEP=0; [ "${1:-}" = --keep ] && KEEP=1
T0=$(date +%s)
log() { echo "vhost-user-resize [$(( $(date +%s) - T0 ))s]: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }
for t in resize2fs e2fsck debugfs; do command -v "$t" >/dev/null || die "$t missing (e2fsprogs)"; done

work=$(mktemp -d "${TMPDIR:-/tmp}/vur-test.XXXXXX")
sock=$work/vu.sock ctl=$work/ctl.sock img=$work/disk.img
server_pid= vm_pid=
cleanup() {
  [ -z "$vm_pid" ] || kill -TERM -- "-$vm_pid" 2>/dev/null || true
  [ -z "$server_pid" ] || kill -KILL "$server_pid" 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

truncate -s 64M "$img"
"$VIRTIOD" serve --vhost-user "$sock" --control "$ctl" "$img" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 150); do [ -S "$sock" ] && [ -S "$ctl" ] && break; sleep 0.1; done
[ -S "$ctl" ] || { cat "$work/server.log" >&2; die "virtiod did not start"; }

setsid "$HERE/run-in-vm.sh" --timeout "${VM_TIMEOUT:-300}" --bin "$(command -v resize2fs)" \
  --qemu-arg -chardev --qemu-arg "socket,id=vu0,path=$sock" \
  --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vu0,num-queues=1" \
  "$HERE/guest/blk-resize.sh" >"$work/vm.log" 2>&1 &
vm_pid=$!

# The guest's marker at 60 MiB says: ext4 is mounted, resize now.
ready=
for _ in $(seq 2400); do
  kill -0 "$vm_pid" 2>/dev/null || break
  if [ "$(dd if="$img" bs=4096 skip=$((60 * 256)) count=1 status=none | head -c 12 | tr -d "\\0")" = RESIZE-READY ]; then
    ready=1; break
  fi
  sleep 0.1
done
[ -n "$ready" ] || { cat "$work/vm.log" >&2; die "the guest never asked for the resize"; }
log "guest ready; resizing to 128 MiB"
out=$("$VIRTIOD" ctl --control "$ctl" resize vu 128M 2>&1) || die "ctl resize: $out"
log "ctl resize: $out"
case "$out" in *"driver notified"*) ;; *) die "QEMU was not notified: $out" ;; esac

set +e; wait "$vm_pid"; vm_rc=$?; set -e; vm_pid=
grep -E '^(guest:|GUEST-)|run-in-vm:' "$work/vm.log" | sed 's/^/  | /' >&2 || true
[ "$vm_rc" = 0 ] || { cat "$work/vm.log" >&2; cat "$work/server.log" >&2; die "guest exit code $vm_rc"; }
kill -TERM "$server_pid"; wait "$server_pid" || die "virtiod exited $? on SIGTERM"; server_pid=

size=$(stat -c %s "$img")
[ "$size" = $((128 << 20)) ] || die "image is $size bytes, expected 128 MiB"
e2fsck -fn "$img" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log" >&2; die "host e2fsck -fn on the image"; }
read -r fwant fpath < <(tr -d '\r' <"$work/vm.log" | sed -n 's/.*FILE-MD5: \([0-9a-f]\{32\}\) path=\([^ ]*\).*/\1 \2/p' | tail -1)
fgot=$(debugfs -R "cat $fpath" "$img" 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$fgot" = "$fwant" ] || die "$fpath in the image: md5 $fgot, the guest wrote $fwant"
log "PASS: image 128 MiB, e2fsck clean, $fpath intact"
