#!/bin/sh
# Guest half of tests/vm/qemu-vhost-user-blk.sh (busybox ash; runs inside run-in-vm.sh).
# Layout of the disk DEV (default /dev/vda, >= 64 MiB):
#   [0, FS_MB)                       ext4: mkfs, write a file, sync, umount, remount, verify
#   [PATTERN_OFF_MB, +PATTERN_MB)    random pattern written and read back with O_DIRECT
#   [FIO_OFF_MB, +FIO_MB)            fio randwrite with crc32c verify (only with FIO=1 and fio)
# Prints for the host: "PATTERN-MD5: <md5> offset_mib=N size_mib=N" and, when ext4 ran,
# "FILE-MD5: <md5> path=/roundtrip.bin". Any mismatch: "GUEST-FAIL: ..." and exit 1.
DEV=${DEV:-/dev/vda}
FS_MB=${FS_MB:-32}
PATTERN_OFF_MB=${PATTERN_OFF_MB:-32} PATTERN_MB=${PATTERN_MB:-16}
FIO_OFF_MB=${FIO_OFF_MB:-48} FIO_MB=${FIO_MB:-16} FIO=${FIO:-0}

fail() { echo "GUEST-FAIL: $*"; exit 1; }
now() { cut -d' ' -f1 /proc/uptime; }
step() { echo "guest: $* (t=$(now)s)"; }
md5() { md5sum | cut -d' ' -f1; }

i=0; while [ ! -b "$DEV" ]; do
  i=$((i+1)); [ $i -le 100 ] || fail "$DEV did not appear"; sleep 0.1; done
bytes=$(blockdev --getsize64 "$DEV") || fail "blockdev --getsize64 $DEV"
step "$DEV has $bytes bytes, logical block $(blockdev --getss "$DEV"), queues $(ls /sys/block/${DEV#/dev/}/mq 2>/dev/null | wc -l)"
need=$(( (FIO_OFF_MB > PATTERN_OFF_MB + PATTERN_MB ? FIO_OFF_MB : PATTERN_OFF_MB + PATTERN_MB) * 1048576 ))
[ "$bytes" -ge "$need" ] || fail "$DEV is $bytes bytes, need $need"

# --- 0. GET_ID: the serial the server was given ---
if [ -n "${EXPECT_SERIAL:-}" ]; then
  got=$(cat "/sys/block/${DEV#/dev/}/serial" 2>/dev/null)
  [ "$got" = "$EXPECT_SERIAL" ] || fail "serial is '$got', expected '$EXPECT_SERIAL'"
  step "GET_ID returned the serial $got"
fi

# --- 1. raw O_DIRECT pattern round trip ---
dd if=/dev/urandom of=/tmp/pat bs=1M count="$PATTERN_MB" 2>/dev/null || fail "make pattern"
want=$(md5 </tmp/pat)
step "writing $PATTERN_MB MiB at $PATTERN_OFF_MB MiB (O_DIRECT, 1 MiB blocks)"
dd if=/tmp/pat of="$DEV" bs=1M seek="$PATTERN_OFF_MB" oflag=direct conv=fsync,notrunc 2>/dev/null \
  || fail "O_DIRECT write"
got=$(dd if="$DEV" bs=1M skip="$PATTERN_OFF_MB" count="$PATTERN_MB" iflag=direct 2>/dev/null | md5)
[ "$got" = "$want" ] || fail "pattern read back (1 MiB O_DIRECT): $got != $want"
got=$(dd if="$DEV" bs=64k skip=$((PATTERN_OFF_MB * 16)) count=$((PATTERN_MB * 16)) iflag=direct 2>/dev/null | md5)
[ "$got" = "$want" ] || fail "pattern read back (64 KiB O_DIRECT): $got != $want"
# through the page cache too, after dropping it
blockdev --flushbufs "$DEV"; echo 3 > /proc/sys/vm/drop_caches
got=$(dd if="$DEV" bs=1M skip="$PATTERN_OFF_MB" count="$PATTERN_MB" 2>/dev/null | md5)
[ "$got" = "$want" ] || fail "pattern read back (buffered): $got != $want"
step "pattern verified"
echo "PATTERN-MD5: $want offset_mib=$PATTERN_OFF_MB size_mib=$PATTERN_MB"
rm -f /tmp/pat

# --- 2. ext4 on the first FS_MB MiB ---
if [ "$FS_MB" -gt 0 ] && command -v mkfs.ext4 >/dev/null; then
  step "mkfs.ext4 on the first $FS_MB MiB"
  mkfs.ext4 -q -F -b 4096 "$DEV" "${FS_MB}M" || fail "mkfs.ext4"
  mkdir -p /mnt/t
  mount -t ext4 "$DEV" /mnt/t || fail "mount"
  dd if=/dev/urandom of=/mnt/t/roundtrip.bin bs=1M count=4 2>/dev/null || fail "write file"
  fwant=$(md5 </mnt/t/roundtrip.bin)
  sync || fail "sync"
  umount /mnt/t || fail "umount"
  echo 3 > /proc/sys/vm/drop_caches
  e2fsck -fn "$DEV" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck after umount"; }
  mount -t ext4 "$DEV" /mnt/t || fail "remount"
  fgot=$(md5 </mnt/t/roundtrip.bin)
  [ "$fgot" = "$fwant" ] || fail "file after remount: $fgot != $fwant"
  umount /mnt/t || fail "final umount"
  step "ext4 verified"
  echo "FILE-MD5: $fwant path=/roundtrip.bin"
else
  step "ext4 skipped (FS_MB=$FS_MB, mkfs.ext4: $(command -v mkfs.ext4 || echo none))"
fi

# --- 3. fio: queued random writes of mixed sizes, verified ---
if [ "$FIO" = 1 ]; then
  command -v fio >/dev/null || fail "FIO=1 but no fio in the guest (run-in-vm.sh --with-fio)"
  step "fio randwrite+verify on $FIO_MB MiB at $FIO_OFF_MB MiB"
  fio --name=rt --filename="$DEV" --offset="${FIO_OFF_MB}M" --size="${FIO_MB}M" \
      --rw=randwrite --bsrange=4k-64k --iodepth=16 --ioengine=io_uring --direct=1 \
      --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=0 \
      --output-format=terse --terse-version=3 >/tmp/fio.log 2>&1 || { cat /tmp/fio.log; fail "fio"; }
  step "fio verified ($(cut -d';' -f6,7 /tmp/fio.log | head -1) read KiB;KiB/s)"
fi
step "all checks passed"
