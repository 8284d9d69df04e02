#!/usr/bin/env bash
# Runs every test binary of the workspace, one after another, against a running rig: builds them
# all first, then runs each with `cargo test`, resetting moto's EC2 state before each binary that
# uses the rig. Never stops at the first failure. Prints one summary line per binary and a closing
# "N passed, N failed" line; each binary's output is kept in target/test-logs/.
#
# Called by run-tests.sh (`make test`), which brings the rig up and sources its env first.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
logs=$root/target/test-logs
log() { printf '[make test] %s\n' "$*" >&2; }
cd "$root" || exit 1

# "package kind name" for every lib, bin and test target, libs' doc tests too. Binaries whose
# tests are pure (libs, bins, doc tests, the node crate) need no EC2 reset.
targets=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        kind = t["kind"][0]
        if kind in ("lib", "bin", "test"):
            print(p["name"], kind, t["name"])
        if kind == "lib" and t.get("doctest", True):
            print(p["name"], "doc", t["name"])
') || { log "FAIL: cargo metadata"; exit 1; }

log "building every test binary"
t=$SECONDS
if ! cargo test --workspace --no-run; then
	log "FAIL: the tests do not build"
	exit 1
fi
log "built in $((SECONDS - t))s"

rm -rf "$logs" && mkdir -p "$logs"
summary=() passed=0 failed=0 bad=0
while read -r pkg kind name; do
	case $kind in
	lib) args=(--lib) ;;
	bin) args=(--bin "$name") ;;
	doc) args=(--doc) ;;
	test) args=(--test "$name") ;;
	esac
	label="$pkg $kind $name"
	if [ "$kind" = test ] && [ "$pkg" = baker ]; then
		"$here/rig.sh" reset-ec2 >/dev/null 2>&1 || {
			log "FAIL: could not reset the rig's EC2 state before $label"
			summary+=("FAIL  $label  (EC2 reset failed)")
			bad=$((bad + 1))
			continue
		}
	fi
	log "running $label"
	t=$SECONDS
	cargo test -p "$pkg" "${args[@]}" 2>&1 | tee "$logs/$pkg-$kind-$name.log"
	rc=${PIPESTATUS[0]}
	secs=$((SECONDS - t))
	# Sum the "test result:" lines of this binary.
	read -r p f < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' \
		"$logs/$pkg-$kind-$name.log" | awk '{ p += $1; f += $2 } END { print p + 0, f + 0 }')
	passed=$((passed + p)) failed=$((failed + f))
	if [ "$rc" = 0 ]; then
		summary+=("$(printf 'ok    %-40s %4d passed %5ds' "$label" "$p" "$secs")")
	else
		bad=$((bad + 1))
		summary+=("$(printf 'FAIL  %-40s %4d passed %3d failed %5ds (exit %d)' "$label" "$p" "$f" "$secs" "$rc")")
	fi
done <<<"$targets"

log "summary (logs in target/test-logs):"
for line in "${summary[@]}"; do
	printf '  %s\n' "$line" >&2
done
[ "$bad" -gt 0 ] && [ "$failed" = 0 ] && failed=$bad
printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$bad" = 0 ]
