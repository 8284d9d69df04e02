#!/usr/bin/env bash
# Checks, beside a running rig, that a second rig in another directory comes up on other ports and
# that its `down` leaves nothing running. `make test` runs it after the Rust tests.
#
# Usage: tests/rig/second-rig.sh [FIRST_STATE_DIR]   (default: $BAKER_RIG_DIR or target/rig)
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
first=$(realpath -m "${1:-${BAKER_RIG_DIR:-$root/target/rig}}")
work=$(mktemp -d "${TMPDIR:-/tmp}/baker-second-rig.XXXXXX")
second=$work/rig
log() { printf '[second-rig] %s\n' "$*" >&2; }
rc=0

# Reuse the first rig's node binary rather than going through cargo again.
node_bin=$(cat "$first/node-bin" 2>/dev/null || true)
[ -x "$node_bin" ] && export BAKER_RIG_NODE_BIN=$node_bin

log "starting a second rig in $second"
start=$SECONDS
if BAKER_RIG_DIR=$second "$here/rig.sh" up; then
	log "second rig up in $((SECONDS - start))s"
	if [ -f "$first/ports" ]; then
		both=$(sed -n 's/^[A-Z_]*=//p' "$first/ports" "$second/ports" | sort | uniq -d)
		if [ -n "$both" ]; then
			log "FAIL: the two rigs share ports: $both"
			rc=1
		else
			log "ok: no port shared with the rig in $first"
		fi
	else
		log "note: no first rig in $first to compare ports with"
	fi
else
	log "FAIL: the second rig did not come up (logs above)"
	rc=1
fi

# Take it down whatever happened, then check that nothing survived.
mkdir -p "$work/snapshot"
cp -r "$second/pids" "$second/ports" "$work/snapshot/" 2>/dev/null || true
BAKER_RIG_DIR=$second "$here/rig.sh" down || rc=1
"$here/check-down.sh" "$second" "$work/snapshot" || rc=1
rm -rf "$work"
exit "$rc"
