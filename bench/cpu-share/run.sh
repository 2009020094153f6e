#!/usr/bin/env bash
# Where the machine's CPU goes in each phase of the soak's enqueue: samples, every 0.5 s, the CPU
# time of etcd, of the gateways, of the agents and of the benchmark itself (its clients) from
# /proc, and the machine's idle time, while `replay --soak --enqueue-only` runs; then prints each
# phase's share per process and the CPU each spends per request.
#
#   BERTH_BIN=target/release/berth bench/cpu-share/run.sh target/release/replay
#
# With `--drain` after the replay binary, the soak goes on to the drain (without the gateways'
# restarts, `--no-restarts`) and the drain is reported too: its CPU per delivered request. With
# PERF_OUT=DIR as well, both gateways are profiled with call graphs for PERF_SECONDS (default 8)
# from the drain's first progress line (`perf record`, linux-perf), and the report of their
# hottest symbols, with and without callees, is written to DIR/gateways.txt.
#
# Run from tests/ as the soak is. BERTH_SOAK_REQUESTS (default 60000 here) and the soak's other
# settings pass through. Percentages are of one core; the phases are found from the soak's output
# (raw puts, the store alone, then the enqueue through the gateways).
set -euo pipefail
replay="$1"
drain="${2:-}"
mode=(--enqueue-only)
[ "$drain" = --drain ] && mode=(--no-restarts)
out="$(mktemp -d)"
trap 'kill $sampler 2>/dev/null || true; rm -rf "$out"' EXIT
export BERTH_SOAK_REQUESTS="${BERTH_SOAK_REQUESTS:-60000}"
hz=$(getconf CLK_TCK)
(
  set +eo pipefail # a process may end between being listed and being read
  while true; do
    line="$(date +%s.%N) $(awk '/^cpu /{print $5}' /proc/stat)"
    for p in $(pgrep -f "^etcd --name|berth gateway|$replay|echo-agent" || true); do
      what=$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null |
        awk '{print ($1 == "etcd") ? "etcd" : ($2 == "gateway") ? "gateways" : ($1 ~ /echo-agent/) ? "agents" : "clients"}')
      ticks=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || true)
      [ -n "$ticks" ] && line="$line $what:$p:$ticks"
    done
    echo "$line"
    sleep 0.5
  done
) > "$out/samples" &
sampler=$!
profiler=
if [ "$drain" = --drain ] && [ -n "${PERF_OUT:-}" ]; then
  mkdir -p "$PERF_OUT"
  (
    until grep -qE "delivered [0-9]+ of" "$out/log" 2>/dev/null; do sleep 0.2; done
    pids=$(pgrep -f "berth gateway" | paste -sd,)
    perf record -F 499 --call-graph dwarf,16384 -p "$pids" -o "$PERF_OUT/perf.data" \
      -- sleep "${PERF_SECONDS:-8}" > "$PERF_OUT/record.log" 2>&1
    { perf report -i "$PERF_OUT/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null | head -60
      perf report -i "$PERF_OUT/perf.data" --children --sort symbol --stdio -g none 2>/dev/null | head -80
    } > "$PERF_OUT/gateways.txt"
  ) &
  profiler=$!
fi
"$replay" --soak "${mode[@]}" | while IFS= read -r line; do
  echo "$(date +%s.%N) $line"
done | tee "$out/log" | cut -d' ' -f2-
kill $sampler 2>/dev/null || true
[ -n "$profiler" ] && wait "$profiler"
python3 - "$out/samples" "$out/log" "$hz" "$drain" <<'EOF'
import re, sys
samples, log, hz, drain = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "--drain"
rows = []
for l in open(samples):
    p = l.split()
    procs = {}
    for x in p[2:]:
        what, pid, ticks = x.split(":")
        procs[(what, pid)] = int(ticks)
    rows.append((float(p[0]), int(p[1]), procs))
lines = [(float(l.split()[0]), l.split(" ", 1)[1]) for l in open(log)]
def at(pattern):
    return next(t for t, l in lines if re.search(pattern, l))
raw = re.search(r"raw put (\d+)/s; through the store alone (\d+)/s", next(l for _, l in lines if "through the store alone" in l))
enq = re.search(r"enqueued (\d+) at (\d+)/s", next(l for _, l in lines if l.startswith("enqueued")))
start, ended = at("enqueueing"), at("a request's time")
rate = float(enq.group(2))
def share(t0, t1):
    inside = [r for r in rows if t0 <= r[0] <= t1]
    a, b = inside[0], inside[-1]
    dt = b[0] - a[0]
    use = {}
    for key, ticks in b[2].items():
        if key in a[2]:
            use[key[0]] = use.get(key[0], 0) + (ticks - a[2][key]) / hz / dt * 100
    return use, (b[1] - a[1]) / hz / dt * 100, dt
def report(name, rate, t0, t1):
    use, idle, dt = share(t0, t1)
    print(f"\n{name} at {rate:.0f}/s, over {dt:.1f} s: idle {idle:.0f} % of a core")
    for what in sorted(use):
        print(f"  {what:9} {use[what]:4.0f} % of a core, {use[what] / 100 / rate * 1e6:4.0f} µs per request")
    print(f"  in all    {sum(use.values()) / 100 / rate * 1e6:4.0f} µs per request")
# The measured raw puts and the store alone (the clients are the benchmark itself; the gateways
# idle), and the enqueue less its first and last second (clients starting and finishing).
report("raw puts", float(raw.group(1)), at("^raw puts:"), at("^the store alone:"))
report("the store alone", float(raw.group(2)), at("^the store alone:"), at("through the store alone"))
report("enqueue through the gateways", rate, start + 1, ended - 1)
if drain:
    # Between the drain's first and last progress lines (agents started, queue not yet short).
    progress = [(t, l) for t, l in lines if re.search(r"delivered \d+ of \d+;", l)]
    (t0, l0), (t1, l1) = progress[0], progress[-1]
    n = lambda l: int(re.search(r"delivered (\d+) of", l).group(1))
    report("drain", (n(l1) - n(l0)) / (t1 - t0), t0, t1)
EOF
