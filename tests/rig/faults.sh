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
harness=$(cargo bench --profile dev --bench faults --no-run --message-format=json-render-diagnostics |
	grep '"kind":\["bench"\]' | grep '"name":"faults"' |
	sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -n "$harness" ] || { log "cargo did not report the faults executable"; exit 1; }

rig_rc=0
"$rig" status >/dev/null 2>&1 || rig_rc=$?
started=0
[ "$rig_rc" != 3 ] || started=1
trap 'rc=$?; if [ "$started" = 1 ]; then "$rig" down || rc=1; fi; exit $rc' EXIT
[ "$started" = 0 ] || log "no rig: bringing one up; it is taken down at the end"
"$rig" up

state=$(realpath -m "${BAKER_RIG_DIR:-target/rig}")
# The demo's operator watches every namespace and would act on the suite's Bakes too.
if [ -f "$state/demo/operator.pid" ] && kill -0 "$(cat "$state/demo/operator.pid")" 2>/dev/null; then
	log "stopping the demo's operator (it watches every namespace); make demo starts it again"
	kill "$(cat "$state/demo/operator.pid")" || true
	rm -f "$state/demo/operator.pid"
fi

BAKER_RIG_DIR=$state BAKER_BIN=$root/target/faults/baker "$harness" --size "$size" "$@"
