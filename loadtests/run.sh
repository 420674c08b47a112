#!/usr/bin/env bash
# Reveille against nginx and HAProxy, side by side in one run, on loopback only.
#
#   sudo loadtests/run.sh            # or as root; installs wrk, h2load, nginx, haproxy if missing
#
# Starts one fast static origin (examples/origin.rs), then Reveille (static backend, warm),
# nginx and HAProxy as reverse proxies with the same worker count in front of it. For each
# proxy and for the origin directly: HTTP/1.1 keep-alive load with wrk, HTTP/2 (h2c prior
# knowledge) with h2load. Proxies run pinned to PROXY_CPU, origin and load generator to
# LOAD_CPU. The proxy's CPU time comes from /proc/PID/stat (utime+stime) around each run.
# Then the cold path (examples/coldpath.rs): wake-up overhead, a 10k-connection burst during
# one cold start, and the memory of 10k services. Every load is bounded in time and count.
#
# Output: loadtests/results/<stamp>.json (every figure), <stamp>.md (tables), <stamp>.svg
# (plot), and copies named latest.*. HTTP/1.1 over TLS (TLS 1.3, keep-alive, the same
# self-signed certificate) is measured for Reveille and nginx with wrk too.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. loadtests/common.sh

WORKERS=${WORKERS:-1}          # proxy worker threads/processes, the same for all three
DURATION=${DURATION:-8}        # seconds per wrk run
CONNS=${CONNS:-64}             # concurrent connections
H2_REQUESTS=${H2_REQUESTS:-200000}
H2_STREAMS=${H2_STREAMS:-8}    # concurrent streams per h2 connection
ROUNDS=${ROUNDS:-3}            # rounds over all targets; the median round is reported
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
WAKE_RUNS=${WAKE_RUNS:-60}
BURST=${BURST:-10000}
SERVICES=${SERVICES:-10000}
SKIP_WARM=${SKIP_WARM:-0}
SKIP_COLD=${SKIP_COLD:-0}

ORIGIN_PORT=18000 REVEILLE_PORT=18001 REVEILLE_ADMIN=18091
NGINX_PORT=18002 NGINX_H2_PORT=18004 HAPROXY_PORT=18003 HAPROXY_H2_PORT=18005
REVEILLE_TLS_PORT=18006 NGINX_TLS_PORT=18007

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need h2load || ! need nginx || ! need haproxy; then
  echo "installing load-test tools" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq wrk nghttp2-client nginx haproxy >/dev/null
fi
PATH=$PATH:/usr/sbin
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
TMP=$ROOT/loadtests/results/tmp/$STAMP
OUT=$ROOT/loadtests/results
mkdir -p "$TMP"
RAW=$TMP/raw.jsonl
: >"$RAW"

echo "building (release)" >&2
# The binary is built alone: built with the examples, it would get the dev-dependencies'
# features (tokio's `test-util`, which puts a paused-clock check in every timer and
# `Instant::now`), which the binary users build does not have.
cargo build --release --quiet --bin reveille
cargo build --release --quiet --example origin --example coldpath
BIN=$ROOT/target/release
trap stop_servers EXIT

machine_json() {
  python3 - "$@" <<'PY'
import json, os, sys
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(json.dumps({"nproc": os.cpu_count(), "cpu": model, "load_avg": open("/proc/loadavg").read().split()[:3]}))
PY
}

if [ "$SKIP_WARM" != 1 ]; then
  echo "starting origin, reveille, nginx, haproxy" >&2
  bg taskset -c "$LOAD_CPU" "$BIN/examples/origin" --listen 127.0.0.1:$ORIGIN_PORT --threads 1
  wait_port $ORIGIN_PORT

  # One certificate for both TLS listeners (P-256, TLS 1.3 only on each side).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=bench.local" -addext "subjectAltName=DNS:bench.local,IP:127.0.0.1" \
    -keyout "$TMP/tls.key" -out "$TMP/tls.crt" 2>/dev/null
  cat >"$TMP/reveille.yaml" <<YAML
listen: 127.0.0.1:$REVEILLE_PORT
admin: 127.0.0.1:$REVEILLE_ADMIN
tls: { listen: 127.0.0.1:$REVEILLE_TLS_PORT, cert: $TMP/tls.crt, key: $TMP/tls.key }
services:
  - name: bench
    hosts: [bench.local, 127.0.0.1]
    backend:
      static:
        addresses: ["127.0.0.1:$ORIGIN_PORT"]
YAML
  REVEILLE_LOG=warn bg taskset -c "$PROXY_CPU" "$BIN/reveille" serve --config "$TMP/reveille.yaml" --workers "$WORKERS"

  # (no worker_cpu_affinity: taskset keeps the workers on the proxy CPU)
  nginx_conf "$TMP/nginx.conf" "$TMP/nginx" $ORIGIN_PORT $NGINX_PORT $NGINX_H2_PORT "worker_processes $WORKERS;"
  # The same proxying, on a TLS 1.3 listener with the shared certificate.
  sed -i "s|    listen 127.0.0.1:$NGINX_H2_PORT http2;|&\n    listen 127.0.0.1:$NGINX_TLS_PORT ssl;\n    ssl_certificate $TMP/tls.crt;\n    ssl_certificate_key $TMP/tls.key;\n    ssl_protocols TLSv1.3;|" "$TMP/nginx.conf"
  bg taskset -c "$PROXY_CPU" nginx -c "$TMP/nginx.conf" -e "$TMP/nginx/error.log"

  cat >"$TMP/haproxy.cfg" <<HAPROXY
global
  nbthread $WORKERS
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option forwardfor
  http-reuse always
frontend h1
  bind 127.0.0.1:$HAPROXY_PORT
  bind 127.0.0.1:$HAPROXY_H2_PORT proto h2
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  default_backend origin
backend origin
  server o1 127.0.0.1:$ORIGIN_PORT
HAPROXY
  bg taskset -c "$PROXY_CPU" haproxy -f "$TMP/haproxy.cfg"
  for p in $REVEILLE_PORT $REVEILLE_TLS_PORT $NGINX_PORT $NGINX_H2_PORT $NGINX_TLS_PORT $HAPROXY_PORT $HAPROXY_H2_PORT; do wait_port "$p"; done
  sleep 0.5
  # The real servers are the children of the `timeout` wrappers (taskset execs into them).
  ORIGIN_PID=$(server_pid "${PIDS[0]}")
  REVEILLE_PID=$(server_pid "${PIDS[1]}")
  NGINX_PID=$(server_pid "${PIDS[2]}")
  HAPROXY_PID=$(server_pid "${PIDS[3]}")
  echo "pids: reveille=$REVEILLE_PID nginx=$NGINX_PID haproxy=$HAPROXY_PID origin=$ORIGIN_PID" >&2

  # name h1-port h2-port pid-whose-CPU-counts
  TARGETS=(
    "direct $ORIGIN_PORT $ORIGIN_PORT $ORIGIN_PID"
    "reveille $REVEILLE_PORT $REVEILLE_PORT $REVEILLE_PID"
    "nginx $NGINX_PORT $NGINX_H2_PORT $NGINX_PID"
    "haproxy $HAPROXY_PORT $HAPROXY_H2_PORT $HAPROXY_PID"
  )
  for round in $(seq "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
      read -r name h1 h2 pid <<<"$t"
      # HTTP/1.1 keep-alive: warm up, then measure.
      timeout 30 taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$h1/" >/dev/null
      load=$(cut -d' ' -f1-3 /proc/loadavg)
      c0=$(cpu_ticks "$pid")
      line=$(timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" \
        -s loadtests/wrk-report.lua "http://127.0.0.1:$h1/" | grep '^WRKJSON' | cut -d' ' -f2-)
      c1=$(cpu_ticks "$pid")
      echo "{\"round\":$round,\"target\":\"$name\",\"proto\":\"http1\",\"conns\":$CONNS,\"cpu_ticks\":$((c1 - c0)),\"load\":\"$load\",\"wrk\":$line}" >>"$RAW"
      echo "round $round $name http1: $line cpu_ticks=$((c1 - c0)) load=$load" >&2

      # HTTP/2 cleartext, prior knowledge; bounded by request count and by time.
      timeout 30 taskset -c "$LOAD_CPU" h2load -t1 -c"$CONNS" -m"$H2_STREAMS" -n 20000 "http://127.0.0.1:$h2/" >/dev/null
      load=$(cut -d' ' -f1-3 /proc/loadavg)
      c0=$(cpu_ticks "$pid")
      timeout 120 taskset -c "$LOAD_CPU" h2load -t1 -c"$CONNS" -m"$H2_STREAMS" -n "$H2_REQUESTS" \
        --log-file "$TMP/h2-$name-$round.log" "http://127.0.0.1:$h2/" >"$TMP/h2-$name-$round.txt"
      c1=$(cpu_ticks "$pid")
      summary=$(python3 loadtests/h2log.py "$TMP/h2-$name-$round.txt" "$TMP/h2-$name-$round.log")
      rm -f "$TMP/h2-$name-$round.log"
      echo "{\"round\":$round,\"target\":\"$name\",\"proto\":\"h2c\",\"conns\":$CONNS,\"streams\":$H2_STREAMS,\"cpu_ticks\":$((c1 - c0)),\"load\":\"$load\",\"h2load\":$summary}" >>"$RAW"
      echo "round $round $name h2c: $summary cpu_ticks=$((c1 - c0)) load=$load" >&2
    done
    # HTTP/1.1 over TLS 1.3, keep-alive: Reveille and nginx, the same certificate.
    for t in "reveille $REVEILLE_TLS_PORT $REVEILLE_PID" "nginx $NGINX_TLS_PORT $NGINX_PID"; do
      read -r name port pid <<<"$t"
      timeout 30 taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s "https://127.0.0.1:$port/" >/dev/null
      load=$(cut -d' ' -f1-3 /proc/loadavg)
      c0=$(cpu_ticks "$pid")
      line=$(timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" \
        -s loadtests/wrk-report.lua "https://127.0.0.1:$port/" | grep '^WRKJSON' | cut -d' ' -f2-)
      c1=$(cpu_ticks "$pid")
      echo "{\"round\":$round,\"target\":\"$name\",\"proto\":\"https\",\"conns\":$CONNS,\"cpu_ticks\":$((c1 - c0)),\"load\":\"$load\",\"wrk\":$line}" >>"$RAW"
      echo "round $round $name https: $line cpu_ticks=$((c1 - c0)) load=$load" >&2
    done
  done
  stop_servers
fi

if [ "$SKIP_COLD" != 1 ]; then
  echo "cold path: wake-up overhead (probed, $WAKE_RUNS runs)" >&2
  echo "{\"cold\":\"wake\",\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"result\":$(timeout 600 "$BIN/examples/coldpath" wake --origin "$BIN/examples/origin" --runs "$WAKE_RUNS" | tr -d '\n')}" >>"$RAW"
  echo "cold path: wake-up overhead (event-driven readiness)" >&2
  echo "{\"cold\":\"watch\",\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"result\":$(timeout 600 "$BIN/examples/coldpath" watch --runs 200 | tr -d '\n')}" >>"$RAW"
  echo "cold path: burst of $BURST connections during one cold start" >&2
  echo "{\"cold\":\"burst\",\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"result\":$(timeout 600 "$BIN/examples/coldpath" burst --reveille "$BIN/reveille" --origin "$BIN/examples/origin" --conns "$BURST" --startup-delay 6s --workers "$WORKERS" | tr -d '\n')}" >>"$RAW"
  echo "cold path: $SERVICES services" >&2
  echo "{\"cold\":\"services\",\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"result\":$(timeout 600 "$BIN/examples/coldpath" services --reveille "$BIN/reveille" --count "$SERVICES" | tr -d '\n')}" >>"$RAW"
fi

CMD="WORKERS=$WORKERS DURATION=$DURATION CONNS=$CONNS H2_REQUESTS=$H2_REQUESTS H2_STREAMS=$H2_STREAMS ROUNDS=$ROUNDS loadtests/run.sh"
python3 loadtests/report.py "$RAW" "$OUT/$STAMP" "$(machine_json)" "$CMD"
for ext in json md svg; do cp "$OUT/$STAMP.$ext" "$OUT/latest.$ext"; done
echo "wrote $OUT/$STAMP.{json,md,svg}" >&2
