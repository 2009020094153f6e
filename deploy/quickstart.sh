#!/usr/bin/env bash
# From a fresh clone to an agent running behind the gateway, in one command:
#   ./deploy/quickstart.sh
# Installs what is missing (Debian's etcd-server and protobuf-compiler), builds Berth and the
# example agent's image (no registry needed), starts `berth up` in the background, deploys the
# example agent with 2 replicas, calls it through the gateway, and prints a short tour.
# Needs Docker (running, usable by this user) and a Rust toolchain (https://rustup.rs).
# BERTH_DATA_DIR (default ~/.local/share/berth) holds etcd's data, tokens, logs and up.pid.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
data=${BERTH_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/berth}
gateway=https://127.0.0.1:8080
started=$(date +%s)

say() { printf '\n== %s\n' "$*"; }

command -v docker >/dev/null && docker info >/dev/null 2>&1 || {
  echo "Docker is not installed or not running (or this user may not use it)." >&2
  echo "Install Docker Engine (https://docs.docker.com/engine/install/), start it" >&2
  echo "(sudo systemctl start docker) and add yourself to the docker group." >&2
  exit 1
}
command -v cargo >/dev/null || {
  echo "cargo is missing: install Rust with https://rustup.rs, then run this again." >&2
  exit 1
}
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} (Debian packages)"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

say "building berth (cargo build --release; the first build takes a few minutes)"
cargo build --release --quiet -p berth-cli
berth="${CARGO_TARGET_DIR:-$root/target}/release/berth"
say "building the example agent's image (no registry)"
deploy/build-images.sh echo-agent

mkdir -p "$data"
if [ -f "$data/up.pid" ] && kill -0 "$(cat "$data/up.pid")" 2>/dev/null; then
  say "berth up is already running (pid $(cat "$data/up.pid"))"
else
  say "starting berth up (log: $data/up.log)"
  : > "$data/up.log"
  nohup "$berth" up --data-dir "$data" >"$data/up.log" 2>&1 &
  echo $! > "$data/up.pid"
  for _ in $(seq 1 240); do
    grep -q "Berth is up" "$data/up.log" && break
    kill -0 "$(cat "$data/up.pid")" 2>/dev/null || { cat "$data/up.log" >&2; exit 1; }
    sleep 0.5
  done
  grep -q "Berth is up" "$data/up.log" || { echo "berth up did not come up:" >&2; cat "$data/up.log" >&2; exit 1; }
fi
sed -n '/Berth is up/,/^Try/p' "$data/up.log" | sed '$d'

say "deploying the example agent (examples/echo-agent/berth.yaml: 2 replicas)"
"$berth" apply -f examples/echo-agent/berth.yaml --wait --timeout 2m
"$berth" get echo

say "calling it through the gateway (HTTPS, with the private CA berth up made)"
ca="$data/tls/ca.pem"
echo "\$ curl --cacert $ca -X POST $gateway/agents/echo/echo -d 'hello'"
curl -sS --cacert "$ca" -X POST "$gateway/agents/echo/echo" -d 'hello'
echo

say "ready in $(( $(date +%s) - started )) s. A short tour (berth is $berth):"
cat <<TOUR
  # Crash a replica: Berth restarts it at once, and the gateway sends traffic to the other.
  curl --cacert $ca -X POST $gateway/agents/echo/crash
  berth get echo                    # RESTARTS 1 on one replica
  berth events echo                 # ReplicaRestarted

  # Stop the agent: requests are kept (202 + Location) and replayed once it is back.
  berth stop echo
  curl --cacert $ca -i -X POST $gateway/agents/echo/echo -d 'kept for later'
  berth requests echo               # queued
  berth start echo
  curl --cacert $ca $gateway/requests/ID  # delivered, with the agent's response

  # The dashboard, live (sign in with the admin token in $data/tokens):
  https://127.0.0.1:7072/

  # Stop Berth (the agents' containers keep running, adopted by the next berth up):
  kill \$(cat $data/up.pid)
TOUR
