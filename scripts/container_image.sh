#!/usr/bin/env bash
# Build the lmservice image with podman on a machine that reaches no container registry and no PyTorch index,
# only Debian's archive and PyPI (the machines this project is built and tested on):
#   1. base image   mmdebstrap makes a minimal Debian bookworm root filesystem with python3 (3.11) and its
#                   venv module; `podman import` turns it into $BASE_IMAGE. Made once, reused while it exists.
#   2. torch        a PEP 503 wheelhouse of torch==$TORCH_VERSION and its dependencies, made with the host's
#                   pip (which takes the CPU torch wheel from local disk), mounted read-only into the build and
#                   named by the TORCH_INDEX_URL build arg. Made once, reused while it holds that torch.
#   3. image        `podman build` of the repository's Dockerfile with PYTHON_IMAGE=$BASE_IMAGE; pip in the
#                   build reaches PyPI for everything else. Layers are cached: a rebuild after a code change
#                   redoes only the project's layer.
# podman runs with runc and the cgroupfs cgroup manager (no systemd here) from a containers.conf written into
# the cache directory; `default_ulimits = []` because the default nofile/nproc limits cannot be set here.
# Export CONTAINERS_CONF=<that file> to use the same settings for `podman run` (the last lines say where).
#
#   bash scripts/container_image.sh      # progress on stderr; stdout ends with IMAGE=, CONTAINERS_CONF=, ...
#
# Environment: LMSERVICE_CONTAINER_CACHE (default ~/.cache/lmservice-container), BASE_IMAGE, IMAGE,
# TORCH_VERSION (default: pyproject's pin). Run as root (rootless podman would need subuids and
# fuse-overlayfs). Tools: podman, runc, mmdebstrap (Debian packages of those names); exit 3 if one is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${LMSERVICE_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmservice-container}"
BASE_IMAGE="${BASE_IMAGE:-localhost/lmservice-base:bookworm}"
IMAGE="${IMAGE:-localhost/lmservice:0.1.0-cpu}"
TORCH_VERSION="${TORCH_VERSION:-$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)}"
PYTHON="${PYTHON:-python3}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org}"
HOST_CA_BUNDLE="${HOST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
WHEELHOUSE="$CACHE/torch-index"

log() { echo "container_image: $*" >&2; }

for tool in podman runc; do
    command -v "$tool" >/dev/null || { log "$tool is not installed (Debian package $tool)"; exit 3; }
done
mkdir -p "$CACHE"

export CONTAINERS_CONF="$CACHE/containers.conf"
cat >"$CONTAINERS_CONF.tmp" <<'EOF'
# Written by scripts/container_image.sh: podman settings that work on a machine without systemd.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"

# 1. The base image.
if podman image exists "$BASE_IMAGE"; then
    log "base $BASE_IMAGE: present, reused"
else
    command -v mmdebstrap >/dev/null || { log "mmdebstrap is not installed (Debian package mmdebstrap)"; exit 3; }
    log "base $BASE_IMAGE: mmdebstrap bookworm (python3, python3-venv, ca-certificates)"
    rootfs="$CACHE/rootfs.tar"
    # Security updates included; manuals, translations and docs left out (copyright files stay), as the
    # python:*-slim images do.
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        bookworm "$rootfs" \
        "deb $DEBIAN_MIRROR/debian bookworm main" \
        "deb $DEBIAN_MIRROR/debian bookworm-updates main" \
        "deb $DEBIAN_MIRROR/debian-security bookworm-security main" >&2
    podman import --quiet --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        --message "mmdebstrap bookworm minbase + python3 python3-venv ca-certificates" \
        "$rootfs" "$BASE_IMAGE" >/dev/null
    rm -f "$rootfs"
fi

# 2. The torch wheelhouse: one directory per project, each with the wheels and an index.html (what pip
# reads from a file:// index).
if compgen -G "$WHEELHOUSE/torch/torch-$TORCH_VERSION[+-]*.whl" >/dev/null; then
    log "torch $TORCH_VERSION wheelhouse: present, reused"
else
    log "torch $TORCH_VERSION wheelhouse: pip download (CPython 3.11, manylinux x86_64)"
    rm -rf "$WHEELHOUSE.tmp"
    "$PYTHON" -m pip download --quiet --only-binary=:all: --python-version 3.11 --implementation cp \
        --abi cp311 --platform manylinux_2_28_x86_64 -d "$WHEELHOUSE.tmp" "torch==$TORCH_VERSION" >&2
    "$PYTHON" - "$WHEELHOUSE.tmp" <<'EOF'
import html, re, sys
from pathlib import Path

root = Path(sys.argv[1])
for wheel in sorted(root.glob("*.whl")):
    project = root / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    project.mkdir(exist_ok=True)
    wheel.rename(project / wheel.name)
for project in (p for p in root.iterdir() if p.is_dir()):
    links = "".join(f'<a href="{html.escape(w.name)}">{html.escape(w.name)}</a>\n' for w in sorted(project.glob("*.whl")))
    (project / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
EOF
    rm -rf "$WHEELHOUSE"
    mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
fi

# 3. The image. --format docker keeps HEALTHCHECK (the OCI format has no field for it); host networking,
# because this machine has no container network set up for builds to reach PyPI through. Registries may be
# reached through a TLS proxy whose CA only the host trusts: the host's CA bundle is mounted over the base's
# for the build's RUN steps (Debian's pip reads that file); a build volume is not part of any layer, so the
# image keeps Debian's own bundle. HOST_CA_BUNDLE= (empty) leaves it out.
build_mounts=(--volume "$WHEELHOUSE:/torch-index:ro")
[ -z "$HOST_CA_BUNDLE" ] || build_mounts+=(--volume "$HOST_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
log "image $IMAGE: podman build (PYTHON_IMAGE=$BASE_IMAGE, TORCH_INDEX_URL=file:///torch-index)"
start=$SECONDS
podman build --format docker --network host --pull=never --layers "${build_mounts[@]}" \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL=file:///torch-index \
    --tag "$IMAGE" . >&2
log "image $IMAGE: built in $((SECONDS - start)) s"

echo "IMAGE=$IMAGE"
echo "BASE_IMAGE=$BASE_IMAGE"
echo "CONTAINERS_CONF=$CONTAINERS_CONF"
echo "IMAGE_SIZE_BYTES=$(podman image inspect --format '{{.Size}}' "$IMAGE")"
