#!/usr/bin/env bash
# Runs every test binary of the workspace, one after another, against a running rig: builds them
# all in one `cargo test --no-run` (one feature resolution, so nothing is built twice), then runs
# each executable from its package's directory as cargo would, resetting moto's EC2 state before
# each binary that uses the rig. Never stops at the first failure. Prints one summary line per
# binary and a closing "N passed, N failed" line; each binary's output is kept in
# target/test-logs/.
#
# BAKER_TEST_SHUFFLE=SEED runs the binaries in an order shuffled by SEED (reproducible), to show
# that none depends on another having run first.
#
# Called by run-tests.sh (`make test`), which brings the rig up and sources its env first.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
logs=$root/target/test-logs
log() { printf '[make test] %s\n' "$*" >&2; }
cd "$root" || exit 1
rm -rf "$logs" && mkdir -p "$logs"

log "building every test binary"
t=$SECONDS
if ! cargo test --workspace --no-run --message-format=json-render-diagnostics >"$logs/build.json"; then
	log "FAIL: the tests do not build"
	exit 1
fi
log "built in $((SECONDS - t))s"

# "package kind name dir executable" per test binary. Binaries of the pure parts (libs, bins,
# the node crate) need no EC2 reset.
binaries=$(python3 -c '
import json, os, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    pkg = m["package_id"].split("#")[-1].split("@")[0].split("/")[-1]
    t = m["target"]
    print(pkg, t["kind"][0], t["name"], os.path.dirname(m["manifest_path"]), m["executable"])
' "$logs/build.json" | sort -k1,1 -k2,2 -k3,3) || { log "FAIL: cannot read cargo's list of test binaries"; exit 1; }
[ -n "$binaries" ] || { log "FAIL: cargo built no test binary"; exit 1; }
if [ -n "${BAKER_TEST_SHUFFLE:-}" ]; then
	binaries=$(shuf --random-source=<(yes "$BAKER_TEST_SHUFFLE") <<<"$binaries")
	log "order shuffled with seed $BAKER_TEST_SHUFFLE: $(awk '{ printf "%s ", $3 }' <<<"$binaries")"
fi

summary=() passed=0 failed=0 bad=0
while read -r pkg kind name dir exe; do
	label="$pkg $kind $name"
	out=$logs/$pkg-$kind-$name.log
	if [ "$kind" = test ] && [ "$pkg" = baker ]; then
		if ! "$here/rig.sh" reset-ec2 >"$out" 2>&1; then
			log "FAIL: could not reset the rig's EC2 state before $label"
			summary+=("FAIL  $label  (EC2 reset failed, see $out)")
			bad=$((bad + 1))
			continue
		fi
	fi
	log "running $label"
	t=$SECONDS
	(cd "$dir" && "$exe") 2>&1 | tee -a "$out"
	rc=${PIPESTATUS[0]}
	secs=$((SECONDS - t))
	read -r p f < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$out" |
		awk '{ p += $1; f += $2 } END { print p + 0, f + 0 }')
	passed=$((passed + p)) failed=$((failed + f))
	if [ "$rc" = 0 ]; then
		summary+=("$(printf 'ok    %-40s %4d passed            %5ds' "$label" "$p" "$secs")")
	else
		bad=$((bad + 1))
		summary+=("$(printf 'FAIL  %-40s %4d passed %4d failed %5ds (exit %d)' "$label" "$p" "$f" "$secs" "$rc")")
	fi
done <<<"$binaries"

log "summary (each binary's output in target/test-logs/):"
for line in "${summary[@]}"; do
	printf '  %s\n' "$line" >&2
done
# A binary that failed without a failing test (it crashed, or could not start) still counts.
[ "$bad" -gt 0 ] && [ "$failed" = 0 ] && failed=$bad
printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$bad" = 0 ]
