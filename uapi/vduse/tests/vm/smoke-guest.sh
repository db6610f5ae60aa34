# Guest script for the VDUSE UAPI smoke test (busybox ash).
# host: VM_CACHE=/root/.cache/virtiod-vm bash tests/vm/run-in-vm.sh \
#         --bin target-vduse/debug/examples/vduse_smoke uapi/vduse/tests/vm/smoke-guest.sh
set -e
cat > /tmp/io.sh <<'IO'
set -e
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null
dd if=/tmp/pattern of=$VDUSE_DEV bs=4096 count=256 oflag=direct 2>/dev/null
dd if=$VDUSE_DEV of=/tmp/back bs=4096 count=256 iflag=direct 2>/dev/null
a=$(md5sum < /tmp/pattern); b=$(md5sum < /tmp/back)
echo "pattern $a"; echo "back    $b"
[ "$a" = "$b" ]
IO
vduse_smoke --name vsmoke0 --mib 1 -- sh /tmp/io.sh
echo "after: $(ls /dev/vduse)"
[ ! -e /dev/vduse/vsmoke0 ] && echo "vduse-smoke: data round-trip OK, device destroyed"
