# The rig's real node: a kubelet and containerd, built from Go modules, running pods with runc
# under the pod specs' own security contexts. Sourced by rig.sh (it uses launch, alive, wait_for,
# stop_pid, kubectl_rig and the ports); not run on its own.
#
# Everything of the node lives in a network namespace the rig creates (REAL_NETNS): containerd,
# kubelet, the CNI bridge (10.88.0.1/24) and the pods. Nothing is routed out of it. Three host
# services are passed through by socat over unix sockets, which cross network namespaces:
#   - the API server, at 127.0.0.1:<its port> for the kubelet and at 10.0.0.1:443 for pods (the
#     `kubernetes` Service's address; there is no kube-proxy, so the rig plays its part);
#   - moto, at 10.88.0.1:<its port> for pods (bake pods on this node get that EC2 endpoint);
#   - and, the other way, the kubelet's port to the host's 127.0.0.1:<KUBELET_PORT>, the Node's
#     address, for `kubectl logs` and `exec`.
# One real node per machine: the kubelet keeps its device-plugin socket and the CNI library its
# cache at fixed paths.

REAL_NODE_NAME=${BAKER_RIG_REAL_NODE_NAME:-baker-rig-kubelet}
REAL_NETNS=baker-rig-pods
REAL_TAINT=baker.io/rig-real-node
# The tag the images are imported under: not `latest`, so pods' default pull policy is
# IfNotPresent and nothing is ever pulled.
REAL_IMAGE_TAG=rig
REAL_COMPONENTS=(real-proxy-api-host real-proxy-moto-host real-proxy-api real-proxy-api-svc real-proxy-moto
	containerd real-proxy-kubelet real-proxy-kubelet-host kubelet)
# Paths containerd and the kubelet use whatever they are told; removed at `down` if the rig made them.
REAL_FIXED=(/run/containerd /var/lib/kubelet /var/lib/cni)

rn=$state/rn

# A command prefix that runs a program in the node's network namespace; `launch` execs it, and
# nsenter execs its program in place, so the recorded pid is the program's.
netns_exec=(nsenter --net="/run/netns/$REAL_NETNS")
in_netns() { "${netns_exec[@]}" "$@"; }

ensure_real_node_packages() {
	local missing=() p
	for p in runc:runc socat:socat catatonit:catatonit nsenter:util-linux; do
		command -v "${p%%:*}" >/dev/null || missing+=("${p#*:}")
	done
	[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
	[ ${#missing[@]} = 0 ] && return
	log "installing ${missing[*]} from Debian (for the real node)"
	{ as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
		{ as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }; } ||
		die "could not install ${missing[*]}; run: sudo apt-get install ${missing[*]}"
}

# The pause image: Debian's static catatonit as the sandbox's init, made the way images/build.sh
# makes images (no registry).
pause_image() {
	local work=$rn/pause
	[ -s "$work/pause.oci.tar" ] && return
	rm -rf "$work"
	mkdir -p "$work/rootfs/bin"
	cp "$(command -v catatonit)" "$work/rootfs/bin/catatonit"
	tar -C "$work/rootfs" --owner=0 --group=0 -cf "$work/rootfs.tar" .
	umoci init --layout "$work/layout" >/dev/null
	umoci new --image "$work/layout:3.10"
	umoci raw add-layer --image "$work/layout:3.10" "$work/rootfs.tar"
	umoci config --image "$work/layout:3.10" --config.entrypoint /bin/catatonit --config.entrypoint -P \
		--config.user 65535:65535
	umoci gc --layout "$work/layout"
	tar -C "$work/layout" -cf "$work/pause.oci.tar" .
}

write_real_node_config() {
	mkdir -p "$rn"/{containerd,kubelet,pod-logs,proxy,cni/net.d,cni/ipam}
	printf 'nameserver 127.0.0.1\noptions ndots:1\n' >"$rn/resolv.conf"
	cat >"$rn/containerd/config.toml" <<EOF
version = 3
root = "$rn/containerd/root"
state = "$rn/containerd/state"
disabled_plugins = ["io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
  "io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.erofs", "io.containerd.differ.v1.erofs"]

[grpc]
  address = "$rn/containerd/sock"

[ttrpc]
  address = "$rn/containerd/sock.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$rn/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "registry.k8s.io/pause:3.10"

[plugins."io.containerd.cri.v1.runtime"]
  # Some machines refuse a negative oom_score_adj even to root; without this every sandbox fails
  # with "can't get final child's PID from pipe: EOF". Pods then get containerd's own score.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$rn/containerd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$rn/cni/net.d"
EOF
	cat >"$rn/cni/net.d/10-baker-rig.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "baker-rig-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$rn/cni/ipam",
        "ranges": [[{"subnet": "10.88.0.0/24", "gateway": "10.88.0.1"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
	cat >"$rn/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine's cgroups are v1; kubelet 1.35+ refuses them unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$REAL_NODE_NAME
containerRuntimeEndpoint: unix://$rn/containerd/sock
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: AlwaysAllow
failSwapOn: false
resolvConf: $rn/resolv.conf
podLogsDir: $rn/pod-logs
serializeImagePulls: false
# The rig's images are imported, never pulled: image GC must not remove them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
makeIPTablesUtilChains: false
maxPods: 30
EOF
}

# The kubelet's cgroup root, in each v1 hierarchy (cpuset needs its cpus and mems copied down).
real_cgroups() {
	local h
	for h in /sys/fs/cgroup/*/; do
		h=${h%/}
		[ "$h" = /sys/fs/cgroup/unified ] && continue
		mkdir -p "$h/$REAL_NODE_NAME"
	done
	if [ -d /sys/fs/cgroup/cpuset ]; then
		cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$REAL_NODE_NAME/cpuset.cpus"
		cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$REAL_NODE_NAME/cpuset.mems"
	fi
}

real_netns() {
	if [ -e "/run/netns/$REAL_NETNS" ]; then
		[ -e "$rn/netns" ] && return
		# Left by a rig whose state dir is gone (killed, or removed by hand): stale if nothing runs in it.
		[ -z "$(ip netns pids "$REAL_NETNS" 2>/dev/null)" ] ||
			die "network namespace $REAL_NETNS is in use by another rig's real node (one per machine); see: ip netns pids $REAL_NETNS"
		log "removing the stale network namespace $REAL_NETNS"
		ip netns del "$REAL_NETNS"
	fi
	ip netns add "$REAL_NETNS"
	touch "$rn/netns"
	in_netns ip link set lo up
	# The kubernetes Service's ClusterIP, so pods' in-cluster config reaches the API server.
	in_netns ip addr add 10.0.0.1/32 dev lo
}

real_node_registered() { kubectl_rig get node "$REAL_NODE_NAME" >/dev/null; }

real_node_ready() {
	[ "$(kubectl_rig get node "$REAL_NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

import_real_images() {
	local ctr=("$bin/ctr" -a "$rn/containerd/sock" -n k8s.io)
	"${ctr[@]}" images import --base-name registry.k8s.io/pause "$rn/pause/pause.oci.tar" >/dev/null
	local name
	for name in operator bake; do
		local archive=$root/target/images/$name.oci.tar
		[ -s "$archive" ] || die "$archive is missing: run make images (the real node runs Baker's own images)"
		"${ctr[@]}" images import --base-name "localhost/baker-$name" "$archive" >/dev/null
		# The archive's only name is `latest`; pods ask for the rig's tag.
		"${ctr[@]}" images tag --force "localhost/baker-$name:latest" "localhost/baker-$name:$REAL_IMAGE_TAG" >/dev/null
	done
}

start_real_node() {
	[ "$(id -u)" = 0 ] || die "the real node needs root (containerd, runc, network namespaces)"
	[ -n "${KUBELET_PORT:-}" ] || die "this rig was started before it had a real node: make rig-down, then up"
	local t0=$SECONDS b
	ensure_real_node_packages
	for b in kubelet containerd containerd-shim-runc-v2 ctr; do
		[ -x "$bin/$b" ] || die "$bin/$b is missing after tests/rig/build-tools.sh"
	done
	mkdir -p "$rn"
	local p
	for p in "${REAL_FIXED[@]}"; do
		[ -e "$p" ] || [ -e "$rn/made$(echo "$p" | tr / _)" ] || touch "$rn/made$(echo "$p" | tr / _)"
	done
	write_real_node_config
	pause_image
	real_cgroups
	real_netns

	# The passages between the host and the node's network namespace (see the top of this file).
	local api=$rn/proxy/api moto=$rn/proxy/moto kubelet=$rn/proxy/kubelet
	alive real-proxy-api-host || launch real-proxy-api-host socat "UNIX-LISTEN:$api,fork,unlink-early" "TCP:127.0.0.1:$APISERVER_PORT"
	alive real-proxy-moto-host || launch real-proxy-moto-host socat "UNIX-LISTEN:$moto,fork,unlink-early" "TCP:127.0.0.1:$MOTO_PORT"
	alive real-proxy-api || launch real-proxy-api "${netns_exec[@]}" socat "TCP-LISTEN:$APISERVER_PORT,fork,reuseaddr" "UNIX-CONNECT:$api"
	alive real-proxy-api-svc || launch real-proxy-api-svc "${netns_exec[@]}" socat "TCP-LISTEN:443,bind=10.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$api"
	alive real-proxy-moto || launch real-proxy-moto "${netns_exec[@]}" socat "TCP-LISTEN:$MOTO_PORT,fork,reuseaddr" "UNIX-CONNECT:$moto"
	alive real-proxy-kubelet || launch real-proxy-kubelet "${netns_exec[@]}" socat "UNIX-LISTEN:$kubelet,fork,unlink-early" "TCP:127.0.0.1:$KUBELET_PORT"
	alive real-proxy-kubelet-host || launch real-proxy-kubelet-host socat "TCP-LISTEN:$KUBELET_PORT,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$kubelet"

	if ! alive containerd; then
		# containerd finds its shim on PATH.
		PATH=$bin:$PATH launch containerd "${netns_exec[@]}" "$bin/containerd" --config "$rn/containerd/config.toml"
		wait_for containerd 30 "containerd's socket" "$bin/ctr" -a "$rn/containerd/sock" version
		# Its root outlives a restart: the images are imported once per node.
		if [ ! -e "$rn/imported" ]; then
			import_real_images 2>>"$logs/containerd.log"
			touch "$rn/imported"
			log "$(printf '%-23s' images) imported: pause, localhost/baker-operator:$REAL_IMAGE_TAG, localhost/baker-bake:$REAL_IMAGE_TAG"
		fi
	fi

	if ! alive kubelet; then
		# --cloud-provider=external: the kubelet refuses a loopback node IP, so it registers without
		# one and the rig sets the Node's address below (an external cloud provider's part).
		launch kubelet "${netns_exec[@]}" "$bin/kubelet" --config="$rn/kubelet/config.yaml" \
			--kubeconfig="$state/real-node.kubeconfig" --root-dir="$rn/kubelet/root" \
			--hostname-override="$REAL_NODE_NAME" --cloud-provider=external --v=1
	fi
	wait_for kubelet 60 "node $REAL_NODE_NAME to register" real_node_registered
	kubectl_rig patch node "$REAL_NODE_NAME" --subresource=status --type=merge -p \
		"{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"127.0.0.1\"},{\"type\":\"Hostname\",\"address\":\"$REAL_NODE_NAME\"}]}}" >/dev/null
	# Only pods that ask for the real node run there; the rest stay on the host-process node.
	kubectl_rig taint node "$REAL_NODE_NAME" "$REAL_TAINT=true:NoSchedule" --overwrite >/dev/null
	kubectl_rig taint node "$REAL_NODE_NAME" node.cloudprovider.kubernetes.io/uninitialized- >/dev/null 2>&1 || true
	kubectl_rig label node "$REAL_NODE_NAME" "$REAL_TAINT=true" --overwrite >/dev/null
	wait_for kubelet 60 "node $REAL_NODE_NAME to be Ready" real_node_ready
	log "real node $REAL_NODE_NAME up in $((SECONDS - t0))s (pods reach moto at http://10.88.0.1:$MOTO_PORT)"
}

# Stops the real node and removes what it leaves outside the state dir: its pods first (so the
# kubelet unmounts their volumes), then the kubelet, the containers, containerd and the proxies.
stop_real_node() {
	[ -d "$rn" ] || return 0
	local ctr=("$bin/ctr" -a "$rn/containerd/sock" -n k8s.io) name pid
	if alive kubelet && [ -s "$state/kubeconfig" ]; then
		kubectl_rig delete pods --all-namespaces --field-selector "spec.nodeName=$REAL_NODE_NAME" \
			--grace-period=5 --wait=true --timeout=30s >/dev/null 2>&1 || true
	fi
	if alive containerd; then
		local id
		for id in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
			"${ctr[@]}" tasks kill -s KILL "$id" >/dev/null 2>&1 || true
		done
	fi
	local i p
	for ((i = ${#REAL_COMPONENTS[@]} - 1; i >= 0; i--)); do
		name=${REAL_COMPONENTS[i]}
		pid=$(pid_of "$name")
		if ours "$pid"; then
			log "stopping $name ($pid)"
			stop_pid "$name" "$pid" 15
		fi
	done
	# Shims and containers outlive containerd by design: the rig's processes that are none of its
	# recorded components are theirs.
	local recorded
	recorded=" $(cat "$pids"/*.pid 2>/dev/null | tr '\n' ' ') "
	for pid in $(stragglers); do
		[[ $recorded == *" $pid "* ]] || stop_pid "node leftover" "$pid" 5
	done
	# Mounts under the state dir (the kubelet's root, pod volumes, container root filesystems),
	# deepest first.
	findmnt -rn -o TARGET | grep -F "$rn/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
	if [ -e "$rn/netns" ]; then
		ip netns del "$REAL_NETNS" 2>/dev/null || true
	fi
	local h
	for h in /sys/fs/cgroup/*/"$REAL_NODE_NAME"; do
		[ -d "$h" ] && find "$h" -depth -type d -exec rmdir {} + 2>/dev/null
	done
	for p in "${REAL_FIXED[@]}"; do
		[ -e "$rn/made$(echo "$p" | tr / _)" ] && rm -rf "$p"
	done
	if [ -s "$state/kubeconfig" ] && alive kube-apiserver; then
		kubectl_rig delete node "$REAL_NODE_NAME" --ignore-not-found >/dev/null 2>&1 || true
	fi
	rm -rf "$rn"
}
