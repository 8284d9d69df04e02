# Shared by the demo scripts (sourced): messages and stopping a demo's operator.
# Expects $demo_dir, where the operator's pid file lives.

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# Stops the operator recorded in $demo_dir/operator.pid: SIGTERM, then SIGKILL after 5 s.
stop_operator() {
	if [ -f "$demo_dir/operator.pid" ]; then
		local pid; pid=$(cat "$demo_dir/operator.pid")
		if kill -0 "$pid" 2>/dev/null; then
			kill "$pid" 2>/dev/null || true
			for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
			kill -9 "$pid" 2>/dev/null || true
		fi
		rm -f "$demo_dir/operator.pid"
	fi
}

# The demo talks to the operator's HTTP API with curl: install it (Debian) when it is missing.
ensure_curl() {
	command -v curl >/dev/null && return 0
	say "Installing curl"
	local sudo=()
	[ "$(id -u)" = 0 ] || sudo=(sudo)
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
		"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null ||
		{ echo "could not install curl; run: sudo apt-get install curl" >&2; exit 1; }
}
