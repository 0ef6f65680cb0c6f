#!/usr/bin/env bash
# Build a stand-in for the official `debian:bookworm-slim` image when no registry can be reached:
# a `debootstrap --variant=minbase bookworm` root filesystem, stripped of apt caches and documentation,
# imported into podman under the official name. The Dockerfile needs nothing else from its base.
#
#   docker/make-base-image.sh            # no-op when the image already exists
#   FORCE=1 docker/make-base-image.sh    # rebuild it
#
# Environment: MIRROR (default http://deb.debian.org/debian), IMAGE (default
# docker.io/library/debian:bookworm-slim), CONTAINERS_CONF (default docker/containers.conf).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
IMAGE="${IMAGE:-docker.io/library/debian:bookworm-slim}"

if [[ -z "${FORCE:-}" ]] && podman image exists "$IMAGE"; then
    echo "base image $IMAGE already present (FORCE=1 to rebuild)"
    exit 0
fi
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install debootstrap podman)" >&2; exit 1; }
done

work="$(mktemp -d /var/tmp/bookworm-rootfs.XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "debootstrap --variant=minbase bookworm from $MIRROR (about a minute) ..."
debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2
    echo "error: debootstrap failed (full log above)" >&2
    exit 1
}
# What the official slim image also leaves out: downloaded packages, package lists, docs, man pages.
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
    "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/info/*
tar -C "$work/rootfs" -c . | podman import \
    --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$IMAGE" >/dev/null
echo "imported $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
