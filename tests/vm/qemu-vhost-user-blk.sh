#!/usr/bin/env bash
# End-to-end check of a vhost-user-blk server with a real guest kernel as its frontend:
# QEMU (TCG) boots tests/vm/run-in-vm.sh's guest with a vhost-user-blk-pci disk served by the
# server under test; the guest (tests/vm/guest/blk-roundtrip.sh) writes/reads a random O_DIRECT
# pattern, runs mkfs.ext4/mount/remount, optionally fio with verify; then the server is stopped
# with SIGTERM and the host checks the image file holds the same bytes (dd + md5, debugfs, e2fsck).
#
# usage: tests/vm/qemu-vhost-user-blk.sh [--fio] [--keep] [SERVER_CMD [ARG]...]
#   SERVER_CMD and its ARGs may contain {sock} (the unix socket path), {img} (the raw image
#   file) and {queues} (NUM_QUEUES);
#   without SERVER_CMD the env var SERVER is used: a shell command line with the same
#   placeholders, or a preset name:
#     qsd      (default) qemu-storage-daemon ... --export type=vhost-user-blk,...,writable=on
#     virtiod  $VIRTIOD serve --vhost-user {sock} --queues {queues} {img}
#              (VIRTIOD defaults to ${CARGO_TARGET_DIR:-<repo>/target}/release/virtiod)
#   --fio   also run fio randwrite+verify in the guest (adds ~3 s boot for fio's libraries)
#   --keep  keep the work directory (image, server log, VM console log)
# env: NUM_QUEUES (1; must not exceed what the server offers), IMG_MB (64), VM_TIMEOUT (300 s),
#      STOP_TIMEOUT (10 s to exit after SIGTERM), SERVER_EXIT_OK (accepted exit statuses of the
#      server after SIGTERM, "0 143"; 143 = killed by the signal, e.g. a `bash -c` wrapper), TMPDIR (work dir parent, /tmp; keep it short:
#      unix socket paths are limited to 107 bytes), VM_CACHE (see run-in-vm.sh).
# Exit 0 when every check passes; non-zero on any mismatch or failure.
#
# examples:
#   tests/vm/qemu-vhost-user-blk.sh
#   SERVER=virtiod tests/vm/qemu-vhost-user-blk.sh --fio
#   tests/vm/qemu-vhost-user-blk.sh target/release/virtiod serve --vhost-user {sock} {img}
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FIO=0 KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --fio) FIO=1; shift ;;
    --keep) KEEP=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 0 ;;
    *) break ;;
  esac
done
NUM_QUEUES=${NUM_QUEUES:-1} IMG_MB=${IMG_MB:-64} VM_TIMEOUT=${VM_TIMEOUT:-300} STOP_TIMEOUT=${STOP_TIMEOUT:-10}
[ "$IMG_MB" -ge 64 ] || { echo "IMG_MB must be >= 64" >&2; exit 2; }

T0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%.1f", $1-$2}'; }
log() { echo "vhost-user-blk-test [$(elapsed)s]: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vub-test.XXXXXX")
sock=$work/vhost-user-blk.sock img=$work/disk.img
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid" 2>/dev/null || true; fi
  if [ "$KEEP" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- the server command, placeholders substituted ---
subst() { local s=${1//\{sock\}/$sock}; s=${s//\{queues\}/$NUM_QUEUES}; printf '%s' "${s//\{img\}/$img}"; }
if [ $# -gt 0 ]; then
  cmd=(); for a in "$@"; do cmd+=("$(subst "$a")"); done
else
  case "${SERVER:-qsd}" in
    qsd) line="qemu-storage-daemon --blockdev driver=file,node-name=f0,filename={img}"
      line+=" --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on,num-queues={queues}" ;;
    virtiod) line="${VIRTIOD:-${CARGO_TARGET_DIR:-$HERE/../../target}/release/virtiod} serve --vhost-user {sock} --queues {queues} --serial vu-serial-7 {img}"; EXPECT_SERIAL=vu-serial-7 ;;
    *) line=$SERVER ;;
  esac
  line=$(subst "$line")
  cmd=(bash -c "exec $line")
fi

truncate -s "${IMG_MB}M" "$img"
log "server: ${cmd[*]}"
"${cmd[@]}" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 150); do
  [ -S "$sock" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; die "server exited before creating $sock"; }
  sleep 0.1
done
[ -S "$sock" ] || { cat "$work/server.log" >&2; die "no socket $sock after 15 s"; }
log "server pid $server_pid listening on $sock; booting the guest"

vm_args=(--timeout "$VM_TIMEOUT" --env "FIO=$FIO" --env "EXPECT_SERIAL=${EXPECT_SERIAL:-}"
  --qemu-arg -chardev --qemu-arg "socket,id=vu0,path=$sock"
  --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vu0,num-queues=$NUM_QUEUES")
[ "$FIO" = 0 ] || vm_args+=(--with-fio)
# the VM runs in its own session so that it can be stopped as a whole (timeout + QEMU) if the
# server dies under it: a guest waiting on a dead vhost-user backend would hang until VM_TIMEOUT
setsid "$HERE/run-in-vm.sh" "${vm_args[@]}" "$HERE/guest/blk-roundtrip.sh" >"$work/vm.log" 2>&1 &
vm_pid=$! server_died=
while kill -0 "$vm_pid" 2>/dev/null; do
  if [ -z "$server_died" ] && ! kill -0 "$server_pid" 2>/dev/null; then server_died=$(elapsed); fi
  if [ -n "$server_died" ] && awk -v a="$(elapsed)" -v b="$server_died" 'BEGIN{exit !(a-b>5)}'; then
    log "server died at ${server_died}s while the guest was running; stopping the VM"
    kill -TERM -- "-$vm_pid" 2>/dev/null || kill -TERM "$vm_pid" 2>/dev/null || true
    break
  fi
  sleep 0.2
done
set +e; wait "$vm_pid"; vm_rc=$?; set -e
grep -E '^(guest:|GUEST-|PATTERN-MD5|FILE-MD5)|run-in-vm:' "$work/vm.log" | sed 's/^/  | /' >&2 || true
T_VM=$(elapsed)
log "guest finished with exit code $vm_rc"

# --- stop the server with SIGTERM; it must exit on its own ---
if kill -0 "$server_pid" 2>/dev/null; then
  kill -TERM "$server_pid"
  for _ in $(seq $((STOP_TIMEOUT * 10))); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=
    cat "$work/server.log" >&2; die "server still running ${STOP_TIMEOUT}s after SIGTERM"
  fi
  set +e; wait "$server_pid"; srv_rc=$?; set -e
  log "server exited with $srv_rc after SIGTERM"
else
  set +e; wait "$server_pid"; srv_rc=$?; set -e
  log "server had already exited (status $srv_rc) when the guest finished"
fi
server_pid=
case " ${SERVER_EXIT_OK:-0 143} " in
  *" $srv_rc "*) ;;
  *) tail -n 30 "$work/vm.log" >&2; echo "--- server log:" >&2; cat "$work/server.log" >&2
     die "server exit status $srv_rc (accepted: ${SERVER_EXIT_OK:-0 143})" ;;
esac

if [ "$vm_rc" != 0 ]; then
  cat "$work/vm.log" >&2; echo "--- server log:" >&2; cat "$work/server.log" >&2
  die "guest exit code $vm_rc"
fi

# --- the image must hold what the guest wrote ---
con=$(tr -d '\r' < "$work/vm.log")
read -r pmd5 poff psize < <(printf '%s\n' "$con" |
  sed -n 's/.*PATTERN-MD5: \([0-9a-f]\{32\}\) offset_mib=\([0-9]*\) size_mib=\([0-9]*\).*/\1 \2 \3/p' | tail -1) \
  || die "no PATTERN-MD5 line from the guest"
hmd5=$(dd if="$img" bs=1M skip="$poff" count="$psize" status=none | md5sum | cut -d' ' -f1)
[ "$hmd5" = "$pmd5" ] || die "image bytes [$poff MiB, +$psize MiB): md5 $hmd5, guest wrote $pmd5"
log "image pattern OK: $psize MiB at $poff MiB, md5 $hmd5"
fmd5=$(printf '%s\n' "$con" | sed -n 's/.*FILE-MD5: \([0-9a-f]\{32\}\) path=\([^ ]*\).*/\1 \2/p' | tail -1)
if [ -n "$fmd5" ]; then
  read -r fwant fpath <<<"$fmd5"
  e2fsck -fn "$img" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log" >&2; die "host e2fsck -fn on the image"; }
  fgot=$(debugfs -R "cat $fpath" "$img" 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$fgot" = "$fwant" ] || die "ext4 file $fpath in the image: md5 $fgot, guest wrote $fwant"
  log "image ext4 OK: e2fsck clean, $fpath md5 $fgot"
fi
log "PASS (guest run ${T_VM}s, total $(elapsed)s)"
