#!/usr/bin/env bash
# Ten agents started at once on one node: how long from `berth start` until the first and the
# last is ready. Starts its own `berth up` (plain text, a temporary data directory, ports
# 27xxx, a network of its own) and removes everything when done. Needs Docker, etcd on PATH
# and the example agent's image (deploy/build-images.sh).
#
#   cargo build --release -p berth-cli && bench/starts/run.sh [N agents, default 10] [rounds, default 3]
#
# BERTH_BIN picks the binary (default target/release/berth).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
berth="${BERTH_BIN:-$root/target/release/berth}"
n=${1:-10}
rounds=${2:-3}
dir=$(mktemp -d)
export BERTH_CLI_CONFIG="$dir/config.yaml"
network="berth-starts-$$"
"$berth" up --insecure --data-dir "$dir/data" --etcd-listen 127.0.0.1:27790 \
  --listen 127.0.0.1:27070 --admin-listen 127.0.0.1:27071 --gateway-listen 127.0.0.1:27080 \
  --gateway-admin-listen 127.0.0.1:27081 --dashboard-listen 127.0.0.1:27072 \
  --node-name starts --network "$network" > "$dir/up.log" 2>&1 &
up=$!
cleanup() {
  for i in $(seq "$n"); do "$berth" delete "starts-$i" > /dev/null 2>&1 || true; done
  kill "$up" 2>/dev/null || true
  wait "$up" 2>/dev/null || true
  docker ps -aq --filter "label=berth.node=starts" | xargs -r docker rm -f > /dev/null
  docker network rm "$network" > /dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 600); do
  grep -q "Berth is up" "$dir/up.log" && break
  kill -0 "$up" 2>/dev/null || { cat "$dir/up.log"; exit 1; }
  sleep 0.1
done
# Counts the agents whose replicas are all in state $1 (READY: ready), from `berth ls`.
count() {
  "$berth" ls -o json | python3 -c '
import json, sys
want = sys.argv[1]
n = 0
for a in json.load(sys.stdin).get("agents", []):
    replicas = a.get("status", {}).get("replicas", [])
    if replicas and all(r.get("ready") if want == "READY" else r.get("state") == want for r in replicas):
        n += 1
print(n)' "$1"
}
# Waits until $2 agents are ready; prints the seconds from $1 (date +%s.%N) to the first and
# to the last.
wait_ready() {
  local since=$1 want=$2 first="" count now
  while :; do
    count=$(count READY)
    now=$(date +%s.%N)
    if [ -z "$first" ] && [ "$count" -ge 1 ]; then first=$now; fi
    if [ "$count" -ge "$want" ]; then
      python3 -c 'import sys; s, f, l = map(float, sys.argv[1:]); print(f"first ready {f - s:.2f}s, all ready {l - s:.2f}s")' \
        "$since" "$first" "$now"
      return
    fi
    sleep 0.05
  done
}
for i in $(seq "$n"); do
  "$berth" deploy -n "starts-$i" -i berth/echo-agent:local --health-endpoint /health \
    --health-interval 1s > /dev/null
done
echo "deployed $n agents: $(wait_ready "$(date +%s.%N)" "$n")"
for round in $(seq "$rounds"); do
  for i in $(seq "$n"); do "$berth" stop "starts-$i" > /dev/null; done
  while [ "$(count REPLICA_STATE_STOPPED)" -lt "$n" ]; do sleep 0.1; done
  since=$(date +%s.%N)
  for i in $(seq "$n"); do "$berth" start "starts-$i" > /dev/null; done
  echo "round $round: $n started: $(wait_ready "$since" "$n")"
done
