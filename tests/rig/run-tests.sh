#!/usr/bin/env bash
# `make test`: every test against the rig. If no rig was running, it brings one up and takes it
# down at the end, even when tests fail, then checks that nothing of it survived. A rig that was
# already running stays up (a half-dead one is repaired first).
#
# Every test runs (tests/rig/test-binaries.sh): the unit tests a binary at a time, the e2e binary
# a module at a time, each even when an earlier one failed; moto's EC2 state is reset before each
# e2e module, so no module depends on what another left behind. A summary line per unit (result,
# counts, seconds) closes that part. Then the fault suite runs, small (tests/rig/faults.sh).
# Exits non-zero if any unit or the fault suite failed, or if the rig's own checks did.
#
# Env: BAKER_RIG_DIR (state dir); ONLY=<filter>: run just `cargo test --test e2e --
# --include-ignored <filter>` instead (e.g. ONLY=bake_lifecycle::with_a_cap; libtest matches it
# anywhere in a test's path; one module at a time, see tests/e2e/main.rs); BAKER_TEST_SHUFFLE=SEED:
# run the units in a shuffled order.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
state=$(realpath -m "${BAKER_RIG_DIR:-$root/target/rig}")
export BAKER_RIG_DIR=$state
rig=$here/rig.sh
log() { printf '[make test] %s\n' "$*" >&2; }

"$rig" status >/dev/null 2>&1
case $? in
0) started=0; log "using the rig already running in $state" ;;
3) started=1; log "no rig in $state: bringing one up; it is taken down at the end" ;;
*) started=0; log "the rig in $state is half up: repairing it" ;;
esac

# The demo's operator watches every namespace and would act on the tests' Bakes too.
if [ -f "$state/demo/operator.pid" ] && kill -0 "$(cat "$state/demo/operator.pid")" 2>/dev/null; then
	log "stopping the demo's operator (it would reconcile the tests' Bakes); make demo starts it again"
	kill "$(cat "$state/demo/operator.pid")" 2>/dev/null || true
	rm -f "$state/demo/operator.pid"
fi

teardown() {
	local snap
	snap=$(mktemp -d "${TMPDIR:-/tmp}/baker-rig-snapshot.XXXXXX")
	cp -r "$state/pids" "$state/ports" "$snap/" 2>/dev/null || true
	local rc=0
	"$rig" down || rc=1
	"$here/check-down.sh" "$state" "$snap" || rc=1
	rm -rf "$snap"
	return "$rc"
}

trap 'log "interrupted"; [ "$started" = 1 ] && teardown; exit 130' INT TERM

start=$SECONDS
if ! "$rig" up; then
	log "FAIL: the rig did not come up"
	[ "$started" = 1 ] && teardown
	exit 1
fi
log "rig ready after $((SECONDS - start))s"
# A rig kept up across runs accumulates images, and moto's DescribeImages slows with them.
if ! "$rig" reset-ec2; then
	log "FAIL: could not reset the rig's EC2 state"
	[ "$started" = 1 ] && teardown
	exit 1
fi

# The images the `images` tests run with runc and the real node runs (rebuilt only when their
# inputs changed).
images_rc=0
if [ -z "${ONLY:-}" ] || [[ "$ONLY" == *images* ]] || [[ "$ONLY" == *real_node* ]]; then
	# With the debug operator the tests build anyway: a cold release build would add a quarter of
	# an hour on two cores. `make images` builds the release image.
	log "building the images with the debug operator (images/build.sh --if-stale)"
	start=$SECONDS
	if (cd "$root" && cargo build --quiet --bin baker) &&
		BAKER_BIN=${CARGO_TARGET_DIR:-$root/target}/debug/baker "$root/images/build.sh" --if-stale; then
		log "images ready after $((SECONDS - start))s"
	else
		log "FAIL: images/build.sh failed; the images tests fail with it"
		images_rc=1
	fi
fi

# The real node (a kubelet and containerd; tests/rig/real-node.sh) runs those images: started
# once they are built. Its tests (the `real_node` module) fail without it.
node_rc=0
if [ "$images_rc" = 0 ] && { [ -z "${ONLY:-}" ] || [[ "$ONLY" == *real_node* ]]; }; then
	log "starting the real node (tests/rig/rig.sh real-node)"
	if ! "$rig" real-node; then
		log "FAIL: the real node did not come up; the real_node tests fail with it"
		node_rc=1
	fi
fi

# shellcheck disable=SC1091
. "$state/env"
start=$SECONDS
if [ -n "${ONLY:-}" ]; then
	# Unquoted: several filters, or libtest flags such as --exact, may be given.
	# shellcheck disable=SC2086
	(cd "$root" && cargo test --test e2e -- --include-ignored $ONLY)
	tests_rc=$?
else
	"$here/test-binaries.sh"
	tests_rc=$?
	# The fault suite, small: each kind of fault over 12 Bakes (`make faults` runs 50).
	log "fault suite (small): tests/rig/faults.sh small"
	t=$SECONDS
	"$here/faults.sh" small
	faults_rc=$?
	log "fault suite exited $faults_rc after $((SECONDS - t))s"
	[ "$faults_rc" = 0 ] || tests_rc=$faults_rc
fi
log "tests exited $tests_rc after $((SECONDS - start))s"

checks_rc=0
"$here/second-rig.sh" "$state" || checks_rc=1
if [ "$started" = 1 ]; then
	teardown || checks_rc=1
fi

if [ "$tests_rc" != 0 ]; then
	exit "$tests_rc"
fi
if [ "$images_rc" != 0 ]; then
	log "FAIL: the images could not be built (see above)"
	exit 1
fi
if [ "$node_rc" != 0 ]; then
	log "FAIL: the real node did not come up (see above)"
	exit 1
fi
if [ "$checks_rc" != 0 ]; then
	log "FAIL: the rig's own checks failed (see above)"
	exit 1
fi
log "all passed"
