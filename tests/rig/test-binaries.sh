#!/usr/bin/env bash
# Runs every test of the workspace, one unit after another, against a running rig: builds all test
# binaries in one `cargo test --no-run` (one feature resolution, so nothing is built twice), then
# runs each from its package's directory as cargo would. The unit tests (lib, bin, the node crate)
# run a binary at a time. The e2e binary (tests/e2e) runs once per module, with its ignored tests
# included, and moto's EC2 state is reset before each module: a module is what used to be a test
# binary of its own, and modules may not share the rig (see tests/e2e/main.rs). Never stops at the
# first failure. Prints one summary line per unit and a closing "N passed, N failed" line; each
# unit's output is kept in target/test-logs/.
#
# A module's tests are named exactly (`--exact` with every `<module>::` name from `--list`):
# libtest's filters match anywhere in a test's path, so a bare `rig::` filter would also pick up
# any test whose path holds `rig::` deeper down.
#
# BAKER_TEST_SHUFFLE=SEED runs the units in an order shuffled by SEED (reproducible), to show that
# none depends on another having run first.
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

# "package kind name dir executable" per test binary.
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

# Per unit, tab-separated: label, dir, executable, and "-" to run the whole binary, else the e2e
# module whose tests the unit runs. Only e2e modules use the rig.
units=()
while read -r pkg kind name dir exe; do
	if [ "$pkg $kind $name" != "baker test e2e" ]; then
		units+=("$pkg $kind $name"$'\t'"$dir"$'\t'"$exe"$'\t'-)
		continue
	fi
	modules=$(cd "$dir" && "$exe" --list --format terse | sed -n 's/^\([a-z0-9_]*\)::.*: test$/\1/p' | sort -u)
	[ -n "$modules" ] || { log "FAIL: the e2e binary lists no test"; exit 1; }
	for module in $modules; do
		units+=("baker e2e $module"$'\t'"$dir"$'\t'"$exe"$'\t'"$module")
	done
done <<<"$binaries"
if [ -n "${BAKER_TEST_SHUFFLE:-}" ]; then
	mapfile -t units < <(printf '%s\n' "${units[@]}" | shuf --random-source=<(yes "$BAKER_TEST_SHUFFLE"))
	log "order shuffled with seed $BAKER_TEST_SHUFFLE: $(printf '%s\n' "${units[@]}" | cut -f1 | awk '{ printf "%s ", $3 }')"
fi

summary=() passed=0 failed=0 bad=0
for unit in "${units[@]}"; do
	IFS=$'\t' read -r label dir exe module <<<"$unit"
	out=$logs/${label// /-}.log
	args=()
	if [ "$module" != - ]; then
		if ! "$here/rig.sh" reset-ec2 >"$out" 2>&1; then
			log "FAIL: could not reset the rig's EC2 state before $label"
			summary+=("FAIL  $label  (EC2 reset failed, see $out)")
			bad=$((bad + 1))
			continue
		fi
		mapfile -t names < <(cd "$dir" && "$exe" --list --format terse | sed -n "s/^\($module::.*\): test\$/\1/p")
		args=(--include-ignored --exact "${names[@]}")
	fi
	log "running $label"
	t=$SECONDS
	(cd "$dir" && "$exe" "${args[@]}") 2>&1 | tee -a "$out"
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
done

log "summary (each unit's output in target/test-logs/):"
for line in "${summary[@]}"; do
	printf '  %s\n' "$line" >&2
done
# A unit that failed without a failing test (it crashed, or could not start) still counts.
[ "$bad" -gt 0 ] && [ "$failed" = 0 ] && failed=$bad
printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$bad" = 0 ]
