#!/usr/bin/env bash
# Where the machine's CPU goes in each phase of the soak's enqueue: samples, every 0.5 s, the CPU
# time of etcd, of the gateways and of the benchmark itself (its clients) from /proc, and the
# machine's idle time, while `replay --soak --enqueue-only` runs; then prints each phase's share
# per process and the CPU each spends per request.
#
#   BERTH_BIN=target/release/berth bench/cpu-share/run.sh target/release/replay
#
# Run from tests/ as the soak is. BERTH_SOAK_REQUESTS (default 60000 here) and the soak's other
# settings pass through. Percentages are of one core; the phases are found from the soak's output
# (raw puts, the store alone, then the enqueue through the gateways).
set -euo pipefail
replay="$1"
out="$(mktemp -d)"
trap 'kill $sampler 2>/dev/null || true; rm -rf "$out"' EXIT
export BERTH_SOAK_REQUESTS="${BERTH_SOAK_REQUESTS:-60000}"
hz=$(getconf CLK_TCK)
(
  set +eo pipefail # a process may end between being listed and being read
  while true; do
    line="$(date +%s.%N) $(awk '/^cpu /{print $5}' /proc/stat)"
    for p in $(pgrep -f "^etcd --name|berth gateway|$replay" || true); do
      what=$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null |
        awk '{print ($1 == "etcd") ? "etcd" : ($2 == "gateway") ? "gateways" : "clients"}')
      ticks=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || true)
      [ -n "$ticks" ] && line="$line $what:$p:$ticks"
    done
    echo "$line"
    sleep 0.5
  done
) > "$out/samples" &
sampler=$!
"$replay" --soak --enqueue-only | while IFS= read -r line; do
  echo "$(date +%s.%N) $line"
done | tee "$out/log" | cut -d' ' -f2-
kill $sampler 2>/dev/null || true
python3 - "$out/samples" "$out/log" "$hz" <<'EOF'
import re, sys
samples, log, hz = sys.argv[1], sys.argv[2], int(sys.argv[3])
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
EOF
