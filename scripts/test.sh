#!/usr/bin/env bash
# The whole test suite: unit tests of the pure crates and end-to-end tests
# over real namespaces, links and nftables (needs root, see install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# The end-to-end tests run target/debug/weft, which `cargo test` alone does not build.
cargo build --workspace --bins
cargo test --workspace
