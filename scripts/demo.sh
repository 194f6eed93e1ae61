#!/usr/bin/env bash
# weft's main job, end to end, on simulated hosts so that nothing of this
# machine's own network is touched: installs what is needed, builds weft,
# (1) starts a lab of three hosts (namespaces on one underlay switch, etcd,
# an agent each) joined by an overlay network, and shows sandboxes on
# different hosts talking by their own addresses; (2) starts an agent in a
# "host" namespace with an "outside" network behind it, runs two sandboxes
# and shows them reaching each other, the host and the outside world
# (through masquerade). Removes everything on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release -p weft
weft=$PWD/target/release/weft

host=wftdemo-host outside=wftdemo-out dir=/dev/shm/wftdemo
export WEFT_STATE_DIR=$dir/state
export WEFT_LAB_ROOT=/dev/shm/wftdemo-labs
cleanup() {
    set +e
    "$weft" lab down --name wftdemo >/dev/null 2>&1
    rm -rf "$WEFT_LAB_ROOT"
    "$weft" rm -f web client >/dev/null 2>&1
    [ -n "${agent:-}" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
    # Whatever the agent left (its pool's namespace files, their mount).
    [ -e "/run/netns/$host" ] && [ -x "${weft:-}" ] &&
        nsenter --net="/run/netns/$host" "$weft" reset -f --data-dir "$dir/data" >/dev/null 2>&1
    umount -l "$dir/state/netns" 2>/dev/null
    ip netns del "$host" 2>/dev/null
    ip netns del "$outside" 2>/dev/null
    rm -rf "$dir"
}
cleanup
trap cleanup EXIT
in_host() { nsenter --net="/run/netns/$host" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a lab: three hosts on one switch, etcd, an agent per host, overlay network 'lab' (one subnet shared by all hosts, VXLAN)"
"$weft" lab up --name wftdemo --hosts 3
lab() { "$weft" lab exec --name wftdemo "$@"; }
lab h1 -- weft run -d --name a --net lab -- sleep infinity >/dev/null
lab h3 -- weft run -d --name c --net lab -- socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo hello from h3 - you are $SOCAT_PEERADDR' >/dev/null
c=$(lab h3 -- weft --format json ps | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["attachment"]["endpoints"][0]["ip"])')
"$weft" lab status --name wftdemo
lab h1 -- weft status || echo "(weft status exits 1 when the host reports a problem: see above)"

step "a on h1 -> c on h3, across hosts, by their own addresses and by name (one LAN: no router hop, ttl 64)"
lab h1 -- weft exec a -- ping -c 2 "$c"
lab h1 -- weft exec a -- ping -c 1 c
lab h1 -- weft exec a -- socat -T 2 - "TCP:$c:80"
lab h1 -- weft exec a -- ip neigh show "$c"
lab h1 -- weft network inspect lab

step "weave's expose: h1 itself reaches c on h3 only once it exposes 'lab' (weft expose / weft hide)"
if lab h1 -- ping -c 1 -W 1 "$c" >/dev/null; then echo "!! h1 reached c before expose" >&2; exit 1; fi
echo "h1 -> c ($c) before expose: no reply (the host's source on 'lab' is the gateway, which every host has)"
lab h1 -- weft expose lab
lab h1 -- ping -c 1 "$c"
lab h1 -- weft hide lab

step "weave's isolation on 'lab': sub-ranges (--net lab:subnet=CIDR); a sandbox reaches only its own sub-range, on any host"
lab h1 -- weft run -d --name s1 --net lab:subnet=10.40.2.128/25 -- sleep infinity >/dev/null
lab h2 -- weft run -d --name s2 --net lab:subnet=10.40.2.128/25 -- sleep infinity >/dev/null
lab h2 -- weft run -d --name t2 --net lab:subnet=10.40.3.0/25 -- sleep infinity >/dev/null
t2=$(lab h2 -- weft --format json inspect t2 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["attachment"]["endpoints"][0]["ip"])')
lab h1 -- weft exec s1 -- ip -4 -br addr show eth0
lab h1 -- weft exec s1 -- ping -c 1 s2
if lab h1 -- weft exec s1 -- ping -c 1 -W 1 "$t2"; then echo "!! s1 reached t2 in another sub-range" >&2; exit 1; fi
echo "s1 -> t2 ($t2, sub-range 10.40.3.0/25): no reply, as wanted; and with a route added by hand inside s1:"
lab h1 -- weft exec s1 -- ip route add "$t2/32" dev eth0
if lab h1 -- weft exec s1 -- ping -c 1 -W 1 "$t2"; then echo "!! the hand-made route got through" >&2; exit 1; fi
echo "still no reply: h1 drops frames between sub-ranges (table bridge weft):"
lab h1 -- nft list chain bridge weft forward

step "flannel's kind on the same lab: a /24 per host, routed (--host-subnet-len 24)"
lab h1 -- weft network create -d overlay --subnet 10.41.0.0/16 --host-subnet-len 24 fl
lab h2 -- weft run -d --name f2 --net fl -- sleep infinity >/dev/null
for _ in $(seq 50); do lab h1 -- weft network inspect fl >/dev/null 2>&1 && break; sleep 0.1; done
lab h1 -- weft run -d --name f1 --net fl -- sleep infinity >/dev/null
f2=$(lab h2 -- weft --format json inspect f2 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["attachment"]["endpoints"][0]["ip"])')
lab h1 -- weft network ls
# h1 routes to h2's /24 once it has seen h2's lease (a moment).
for _ in $(seq 30); do lab h1 -- weft exec f1 -- ping -c 1 -W 1 "$f2" >/dev/null 2>&1 && break; done
lab h1 -- weft exec f1 -- ping -c 2 "$f2"

step "the path of that packet, hop by hop, from the live kernel of h1 and h3 (weft lab explain)"
"$weft" lab explain --name wftdemo h1 a c
"$weft" lab down --name wftdemo

step "a simulated host, with an outside network (203.0.113.0/24) behind it"
ip netns add "$host"; ip netns add "$outside"
ip -n "$host" link set lo up; ip -n "$outside" link set lo up
ip link add wftdemo0 netns "$host" type veth peer name wftdemo1 netns "$outside"
ip -n "$host" addr add 203.0.113.1/24 dev wftdemo0; ip -n "$host" link set wftdemo0 up
ip -n "$outside" addr add 203.0.113.2/24 dev wftdemo1; ip -n "$outside" link set wftdemo1 up

step "weft agent"
mkdir -p "$dir"
# nsenter execs the agent, so $! is the agent itself (for cleanup).
nsenter --net="/run/netns/$host" "$weft" agent --data-dir "$dir/data" --bridge-subnet 10.88.0.0/16 >"$dir/agent.log" 2>&1 &
agent=$!
for _ in $(seq 100); do "$weft" ps >/dev/null 2>&1 && break; sleep 0.05; done
in_host "$weft" network ls

step "two sandboxes"
web=10.88.0.10
"$weft" run -d --name web --ip "$web" -- socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo hello from web'
"$weft" run -d --name client -- sleep infinity
"$weft" ps

step "client -> web (container to container)"
"$weft" exec client -- ping -c 2 "$web"
"$weft" exec client -- socat -T 2 - "TCP:$web:80"

step "host -> web (host to container)"
in_host ping -c 2 "$web"

step "client -> outside world (masquerade: the outside sees the host's address)"
"$weft" exec client -- ping -c 2 203.0.113.2
ip netns exec "$outside" socat TCP-LISTEN:9000,reuseaddr SYSTEM:'echo you came from $SOCAT_PEERADDR' &
sleep 0.3
"$weft" exec client -- socat -T 2 - TCP:203.0.113.2:9000

step "weft's nftables table"
in_host nft list table inet weft

step "done; cleaning up"
