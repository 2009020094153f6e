#!/usr/bin/env bash
# Builds Berth's images with no registry: each is FROM scratch with one binary and the shared
# libraries `ldd` lists for it, copied under the same paths. Where a registry exists the same
# images can be pushed; the names are variables.
#
#   ECHO_IMAGE   (default berth/echo-agent:local)   the example agent
#
# Usage: deploy/build-images.sh [echo-agent]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ECHO_IMAGE=${ECHO_IMAGE:-berth/echo-agent:local}
target=${CARGO_TARGET_DIR:-$root/target}

# scratch_image BINARY IMAGE PORT: an image holding BINARY as its entrypoint.
scratch_image() {
  local bin=$1 image=$2 port=$3 ctx
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' RETURN
  mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/tmp"
  cp "$bin" "$ctx/rootfs/usr/local/bin/"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
  cat > "$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
EXPOSE $port
ENTRYPOINT ["/usr/local/bin/$(basename "$bin")"]
DOCKERFILE
  docker build --quiet --tag "$image" "$ctx" >/dev/null
  echo "built $image"
}

what=${1:-all}
if [ "$what" = all ] || [ "$what" = echo-agent ]; then
  (cd "$root" && cargo build --release --quiet -p echo-agent)
  scratch_image "$target/release/echo-agent" "$ECHO_IMAGE" 8080
fi
