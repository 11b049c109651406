#!/usr/bin/env bash
# A local stand-in for the production base image, made from Debian packages: where container
# registries cannot be reached (CI, air-gapped hosts), `make test-container` builds
# docker/Dockerfile on this instead of pytorch/pytorch:...-cuda...
#
#   docker/local_base.sh TAG [WHEELS_DIR]        (root; needs debootstrap and a Docker engine)
#
# Like the production base it has a Python 3.11 environment on PATH (a venv at /opt/venv where
# pytorch/pytorch has /opt/conda) holding torch and torchvision, CUDA builds from PyPI (they
# run on CPUs too). Like it, its CUDA runtime wheels are not the lock's: nvidia-nvjitlink and
# cuda-pathfinder are older releases (BASE_PINS), so the container test sees whether the
# image's install keeps the base's torch stack or swaps in the lock's.
#
# WHEELS_DIR (default: /opt/pypi-more/files when present) is a folder of wheels that pip takes
# before downloading: the torch stack is ~4 GB. It is bind-mounted into the chroot, not copied.
set -euo pipefail

tag=${1:?usage: local_base.sh TAG [WHEELS_DIR]}
wheels=${2:-/opt/pypi-more/files}
repo=$(cd "$(dirname "$0")/.." && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

lock_pin() { grep -E "^$1==" "$repo/constraints.txt"; }
# the lock's torch and torchvision; the rest of the stack as older, locally held releases
TORCH_PINS="$(lock_pin torch) $(lock_pin torchvision)"
BASE_PINS="nvidia-nvjitlink==13.4.92 cuda-pathfinder==1.8.3"

root=$(mktemp -d "${TMPDIR:-/var/tmp}/scratchpath-base.XXXXXX")
cleanup() {
    mountpoint -q "$root/wheels" && umount "$root/wheels"
    mountpoint -q "$root/proc" && umount "$root/proc"
    rm -rf "$root"
}
trap cleanup EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$root.debootstrap.log" 2>&1 ||
    { tail -20 "$root.debootstrap.log"; exit 1; }
rm -f "$root.debootstrap.log"
cp /etc/resolv.conf "$root/etc/resolv.conf"   # pip in the chroot resolves PyPI as the host does
# The host's own certificate authorities (e.g. an egress proxy's), trusted by the base's system
# bundle and by pip (/etc/pip.conf), so that pip reaches PyPI from it as from the host.
find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$root/usr/local/share/ca-certificates/" \;
chroot "$root" update-ca-certificates >/dev/null
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
mkdir -p "$root/wheels"
mount -t proc proc "$root/proc"
links=()
if [ -d "$wheels" ]; then
    mount --bind -o ro "$wheels" "$root/wheels"
    links=(--find-links /wheels)
fi
chroot "$root" python3 -m venv /opt/venv
chroot "$root" env -i PATH=/usr/bin:/bin HOME=/root PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 /opt/venv/bin/python -m pip install --quiet "${links[@]}" $TORCH_PINS $BASE_PINS
chroot "$root" /opt/venv/bin/python -c "import torch, torchvision"
umount "$root/wheels" "$root/proc"
rmdir "$root/wheels"
: >"$root/etc/resolv.conf"   # Docker provides its own at run time
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

tar -C "$root" --numeric-owner --exclude='./dev/*' -c . |
    docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python"]' \
        --message "scratchpath local base: Debian bookworm, $TORCH_PINS $BASE_PINS" \
        - "$tag" >/dev/null
echo "$tag: $(docker image inspect -f '{{.Size}}' "$tag") bytes"
