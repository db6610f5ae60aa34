#!/usr/bin/env bash
# Install what the tests need and run all of them: formatting, lints, unit and integration
# tests (the real daemon driven by libblkio), the QEMU-guest vhost-user-blk tests (round trip;
# SIGKILL + restart under a write stream), and the
# end-to-end VDUSE suite in a VM. `.ci/run` runs exactly this.
#
# usage: scripts/test.sh            # everything
#        QUICK=1 scripts/test.sh    # skip the VM suites
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
step() { echo; echo "=== $* [$(( $(date +%s) - t0 ))s]"; }

step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings

step "cargo doc (public crates documented, no broken links)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet

step "cargo test (unit + integration, release build)"
# A test that cannot run here (no root, no loop devices, an old kernel) appends a line to this
# file (virtiod/tests/common: skip_or_fail); with VIRTIOD_NO_SKIP=1 (CI) it fails instead.
export VIRTIOD_SKIP_LOG="$PWD/target/skips.txt"
mkdir -p target && : >"$VIRTIOD_SKIP_LOG"
cargo test --workspace --release 2>&1 | tee target/test-output.txt

step "deploy/ manifests against the Kubernetes API schemas (kubernetes-validate, strict)"
bash tests/deploy/validate.sh

step "release binaries for the VM suites"
cargo build --workspace --release

step "fuzz targets, briefly (each runs longer by hand: see docs/reliability.md)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
(cd fuzz && for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  cargo fuzz run --sanitizer none "$t" "corpus/$t" -- -max_total_time="${FUZZ_SECONDS:-20}" 2>&1 | tail -2
done)

step "benchmark smoke (virtiod and qemu-storage-daemon side by side; figures not asserted)"
BENCH_QUICK=1 bash scripts/bench.sh

if [ "${QUICK:-0}" != 1 ]; then
  step "QEMU guest on virtiod's vhost-user-blk socket"
  SERVER=virtiod VIRTIOD="$PWD/target/release/virtiod" bash tests/vm/qemu-vhost-user-blk.sh
  step "QEMU guest: online resize over vhost-user (ctl resize, CONFIG_CHANGE_MSG, resize2fs on a mounted ext4)"
  VIRTIOD="$PWD/target/release/virtiod" bash tests/vm/qemu-vhost-user-resize.sh
  step "QEMU guest reads /dev/hwrng from the example virtio-rng device (examples/virtio-rng, vhost-user)"
  VIRTIOD_RNG="$PWD/target/release/virtiod-rng" bash tests/vm/qemu-vhost-user-rng.sh
  step "QEMU guest: SIGKILL + restart of virtiod under its write stream (vhost-user in-flight region)"
  VIRTIOD="$PWD/target/release/virtiod" bash tests/vm/qemu-vhost-user-reconnect.sh
  step "QEMU guest: five ctl upgrades of virtiod run under its write stream (the vhost-user connection is handed over)"
  VIRTIOD="$PWD/target/release/virtiod" bash tests/vm/qemu-vhost-user-upgrade.sh
  step "QEMU guest on virtiod's virtio-net (vhost-user, tap): ping, 4 MiB each way; offloads on, off, two queue pairs"
  VIRTIOD="$PWD/target/release/virtiod" bash tests/vm/qemu-vhost-user-net.sh
  for suite in tests/vm/suite-*.sh; do
    [ -e "$suite" ] || continue
    step "VM suite $suite"
    bash "$suite"
  done
fi

step "all tests passed"
# The plain closing line CI reads: count cargo's results and the skips logged above (one line
# per test and reason; the VM suites append theirs too).
passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
skipped=$(sort -u "$VIRTIOD_SKIP_LOG" | grep -c . || true)
echo "tests: $passed passed, $failed failed, $skipped skipped"
