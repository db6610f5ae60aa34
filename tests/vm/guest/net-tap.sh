#!/bin/sh
# Guest half of tests/vm/qemu-vhost-user-net.sh (busybox ash; runs inside run-in-vm.sh).
# The guest's only NIC is a virtio-net-pci served by virtiod over vhost-user on a tap whose
# host side is HOST_IP; the guest takes GUEST_IP/24, pings the host, downloads
# http://HOST_IP:PORT/blob and uploads FILE_MB MiB of random bytes to the host's
# /cgi-bin/up (random bytes without NULs), which answers with the sha256 of what it received.
# Prints for the host: "FEATURES: <bits>" (the negotiated virtio features, bit 0 first),
# "DOWN-SHA256: <hex>", "UP-SHA256: <hex>". Any failure: "GUEST-FAIL: ..." and exit 1.
HOST_IP=${HOST_IP:-198.51.100.1} GUEST_IP=${GUEST_IP:-198.51.100.2} PORT=${PORT:-8080}
FILE_MB=${FILE_MB:-4}

fail() { echo "GUEST-FAIL: $*"; exit 1; }
now() { cut -d' ' -f1 /proc/uptime; }
step() { echo "guest: $* (t=$(now)s)"; }

i=0; dev=
while [ -z "$dev" ]; do
  for d in /sys/class/net/*; do
    [ -e "$d/device" ] && dev=${d##*/}
  done
  i=$((i+1)); [ $i -le 100 ] || fail "no network interface appeared"; [ -n "$dev" ] || sleep 0.1
done
vdev=$(basename "$(readlink -f /sys/class/net/$dev/device)")
echo "FEATURES: $(cat /sys/bus/virtio/devices/$vdev/features)"
ip addr add "$GUEST_IP/24" dev "$dev" || fail "ip addr add"
ip link set "$dev" up || fail "ip link set up"
step "$dev ($vdev) up with $GUEST_IP, mtu $(cat /sys/class/net/$dev/mtu)"

i=0; until ping -c 1 -W 1 "$HOST_IP" >/dev/null 2>&1; do
  i=$((i+1)); [ $i -le 30 ] || fail "no answer from $HOST_IP to ping"; done
ping -c 3 -W 2 "$HOST_IP" || fail "ping $HOST_IP"
step "ping $HOST_IP answered"

wget -q -O /tmp/down "http://$HOST_IP:$PORT/blob" || fail "download"
echo "DOWN-SHA256: $(sha256sum </tmp/down | cut -d' ' -f1)"
step "downloaded $(wc -c </tmp/down) bytes"

# busybox wget --post-file sends the file as a C string: random bytes without NULs
dd if=/dev/urandom bs=1M count="$FILE_MB" 2>/dev/null | tr -d '\000' >/tmp/up || fail "make upload"
up=$(sha256sum </tmp/up | cut -d' ' -f1)
echo "UP-SHA256: $up"
wget -q -O /tmp/answer --post-file /tmp/up "http://$HOST_IP:$PORT/cgi-bin/up" || fail "upload"
got=$(tr -d ' \n' </tmp/answer)
[ "$got" = "$up" ] || fail "the host received sha256 $got, sent $up"
step "uploaded $(wc -c </tmp/up) bytes, the host has the same sha256"
