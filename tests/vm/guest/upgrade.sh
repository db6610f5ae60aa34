#!/bin/sh
# Guest half of tests/vm/suite-upgrade.sh (busybox ash, run-in-vm.sh's 6.12 kernel with VDUSE):
# `virtiod run` serves a VDUSE virtio-blk device (/dev/vdX) while virtiod-blkcheck streams
# 4 KiB O_DIRECT writes to it; ten `ctl upgrade`s in a row, two failed upgrades (a binary that
# exits at once, a new process that dies after taking the devices over), then SIGKILL +
# restart cycles for comparison, then SIGTERM + start cycles of a daemon run with
# `--on-stop keep` (the devices stay in the kernel across the stop). Zero I/O errors and identical data are asserted; the pauses
# the writer saw (longest gap between write completions around each event) are printed.
set -u
fail() { echo "GUEST-FAIL: $*"; for f in /tmp/*.log /tmp/stream.out; do [ -e "$f" ] && { echo "--- $f"; tail -15 "$f"; }; done; exit 1; }
ok() { echo "ok: $* (t=$(cut -d' ' -f1 /proc/uptime)s)"; }
now() { virtiod-blkcheck now; }
CTL=/tmp/up.ctl
UPGRADES=${UPGRADES:-10}
KILLS=${KILLS:-5}
KEEPS=${KEEPS:-3}

dd if=/dev/zero of=/tmp/up.img bs=1M count=48 2>/dev/null
cat >/tmp/up.toml <<EOF
[[device]]
name = "u0"
image = "/tmp/up.img"
vduse = "vdu"

[[device]]
name = "q1"
image = "qcow2:/qimg/q.qcow2"
vduse = "vdq"
EOF

# start LOG: `virtiod run` in the background; waits for its "u0 NODE" line; sets $pid/$node.
start() {
  : >/tmp/run.out
  # shellcheck disable=SC2086 # RUN_FLAGS: extra words
  virtiod run --config /tmp/up.toml --control $CTL ${RUN_FLAGS:-} >/tmp/run.out 2>>"$1" &
  pid=$!
  i=0
  while ! grep -q '^q1 ' /tmp/run.out || ! grep -q '^u0 ' /tmp/run.out; do
    kill -0 $pid 2>/dev/null || fail "virtiod run exited early: $(tail -3 "$1")"
    i=$((i+1)); [ $i -le 300 ] || fail "virtiod run printed no device"
    sleep 0.1
  done
  node=$(sed -n 's/^u0 //p' /tmp/run.out)
  qnode=$(sed -n 's/^q1 //p' /tmp/run.out)
}

# gone PID: wait until a process that is not our child has exited.
gone() {
  i=0
  while kill -0 "$1" 2>/dev/null; do
    i=$((i+1)); [ $i -le 100 ] || return 1
    sleep 0.05
  done
}

start /tmp/run.log
first=$node
[ -b "$node" ] || fail "$node is not a block device"
rm -f /tmp/stop /tmp/events
virtiod-blkcheck stream "$node" 32 /tmp/stop /tmp/events >/tmp/stream.out 2>&1 &
writer=$!
# the qcow2 device: 12 MiB in 16 KiB O_DIRECT writes across the upgrades (clusters are
# allocated while the devices move: the old process flushes, the new one opens the image after)
dd if=/dev/urandom of=/tmp/qpat bs=1M count=12 2>/dev/null
dd if=/tmp/qpat of="$qnode" bs=16k oflag=direct 2>/tmp/qdd.err &
qwriter=$!
sleep 1

# --- ten upgrades in a row ---
for k in $(seq 1 "$UPGRADES"); do
  t0=$(now)
  virtiod ctl --control $CTL upgrade >/tmp/up.out 2>&1 || fail "upgrade $k: $(cat /tmp/up.out)"
  t1=$(now)
  echo "upgrade $t0 $t1" >>/tmp/events
  new=$(sed -n 's/.*-> //p' /tmp/up.out)
  [ -n "$new" ] && [ "$new" != "$pid" ] || fail "upgrade $k: no new pid: $(cat /tmp/up.out)"
  gone "$pid" || fail "upgrade $k: the old process $pid did not exit"
  pid=$new
  kill -0 "$pid" || fail "upgrade $k: the new process $pid is not running"
  kill -0 $writer 2>/dev/null || fail "upgrade $k: the writer stopped: $(cat /tmp/stream.out)"
  [ -b "$first" ] && [ -e /dev/vduse/vdu ] || fail "upgrade $k: the device was removed"
  sleep 0.3
done
wait $pid 2>/dev/null # the first one was our child
virtiod ctl --control $CTL list >/tmp/list.out 2>&1 || fail "ctl list after the upgrades: $(cat /tmp/list.out)"
grep -q "u0 vduse $first up" /tmp/list.out || fail "after the upgrades: $(cat /tmp/list.out)"
[ "$(grep -c 'taking over the VDUSE device name=vdu$' /tmp/run.log)" -eq "$UPGRADES" ] || fail "not every upgrade took the device over"
wait $qwriter || fail "the qcow2 writer saw an error: $(cat /tmp/qdd.err)"
[ "$(dd if="$qnode" bs=1M count=12 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$(md5sum </tmp/qpat | cut -d' ' -f1)" ] || fail "the qcow2 device reads back different data"
grep -q "q1 vduse $qnode up queues=1 image=qcow2:" /tmp/list.out || fail "qcow2 device: $(cat /tmp/list.out)"
ok "qcow2 device: 12 MiB written across the upgrades read back identical"
grep -q "re-opening the existing VDUSE device\|VDUSE device created" /tmp/run.log
ok "$UPGRADES upgrades in a row under the writer: pid changed each time, $first kept"

# --- a failed upgrade leaves the old process serving ---
t0=$(now)
virtiod ctl --control $CTL upgrade --binary /bin/false >/tmp/f1.out 2>&1 && fail "upgrade to /bin/false succeeded"
t1=$(now); echo "failed-binary $t0 $t1" >>/tmp/events
grep -q "serves on" /tmp/f1.out || fail "upgrade to /bin/false: $(cat /tmp/f1.out)"
kill -0 "$pid" || fail "the daemon died with a failed upgrade"
virtiod ctl --control $CTL list >/tmp/list.out 2>&1 || fail "ctl list after a failed upgrade"
grep -q "u0 vduse $first up" /tmp/list.out || fail "after a failed upgrade: $(cat /tmp/list.out)"
ok "upgrade --binary /bin/false refused: $(cat /tmp/f1.out | cut -c1-150)"

# next to virtiod: under Landlock the daemon may only start programs from its own directory
dies=$(dirname "$(command -v virtiod)")/virtiod-dies.sh
printf '#!/bin/sh\nVIRTIOD_DEBUG_UPGRADE_DIE=taken exec virtiod "$@"\n' >"$dies"
chmod +x "$dies"
t0=$(now)
virtiod ctl --control $CTL upgrade --binary "$dies" >/tmp/f2.out 2>&1 && fail "upgrade to a dying binary succeeded"
t1=$(now); echo "failed-midway $t0 $t1" >>/tmp/events
grep -q "UPGRADE_DIE=taken" /tmp/run.log || fail "the new process did not get to the take-over: $(cat /tmp/f2.out)"
kill -0 "$pid" || fail "the daemon died with a failed upgrade"
virtiod ctl --control $CTL list >/tmp/list.out 2>&1 || fail "ctl list after a failed take-over"
grep -q "u0 vduse $first up" /tmp/list.out || fail "after a failed take-over: $(cat /tmp/list.out)"
sleep 1
kill -0 $writer 2>/dev/null || fail "the writer stopped after the failed upgrades: $(cat /tmp/stream.out)"
ok "a new process dying after the take-over: the old one serves on"

# and one more successful upgrade after the failures
virtiod ctl --control $CTL upgrade >/tmp/up.out 2>&1 || fail "upgrade after failures: $(cat /tmp/up.out)"
new=$(sed -n 's/.*-> //p' /tmp/up.out); gone "$pid" || fail "the old process did not exit"; pid=$new
ok "upgrade after the failed ones"

# --- for comparison: SIGKILL + restart ---
for k in $(seq 1 "$KILLS"); do
  sleep 0.5
  kill -0 "$pid" 2>/dev/null || fail "restart $k: the daemon $pid had exited by itself"
  t0=$(now)
  kill -KILL "$pid"
  wait "$pid" 2>/dev/null # our child after a restart
  gone "$pid" || fail "SIGKILL"
  # the last one keeps its devices when stopped: the SIGTERM cycles below
  [ "$k" -lt "$KILLS" ] || RUN_FLAGS="--on-stop keep"
  start /tmp/run.log
  t1=$(now)
  echo "kill-restart $t0 $t1" >>/tmp/events
  [ "$node" = "$first" ] || fail "restart $k printed $node, expected $first"
done
ok "$KILLS SIGKILL+restart cycles"

# --- SIGTERM + start with --on-stop keep (a service manager's restart): the devices stay ---
for k in $(seq 1 "$KEEPS"); do
  sleep 0.5
  t0=$(now)
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null
  gone "$pid" || fail "stop-keep $k: SIGTERM"
  [ -e /dev/vduse/vdu ] && [ -e /dev/vduse/vdq ] && [ -b "$first" ] || fail "stop-keep $k: SIGTERM with --on-stop keep removed a device"
  [ "$(grep -c 'the VDUSE device is kept for the next start' /tmp/run.log)" -ge $((2 * k)) ] || fail "stop-keep $k: the daemon did not keep both devices"
  # the last start stops with the default (remove): the clean stop at the end
  [ "$k" -lt "$KEEPS" ] || RUN_FLAGS=
  start /tmp/run.log
  t1=$(now)
  echo "term-keep-start $t0 $t1" >>/tmp/events
  [ "$node" = "$first" ] || fail "stop-keep $k: the restart printed $node, expected $first"
done
ok "$KEEPS SIGTERM (--on-stop keep) + start cycles: the devices stayed"
sleep 0.5
touch /tmp/stop
wait $writer || fail "the writer saw an error or a mismatch: $(cat /tmp/stream.out)"
cat /tmp/stream.out
grep -q "0 I/O errors, 0 blocks differ" /tmp/stream.out || fail "stream: $(cat /tmp/stream.out)"

# the table; a generous sanity bound only: an upgrade never pauses the writer for 5 s
echo "guest-visible pause (longest gap between 4 KiB write completions), TCG:"
printf '%-16s %3s %10s %10s\n' event n p50 max
sed -n 's/^pause \([^:]*\): n=\([0-9]*\) p50=\([^ ]*\) max=\([^ ]*\).*/\1 \2 \3 \4/p' /tmp/stream.out |
  while read -r label n p50 max; do printf '%-16s %3s %10s %10s\n' "$label" "$n" "$p50" "$max"; done
echo "the old process, quiesce to the new one's confirmation (ms): $(sed -n 's/.*the new process serves quiesced_ms=\([0-9]*\).*/\1/p' /tmp/run.log | tr '\n' ' ')"
echo "the new process, hand-over received to devices served (ms): $(sed -n 's/.*took the devices over devices=[0-9]* took_ms=\([0-9]*\).*/\1/p' /tmp/run.log | tr '\n' ' ')"
umax=$(sed -n 's/^pause upgrade: .*max=\([0-9]*\).*/\1/p' /tmp/stream.out)
[ -n "$umax" ] && [ "$umax" -lt 5000 ] || fail "an upgrade paused the writer for ${umax:-?} ms"

kill -TERM "$pid"; gone "$pid" || fail "SIGTERM"
[ ! -e /dev/vduse/vdu ] && [ ! -e /dev/vduse/vdq ] || fail "a VDUSE device was left behind after SIGTERM"
ok "clean stop after the upgrades"
echo "upgrade: all checks passed"
