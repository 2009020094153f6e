#!/usr/bin/env bash
# Debian 13's etcd 3.5 (etcd-server and etcd-client 3.5.16-4) unpacked beside the system's, for
# running the tests and benchmarks against it on Debian 12, whose own package is etcd 3.4:
#   PATH="$(bench/etcd-3.5/fetch.sh):$PATH" target/release/replay --soak
# Everything Berth starts (the tests' etcd, `berth up`) runs the first `etcd` on PATH. The
# packages are static Go binaries (they need only libc 2.34 or later); nothing is installed.
# Prints the directory holding etcd, etcdctl and etcdutl.
set -euo pipefail
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
dest="${BERTH_ETCD35_DIR:-$HOME/.cache/berth-etcd-3.5}"
if [ ! -x "$dest/usr/bin/etcd" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  while read -r name sha; do
    curl -fsS -o "$tmp/$name" "$mirror/pool/main/e/etcd/$name"
    echo "$sha  $tmp/$name" | sha256sum -c --quiet - >&2
    dpkg-deb -x "$tmp/$name" "$tmp/root"
  done <<'DEBS'
etcd-server_3.5.16-4_amd64.deb 0875921bb0d023f2af9b8e15cdfbe417a03e65731345fb832c40f9c2dd72967b
etcd-client_3.5.16-4_amd64.deb 7eb67e305ba2ce523a5a0b29bf88750ded3f724769c7111a83382b7909f9977b
DEBS
  mkdir -p "$dest"
  rm -rf "$dest/usr"
  mv "$tmp/root/usr" "$dest/usr"
fi
echo "$dest/usr/bin"
