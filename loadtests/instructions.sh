#!/usr/bin/env bash
# Instructions per proxied request, Reveille next to nginx, counted by valgrind's callgrind.
# Instruction counts do not depend on what else the machine is doing, so this ratio is the
# steady one on a shared machine (wall-clock CPU from /proc, in run.sh, moves ±20 %).
#
#   loadtests/instructions.sh [N]      # N measured requests per target (default 20000)
#   KEEP=DIR loadtests/instructions.sh  # also keep the callgrind dumps in DIR (for
#                                       # callgrind_annotate: where the instructions go)
#   REVEILLE_BIN=old/reveille SKIP_NGINX=1 loadtests/instructions.sh
#                                       # another build of Reveille, and no nginx: an A/B of
#                                       # two builds without the machine's noise
#
# Each proxy runs single-threaded under callgrind in front of the same origin; h2load sends
# 2,000 warm-up requests (not counted: callgrind_control -z), then N requests over 16
# keep-alive connections, HTTP/1.1 then h2c (prior knowledge); the counters are dumped and the
# program total divided by N. Counts user-space instructions only (the kernel's share is not
# seen), which is where the two proxies differ (run.sh: system time per request is the same).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. loadtests/common.sh
N=${1:-20000}
need() { command -v "$1" >/dev/null 2>&1; }
if ! need valgrind || ! need h2load || ! need nginx; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq valgrind nghttp2-client nginx >/dev/null
fi
PATH=$PATH:/usr/sbin
# The binary is built alone: built with the examples, it would get the dev-dependencies'
# features (tokio's `test-util`, which puts a paused-clock check in every timer and
# `Instant::now`), which the binary users build does not have.
cargo build --release --quiet --bin reveille
cargo build --release --quiet --example origin
BIN=$ROOT/target/release
TMP=$(mktemp -d)
ORIGIN=28400 REVEILLE=28401 ADMIN=28491 NGINX=28402 NGINX_H2=28403
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$TMP"/cg-* "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

timeout 1800 "$BIN/examples/origin" --listen 127.0.0.1:$ORIGIN --threads 1 & PIDS+=($!)
wait_port $ORIGIN

cat >"$TMP/reveille.yaml" <<YAML
listen: 127.0.0.1:$REVEILLE
admin: 127.0.0.1:$ADMIN
services:
  - name: bench
    hosts: [127.0.0.1]
    backend: { static: { addresses: ["127.0.0.1:$ORIGIN"] } }
YAML
nginx_conf "$TMP/nginx.conf" "$TMP/nginx" $ORIGIN $NGINX $NGINX_H2 "worker_processes 1;" "master_process off;"

# measure NAME PID PORT H2PORT: instructions per request for HTTP/1.1 and h2c.
measure() {
  local name=$1 pid=$2 port=$3 h2port=$4 proto args p out ir
  for proto in http1 h2c; do
    if [ "$proto" = h2c ]; then args=(-m 8); p=$h2port; else args=(--h1); p=$port; fi
    h2load "${args[@]}" -c 16 -n 2000 "http://127.0.0.1:$p/" >/dev/null
    callgrind_control -z "$pid" >/dev/null
    out=$(h2load "${args[@]}" -c 16 -n "$N" "http://127.0.0.1:$p/")
    echo "$out" | grep -q " 0 failed, 0 errored" || { echo "$out" >&2; }
    echo "$out" | grep -q "status codes: $N 2xx" || { echo "$name $proto: not all 2xx" >&2; echo "$out" >&2; exit 1; }
    callgrind_control -d "$pid" >/dev/null
    sleep 1
    ir=$(callgrind_annotate "$(ls -t "$TMP"/cg-"$name".out* | head -1)" 2>/dev/null \
      | grep -m1 "PROGRAM TOTALS" | awk '{gsub(",","",$1); print $1}')
    echo "$name $proto: $((ir / N)) instructions per request"
  done
}

REVEILLE_LOG=warn timeout 1800 valgrind -q --tool=callgrind --callgrind-out-file="$TMP/cg-reveille.out" \
  "${REVEILLE_BIN:-$BIN/reveille}" serve --config "$TMP/reveille.yaml" --workers 1 & PIDS+=($!)
wait_port $REVEILLE 60
measure reveille "$(pgrep -P "${PIDS[-1]}" | head -1)" $REVEILLE $REVEILLE
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

if [ "${SKIP_NGINX:-0}" != 1 ]; then
  timeout 1800 valgrind -q --tool=callgrind --callgrind-out-file="$TMP/cg-nginx.out" \
    nginx -c "$TMP/nginx.conf" -e "$TMP/nginx/error.log" & PIDS+=($!)
  wait_port $NGINX 60
  measure nginx "$(pgrep -P "${PIDS[-1]}" | head -1)" $NGINX $NGINX_H2
fi
