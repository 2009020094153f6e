#!/usr/bin/env bash
# Builds Berth's images with no registry: each is FROM scratch with one binary (stripped) and
# the shared libraries `ldd` lists for it, copied under the same paths. Where a registry
# exists the same images can be pushed; the names are variables.
#
#   BERTH_IMAGE  (default berth/berth:local)       the one `berth` binary (every server)
#   ETCD_IMAGE   (default berth/etcd:local)        etcd, from Debian's etcd-server binary
#   ECHO_IMAGE   (default berth/echo-agent:local)  the example agent
#   BUSYBOX_IMAGE (default berth/busybox:local)    busybox from Debian's busybox-static, for
#                                                  tests that need a shell in a container
#                                                  (not part of `all`)
#   BERTH_IMAGE_PROFILE (default release)          the cargo profile `berth` is built with
#
# Usage: deploy/build-images.sh [all|berth|etcd|echo-agent|busybox]...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
BERTH_IMAGE=${BERTH_IMAGE:-berth/berth:local}
ETCD_IMAGE=${ETCD_IMAGE:-berth/etcd:local}
ECHO_IMAGE=${ECHO_IMAGE:-berth/echo-agent:local}
BUSYBOX_IMAGE=${BUSYBOX_IMAGE:-berth/busybox:local}
profile=${BERTH_IMAGE_PROFILE:-release}
target=${CARGO_TARGET_DIR:-$root/target}

# scratch_image BINARY IMAGE PORT: an image holding BINARY as its entrypoint.
scratch_image() {
  local bin=$1 image=$2 port=$3 ctx
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' RETURN
  mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/tmp"
  strip -o "$ctx/rootfs/usr/local/bin/$(basename "$bin")" "$bin" 2>/dev/null \
    || cp "$bin" "$ctx/rootfs/usr/local/bin/"
  for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*'); do
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

cargo_flags=()
[ "$profile" = release ] && cargo_flags+=(--release)
[ "$profile" = release ] || [ "$profile" = debug ] || cargo_flags+=(--profile "$profile")
profile_dir=$profile
[ "$profile" = dev ] && profile_dir=debug

[ $# -gt 0 ] || set -- all
for what in "$@"; do
  case $what in
    all|berth)
      (cd "$root" && cargo build "${cargo_flags[@]}" --quiet -p berth-cli)
      scratch_image "$target/$profile_dir/berth" "$BERTH_IMAGE" 7070 ;;&
    all|etcd)
      command -v etcd >/dev/null || { echo "etcd is missing: apt-get install etcd-server" >&2; exit 1; }
      scratch_image "$(command -v etcd)" "$ETCD_IMAGE" 2379 ;;&
    all|echo-agent)
      (cd "$root" && cargo build --release --quiet -p echo-agent)
      scratch_image "$target/release/echo-agent" "$ECHO_IMAGE" 8080 ;;
    busybox)
      command -v busybox >/dev/null || { echo "busybox is missing: apt-get install busybox-static" >&2; exit 1; }
      scratch_image "$(command -v busybox)" "$BUSYBOX_IMAGE" 8080 ;;
    berth|etcd) ;;
    *) echo "unknown image $what: all, berth, etcd, echo-agent or busybox" >&2; exit 1 ;;
  esac
done
