#!/usr/bin/env bash
# Start a throwaway single-node Ceph cluster for the RBD tests: one monitor and one OSD on
# memstore (RAM, nothing on disk but the monitor's store), cephx on, loopback only, a pool
# `rbd` initialised for RBD images. No manager: RBD I/O does not need one.
#
# usage: tests/ceph/start-cluster.sh DIR     # DIR is created; everything lives under it
#        tests/ceph/stop-cluster.sh DIR      # stops the daemons and removes DIR
#
# It writes DIR/ceph.conf and DIR/ceph.client.admin.keyring; use them with the ceph tools:
#   rbd -c DIR/ceph.conf create rbd/disk --size 64M
#   virtiod serve --socket /tmp/vu.sock --image "rbd:rbd/disk?conf=DIR/ceph.conf"
# The monitor listens on 127.0.0.1 on a free port (msgr2), the OSD on 127.0.0.1 too.
# Needs Debian's ceph-mon, ceph-osd and ceph-common (scripts/setup.sh installs them).
set -euo pipefail

dir=${1:?usage: $0 DIR}
for tool in ceph-mon ceph-osd ceph-authtool monmaptool ceph rados rbd; do
  command -v "$tool" >/dev/null || {
    echo "start-cluster: $tool not found: install ceph-mon ceph-osd ceph-common (scripts/setup.sh)" >&2
    exit 1
  }
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -e "$dir/ceph.conf" ]; then
  echo "start-cluster: $dir already holds a cluster: stop it first (tests/ceph/stop-cluster.sh $dir)" >&2
  exit 1
fi
mkdir -p "$dir/run" "$dir/log" "$dir/mon.a" "$dir/osd.0"

# A free TCP port on 127.0.0.1 for the monitor.
free_port() {
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  echo "start-cluster: no free port found" >&2
  exit 1
}
port=${CEPH_TEST_MON_PORT:-$(free_port)}
fsid=$(cat /proc/sys/kernel/random/uuid)

cat >"$dir/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
public addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/ceph.client.admin.keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd objectstore = memstore
memstore device bytes = 2147483648
osd data = $dir/osd.\$id
mon data = $dir/mon.\$id
client mount timeout = 10
rados mon op timeout = 10
[mon]
keyring = $dir/mon.keyring
[osd]
keyring = $dir/osd.\$id/keyring
CONF

conf=(-c "$dir/ceph.conf")
ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
ceph-mon "${conf[@]}" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
ceph-mon "${conf[@]}" -i a 2>>"$dir/log/mon-start.err"

ceph_() { timeout 30 ceph "${conf[@]}" "$@"; }

uuid=$(cat /proc/sys/kernel/random/uuid)
ceph-authtool --create-keyring "$dir/osd.0/keyring" --gen-key -n osd.0 >/dev/null
secret=$(ceph-authtool -p -n osd.0 "$dir/osd.0/keyring")
id=$(echo "{\"cephx_secret\": \"$secret\"}" | ceph_ osd new "$uuid" -i - -n client.admin)
[ "$id" = 0 ] || { echo "start-cluster: expected OSD id 0, got $id" >&2; exit 1; }
ceph-osd "${conf[@]}" -i 0 --mkfs --osd-uuid "$uuid" 2>"$dir/log/osd-mkfs.err" >/dev/null ||
  { cat "$dir/log/osd-mkfs.err" >&2; exit 1; }
ceph-osd "${conf[@]}" -i 0 2>>"$dir/log/osd-start.err"

ceph_ osd pool create rbd 8 8 >/dev/null 2>&1
ceph_ osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
timeout 30 rbd "${conf[@]}" pool init rbd

# Wait until the pool takes writes (the OSD is up and its placement groups active): there is
# no manager to report placement group states, so write an object.
for _ in $(seq 60); do
  if timeout 5 rados "${conf[@]}" -p rbd put start-cluster-probe /dev/null 2>/dev/null; then
    timeout 5 rados "${conf[@]}" -p rbd rm start-cluster-probe 2>/dev/null || true
    echo "start-cluster: cluster up in $dir (mon 127.0.0.1:$port)"
    exit 0
  fi
  sleep 0.5
done
echo "start-cluster: the pool did not take writes in 60 s; see $dir/log" >&2
exit 1
