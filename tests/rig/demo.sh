#!/usr/bin/env bash
# The demo: a Bake to a real AMI id on the local rig.
#   tests/rig/demo.sh        bring the rig up, install Baker, bake examples/bake.yaml
#   tests/rig/demo.sh down   stop the demo operator and take the rig down
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
rig_dir=${BAKER_RIG_DIR:-$root/target/rig}
demo_dir="$rig_dir/demo"
ns=baker-demo
bake=simple-service-1.0.4

# shellcheck source=tests/rig/demo-lib.sh
source "$root/tests/rig/demo-lib.sh"

if [ "${1:-up}" = down ]; then
	stop_operator
	tests/rig/rig.sh down
	exit 0
fi

say "Starting the local rig (first run on a machine builds the control plane: about 10 minutes)"
tests/rig/rig.sh up
# shellcheck disable=SC1091
source "$rig_dir/env"

say "Building baker"
cargo build --quiet --bin baker
baker_bin="${CARGO_TARGET_DIR:-$root/target}/debug/baker"

say "Installing the CRDs and the rig's ebs-example BakeTemplate"
kubectl apply --server-side --field-manager=baker-demo -f crds/
kubectl wait --for=condition=Established --timeout=60s -f crds/
kubectl apply --server-side --field-manager=baker-demo -f examples/rig/ebs-example.yaml

say "Creating namespace $ns and the AWS credentials Secret bake pods read"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
# The rig's EC2 endpoint accepts any credentials; real clusters use IRSA or their own Secret.
kubectl -n "$ns" create secret generic aws-credentials \
	--from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
	--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
	--dry-run=client -o yaml | kubectl apply -f - >/dev/null

say "Applying examples/rig/catalog.yaml (the AmiCatalog of simple-service)"
kubectl -n "$ns" apply -f examples/rig/catalog.yaml

ensure_curl
say "Starting the operator with its HTTP API (log: $demo_dir/operator.log)"
mkdir -p "$demo_dir"
stop_operator
# A loopback port of its own and a fresh token for POST /bake, readable by this user only.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
api="http://127.0.0.1:$port"
(umask 077 && python3 -c 'import secrets; print(secrets.token_hex(16))' >"$demo_dir/api-token")
BAKER_AWS_CREDENTIALS_SECRET=aws-credentials BAKER_LOG_FORMAT=text \
	BAKER_HTTP_ADDR="127.0.0.1:$port" BAKER_SEED_API=true \
	BAKER_SEED_API_TOKEN_FILE="$demo_dir/api-token" BAKER_SEED_API_NAMESPACE="$ns" \
	setsid nohup "$baker_bin" run >"$demo_dir/operator.log" 2>&1 </dev/null &
echo $! >"$demo_dir/operator.pid"
echo "$api" >"$demo_dir/api-url"

say "Applying examples/bake.yaml"
kubectl -n "$ns" delete bake "$bake" --ignore-not-found --wait=true >/dev/null
kubectl -n "$ns" apply -f examples/bake.yaml

say "kubectl get bakes -w (until the Bake is Ready)"
kubectl -n "$ns" get bakes -w &
watch_pid=$!
if ! kubectl -n "$ns" wait --for=condition=Ready "bake/$bake" --timeout=300s >/dev/null; then
	kill "$watch_pid" 2>/dev/null || true
	echo "The Bake did not become Ready. Its status and the operator's log:" >&2
	kubectl -n "$ns" get bake "$bake" -o yaml >&2 || true
	tail -n 40 "$demo_dir/operator.log" >&2 || true
	exit 1
fi
sleep 1 # let the watch print the final line
kill "$watch_pid" 2>/dev/null || true
wait "$watch_pid" 2>/dev/null || true

ami=$(kubectl -n "$ns" get bake "$bake" -o jsonpath='{.status.amiId}')
pod=$(kubectl -n "$ns" get bake "$bake" -o jsonpath='{.status.podName}')
say "Baked $ami"

say "The original service's HTTP API: POST /bake/ebs-example/simple-service/1.0.5/hvm"
curl -sS -N --max-time 300 -X POST -H "Authorization: Bearer $(cat "$demo_dir/api-token")" \
	"$api/bake/ebs-example/simple-service/1.0.5/hvm" | tee "$demo_dir/api-bake.log"
tail -n 1 "$demo_dir/api-bake.log" | grep -q '^phase=Succeeded amiId=ami-' ||
	{ echo "POST /bake did not end with a succeeded phase and an AMI id" >&2; exit 1; }

say "GET /amis/simple-service (from the AmiCatalog)"
for _ in $(seq 100); do
	listed=$(curl -sS -H "Authorization: Bearer $(cat "$demo_dir/api-token")" "$api/amis/simple-service")
	grep -q "$ami" <<<"$listed" && break
	sleep 0.2
done
python3 -m json.tool <<<"$listed"
kubectl -n "$ns" get amicatalogs

say "GET /metrics (the baker_ series)"
curl -sS "$api/metrics" | grep -E '^baker_(bakes|queue_depth|catalog_images|leader)' || true

printf '\nAMI id: %s\n\nWhere to look next:\n' "$ami"
while IFS='|' read -r cmd why; do
	printf '  %-60s # %s\n' "$cmd" "$why"
done <<EOF
source $rig_dir/env|point kubectl and AWS tools at the rig
kubectl -n $ns get bakes|the Bakes and their AMIs
kubectl -n $ns describe bake $bake|conditions and events
kubectl -n $ns logs pod/$pod|packer's output
kubectl -n $ns get bake $bake -o yaml|full status: source image, pod, times
kubectl -n $ns get amicatalogs|the newest images of simple-service
curl -H "Authorization: Bearer \$(cat $demo_dir/api-token)" $api/amis/simple-service|the same through the HTTP API (token needed)
curl $api/metrics|Prometheus metrics
tests/rig/demo.sh down|stop the operator and the rig (make demo-down)
EOF
