#!/usr/bin/env bash
# Stop a cluster started by tests/ceph/start-cluster.sh DIR and remove DIR.
# usage: tests/ceph/stop-cluster.sh DIR
set -uo pipefail
dir=${1:?usage: $0 DIR}
[ -d "$dir" ] || exit 0
pids=()
for pidfile in "$dir"/run/*.pid; do
  [ -e "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  # Only our daemons: the pid's command line must name this cluster's config.
  if grep -qa -- "$dir/ceph.conf" "/proc/$pid/cmdline" 2>/dev/null; then
    kill "$pid" 2>/dev/null && pids+=("$pid")
  fi
done
for pid in "${pids[@]}"; do
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
done
rm -rf "$dir"
