#!/usr/bin/env bash
# Makes the compose cluster's secrets once, one directory per service holding only what that
# service needs (each file readable by the owner only):
#
#   operator/        stays with you: the CA and its key, the admin token (`tokens`), the
#                    gateway's admin token (`gateway-tokens`), the /metrics token (`metrics`)
#   etcd/            ca.pem, etcd's server-and-peer certificate and key
#   control-plane/   ca.pem, its server certificate, its etcd client certificate, the admin and
#                    /metrics tokens, every node's join token (`join`, one per line)
#   gateway/         ca.pem, its own server certificate, its own etcd client certificate, its
#                    admin token (not the control plane's) and the /metrics token
#   node-N/          ca.pem, node N's certificate and key (naming node N only), its join token
#
# No service gets the CA key, another service's key, or a token it does not use; no node gets
# etcd credentials or another node's key. BERTH_SECRETS_DIR puts them elsewhere; what exists
# is kept, and missing pieces are made from the existing CA.
set -euo pipefail
dir=${BERTH_SECRETS_DIR:-$(cd "$(dirname "$0")" && pwd)/secrets}
cluster=${BERTH_CLUSTER:-berth}
umask 077
mkdir -p "$dir"/{operator,etcd,control-plane,gateway,node-1,node-2,node-3}
token() { [ -s "$1" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$1"; }
token "$dir/operator/tokens"
token "$dir/operator/gateway-tokens"
token "$dir/operator/metrics"
for n in 1 2 3; do token "$dir/node-$n/join"; done

# The CA and every certificate, in operator/ (the berth image's `berth certs`, or a local
# berth binary when BERTH_BIN is set). etcd's certificate is the CA's first server
# certificate (server and client use, for its peers); the control planes and the gateway get
# server-only certificates, and client-only ones for etcd, so that none can pass for a node.
args=(--dir /out/operator/ca --keep --host etcd1 --host etcd2 --host etcd3)
args+=(--service control-plane=control-plane-1,control-plane-2,localhost,127.0.0.1)
args+=(--service gateway=gateway,localhost,127.0.0.1)
args+=(--client control-plane --client gateway)
for n in 1 2 3; do args+=(--node "$cluster-node-$n"); done
if [ -n "${BERTH_BIN:-}" ]; then
  "$BERTH_BIN" certs "${args[@]/\/out/$dir}" >/dev/null
else
  docker run --rm -v "$dir:/out" "${BERTH_IMAGE:-berth/berth:local}" certs "${args[@]}" >/dev/null
fi
ca=$dir/operator/ca
give() { install -m 600 "$1" "$2"; }   # a copy the service's directory owns

for service in etcd control-plane gateway; do give "$ca/ca.pem" "$dir/$service/ca.pem"; done
give "$ca/server.pem" "$dir/etcd/etcd.pem"
give "$ca/server-key.pem" "$dir/etcd/etcd-key.pem"
for service in control-plane gateway; do
  give "$ca/services/$service.pem" "$dir/$service/server.pem"
  give "$ca/services/$service-key.pem" "$dir/$service/server-key.pem"
  give "$ca/clients/$service.pem" "$dir/$service/etcd-client.pem"
  give "$ca/clients/$service-key.pem" "$dir/$service/etcd-client-key.pem"
  give "$dir/operator/metrics" "$dir/$service/metrics"
done
give "$dir/operator/tokens" "$dir/control-plane/tokens"
give "$dir/operator/gateway-tokens" "$dir/gateway/tokens"
for n in 1 2 3; do cat "$dir/node-$n/join"; echo; done > "$dir/control-plane/join"
for n in 1 2 3; do
  give "$ca/ca.pem" "$dir/node-$n/ca.pem"
  give "$ca/nodes/$cluster-node-$n.pem" "$dir/node-$n/node.pem"
  give "$ca/nodes/$cluster-node-$n-key.pem" "$dir/node-$n/node-key.pem"
done
cp "$ca/ca.pem" "$dir/operator/ca.pem"
# The servers in the containers run as root; the files stay private to the host's owner.
echo "in $dir: one directory per service; yours is operator/ (CLI: BERTH_TLS_CA=$dir/operator/ca.pem BERTH_TOKEN=\$(cat $dir/operator/tokens))"
