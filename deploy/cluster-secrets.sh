#!/usr/bin/env bash
# Makes the compose cluster's tokens once: deploy/secrets/tokens (an admin token, for the CLI
# and the gateway's admin reads) and deploy/secrets/join (the node agents' join token), each
# readable by the owner only. BERTH_SECRETS_DIR puts them elsewhere.
set -euo pipefail
dir=${BERTH_SECRETS_DIR:-$(cd "$(dirname "$0")" && pwd)/secrets}
mkdir -p "$dir"
umask 077
for file in tokens join; do
  [ -s "$dir/$file" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/$file"
done
# The servers in the containers run as root; the files stay private to the host's owner.
echo "tokens in $dir: admin token $dir/tokens, join token $dir/join"
