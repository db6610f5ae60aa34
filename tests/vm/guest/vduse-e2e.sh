#!/bin/sh
# Guest half of tests/vm/suite-vduse.sh (busybox ash, inside run-in-vm.sh's 6.12 kernel with
# the vduse/vdpa modules loaded). Every check prints "ok: ..." or "GUEST-FAIL: ..." and exits.
set -u
fail() { echo "GUEST-FAIL: $*"; for f in /tmp/*.log; do [ -e "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done; exit 1; }
ok() { echo "ok: $* (t=$(cut -d' ' -f1 /proc/uptime)s)"; }
md5() { md5sum | cut -d' ' -f1; }
# skip REASON: a check that cannot run here; a failure when VIRTIOD_NO_SKIP=1 (CI). The host
# (suite-vduse.sh) counts the "SKIPPED:" lines into VIRTIOD_SKIP_LOG.
skip() { [ "${VIRTIOD_NO_SKIP:-0}" = 1 ] && fail "VIRTIOD_NO_SKIP=1 but this check would skip: $*"; echo "SKIPPED: $*"; }

# serve NAME LOG ARGS...: start virtiod, wait for the node it prints, put it in $node/$pid.
serve() {
  name=$1 log=$2; shift 2
  rm -f "/tmp/$name.out"; : >"/tmp/$name.out"
  virtiod serve --vduse "$name" "$@" >"/tmp/$name.out" 2>"$log" &
  pid=$!
  i=0
  while [ ! -s "/tmp/$name.out" ]; do
    kill -0 $pid 2>/dev/null || fail "virtiod $name exited early: $(tail -3 "$log")"
    i=$((i+1)); [ $i -le 300 ] || fail "virtiod $name printed no device node"
    sleep 0.1
  done
  node=$(head -1 "/tmp/$name.out")
}

# stop PID NAME NODE: SIGTERM, exit 0, and nothing left behind.
stop() {
  kill -TERM "$1"; wait "$1"; rc=$?
  [ $rc -eq 0 ] || fail "virtiod $2 exited $rc on SIGTERM"
  [ ! -e "/dev/vduse/$2" ] || fail "/dev/vduse/$2 left behind"
  [ -z "$3" ] || [ ! -e "$3" ] || fail "$3 left behind"
  vdpa dev show "$2" >/dev/null 2>&1 && fail "vdpa device $2 left behind"
  return 0
}

dd if=/dev/zero of=/tmp/disk.img bs=1M count=64 2>/dev/null

# --- 1. 16 MiB O_DIRECT round trip on /dev/vda, data in the image after SIGTERM ---
serve vd0 /tmp/vd0.log --serial e2e-serial-0 /tmp/disk.img
[ "$node" = /dev/vda ] || fail "expected /dev/vda, virtiod printed $node"
[ -b /dev/vda ] || fail "/dev/vda is not a block device"
[ "$(cat /sys/block/vda/serial 2>/dev/null)" = e2e-serial-0 ] || fail "serial: $(cat /sys/block/vda/serial)"
dd if=/dev/urandom of=/tmp/pat bs=1M count=16 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=1M count=16 oflag=direct 2>/dev/null || fail "O_DIRECT write"
dd if=/dev/vda of=/tmp/back bs=1M count=16 iflag=direct 2>/dev/null || fail "O_DIRECT read"
[ "$(md5 </tmp/pat)" = "$(md5 </tmp/back)" ] || fail "read-back differs"
ok "16 MiB O_DIRECT written and read back through $node"
stop $pid vd0 /dev/vda
dd if=/tmp/disk.img of=/tmp/img16 bs=1M count=16 2>/dev/null
[ "$(md5 </tmp/pat)" = "$(md5 </tmp/img16)" ] || fail "image file does not hold the data after SIGTERM"
ok "image holds the data after SIGTERM; /dev/vduse/vd0 and /dev/vda gone"

# --- 2. a filesystem: mkfs, mount, write, sync, umount, remount, verify ---
serve vd0 /tmp/vd0b.log /tmp/disk.img
mkfs.ext4 -q -F "$node" >/tmp/mkfs.log 2>&1 || fail "mkfs.ext4: $(cat /tmp/mkfs.log)"
mkdir -p /mnt/a && mount -t ext4 "$node" /mnt/a || fail "mount"
dd if=/dev/urandom of=/mnt/a/f1 bs=1M count=4 2>/dev/null; cp /tmp/pat /mnt/a/f2
sum1=$(md5 </mnt/a/f1); sync; umount /mnt/a || fail "umount"
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 "$node" /mnt/a || fail "remount"
[ "$(md5 </mnt/a/f1)" = "$sum1" ] && [ "$(md5 </mnt/a/f2)" = "$(md5 </tmp/pat)" ] || fail "files differ after remount"
umount /mnt/a
ok "ext4 on $node survives umount/remount"
stop $pid vd0 "$node"

# --- 2b. qcow2 with a raw backing file as /dev/vdX (images made on the host by
# suite-vduse.sh in /qimg: base.raw, 8 MiB of random bytes, under over.qcow2, 32 MiB): backing
# data read through the device, then mkfs, write, and verify across a daemon restart ---
if [ -f /qimg/over.qcow2 ]; then
  cp -r /qimg /tmp/q
  base=$(md5 </tmp/q/base.raw)
  serve vdq /tmp/q.log qcow2:/tmp/q/over.qcow2
  [ "$(dd if="$node" bs=1M count=8 iflag=direct 2>/dev/null | md5)" = "$base" ] || fail "qcow2: backing data not read through $node"
  mkfs.ext4 -q -F "$node" >/tmp/mkfsq.log 2>&1 || fail "mkfs.ext4 on qcow2: $(cat /tmp/mkfsq.log)"
  mkdir -p /mnt/q && mount -t ext4 "$node" /mnt/q || fail "mount qcow2"
  cp /tmp/pat /mnt/q/f; sync; umount /mnt/q || fail "umount qcow2"
  stop $pid vdq "$node"
  serve vdq /tmp/q2.log qcow2:/tmp/q/over.qcow2
  mount -t ext4 "$node" /mnt/q || fail "remount qcow2 after restart"
  [ "$(md5 </mnt/q/f)" = "$(md5 </tmp/pat)" ] || fail "qcow2: file differs after restart"
  umount /mnt/q
  stop $pid vdq "$node"
  [ "$(md5 </tmp/q/base.raw)" = "$base" ] || fail "qcow2: the backing file was written"
  ok "qcow2 over a raw backing file on $node: backing read, ext4 across a restart, backing untouched"
else
  skip "no qcow2 images in /qimg (tests/vm/suite-vduse.sh makes them on the host)"
fi

# --- 3. multiqueue with parallel writers, and a second device at the same time ---
dd if=/dev/zero of=/tmp/disk2.img bs=1M count=32 2>/dev/null
serve vd0 /tmp/mq.log --queues 2 /tmp/disk.img; mq_pid=$pid; mq_node=$node
serve vd1 /tmp/vd1.log /tmp/disk2.img; two_pid=$pid; two_node=$node
[ "$mq_node" != "$two_node" ] || fail "two devices got the same node"
nq=$(ls /sys/block/${mq_node#/dev/}/mq | wc -l)
[ "$nq" -eq 2 ] || fail "$mq_node has $nq queues, expected 2"
for j in 0 1 2 3; do
  dd if=/tmp/pat of="$mq_node" bs=64k count=64 seek=$((j * 64)) oflag=direct 2>/dev/null &
done
dd if=/tmp/pat of="$two_node" bs=1M count=16 oflag=direct 2>/dev/null &
wait_jobs() { for p in $(jobs -p); do [ "$p" = "$mq_pid" ] || [ "$p" = "$two_pid" ] || wait "$p" || fail "writer $p failed"; done; }
wait_jobs
for j in 0 1 2 3; do
  [ "$(dd if="$mq_node" bs=64k count=64 skip=$((j * 64)) iflag=direct 2>/dev/null | md5)" = "$(dd if=/tmp/pat bs=64k count=64 2>/dev/null | md5)" ] \
    || fail "multiqueue writer $j: data differs"
done
[ "$(dd if="$two_node" bs=1M count=16 iflag=direct 2>/dev/null | md5)" = "$(md5 </tmp/pat)" ] || fail "second device data differs"
ok "4 parallel writers on 2 queues of $mq_node and one on $two_node at once"
stop $mq_pid vd0 "$mq_node"; stop $two_pid vd1 "$two_node"

# --- 4. read-only ---
before=$(md5 </tmp/disk.img)
serve vdro /tmp/ro.log --read-only /tmp/disk.img
[ "$(cat /sys/block/${node#/dev/}/ro)" = 1 ] || fail "kernel does not see $node read-only"
dd if=/dev/zero of="$node" bs=4k count=1 oflag=direct 2>/dev/null && fail "write to a read-only device succeeded"
[ "$(md5 </tmp/disk.img)" = "$before" ] || fail "read-only image changed"
ok "read-only device refuses writes, image unchanged"
stop $pid vdro "$node"

# --- 5. --attach vhost: libblkio's vhost-vdpa driver in user space ---
serve vdh /tmp/vh.log --attach vhost /tmp/disk2.img
case "$node" in /dev/vhost-vdpa-*) ;; *) fail "--attach vhost printed $node" ;; esac
timeout 120 virtiod-blkcheck virtio-blk-vhost-vdpa "$node" 8 >/tmp/blkcheck.log 2>&1 || fail "blkcheck: $(cat /tmp/blkcheck.log)"
ok "$(cat /tmp/blkcheck.log)"
stop $pid vdh "$node"

# --- 6. bad input: a name in use, a missing image; each a clear one-line error ---
serve vd0 /tmp/busy.log /tmp/disk.img; busy_pid=$pid; busy_node=$node
virtiod serve --vduse vd0 /tmp/disk2.img >/dev/null 2>/tmp/err1 && fail "second vd0 started"
grep -q "in use" /tmp/err1 || fail "name in use: $(cat /tmp/err1)"
stop $busy_pid vd0 "$busy_node"
virtiod serve --vduse vd2 /tmp/missing.img >/dev/null 2>/tmp/err2 && fail "missing image accepted"
grep -q "create the image first" /tmp/err2 || fail "missing image: $(cat /tmp/err2)"
[ ! -e /tmp/missing.img ] && [ ! -e /dev/vduse/vd2 ] || fail "missing image left something behind"
ok "name in use and missing image refused: $(grep error /tmp/err1 | head -1)"

# --- 7. restart without losing a write: three SIGKILL + restart cycles, then two SIGTERMs of
# a `serve --on-stop keep` + start, during a 48 MiB stream of 4 KiB O_DIRECT writes; the
# writer sees only pauses, and every byte reads back.
dd if=/dev/urandom of=/tmp/pat48 bs=1M count=48 2>/dev/null
serve vdr /tmp/r0.log /tmp/disk.img; first=$node
[ -e /run/virtiod/vduse-vdr.log ] || fail "no in-flight log in /run/virtiod"
dd if=/tmp/pat48 of="$node" bs=4k oflag=direct 2>/tmp/dd.err &
writer=$!
during=0
for k in 1 2 3 4 5; do
  sleep 0.7
  kill -0 $writer 2>/dev/null && during=$((during+1))
  # the last two stops are SIGTERMs of a `serve --on-stop keep` (VIRTIOD_ON_STOP)
  sig=KILL; [ $k -lt 4 ] || sig=TERM
  kill -$sig $pid; wait $pid 2>/dev/null
  [ -e /dev/vduse/vdr ] || fail "SIG$sig removed the VDUSE device"
  [ $sig = KILL ] || grep -q "the VDUSE device is kept for the next start" /tmp/r$((k-1)).log || fail "SIGTERM $k: not kept: $(tail -3 /tmp/r$((k-1)).log)"
  if [ $k -eq 3 ] || [ $k -eq 4 ]; then export VIRTIOD_ON_STOP=keep; else unset VIRTIOD_ON_STOP; fi
  serve vdr /tmp/r$k.log /tmp/disk.img
  [ "$node" = "$first" ] || fail "restart $k printed $node, expected $first"
  grep -q "re-opening the existing VDUSE device" /tmp/r$k.log || fail "restart $k did not re-open: $(tail -3 /tmp/r$k.log)"
done
wait $writer || fail "the writer saw an error across restarts: $(cat /tmp/dd.err)"
[ "$during" -ge 3 ] || fail "only $during of 5 kills hit the running writer: make the stream longer"
[ "$(dd if="$node" bs=1M count=48 iflag=direct 2>/dev/null | md5)" = "$(md5 </tmp/pat48)" ] || fail "data differs after restarts"
grep -h "resuming queue" /tmp/r[1-5].log | sed 's/.*resuming/resuming/' | head -5
stop $pid vdr "$node"
[ ! -e /run/virtiod/vduse-vdr.log ] || fail "in-flight log left behind after SIGTERM"
[ "$(dd if=/tmp/disk.img bs=1M count=48 2>/dev/null | md5)" = "$(md5 </tmp/pat48)" ] || fail "image differs after restarts"
unset VIRTIOD_ON_STOP
ok "3 SIGKILL+restart and 2 SIGTERM (--on-stop keep)+start cycles ($during during the writer): no I/O error, 48 MiB identical"

# --- QoS through VDUSE: a 100 IOPS limit holds 300 O_DIRECT reads to >= 2.5 s (the queue
# thread waits on its timer, nothing fails); lifted live with ctl qos, the limit is gone ---
dd if=/dev/zero of=/tmp/qos.img bs=1M count=16 2>/dev/null
serve vdq /tmp/vdq.log --control /tmp/vdq.ctl --iops 100 --iops-burst 1 /tmp/qos.img; q_pid=$pid; q_node=$node
up() { cut -d' ' -f1 /proc/uptime | tr -d .; }   # centiseconds
t0=$(up)
dd if="$q_node" of=/dev/null bs=4k count=300 iflag=direct 2>/dev/null || fail "reads under the QoS limit failed"
cs=$(( $(up) - t0 ))
[ "$cs" -ge 250 ] || fail "300 reads at 100 IOPS took ${cs}0 ms: the limit did not hold"
virtiod ctl --control /tmp/vdq.ctl qos vdq --clear >/tmp/q.out 2>&1 || fail "ctl qos --clear: $(cat /tmp/q.out)"
virtiod ctl --control /tmp/vdq.ctl stats vdq >/tmp/q.stats 2>&1
grep -q "throttled=[1-9]" /tmp/q.stats || fail "no throttled requests counted: $(cat /tmp/q.stats)"
t0=$(up)
dd if="$q_node" of=/dev/null bs=4k count=300 skip=300 iflag=direct 2>/dev/null || fail "reads after lifting the limit"
cs2=$(( $(up) - t0 ))
stop $q_pid vdq "$q_node"
ok "QoS over VDUSE: 300 reads took ${cs}0 ms at --iops 100, ${cs2}0 ms once lifted live; $(grep -o 'throttled=[^ ]*' /tmp/q.stats)"

# --- resize: a mounted ext4 grows with `virtiod ctl resize` + resize2fs while a writer runs
# (VDUSE_DEV_SET_CONFIG + VDUSE_DEV_INJECT_CONFIG_IRQ: the kernel re-reads the capacity) ---
if ! command -v resize2fs >/dev/null; then
  skip "no resize2fs in the guest (suite-vduse.sh passes it with --bin): the online resize check"
else
  dd if=/dev/zero of=/tmp/rsz.img bs=1M count=64 2>/dev/null
  serve vdz /tmp/vdz.log --control /tmp/vdz.ctl /tmp/rsz.img; rz_pid=$pid; rz_node=$node
  rz_sys=/sys/block/${rz_node#/dev/}/size
  mkfs.ext4 -q -F -b 4096 "$rz_node" >/tmp/mkfs-rz.log 2>&1 || fail "mkfs.ext4: $(cat /tmp/mkfs-rz.log)"
  mkdir -p /mnt/rz && mount -t ext4 "$rz_node" /mnt/rz || fail "mount $rz_node"
  kb0=$(df -k /mnt/rz | awk 'NR==2 {print $2}')
  rm -f /tmp/rz.stop /tmp/rz.err
  # the writer: 256 KiB files, each fsynced, until told to stop (at most 96 = 24 MiB)
  ( n=0; while [ ! -e /tmp/rz.stop ] && [ $n -lt 96 ]; do
      dd if=/dev/urandom of=/mnt/rz/w$n bs=64k count=4 conv=fsync 2>/dev/null || { echo "w$n" >/tmp/rz.err; break; }
      n=$((n+1)); done; echo $n >/tmp/rz.count ) &
  w_pid=$!
  sleep 1
  virtiod ctl --control /tmp/vdz.ctl resize vdz 256M >/tmp/rz.out 2>&1 || fail "ctl resize: $(cat /tmp/rz.out)"
  grep -q "driver notified" /tmp/rz.out || fail "ctl resize did not notify the driver: $(cat /tmp/rz.out)"
  i=0; while [ "$(cat "$rz_sys")" -ne $((256 * 2048)) ]; do
    i=$((i+1)); [ $i -le 100 ] || fail "$rz_sys is $(cat "$rz_sys") 10 s after the resize"; sleep 0.1; done
  resize2fs "$rz_node" >/tmp/resize2fs.log 2>&1 || fail "resize2fs: $(cat /tmp/resize2fs.log)"
  kb1=$(df -k /mnt/rz | awk 'NR==2 {print $2}')
  [ "$kb1" -gt $((kb0 * 3)) ] || fail "df after resize2fs: $kb1 KiB, was $kb0"
  touch /tmp/rz.stop; wait $w_pid
  [ ! -e /tmp/rz.err ] || fail "the writer failed at $(cat /tmp/rz.err) during the resize"
  dd if=/dev/urandom of=/mnt/rz/big bs=1M count=96 2>/dev/null || fail "96 MiB into the grown ext4"
  sum=$(md5 </mnt/rz/big); sync; umount /mnt/rz || fail "umount"
  e2fsck -fn "$rz_node" >/tmp/fsck-rz.log 2>&1 || fail "e2fsck after resize: $(tail -5 /tmp/fsck-rz.log)"
  mount -t ext4 "$rz_node" /mnt/rz && [ "$(md5 </mnt/rz/big)" = "$sum" ] || fail "big file differs after remount"
  umount /mnt/rz
  stop $rz_pid vdz "$rz_node"
  [ "$(stat -c %s /tmp/rsz.img)" = $((256 << 20)) ] || fail "image is $(stat -c %s /tmp/rsz.img) bytes"
  ok "online resize: $rz_sys 64 -> 256 MiB with ext4 mounted and $(cat /tmp/rz.count) fsynced writes running; resize2fs ${kb0} -> ${kb1} KiB; e2fsck clean"
fi

# --- 8. virtiod doctor on a host where VDUSE works: exit 0, /dev/vduse/control OK ---
virtiod doctor >/tmp/doctor.out 2>&1; rc=$?
[ $rc -eq 0 ] || fail "virtiod doctor exited $rc: $(grep -E '^(FAIL|WARN)' /tmp/doctor.out)"
grep -q '^OK   /dev/vduse/control' /tmp/doctor.out || fail "doctor: $(cat /tmp/doctor.out)"
grep -q '^OK   vdpa management devices' /tmp/doctor.out || fail "doctor: $(cat /tmp/doctor.out)"
grep -q '^OK   VDUSE net' /tmp/doctor.out || fail "doctor on 6.12 must see VDUSE net: $(cat /tmp/doctor.out)"
virtiod doctor --json >/tmp/doctor.json || fail "virtiod doctor --json exited non-zero"
grep -q '"status": "FAIL"' /tmp/doctor.json && fail "doctor --json has a FAIL: $(cat /tmp/doctor.json)"
ok "virtiod doctor: $(grep -c '^OK' /tmp/doctor.out) checks OK, exit 0"

# --- 8b. least privilege: a VDUSE device added through the control socket by threads that
# keep only CAP_NET_ADMIN, under Landlock (images only under --allow-dir) ---
mkdir -p /tmp/allowed && dd if=/dev/zero of=/tmp/allowed/add.img bs=1M count=16 2>/dev/null
serve vdk /tmp/vdk.log --control /tmp/vdk.ctl --allow-dir /tmp/allowed /tmp/disk.img
k_pid=$pid k_node=$node
printf 'name = "vdk2"\nimage = "/tmp/allowed/add.img"\nvduse = "vdk2"\n' >/tmp/vdk2.toml
virtiod ctl --control /tmp/vdk.ctl add /tmp/vdk2.toml >/tmp/vdk2.out 2>&1 || fail "ctl add vdk2: $(cat /tmp/vdk2.out)"
k2_node=$(cat /tmp/vdk2.out)
[ -b "$k2_node" ] || fail "ctl add printed $k2_node: not a block device"
dd if=/dev/urandom of=/tmp/k.bin bs=1M count=4 2>/dev/null
dd if=/tmp/k.bin of="$k2_node" bs=1M oflag=direct 2>/dev/null || fail "O_DIRECT write to $k2_node"
[ "$(dd if="$k2_node" bs=1M count=4 iflag=direct 2>/dev/null | md5)" = "$(md5 </tmp/k.bin)" ] || fail "read back from $k2_node"
for t in /proc/$k_pid/task/*; do
  comm=$(cat "$t/comm"); eff=$(awk '/^CapEff/ {print $2}' "$t/status")
  case $comm in virtiod|control|control-worker) want=0000000000001000 ;; *) want=0000000000000000 ;; esac
  [ "$eff" = "$want" ] || fail "thread $comm of virtiod has CapEff $eff, not $want (CAP_NET_ADMIN only in the main and control threads)"
done
printf 'name = "vdk3"\nimage = "/tmp/other.img"\nvduse = "vdk3"\n' >/tmp/vdk3.toml
virtiod ctl --control /tmp/vdk.ctl add /tmp/vdk3.toml >/tmp/vdk3.out 2>&1 && fail "an image outside --allow-dir was accepted"
grep -q -- "--allow-dir" /tmp/vdk3.out || fail "ctl add outside --allow-dir: $(cat /tmp/vdk3.out)"
virtiod ctl --control /tmp/vdk.ctl remove vdk2 >/tmp/vdk2.rm 2>&1 || fail "ctl remove vdk2: $(cat /tmp/vdk2.rm)"
[ ! -e /dev/vduse/vdk2 ] || fail "/dev/vduse/vdk2 left behind after ctl remove"
[ "$(dd if=/tmp/allowed/add.img bs=1M count=4 2>/dev/null | md5)" = "$(md5 </tmp/k.bin)" ] || fail "the added device's data is not in its image"
stop $k_pid vdk "$k_node"
grep -q "landlock: enforced" /tmp/vdk.log || fail "Landlock not enforced: $(head -3 /tmp/vdk.log)"
grep -q '^OK   landlock' /tmp/doctor.out || fail "doctor has no OK landlock line: $(grep landlock /tmp/doctor.out)"
ok "least privilege: VDUSE device added and removed through the control socket with only CAP_NET_ADMIN in the main and control threads (none elsewhere), Landlock enforced, an image outside --allow-dir refused"

# --- 9. VDUSE module absent (keep this section last: it unloads the modules) ---
rmmod vhost_vdpa virtio_vdpa vduse 2>/dev/null
if [ -e /dev/vduse/control ]; then
  skip "could not unload vduse: the module-absent check"
else
  virtiod serve --vduse vd3 /tmp/disk.img >/dev/null 2>/tmp/err3 && fail "started without VDUSE"
  grep -q "modprobe vduse" /tmp/err3 || fail "no VDUSE: $(cat /tmp/err3)"
  ok "without the vduse module: $(grep error /tmp/err3)"
fi
echo "vduse-e2e: all checks passed"
