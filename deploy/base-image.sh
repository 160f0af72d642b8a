#!/usr/bin/env bash
# The local base image every Dockerfile here starts FROM: Debian bookworm with python3,
# built with mmdebstrap from the Debian archive and imported into podman. Where a registry
# serves images, `--build-arg BASE=python:3.11-slim-bookworm` does the same job.
# Usage: deploy/base-image.sh [IMAGE_NAME]   (does nothing if the image exists)
set -euo pipefail
name="${1:-visionloop-base:bookworm}"
here="$(cd "$(dirname "$0")" && pwd)"
if "$here/podman.sh" image exists "$name"; then
    echo "$name exists"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The host's extra CA certificates (a TLS-inspecting proxy, a company CA) go into the
# base, so apt and pip inside every build trust what the host trusts.
mkdir -p "$work/ca"
cp /usr/local/share/ca-certificates/*.crt "$work/ca/" 2>/dev/null || true
started=$(date +%s)
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,curl,passwd \
    --customize-hook="copy-in $work/ca/. /usr/local/share/ca-certificates/" \
    --customize-hook='chroot "$1" update-ca-certificates' \
    bookworm "$work/rootfs.tar"
"$here/podman.sh" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$name"
echo "$name built in $(( $(date +%s) - started )) s"
