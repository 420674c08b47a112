#!/usr/bin/env bash
# Fault load tests on loopback: builds Reveille in release and runs every scenario with N
# requests each (default 2000). Prints one line per scenario; exits 1 if any request was lost.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2000}"
ulimit -n 65536 2>/dev/null || true
# The binary alone, as users build it (see run.sh); then the scenarios.
cargo build --release --bins -q
cargo build --release --examples -q
exec target/release/examples/faults "$n"
