#!/usr/bin/env bash
# Install what is needed, build virtiod (release) and run it.
#
# usage: scripts/run.sh                      # serve target/demo.img (created, 256 MiB) on
#                                            # /tmp/virtiod.sock over vhost-user
#        scripts/run.sh serve --vduse vd0 disk.img          # any virtiod command line
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >&2
cargo build --release -p virtiod >&2
if [ $# -eq 0 ]; then
  [ -e target/demo.img ] || truncate -s 256M target/demo.img
  set -- serve --vhost-user /tmp/virtiod.sock target/demo.img
  echo "run: virtiod $* (Ctrl-C to stop)" >&2
fi
exec target/release/virtiod "$@"
