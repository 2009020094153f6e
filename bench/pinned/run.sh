#!/usr/bin/env bash
# Runs a benchmark with etcd on a core of its own, as when etcd runs on its own host: the
# benchmark and everything it starts (gateways, control plane, node agent, its clients) are
# confined to the cores in OTHERS (default 1), and the etcd it starts is moved to the cores in
# ETCD_CORES (default 0) as soon as it appears, before any measurement begins. Needs taskset
# (util-linux) and at least two cores.
#
#   cd tests && BERTH_BIN=../target/release/berth ../bench/pinned/run.sh ../target/release/replay
#   cd tests && BERTH_SOAK_REQUESTS=60000 BERTH_BIN=../target/release/berth \
#     ../bench/pinned/run.sh ../target/release/replay --soak --enqueue-only
#
# The benchmark's arguments follow its path; its output is printed as it runs.
set -euo pipefail
etcd_cores=${ETCD_CORES:-0}
others=${OTHERS:-1}
taskset -c "$others" "$@" &
bench=$!
trap 'kill $bench 2>/dev/null || true' INT TERM
# The benchmark starts its etcd first; move every thread of it once it is there.
for _ in $(seq 600); do
  etcd=$(pgrep -P "$bench" -f "^etcd --name" || true)
  if [ -n "$etcd" ]; then
    taskset -a -cp "$etcd_cores" "$etcd" > /dev/null
    echo "== etcd ($etcd) on cores $etcd_cores, the rest on cores $others" >&2
    break
  fi
  kill -0 "$bench" 2>/dev/null || break
  sleep 0.05
done
wait "$bench"
