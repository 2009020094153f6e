#!/usr/bin/env bash
# Profiles the etcd that a benchmark starts: runs COMMAND with `etcd` on PATH wrapped to add
# --enable-pprof, takes a 10 s CPU profile of it over and over while COMMAND runs (numbered,
# timed in OUT/index), and prints the top of each. The benchmarks start etcd from PATH.
#
#   bench/etcd-profile/run.sh OUT target/release/replay --soak
#   python3 bench/etcd-profile/top.py OUT/p7.pb.gz      # one window again
#
# Needs python3 with protobuf (pip install protobuf) and protoc; no Go toolchain.
set -euo pipefail
out="$1"; shift
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out/bin"
real="$(command -v etcd)"
printf '#!/bin/sh\nexec %s --enable-pprof "$@"\n' "$real" > "$out/bin/etcd"
chmod +x "$out/bin/etcd"
protoc --proto_path="$here" --python_out="$out" "$here/profile.proto"
: > "$out/index"
(
  i=0
  while true; do
    url=$(ps -eo args | grep -o -- '--listen-client-urls[= ][^ ,]*' | head -1 | sed 's/--listen-client-urls[= ]//' || true)
    if [ -n "$url" ]; then
      i=$((i + 1))
      echo "p$i $(date +%T)" >> "$out/index"
      curl -s -o "$out/p$i.pb.gz" "$url/debug/pprof/profile?seconds=10" || sleep 1
    else
      sleep 1
    fi
  done
) &
profiler=$!
trap 'kill $profiler 2>/dev/null || true' EXIT
PATH="$out/bin:$PATH" "$@" | while IFS= read -r line; do echo "$(date +%T) $line"; done
kill $profiler 2>/dev/null || true
while read -r name at; do
  [ -s "$out/$name.pb.gz" ] || continue
  echo "== $name from $at"
  PYTHONPATH="$out" python3 "$here/top.py" "$out/$name.pb.gz" | sed -n '/--- cum/,$p' | head -16
done < "$out/index"
