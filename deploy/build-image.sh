#!/usr/bin/env bash
# Build the visionloop image with podman: the local base (deploy/base-image.sh), the
# project's wheel, and the pinned torch from wherever this host's pip finds it.
# Usage: deploy/build-image.sh IMAGE_NAME [ORT]     ORT: cpu (default) or gpu
# Prints the build time and the image size.
set -euo pipefail
image="${1:-visionloop:latest}"
ort="${2:-cpu}"
root="$(cd "$(dirname "$0")/.." && pwd)"
podman="$root/deploy/podman.sh"
python="${PYTHON:-$root/.venv/bin/python}"
started=$(date +%s)
"$root/deploy/base-image.sh" visionloop-base:bookworm

# The wheel: the image installs exactly what `pip install visionloop` would.
rm -rf "$root/build/dist"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$root/build/dist" "$root"

# The host's pip indexes and wheel folders (pip config), mounted read-only into the build
# at the same paths and handed to the torch step: the build gets the host's torch files.
torch_args=() mounts=()
for key in global.extra-index-url global.index-url global.find-links; do
    for location in $("$python" -m pip config get "$key" 2>/dev/null || true); do
        path="${location#file://}"
        case "$key" in *index-url) flag="--extra-index-url" ;; *) flag="--find-links" ;; esac
        torch_args+=("$flag" "$location")
        if [ -e "$path" ]; then
            # a file:// index's files live beside its simple/ folder
            mount_dir="$(cd "$path" && cd "$([ "$(basename "$path")" = simple ] && echo .. || echo .)" && pwd)"
            mounts+=("--volume" "$mount_dir:$mount_dir:ro")
        fi
    done
done
"$podman" build --pull=never --tag "$image" --file "$root/Dockerfile" \
    --build-arg ORT="$ort" --build-arg TORCH_PIP_ARGS="${torch_args[*]}" \
    "${mounts[@]}" "$root"
built=$(( $(date +%s) - started ))
size=$("$podman" image inspect "$image" --format '{{.Size}}')
echo "image $image: built in ${built} s, $(( size / 1000000 )) MB"
