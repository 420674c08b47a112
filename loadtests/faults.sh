#!/usr/bin/env bash
# Fault load tests on loopback: builds Reveille in release and runs every scenario with N
# requests each (default 2000). Prints one line per scenario; exits 1 if any request was lost.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2000}"
ulimit -n 65536 2>/dev/null || true
# The scenarios run Reveille in-process (tests/support), so the proxy measured here is the
# library as the examples build it, with tokio's `test-util` (see run.sh); the binary, built
# alone, serves as the demo backend and in the SIGTERM scenario.
cargo build --release --bins -q
cargo build --release --examples -q
exec target/release/examples/faults "$n"
