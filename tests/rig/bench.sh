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

harness=$(cargo bench --profile dev --bench scale --no-run --message-format=json-render-diagnostics |
	grep '"kind":\["bench"\]' | grep '"name":"scale"' |
	sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -n "$harness" ] || { log "cargo did not report the bench executable"; exit 1; }

rig_rc=0
"$rig" status >/dev/null 2>&1 || rig_rc=$?
started=0
[ "$rig_rc" != 3 ] || started=1
trap 'rc=$?; if [ "$started" = 1 ]; then "$rig" down || rc=1; fi; exit $rc' EXIT
[ "$started" = 0 ] || log "no rig: bringing one up; it is taken down at the end"
"$rig" up

state=$(realpath -m "${BAKER_RIG_DIR:-target/rig}")
# The demo's operator watches every namespace and would act on the bench's Bakes too.
if [ -f "$state/demo/operator.pid" ] && kill -0 "$(cat "$state/demo/operator.pid")" 2>/dev/null; then
	log "stopping the demo's operator (it watches every namespace); make demo starts it again"
	kill "$(cat "$state/demo/operator.pid")" || true
	rm -f "$state/demo/operator.pid"
fi

BAKER_RIG_DIR=$state BAKER_BIN=$root/target/bench/baker-$size "$harness" \
	--size "$size" --build-profile "$profile" --built-at "$built" \
	--build-seconds "$(awk "BEGIN { print $t1 - $t0 }")" --build-cold "$cold"
