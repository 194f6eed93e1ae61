#!/usr/bin/env bash
# The whole test suite: unit tests of the pure crates and end-to-end tests
# over real namespaces, links and nftables (needs root, see install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# The end-to-end tests run target/debug/weft, which `cargo test` alone does not build.
cargo build --workspace --bins
# The agent's modules name each other in one direction only (docs/ARCHITECTURE.md).
python3 scripts/module-cycles.py >/dev/null || { python3 scripts/module-cycles.py | tail -1; echo "test.sh: a use-cycle among the agent's modules" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
# One closing line for the whole run (cargo's last line is one crate's doc tests).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
