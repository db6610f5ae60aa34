#!/bin/sh
# Guest half of tests/vm/suite-csi.sh (busybox ash, inside run-in-vm.sh's 6.12 kernel with the
# vduse/vdpa modules loaded): virtiod-csi driven through its socket in the kubelet's order, the
# restart promise (plugin and daemon SIGKILLed, the daemon upgraded in place and stopped with
# SIGTERM --on-stop keep, under a writing pod), online expansion.
# Every check prints "ok: ..." or "GUEST-FAIL: ..." and exits.
set -u
fail() {
  echo "GUEST-FAIL: $*"
  for f in /tmp/*.log /tmp/*.err; do [ -e "$f" ] && { echo "--- $f"; tail -25 "$f"; }; done
  exit 1
}
ok() { echo "ok: $* (t=$(cut -d' ' -f1 /proc/uptime)s)"; }
md5() { md5sum | cut -d' ' -f1; }

CTL=/run/virtiod/ctl.sock
SOCK=/run/csi/csi.sock
STATE=/var/lib/virtiod-csi
LOCAL=$STATE/local
KUBELET=/var/lib/kubelet
mkdir -p /run/virtiod /run/csi "$LOCAL" "$KUBELET"

# call RPC JSON: one CSI call; its JSON answer on stdout, a failure ends the test.
call() {
  out=$(virtiod-csi --endpoint "unix://$SOCK" call "$1" "$2" 2>/tmp/call.err) \
    || fail "$1 failed: $(cat /tmp/call.err)"
  echo "$out"
}
# field NAME JSON: a string field of a JSON answer.
field() { echo "$2" | sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }

# No device of the daemon's own: the volumes come with ctl add.
echo "# the volumes' devices come with ctl add" >/tmp/devices.toml
start_daemon() {
  # Volumes are images in $LOCAL: Landlock lets the daemon open images added later only there.
  # shellcheck disable=SC2086 # DAEMON_FLAGS: extra words
  virtiod run --config /tmp/devices.toml --control $CTL --state-dir /run/virtiod --allow-dir "$LOCAL" ${DAEMON_FLAGS:-} >>/tmp/virtiod.log 2>&1 &
  dpid=$!
  i=0
  until virtiod ctl --control $CTL list >/dev/null 2>&1; do
    kill -0 $dpid 2>/dev/null || fail "virtiod run exited early"
    i=$((i+1)); [ $i -le 300 ] || fail "virtiod run: no control socket"
    sleep 0.1
  done
}
start_plugin() {
  virtiod-csi --endpoint "unix://$SOCK" --node-id vm-node --role both --daemon-socket $CTL \
    --state-dir $STATE --local-dir $LOCAL >>/tmp/csi.log 2>&1 &
  ppid=$!
  i=0
  until virtiod-csi --endpoint "unix://$SOCK" call Probe 2>/dev/null | grep -q '"ready":true'; do
    kill -0 $ppid 2>/dev/null || fail "virtiod-csi exited early"
    i=$((i+1)); [ $i -le 300 ] || fail "virtiod-csi never became ready"
    sleep 0.1
  done
}

# nothing_left: no VDUSE/vdpa device, mount, state, record or image remains.
nothing_left() {
  ls /sys/bus/vdpa/devices 2>/dev/null | grep -q . && fail "$1: vdpa devices left: $(ls /sys/bus/vdpa/devices)"
  ls /dev/vduse | grep -v '^control$' | grep -q . && fail "$1: /dev/vduse left: $(ls /dev/vduse)"
  grep -q -e " $KUBELET" /proc/self/mountinfo && fail "$1: mounts left: $(grep " $KUBELET" /proc/self/mountinfo)"
  ls $STATE/volumes/*.json >/dev/null 2>&1 && fail "$1: state left: $(ls $STATE/volumes)"
  ls $LOCAL/*.img >/dev/null 2>&1 && fail "$1: images left: $(ls $LOCAL)"
  ls /run/virtiod/devices/*.json >/dev/null 2>&1 && fail "$1: daemon records left: $(ls /run/virtiod/devices)"
  virtiod ctl --control $CTL list | grep -q csi- && fail "$1: daemon still serves: $(virtiod ctl --control $CTL list)"
  return 0
}

start_daemon
start_plugin
info=$(call GetPluginInfo '{}')
[ "$(field name "$info")" = csi.virtiod.io ] || fail "GetPluginInfo: $info"
node=$(call NodeGetInfo '{}')
echo "$node" | grep -q '"topology.virtiod.io/node":"vm-node"' || fail "NodeGetInfo: $node"
ok "plugin ready: $info"

mountcap() { echo "{\"access_mode\":{\"mode\":1},\"access_type\":{\"Mount\":{\"fs_type\":\"$1\",\"mount_flags\":[]}}}"; }
blockcap='{"access_mode":{"mode":1},"access_type":{"Block":{}}}'

# --- 1. Filesystem volumes, ext4 and xfs: create, stage, publish, a pod writes, tear down ---
dd if=/dev/urandom of=/tmp/pat bs=1M count=2 2>/dev/null
for fs in ext4 xfs; do
  size=67108864; [ $fs = xfs ] && size=335544320   # mkfs.xfs takes 300 MiB at least
  cap=$(mountcap $fs)
  vol=$(call CreateVolume "{\"name\":\"fs-$fs\",\"capacity_range\":{\"required_bytes\":$size},\"volume_capabilities\":[$cap]}")
  id=$(field volume_id "$vol")
  [ "$id" = "local:vm-node:fs-$fs" ] || fail "CreateVolume: $vol"
  stage=$KUBELET/plugins/csi.virtiod.io/staging/fs-$fs
  target=$KUBELET/pods/pod-$fs/volumes/kubernetes.io~csi/fs-$fs/mount
  req="{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\",\"volume_capability\":$cap}"
  call NodeStageVolume "$req" >/dev/null
  call NodeStageVolume "$req" >/dev/null   # idempotent
  dev=$(sed -n 's/.*"dev_node": "\([^"]*\)".*/\1/p' $STATE/volumes/local_vm-node_fs-$fs.json)
  [ -b "$dev" ] || fail "$fs: no block device in the state: $(cat $STATE/volumes/*.json)"
  [ "$(blkid -p -s TYPE -o value "$dev")" = $fs ] || fail "$fs: $dev holds $(blkid -p "$dev")"
  grep -q " $stage " /proc/self/mountinfo || fail "$fs: staging path not mounted"
  pub="{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\",\"target_path\":\"$target\",\"volume_capability\":$cap}"
  call NodePublishVolume "$pub" >/dev/null
  call NodePublishVolume "$pub" >/dev/null   # idempotent
  # the pod: its own mount namespace, writes through the published path and reads back
  got=$(unshare -m sh -c "dd if=/tmp/pat of=$target/data bs=1M count=2 oflag=direct conv=fsync 2>/dev/null && dd if=$target/data bs=1M count=2 iflag=direct 2>/dev/null | md5sum") \
    || fail "$fs: the pod could not write"
  [ "${got%% *}" = "$(md5 </tmp/pat)" ] || fail "$fs: the pod read back other data"
  stats=$(call NodeGetVolumeStats "{\"volume_id\":\"$id\",\"volume_path\":\"$target\"}")
  echo "$stats" | grep -q '"abnormal":false' || fail "$fs: NodeGetVolumeStats: $stats"
  call NodeUnpublishVolume "{\"volume_id\":\"$id\",\"target_path\":\"$target\"}" >/dev/null
  call NodeUnpublishVolume "{\"volume_id\":\"$id\",\"target_path\":\"$target\"}" >/dev/null
  [ ! -e "$target" ] || fail "$fs: target left behind"
  call NodeUnstageVolume "{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\"}" >/dev/null
  call NodeUnstageVolume "{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\"}" >/dev/null
  call DeleteVolume "{\"volume_id\":\"$id\"}" >/dev/null
  call DeleteVolume "{\"volume_id\":\"$id\"}" >/dev/null
  nothing_left "$fs volume"
  ok "$fs volume: created, staged on $dev, published, written by a pod, torn down, nothing left"
done

# --- 2. Block volume: the device node bind-mounted on a file ---
vol=$(call CreateVolume "{\"name\":\"blk\",\"capacity_range\":{\"required_bytes\":33554432},\"volume_capabilities\":[$blockcap]}")
id=$(field volume_id "$vol")
stage=$KUBELET/plugins/csi.virtiod.io/staging/blk
target=$KUBELET/plugins/kubernetes.io/csi/volumeDevices/publish/blk/pod-blk
call NodeStageVolume "{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\",\"volume_capability\":$blockcap}" >/dev/null
call NodePublishVolume "{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\",\"target_path\":\"$target\",\"volume_capability\":$blockcap}" >/dev/null
[ -b "$target" ] || fail "block: $target is not a block device"
got=$(unshare -m sh -c "dd if=/tmp/pat of=$target bs=1M count=2 oflag=direct conv=fsync 2>/dev/null && dd if=$target bs=1M count=2 iflag=direct 2>/dev/null | md5sum") \
  || fail "block: the pod could not write"
[ "${got%% *}" = "$(md5 </tmp/pat)" ] || fail "block: the pod read back other data"
[ "$(dd if=$LOCAL/blk.img bs=1M count=2 2>/dev/null | md5)" = "$(md5 </tmp/pat)" ] || fail "block: the image does not hold the data"
stats=$(call NodeGetVolumeStats "{\"volume_id\":\"$id\",\"volume_path\":\"$target\"}")
echo "$stats" | grep -q '"total":33554432' || fail "block: NodeGetVolumeStats: $stats"
call NodeUnpublishVolume "{\"volume_id\":\"$id\",\"target_path\":\"$target\"}" >/dev/null
call NodeUnstageVolume "{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\"}" >/dev/null
call DeleteVolume "{\"volume_id\":\"$id\"}" >/dev/null
nothing_left "block volume"
ok "block volume: published as a device node, written by a pod, torn down, nothing left"

# --- 3. The restart promise: plugin and daemon SIGKILLed, the daemon upgraded in place and
# stopped with SIGTERM (--on-stop keep) and started, under a pod writing with O_DIRECT ---
cap=$(mountcap ext4)
vol=$(call CreateVolume "{\"name\":\"promise\",\"capacity_range\":{\"required_bytes\":67108864},\"volume_capabilities\":[$cap]}")
id=$(field volume_id "$vol")
stage=$KUBELET/plugins/csi.virtiod.io/staging/promise
target=$KUBELET/pods/pod-promise/volumes/kubernetes.io~csi/promise/mount
call NodeStageVolume "{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\",\"volume_capability\":$cap}" >/dev/null
call NodePublishVolume "{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\",\"target_path\":\"$target\",\"volume_capability\":$cap}" >/dev/null
dd if=/dev/zero of="$target/data" bs=1M count=1 conv=fsync 2>/dev/null
# The writer: 4 KiB O_DIRECT writes + fsync into 256 slots, each read back (O_DIRECT) and
# compared; every pass writes other data into a slot. Any error or mismatch ends it with 1.
cat >/tmp/writer.sh <<EOF
i=0
while [ ! -e /tmp/stop ]; do
  slot=\$((i % 256)); src=\$(((i * 7) % 512))
  dd if=/tmp/pat of=$target/data bs=4k skip=\$src seek=\$slot count=1 oflag=direct conv=notrunc,fsync 2>>/tmp/writer.err \
    || { echo "write \$i failed" >>/tmp/writer.err; exit 1; }
  a=\$(dd if=$target/data bs=4k skip=\$slot count=1 iflag=direct 2>>/tmp/writer.err | md5sum)
  b=\$(dd if=/tmp/pat bs=4k skip=\$src count=1 2>/dev/null | md5sum)
  [ "\$a" = "\$b" ] || { echo "verify \$i failed" >>/tmp/writer.err; exit 1; }
  i=\$((i + 1)); echo \$i >/tmp/writer.count.new; mv /tmp/writer.count.new /tmp/writer.count
done
EOF
: >/tmp/writer.err; echo 0 >/tmp/writer.count; rm -f /tmp/stop
unshare -m sh /tmp/writer.sh &
wpid=$!
# rounds: how many rounds the writer has verified (the file is replaced atomically)
rounds() { c=$(cat /tmp/writer.count 2>/dev/null); echo "${c:-0}"; }
# wait_more N: the writer completes N more rounds (a pause is fine, an end is not)
wait_more() {
  start=$(rounds); i=0
  while [ $(($(rounds) - start)) -lt "$1" ]; do
    kill -0 $wpid 2>/dev/null || fail "the writer ended: $(cat /tmp/writer.err)"
    i=$((i+1)); [ $i -le 1200 ] || fail "the writer made no progress for 120 s"
    sleep 0.1
  done
}
wait_more 10
kill -KILL $ppid; wait $ppid 2>/dev/null
start_plugin
grep -q "re-discovered a staged volume" /tmp/csi.log || fail "the restarted plugin did not re-discover the volume"
wait_more 10
ok "plugin SIGKILLed and restarted under the writer ($(rounds) rounds)"
kill -KILL $dpid; wait $dpid 2>/dev/null
[ -e /dev/vduse/csi-local-promise ] || fail "SIGKILL of the daemon removed the VDUSE device"
before=$(rounds)
DAEMON_FLAGS="--on-stop keep" start_daemon
grep -q "restored a device added with ctl add" /tmp/virtiod.log || fail "the daemon did not restore the volume's device"
grep -q "re-opening the existing VDUSE device" /tmp/virtiod.log || fail "the daemon did not re-open the VDUSE device"
wait_more 10
ok "daemon SIGKILLed and restarted under the writer ($before -> $(rounds) rounds)"
# an upgrade in place of the daemon (a new binary takes the device over)
before=$(rounds)
virtiod ctl --control $CTL upgrade >/tmp/upgrade.out 2>&1 || fail "ctl upgrade: $(cat /tmp/upgrade.out)"
new=$(sed -n 's/.*-> //p' /tmp/upgrade.out)
wait $dpid 2>/dev/null # the old one, our child, exits 0
[ -n "$new" ] && kill -0 "$new" 2>/dev/null || fail "ctl upgrade: no new daemon: $(cat /tmp/upgrade.out)"
dpid=$new
wait_more 10
ok "daemon upgraded in place under the writer ($before -> $(rounds) rounds)"
# a graceful stop that keeps the devices (a DaemonSet's rolling update), then a start
before=$(rounds)
kill -TERM $dpid
i=0; while kill -0 $dpid 2>/dev/null; do i=$((i+1)); [ $i -le 300 ] || fail "SIGTERM: the daemon did not exit"; sleep 0.1; done
[ -e /dev/vduse/csi-local-promise ] || fail "SIGTERM with --on-stop keep removed the VDUSE device"
grep -q "the VDUSE device is kept for the next start" /tmp/virtiod.log || fail "SIGTERM: the device was not kept"
start_daemon
wait_more 10
ok "daemon stopped with SIGTERM (--on-stop keep) and started under the writer ($before -> $(rounds) rounds)"
touch /tmp/stop; wait $wpid || fail "the writer saw an error: $(cat /tmp/writer.err)"
grep -q failed /tmp/writer.err && fail "writer: $(cat /tmp/writer.err)"
stats=$(call NodeGetVolumeStats "{\"volume_id\":\"$id\",\"volume_path\":\"$target\"}")
echo "$stats" | grep -q '"abnormal":false' || fail "after restarts: NodeGetVolumeStats: $stats"
ok "the writer saw no error across the restarts, the upgrade and the stop ($(rounds) verified rounds)"

# --- 4. Online expansion of the mounted ext4 volume: 64 -> 128 MiB ---
kb_before=$(df -k "$target" | awk 'NR==2 {print $2}')
exp=$(call ControllerExpandVolume "{\"volume_id\":\"$id\",\"capacity_range\":{\"required_bytes\":134217728},\"volume_capability\":$cap}")
echo "$exp" | grep -q '"node_expansion_required":true' || fail "ControllerExpandVolume: $exp"
# The controller leaves a local volume's file to its node (a central resizer cannot reach it).
[ "$(stat -c %s $LOCAL/promise.img)" = 67108864 ] || fail "ControllerExpandVolume touched the file: $(stat -c %s $LOCAL/promise.img)"
exp=$(call NodeExpandVolume "{\"volume_id\":\"$id\",\"volume_path\":\"$target\",\"staging_target_path\":\"$stage\",\"capacity_range\":{\"required_bytes\":134217728},\"volume_capability\":$cap}")
echo "$exp" | grep -q '"capacity_bytes":134217728' || fail "NodeExpandVolume: $exp"
[ "$(stat -c %s $LOCAL/promise.img)" = 134217728 ] || fail "NodeExpandVolume did not grow the file: $(stat -c %s $LOCAL/promise.img)"
kb_after=$(df -k "$target" | awk 'NR==2 {print $2}')
[ "$kb_after" -gt $((kb_before + 50000)) ] || fail "df shows $kb_after KiB after expansion (before: $kb_before)"
[ "$(dd if=$target/data bs=4k count=1 skip=5 iflag=direct 2>/dev/null | md5)" != "" ] || fail "data unreadable after expansion"
ok "ext4 grown online: df $kb_before -> $kb_after KiB"

# --- 5. Tear down after the restarts: unpublish, unstage, delete still work ---
call NodeUnpublishVolume "{\"volume_id\":\"$id\",\"target_path\":\"$target\"}" >/dev/null
call NodeUnstageVolume "{\"volume_id\":\"$id\",\"staging_target_path\":\"$stage\"}" >/dev/null
call DeleteVolume "{\"volume_id\":\"$id\"}" >/dev/null
nothing_left "after the restarts"
ok "torn down after the restarts, nothing left"
kill -TERM $ppid; wait $ppid
kill -TERM $dpid; wait $dpid || fail "virtiod run exited $? on SIGTERM"
exit 0
