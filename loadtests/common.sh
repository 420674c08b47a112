# Sourced by run.sh, ab.sh and instructions.sh.

# wait_port PORT [SECONDS]: until 127.0.0.1:PORT accepts (default 10 s; valgrind starts slowly).
wait_port() {
  local tries=$(( ${2:-10} * 20 ))
  for _ in $(seq "$tries"); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 did not open" >&2; return 1
}

# nginx as a reverse proxy in front of the origin, set up like Reveille (upstream keep-alive,
# the same X-Forwarded-* headers, no access log).
#
#   nginx_conf FILE DIR ORIGIN_PORT PORT H2_PORT [TOP-LEVEL DIRECTIVES...]
nginx_conf() {
  local file=$1 dir=$2 origin=$3 port=$4 h2port=$5
  shift 5
  mkdir -p "$dir"
  {
    printf '%s\n' "$@"
    cat <<NGINX
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 10000000;  # nginx closes a connection after 1000 requests (HTTP/1.1 and 2) by default
  client_body_temp_path $dir;
  proxy_temp_path $dir;
  fastcgi_temp_path $dir;
  uwsgi_temp_path $dir;
  scgi_temp_path $dir;
  upstream origin { server 127.0.0.1:$origin; keepalive 256; }
  server {
    listen 127.0.0.1:$port;
    listen 127.0.0.1:$h2port http2;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }
}
NGINX
  } >"$file"
}

# Background servers: `bg CMD...` starts one, bounded in time (`timeout` ends it if the
# script is killed), and `stop_servers` ends them all.
PIDS=()
bg() { timeout 3600 "$@" & PIDS+=($!); }
stop_servers() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

# utime+stime in clock ticks summed over a process and its children (nginx workers).
cpu_ticks() {
  local pids="$1 $(pgrep -P "$1" | tr '\n' ' ')" t=0 p
  for p in $pids; do
    [ -r /proc/"$p"/stat ] || continue
    t=$((t + $(awk '{print $14 + $15}' /proc/"$p"/stat)))
  done
  echo "$t"
}
# The PID whose CPU is counted: the real server under `timeout` (taskset execs into it).
server_pid() { pgrep -P "$1" | head -1; }
