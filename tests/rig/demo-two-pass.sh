#!/usr/bin/env bash
# Two-pass baking on the local rig: bake a base image, see the `base` AmiCatalog list it within
# seconds, then bake simple-service 1.0.4 from a catalog and check its lineage.
#   tests/rig/demo-two-pass.sh        run it (brings the rig up if it is not)
#   tests/rig/demo-two-pass.sh down   stop the demo's operator (the rig stays up)
# On the rig, pass two starts from the `rig-base` catalog, not `base`: see
# examples/rig/two-pass/templates.yaml for why (moto's baked AMIs cannot be packer sources).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
rig_dir=${BAKER_RIG_DIR:-$root/target/rig}
demo_dir="$rig_dir/demo-two-pass"
ns=baker-two-pass

# shellcheck source=tests/rig/demo-lib.sh
source "$root/tests/rig/demo-lib.sh"

if [ "${1:-up}" = down ]; then
	stop_operator
	exit 0
fi

# An already running rig is used as it is.
if ! { [ -f "$rig_dir/env" ] && KUBECONFIG="$rig_dir/kubeconfig" \
	"$(. "$rig_dir/env" && echo "$BAKER_RIG_BIN")/kubectl" get --raw /readyz >/dev/null 2>&1; }; then
	say "Starting the local rig"
	tests/rig/rig.sh up
fi
# shellcheck disable=SC1091
source "$rig_dir/env"

say "Building baker"
cargo build --quiet --bin baker
baker_bin="${CARGO_TARGET_DIR:-$root/target}/debug/baker"

say "Installing the CRDs and the rig's two-pass BakeTemplates"
kubectl apply --server-side --field-manager=baker-demo -f crds/
kubectl wait --for=condition=Established --timeout=60s -f crds/
kubectl apply --server-side --field-manager=baker-demo -f examples/rig/two-pass/templates.yaml

say "Namespace $ns, the AWS credentials Secret, the catalogs"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$ns" create secret generic aws-credentials \
	--from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
	--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
	--dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$ns" apply --server-side --field-manager=baker-demo -f examples/rig/two-pass/catalogs.yaml

say "Starting the operator for namespace $ns (log: $demo_dir/operator.log)"
mkdir -p "$demo_dir"
stop_operator
BAKER_AWS_CREDENTIALS_SECRET=aws-credentials BAKER_LOG_FORMAT=text \
	setsid nohup "$baker_bin" run --namespace "$ns" >"$demo_dir/operator.log" 2>&1 </dev/null &
echo $! >"$demo_dir/operator.pid"
# A rerun starts afresh: the operator lets earlier Bakes go (its finalizer sweeps their EC2 leftovers).
kubectl -n "$ns" delete bakes --all --wait=true --timeout=120s >/dev/null
kubectl -n "$ns" wait --for=condition=Ready amicatalog --all --timeout=60s >/dev/null

wait_ready() { # bake
	if ! kubectl -n "$ns" wait --for=condition=Ready "bake/$1" --timeout=300s >/dev/null; then
		echo "Bake $1 did not become Ready:" >&2
		kubectl -n "$ns" get bake "$1" -o yaml >&2 || true
		tail -n 40 "$demo_dir/operator.log" >&2 || true
		exit 1
	fi
}

say "Pass one: bake the base image"
kubectl -n "$ns" apply -f examples/two-pass/base-bake.yaml
wait_ready base-2026.11.0
base_ami=$(kubectl -n "$ns" get bake base-2026.11.0 -o jsonpath='{.status.amiId}')
kubectl -n "$ns" get bakes

say "The base catalog lists $base_ami without waiting for its interval"
kubectl -n "$ns" wait --for="jsonpath={.status.latest.imageId}=$base_ami" amicatalog/base --timeout=30s >/dev/null
kubectl -n "$ns" get amicatalogs

say "Pass two: simple-service 1.0.4 from a catalog's latest image"
kubectl -n "$ns" apply -f examples/two-pass/service-bake.yaml
wait_ready simple-service-1.0.4
kubectl -n "$ns" get bakes
ami=$(kubectl -n "$ns" get bake simple-service-1.0.4 -o jsonpath='{.status.amiId}')
source_ami=$(kubectl -n "$ns" get bake simple-service-1.0.4 -o jsonpath='{.status.sourceAmiId}')
kubectl -n "$ns" wait --for="jsonpath={.status.latest.imageId}=$ami" amicatalog/simple-service --timeout=30s >/dev/null
kubectl -n "$ns" get amicatalogs

cat <<EOT

simple-service AMI $ami was baked from $source_ami (status.sourceAmiId; tag baker.io/source-ami).
On AWS, examples/two-pass/service-template.yaml takes the \`base\` catalog instead, so the service
is baked from the latest base (here that would be $base_ami).

  source $rig_dir/env
  kubectl -n $ns get amicatalog base -o yaml     # the base images, newest first
  kubectl -n $ns get bake simple-service-1.0.4 -o yaml
  tests/rig/demo-two-pass.sh down                # stop the demo's operator (make demo-two-pass-down)
EOT
