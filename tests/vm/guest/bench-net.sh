#!/bin/sh
# Guest half of tests/vm/bench-net.sh: two network namespaces a (192.0.2.1) and b (192.0.2.2)
# joined by one of three paths, measured in turn, ROUNDS times:
#   switch  two virtiod VDUSE net devices on its in-process switch
#   veth    a veth pair (the kernel's own path)
#   veth-nooff  the same pair with its offloads off (checksum, TSO, GSO, GRO, scatter-gather):
#           every frame at most 1514 bytes and checksummed in software, as virtiod's are today
#   bridge  two virtiod VDUSE net devices on taps, the taps on a kernel bridge
# Prints one line per figure: "BENCH path metric value", metric being
#   tcp_mbps    iperf3 TCP a -> b for SECONDS_PER_RUN s, receiver's Mbit/s
#   rtt_p50_us  ping a -> b (PINGS pings, 50 ms apart), median round trip in µs
#   cpu_pct     virtiod's CPU time during the iperf3 run, in % of one CPU (switch, bridge)
#   drops       frames virtiod's ports dropped during the iperf3 run (switch, bridge)
#   guest_busy_pct, guest_us_per_frame: the guest's CPU during the iperf3 run
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5} ROUNDS=${ROUNDS:-2} PINGS=${PINGS:-50}   # POLL_US: virtiod's poll-us
fail() { echo "GUEST-FAIL: $*"; for f in /tmp/*.log; do [ -e "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done; exit 1; }
ip() { /bin/ip "$@"; }
clk=100   # USER_HZ: the unit of utime and stime in /proc/PID/stat

# up_pair IF_A IF_B: move the two interfaces into netns a and b, address them, bring them up
up_pair() {
  ip netns add a && ip netns add b || fail "ip netns add"
  ip link set "$1" netns a && ip link set "$2" netns b || fail "moving $1/$2 into the netns"
  ip -n a addr add 192.0.2.1/24 dev "$1" && ip -n b addr add 192.0.2.2/24 dev "$2" || fail "addresses"
  for ns in a b; do ip -n $ns link set lo up; done
  ip -n a link set "$1" up && ip -n b link set "$2" up || fail "links up"
  i=0
  until ip netns exec a ping -c 1 -W 1 192.0.2.2 >/dev/null 2>&1; do
    i=$((i+1)); [ $i -le 30 ] || fail "$path: no ping a -> b"
    sleep 0.2
  done
}
down_pair() { ip netns del a; ip netns del b; }

# start_virtiod NET_A NET_B: two VDUSE net devices; sets vpid, ifa, ifb
start_virtiod() {
  poll=; [ -n "${POLL_US:-}" ] && poll="poll-us = $POLL_US"
  cat >/tmp/devices.toml <<TOML
[[device]]
name = "n1"
net = "$1"
vduse = "vnet1"
mac = "52:54:00:00:00:01"
$poll

[[device]]
name = "n2"
net = "$2"
vduse = "vnet2"
mac = "52:54:00:00:00:02"
$poll
TOML
  : >/tmp/run.out
  rm -f /tmp/ctl.sock
  virtiod run --config /tmp/devices.toml --state-dir /tmp/state --control /tmp/ctl.sock >/tmp/run.out 2>/tmp/run.log &
  vpid=$!
  i=0
  while [ "$(wc -l </tmp/run.out)" -lt 2 ]; do
    kill -0 $vpid 2>/dev/null || fail "virtiod run exited early"
    i=$((i+1)); [ $i -le 600 ] || fail "virtiod run printed no interfaces"
    sleep 0.1
  done
  ifa=$(awk '$1 == "n1" { print $2 }' /tmp/run.out)
  ifb=$(awk '$1 == "n2" { print $2 }' /tmp/run.out)
}
stop_virtiod() { kill -TERM $vpid; wait $vpid || fail "virtiod run failed to stop"; vpid=; }

setup_switch() { start_virtiod switch:sw0 switch:sw0; up_pair "$ifa" "$ifb"; }
teardown_switch() { down_pair; stop_virtiod; }
setup_veth() { ip link add va type veth peer name vb || fail "veth"; vpid=; ifa=va ifb=vb; up_pair va vb; }
teardown_veth() { down_pair; }   # deleting the netns deletes the pair
setup_veth_nooff() {
  setup_veth
  ip netns exec a ethtool -K va tx off rx off sg off tso off gso off gro off >/dev/null 2>&1 \
    && ip netns exec b ethtool -K vb tx off rx off sg off tso off gso off gro off >/dev/null 2>&1 \
    || fail "ethtool -K: offloads stay on"
}
teardown_veth_nooff() { down_pair; }
setup_bridge() {
  ip link add br0 type bridge || fail "bridge"
  ip link set br0 up
  start_virtiod tap:ta tap:tb
  for t in ta tb; do ip link set $t master br0 && ip link set $t up || fail "tap $t on br0"; done
  up_pair "$ifa" "$ifb"
}
teardown_bridge() { down_pair; stop_virtiod; ip link del br0; }

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# threads PID: one line per thread of PID: name, utime+stime ticks, context switches
threads() {
  for t in /proc/"$1"/task/*; do
    printf '%s %s %s\n' "$(cat "$t/comm")" "$(awk '{ print $14 + $15 }' "$t/stat")" \
      "$(awk '/^(non)?voluntary_ctxt_switches/ { s += $2 } END { print s }' "$t/status")"
  done
}
# frames: packets sent by both ends (data one way, ACKs the other)
frames() {
  echo $(( $(ip netns exec a cat "/sys/class/net/$ifa/statistics/tx_packets") \
    + $(ip netns exec b cat "/sys/class/net/$ifb/statistics/tx_packets") ))
}
# guest CPU time in ticks: "busy idle"
guest_cpu() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat; }

measure() {
  ip netns exec b iperf3 -s -1 -p 5201 >/tmp/iperf-s.log 2>&1 &
  srv=$!
  i=0
  [ -n "$vpid" ] && { c0=$(cpu_ticks $vpid); threads $vpid >/tmp/threads0; }
  f0=$(frames); g0=$(guest_cpu)
  perf_pid=
  if [ "${PERF:-0}" = 1 ] && [ $r = 0 ]; then
    # a system-wide profile of this path's iperf3 run (perf from the host, PERF=1 in bench-net.sh)
    perf record -q -a -F 999 -e cpu-clock -o "/tmp/perf-$path.data" >/tmp/perf-rec.log 2>&1 &
    perf_pid=$!
  fi
  t0=$(cut -d' ' -f1 /proc/uptime)
  until ip netns exec a iperf3 -c 192.0.2.2 -p 5201 -t "$SECONDS_PER_RUN" -f m >/tmp/iperf.log 2>&1; do
    i=$((i+1)); [ $i -le 20 ] || fail "$path: iperf3 client failed"
    sleep 0.3
    t0=$(cut -d' ' -f1 /proc/uptime)
  done
  t1=$(cut -d' ' -f1 /proc/uptime)
  f1=$(frames); g1=$(guest_cpu)
  if [ -n "$perf_pid" ]; then
    kill -INT $perf_pid; wait $perf_pid
    for sort in comm,dso comm,sym; do
      perf report -i "/tmp/perf-$path.data" --stdio --no-children -g none --percent-limit 1.5 \
        --sort $sort 2>/dev/null | grep '%' | grep -v '^#' | head -25 | sed "s/^/PERF $path $sort /"
    done
    rm -f "/tmp/perf-$path.data"
  fi
  [ -n "$vpid" ] && threads $vpid >/tmp/threads1
  wait $srv
  mbps=$(awk '/receiver/ { print $7 }' /tmp/iperf.log)
  [ -n "$mbps" ] || fail "$path: no iperf3 figure: $(cat /tmp/iperf.log)"
  echo "BENCH $path tcp_mbps $mbps"
  fr=$((f1 - f0))
  echo "BENCH $path guest_busy_pct $(echo "$g0 $g1" | awk '{ b = $3 - $1; i = $4 - $2; printf "%.0f", (b + i) ? 100 * b / (b + i) : 0 }')"
  echo "BENCH $path guest_us_per_frame $(echo "$g0 $g1" | awk -v f=$fr -v k="$clk" '{ printf "%.0f", f ? 1e6 * ($3 - $1) / k / f : 0 }')"
  if [ -n "$vpid" ]; then
    # per thread (summed over the two devices): CPU µs and context switches per frame
    awk -v f=$fr -v k="$clk" -v p="$path" 'NR == FNR { c[$1] -= $2; s[$1] -= $3; next } { c[$1] += $2; s[$1] += $3 }
      END { for (n in c) if (f) printf "PROFILE %s %s cpu_us_per_frame %.0f switches_per_frame %.2f\n", p, n, 1e6 * c[n] / k / f, s[n] / f }' \
      /tmp/threads0 /tmp/threads1
    # frames the ports dropped (a port's queue of frames waiting for receive buffers was full)
    echo "BENCH $path drops $(virtiod ctl --control /tmp/ctl.sock stats 2>/dev/null \
      | awk '{ for (i = 2; i <= NF; i++) if ($i ~ /_drop_/) { split($i, kv, "="); s += kv[2] } } END { print s + 0 }')"
    c1=$(cpu_ticks $vpid)
    echo "BENCH $path cpu_pct $(awk -v c=$((c1 - c0)) -v k="$clk" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", 100 * c / k / (b - a) }')"
  fi
  ip netns exec a ping -c "$PINGS" -i 0.05 -W 5 192.0.2.2 >/tmp/ping.log 2>&1 || fail "$path: ping"
  p50=$(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' /tmp/ping.log | sort -n \
    | awk '{ v[NR] = $1 } END { if (NR) printf "%.0f", 1000 * ((NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }')
  [ -n "$p50" ] || fail "$path: no ping times: $(cat /tmp/ping.log)"
  echo "BENCH $path rtt_p50_us $p50"
}

r=0
while [ $r -lt "$ROUNDS" ]; do
  for path in switch veth veth-nooff bridge; do
    fn=$(echo "$path" | tr - _)
    "setup_$fn"
    measure
    "teardown_$fn"
  done
  r=$((r+1))
done
