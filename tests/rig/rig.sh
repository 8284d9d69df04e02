#!/usr/bin/env bash
# The local rig: a real Kubernetes control plane, moto's EC2 endpoint and a local node, all on
# 127.0.0.1, for the integration tests and the demo.
#
# Usage: tests/rig/rig.sh up|down|status|leftovers
#   up      build what is missing (once per machine), start what is not running, wait until ready.
#           Idempotent: a second `up` returns quickly, a half-dead rig is repaired.
#   down    stop exactly the processes this rig started, then remove its state directory.
#   status  print each component; exit 0 if all run, 3 if none does (or no rig), 1 if some do.
#   leftovers  list processes of this rig still running (exit 1 if any); used after `down`.
#   real-node  start the real node (kubelet and containerd, see real-node.sh) on a running rig;
#           needs `make images`. `up` starts it too when BAKER_RIG_REAL_NODE=1.
#   reset-ec2  empty moto's EC2 state (back to the rig's source images). moto renders
#           DescribeImages in time that grows with images times tags, so a long-lived rig slows
#           down; `make test` resets it before the tests.
#
# Env:
#   BAKER_RIG_DIR        state directory (default: <repo>/target/rig): kubeconfig, env, logs/, pids/
#   BAKER_CACHE_DIR      per-machine cache (default: ${XDG_CACHE_HOME:-$HOME/.cache}/baker)
#   BAKER_RIG_NODE_NAME  the local node's name (default: baker-rig-node)
#   BAKER_RIG_NODE_BIN   use this baker-rig-node binary instead of building it with cargo
#   BAKER_RIG_REAL_NODE  1: `up` also starts the real node
#   CARGO_TARGET_DIR     honoured when building the node
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${BAKER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/baker}
MOTO_VERSION=5.2.5
PACKER_WANT=1.6.6
REGION=us-east-1
NODE_NAME=${BAKER_RIG_NODE_NAME:-baker-rig-node}
# Components in start order; `down` stops them in reverse, the node first, so that its pods go
# with it before the apiserver does.
COMPONENTS=(moto etcd kube-apiserver kube-controller-manager kube-scheduler node)

state=$(realpath -m "${BAKER_RIG_DIR:-$root/target/rig}")
pki=$state/pki logs=$state/logs pids=$state/pids
# shellcheck source=tests/rig/real-node.sh
. "$here/real-node.sh"

# Packer phones home (checkpoint) unless told not to; the rig never dials beyond loopback.
export CHECKPOINT_DISABLE=1

log() { printf '[rig] %s\n' "$*" >&2; }
die() { printf '[rig] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Processes. Every process the rig starts carries BAKER_RIG_INSTANCE=<state dir> in its
# environment, so that a recorded pid is only trusted (and killed) if it is still ours.

pid_of() { cat "$pids/$1.pid" 2>/dev/null || true; }

ours() { # pid: is it alive and started by this rig? (A zombie has an empty environ.)
	[ -n "$1" ] && grep -qszxF "BAKER_RIG_INSTANCE=$state" "/proc/$1/environ"
}

alive() { ours "$(pid_of "$1")"; }

launch() { # name cmd...: start detached from the caller (own session, no terminal, no inherited fds)
	local name=$1; shift
	mkdir -p "$logs" "$pids"
	rm -f "$pids/$name.pid"
	printf '=== %s: starting %s\n' "$(date -u +%FT%TZ)" "$name" >>"$logs/$name.log"
	# The child writes its own pid before exec, which stays right even if setsid has to fork.
	# fd 9 is the machine-wide lock; a daemon must not keep holding it.
	# shellcheck disable=SC2016 # $$ and "$@" are the child's
	# Its working directory is the state dir, so it pins no directory of the caller's.
	(cd "$state" && BAKER_RIG_INSTANCE=$state exec setsid bash -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' \
		"$pids/$name.pid" "$@") </dev/null >>"$logs/$name.log" 2>&1 9>&- &
	local i
	for i in $(seq 100); do
		[ -s "$pids/$name.pid" ] && return
		sleep 0.05
	done
	die "$name did not start; see $logs/$name.log"
}

wait_for() { # name timeout-seconds what cmd...: poll cmd until it succeeds, fail fast if name died
	local name=$1 timeout=$2 what=$3; shift 3
	local deadline=$((SECONDS + timeout)) t0=${EPOCHREALTIME/,/.}
	while ! "$@" >/dev/null 2>&1; do
		if ! alive "$name"; then
			tail -n 20 "$logs/$name.log" >&2 || true
			die "$name exited while waiting for $what; see $logs/$name.log"
		fi
		if ((SECONDS >= deadline)); then
			tail -n 20 "$logs/$name.log" >&2 || true
			die "timed out after ${timeout}s waiting for $what; see $logs/$name.log"
		fi
		sleep 0.25
	done
	log "$(awk -v a="$t0" -v b="${EPOCHREALTIME/,/.}" -v n="$name" -v w="$what" 'BEGIN { printf "%-23s %4.1fs  %s", n, b - a, w }')"
}

# ---------------------------------------------------------------------------------------------
# Prerequisites: tools (cached per machine), packer, moto's virtualenv, the node binary.

ensure_tools() {
	bin=$("$here/build-tools.sh" all | tail -n 1) || die "tests/rig/build-tools.sh failed"
	local t
	for t in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm kubelet containerd; do
		[ -x "$bin/$t" ] || die "$bin/$t is missing after tests/rig/build-tools.sh"
	done
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

ensure_packer() {
	if ! command -v packer >/dev/null; then
		log "packer is missing: installing Debian's packer package"
		if ! { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
			as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq packer >/dev/null; }; then
			die "could not install packer; run: sudo apt-get update && sudo apt-get install packer"
		fi
	fi
	local v
	v=$(packer version 2>/dev/null | sed -n 's/^Packer v\([0-9.]*\).*/\1/p' | head -n 1)
	if [ "$v" = "$PACKER_WANT" ]; then
		log "packer $v ($(command -v packer))"
	else
		log "warning: packer ${v:-of unknown version} at $(command -v packer); the rig is tested with $PACKER_WANT (Debian's package)"
	fi
}

ensure_moto() {
	venv=$cache/venv-moto-$MOTO_VERSION
	local have
	have=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null || true)
	if [ "$have" = "$MOTO_VERSION" ] && [ -x "$venv/bin/moto_server" ]; then
		return
	fi
	log "creating the moto $MOTO_VERSION virtualenv in $venv"
	command -v python3 >/dev/null || die "python3 is required for moto"
	rm -rf "$venv"
	mkdir -p "$cache"
	python3 -m venv "$venv" || die "python3 -m venv failed; on Debian: apt-get install python3-venv"
	"$venv/bin/pip" install --disable-pip-version-check -q "moto[server]==$MOTO_VERSION" ||
		{ rm -rf "$venv"; die "pip install moto[server]==$MOTO_VERSION failed"; }
}

ensure_node() {
	if [ -n "${BAKER_RIG_NODE_BIN:-}" ]; then
		node_bin=$BAKER_RIG_NODE_BIN
		[ -x "$node_bin" ] || die "BAKER_RIG_NODE_BIN=$node_bin is not an executable"
		return
	fi
	local target=${CARGO_TARGET_DIR:-$root/target}
	case $target in /*) ;; *) target=$root/$target ;; esac
	# Until the node crate is a workspace member it is built on its own, into the same target dir.
	if (cd "$root" && cargo pkgid -q baker-rig-node >/dev/null 2>&1); then
		(cd "$root" && cargo build -p baker-rig-node) || die "cargo build -p baker-rig-node failed"
	else
		cargo build --manifest-path "$here/node/Cargo.toml" --target-dir "$target" ||
			die "cargo build of tests/rig/node failed"
	fi
	node_bin=$target/debug/baker-rig-node
	[ -x "$node_bin" ] || die "$node_bin is missing after the build"
}

# ---------------------------------------------------------------------------------------------
# PKI (openssl). EC P-256 keys in PKCS#8, SANs and EKUs as rustls wants them. Made once per rig.

mkcert() { # name subject ext
	local name=$1 subj=$2 ext=$3
	[ -s "$pki/$name.crt" ] && return
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$pki/$name.key" \
		-out "$pki/$name.csr" -subj "$subj" 2>/dev/null
	openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
		-days 365 -out "$pki/$name.crt.tmp" -extfile <(printf '%s\nbasicConstraints=CA:FALSE\n' "$ext") 2>/dev/null
	mv "$pki/$name.crt.tmp" "$pki/$name.crt"
	rm -f "$pki/$name.csr"
}

ensure_pki() {
	command -v openssl >/dev/null || die "openssl is required"
	mkdir -p "$pki"
	chmod 700 "$pki"
	if [ ! -s "$pki/ca.crt" ]; then
		openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
			-keyout "$pki/ca.key" -out "$pki/ca.crt.tmp" -subj "/CN=baker-rig-ca" 2>/dev/null
		mv "$pki/ca.crt.tmp" "$pki/ca.crt"
	fi
	local server='subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature'
	# 10.0.0.1 is the `kubernetes` Service's address, where pods on the real node find the API server.
	local apiserver='subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature'
	local client='extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature'
	mkcert apiserver "/CN=kube-apiserver" "$apiserver"
	mkcert node-serving "/CN=$NODE_NAME" "$server"
	mkcert admin "/O=system:masters/CN=baker-rig-admin" "$client"
	mkcert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
	# The controller-manager and scheduler run as their real identities, bound by bootstrap RBAC.
	mkcert kube-controller-manager "/CN=system:kube-controller-manager" "$client"
	mkcert kube-scheduler "/CN=system:kube-scheduler" "$client"
	# Without the Node authorizer no role is bound to system:nodes, so the node is a master.
	mkcert node "/O=system:nodes/O=system:masters/CN=system:node:$NODE_NAME" "$client"
	mkcert real-node "/O=system:nodes/O=system:masters/CN=system:node:$REAL_NODE_NAME" "$client"
	mkcert kubelet-serving "/CN=$REAL_NODE_NAME" "$server"
	if [ ! -s "$pki/sa.pub" ]; then
		openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
		openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub.tmp" 2>/dev/null
		mv "$pki/sa.pub.tmp" "$pki/sa.pub"
	fi
}

kubeconfig() { # file client-cert-name
	local b64='base64 -w0'
	cat >"$1.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: baker-rig
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $($b64 <"$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $($b64 <"$pki/$2.crt")
    client-key-data: $($b64 <"$pki/$2.key")
contexts:
- name: baker-rig
  context:
    cluster: baker-rig
    user: $2
current-context: baker-rig
EOF
	chmod 600 "$1.tmp"
	mv "$1.tmp" "$1"
}

# ---------------------------------------------------------------------------------------------
# Ports: picked free at the first `up`, recorded in <state>/ports and reused after. A machine-wide
# registry (under the lock) keeps a second rig in another directory off ports this one holds even
# while a component of it is down. Ports come from below the ephemeral range, so outgoing
# connections cannot take them between picking and binding.

PORT_NAMES=(ETCD_PORT ETCD_PEER_PORT APISERVER_PORT KCM_PORT SCHEDULER_PORT NODE_PORT MOTO_PORT KUBELET_PORT)

ensure_ports() {
	if [ ! -s "$state/ports" ]; then
		python3 - "$cache/rig-ports" "$state" "${PORT_NAMES[@]}" >"$state/ports.tmp" <<'PY'
import os, random, socket, sys
registry, state, names = sys.argv[1], sys.argv[2], sys.argv[3:]
claims = []
try:
    with open(registry) as f:
        for line in f:
            port, owner = line.rstrip("\n").split("\t", 1)
            # Keep claims of rigs whose state still records the port.
            try:
                with open(os.path.join(owner, "ports")) as p:
                    if f"={port}\n" in p.read() and owner != state:
                        claims.append((int(port), owner))
            except OSError:
                pass
except FileNotFoundError:
    pass
taken = {p for p, _ in claims}
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
hi = low - 1 if low > 12000 else 65535
chosen = []
rng = random.SystemRandom()
while len(chosen) < len(names):
    port = rng.randint(10000, hi)
    if port in taken or port in chosen:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    chosen.append(port)
for n, p in zip(names, chosen):
    print(f"{n}={p}")
with open(registry + ".tmp", "w") as f:
    for p, o in claims + [(p, state) for p in chosen]:
        f.write(f"{p}\t{o}\n")
os.replace(registry + ".tmp", registry)
PY
		mv "$state/ports.tmp" "$state/ports"
	fi
	# shellcheck disable=SC1091
	. "$state/ports"
}

release_ports() {
	[ -f "$cache/rig-ports" ] || return 0
	grep -vF "	$state" "$cache/rig-ports" >"$cache/rig-ports.tmp" || true
	mv "$cache/rig-ports.tmp" "$cache/rig-ports"
}

lock() { mkdir -p "$cache"; exec 9>"$cache/rig.lock"; flock -w 600 9 || die "another rig has held $cache/rig.lock for 10 minutes"; }

# ---------------------------------------------------------------------------------------------
# Components

kubectl_rig() { "$bin/kubectl" --kubeconfig "$state/kubeconfig" "$@"; }

start_moto() {
	"$venv/bin/python" "$here/seed_ec2.py" write-amis "$state/moto-amis.json"
	alive moto && return
	# moto_server.py is moto_server plus AMI deprecation (which moto lacks); it is the server process.
	MOTO_AMIS_PATH=$state/moto-amis.json launch moto "$venv/bin/python" "$here/moto_server.py" -H 127.0.0.1 -p "$MOTO_PORT"
}

start_etcd() {
	alive etcd && return
	launch etcd "$bin/etcd" --name=baker-rig --data-dir="$state/etcd" \
		--listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
		--listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster="baker-rig=http://127.0.0.1:$ETCD_PEER_PORT" \
		--unsafe-no-fsync=true --log-level=warn
}

start_apiserver() {
	alive kube-apiserver && return
	# --advertise-address=127.0.0.1 needs --endpoint-reconciler-type=none (1.37 refuses a loopback
	# advertise address otherwise); there is no default route to pick another from.
	launch kube-apiserver "$bin/kube-apiserver" \
		--etcd-servers="http://127.0.0.1:$ETCD_PORT" \
		--bind-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
		--advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
		--tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
		--cert-dir="$state/apiserver" \
		--client-ca-file="$pki/ca.crt" \
		--service-account-issuer="https://127.0.0.1:$APISERVER_PORT" \
		--service-account-key-file="$pki/sa.pub" \
		--service-account-signing-key-file="$pki/sa.key" \
		--service-cluster-ip-range=10.0.0.0/24 \
		--authorization-mode=RBAC \
		--allow-privileged=true \
		--kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
		--kubelet-client-key="$pki/apiserver-kubelet-client.key" \
		--kubelet-certificate-authority="$pki/ca.crt" \
		--kubelet-preferred-address-types=InternalIP \
		--profiling=false --v=1
}

start_controller_manager() {
	alive kube-controller-manager && return
	launch kube-controller-manager "$bin/kube-controller-manager" \
		--kubeconfig="$state/kube-controller-manager.kubeconfig" \
		--bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
		--cert-dir="$state/kube-controller-manager" \
		--service-cluster-ip-range=10.0.0.0/24 \
		--service-account-private-key-file="$pki/sa.key" \
		--root-ca-file="$pki/ca.crt" \
		--use-service-account-credentials=true \
		--leader-elect=false --profiling=false --v=1
}

start_scheduler() {
	alive kube-scheduler && return
	launch kube-scheduler "$bin/kube-scheduler" \
		--kubeconfig="$state/kube-scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" \
		--cert-dir="$state/kube-scheduler" \
		--leader-elect=false --profiling=false --v=1
}

start_node() {
	alive node && return
	mkdir -p "$state/node"
	RUST_LOG=${RUST_LOG:-info} launch node "$node_bin" \
		--kubeconfig "$state/node.kubeconfig" --node-name "$NODE_NAME" \
		--listen "127.0.0.1:$NODE_PORT" \
		--tls-cert "$pki/node-serving.crt" --tls-key "$pki/node-serving.key" \
		--state-dir "$state/node"
}

node_ready() {
	[ "$(kubectl_rig get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

write_env() {
	q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
	cat >"$state/env.tmp" <<EOF
# Generated by tests/rig/rig.sh up: source it to talk to this rig.
export BAKER_RIG_DIR=$(q "$state")
export BAKER_RIG_BIN=$(q "$bin")
export BAKER_RIG_NODE_NAME=$(q "$NODE_NAME")
export KUBECONFIG=$(q "$state/kubeconfig")
export AWS_ENDPOINT_URL_EC2=$(q "http://127.0.0.1:$MOTO_PORT")
export AWS_ENDPOINT_URL_SSM=$(q "http://127.0.0.1:$MOTO_PORT")
export AWS_REGION=$(q "$REGION")
export AWS_DEFAULT_REGION=$(q "$REGION")
export AWS_ACCESS_KEY_ID='testing'
export AWS_SECRET_ACCESS_KEY='testing'
export AWS_EC2_METADATA_DISABLED='true'
export CHECKPOINT_DISABLE='1'
export PATH=$(q "$bin")":\$PATH"
EOF
	if [ -d "$rn" ]; then
		cat >>"$state/env.tmp" <<EOF
# The real node (real-node.sh): its name, the taint and label pods need to run there, the tag of
# Baker's images on it, and the EC2 endpoint as its pods reach it.
export BAKER_RIG_REAL_NODE_NAME=$(q "$REAL_NODE_NAME")
export BAKER_RIG_REAL_NODE_TAINT=$(q "$REAL_TAINT")
export BAKER_RIG_REAL_NODE_IMAGE_TAG=$(q "$REAL_IMAGE_TAG")
export BAKER_RIG_POD_EC2_ENDPOINT=$(q "http://10.88.0.1:$MOTO_PORT")
export BAKER_RIG_CONTAINERD_SOCKET=$(q "$rn/containerd/sock")
EOF
	fi
	mv "$state/env.tmp" "$state/env"
}

cmd_up() {
	local t0=$SECONDS
	mkdir -p "$state"
	ensure_tools
	ensure_packer
	ensure_moto
	ensure_node
	lock
	ensure_ports
	ensure_pki
	kubeconfig "$state/kubeconfig" admin
	kubeconfig "$state/kube-controller-manager.kubeconfig" kube-controller-manager
	kubeconfig "$state/kube-scheduler.kubeconfig" kube-scheduler
	kubeconfig "$state/node.kubeconfig" node
	kubeconfig "$state/real-node.kubeconfig" real-node
	echo "$node_bin" >"$state/node-bin"

	# moto and etcd are independent of the rest: start both, then wait.
	start_moto
	start_etcd
	wait_for etcd 30 "etcd /health on 127.0.0.1:$ETCD_PORT" \
		curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"
	start_apiserver
	wait_for kube-apiserver 120 "the apiserver's /readyz on 127.0.0.1:$APISERVER_PORT" \
		curl -sf --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
		"https://127.0.0.1:$APISERVER_PORT/readyz"
	start_controller_manager
	start_scheduler
	start_node
	wait_for moto 30 "moto's EC2 endpoint on 127.0.0.1:$MOTO_PORT and its source images" \
		"$venv/bin/python" "$here/seed_ec2.py" check --endpoint "http://127.0.0.1:$MOTO_PORT" --timeout 1
	wait_for kube-controller-manager 60 "the controller-manager's /healthz on 127.0.0.1:$KCM_PORT" \
		curl -sfk --max-time 2 "https://127.0.0.1:$KCM_PORT/healthz"
	wait_for kube-scheduler 60 "the scheduler's /healthz on 127.0.0.1:$SCHEDULER_PORT" \
		curl -sfk --max-time 2 "https://127.0.0.1:$SCHEDULER_PORT/healthz"
	wait_for node 60 "node $NODE_NAME to be Ready" node_ready
	wait_for kube-controller-manager 60 "the ServiceAccount default/default (made by the controller-manager)" \
		kubectl_rig -n default get serviceaccount default
	if [ "${BAKER_RIG_REAL_NODE:-}" = 1 ] || [ -d "$rn" ]; then
		start_real_node
	fi
	write_env
	log "up in $((SECONDS - t0))s: state in $state"
	log "use it: source $state/env   (or: kubectl --kubeconfig $state/kubeconfig get nodes)"
}

# ---------------------------------------------------------------------------------------------

stop_pid() { # name pid grace-seconds
	local name=$1 pid=$2 grace=$3 i
	kill -TERM "$pid" 2>/dev/null || return 0
	for i in $(seq $((grace * 10))); do
		ours "$pid" || return 0
		sleep 0.1
	done
	log "$name ($pid) ignored SIGTERM for ${grace}s: killing it"
	kill -KILL "$pid" 2>/dev/null || true
	for i in $(seq 50); do
		ours "$pid" || return 0
		sleep 0.1
	done
}

# The path of $state as mountinfo shows it (relative to the root of its filesystem).
state_fs_path() {
	local d=$state mnt
	while [ ! -e "$d" ]; do d=$(dirname "$d"); done
	mnt=$(findmnt -n -o TARGET -T "$d" 2>/dev/null || echo /)
	echo "${state#"${mnt%/}"}"
}

# Processes of this rig still running: those carrying its marker, and pods of its node, found by
# their private mount namespace holding bind mounts from the state dir (the node clears pods'
# environment, so they carry no marker).
stragglers() {
	local d p rel
	rel=$(state_fs_path)
	for d in /proc/[0-9]*; do
		p=${d#/proc/}
		[ "$p" != $$ ] || continue
		if ours "$p"; then
			echo "$p"
		elif ! [ "$d/ns/mnt" -ef /proc/$$/ns/mnt ] && [ -e "$d/ns/mnt" ] &&
			grep -qsF " $rel/" "$d/mountinfo"; then
			echo "$p"
		fi
	done
	return 0
}

cmd_leftovers() {
	local left p
	left=$(stragglers)
	[ -n "$left" ] || return 0
	for p in $left; do
		printf '%s %s\n' "$p" "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-160)"
	done
	return 1
}

cmd_down() {
	# Without a state dir, processes of the rig may still run (e.g. the dir was deleted by hand):
	# the marker in their environment still finds them below.
	if [ ! -d "$state/pids" ] && [ ! -f "$state/ports" ] && [ -z "$(stragglers)" ]; then
		log "no rig in $state"
		rm -rf "$state"
		return
	fi
	if [ -d "$rn" ]; then
		[ -n "${bin:-}" ] || bin=$("$here/build-tools.sh" bindir | tail -n 1)
		stop_real_node
	fi
	local i name pid
	for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
		name=${COMPONENTS[i]}
		pid=$(pid_of "$name")
		if ours "$pid"; then
			log "stopping $name ($pid)"
			# The node gets longer: it stops its pods first, each within its grace period.
			stop_pid "$name" "$pid" "$([ "$name" = node ] && echo 40 || echo 15)"
		fi
	done
	for pid in $(stragglers); do
		log "stopping leftover process $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)"
		stop_pid leftover "$pid" 5
	done
	local left
	left=$(stragglers)
	[ -z "$left" ] || die "processes of the rig survived: $left"
	lock
	release_ports
	# The logs outlive the state dir, so a failed start can still be read (its error names them).
	local kept
	kept="$(dirname "$state")/rig-logs"
	rm -rf "$kept"
	if [ -d "$state/logs" ] && cp -r "$state/logs" "$kept"; then
		log "logs kept in $kept"
	fi
	rm -rf "$state"
	log "down: removed $state"
}

cmd_status() {
	if [ -f "$state/ports" ]; then
		# shellcheck disable=SC1091
		. "$state/ports"
	fi
	local name pid running=0 port all=("${COMPONENTS[@]}")
	[ -d "$rn" ] && all+=("${REAL_COMPONENTS[@]}")
	local total=${#all[@]}
	for name in "${all[@]}"; do
		pid=$(pid_of "$name")
		case $name in
		moto) port=${MOTO_PORT:-} ;; etcd) port=${ETCD_PORT:-} ;; kube-apiserver) port=${APISERVER_PORT:-} ;;
		kube-controller-manager) port=${KCM_PORT:-} ;; kube-scheduler) port=${SCHEDULER_PORT:-} ;; node) port=${NODE_PORT:-} ;;
		kubelet | real-proxy-kubelet-host) port=${KUBELET_PORT:-} ;; *) port=- ;;
		esac
		if ours "$pid"; then
			running=$((running + 1))
			printf '%-24s running  pid %-8s 127.0.0.1:%s\n' "$name" "$pid" "$port"
		else
			printf '%-24s stopped\n' "$name"
		fi
	done
	echo "state: $state"
	if ((running == total)); then return 0; elif ((running == 0)); then return 3; else return 1; fi
}

cmd_reset_ec2() {
	[ -f "$state/ports" ] || die "no rig in $state"
	# shellcheck disable=SC1091
	. "$state/ports"
	local venv=$cache/venv-moto-$MOTO_VERSION
	"$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="POST"), timeout=60)' \
		"http://127.0.0.1:$MOTO_PORT/moto-api/reset" || die "resetting moto failed"
	# The source images come back from MOTO_AMIS_PATH as the backend is recreated.
	"$venv/bin/python" "$here/seed_ec2.py" check --endpoint "http://127.0.0.1:$MOTO_PORT" --timeout 30 ||
		die "moto serves no source images after the reset"
	log "EC2 state reset: only the rig's source images remain"
}

# Stops one component of a running rig (SIGKILL, or SIGTERM with a grace), then brings the rig
# back up, which starts only what is not running: how the fault suite restarts a component.
cmd_restart() { # name [KILL|TERM]
	local name=${1:-} how=${2:-TERM} pid
	case $name in
	moto | etcd | kube-apiserver | kube-controller-manager | kube-scheduler | node) ;;
	*) die "restart what? one of: moto etcd kube-apiserver kube-controller-manager kube-scheduler node" ;;
	esac
	[ -f "$state/ports" ] || die "no rig in $state"
	pid=$(pid_of "$name")
	if ours "$pid"; then
		log "restart: stopping $name ($pid) with SIG$how"
		if [ "$how" = KILL ]; then
			kill -KILL "$pid" 2>/dev/null || true
			local i
			for i in $(seq 50); do ours "$pid" || break; sleep 0.1; done
		else
			stop_pid "$name" "$pid" 10
		fi
	fi
	cmd_up
}

cmd_real_node() {
	[ -f "$state/ports" ] || die "no rig in $state: make rig-up first"
	BAKER_RIG_REAL_NODE=1 cmd_up
}

case "${1:-}" in
up) cmd_up ;;
real-node) cmd_real_node ;;
restart) shift; cmd_restart "$@" ;;
reset-ec2) cmd_reset_ec2 ;;
down) cmd_down ;;
status) cmd_status ;;
leftovers) cmd_leftovers ;;
*) echo "usage: $0 up|real-node|down|status|leftovers|reset-ec2|restart <component> [KILL|TERM]" >&2; exit 2 ;;
esac
