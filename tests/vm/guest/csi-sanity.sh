#!/bin/sh
# Guest half of the conformance step of tests/vm/suite-csi.sh (busybox ash, inside
# run-in-vm.sh's 6.12 kernel with the vduse/vdpa modules loaded): the csi-sanity binary against
# virtiod-csi and virtiod run, with the node checks on — volumes staged on real VDUSE devices,
# formatted, mounted, published, grown and torn down, snapshots taken and volumes made from
# them. Fails when a check fails, when any check is skipped (the plugin announces every
# capability the suite checks), or when anything is left behind. Runs on its own too (run-in-vm.sh --bin virtiod
# --bin virtiod-csi --bin csi-sanity tests/vm/guest/csi-sanity.sh).
set -u
fail() {
  echo "GUEST-FAIL: csi-sanity: $*"
  for f in /tmp/sanity-*.log; do [ -e "$f" ] && { echo "--- $f"; tail -25 "$f"; }; done
  exit 1
}
ok() { echo "ok: $* (t=$(cut -d' ' -f1 /proc/uptime)s)"; }

# Paths of their own: the step may follow guest/csi.sh in the same boot.
RUN=/run/sanity
CTL=$RUN/ctl.sock
SOCK=$RUN/csi.sock
STATE=/var/lib/sanity-csi
LOCAL=$STATE/local
WORK=/var/lib/sanity-work
# Volumes are sparse files in the guest's RAM: 16 MiB each, 32 MiB once grown.
SIZE=${SANITY_VOLUME_SIZE:-16777216}
mkdir -p "$RUN" "$LOCAL" "$WORK"
# A CreateVolume without a capacity range gets the plugin's default, 1 GiB, refused when the
# local dir has less free (the rootfs has ~620 MB): a tmpfs of its own, larger than it can
# fill; only the blocks written take memory (mkfs and the checks write a few MiB).
mount -t tmpfs -o size=2g,mode=700 sanity-local "$LOCAL" || fail "cannot mount a tmpfs on $LOCAL"

cat >$RUN/devices.toml <<EOF
[[device]]
name = "anchor"
image = "mem:1M"
vhost-user = "$RUN/anchor.sock"
EOF
# Landlock lets the daemon open images added later only under --allow-dir.
virtiod run --config $RUN/devices.toml --control $CTL --state-dir $RUN --allow-dir "$LOCAL" \
  >/tmp/sanity-virtiod.log 2>&1 &
dpid=$!
i=0
until virtiod ctl --control $CTL list >/dev/null 2>&1; do
  kill -0 $dpid 2>/dev/null || fail "virtiod run exited early"
  i=$((i+1)); [ $i -le 300 ] || fail "virtiod run: no control socket after 30 s"
  sleep 0.1
done
virtiod-csi --endpoint "unix://$SOCK" --node-id sanity-node --role both --daemon-socket $CTL \
  --state-dir $STATE --local-dir $LOCAL >/tmp/sanity-csi.log 2>&1 &
ppid=$!
i=0
until virtiod-csi --endpoint "unix://$SOCK" call Probe 2>/dev/null | grep -q '"ready":true'; do
  kill -0 $ppid 2>/dev/null || fail "virtiod-csi exited early"
  i=$((i+1)); [ $i -le 300 ] || fail "virtiod-csi not ready after 30 s"
  sleep 0.1
done
ok "plugin and daemon up"

csi-sanity --endpoint "unix://$SOCK" --work-dir "$WORK" --test-volume-size "$SIZE" \
  >/tmp/sanity.out 2>&1
rc=$?
cat /tmp/sanity.out
[ $rc = 0 ] || fail "csi-sanity exited $rc (a FAIL line above says which check)"
grep -q '^csi-sanity: [0-9]* passed, 0 failed, 0 skipped' /tmp/sanity.out ||
  fail "not every check ran: $(grep '^SKIP' /tmp/sanity.out) $(tail -1 /tmp/sanity.out)"
for name in "Node/stage, publish, unpublish, unstage: each twice, idempotent" \
            "Node/NodeExpandVolume: after ControllerExpandVolume on a published volume"; do
  grep -qxF "PASS $name" /tmp/sanity.out || fail "the node I/O check \"$name\" did not pass"
done

# A volume from a snapshot, end to end: a pod writes a file on a 32 MiB ext4 volume; after
# unstaging, a snapshot; a 64 MiB volume from it is staged (the snapshot's filesystem, grown to
# the volume at stage) and the pod reads the file back.
call() {
  out=$(virtiod-csi --endpoint "unix://$SOCK" call "$1" "$2" 2>/tmp/sanity-call.err) \
    || fail "$1 failed: $(cat /tmp/sanity-call.err)"
  echo "$out"
}
field() { echo "$2" | sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }
cap='{"access_mode":{"mode":1},"access_type":{"Mount":{"fs_type":"ext4","mount_flags":[]}}}'
# stage_publish ID NAME [CONTEXT] / unpublish_unstage ID NAME: the kubelet's calls, paths under
# $WORK; CONTEXT is CreateVolume's volume_context, which the kubelet gives NodeStageVolume.
stage_publish() {
  vctx=${3:-'{}'}
  call NodeStageVolume "{\"volume_id\":\"$1\",\"staging_target_path\":\"$WORK/stage-$2\",\"volume_capability\":$cap,\"volume_context\":$vctx}" >/dev/null
  call NodePublishVolume "{\"volume_id\":\"$1\",\"staging_target_path\":\"$WORK/stage-$2\",\"target_path\":\"$WORK/pub-$2\",\"volume_capability\":$cap}" >/dev/null
}
unpublish_unstage() {
  call NodeUnpublishVolume "{\"volume_id\":\"$1\",\"target_path\":\"$WORK/pub-$2\"}" >/dev/null
  call NodeUnstageVolume "{\"volume_id\":\"$1\",\"staging_target_path\":\"$WORK/stage-$2\"}" >/dev/null
}
dd if=/dev/urandom of=/tmp/sanity-pat bs=64k count=16 2>/dev/null
want=$(md5sum </tmp/sanity-pat | cut -d' ' -f1)
vol=$(call CreateVolume "{\"name\":\"snap-src\",\"capacity_range\":{\"required_bytes\":33554432},\"volume_capabilities\":[$cap]}")
src=$(field volume_id "$vol")
stage_publish "$src" src
unshare -m sh -c "cat /tmp/sanity-pat >$WORK/pub-src/data && sync" || fail "the pod could not write"
unpublish_unstage "$src" src
snap=$(call CreateSnapshot "{\"source_volume_id\":\"$src\",\"name\":\"snap-1\"}")
sid=$(field snapshot_id "$snap")
[ "$sid" = "$src@snap-1" ] && echo "$snap" | grep -q '"ready_to_use":true' || fail "CreateSnapshot: $snap"
vol=$(call CreateVolume "{\"name\":\"restored\",\"capacity_range\":{\"required_bytes\":67108864},\"volume_capabilities\":[$cap],\"volume_content_source\":{\"type\":{\"Snapshot\":{\"snapshot_id\":\"$sid\"}}}}")
new=$(field volume_id "$vol")
echo "$vol" | grep -q '"capacity_bytes":67108864' || fail "CreateVolume from $sid: $vol"
ctx=$(echo "$vol" | sed -n 's/.*"volume_context":\({[^}]*}\).*/\1/p')
[ "$ctx" = '{"virtiod.io/grow-fs":"true"}' ] || fail "CreateVolume from $sid: volume_context $ctx"
stage_publish "$new" new "$ctx"
got=$(unshare -m sh -c "md5sum <$WORK/pub-new/data") || fail "the pod could not read the restored volume"
[ "${got%% *}" = "$want" ] || fail "the restored volume holds other data"
kib=$(df -k "$WORK/pub-new" | tail -1 | awk '{print $2}')
[ "$kib" -gt 49152 ] || fail "the restored filesystem was not grown to the volume: $kib KiB"
unpublish_unstage "$new" new
call DeleteSnapshot "{\"snapshot_id\":\"$sid\"}" >/dev/null
call DeleteVolume "{\"volume_id\":\"$new\"}" >/dev/null
call DeleteVolume "{\"volume_id\":\"$src\"}" >/dev/null
rmdir $WORK/stage-src $WORK/stage-new 2>/dev/null
ok "a 64 MiB volume from a snapshot of a 32 MiB ext4 volume: the pod reads its file back, df $kib KiB"

# Nothing left: the suite deletes what it made; the plugin removes devices, mounts and images.
ls /sys/bus/vdpa/devices 2>/dev/null | grep -q . && fail "vdpa devices left: $(ls /sys/bus/vdpa/devices)"
ls /dev/vduse | grep -v '^control$' | grep -q . && fail "VDUSE devices left: $(ls /dev/vduse)"
grep -q " $WORK/" /proc/self/mountinfo && fail "mounts left: $(grep " $WORK/" /proc/self/mountinfo)"
ls $LOCAL/*.img >/dev/null 2>&1 && fail "images left: $(ls $LOCAL)"
[ -e $LOCAL/snapshots ] && fail "snapshots left: $(ls -R $LOCAL/snapshots)"
ls $STATE/volumes/*.json >/dev/null 2>&1 && fail "plugin state left: $(ls $STATE/volumes)"
virtiod ctl --control $CTL list | grep -q csi- && fail "the daemon still serves: $(virtiod ctl --control $CTL list)"
ok "csi-sanity: $(tail -1 /tmp/sanity.out | cut -d' ' -f2-), node I/O included; nothing left"

kill -TERM $ppid; wait $ppid
kill -TERM $dpid; wait $dpid || fail "virtiod run exited $? on SIGTERM"
umount "$LOCAL" || fail "cannot unmount $LOCAL"
rm -rf "$RUN" "$STATE" "$WORK"
exit 0
