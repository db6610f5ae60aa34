#!/bin/sh
# Guest half of the VDUSE net check (busybox ash + iproute2's ip, iperf3 and socat, inside
# run-in-vm.sh's 6.12 kernel with vduse, virtio_vdpa, virtio_net, vhost_vdpa and tun loaded):
#  1. `virtiod serve` makes one interface, finds it again after SIGKILL + restart; SIGTERM
#     removes it; `--attach vhost` gives /dev/vhost-vdpa-N instead.
#  2. `virtiod run` serves two VDUSE net devices on one in-process switch; each interface goes
#     into its own netns (192.0.2.1/24, 192.0.2.2/24): ping both ways, a 64 MiB TCP transfer
#     whose sha256 matches, iperf3 TCP for 5 s (its figure printed, not asserted).
#  3. SIGKILL of `virtiod run` during a 64 MiB TCP transfer and a restart of the same command:
#     the transfer completes with the same sha256, the interfaces keep their index and addresses.
#  4. SIGTERM removes both interfaces and VDUSE devices.
#  5. `net:tap=vt0`: the VDUSE interface in a netns (198.51.100.2/24) and the tap in the VM's own
#     namespace (198.51.100.1/24) ping each other and move 8 MiB over TCP.
# Prints "ok: ..." per check, or "GUEST-FAIL: ..." and exits 1.
set -u
fail() { echo "GUEST-FAIL: $*"; for f in /tmp/*.log /tmp/*.out; do [ -e "$f" ] && { echo "--- $f"; tail -30 "$f"; }; done; exit 1; }
MiB64=67108864
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
# SIGKILL + the same command again: the interface (still in this namespace) is found again
idx0=$(cat "/sys/class/net/$if0/ifindex")
kill -KILL $pid; wait $pid 2>/dev/null
[ -d "/sys/class/net/$if0" ] || fail "SIGKILL removed $if0"
: >/tmp/serve.out
virtiod serve --vduse vnet0 --state-dir /tmp/state --mac 52:54:00:12:34:56 net:switch=sw0 >/tmp/serve.out 2>/tmp/serve2.log &
pid=$!
i=0
while [ ! -s /tmp/serve.out ]; do
  kill -0 $pid 2>/dev/null || fail "virtiod serve exited early after the restart"
  i=$((i+1)); [ $i -le 300 ] || fail "virtiod serve printed no interface after the restart"
  sleep 0.1
done
[ "$(head -1 /tmp/serve.out)" = "$if0" ] || fail "after the restart virtiod serve printed $(head -1 /tmp/serve.out), not $if0"
[ "$(cat "/sys/class/net/$if0/ifindex")" = "$idx0" ] || fail "$if0 changed index after the restart"
kill -TERM $pid; wait $pid; rc=$?
[ $rc -eq 0 ] || fail "virtiod serve exited $rc on SIGTERM"
[ ! -e "/sys/class/net/$if0" ] || fail "$if0 left behind"
[ ! -e /dev/vduse/vnet0 ] || fail "/dev/vduse/vnet0 left behind"
ok "virtiod serve --vduse vnet0 net:switch=sw0 printed $if0 (MAC 52:54:00:12:34:56), again after SIGKILL + restart (index $idx0 kept); SIGTERM removed it"

# --- 1b. --attach vhost: the net device goes to vhost_vdpa, /dev/vhost-vdpa-N, no interface ---
virtiod serve --vduse vnetv --attach vhost --state-dir /tmp/state --mac 52:54:00:12:34:57 net:switch=sw0 \
  >/tmp/vhost.out 2>/tmp/vhost.log &
pid=$!
i=0
while [ ! -s /tmp/vhost.out ]; do
  kill -0 $pid 2>/dev/null || fail "virtiod serve --attach vhost exited early"
  i=$((i+1)); [ $i -le 300 ] || fail "virtiod serve --attach vhost printed nothing"
  sleep 0.1
done
node=$(head -1 /tmp/vhost.out)
case "$node" in /dev/vhost-vdpa-*) ;; *) fail "--attach vhost printed $node" ;; esac
[ -c "$node" ] || fail "$node is not a character device"
grep -qx 52:54:00:12:34:57 /sys/class/net/*/address && fail "--attach vhost made a host interface"
kill -TERM $pid; wait $pid; rc=$?
[ $rc -eq 0 ] || fail "virtiod serve --attach vhost exited $rc on SIGTERM"
[ ! -e "$node" ] || fail "$node left behind"
[ ! -e /dev/vduse/vnetv ] || fail "/dev/vduse/vnetv left behind"
ok "virtiod serve --vduse vnetv --attach vhost net:switch=sw0 printed $node; SIGTERM removed it"

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

# --- 2b. 64 MiB over TCP from netns a to netns b, checksum compared; then iperf3 for 5 s ---
head -c $MiB64 /dev/urandom >/tmp/src.bin || fail "making the 64 MiB source"
want=$(sha256sum </tmp/src.bin | cut -d' ' -f1)
# wait_listen PREFIX PORT: wait until a TCP socket listens on PORT (in the namespace PREFIX
# enters: "ip netns exec b", or "" for this one)
wait_listen() {
  i=0
  until $1 cat /proc/net/tcp | awk -v p="$(printf ':%04X' "$2")" '$2 ~ p"$" && $4 == "0A" { f = 1 } END { exit !f }'; do
    i=$((i+1)); [ $i -le 300 ] || fail "nothing listens on port $2 ${1:+($1)}"
    sleep 0.1
  done
}
# transfer NAME PORT: socat from netns a to netns b in the background; sets rx_pid, tx_pid
transfer() {
  rm -f "/tmp/$1.bin"
  ip netns exec b socat -u -b 262144 "TCP-LISTEN:$2,reuseaddr" "OPEN:/tmp/$1.bin,creat,trunc" 2>"/tmp/$1-rx.log" &
  rx_pid=$!
  wait_listen "ip netns exec b" "$2"
  ip netns exec a socat -u -b 262144 OPEN:/tmp/src.bin "TCP:192.0.2.2:$2" 2>"/tmp/$1-tx.log" &
  tx_pid=$!
}
# finish NAME SECONDS: wait for both socats of `transfer`, then compare the checksum
finish() {
  i=0
  while kill -0 $rx_pid 2>/dev/null || kill -0 $tx_pid 2>/dev/null; do
    i=$((i+1)); [ $i -le $(($2 * 10)) ] || { kill $rx_pid $tx_pid 2>/dev/null; fail "$1: transfer not done after $2 s ($(stat -c %s "/tmp/$1.bin" 2>/dev/null) bytes)"; }
    sleep 0.1
  done
  wait $tx_pid || fail "$1: sending socat failed"
  wait $rx_pid || fail "$1: receiving socat failed"
  got=$(sha256sum <"/tmp/$1.bin" | cut -d' ' -f1)
  [ "$got" = "$want" ] || fail "$1: sha256 $got, sent $want ($(stat -c %s "/tmp/$1.bin") bytes)"
  rm -f "/tmp/$1.bin"
}
t0=$(cut -d' ' -f1 /proc/uptime)
transfer tcp 5001
finish tcp 600
t1=$(cut -d' ' -f1 /proc/uptime)
ok "64 MiB over TCP a -> b, sha256 matches ($(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f s, %.0f Mbit/s", b - a, 536.870912 / (b - a) }'))"

ip netns exec b iperf3 -s -1 -p 5201 >/tmp/iperf-s.log 2>&1 &
srv=$!
i=0
until ip netns exec a iperf3 -c 192.0.2.2 -p 5201 -t 5 -f m >/tmp/iperf.log 2>&1; do
  # the server may not listen yet
  i=$((i+1)); [ $i -le 20 ] || fail "iperf3 client failed"
  sleep 0.3
done
wait $srv || fail "iperf3 server failed"
rate=$(awk '/receiver/ { print $7, $8 }' /tmp/iperf.log)
bytes=$(awk '/receiver/ { print $5, $6 }' /tmp/iperf.log)
[ -n "$rate" ] && [ "${bytes%% *}" != 0 ] || fail "iperf3 moved no data: $(cat /tmp/iperf.log)"
ok "iperf3 TCP a -> b, 5 s: $rate ($bytes received)"

# --- 3. SIGKILL + restart of `virtiod run` during a 64 MiB TCP transfer ---
idx1=$(ip -n a -o link show "$if1" | cut -d: -f1)
idx2=$(ip -n b -o link show "$if2" | cut -d: -f1)
transfer kill 5002
i=0
while [ "$(stat -c %s /tmp/kill.bin 2>/dev/null || echo 0)" -lt 8388608 ]; do
  kill -0 $tx_pid 2>/dev/null || fail "the transfer ended before 8 MiB arrived"
  i=$((i+1)); [ $i -le 600 ] || fail "8 MiB did not arrive within 60 s"
  sleep 0.1
done
at=$(stat -c %s /tmp/kill.bin)
tk=$(cut -d' ' -f1 /proc/uptime)
kill -KILL $pid; wait $pid 2>/dev/null
for n in vnet1 vnet2; do [ -e "/dev/vduse/$n" ] || fail "SIGKILL removed /dev/vduse/$n"; done
kill -0 $tx_pid 2>/dev/null || fail "the transfer ended with virtiod killed (at $at bytes)"
: >/tmp/run.out
virtiod run --config /tmp/devices.toml --state-dir /tmp/state >/tmp/run.out 2>/tmp/run2.log &
pid=$!
i=0
while [ "$(wc -l </tmp/run.out)" -lt 2 ]; do
  kill -0 $pid 2>/dev/null || fail "virtiod run exited early after the restart"
  i=$((i+1)); [ $i -le 600 ] || fail "virtiod run printed nothing after the restart"
  sleep 0.1
done
tr=$(cut -d' ' -f1 /proc/uptime)
# the interfaces are in netns a and b, out of sight of sysfs here: the device is named instead
grep -qx 'n1 /dev/vduse/vnet1' /tmp/run.out || fail "after the restart virtiod run printed: $(cat /tmp/run.out)"
finish kill 600
td=$(cut -d' ' -f1 /proc/uptime)
[ "$(ip -n a -o link show "$if1" | cut -d: -f1)" = "$idx1" ] || fail "$if1 changed index: $(ip -n a -o link show)"
[ "$(ip -n b -o link show "$if2" | cut -d: -f1)" = "$idx2" ] || fail "$if2 changed index: $(ip -n b -o link show)"
ip -n a -o addr show dev "$if1" | grep -q 'inet 192.0.2.1/24' || fail "$if1 lost its address"
ip -n b -o addr show dev "$if2" | grep -q 'inet 192.0.2.2/24' || fail "$if2 lost its address"
ip netns exec a ping -c 2 -W 5 192.0.2.2 >/tmp/ping-after.log 2>&1 || fail "ping a -> b after the restart"
ok "SIGKILL at $at bytes of 64 MiB, serving again $(awk -v a="$tk" -v b="$tr" 'BEGIN { printf "%.1f", b - a }') s later, transfer done $(awk -v a="$tr" -v b="$td" 'BEGIN { printf "%.1f", b - a }') s after that: sha256 matches, $if1 (index $idx1) and $if2 (index $idx2) kept with their addresses"

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

# --- 5. a tap: the VDUSE interface in netns c, the tap vt0 in the VM's root namespace ---
ip netns add c || fail "ip netns add c"
virtiod serve --vduse vnett --state-dir /tmp/state --mac 52:54:00:00:00:03 net:tap=vt0 >/tmp/tap.out 2>/tmp/tap.log &
pid=$!
i=0
while [ ! -s /tmp/tap.out ]; do
  kill -0 $pid 2>/dev/null || fail "virtiod serve net:tap=vt0 exited early"
  i=$((i+1)); [ $i -le 300 ] || fail "virtiod serve net:tap=vt0 printed no interface"
  sleep 0.1
done
ift=$(head -1 /tmp/tap.out)
[ -d /sys/class/net/vt0 ] || fail "no tap vt0"
ip link set "$ift" netns c || fail "moving $ift to netns c"
ip -n c link set lo up
ip -n c addr add 198.51.100.2/24 dev "$ift" || fail "address of $ift"
ip -n c link set "$ift" up || fail "$ift up"
ip addr add 198.51.100.1/24 dev vt0 || fail "address of vt0"
ip link set vt0 up || fail "vt0 up"
ping -c 3 -W 5 198.51.100.2 >/tmp/ping-tap.log 2>&1 || fail "ping vt0 -> $ift"
ip netns exec c ping -c 3 -W 5 198.51.100.1 >/tmp/ping-tap2.log 2>&1 || fail "ping $ift -> vt0"
head -c 8388608 /tmp/src.bin >/tmp/src8.bin; want8=$(sha256sum </tmp/src8.bin | cut -d' ' -f1)
rm -f /tmp/src.bin
socat -u TCP-LISTEN:5003,reuseaddr OPEN:/tmp/tap.bin,creat,trunc 2>/tmp/tap-rx.log &
rx=$!
wait_listen "" 5003
ip netns exec c socat -u OPEN:/tmp/src8.bin TCP:198.51.100.1:5003 2>/tmp/tap-tx.log || fail "socat over the tap"
wait $rx || fail "socat listening on vt0"
[ "$(sha256sum </tmp/tap.bin | cut -d' ' -f1)" = "$want8" ] || fail "8 MiB over the tap: sha256 differs"
ok "net:tap=vt0: $ift in netns c (198.51.100.2) <-> vt0 (198.51.100.1): ping both ways, 8 MiB over TCP, sha256 matches"
kill -TERM $pid; wait $pid; rc=$?
[ $rc -eq 0 ] || fail "virtiod serve net:tap=vt0 exited $rc on SIGTERM"
[ ! -e /sys/class/net/vt0 ] || fail "tap vt0 left behind"
ip -n c link show "$ift" >/dev/null 2>&1 && fail "$ift left behind in netns c"
ok "SIGTERM: the tap and the VDUSE interface are gone"
ip netns del c
exit 0
