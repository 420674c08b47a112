#!/usr/bin/env bash
# Profiles Reveille's warm path: origin and wrk on LOAD_CPU, Reveille on PROXY_CPU, and
# `perf record -e cpu-clock` (a software event, so it works where hardware counters don't)
# on Reveille for a bounded wrk run. Prints the hottest symbols; the data stays in
# loadtests/results/tmp/perf.data for `perf report`.
#
#   loadtests/profile.sh [seconds]      # PROTO=h2c for HTTP/2 with h2load
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-8}
PROTO=${PROTO:-http1}
PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
command -v perf >/dev/null || apt-get install -y -qq linux-perf >/dev/null
command -v wrk >/dev/null || apt-get install -y -qq wrk nghttp2-client >/dev/null
# The binary is built alone: built with the examples, it would get the dev-dependencies'
# features (tokio's `test-util`, which puts a paused-clock check in every timer and
# `Instant::now`), which the binary users build does not have.
cargo build --release --quiet --bin reveille
cargo build --release --quiet --example origin
TMP=loadtests/results/tmp/profile
mkdir -p "$TMP"
cat >"$TMP/reveille.yaml" <<YAML
listen: 127.0.0.1:18101
admin: 127.0.0.1:18191
services:
  - name: bench
    hosts: [127.0.0.1]
    backend: { static: { addresses: ["127.0.0.1:18100"] } }
YAML
timeout 300 taskset -c "$LOAD_CPU" target/release/examples/origin --listen 127.0.0.1:18100 & O=$!
REVEILLE_LOG=warn timeout 300 taskset -c "$PROXY_CPU" target/release/reveille serve --config "$TMP/reveille.yaml" --workers 1 & R=$!
trap 'kill $O $R 2>/dev/null; wait 2>/dev/null' EXIT
sleep 1
RPID=$(pgrep -P "$R" | head -1)
timeout 30 taskset -c "$LOAD_CPU" wrk -t1 -c64 -d2s http://127.0.0.1:18101/ >/dev/null
if [ "$PROTO" = h2c ]; then
  LOAD=(h2load -t1 -c64 -m8 -D "$SECS" http://127.0.0.1:18101/)
else
  LOAD=(wrk -t1 -c64 -d"${SECS}s" http://127.0.0.1:18101/)
fi
perf record -e cpu-clock -F 999 --call-graph "${CALLGRAPH:-fp}" -p "$RPID" -o "$TMP/perf.data" -- sleep "$SECS" 2>/dev/null &
P=$!
timeout $((SECS + 30)) taskset -c "$LOAD_CPU" "${LOAD[@]}" | grep -E "Requests/sec|finished in"
wait $P
perf report -i "$TMP/perf.data" --stdio --no-children --sort symbol 2>/dev/null | grep -E '^ +[0-9]' | head -40
