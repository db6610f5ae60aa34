#!/bin/sh
# Guest half of tests/vm/qemu-vhost-user-reconnect.sh (busybox ash; runs inside run-in-vm.sh).
# While the host SIGKILLs and restarts the vhost-user-blk daemon behind DEV (default /dev/vda),
# WRITERS parallel dd processes (default 4, disjoint ranges) write the host-made pattern
# PATTERN (default /pattern.bin, STREAM_MB MiB) to DEV at STREAM_OFF_MB MiB as 4 KiB O_DIRECT
# writes (conv=fsync: each ends with a FLUSH). Meanwhile, unless CHURN=0, one more dd rewrites
# [CHURN_OFF_MB, +CHURN_MB) (default MiB [0, 8)) with CHURN_BS_K KiB writes (256), a different
# slice of the pattern each pass, until the stream is done: requests of mixed sizes share the
# queues. Then the page cache is dropped and both ranges are read back with O_DIRECT and compared.
#
# Lines for the host on the console (ttyS0, printed when the VM has exited):
#   "WRITER-EXIT: N ..."   highest exit status of the writers (0 = no writer saw an error)
#   "READBACK: match|MISMATCH ..."
#   "PATTERN-MD5: <md5> offset_mib=N size_mib=N"   md5 of what was written
#   "CHURN-READBACK: ...", "CHURN-MD5: <md5> offset_mib=N size_mib=N src_mib=N passes=N"
#                          the churn range holds the pattern's MiB [src_mib, +size_mib)
# and, live, on MARK_TTY (default /dev/ttyS1; the host gives QEMU a second serial port backed
# by a file) so the host can time its kills while the guest runs:
#   "RECONNECT-WRITER-START writes0=N blocks=N"    just before the writers start
#   "HB t=UPTIME reads=N writes=N inflight=N"      every HB_PERIOD s (completed I/Os of DEV)
#   "WRITER-EXIT: ...", "GUEST-DONE rc=N"
# Exit 1 on any failure ("GUEST-FAIL: ..."), 0 when the writers succeeded and the data reads back.
DEV=${DEV:-/dev/vda}
PATTERN=${PATTERN:-/pattern.bin}
STREAM_OFF_MB=${STREAM_OFF_MB:-8} STREAM_MB=${STREAM_MB:-48} WRITERS=${WRITERS:-4}
CHURN=${CHURN:-1} CHURN_OFF_MB=${CHURN_OFF_MB:-0} CHURN_MB=${CHURN_MB:-8} CHURN_BS_K=${CHURN_BS_K:-256}
MARK_TTY=${MARK_TTY:-/dev/ttyS1} HB_PERIOD=${HB_PERIOD:-0.25}

now() { read -r up _ </proc/uptime; echo "$up"; }
md5() { md5sum | cut -d' ' -f1; }
# say LINE: on the console and on the live marker port
say() { echo "$*"; echo "$*" >&3; }
fail() { say "GUEST-FAIL: $*"; say "GUEST-DONE rc=1"; exit 1; }
step() { echo "guest: $* (t=$(now)s)"; }

if [ -c "$MARK_TTY" ] && stty -F "$MARK_TTY" raw -echo 2>/dev/null && exec 3>"$MARK_TTY"; then :; else
  exec 3>/dev/null; fail "no live marker port $MARK_TTY (the host watches it to time the kills)"
fi

i=0; while [ ! -b "$DEV" ]; do
  i=$((i+1)); [ $i -le 100 ] || fail "$DEV did not appear"; sleep 0.1; done
name=${DEV#/dev/}
bytes=$(blockdev --getsize64 "$DEV") || fail "blockdev --getsize64 $DEV"
step "$DEV has $bytes bytes, queues $(ls /sys/block/$name/mq 2>/dev/null | wc -l)"
[ "$bytes" -ge $(( (STREAM_OFF_MB + STREAM_MB) * 1048576 )) ] || fail "$DEV is too small: $bytes bytes"
[ -f "$PATTERN" ] || fail "no pattern file $PATTERN"
[ "$(stat -c %s "$PATTERN")" -eq $((STREAM_MB * 1048576)) ] || fail "$PATTERN is not $STREAM_MB MiB"
blocks=$((STREAM_MB * 256))   # 4 KiB blocks
[ $((blocks % WRITERS)) -eq 0 ] || fail "WRITERS=$WRITERS does not divide $blocks blocks"
per=$((blocks / WRITERS))
[ "$CHURN" = 0 ] || [ $((CHURN_OFF_MB + CHURN_MB)) -le "$STREAM_OFF_MB" ] || fail "the churn range overlaps the stream"
[ "$CHURN" = 0 ] || [ "$CHURN_MB" -le "$STREAM_MB" ] || fail "CHURN_MB > STREAM_MB"
want=$(md5 <"$PATTERN")

# heartbeat: completed reads/writes of DEV and requests in flight, from /sys/block/NAME/stat
(
  while :; do
    read -r up _ </proc/uptime
    read -r r _ _ _ w _ _ _ q _ </sys/block/$name/stat
    echo "HB t=$up reads=$r writes=$w inflight=$q" >&3
    sleep "$HB_PERIOD"
  done
) &
hb=$!

read -r _ _ _ _ w0 _ </sys/block/$name/stat
step "writing $STREAM_MB MiB at $STREAM_OFF_MB MiB: $WRITERS writers x $per blocks of 4 KiB, O_DIRECT"
say "RECONNECT-WRITER-START writes0=$w0 blocks=$blocks writers=$WRITERS"
t0=$(now)
if [ "$CHURN" != 0 ]; then
  # churn: rewrite [CHURN_OFF_MB, +CHURN_MB) with CHURN_BS_K KiB O_DIRECT writes, a different
  # slice of the pattern each pass, until the stream is done; its big writes share the queues
  # with the 4 KiB ones, so requests complete out of order
  rm -f /tmp/churn.stop /tmp/churn.pass
  (
    pass=0 kb=$((CHURN_BS_K)) n=$((CHURN_MB * 1024 / CHURN_BS_K))
    while [ ! -e /tmp/churn.stop ]; do
      pass=$((pass+1)); src=$(( (pass * CHURN_MB) % STREAM_MB ))
      dd if="$PATTERN" of="$DEV" bs=${kb}k skip=$((src * 1024 / kb)) seek=$((CHURN_OFF_MB * 1024 / kb)) \
         count=$n oflag=direct conv=notrunc 2>/tmp/churn.err || exit 1
      echo "$pass $src" >/tmp/churn.pass
    done
  ) &
  churn=$!
fi
pids=
j=0; while [ $j -lt "$WRITERS" ]; do
  dd if="$PATTERN" of="$DEV" bs=4k skip=$((j * per)) seek=$((STREAM_OFF_MB * 256 + j * per)) \
     count=$per oflag=direct conv=notrunc,fsync 2>/tmp/dd$j.err &
  pids="$pids $!"; j=$((j+1))
done
rc=0 rcs= j=0
for p in $pids; do
  wait "$p"; r=$?; rcs="$rcs $r"
  [ $r -eq 0 ] || { rc=$r; echo "guest: writer $j (pid $p) exit $r: $(tr '\n' ' ' </tmp/dd$j.err)"; }
  j=$((j+1))
done
t1=$(now)
crc=- cpass=0 csrc=0 cinfo=off
if [ "$CHURN" != 0 ]; then
  touch /tmp/churn.stop; wait "$churn"; crc=$?
  [ $crc -eq 0 ] || { rc=$crc; echo "guest: churn writer exit $crc: $(tr '\n' ' ' </tmp/churn.err)"; }
  [ -f /tmp/churn.pass ] && read -r cpass csrc </tmp/churn.pass
  cinfo="$crc after $cpass passes"
fi
say "WRITER-EXIT: $rc (per writer:$rcs; churn: $cinfo) in $(echo "$t1 $t0" | awk '{printf "%.1f", $1-$2}') s"

# read back through a dropped page cache, with O_DIRECT
blockdev --flushbufs "$DEV"; echo 3 >/proc/sys/vm/drop_caches
got=$(dd if="$DEV" bs=1M skip="$STREAM_OFF_MB" count="$STREAM_MB" iflag=direct 2>/tmp/rd.err | md5)
if [ "$got" = "$want" ]; then
  say "READBACK: match $got"
else
  # which MiB differ (the host breaks them down to 4 KiB blocks in the image)
  bad= m=0
  while [ $m -lt "$STREAM_MB" ]; do
    a=$(dd if="$DEV" bs=1M skip=$((STREAM_OFF_MB + m)) count=1 iflag=direct 2>/dev/null | md5)
    b=$(dd if="$PATTERN" bs=1M skip=$m count=1 2>/dev/null | md5)
    [ "$a" = "$b" ] || bad="$bad $m"
    m=$((m+1))
  done
  say "READBACK: MISMATCH read $got, wrote $want; differing MiB of the stream:${bad:- none} $(cat /tmp/rd.err)"
fi
echo "PATTERN-MD5: $want offset_mib=$STREAM_OFF_MB size_mib=$STREAM_MB"
cwant= cgot=
if [ "$CHURN" != 0 ] && [ "$cpass" -gt 0 ]; then
  cwant=$(dd if="$PATTERN" bs=1M skip="$csrc" count="$CHURN_MB" 2>/dev/null | md5)
  cgot=$(dd if="$DEV" bs=1M skip="$CHURN_OFF_MB" count="$CHURN_MB" iflag=direct 2>/dev/null | md5)
  [ "$cgot" = "$cwant" ] && say "CHURN-READBACK: match" || say "CHURN-READBACK: MISMATCH read $cgot, wrote $cwant"
  echo "CHURN-MD5: $cwant offset_mib=$CHURN_OFF_MB size_mib=$CHURN_MB src_mib=$csrc passes=$cpass"
fi
kill "$hb" 2>/dev/null; wait "$hb" 2>/dev/null
# the kernel's view (errors and warnings are below the console's loglevel otherwise)
dmesg | grep -iE 'virtio|vd[a-z]|blk|I/O error|hung|timeout|not a head' | tail -20 | sed 's/^/guest-dmesg: /'
if [ "$rc" -ne 0 ]; then fail "a writer exited $rc"; fi
if [ "$got" != "$want" ]; then fail "read-back differs"; fi
if [ "$cgot" != "$cwant" ]; then fail "churn range read-back differs"; fi
say "GUEST-DONE rc=0"
step "all checks passed"
