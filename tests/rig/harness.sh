# Sourced by bench.sh and faults.sh, which set $rig (rig.sh) and log() first: what both do to run
# a harness of benches/ against the rig.

# harness_executable <name>: builds benches/<name>.rs with the dev profile (it only drives the
# rig; built and run directly, not under `cargo bench`, so cargo's lock stays free for
# `rig.sh up`) and prints the executable's path.
harness_executable() {
	local name=$1 exe
	exe=$(cargo bench --profile dev --bench "$name" --no-run --message-format=json-render-diagnostics |
		grep '"kind":\["bench"\]' | grep "\"name\":\"$name\"" |
		sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
	[ -n "$exe" ] || { log "cargo did not report the $name executable"; return 1; }
	printf '%s\n' "$exe"
}

# rig_for_harness: brings the rig up as `make test` does, down at exit only if it was not up
# before; stops the demo's operator, which watches every namespace and would act on the
# harness's Bakes too. Sets $state, the rig's state dir.
rig_for_harness() {
	local rig_rc=0
	"$rig" status >/dev/null 2>&1 || rig_rc=$?
	started=0
	[ "$rig_rc" != 3 ] || started=1
	trap 'rc=$?; if [ "$started" = 1 ]; then "$rig" down || rc=1; fi; exit $rc' EXIT
	[ "$started" = 0 ] || log "no rig: bringing one up; it is taken down at the end"
	"$rig" up
	state=$(realpath -m "${BAKER_RIG_DIR:-target/rig}")
	if [ -f "$state/demo/operator.pid" ] && kill -0 "$(cat "$state/demo/operator.pid")" 2>/dev/null; then
		log "stopping the demo's operator (it watches every namespace); make demo starts it again"
		kill "$(cat "$state/demo/operator.pid")" || true
		rm -f "$state/demo/operator.pid"
	fi
}
