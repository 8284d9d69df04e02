#!/usr/bin/env bash
# Asserts that `rig.sh down` left nothing of a rig behind: its state directory is gone, no process
# it started (or a pod of its node) still runs, the pids it recorded are dead and its ports are
# free. Fails loudly otherwise.
#
# Usage: tests/rig/check-down.sh STATE_DIR SNAPSHOT_DIR
#   SNAPSHOT_DIR holds copies of the rig's `pids/` and `ports`, taken before `down` removed them.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=$(realpath -m "${1:?usage: $0 STATE_DIR SNAPSHOT_DIR}")
snap=${2:?usage: $0 STATE_DIR SNAPSHOT_DIR}
failures=0
fail() { printf '[check-down] FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }

[ -e "$state" ] && fail "the state directory $state still exists"

if ! left=$(BAKER_RIG_DIR=$state "$here/rig.sh" leftovers); then
	fail "processes of the rig still run:"
	printf '%s\n' "$left" >&2
fi

pids=0
for f in "$snap"/pids/*.pid; do
	[ -e "$f" ] || continue
	pid=$(cat "$f")
	pids=$((pids + 1))
	# A recycled pid belongs to something else: only a process running the rig's programs counts.
	if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" |
		grep -qE "$state|/baker/bin/|venv-moto-|baker-rig-node"; then
		fail "$(basename "$f" .pid) (pid $pid) still runs: $(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-160)"
	fi
done
[ "$pids" -gt 0 ] || fail "no pids in the snapshot $snap/pids: nothing was checked"

ports=$(sed -n 's/^[A-Z_]*=\([0-9]*\)$/\1/p' "$snap/ports" 2>/dev/null | tr '\n' ' ')
# shellcheck disable=SC2086 # $ports: one argument per port
if [ -z "$ports" ]; then
	fail "no ports in the snapshot $snap/ports"
elif ! busy=$(python3 - $ports <<'PY'
import socket, sys
busy = []
for p in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(p)))
    except OSError:
        busy.append(p)
    finally:
        s.close()
print(" ".join(busy))
sys.exit(1 if busy else 0)
PY
); then
	fail "ports of the rig are still bound: $busy"
fi

# What the real node (real-node.sh) makes outside the state dir, if this rig ran one.
if [ -e "$snap/pids/kubelet.pid" ]; then
	[ -e /run/netns/baker-rig-pods ] && fail "the real node's network namespace baker-rig-pods remains"
	for cg in /sys/fs/cgroup/*/baker-rig-kubelet; do
		[ -e "$cg" ] && fail "the real node's cgroup $cg remains"
	done
fi
if findmnt -rn -o TARGET | grep -qF "$state/"; then
	fail "mounts under $state remain: $(findmnt -rn -o TARGET | grep -F "$state/" | head -3 | tr '\n' ' ')"
fi

if [ "$failures" -gt 0 ]; then
	printf '[check-down] %d problem(s) after rig.sh down of %s\n' "$failures" "$state" >&2
	exit 1
fi
printf '[check-down] ok: %s is gone, none of its %d processes or pods survive, ports %sare free\n' "$state" "$pids" "$ports"
