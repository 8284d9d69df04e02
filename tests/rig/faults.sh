#!/usr/bin/env bash
# `make faults`: the fault suite (benches/faults.rs) against the rig; `make test` runs it small.
#
# Usage: faults.sh full|small [harness args...]
#   full:  50 Bakes per scenario, 20 operator kills.
#   small: 12 Bakes per scenario, 4 operator kills.
# Extra args go to the harness (e.g. --only ec2-faults,leader-kill, --seed 7).
#
# The debug operator is copied out of the (possibly shared) target dir so that no concurrent
# build replaces it mid-run. The rig is brought up as `make test` does it, and down at the end
# only if it was not up before. Exits non-zero when a must-be-zero figure is not zero.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
rig=$here/rig.sh
log() { printf '[make faults] %s\n' "$*" >&2; }
cd "$root"

size=${1:-}
case $size in
full | small) shift ;;
*) log "usage: $0 full|small [--only <scenarios>] [--seed N]"; exit 2 ;;
esac

log "building the operator and the fault harness"
cargo build --bin baker
mkdir -p target/faults
cp "${CARGO_TARGET_DIR:-target}/debug/baker" target/faults/baker
# shellcheck source=tests/rig/harness.sh
. "$here/harness.sh"
harness=$(harness_executable faults)
rig_for_harness

BAKER_RIG_DIR=$state BAKER_BIN=$root/target/faults/baker "$harness" --size "$size" "$@"
