#!/usr/bin/env bash
# Profiles `berth gateway` under wrk beside nginx, against one example-agent replica that a
# running Berth serves (`berth up`, then `berth deploy -n echo -i berth/echo-agent:local
# --health-endpoint /health`). Starts a plain-HTTP gateway and an nginx (upstream keep-alive) on
# free ports, then for each: wrk (2 threads, CONNECTIONS keep-alive connections, DURATION),
# `perf stat` of the proxy over the same window (CPU, context switches and system calls per
# request), its RSS after the load, and a `perf record` of the gateway with call graphs, folded
# into OUT/gateway.folded and drawn as OUT/gateway.svg when inferno is installed
# (`cargo install inferno`).
#
#   bench/gateway-profile/run.sh OUT [AGENT]        # AGENT defaults to echo
#
# Needs wrk, nginx and linux-perf (apt-get install wrk nginx linux-perf).
set -euo pipefail
out=$1; agent=${2:-echo}
connections=${CONNECTIONS:-32}; duration=${DURATION:-10}
berth=${BERTH_BIN:-target/release/berth}
etcd=${BERTH_ETCD:-http://127.0.0.1:23790}
mkdir -p "$out"
address=$("$berth" get "$agent" -o json | python3 -c 'import json,sys; a=json.load(sys.stdin); print([r["address"] for r in a["status"]["replicas"] if r.get("ready")][0])')
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
gw_port=$(port); admin_port=$(port); nginx_port=$(port)

"$berth" gateway --etcd "$etcd" --listen "127.0.0.1:$gw_port" --admin-listen "127.0.0.1:$admin_port" \
  --name profile > "$out/gateway.log" 2>&1 &
gw=$!
mkdir -p "$out/nginx"
cat > "$out/nginx/nginx.conf" <<CONF
worker_processes auto;
pid $out/nginx/nginx.pid;
error_log $out/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $out/nginx/body; proxy_temp_path $out/nginx/proxy;
  fastcgi_temp_path $out/nginx/fastcgi; uwsgi_temp_path $out/nginx/uwsgi; scgi_temp_path $out/nginx/scgi;
  upstream agent { server $address; keepalive 128; }
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$nginx_port;
    location /agents/$agent/ { proxy_pass http://agent/; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_buffering off; }
  }
}
CONF
nginx -c "$out/nginx/nginx.conf" -p "$out/nginx"
trap 'kill $gw 2>/dev/null; kill "$(cat "$out/nginx/nginx.pid")" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$gw_port/agents/$agent/health" >/dev/null && break; sleep 0.1
done

# measure NAME URL PIDS...: wrk with perf stat over the same window.
measure() {
  local name=$1 url=$2; shift 2
  local pids; pids=$(IFS=,; echo "$*")
  wrk -t2 -c"$connections" -d2s "$url" >/dev/null   # warm-up
  perf stat -e task-clock,context-switches,raw_syscalls:sys_enter -p "$pids" -o "$out/$name.stat" \
    -- sleep "$duration" &
  local stat=$!
  wrk -t2 -c"$connections" -d"${duration}s" --latency "$url" > "$out/$name.wrk"
  wait $stat
  local rps cpu cs sys rss=0
  rps=$(awk '/Requests\/sec/ {print $2}' "$out/$name.wrk")
  cpu=$(awk '/task-clock/ {gsub(",","",$1); print $1}' "$out/$name.stat")
  cs=$(awk '/context-switches/ {gsub(",","",$1); print $1}' "$out/$name.stat")
  sys=$(awk '/sys_enter/ {gsub(",","",$1); print $1}' "$out/$name.stat")
  for p in "$@"; do rss=$((rss + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done
  python3 - "$name" "$rps" "$cpu" "$cs" "$sys" "$rss" "$duration" "$out/$name.wrk" <<'PY'
import sys, re
name, rps, cpu_ms, cs, sysc, rss, dur, wrk = sys.argv[1:]
rps = float(rps); n = rps * float(dur)
p99 = re.search(r"99%\s+(\S+)", open(wrk).read()).group(1)
print(f"{name:8} {rps:9.0f} rps  p99 {p99:>8}  CPU {float(cpu_ms)*1000/n:5.1f} us/req  "
      f"ctx {int(cs)/n:4.2f}/req  syscalls {int(sysc)/n:4.2f}/req  RSS {int(rss)/1024:5.1f} MB")
PY
}
nginx_pids=$(pgrep -f "nginx: worker process" | tr '\n' ' ')
echo "$connections connections, ${duration}s each:"
measure nginx "http://127.0.0.1:$nginx_port/agents/$agent/echo" $nginx_pids
measure gateway "http://127.0.0.1:$gw_port/agents/$agent/echo" $gw
perf record -F 499 -g --call-graph dwarf,16384 -p $gw -o "$out/gateway.perf" -- sleep 5 2>/dev/null &
rec=$!
wrk -t2 -c"$connections" -d5s "http://127.0.0.1:$gw_port/agents/$agent/echo" >/dev/null
wait $rec || true
perf report -i "$out/gateway.perf" --no-children --sort dso,sym 2>/dev/null | grep -v '^#' | grep . | head -30 > "$out/gateway.top"
if command -v inferno-collapse-perf >/dev/null; then
  perf script -i "$out/gateway.perf" 2>/dev/null | inferno-collapse-perf > "$out/gateway.folded"
  inferno-flamegraph < "$out/gateway.folded" > "$out/gateway.svg"
fi
echo "profile: $out/gateway.top${out:+, $out/gateway.svg with inferno}"
