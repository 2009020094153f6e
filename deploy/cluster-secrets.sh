#!/usr/bin/env bash
# Makes the compose cluster's secrets once: deploy/secrets/tokens (an admin token, for the CLI
# and the gateway's admin reads), deploy/secrets/join (the node agents' join token), each
# readable by the owner only, and deploy/secrets/tls/ (a private CA, the services' server
# certificate, and a client certificate per node agent that names its node,
# tls/nodes/$BERTH_CLUSTER-node-N.pem). BERTH_SECRETS_DIR puts them elsewhere; a CA already
# there is kept, and node certificates missing for this BERTH_CLUSTER are made from it.
set -euo pipefail
dir=${BERTH_SECRETS_DIR:-$(cd "$(dirname "$0")" && pwd)/secrets}
mkdir -p "$dir"
umask 077
for file in tokens join; do
  [ -s "$dir/$file" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/$file"
done
# A private CA and certificates for the services' names and the node agents' names (the berth
# image's `berth certs`, or a local berth binary when BERTH_BIN is set).
cluster=${BERTH_CLUSTER:-berth}
names=(--keep --host control-plane-1 --host control-plane-2 --host gateway)
names+=(--host etcd1 --host etcd2 --host etcd3)
for n in 1 2 3; do names+=(--node "$cluster-node-$n"); done
if [ -n "${BERTH_BIN:-}" ]; then
  "$BERTH_BIN" certs --dir "$dir/tls" "${names[@]}" >/dev/null
else
  docker run --rm -v "$dir:/out" "${BERTH_IMAGE:-berth/berth:local}" certs --dir /out/tls "${names[@]}" >/dev/null
fi
# The servers in the containers run as root; the files stay private to the host's owner.
echo "in $dir: admin token tokens, join token join, CA and certificates tls/ (CLI: BERTH_TLS_CA=$dir/tls/ca.pem)"
