# Baker's developer entry points. `make` alone lists them.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
RIG := tests/rig/rig.sh

.PHONY: help rig-up rig-down rig-status test bench bench-ci lint fmt-check clippy fmt crds chart-crds demo demo-down demo-two-pass demo-two-pass-down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  %-12s %s\n", $$1, $$2 }'

rig-up: ## start the local rig on 127.0.0.1 (builds the control plane once per machine); state in target/rig
	$(RIG) up

rig-down: ## stop exactly what rig-up started and remove its state
	$(RIG) down

rig-status: ## show the rig's processes and ports
	$(RIG) status

test: ## all tests against the rig (brought up, and down at the end, if it was not up); CARGO_TEST_ARGS passes through
	tests/rig/run-tests.sh

bench: ## scale benchmark on the rig, full size, release operator (10-20 min): table, and target/bench/report.json
	@$(call bench_run,full,release,--release)

bench-ci: ## the same at small size with the debug operator; fails if a deterministic count misses its goal
	@$(call bench_run,small,debug,)

# $(1) size, $(2) profile directory, $(3) cargo flag. The operator is timed as it builds, then
# copied out of the (possibly shared) target dir so that no concurrent build replaces it
# mid-run. The harness only drives the rig: the dev profile, run directly rather than under
# `cargo bench`, so that `rig.sh up` can take cargo's lock to build the node. The rig is brought
# up as `make test` does it, and down at the end only if it was not up before.
define bench_run
target=$${CARGO_TARGET_DIR:-target}; built=$$target/$(2)/baker; \
cold=$$([ -x "$$built" ] && echo false || echo true); \
t0=$${EPOCHREALTIME/,/.}; cargo build $(3) --bin baker; t1=$${EPOCHREALTIME/,/.}; \
mkdir -p target/bench; cp "$$built" target/bench/baker-$(1); \
harness=$$(cargo bench --profile dev --bench scale --no-run --message-format=json-render-diagnostics \
	| grep '"kind":\["bench"\]' | grep '"name":"scale"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1); \
[ -n "$$harness" ] || { echo "make bench: cargo did not report the bench executable" >&2; exit 1; }; \
rig_rc=0; $(RIG) status >/dev/null 2>&1 || rig_rc=$$?; started=0; [ "$$rig_rc" != 3 ] || started=1; \
trap 'rc=$$?; if [ "$$started" = 1 ]; then $(RIG) down || rc=1; fi; exit $$rc' EXIT; \
[ "$$started" = 0 ] || echo "[make bench] no rig: bringing one up; it is taken down at the end" >&2; \
$(RIG) up; \
state=$$(realpath -m "$${BAKER_RIG_DIR:-target/rig}"); \
if [ -f "$$state/demo/operator.pid" ] && kill -0 "$$(cat "$$state/demo/operator.pid")" 2>/dev/null; then \
	echo "[make bench] stopping the demo's operator (it watches every namespace); make demo starts it again" >&2; \
	kill "$$(cat "$$state/demo/operator.pid")" || true; rm -f "$$state/demo/operator.pid"; fi; \
BAKER_RIG_DIR=$$state BAKER_BIN=$$PWD/target/bench/baker-$(1) "$$harness" --size $(1) --build-profile $(2) --built-at "$$built" \
	--build-seconds "$$(awk "BEGIN { print $$t1 - $$t0 }")" --build-cold "$$cold"
endef

lint: fmt-check clippy ## rustfmt check and clippy with warnings as errors (`make -k lint` runs both even if one fails)

fmt-check: ## check formatting
	cargo fmt --all --check

clippy: ## clippy on every target, warnings as errors
	cargo clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	cargo fmt --all

crds: ## regenerate the CRD manifests in crds/ and their copy in the Helm chart
	cargo run --quiet --bin baker -- crd --dir crds
	$(MAKE) chart-crds

chart-crds: ## copy crds/ into charts/baker/crds (a test checks they match)
	rm -f charts/baker/crds/*.yaml
	cp crds/*.yaml charts/baker/crds/

demo: ## run the demo on the rig
	tests/rig/demo.sh

demo-down: ## stop the demo
	tests/rig/demo.sh down

demo-two-pass: ## two-pass baking on the rig: a base image, its catalog, a service baked from a catalog
	tests/rig/demo-two-pass.sh

demo-two-pass-down: ## stop the two-pass demo's operator
	tests/rig/demo-two-pass.sh down
