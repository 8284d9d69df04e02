#!/usr/bin/env bash
# Builds Baker's two images without a registry or a container daemon, from Debian packages:
# mmdebstrap makes each root filesystem, umoci turns it into an OCI image with the user, paths,
# environment and entrypoint that images/*.Dockerfile describe. The results are OCI archives:
#
#   target/images/operator.oci.tar   the operator (`baker run`), as images/operator.Dockerfile
#   target/images/bake.oci.tar       packer for bake pods, as images/bake.Dockerfile
#
# Load one with `skopeo copy oci-archive:target/images/bake.oci.tar docker-daemon:...`, or import it
# into containerd with `ctr images import`. Usage: images/build.sh [--if-stale] [operator|bake]...
# (default: both). With --if-stale an archive newer than its inputs (this script, and for the
# operator its binary) is kept.
# Needs root (mmdebstrap's root mode keeps file owners) and installs mmdebstrap and umoci from
# Debian when they are missing. BAKER_BIN names the operator binary (default: a release build).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out=$repo/target/images
suite=bookworm
mirror=${BAKER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The uid and gid both images run as (distroless's `nonroot`; src/bake/pod.rs BAKE_UID).
nonroot=65532

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_tools() {
	local missing=()
	command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
	command -v umoci >/dev/null || missing+=(umoci)
	# runc runs the images in the tests (tests/e2e/images.rs).
	command -v runc >/dev/null || missing+=(runc)
	[ ${#missing[@]} = 0 ] && return
	log "installing ${missing[*]} from Debian"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
		{ as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
		die "could not install ${missing[*]}; run: sudo apt-get install ${missing[*]}"
}

# Files people never read in an image, as Debian's slim images leave out.
slim=(
	--dpkgopt='path-exclude=/usr/share/man/*'
	--dpkgopt='path-exclude=/usr/share/doc/*'
	--dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/locale/*'
	--dpkgopt='path-exclude=/usr/share/info/*'
)

# The PATH Debian's and distroless's images set (a runtime without CRI adds none of its own).
path_env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# oci <name> <rootfs.tar> <umoci config args...>: an OCI archive of one layer.
oci() {
	local name=$1 rootfs=$2
	shift 2
	local layout=$work/$name-oci
	rm -rf "$layout"
	umoci init --layout "$layout"
	umoci new --image "$layout:latest"
	umoci raw add-layer --image "$layout:latest" "$rootfs"
	umoci config --image "$layout:latest" --author "Baker images/build.sh" "$@"
	umoci gc --layout "$layout"
	mkdir -p "$out"
	tar -C "$layout" -cf "$out/$name.oci.tar.tmp" .
	mv "$out/$name.oci.tar.tmp" "$out/$name.oci.tar"
	log "$name: $out/$name.oci.tar ($(du -h "$out/$name.oci.tar" | cut -f1))"
}

# fresh <name> [input...]: with --if-stale, whether the archive is newer than every input.
fresh() {
	local archive=$out/$1.oci.tar
	shift
	[ "$if_stale" = 1 ] && [ -f "$archive" ] || return 1
	for input in "$here/build.sh" "$@"; do
		[ "$archive" -nt "$input" ] || return 1
	done
	log "$(basename "$archive" .oci.tar): up to date ($archive)"
}

# The bake image: Debian with packer, ca-certificates and openssh-client (images/bake.Dockerfile
# starts from debian:bookworm-slim and adds packer from HashiCorp's image; here packer is Debian's
# package, whose amazon builders are built in). packer is where the Dockerfile puts it.
bake() {
	local started=$SECONDS
	fresh bake && return
	log "bake: debootstrapping $suite with packer (a few minutes on a cold cache)"
	mmdebstrap --mode=root --variant=apt --format=tar "${slim[@]}" \
		--include=ca-certificates,openssh-client,packer \
		--customize-hook='ln -sf /usr/bin/packer "$1/usr/local/bin/packer"' \
		--customize-hook='mkdir -p "$1/opt/packer/plugins" && chmod -R a+rX "$1/opt/packer"' \
		--customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
		"$suite" "$work/bake-rootfs.tar" "$mirror" >&2
	oci bake "$work/bake-rootfs.tar" \
		--config.user "$nonroot:$nonroot" \
		--config.env "$path_env" \
		--config.env PACKER_PLUGIN_PATH=/opt/packer/plugins \
		--config.env CHECKPOINT_DISABLE=1 \
		--clear=config.entrypoint \
		--config.cmd packer --config.cmd version
	log "bake: built in $((SECONDS - started)) s"
}

# The operator image: glibc, libgcc, CA certificates and the baker binary, no shell and no package
# manager (images/operator.Dockerfile uses distroless's cc-debian12, which is the same).
operator() {
	local started=$SECONDS bin=${BAKER_BIN:-}
	if [ -z "$bin" ]; then
		log "operator: cargo build --release --bin baker"
		(cd "$repo" && cargo build --release --locked --bin baker)
		bin=${CARGO_TARGET_DIR:-$repo/target}/release/baker
	fi
	[ -x "$bin" ] || die "no operator binary at $bin"
	fresh operator "$bin" && return
	cp "$bin" "$work/baker"
	log "operator: extracting glibc, libgcc and the CA certificates from $suite"
	# `extract` unpacks the packages without running their scripts (which need a shell) and runs
	# no hooks: the rest is done here. The CA bundle is assembled as update-ca-certificates would,
	# and the users are written as distroless has them.
	local root=$work/operator-root
	mmdebstrap --mode=root --variant=extract --format=directory \
		--include=base-files,netbase,tzdata,libc6,libgcc-s1,ca-certificates \
		"$suite" "$root" "$mirror" >&2
	mkdir -p "$root/etc/ssl/certs" "$root/home/nonroot" "$root/tmp"
	cat "$root"/usr/share/ca-certificates/*/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
	printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' \
		"$nonroot" "$nonroot" >"$root/etc/passwd"
	printf 'root:x:0:\nnonroot:x:%s:\n' "$nonroot" >"$root/etc/group"
	chown "$nonroot:$nonroot" "$root/home/nonroot"
	chmod 1777 "$root/tmp"
	install -D -m 0755 "$work/baker" "$root/usr/local/bin/baker"
	rm -rf "$root/var/lib/dpkg" "$root/var/cache" "$root/var/log" "$root/usr/share/man" \
		"$root/usr/share/info" "$root/usr/share/locale"
	find "$root/usr/share/doc" -type f ! -name copyright -delete 2>/dev/null || true
	tar --numeric-owner -C "$root" -cf "$work/operator-rootfs.tar" .
	oci operator "$work/operator-rootfs.tar" \
		--config.user "$nonroot:$nonroot" \
		--config.env "$path_env" \
		--config.exposedports 8080/tcp \
		--config.entrypoint /usr/local/bin/baker \
		--config.cmd run
	log "operator: built in $((SECONDS - started)) s"
}

main() {
	if_stale=0
	if [ "${1:-}" = --if-stale ]; then
		if_stale=1
		shift
	fi
	local targets=("$@")
	[ ${#targets[@]} = 0 ] && targets=(operator bake)
	for t in "${targets[@]}"; do
		case $t in operator | bake) ;; *) die "unknown image $t (operator or bake)" ;; esac
	done
	[ "$(id -u)" = 0 ] || die "mmdebstrap's root mode needs root (run as root, or with sudo)"
	ensure_tools
	work=$(mktemp -d "${TMPDIR:-/tmp}/baker-images.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	for t in "${targets[@]}"; do "$t"; done
}

main "$@"
