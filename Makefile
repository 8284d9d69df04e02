# Baker's developer entry points. `make` alone lists them.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
RIG := tests/rig/rig.sh

.PHONY: help rig-up rig-real-node rig-down rig-status images test bench bench-ci faults lint fmt-check clippy fmt crds chart-crds demo demo-down demo-two-pass demo-two-pass-down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  %-14s %s\n", $$1, $$2 }'

rig-up: ## start the local rig on 127.0.0.1 (builds the control plane once per machine); state in target/rig
	$(RIG) up

rig-real-node: ## add the real node (kubelet, containerd, runc) to the rig, running the images of `make images`
	@[ -s target/images/operator.oci.tar ] && [ -s target/images/bake.oci.tar ] || images/build.sh
	$(RIG) real-node

rig-down: ## stop exactly what rig-up started and remove its state
	$(RIG) down

rig-status: ## show the rig's processes and ports
	$(RIG) status

images: ## build the operator and bake images from Debian packages (mmdebstrap, umoci; no registry): OCI archives in target/images
	images/build.sh

test: ## all tests against the rig (brought up, and down at the end, if it was not up); ONLY=<filter> runs just the e2e tests matching it
	tests/rig/run-tests.sh

bench: ## scale benchmark on the rig, full size, release operator (about 15 min): table, and target/bench/report.json
	tests/rig/bench.sh full

bench-ci: ## the same at small size with the debug operator (a few minutes); fails if a count misses its goal
	tests/rig/bench.sh small

faults: ## fault suite on the rig (EC2 faults, operator/apiserver/etcd/node/packer/leader kills; 50 Bakes each): table, and target/faults/report.json
	tests/rig/faults.sh full

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
