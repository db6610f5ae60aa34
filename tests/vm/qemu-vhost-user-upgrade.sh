#!/usr/bin/env bash
# End-to-end check that `virtiod ctl upgrade` hands a live vhost-user-blk connection over to the
# new process under a QEMU guest's write stream: QEMU never reconnects, no request is lost or
# repeated, and the guest sees a pause only.
#
# The host runs `virtiod run` (devices.toml: one vhost-user blk device, NUM_QUEUES queues, on a
# raw image; --control) and QEMU (TCG, tests/vm/run-in-vm.sh) with a vhost-user-blk-pci disk on
# its socket, *without* reconnect-ms: a connection the daemon dropped would stay dropped. In the
# guest, tests/vm/guest/reconnect-writer.sh (CHURN=0) writes a host-made STREAM_MB MiB random
# pattern at 8 MiB as 4 KiB O_DIRECT writes from WRITERS parallel dd processes, while
# `virtiod-blkcheck stream` writes, times and verifies 4 KiB O_DIRECT writes one at a time over
# MiB [0, 8) until the host writes UPGRADES-DONE into the disk's last 4 KiB. Once the guest
# writes, the host runs UPGRADES `virtiod ctl upgrade`s, one UPGRADE_GAP s after the other
# (each: the PID changes, the old process exits). It fails unless every upgrade succeeded (at
# least MIN_DURING of them while the dd writers ran, all under blkcheck's stream), every writer
# exits 0, the guest reads the pattern back, the image holds exactly the pattern (md5),
# blkcheck verifies its blocks, the daemons accepted one connection in all (the log has one
# "frontend connected"; a handed-over connection is not accepted again) and none disconnected
# before the end, QEMU printed nothing about its vhost-user connection, and the last daemon
# exits on SIGTERM and removes its socket.
# Printed, not asserted: the guest-visible pause of each upgrade (blkcheck's longest gap
# between two write completions around it, against the other 250 ms windows of the stream)
# and each upgrade's quiesced_ms from the daemon's log. Takes about 40-70 s (TCG boot 10-20 s).
#
# usage: tests/vm/qemu-vhost-user-upgrade.sh [--keep]
#   --keep  keep the work directory (image, pattern, daemon log, VM console, marker log)
# env: VIRTIOD (${CARGO_TARGET_DIR:-<repo>/target}/release/virtiod), BLKCHECK (the same
#      directory's virtiod-blkcheck), NUM_QUEUES (2), WRITERS (4), UPGRADES (5), UPGRADE_GAP
#      (0.5 s), STREAM_MB (48), MIN_DURING (2),
#      VM_TIMEOUT (300 s), START_TIMEOUT (240 s until the guest writes), STALL_TIMEOUT (30 s
#      without guest I/O progress), STOP_TIMEOUT (10 s), TMPDIR (work dir parent, /tmp),
#      VM_CACHE (see run-in-vm.sh).
# The last line is "upgrade-vu-test [T]: PASS: ..." or "... FAIL: ..."; exit 0 only on PASS.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
VIRTIOD=${VIRTIOD:-${CARGO_TARGET_DIR:-$HERE/../../target}/release/virtiod}
BLKCHECK=${BLKCHECK:-$(dirname "$VIRTIOD")/virtiod-blkcheck}
NUM_QUEUES=${NUM_QUEUES:-2} WRITERS=${WRITERS:-4} UPGRADES=${UPGRADES:-5} UPGRADE_GAP=${UPGRADE_GAP:-0.5}
STREAM_MB=${STREAM_MB:-48} MIN_DURING=${MIN_DURING:-2}
VM_TIMEOUT=${VM_TIMEOUT:-300} START_TIMEOUT=${START_TIMEOUT:-240} STALL_TIMEOUT=${STALL_TIMEOUT:-30}
STOP_TIMEOUT=${STOP_TIMEOUT:-10}
STREAM_OFF_MB=8 IMG_MB=$((8 + STREAM_MB + 1))   # the last MiB: the host's "done" marker
for b in "$VIRTIOD" "$BLKCHECK"; do
  [ -x "$b" ] || { echo "no binary $b (cargo build --release -p virtiod -p virtiod-blkcheck, or set VIRTIOD/BLKCHECK)" >&2; exit 2; }
done

T0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%.1f", $1-$2}'; }
elapsed_ms() { echo "$(date +%s.%N) $T0" | awk '{printf "%.3f", $1-$2}'; }
log() { echo "upgrade-vu-test [$(elapsed)s]: $*" >&2; }
FAILS=()
failure() { log "FAIL: $*"; FAILS+=("$*"); }
gt() { awk -v a="$1" -v b="$2" 'BEGIN{exit !(a>b)}'; }
nocolor() { sed 's/\x1b\[[0-9;]*m//g'; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vuu-test.XXXXXX")
sock=$work/vu.sock ctl=$work/ctl.sock img=$work/disk.img pat=$work/pattern.bin mark=$work/mark.log
dlog=$work/daemon.log
pid='' vm_pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  if [ -n "$vm_pid" ] && kill -0 "$vm_pid" 2>/dev/null; then kill -KILL -- "-$vm_pid" 2>/dev/null || true; fi
  if [ "$KEEP" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s "${IMG_MB}M" "$img"
head -c $((STREAM_MB * 1048576)) /dev/urandom >"$pat"
cat >"$work/devices.toml" <<EOF
[[device]]
name = "vu0"
image = "$img"
vhost-user = "$sock"
queues = $NUM_QUEUES
EOF
mkdir -p "$work/state"
# the new processes inherit stderr: one log for every generation
"$VIRTIOD" run --config "$work/devices.toml" --control "$ctl" --state-dir "$work/state" >"$work/run.out" 2>"$dlog" &
pid=$!
for _ in $(seq 200); do [ -S "$sock" ] && [ -S "$ctl" ] && break; sleep 0.05; done
[ -S "$sock" ] || { nocolor <"$dlog" >&2; log "FAIL: virtiod run did not listen on $sock"; exit 1; }
log "virtiod run pid $pid serves $sock; booting the guest ($WRITERS writers, $NUM_QUEUES queues)"

# the guest half: blkcheck's timed stream on MiB [0, 8) beside the writers on [8, 8+STREAM_MB)
cat >"$work/guest.sh" <<'EOF'
#!/bin/sh
u0=$(cut -d' ' -f1 /proc/uptime) t0=$(virtiod-blkcheck now)
rm -f /tmp/bc.stop; : >/tmp/bc.events
virtiod-blkcheck stream /dev/vda 8 /tmp/bc.stop /tmp/bc.events >/tmp/bc.out 2>&1 &
bc=$!
CHURN=0 sh /reconnect-writer.sh; rc=$?
# blkcheck streams on until the host is done upgrading: it writes UPGRADES-DONE into the
# disk's last 4 KiB
last=$(( $(blockdev --getsize64 /dev/vda) / 4096 - 1 )) i=0
until [ "$(dd if=/dev/vda bs=4k skip=$last count=1 iflag=direct 2>/dev/null | head -c 13)" = UPGRADES-DONE ]; do
  i=$((i + 1)); [ $i -le 600 ] || { echo "GUEST-FAIL: the host never wrote UPGRADES-DONE"; rc=1; break; }
  sleep 0.2
done
t1=$(virtiod-blkcheck now)
# one event per 250 ms of the stream, named by its start (ms after t0): its longest gap
# between two completions (the host finds the windows of its upgrades by the guest's uptime)
awk -v a="$t0" -v b="$t1" 'BEGIN { for (t = a; t < b; t += 25e7) printf "w%.0f %.0f %.0f\n", (t - a) / 1e6, t, t + 25e7 }' >/tmp/bc.events
touch /tmp/bc.stop; wait $bc; brc=$?
echo "BLKCHECK-T0 $u0"
sed 's/^/BLKCHECK: /' /tmp/bc.out
[ "$rc" -eq 0 ] && [ "$brc" -eq 0 ]
EOF

: >"$mark"
vm_args=(--timeout "$VM_TIMEOUT" --env "WRITERS=$WRITERS" --env "STREAM_OFF_MB=$STREAM_OFF_MB"
  --env "STREAM_MB=$STREAM_MB" --file "$pat:/pattern.bin" --file "$HERE/guest/reconnect-writer.sh:/reconnect-writer.sh"
  --bin "$BLKCHECK"
  --qemu-arg -chardev --qemu-arg "socket,id=vu0,path=$sock"
  --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vu0,num-queues=$NUM_QUEUES"
  --qemu-arg -serial --qemu-arg mon:stdio --qemu-arg -serial --qemu-arg "file:$mark")
setsid "$HERE/run-in-vm.sh" "${vm_args[@]}" "$work/guest.sh" >"$work/vm.log" 2>&1 &
vm_pid=$!

hb_field() { { tr -d '\r' <"$mark" | grep '^HB ' | tail -1 | sed -n "s/.* $1=\([0-9.]*\).*/\1/p"; } 2>/dev/null || true; }
marked() { tr -d '\r' <"$mark" 2>/dev/null | grep -q "^$1"; }
vm_alive() { kill -0 "$vm_pid" 2>/dev/null; }
stop_vm() {
  local t
  t=$(pgrep -s "$vm_pid" -x timeout 2>/dev/null || true)
  [ -z "$t" ] || kill -TERM "$t" 2>/dev/null || true
  for _ in $(seq 150); do vm_alive || return 0; sleep 0.1; done
  kill -KILL -- "-$vm_pid" 2>/dev/null || true
}
last_io='' last_change=0
io_stalled() {
  local io; io="$(hb_field reads) $(hb_field writes)"
  if [ "$io" != "$last_io" ]; then last_io=$io last_change=$(elapsed); fi
  gt "$(echo "$(elapsed) $last_change" | awk '{print $1-$2}')" "$STALL_TIMEOUT"
}
# the guest's uptime is the host's elapsed time less `off`: the smallest difference seen
# between the host's clock and the latest heartbeat's uptime (heartbeats every 0.25 s)
off=''
sync_clock() {
  local t o; t=$(hb_field t); [ -n "$t" ] || return 0
  o=$(echo "$(elapsed_ms) $t" | awk '{printf "%.3f", $1-$2}')
  if [ -z "$off" ] || gt "$off" "$o"; then off=$o; fi
}
stalled=
stall() { stalled=1; failure "guest I/O stalled for ${STALL_TIMEOUT}s $*; stopping the VM"; stop_vm; }

t_start=$(elapsed)
until marked RECONNECT-WRITER-START; do
  vm_alive || break
  if gt "$(elapsed)" "$(echo "$t_start $START_TIMEOUT" | awk '{print $1+$2}')"; then
    failure "the guest did not start writing within ${START_TIMEOUT}s"; stop_vm; break
  fi
  sync_clock
  sleep 0.1
done
done_up=0 during=0
if marked RECONNECT-WRITER-START; then
  start_line=$(tr -d '\r' <"$mark" | grep '^RECONNECT-WRITER-START' | head -1)
  w0=$(sed -n 's/.*writes0=\([0-9]*\).*/\1/p' <<<"$start_line")
  log "guest: $start_line"
  last_change=$(elapsed)
  for k in $(seq "$UPGRADES"); do
    # UPGRADE_GAP s after the last one, and only while the guest's I/O progresses (the
    # heartbeats stop with the writers; blkcheck's stream goes on until UPGRADES-DONE)
    t_next=$(echo "$(elapsed) $UPGRADE_GAP" | awk '{print $1+$2}')
    while vm_alive && ! gt "$(elapsed)" "$t_next"; do
      if ! marked WRITER-EXIT && io_stalled; then stall "before upgrade $k"; break; fi
      marked WRITER-EXIT || sync_clock
      sleep 0.05
    done
    if [ -n "$stalled" ] || ! vm_alive; then break; fi
    marked WRITER-EXIT || during=$((during + 1))
    w=$(hb_field writes) t_up=$(elapsed_ms)
    if out=$("$VIRTIOD" ctl --control "$ctl" upgrade 2>&1); then
      echo "$k $t_up" >>"$work/upgrades.txt"
      new=$(sed -n 's/.*-> \([0-9]*\).*/\1/p' <<<"$out")
      for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
      if [ -z "$new" ] || [ "$new" = "$pid" ]; then failure "upgrade $k: $out"
      elif kill -0 "$pid" 2>/dev/null; then failure "upgrade $k: the old process $pid still runs"
      else done_up=$((done_up + 1)); log "upgrade $k: $out (the guest had completed $(( ${w:-$w0} - w0 )) writes)"; fi
      pid=$new
    else
      failure "upgrade $k: $out"
    fi
  done
fi
# let the guest finish: blkcheck's stream stops on this marker in the disk's last 4 KiB
printf UPGRADES-DONE | dd of="$img" bs=4096 seek=$((IMG_MB * 256 - 1)) conv=notrunc status=none
if [ -z "$stalled" ]; then last_change=$(elapsed); fi
while [ -z "$stalled" ] && vm_alive; do
  if ! marked GUEST-DONE && io_stalled; then stall "after the upgrades"; break; fi
  sleep 0.2
done
set +e; wait "$vm_pid"; vm_rc=$?; set -e
vm_pid=
log "guest finished with exit code $vm_rc"
con=$(tr -d '\r' <"$work/vm.log")
grep -E '^(guest:|GUEST-|WRITER-EXIT|READBACK|PATTERN-MD5|BLKCHECK)|run-in-vm:|I/O error|hung|blocked for more' <<<"$con" \
  | grep -v '^BLKCHECK: pause w' | sed 's/^/  | /' >&2 || true
qemu_lines=$(grep '^qemu-system' <<<"$con" | sed "s|$work|WORK|g" || true)
[ -z "$qemu_lines" ] || sed 's/^/  | /' <<<"$qemu_lines" >&2

# --- stop the last daemon (not our child after an upgrade) ---
if kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid"
  for _ in $(seq $((STOP_TIMEOUT * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then failure "virtiod $pid still runs ${STOP_TIMEOUT}s after SIGTERM"; kill -KILL "$pid"; fi
else
  failure "virtiod $pid had exited before SIGTERM"
fi
pid=
wait 2>/dev/null || true
[ ! -e "$sock" ] || failure "SIGTERM left the socket behind"

# --- verdicts ---
[ "$done_up" = "$UPGRADES" ] || failure "$done_up of $UPGRADES upgrades succeeded"
[ "$during" -ge "$MIN_DURING" ] || failure "only $during of $UPGRADES upgrades ran while the writers did, want $MIN_DURING (more STREAM_MB)"
wexit=$(sed -n 's/.*WRITER-EXIT: \([0-9]*\).*/\1/p' <<<"$con" | tail -1)
[ "$wexit" = 0 ] || failure "guest writers: ${wexit:-no WRITER-EXIT line}"
readback=$(grep -o 'READBACK: .*' <<<"$con" | tail -1 || true)
case "$readback" in "READBACK: match"*) ;; *) failure "guest read-back: ${readback:-no READBACK line}" ;; esac
grep -q '^BLKCHECK: stream: OK' <<<"$con" || failure "blkcheck's timed stream did not verify"
[ "$vm_rc" = 0 ] || failure "guest exit code $vm_rc"
want=$(md5sum <"$pat" | cut -d' ' -f1)
have=$(dd if="$img" bs=1M skip="$STREAM_OFF_MB" count="$STREAM_MB" status=none | md5sum | cut -d' ' -f1)
if [ "$have" = "$want" ]; then log "image OK: $STREAM_MB MiB at $STREAM_OFF_MB MiB hold the pattern, md5 $have"
else failure "image md5 $have != pattern $want"; fi
d=$(nocolor <"$dlog")
accepted=$(grep -c 'frontend connected' <<<"$d" || true)
[ "$accepted" = 1 ] || failure "the daemons accepted $accepted connections (QEMU reconnected): want 1"
gone=$(grep -c 'frontend disconnected' <<<"$d" || true)
taken=$(grep -c 'took the devices over' <<<"$d" || true)
[ "$taken" = "$done_up" ] || failure "$taken take-overs logged for $done_up upgrades"
handed=$(grep -c 'handed over: this process no longer serves the device' <<<"$d" || true)
[ "$handed" = "$done_up" ] || failure "$handed connections handed over for $done_up upgrades"
# the only disconnect is QEMU's at the end (the VM exited before the SIGTERM)
[ "$gone" -le 1 ] || failure "$gone frontend disconnects logged: the connection was dropped"
if grep -qiE 'Connection refused|reconnect|disconnect|vhost' <<<"$qemu_lines"; then
  failure "QEMU reported on its vhost-user connection (see above)"
fi
if grep -q 'seccomp: forbidden' <<<"$d"; then failure "a seccomp filter killed a daemon"; fi

# the guest-visible pause of each upgrade: blkcheck's longest gap in the 250 ms windows that
# overlap [the upgrade's start in the guest's uptime - 0.1 s, + 0.5 s] (the hand-over itself
# takes milliseconds from the ctl command on); the other windows' longest gaps for comparison
u0=$(sed -n 's/^BLKCHECK-T0 //p' <<<"$con")
if [ -n "$u0" ] && [ -n "$off" ] && [ -s "$work/upgrades.txt" ]; then
  grep -o '^BLKCHECK: pause w[0-9]*: .*' <<<"$con" | awk -v u0="$u0" -v off="$off" '
    FNR == NR { g = $2 - off - u0; lo[NR] = g - 0.1; hi[NR] = g + 0.5; n = NR; next }
    { st = $3; gsub(/[w:]/, "", st); st /= 1000; g = $0; sub(/.* max=/, "", g); sub(/ms.*/, "", g)
      near = 0
      for (i = 1; i <= n; i++) if (st + 0.25 > lo[i] && st < hi[i]) { near = 1; if (g + 0 > best[i] + 0) best[i] = g }
      if (!near) print "other", g }
    END { for (i = 1; i <= n; i++) print "upgrade", i, best[i] }' "$work/upgrades.txt" - >"$work/pauses.txt"
  others=$(awk '$1 == "other" {print $2}' "$work/pauses.txt" | sort -n)
  nother=$(wc -l <<<"$others")
  log "guest-visible pause per upgrade (blkcheck's longest gap between two write completions around it):" \
    "$(awk '$1 == "upgrade" {printf "%s ms ", $3}' "$work/pauses.txt");" \
    "elsewhere in the stream (250 ms windows): p50 $(sed -n "$(( (nother + 1) / 2 ))p" <<<"$others") ms," \
    "max $(tail -1 <<<"$others") ms of $nother"
fi
grep -o 'BLKCHECK: stream: [0-9].*' <<<"$con" | sed 's/^BLKCHECK: /  | /' >&2 || true
log "daemon side (freeze to the new process's confirmation): quiesced_ms =" \
  "$(grep -o 'quiesced_ms=[0-9]*' <<<"$d" | cut -d= -f2 | tr '\n' ' ')"

if [ ${#FAILS[@]} -gt 0 ]; then
  echo "--- VM console (last 40 lines):" >&2; tail -n 40 "$work/vm.log" >&2
  echo "--- daemon log (last 60 lines):" >&2; tail -n 60 <<<"$d" >&2
  log "FAIL: ${#FAILS[@]} check(s) failed: $(printf '%s; ' "${FAILS[@]}")"
  exit 1
fi
log "PASS: $done_up ctl upgrades under the $WRITERS-writer O_DIRECT stream, one vhost-user connection throughout; writers exit 0, read-back, blkcheck and image match (total $(elapsed)s)"
