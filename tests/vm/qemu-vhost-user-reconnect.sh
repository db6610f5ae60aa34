#!/usr/bin/env bash
# End-to-end check that a vhost-user-blk daemon survives SIGKILL + restart under a live QEMU
# guest without losing or replaying a request (vhost-user INFLIGHT_SHMFD: QEMU keeps the
# in-flight region across backend restarts and hands it to the new daemon with SET_INFLIGHT_FD).
#
# QEMU (TCG, tests/vm/run-in-vm.sh) boots a guest whose vhost-user-blk-pci disk is served by
# `virtiod serve --vhost-user SOCK --queues NUM_QUEUES IMG` over a chardev with reconnect-ms.
# The guest (tests/vm/guest/reconnect-writer.sh) writes a 48 MiB random pattern (made on the
# host, so the host can compare block by block) as 4 KiB O_DIRECT writes from WRITERS parallel
# dd processes (disjoint ranges: several requests in flight on several queues, which may
# complete out of order). Once the guest says it is writing, the host runs KILLS cycles of
#   wait (until QEMU has reconnected, the guest has completed writes through the new daemon,
#   KILL_GAP s have passed since the restart and the guest has completed k/(KILLS+1) of the
#   stream: the kills are spread over it) -> kill -KILL the daemon -> sleep KILL_PAUSE s ->
#   start the same command again on the same socket (virtiod replaces the stale socket file)
# logging each cycle and the guest's progress. It fails unless at least MIN_DURING kills hit
# the running writers, every writer exits 0, the guest reads the pattern back (O_DIRECT, page
# cache dropped), the last daemon exits 0 on SIGTERM, and the image holds exactly the pattern
# (md5 equal to the guest's PATTERN-MD5; on a mismatch the differing 4 KiB blocks are listed
# as ranges: zero = never written, "pattern block N blocks away" = a misplaced or stale write).
# A guest whose I/O stops (a request or a kick lost: the writers wait forever) is detected
# after STALL_TIMEOUT s without a completed request, and the VM is stopped (its console, with
# the guest kernel's errors, is still printed). Everything is bounded by timeouts.
# QEMU prints "vhost VQ N ring restore failed" and "Connection refused" on every kill (the dead
# daemon cannot answer GET_VRING_BASE; reconnect attempts before the restart): expected.
# Lines of the daemons' logs matching inflight|in-flight|resubmit are printed (not checked).
# Takes about 30 s (TCG guest boot ~10 s, stream ~12-25 s).
#
# usage: tests/vm/qemu-vhost-user-reconnect.sh [--keep]
#   --keep  keep the work directory (image, pattern, daemon logs, VM console, marker log)
# env: VIRTIOD (${CARGO_TARGET_DIR:-<repo>/target}/release/virtiod), NUM_QUEUES (2),
#      WRITERS (4; 1 = a single sequential stream, one request in flight), CHURN (1: one more
#      writer rewrites MiB [0, 8) with 256 KiB writes until the stream is done, so requests of
#      mixed sizes share the queues; the range must then hold the last pass; 0: only the
#      4 KiB stream), KILLS (5), MIN_DURING (3), KILL_GAP (0.5 s), KILL_PAUSE (0.7 s),
#      RECONNECT_MS (500),
#      VM_TIMEOUT (600 s for the whole VM), START_TIMEOUT (240 s until the guest writes),
#      STALL_TIMEOUT (30 s without guest I/O progress), RECONNECT_TIMEOUT (20 s for a restarted
#      daemon to listen and QEMU to reconnect), STOP_TIMEOUT (10 s to exit after SIGTERM),
#      IMG_MB (64), TMPDIR (work dir parent, /tmp; unix socket paths are limited to 107 bytes),
#      VM_CACHE (see run-in-vm.sh).
# The last line is "reconnect-test [T]: PASS: ..." or "reconnect-test [T]: FAIL: ..."; exit 0
# only on PASS.
#
# example:
#   VIRTIOD=target/release/virtiod tests/vm/qemu-vhost-user-reconnect.sh --keep
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
NUM_QUEUES=${NUM_QUEUES:-2} WRITERS=${WRITERS:-4} CHURN=${CHURN:-1} KILLS=${KILLS:-5} MIN_DURING=${MIN_DURING:-3}
KILL_GAP=${KILL_GAP:-0.5} KILL_PAUSE=${KILL_PAUSE:-0.7} RECONNECT_MS=${RECONNECT_MS:-500}
VM_TIMEOUT=${VM_TIMEOUT:-600} START_TIMEOUT=${START_TIMEOUT:-240} STALL_TIMEOUT=${STALL_TIMEOUT:-30}
RECONNECT_TIMEOUT=${RECONNECT_TIMEOUT:-20} STOP_TIMEOUT=${STOP_TIMEOUT:-10} IMG_MB=${IMG_MB:-64}
STREAM_OFF_MB=8 STREAM_MB=48
[ -x "$VIRTIOD" ] || { echo "no virtiod binary at $VIRTIOD (cargo build --release, or set VIRTIOD)" >&2; exit 2; }
[ "$IMG_MB" -ge $((STREAM_OFF_MB + STREAM_MB)) ] || { echo "IMG_MB must be >= $((STREAM_OFF_MB + STREAM_MB))" >&2; exit 2; }
command -v ss >/dev/null || { echo "needs ss (iproute2)" >&2; exit 2; }

T0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%.1f", $1-$2}'; }
log() { echo "reconnect-test [$(elapsed)s]: $*" >&2; }
FAILS=()
failure() { log "FAIL: $*"; FAILS+=("$*"); }
gt() { awk -v a="$1" -v b="$2" 'BEGIN{exit !(a>b)}'; }   # gt A B: A > B (decimals)
dt() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", a-b}'; }   # dt A B: A - B
nocolor() { sed 's/\x1b\[[0-9;]*m//g'; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vur-test.XXXXXX")
sock=$work/vu.sock img=$work/disk.img pat=$work/pattern.bin mark=$work/mark.log
server_pid= vm_pid= gen=0
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid" 2>/dev/null || true; fi
  if [ -n "$vm_pid" ] && kill -0 "$vm_pid" 2>/dev/null; then kill -KILL -- "-$vm_pid" 2>/dev/null || true; fi
  if [ "$KEEP" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the daemon: generation N logs to server.N.log ---
listening() { ss -xlnH 2>/dev/null | awk -v p="$sock" '$5 == p {f=1} END {exit !f}'; }
# connections accepted on the socket (QEMU connected)
connected() { ss -xnH state established 2>/dev/null | awk -v p="$sock" '$4 == p {f=1} END {exit !f}'; }
start_server() {
  "$VIRTIOD" serve --vhost-user "$sock" --queues "$NUM_QUEUES" "$img" >"$work/server.$gen.log" 2>&1 &
  server_pid=$!
  local i
  for i in $(seq $((RECONNECT_TIMEOUT * 20))); do
    listening && return 0
    kill -0 "$server_pid" 2>/dev/null || { nocolor <"$work/server.$gen.log" >&2; return 1; }
    sleep 0.05
  done
  return 1
}
print_server_logs() {
  local f
  for f in "$work"/server.*.log; do echo "--- $(basename "$f"):" >&2; nocolor <"$f" >&2; done
}

# --- the guest's live marker port: heartbeats "HB t=.. reads=N writes=N inflight=N" ---
hb_field() { tr -d '\r' <"$mark" 2>/dev/null | grep '^HB ' | tail -1 | sed -n "s/.* $1=\([0-9.]*\).*/\1/p"; }
marked() { tr -d '\r' <"$mark" 2>/dev/null | grep -q "^$1"; }
vm_alive() { kill -0 "$vm_pid" 2>/dev/null; }
# stop the VM: SIGTERM to run-in-vm.sh's `timeout`, which stops QEMU and lets run-in-vm.sh print
# the guest console; the whole session (run-in-vm.sh, timeout, QEMU) after 15 s
stop_vm() {
  local t
  t=$(pgrep -s "$vm_pid" -x timeout 2>/dev/null || true)
  [ -z "$t" ] || kill -TERM $t 2>/dev/null || true
  for _ in $(seq 150); do vm_alive || return 0; sleep 0.1; done
  kill -KILL -- "-$vm_pid" 2>/dev/null || kill -KILL "$vm_pid" 2>/dev/null || true
}
# guest I/O progress: the completed reads+writes of the last heartbeat, and when they last changed
last_io= last_change=0
io_stalled() {   # true when no guest request completed for STALL_TIMEOUT s
  local io; io="$(hb_field reads) $(hb_field writes)"
  if [ "$io" != "$last_io" ]; then last_io=$io last_change=$(elapsed); fi
  gt "$(echo "$(elapsed) $last_change" | awk '{print $1-$2}')" "$STALL_TIMEOUT"
}
stalled=
stall_failure() {
  stalled=1
  failure "guest I/O stalled: no request completed for ${STALL_TIMEOUT}s" \
    "(last heartbeat: $(tr -d '\r' <"$mark" | grep '^HB ' | tail -1)); stopping the VM"
  stop_vm
}

log "virtiod: $VIRTIOD ($(stat -c '%y' "$VIRTIOD" | cut -d. -f1))"
truncate -s "${IMG_MB}M" "$img"
head -c $((STREAM_MB * 1048576)) /dev/urandom >"$pat"
start_server || { print_server_logs; log "FAIL: daemon did not listen on $sock"; exit 1; }
log "daemon #0 pid $server_pid listening on $sock; booting the guest ($WRITERS writers, $NUM_QUEUES queues)"

: >"$mark"
vm_args=(--timeout "$VM_TIMEOUT" --env "WRITERS=$WRITERS" --env "CHURN=$CHURN" --env "STREAM_OFF_MB=$STREAM_OFF_MB"
  --env "STREAM_MB=$STREAM_MB" --file "$pat:/pattern.bin"
  --qemu-arg -chardev --qemu-arg "socket,id=vu0,path=$sock,reconnect-ms=$RECONNECT_MS"
  --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vu0,num-queues=$NUM_QUEUES"
  --qemu-arg -serial --qemu-arg mon:stdio --qemu-arg -serial --qemu-arg "file:$mark")
# the second serial port (guest ttyS1) is the guest's live marker port; naming it makes QEMU
# drop its default serial, so the console (ttyS0 on stdio, as -nographic gives) is named first
# own session: on a timeout or a stall the VM (timeout + QEMU) is stopped as a whole
setsid "$HERE/run-in-vm.sh" "${vm_args[@]}" "$HERE/guest/reconnect-writer.sh" >"$work/vm.log" 2>&1 &
vm_pid=$!

# --- wait for the guest to start writing ---
t_start=$(elapsed)
until marked RECONNECT-WRITER-START; do
  vm_alive || break
  if gt "$(elapsed)" "$(echo "$t_start $START_TIMEOUT" | awk '{print $1+$2}')"; then
    failure "the guest did not start writing within ${START_TIMEOUT}s"; stop_vm; break
  fi
  sleep 0.1
done
during=0 cycles=0
if marked RECONNECT-WRITER-START; then
  start_line=$(tr -d '\r' <"$mark" | grep '^RECONNECT-WRITER-START' | head -1)
  w0=$(sed -n 's/.*writes0=\([0-9]*\).*/\1/p' <<<"$start_line")
  blocks=$(sed -n 's/.*blocks=\([0-9]*\).*/\1/p' <<<"$start_line")
  log "guest: $start_line"
  # --- the kill cycles ---
  t_restart=$(elapsed) w_before=$w0 last_change=$(elapsed)
  for k in $(seq "$KILLS"); do
    target=$((blocks * k / (KILLS + 1)))
    # wait KILL_GAP s since the last restart, for writes completed through the new daemon and
    # for the guest's progress to pass the target (spreads the kills over the stream); stop the
    # cycles when the guest's I/O has stalled
    while vm_alive; do
      since=$(echo "$(elapsed) $t_restart" | awk '{print $1-$2}')
      w=$(hb_field writes); w=${w:-$w0}; done_w=$((w - w0))
      if marked WRITER-EXIT; then gt "$since" "$KILL_GAP" && break
      elif gt "$since" "$KILL_GAP" && [ "$done_w" -ge "$target" ] && [ "$w" -gt "${w_before:-$w0}" ]; then break; fi
      if io_stalled; then
        log "cycle $k: the guest's I/O stopped at $done_w/$blocks writes after restart $((k - 1))"
        stall_failure; break
      fi
      sleep 0.05
    done
    [ -z "$stalled" ] || break
    vm_alive || { log "cycle $k: the VM has already exited"; break; }
    if marked WRITER-EXIT; then state="writers done"; else state="writers running"; during=$((during+1)); fi
    cycles=$((cycles+1))
    w=$(hb_field writes); q=$(hb_field inflight)
    kill -KILL "$server_pid"; wait "$server_pid" 2>/dev/null || true
    t_kill=$(elapsed)
    log "cycle $k: SIGKILL daemon #$gen (pid $server_pid) at ${t_kill}s, $state, guest has completed" \
        "$(( ${w:-$w0} - w0 ))/$blocks writes, ${q:-?} requests in flight (last heartbeat)"
    sleep "$KILL_PAUSE"
    gen=$((gen+1))
    start_server || { print_server_logs; failure "cycle $k: restarted daemon #$gen did not listen within ${RECONNECT_TIMEOUT}s"; stop_vm; break; }
    t_listen=$(elapsed)
    until connected; do
      vm_alive || break
      gt "$(echo "$(elapsed) $t_listen" | awk '{print $1-$2}')" "$RECONNECT_TIMEOUT" && break
      sleep 0.05
    done
    t_restart=$(elapsed) w_before=$(hb_field writes)
    if connected; then
      log "cycle $k: daemon #$gen pid $server_pid listening $(dt "$t_listen" "$t_kill")s after the kill;" \
          "QEMU reconnected $(dt "$(elapsed)" "$t_listen")s later"
    elif vm_alive; then
      failure "cycle $k: QEMU did not reconnect to daemon #$gen within ${RECONNECT_TIMEOUT}s"
    fi
  done
fi
log "$cycles kill cycles, $during while the writers were running"

# --- wait for the guest to finish; stop it when its I/O makes no progress for STALL_TIMEOUT s ---
[ -n "$stalled" ] || last_change=$(elapsed)
while [ -z "$stalled" ] && vm_alive; do
  if ! marked GUEST-DONE && io_stalled; then stall_failure; break; fi
  sleep 0.2
done
set +e; wait "$vm_pid"; vm_rc=$?; set -e
vm_pid=
log "guest finished with exit code $vm_rc"
tr -d '\r' <"$work/vm.log" | grep -E '^(guest|GUEST-|WRITER-EXIT|READBACK|CHURN-|PATTERN-MD5)|run-in-vm:|not a head|hung|I/O error|blocked for more' \
  | sed 's/^/  | /' >&2 || true
# QEMU's own messages (each kill repeats them): counted
tr -d '\r' <"$work/vm.log" | grep '^qemu-system' | sed "s|$work|WORK|g" | sort | uniq -c | sort -rn | sed 's/^ */  | /' >&2 || true

# --- stop the last daemon with SIGTERM; it must exit 0 ---
if kill -0 "$server_pid" 2>/dev/null; then
  kill -TERM "$server_pid"
  for _ in $(seq $((STOP_TIMEOUT * 10))); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid"; wait "$server_pid" 2>/dev/null || true
    failure "daemon #$gen still running ${STOP_TIMEOUT}s after SIGTERM"
  else
    set +e; wait "$server_pid"; srv_rc=$?; set -e
    log "daemon #$gen exited with $srv_rc after SIGTERM"
    [ "$srv_rc" = 0 ] || failure "daemon #$gen exit status $srv_rc after SIGTERM"
  fi
else
  set +e; wait "$server_pid"; srv_rc=$?; set -e
  failure "daemon #$gen had already exited (status $srv_rc) before SIGTERM"
fi
server_pid=

# daemon log lines about in-flight requests (the text is the transport's; informational only)
inflight_lines=$(cd "$work" && grep -HiE 'inflight|in-flight|resubmit' server.*.log | nocolor || true)
if [ -n "$inflight_lines" ]; then log "daemon log lines about in-flight requests:"; sed 's/^/  | /' <<<"$inflight_lines" >&2; fi

# --- the guest's verdicts ---
con=$(tr -d '\r' <"$work/vm.log")
wexit=$(sed -n 's/.*WRITER-EXIT: \([0-9]*\).*/\1/p' <<<"$con" | tail -1)
readback=$(grep -o 'READBACK: .*' <<<"$con" | tail -1 || true)
pmd5=$(sed -n 's/.*PATTERN-MD5: \([0-9a-f]\{32\}\) offset_mib=.*/\1/p' <<<"$con" | tail -1)
if [ -z "$stalled" ]; then   # (a stall ends the cycles early: these would only repeat it)
  [ "$during" -ge "$MIN_DURING" ] || failure "only $during of $cycles kills landed while the writers were running (need $MIN_DURING)"
  [ -n "$wexit" ] || failure "no WRITER-EXIT line from the guest"
  [ -z "$wexit" ] || [ "$wexit" = 0 ] || failure "a guest writer exited with $wexit"
  case "$readback" in "READBACK: match"*) ;; *) failure "guest read-back: ${readback:-no READBACK line}" ;; esac
fi
[ "$vm_rc" = 0 ] || [ -n "$stalled" ] || failure "guest exit code $vm_rc"

# --- the image must hold exactly the pattern ---
want=$(md5sum <"$pat" | cut -d' ' -f1)
[ -z "$pmd5" ] || [ "$pmd5" = "$want" ] || failure "the guest's PATTERN-MD5 $pmd5 is not the pattern's md5 $want"
hmd5=$(dd if="$img" bs=1M skip="$STREAM_OFF_MB" count="$STREAM_MB" status=none | md5sum | cut -d' ' -f1)
if [ "$hmd5" = "$want" ]; then
  log "image OK: $STREAM_MB MiB at $STREAM_OFF_MB MiB hold the pattern, md5 $hmd5"
else
  # which 4 KiB blocks differ, and what they hold instead, as ranges of the stream's blocks
  mkdir -p "$work/blk/p" "$work/blk/i"
  split -b 4096 -d -a 5 "$pat" "$work/blk/p/"
  dd if="$img" bs=1M skip="$STREAM_OFF_MB" count="$STREAM_MB" status=none | split -b 4096 -d -a 5 - "$work/blk/i/"
  zero=$(head -c 4096 /dev/zero | md5sum | cut -d' ' -f1)
  declare -A where=()
  while read -r h f; do where[$h]=$((10#${f##*/})); done < <(cd "$work/blk/p" && md5sum ./*)
  nbad=0 nzero=0 nother=0 ranges=() r_first= r_last= r_what=
  flush_range() { [ -z "$r_first" ] || ranges+=("blocks $r_first-$r_last: $r_what"); }
  while read -r a f b; do
    [ "$a" = "$b" ] && continue
    nbad=$((nbad+1)); n=$((10#${f##*/}))
    if [ "$b" = "$zero" ]; then nzero=$((nzero+1)); what="zero (not written)"
    elif [ -n "${where[$b]:-}" ]; then nother=$((nother+1)); what="pattern block $((where[$b] - n)) blocks away (misplaced or stale write)"
    else nother=$((nother+1)); what="unknown bytes"; fi
    if [ -n "$r_first" ] && [ "$n" = $((r_last + 1)) ] && [ "$what" = "$r_what" ]; then r_last=$n
    else flush_range; r_first=$n r_last=$n r_what=$what; fi
  done < <(paste <(cd "$work/blk/p" && md5sum ./* | awk '{print $1, $2}') <(cd "$work/blk/i" && md5sum ./* | awk '{print $1}'))
  flush_range
  rm -rf "$work/blk"
  msg="image md5 $hmd5 != pattern $want: $nbad of $((STREAM_MB * 256)) 4 KiB blocks differ ($nzero zero, $nother other)"
  if [ -n "$stalled" ]; then log "$msg (the stream did not finish)"; else failure "$msg"; fi
  printf '  | %s\n' "${ranges[@]:0:20}" >&2
  [ ${#ranges[@]} -le 20 ] || echo "  | ... $(( ${#ranges[@]} - 20 )) more ranges" >&2
fi
# the churn range holds the last pass: the pattern's MiB [src_mib, +size_mib)
churn_line=$(grep -o 'CHURN-MD5: .*' <<<"$con" | tail -1 || true)
if [ "$CHURN" != 0 ] && [ -z "$stalled" ]; then
  if [ -z "$churn_line" ]; then failure "no CHURN-MD5 line from the guest"
  else
    read -r cmd5 coff csize csrc < <(sed -n 's/CHURN-MD5: \([0-9a-f]*\) offset_mib=\([0-9]*\) size_mib=\([0-9]*\) src_mib=\([0-9]*\).*/\1 \2 \3 \4/p' <<<"$churn_line")
    cwant=$(dd if="$pat" bs=1M skip="$csrc" count="$csize" status=none | md5sum | cut -d' ' -f1)
    chave=$(dd if="$img" bs=1M skip="$coff" count="$csize" status=none | md5sum | cut -d' ' -f1)
    [ "$cmd5" = "$cwant" ] || failure "the guest's CHURN-MD5 $cmd5 is not the pattern's MiB [$csrc, +$csize) $cwant"
    if [ "$chave" = "$cwant" ]; then log "image churn range OK: ${churn_line#CHURN-MD5: }"
    else failure "image churn range [$coff MiB, +$csize MiB): md5 $chave, last pass wrote $cwant"; fi
  fi
fi

if [ ${#FAILS[@]} -gt 0 ]; then
  echo "--- VM console (last 60 lines):" >&2; tail -n 60 "$work/vm.log" >&2
  echo "--- marker port (last 10 lines):" >&2; tr -d '\r' <"$mark" | tail -n 10 >&2
  print_server_logs
  log "FAIL: ${#FAILS[@]} check(s) failed: $(printf '%s; ' "${FAILS[@]}")"
  exit 1
fi
log "PASS: $during/$cycles SIGKILL+restart cycles during the $WRITERS-writer O_DIRECT stream; writers exit 0, read-back and image match (total $(elapsed)s)"
