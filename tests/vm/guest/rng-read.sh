# Guest side of tests/vm/qemu-vhost-user-rng.sh: find the vhost-user-rng-pci device, check the
# kernel's hw_random core uses it, and read 4 KiB from /dev/hwrng twice.
# Exit 0: read; 1: failure; 77: this guest kernel image has no virtio_rng driver loaded.
fail() { echo "guest: FAIL: $*"; exit 1; }

pci=
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1af4:0x1044" ] && pci=${d##*/}
done
[ -n "$pci" ] || fail "no virtio-rng PCI device (1af4:1044)"
echo "guest: virtio-rng PCI device at $pci"

current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
case "$current" in
  virtio_rng*) ;;
  *) echo "guest: no virtio_rng driver: rng_current=$current, rng_available=$(cat /sys/class/misc/hw_random/rng_available 2>/dev/null)"
     exit 77 ;;
esac
echo "guest: rng_current=$current"

head -c 4096 /dev/hwrng > /tmp/a || fail "reading /dev/hwrng"
head -c 4096 /dev/hwrng > /tmp/b || fail "reading /dev/hwrng again"
[ "$(wc -c < /tmp/a)" -eq 4096 ] || fail "read $(wc -c < /tmp/a) bytes, not 4096"
[ "$(wc -c < /tmp/b)" -eq 4096 ] || fail "second read: $(wc -c < /tmp/b) bytes, not 4096"
[ "$(tr -d '\000' < /tmp/a | wc -c)" -gt 0 ] || fail "4096 zero bytes"
cmp -s /tmp/a /tmp/b && fail "two reads gave the same bytes"
echo "guest: read 2 x 4096 bytes from /dev/hwrng: md5 $(md5sum < /tmp/a | cut -d' ' -f1) $(md5sum < /tmp/b | cut -d' ' -f1)"
