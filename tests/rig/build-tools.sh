#!/usr/bin/env bash
# Builds the rig's control plane (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl),
# etcd and helm, and the real node's kubelet and containerd, from the Go modules pinned in
# tests/rig/{k8s,etcd,helm,containerd}, into a per-machine cache keyed by version. A build whose stamp matches is skipped, so only the first run on a machine pays.
#
# Usage: tests/rig/build-tools.sh            # prints the bin directory on the last line
# Env:   BAKER_CACHE_DIR  cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/baker)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=1.37.2
ETCD_VERSION=3.6.16
HELM_VERSION=3.21.4
CONTAINERD_VERSION=2.4.2
cache=${BAKER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/baker}
bin="$cache/bin/k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION-helm-v$HELM_VERSION"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { printf '[build-tools] %s\n' "$*" >&2; }

# Runs a long command and says every minute that it still runs, so a cold build (tens of minutes
# on two cores) is never silent. Exits with the command's status.
with_progress() {
	local what=$1; shift
	"$@" &
	local pid=$! start=$SECONDS
	while kill -0 "$pid" 2>/dev/null; do
		for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null && sleep 1; done
		kill -0 "$pid" 2>/dev/null && log "still building $what ($((SECONDS - start))s)"
	done
	wait "$pid"
}

need_go() {
	command -v go >/dev/null || { log "go is required (Go >= 1.26) to build the rig's control plane"; exit 1; }
}

# Hashes the module files so that a change of pins rebuilds.
stamp_of() { cat "$here/$1/go.mod" "$here/$1/go.sum" | sha256sum | cut -c1-16; }

built() { [ -x "$bin/$1" ] && [ "$(cat "$bin/.$1.stamp" 2>/dev/null)" = "$2" ]; }

build_k8s() {
	local stamp; stamp=$(stamp_of k8s)
	if built kube-apiserver "$stamp" && built kube-controller-manager "$stamp" &&
		built kube-scheduler "$stamp" && built kubectl "$stamp" && built kubelet "$stamp"; then
		return
	fi
	need_go
	log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet v$K8S_VERSION (first run on this machine takes a while)"
	local minor=${K8S_VERSION#1.}; minor=${minor%%.*}
	local commit
	commit=$(cd "$here/k8s" && go list -m -json "k8s.io/kubernetes" | sed -n 's/.*"Hash": "\(.*\)".*/\1/p' | head -1)
	local ldf="-s -w" p
	# Stamp both version packages as Kubernetes' own build does, so `kubectl version` and helm see
	# the real server version.
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ldf+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
		ldf+=" -X $p.gitTreeState=clean -X $p.gitCommit=${commit:-unknown}"
		ldf+=" -X $p.buildDate=1970-01-01T00:00:00Z"
	done
	mkdir -p "$bin"
	(cd "$here/k8s" && with_progress "the control plane" go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags "$ldf" -o "$bin/" \
		k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet)
	for p in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet; do echo "$stamp" >"$bin/.$p.stamp"; done
}

build_etcd() {
	local stamp; stamp=$(stamp_of etcd)
	built etcd "$stamp" && return
	need_go
	log "building etcd v$ETCD_VERSION"
	mkdir -p "$bin"
	(cd "$here/etcd" && with_progress etcd go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
	echo "$stamp" >"$bin/.etcd.stamp"
}

build_helm() {
	local stamp; stamp=$(stamp_of helm)
	built helm "$stamp" && return
	need_go
	log "building helm v$HELM_VERSION"
	mkdir -p "$bin"
	local minor=${K8S_VERSION#1.}; minor=${minor%%.*}
	# Without these, helm v3 evaluates .Capabilities.KubeVersion offline as v1.20.
	local ldf="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
	ldf+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
	ldf+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
	(cd "$here/helm" && with_progress helm go build -trimpath -ldflags "$ldf" -o "$bin/helm" helm.sh/helm/v3/cmd/helm)
	echo "$stamp" >"$bin/.helm.stamp"
}

# containerd, its runc shim and ctr, as containerd's own Makefile builds them without cgo (btrfs,
# which needs cgo, is left out; the real node uses overlayfs).
build_containerd() {
	local stamp; stamp=$(stamp_of containerd)
	built containerd "$stamp" && built containerd-shim-runc-v2 "$stamp" && built ctr "$stamp" && return
	need_go
	log "building containerd, containerd-shim-runc-v2, ctr v$CONTAINERD_VERSION"
	mkdir -p "$bin"
	local m=github.com/containerd/containerd/v2
	local ldf="-s -w -X $m/version.Version=v$CONTAINERD_VERSION -X $m/version.Package=$m"
	(cd "$here/containerd" &&
		with_progress containerd go build -trimpath -tags urfave_cli_no_docs -ldflags "$ldf" -o "$bin/" \
			"$m/cmd/containerd" "$m/cmd/ctr" &&
		go build -trimpath -tags 'urfave_cli_no_docs no_grpc' -ldflags "$ldf" -o "$bin/" "$m/cmd/containerd-shim-runc-v2")
	for p in containerd containerd-shim-runc-v2 ctr; do echo "$stamp" >"$bin/.$p.stamp"; done
}

case "${1:-all}" in
all) build_etcd; build_k8s; build_helm; build_containerd ;;
k8s) build_k8s ;;
etcd) build_etcd ;;
helm) build_helm ;;
containerd) build_containerd ;;
bindir) ;;
*) log "usage: $0 [all|k8s|etcd|helm|containerd|bindir]"; exit 2 ;;
esac
echo "$bin"
