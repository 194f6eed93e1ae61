#!/usr/bin/env bash
# Installs what weft and its tests need on Debian (run as root).
# Pass --bench to also install what the benchmarks compare against.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: run as root (sudo bash scripts/install-deps.sh)" >&2
    exit 1
fi
pkgs=(iproute2 nftables iputils-ping socat procps util-linux ca-certificates dnsmasq-base bind9-dnsutils tcpdump python3)
# tests/tests/podman.rs: podman 4 with its CNI backend (runc: crun cannot run on
# hybrid cgroup hosts), containers from a busybox-static root file system.
pkgs+=(podman crun runc conmon busybox-static)
# The cluster: etcd (and etcdctl for tests), protoc and the well-known .proto
# files (descriptor.proto, in libprotobuf-dev: only a Recommends of
# protobuf-compiler) to build the etcd client.
pkgs+=(etcd-server etcd-client protobuf-compiler libprotobuf-dev)
# tests/tests/docker.rs: dockerd (with the containerd it starts) using weft as
# its network and IPAM driver.
pkgs+=(docker.io)
# tests/tests/metrics.rs: Prometheus scrapes an agent (and promtool checks the page).
pkgs+=(prometheus)
# tests/tests/explain.rs: weft explain --format png renders with Graphviz.
pkgs+=(graphviz)
if [ "${1:-}" = "--bench" ]; then
    # bench/dns: dnsperf drives weft's resolver and podman's aardvark-dns.
    pkgs+=(containernetworking-plugins iperf3 dnsperf aardvark-dns)
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
if ! command -v cargo >/dev/null; then
    echo "install-deps.sh: cargo is missing; install a Rust toolchain (https://rustup.rs) and run again" >&2
    exit 1
fi
echo "dependencies installed: ${pkgs[*]}"
