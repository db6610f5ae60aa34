# Guest script for the VDUSE UAPI smoke test (busybox ash).
# host: VM_CACHE=/root/.cache/virtiod-vm bash tests/vm/run-in-vm.sh \
#         --bin target-vduse/debug/examples/vduse_smoke uapi/vduse/tests/vm/smoke-guest.sh
set -e
# Run twice by vduse_smoke --reopen: the second run (after the daemon closed and re-opened
# /dev/vduse/NAME) first checks that the data of the first run is still there.
cat > /tmp/io.sh <<'IO'
set -e
if [ -f /tmp/pattern ]; then
  dd if=$VDUSE_DEV of=/tmp/old bs=4096 count=256 iflag=direct 2>/dev/null
  [ "$(md5sum < /tmp/pattern)" = "$(md5sum < /tmp/old)" ] && echo "io: data survived the re-open"
fi
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null
dd if=/tmp/pattern of=$VDUSE_DEV bs=4096 count=256 oflag=direct 2>/dev/null
dd if=$VDUSE_DEV of=/tmp/back bs=4096 count=256 iflag=direct 2>/dev/null
a=$(md5sum < /tmp/pattern); b=$(md5sum < /tmp/back)
echo "io: wrote $a"; echo "io: read  $b"
[ "$a" = "$b" ]
IO
vduse_smoke --name vsmoke0 --mib 1 --reopen -- sh /tmp/io.sh
[ ! -e /dev/vduse/vsmoke0 ]
echo "vduse-smoke: virtio-vdpa data round-trip + re-open OK, device destroyed"
vduse_smoke --name vsmoke1 --mib 1 --vhost
[ ! -e /dev/vduse/vsmoke1 ]
echo "vduse-smoke: vhost-vdpa bind OK, device destroyed"
