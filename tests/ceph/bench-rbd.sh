#!/usr/bin/env bash
# virtiod vs qemu-storage-daemon (driver=rbd, from qemu-block-extra) on the same RBD image of a
# throwaway single-node cluster (start-cluster.sh), driven by the same client (virtiod-bench).
# Prints one row per workload and server (median IOPS over rounds) and the ratio; asserts
# nothing. Figures on a memstore OSD measure the client side (librbd + the server), not disks.
#
# Needs qemu-block-extra from the suite of the installed QEMU (scripts/lib-apt.sh: usually
# bookworm-backports): apt-get install -t bookworm-backports qemu-block-extra
#
# usage: bash tests/ceph/bench-rbd.sh            # ROUNDS=3 SECONDS_PER_RUN=5 by default
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-5}
QSD=${QSD:-qemu-storage-daemon}
cargo build --release -q -p virtiod -p virtiod-bench
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
VIRTIOD=$target/release/virtiod
CLIENT=$target/release/virtiod-bench
work=$(mktemp -d /tmp/virtiod-bench-rbd.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  bash tests/ceph/stop-cluster.sh "$work/cluster"
  rm -rf "$work"
}
trap cleanup EXIT
bash tests/ceph/start-cluster.sh "$work/cluster" >/dev/null 2>"$work/start.err" ||
  { cat "$work/start.err" >&2; exit 1; }
conf=$work/cluster/ceph.conf
rbd -c "$conf" create rbd/bench --size 256M
# Fill the image so reads hit written objects.
rbd -c "$conf" bench --io-type write --io-size 4M --io-total 256M --io-pattern seq rbd/bench >/dev/null

start() { # start virtiod|qsd SOCKET
  rm -f "$2"
  case $1 in
    virtiod) "$VIRTIOD" serve --vhost-user "$2" "rbd:rbd/bench?conf=$conf" </dev/null >"$work/server.log" 2>&1 & ;;
    qsd) "$QSD" --blockdev "driver=rbd,node-name=n0,pool=rbd,image=bench,conf=$conf,user=admin" \
      --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$2,writable=on" \
      </dev/null >"$work/server.log" 2>&1 & ;;
  esac
  pid=$!
  for _ in $(seq 200); do [ -S "$2" ] && return 0; sleep 0.05; done
  echo "bench-rbd: $1 did not start:" >&2; tail -5 "$work/server.log" >&2; exit 1
}

workloads=("qd1-randread --queue-depth 1 --rw randread" "qd32-randread --queue-depth 32 --rw randread"
  "qd1-randwrite --queue-depth 1 --rw randwrite" "qd32-randwrite --queue-depth 32 --rw randwrite")
: >"$work/results"
for round in $(seq "$ROUNDS"); do
  for wl in "${workloads[@]}"; do
    read -r name args <<<"$wl"
    for kind in virtiod qsd; do
      start "$kind" "$work/vu.sock"
      # shellcheck disable=SC2086
      out=$("$CLIENT" --socket "$work/vu.sock" --seconds "$SECS" --block-size 4096 $args)
      kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
      iops=$(sed -n 's/.*"iops":\([0-9.]*\).*/\1/p' <<<"$out")
      echo "$name $kind $iops" >>"$work/results"
      echo "bench-rbd: round $round $name $kind iops=$iops" >&2
    done
  done
done
echo "RBD 4 KiB, $ROUNDS rounds x ${SECS}s, median IOPS (memstore OSD on this host)"
for wl in "${workloads[@]}"; do
  read -r name _ <<<"$wl"
  v=$(awk -v n="$name" '$1 == n && $2 == "virtiod" { print $3 }' "$work/results" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  q=$(awk -v n="$name" '$1 == n && $2 == "qsd" { print $3 }' "$work/results" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  awk -v n="$name" -v v="$v" -v q="$q" 'BEGIN { printf "%-16s virtiod %9.0f  qsd %9.0f  virtiod/qsd %.2f\n", n, v, q, q ? v / q : 0 }'
done
