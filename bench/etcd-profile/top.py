"""Prints where a Go CPU profile (pprof, gzipped protobuf) spent its time: the functions with
the most samples of their own (flat) and the most samples under them (cum). No Go toolchain
needed: `protoc --python_out=DIR profile.proto` makes profile_pb2 (pip: protobuf)."""
import collections
import gzip
import sys

import profile_pb2

p = profile_pb2.Profile()
p.ParseFromString(gzip.open(sys.argv[1]).read())
names = {f.id: p.string_table[f.name] for f in p.function}
frames_at = {l.id: [names[line.function_id] for line in l.line] for l in p.location}
flat, cum, total = collections.Counter(), collections.Counter(), 0
value = len(p.sample_type) - 1  # cpu nanoseconds
for s in p.sample:
    v = s.value[value]
    total += v
    frames = [f for lid in s.location_id for f in frames_at[lid]]
    if frames:
        flat[frames[0]] += v
    for f in set(frames):
        cum[f] += v
print(f"total {total / 1e9:.1f} s of CPU")
print("--- flat")
for k, v in flat.most_common(20):
    print(f"{v / total * 100:5.1f}% {k}")
print("--- cum")
for k, v in cum.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 40):
    print(f"{v / total * 100:5.1f}% {k}")
