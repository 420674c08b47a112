#!/usr/bin/env bash
# Two Reveille builds side by side, with nginx as the yardstick, on loopback only.
#
#   A=/path/to/old/reveille B=target/release/reveille loadtests/ab.sh
#
# (Relative paths are taken from the repository's root. Build each binary alone, `cargo build
# --release --bin reveille`: built with examples or tests it gets tokio's test clock.)
# Both binaries serve the same static service in front of one origin (examples/origin.rs);
# each round measures A, B and nginx in turn (the order rotates each round), HTTP/1.1 keep-alive
# with wrk and h2c with h2load, and reads each proxy's CPU time from /proc/PID/stat. Proxies run
# pinned to PROXY_CPU, origin and load generator to LOAD_CPU. Because the runs interleave, a
# change in the machine's speed during the run hits A and B alike: compare A and B within a
# round. Prints one line per measurement and a summary of CPU per request (µs) by target.
# Needs wrk, h2load, nginx (loadtests/run.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. loadtests/common.sh

: "${A:?A=path of the first reveille binary}" "${B:?B=path of the second reveille binary}"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
H2_REQUESTS=${H2_REQUESTS:-150000}
H2_STREAMS=${H2_STREAMS:-8}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PROTOS=${PROTOS:-"http1 h2c"}
PATH=$PATH:/usr/sbin
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

ORIGIN_PORT=18100 A_PORT=18101 B_PORT=18102 NGINX_PORT=18103 NGINX_H2_PORT=18104
TMP=$(mktemp -d)
trap 'stop_servers; rm -rf "$TMP"' EXIT

cargo build --release --quiet --example origin
bg taskset -c "$LOAD_CPU" target/release/examples/origin --listen 127.0.0.1:$ORIGIN_PORT --threads 1
wait_port $ORIGIN_PORT
for side in A B; do
  port_var=${side}_PORT
  cat >"$TMP/$side.yaml" <<YAML
listen: 127.0.0.1:${!port_var}
admin: 127.0.0.1:0
services:
  - name: bench
    hosts: [bench.local, 127.0.0.1]
    backend:
      static:
        addresses: ["127.0.0.1:$ORIGIN_PORT"]
YAML
  REVEILLE_LOG=warn bg taskset -c "$PROXY_CPU" "${!side}" serve --config "$TMP/$side.yaml" --workers 1
done
nginx_conf "$TMP/nginx.conf" "$TMP/nginx" $ORIGIN_PORT $NGINX_PORT $NGINX_H2_PORT "worker_processes 1;"
bg taskset -c "$PROXY_CPU" nginx -c "$TMP/nginx.conf" -e "$TMP/nginx/error.log"
for p in $A_PORT $B_PORT $NGINX_PORT $NGINX_H2_PORT; do wait_port "$p"; done
sleep 0.5
A_PID=$(server_pid "${PIDS[1]}") B_PID=$(server_pid "${PIDS[2]}") NGINX_PID=$(server_pid "${PIDS[3]}")

TARGETS=("A $A_PORT $A_PORT $A_PID" "B $B_PORT $B_PORT $B_PID" "nginx $NGINX_PORT $NGINX_H2_PORT $NGINX_PID")
RESULTS=$TMP/results.tsv
for round in $(seq "$ROUNDS"); do
  # Rotate the order so no target always runs first (or right after the warm-up of another).
  shift_by=$(( (round - 1) % 3 ))
  order=("${TARGETS[@]:$shift_by}" "${TARGETS[@]:0:$shift_by}")
  for t in "${order[@]}"; do
    read -r name h1 h2 pid <<<"$t"
    for proto in $PROTOS; do
      if [ "$proto" = http1 ]; then
        timeout 30 taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$h1/" >/dev/null
        c0=$(cpu_ticks "$pid")
        out=$(timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$h1/")
        c1=$(cpu_ticks "$pid")
        reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      else
        timeout 30 taskset -c "$LOAD_CPU" h2load -t1 -c"$CONNS" -m"$H2_STREAMS" -n 10000 "http://127.0.0.1:$h2/" >/dev/null
        c0=$(cpu_ticks "$pid")
        out=$(timeout 120 taskset -c "$LOAD_CPU" h2load -t1 -c"$CONNS" -m"$H2_STREAMS" -n "$H2_REQUESTS" "http://127.0.0.1:$h2/")
        c1=$(cpu_ticks "$pid")
        reqs=$(awk '/^requests:/ {print $8}' <<<"$out")
      fi
      [ -n "$reqs" ] || { echo "round $round $name $proto: no request count in the load tool's output" >&2; echo "$out" >&2; exit 1; }
      ticks=$((c1 - c0))
      printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$proto" "$reqs" "$ticks" >>"$RESULTS"
      echo "round $round $name $proto: $reqs requests, $ticks ticks" >&2
    done
  done
done

python3 - "$RESULTS" "$(getconf CLK_TCK)" <<'PY'
import collections, statistics, sys
tck = int(sys.argv[2])
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
per = collections.defaultdict(list)  # (proto, target) -> µs CPU per request, by round
for rnd, name, proto, reqs, ticks in rows:
    per[(proto, name)].append(int(ticks) / tck * 1e6 / max(1, int(reqs)))
for proto in sorted({k[0] for k in per}):
    med = {n: statistics.median(per[(proto, n)]) for n in ("A", "B", "nginx") if (proto, n) in per}
    print(f"{proto}: CPU per request (µs, median of {len(per[(proto, 'A')])} rounds): "
          + ", ".join(f"{n} {v:.2f}" for n, v in med.items())
          + f"; B/A {med['B'] / med['A']:.3f}, A/nginx {med['A'] / med['nginx']:.3f}, B/nginx {med['B'] / med['nginx']:.3f}")
    for n in ("A", "B", "nginx"):
        print(f"  {n}: " + " ".join(f"{v:.2f}" for v in per[(proto, n)]))
PY
