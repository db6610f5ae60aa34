#!/usr/bin/env bash
# End-to-end check of virtiod's virtio-net over vhost-user with a real guest kernel as its
# frontend, on a tap port: virtiod serves `net:tap=TAP` on a unix socket, the host side of the
# tap gets HOST_IP/24 and a busybox httpd; QEMU (TCG) boots tests/vm/run-in-vm.sh's guest with
# `-netdev vhost-user` + `-device virtio-net-pci` on that socket, and the guest
# (tests/vm/guest/net-tap.sh) takes GUEST_IP/24, pings the host, downloads a file of FILE_MB
# MiB and uploads one; both sha256 are compared on the host. Run once per offload mode:
#   on   the guest accepts CSUM/GUEST_CSUM/HOST_TSO4/6/GUEST_TSO4/6 (checked in the features
#        it negotiated); the frames the guest sent must average above 1514 bytes (TCP GSO
#        frames went through whole);
#   off  QEMU turns every offload off (csum=off,guest_csum=off,...): plain frames only;
#   mq   offloads on, two queue pairs (virtiod --queues 2, QEMU queues=2 and mq=on; the guest
#        has 2 CPUs, so it uses both pairs): the MQ bit must be negotiated.
# After each run virtiod is stopped with SIGTERM and must exit cleanly, and the tap it
# created must be gone.
#
# usage: tests/vm/qemu-vhost-user-net.sh [--keep] [MODE...]   (MODE: on, off, mq; default all)
# env: VIRTIOD (default ${CARGO_TARGET_DIR:-<repo>/target}/release/virtiod), TAP (vt0),
#      HOST_IP (198.51.100.1), GUEST_IP (198.51.100.2), FILE_MB (4), VM_TIMEOUT (300 s),
#      TMPDIR (work dir parent, /tmp), VM_CACHE (see run-in-vm.sh). Needs root (the tap).
# Exit 0 when every check passes; non-zero on any mismatch or failure.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 0 ;;
    *) break ;;
  esac
done
MODES=("$@"); [ ${#MODES[@]} -gt 0 ] || MODES=(on off mq)
VIRTIOD=${VIRTIOD:-${CARGO_TARGET_DIR:-$HERE/../../target}/release/virtiod}
TAP=${TAP:-vt0} HOST_IP=${HOST_IP:-198.51.100.1} GUEST_IP=${GUEST_IP:-198.51.100.2}
FILE_MB=${FILE_MB:-4} VM_TIMEOUT=${VM_TIMEOUT:-300} PORT=8080
MAC=52:54:00:12:34:56

T0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%.1f", $1-$2}'; }
log() { echo "vhost-user-net-test [$(elapsed)s]: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (creates the tap $TAP)"
[ -x "$VIRTIOD" ] || die "no virtiod binary at $VIRTIOD: cargo build --release -p virtiod"
[ -x /bin/busybox ] || die "no /bin/busybox (httpd): apt-get install busybox-static"
[ ! -e "/sys/class/net/$TAP" ] || die "an interface $TAP exists already: give TAP=another name"

work=$(mktemp -d "${TMPDIR:-/tmp}/vun-test.XXXXXX")
server_pid= httpd_pid=
cleanup() {
  for p in $httpd_pid $server_pid; do kill -KILL "$p" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# What the guest downloads, and the CGI that takes its upload and answers with the sha256.
mkdir -p "$work/www/cgi-bin"
dd if=/dev/urandom of="$work/www/blob" bs=1M count="$FILE_MB" status=none
want_down=$(sha256sum <"$work/www/blob" | cut -d' ' -f1)
cat >"$work/www/cgi-bin/up" <<EOF
#!/bin/sh
head -c "\$CONTENT_LENGTH" > "$work/up.bin"
printf 'Content-Type: text/plain\r\n\r\n'
sha256sum < "$work/up.bin" | cut -d' ' -f1
EOF
chmod +x "$work/www/cgi-bin/up"

# bit N of the guest's negotiated features ("0101...", bit 0 first)
bit() { printf '%s' "${1:$2:1}"; }

run_mode() {
  local mode=$1 dev_opts netdev_opts= pairs=1 sock=$work/net-$1.sock ctl=$work/ctl-$1.sock
  case "$mode" in
    on) dev_opts= ;;
    off) dev_opts=",csum=off,guest_csum=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off" ;;
    mq) pairs=2 dev_opts=",mq=on,vectors=6" netdev_opts=",queues=2" ;;
    *) die "unknown mode $mode (on, off, mq)" ;;
  esac
  rm -f "$work/up.bin"
  "$VIRTIOD" serve --vhost-user "$sock" --control "$ctl" --mac "$MAC" --queues "$pairs" "net:tap=$TAP" \
    >"$work/server-$mode.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 150); do
    [ -S "$sock" ] && [ -e "/sys/class/net/$TAP" ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server-$mode.log" >&2; die "virtiod exited early"; }
    sleep 0.1
  done
  [ -S "$sock" ] || { cat "$work/server-$mode.log" >&2; die "no socket $sock after 15 s"; }
  ip addr add "$HOST_IP/24" dev "$TAP"
  ip link set "$TAP" up
  /bin/busybox httpd -f -p "$HOST_IP:$PORT" -h "$work/www" &
  httpd_pid=$!
  log "[$mode] virtiod pid $server_pid on $sock, tap $TAP $HOST_IP; booting the guest"

  local vm_rc attempt
  for attempt in 1 2; do
    set +e
    setsid "$HERE/run-in-vm.sh" --timeout "$VM_TIMEOUT" \
      --env "HOST_IP=$HOST_IP" --env "GUEST_IP=$GUEST_IP" --env "PORT=$PORT" --env "FILE_MB=$FILE_MB" \
      --qemu-arg -chardev --qemu-arg "socket,id=vn0,path=$sock" \
      --qemu-arg -netdev --qemu-arg "vhost-user,id=n0,chardev=vn0$netdev_opts" \
      --qemu-arg -device --qemu-arg "virtio-net-pci,netdev=n0,mac=$MAC$dev_opts" \
      "$HERE/guest/net-tap.sh" >"$work/vm-$mode.log" 2>&1
    vm_rc=$?
    set -e
    # TCG on a loaded host: the guest kernel may panic at boot (timer check) before it
    # reaches the script; boot once more then (the daemon takes the new connection).
    if [ "$vm_rc" = 125 ] && [ "$attempt" = 1 ] && ! grep -q 'run-in-vm: guest up' "$work/vm-$mode.log" \
       && grep -q 'Kernel panic' "$work/vm-$mode.log"; then
      log "[$mode] the guest kernel panicked while booting (TCG timer check); booting again"
      continue
    fi
    break
  done
  grep -E '^(guest:|GUEST-|FEATURES|DOWN-|UP-)|run-in-vm:' "$work/vm-$mode.log" | sed 's/^/  | /' >&2 || true
  local stats
  stats=$("$VIRTIOD" ctl --control "$ctl" stats 2>&1) || stats="(ctl stats failed: $stats)"
  log "[$mode] port: $stats"
  kill "$httpd_pid" 2>/dev/null || true; wait "$httpd_pid" 2>/dev/null || true; httpd_pid=
  kill -TERM "$server_pid"
  local srv_rc=0
  for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$server_pid" 2>/dev/null && { cat "$work/server-$mode.log" >&2; die "virtiod still running 10 s after SIGTERM"; }
  wait "$server_pid" || srv_rc=$?
  server_pid=
  if [ "$vm_rc" != 0 ]; then
    cat "$work/vm-$mode.log" >&2; echo "--- virtiod log:" >&2; cat "$work/server-$mode.log" >&2
    die "[$mode] guest exit code $vm_rc"
  fi
  [ "$srv_rc" = 0 ] || { cat "$work/server-$mode.log" >&2; die "[$mode] virtiod exit status $srv_rc after SIGTERM"; }
  [ ! -e "/sys/class/net/$TAP" ] || die "[$mode] the tap $TAP is still there after virtiod stopped"

  local con feats down up got_up
  con=$(tr -d '\r' <"$work/vm-$mode.log")
  feats=$(printf '%s\n' "$con" | sed -n 's/^FEATURES: \([01]*\).*/\1/p' | tail -1)
  down=$(printf '%s\n' "$con" | sed -n 's/^DOWN-SHA256: \([0-9a-f]*\).*/\1/p' | tail -1)
  up=$(printf '%s\n' "$con" | sed -n 's/^UP-SHA256: \([0-9a-f]*\).*/\1/p' | tail -1)
  [ "$down" = "$want_down" ] || die "[$mode] the guest downloaded sha256 '$down', the host served $want_down"
  got_up=$(sha256sum <"$work/up.bin" | cut -d' ' -f1)
  [ "$up" = "$got_up" ] || die "[$mode] the host received sha256 $got_up, the guest sent '$up'"
  # CSUM 0, GUEST_CSUM 1, GUEST_TSO4 7, GUEST_TSO6 8, HOST_TSO4 11, HOST_TSO6 12
  local b want=1; [ "$mode" != off ] || want=0
  for b in 0 1 7 8 11 12; do
    [ "$(bit "$feats" $b)" = "$want" ] || die "[$mode] feature bit $b is '$(bit "$feats" $b)' in '$feats', want $want"
  done
  # MQ is bit 22
  want=0; [ "$mode" != mq ] || want=1
  [ "$(bit "$feats" 22)" = "$want" ] || die "[$mode] MQ (bit 22) is '$(bit "$feats" 22)', want $want"
  if [ "$mode" != off ]; then
    local tx_packets tx_bytes
    read -r tx_packets tx_bytes < <(printf '%s\n' "$stats" | sed -n 's/.* tx=\([0-9]*\)\/\([0-9]*\)B.*/\1 \2/p')
    [ -n "${tx_packets:-}" ] && [ "$tx_packets" -gt 0 ] || die "[$mode] no tx counters in: $stats"
    [ $((tx_bytes / tx_packets)) -gt 1514 ] ||
      die "[$mode] the guest's frames average $((tx_bytes / tx_packets)) bytes: no GSO frame went through"
    log "[$mode] the guest's frames average $((tx_bytes / tx_packets)) bytes (TSO frames passed whole)"
  fi
  log "[$mode] ping, download and upload of $FILE_MB MiB verified (sha256 $want_down / $got_up)"
}

for m in "${MODES[@]}"; do run_mode "$m"; done
log "PASS (${MODES[*]}; total $(elapsed)s)"
