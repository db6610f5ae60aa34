#!/bin/sh
# Guest half of the VDUSE net check (busybox ash + iproute2's ip, inside run-in-vm.sh's 6.12
# kernel with vduse, virtio_vdpa and virtio_net loaded): `virtiod run` serves two VDUSE net
# devices on one in-process switch; each interface goes into its own netns (192.0.2.1/24,
# 192.0.2.2/24), they ping each other both ways, and SIGTERM removes both interfaces.
# Prints "ok: ..." per check, or "GUEST-FAIL: ..." and exits 1.
set -u
fail() { echo "GUEST-FAIL: $*"; for f in /tmp/*.log /tmp/*.out; do [ -e "$f" ] && { echo "--- $f"; tail -30 "$f"; }; done; exit 1; }
ok() { echo "ok: $* (t=$(cut -d' ' -f1 /proc/uptime)s)"; }
# iproute2's ip (busybox's has no netns; its shell would pick the applet for a bare "ip").
ip() { /bin/ip "$@"; }
/bin/ip -V >/dev/null 2>&1 || fail "no iproute2 ip in /bin"

# --- 1. virtiod serve: one device, its interface name on stdout, gone after SIGTERM ---
: >/tmp/serve.out
virtiod serve --vduse vnet0 --state-dir /tmp/state --mac 52:54:00:12:34:56 net:switch=sw0 >/tmp/serve.out 2>/tmp/serve.log &
pid=$!
i=0
while [ ! -s /tmp/serve.out ]; do
  kill -0 $pid 2>/dev/null || fail "virtiod serve exited early"
  i=$((i+1)); [ $i -le 300 ] || fail "virtiod serve printed no interface"
  sleep 0.1
done
if0=$(head -1 /tmp/serve.out)
[ -d "/sys/class/net/$if0" ] || fail "virtiod serve printed $if0: no such interface"
[ "$(cat /sys/class/net/$if0/address)" = 52:54:00:12:34:56 ] || fail "$if0 MAC: $(cat /sys/class/net/$if0/address)"
kill -TERM $pid; wait $pid; rc=$?
[ $rc -eq 0 ] || fail "virtiod serve exited $rc on SIGTERM"
[ ! -e "/sys/class/net/$if0" ] || fail "$if0 left behind"
[ ! -e /dev/vduse/vnet0 ] || fail "/dev/vduse/vnet0 left behind"
ok "virtiod serve --vduse vnet0 net:switch=sw0 printed $if0 (MAC 52:54:00:12:34:56); SIGTERM removed it"

# --- 2. virtiod run: two devices on one switch, one netns each, ping both ways ---
cat >/tmp/devices.toml <<'TOML'
[[device]]
name = "n1"
net = "switch:sw0"
vduse = "vnet1"
mac = "52:54:00:00:00:01"

[[device]]
name = "n2"
net = "switch:sw0"
vduse = "vnet2"
mac = "52:54:00:00:00:02"
TOML

: >/tmp/run.out
virtiod run --config /tmp/devices.toml --state-dir /tmp/state >/tmp/run.out 2>/tmp/run.log &
pid=$!
i=0
while [ "$(wc -l </tmp/run.out)" -lt 2 ]; do
  kill -0 $pid 2>/dev/null || fail "virtiod run exited early"
  i=$((i+1)); [ $i -le 600 ] || fail "virtiod run printed no interfaces"
  sleep 0.1
done
if1=$(awk '$1 == "n1" { print $2 }' /tmp/run.out)
if2=$(awk '$1 == "n2" { print $2 }' /tmp/run.out)
[ -n "$if1" ] && [ -n "$if2" ] || fail "no interface names in: $(cat /tmp/run.out)"
[ -d "/sys/class/net/$if1" ] && [ -d "/sys/class/net/$if2" ] || fail "no interfaces $if1 / $if2"
[ "$(cat /sys/class/net/$if1/address)" = 52:54:00:00:00:01 ] || fail "$if1 MAC: $(cat /sys/class/net/$if1/address)"
[ "$(cat /sys/class/net/$if2/address)" = 52:54:00:00:00:02 ] || fail "$if2 MAC: $(cat /sys/class/net/$if2/address)"
ok "virtiod run made $if1 and $if2 with their MAC addresses"

ip netns add a || fail "ip netns add a"
ip netns add b || fail "ip netns add b"
ip link set "$if1" netns a || fail "moving $if1 to netns a"
ip link set "$if2" netns b || fail "moving $if2 to netns b"
ip -n a addr add 192.0.2.1/24 dev "$if1" || fail "address of $if1"
ip -n b addr add 192.0.2.2/24 dev "$if2" || fail "address of $if2"
for ns in a b; do ip -n $ns link set lo up; done
ip -n a link set "$if1" up || fail "$if1 up"
ip -n b link set "$if2" up || fail "$if2 up"
ok "$if1 in netns a (192.0.2.1/24), $if2 in netns b (192.0.2.2/24)"

ip netns exec a ping -c 3 -W 5 192.0.2.2 >/tmp/ping-ab.log 2>&1 || fail "ping a -> b"
ok "netns a pings 192.0.2.2: $(grep -a 'packets' /tmp/ping-ab.log)"
ip netns exec b ping -c 3 -W 5 192.0.2.1 >/tmp/ping-ba.log 2>&1 || fail "ping b -> a"
ok "netns b pings 192.0.2.1: $(grep -a 'packets' /tmp/ping-ba.log)"

kill -TERM $pid; wait $pid; rc=$?
[ $rc -eq 0 ] || fail "virtiod run exited $rc on SIGTERM"
ip -n a link show "$if1" >/dev/null 2>&1 && fail "$if1 left behind in netns a"
ip -n b link show "$if2" >/dev/null 2>&1 && fail "$if2 left behind in netns b"
for n in vnet1 vnet2; do
  [ ! -e "/dev/vduse/$n" ] || fail "/dev/vduse/$n left behind"
  vdpa dev show "$n" >/dev/null 2>&1 && fail "vdpa device $n left behind"
done
ok "SIGTERM: exit 0, both interfaces and VDUSE devices gone"
ip netns del a; ip netns del b
exit 0
