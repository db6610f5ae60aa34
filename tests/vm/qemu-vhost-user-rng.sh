#!/usr/bin/env bash
# The example device examples/virtio-rng with a real guest kernel as its frontend: QEMU (TCG)
# boots tests/vm/run-in-vm.sh's guest with `-device vhost-user-rng-pci` on virtiod-rng's socket;
# the guest (tests/vm/guest/rng-read.sh) finds the PCI device, checks that
# /sys/class/misc/hw_random/rng_current names virtio_rng and reads 4 KiB from /dev/hwrng twice;
# then virtiod-rng gets SIGTERM and must exit 0 and remove its socket.
#
# usage: tests/vm/qemu-vhost-user-rng.sh [--keep]
# env: VIRTIOD_RNG (${CARGO_TARGET_DIR:-<repo>/target}/release/virtiod-rng; built if missing),
#      VM_TIMEOUT (300 s), TMPDIR (/tmp), VM_CACHE (see run-in-vm.sh),
#      VIRTIOD_NO_SKIP=1 (fail instead of skipping), VIRTIOD_SKIP_LOG (file the skip is logged to).
#
# The guest needs the virtio_rng driver: Debian's cloud kernel builds it as a module
# (CONFIG_HW_RANDOM_VIRTIO=m, file virtio-rng.ko), which run-in-vm.sh loads (it is in its
# MODULES list). A guest image without it would report SKIPPED for the /dev/hwrng part
# (a failure under VIRTIOD_NO_SKIP=1, as in CI).
# Exit 0 when every check passes (or the hwrng part is skipped); non-zero otherwise.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KEEP=0
case "${1:-}" in
  --keep) KEEP=1 ;;
  "") ;;
  -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 0 ;;
  *) echo "usage: $0 [--keep]" >&2; exit 2 ;;
esac
VM_TIMEOUT=${VM_TIMEOUT:-300}
RNG=${VIRTIOD_RNG:-${CARGO_TARGET_DIR:-$HERE/../../target}/release/virtiod-rng}

T0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $T0" | awk '{printf "%.1f", $1-$2}'; }
log() { echo "vhost-user-rng-test [$(elapsed)s]: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

if [ ! -x "$RNG" ]; then
  log "building virtiod-rng"
  (cd "$HERE/../.." && cargo build --release -q -p virtiod-example-rng)
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vur-test.XXXXXX")
sock=$work/rng.sock server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid" 2>/dev/null || true; fi
  if [ "$KEEP" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

"$RNG" --vhost-user "$sock" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 150); do
  [ -S "$sock" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; die "virtiod-rng exited before creating $sock"; }
  sleep 0.1
done
[ -S "$sock" ] || { cat "$work/server.log" >&2; die "no socket $sock after 15 s"; }
log "virtiod-rng pid $server_pid listening on $sock; booting the guest"

set +e
setsid "$HERE/run-in-vm.sh" --timeout "$VM_TIMEOUT" \
  --qemu-arg -chardev --qemu-arg "socket,id=rng0,path=$sock" \
  --qemu-arg -device --qemu-arg "vhost-user-rng-pci,chardev=rng0" \
  "$HERE/guest/rng-read.sh" >"$work/vm.log" 2>&1
vm_rc=$?
set -e
grep -E '^guest:|run-in-vm:' "$work/vm.log" | sed 's/^/  | /' >&2 || true
log "guest finished with exit code $vm_rc"

kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; die "virtiod-rng died while the guest ran"; }
kill -TERM "$server_pid"
for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$server_pid" 2>/dev/null && { cat "$work/server.log" >&2; die "virtiod-rng still running 10 s after SIGTERM"; }
set +e; wait "$server_pid"; srv_rc=$?; set -e
server_pid=
[ "$srv_rc" = 0 ] || { cat "$work/server.log" >&2; die "virtiod-rng exit status $srv_rc after SIGTERM"; }
[ ! -e "$sock" ] || die "virtiod-rng left its socket $sock"
log "virtiod-rng exited 0 after SIGTERM and removed its socket"

case "$vm_rc" in
  0) log "PASS (total $(elapsed)s)" ;;
  77)
    reason="qemu-vhost-user-rng: the guest kernel image has no virtio_rng driver (add virtio-rng to MODULES in tests/vm/run-in-vm.sh)"
    [ "${VIRTIOD_NO_SKIP:-0}" != 1 ] || die "VIRTIOD_NO_SKIP=1 but $reason"
    echo "SKIPPED: $reason" >&2
    [ -z "${VIRTIOD_SKIP_LOG:-}" ] || echo "vm::qemu-vhost-user-rng: SKIPPED: $reason" >> "$VIRTIOD_SKIP_LOG"
    log "device seen by the guest, host checks passed; /dev/hwrng not checked (total $(elapsed)s)" ;;
  *) cat "$work/vm.log" >&2; echo "--- server log:" >&2; cat "$work/server.log" >&2
     die "guest exit code $vm_rc" ;;
esac
