#!/usr/bin/env bash
# `make bench` / `make bench-ci`: the scale benchmark (benches/scale.rs) against the rig.
#
# Usage: bench.sh full|small
#   full:  the operator built --release; 10,000 Bakes present, 100 launches, a queue of 1,000.
#   small: the debug operator; 500 Bakes, 20 launches, a queue of 50. Fails if a count misses
#          its goal (CI runs it).
#
# The operator is timed as it builds, then copied out of the (possibly shared) target dir so that
# no concurrent build replaces it mid-run. The harness only drives the rig, so it is built with
# the dev profile and run directly (not under `cargo bench`), leaving cargo's lock free for
# `rig.sh up` to build the node. The rig is brought up as `make test` does it, and down at the
# end only if it was not up before.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
rig=$here/rig.sh
log() { printf '[make bench] %s\n' "$*" >&2; }
cd "$root"

size=${1:-}
case $size in
full) profile=release; flag=--release ;;
small) profile=debug; flag= ;;
*) log "usage: $0 full|small"; exit 2 ;;
esac

built=${CARGO_TARGET_DIR:-target}/$profile/baker
cold=$([ -x "$built" ] && echo false || echo true)
t0=${EPOCHREALTIME/,/.}
cargo build $flag --bin baker
t1=${EPOCHREALTIME/,/.}
mkdir -p target/bench
cp "$built" "target/bench/baker-$size"

# shellcheck source=tests/rig/harness.sh
. "$here/harness.sh"
harness=$(harness_executable scale)
rig_for_harness

BAKER_RIG_DIR=$state BAKER_BIN=$root/target/bench/baker-$size "$harness" \
	--size "$size" --build-profile "$profile" --built-at "$built" \
	--build-seconds "$(awk "BEGIN { print $t1 - $t0 }")" --build-cold "$cold"
