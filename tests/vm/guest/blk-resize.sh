#!/bin/sh
# Guest half of tests/vm/qemu-vhost-user-resize.sh (busybox ash; runs inside run-in-vm.sh).
# A mounted ext4 on DEV (the first 32 MiB of a 64 MiB disk) grows with the disk: the guest
# writes a marker at 60 MiB for the host (which then runs `virtiod ctl resize`), waits for
# the new capacity (the config-change interrupt), grows the filesystem with resize2fs while it
# is mounted, writes a file past the old end and checks it. Prints "FILE-MD5: <md5> path=..."
# for the host. Any failure: "GUEST-FAIL: ..." and exit 1.
DEV=${DEV:-/dev/vda} NEW_MB=${NEW_MB:-128}
fail() { echo "GUEST-FAIL: $*"; exit 1; }
step() { echo "guest: $* (t=$(cut -d' ' -f1 /proc/uptime)s)"; }
md5() { md5sum | cut -d' ' -f1; }
sectors() { cat "/sys/block/${DEV#/dev/}/size"; }

i=0; while [ ! -b "$DEV" ]; do
  i=$((i+1)); [ $i -le 100 ] || fail "$DEV did not appear"; sleep 0.1; done
before=$(sectors)
[ "$before" -eq $((64 * 2048)) ] || fail "$DEV has $before sectors, expected 64 MiB"
mkfs.ext4 -q -F -b 4096 "$DEV" 32M || fail "mkfs.ext4"
mkdir -p /mnt/r && mount -t ext4 "$DEV" /mnt/r || fail "mount"
dd if=/dev/urandom of=/mnt/r/before.bin bs=1M count=2 2>/dev/null; sync
kb_before=$(df -k /mnt/r | awk 'NR==2 {print $2}')
step "ext4 of ${kb_before} KiB mounted on a $before-sector $DEV; asking the host to resize"
printf 'RESIZE-READY' | dd of="$DEV" bs=4096 seek=$((60 * 256)) conv=sync,fsync,notrunc oflag=direct 2>/dev/null \
  || fail "writing the marker"
i=0; while [ "$(sectors)" -eq "$before" ]; do
  i=$((i+1)); [ $i -le 1200 ] || fail "the capacity did not change within 120 s"; sleep 0.1; done
after=$(sectors)
[ "$after" -eq $((NEW_MB * 2048)) ] || fail "$DEV now has $after sectors, expected $NEW_MB MiB"
step "$DEV grew to $after sectors without a detach"
resize2fs "$DEV" >/tmp/resize2fs.log 2>&1 || { cat /tmp/resize2fs.log; fail "resize2fs on the mounted ext4"; }
kb_after=$(df -k /mnt/r | awk 'NR==2 {print $2}')
[ "$kb_after" -gt $((kb_before * 3)) ] || fail "df: $kb_after KiB after resize2fs, was $kb_before"
step "resize2fs online: ext4 $kb_before -> $kb_after KiB"
dd if=/dev/urandom of=/mnt/r/after.bin bs=1M count=40 2>/dev/null || fail "writing 40 MiB into the grown ext4"
want=$(md5 </mnt/r/after.bin)
sync; umount /mnt/r || fail "umount"
e2fsck -fn "$DEV" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck after the resize"; }
mount -t ext4 "$DEV" /mnt/r || fail "remount"
[ "$(md5 </mnt/r/after.bin)" = "$want" ] || fail "after.bin differs after remount"
umount /mnt/r
step "40 MiB file in the grown ext4 verified, e2fsck clean"
echo "FILE-MD5: $want path=/after.bin"
step "all checks passed"
