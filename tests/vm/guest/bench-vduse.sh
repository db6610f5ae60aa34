#!/bin/sh
# Guest half of tests/vm/bench-vduse.sh: fio on /dev/vda served through VDUSE by virtiod and by
# qemu-storage-daemon's vduse-blk export, alternating, same image. Prints one line per run:
#   BENCH server workload iops
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5} ROUNDS=${ROUNDS:-2}
fail() { echo "GUEST-FAIL: $*"; exit 1; }
dd if=/dev/zero of=/tmp/disk.img bs=1M count=256 2>/dev/null
wait_dev() { i=0; while [ ! -b /dev/vda ]; do i=$((i+1)); [ $i -le 200 ] || fail "no /dev/vda"; sleep 0.05; done; }
start_virtiod() {
  # shellcheck disable=SC2086
  virtiod serve --vduse vb0 --buffered ${VIRTIOD_ARGS:-} /tmp/disk.img >/tmp/v.out 2>/tmp/v.log &
  srv=$!; wait_dev
}
start_qsd() {
  qemu-storage-daemon --blockdev driver=file,node-name=f0,filename=/tmp/disk.img \
    --export type=vduse-blk,id=e0,node-name=f0,name=vb0,writable=on,num-queues=1 >/tmp/q.log 2>&1 &
  srv=$!
  i=0; while [ ! -e /dev/vduse/vb0 ]; do i=$((i+1)); [ $i -le 200 ] || fail "qsd: no /dev/vduse/vb0"; sleep 0.05; done
  vdpa dev add name vb0 mgmtdev vduse || fail "vdpa dev add"
  wait_dev
}
stop_server() {
  [ "$1" = qsd ] && vdpa dev del vb0
  kill -TERM $srv; wait $srv 2>/dev/null
  i=0; while [ -e /dev/vda ]; do i=$((i+1)); [ $i -le 200 ] || fail "/dev/vda stays"; sleep 0.05; done
}
run_fio() { # rw qd -> iops
  fio --name=b --filename=/dev/vda --ioengine=libaio --direct=1 --rw="$1" --bs=4k --iodepth="$2" \
    --runtime="$SECONDS_PER_RUN" --time_based --size=200M --minimal 2>/dev/null \
    | awk -F';' -v rw="$1" '{ print (rw == "randwrite") ? $49 : $8 }'
}
r=0
while [ $r -lt "$ROUNDS" ]; do
  for server in virtiod qsd; do
    start_$server
    for w in randread:1 randread:32 randwrite:1 randwrite:32; do
      iops=$(run_fio "${w%%:*}" "${w#*:}")
      [ -n "$iops" ] || fail "fio gave no result for $server $w"
      echo "BENCH $server $w $iops"
    done
    stop_server $server
  done
  r=$((r+1))
done
