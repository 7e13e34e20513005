#!/usr/bin/env bash
# Build a local Debian bookworm base image with debootstrap + docker import.
# Needed because no image registry is reachable (docker pull does not work).
#
# Usage: tools/build-base-image.sh [TAG]   (default: backup-agent-base:bookworm)
# Must run as root; needs docker and debootstrap.
set -euo pipefail

TAG="${1:-backup-agent-base:bookworm}"
SUITE="bookworm"
PACKAGES="ca-certificates,tar,zstd,rsync,openssh-server,openssh-client,procps,tzdata,python3,python3-venv,passwd"

die() { echo "build-base-image: $*" >&2; exit 1; }

# Idempotent: nothing to do if the image already exists (with venv, which the agent images
# need; older builds of this script did not include it).
if docker image inspect "$TAG" >/dev/null 2>&1 \
        && docker run --rm "$TAG" python3 -c 'import ensurepip' >/dev/null 2>&1; then
    echo "Image $TAG already exists; nothing to do."
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap needs it)"
command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install -y debootstrap)"

# Find the Debian mirror from the host's apt configuration (never hard-coded).
find_mirror() {
    local f
    # deb822 files: first URIs: of a stanza whose Suites include $SUITE.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (uri != "" && index(" " suites " ", " " suite " ")) { print uri; found = 1; exit }
                uri = ""; suites = ""
            }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "uris:"   { uri = $2 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            END { if (!found) flush() }
        ' "$f" | head -n1 | grep . && return 0
    done
    # One-line format: first "deb [opts] URL bookworm ..." line.
    if [ -f /etc/apt/sources.list ]; then
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }
        ' /etc/apt/sources.list | grep . && return 0
    fi
    return 1
}

MIRROR="$(find_mirror)" || die "no '$SUITE' mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
echo "Using mirror: $MIRROR"

WORKDIR="$(mktemp -d /tmp/base-image.XXXXXX)"
trap 'rm -rf "$WORKDIR"' EXIT
ROOTFS="$WORKDIR/rootfs"

# Bootstrap a minimal rootfs.
start=$SECONDS
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR"
echo "debootstrap took $((SECONDS - start))s"

# Drop apt caches and package lists to keep the image small.
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/log/apt/* "$ROOTFS"/var/log/dpkg.log "$ROOTFS"/var/log/bootstrap.log
# Host keys come from mounted secrets at run time; none may be baked into an image.
rm -f "$ROOTFS"/etc/ssh/ssh_host_*

# Import the rootfs as an image.
tar --numeric-owner -C "$ROOTFS" -c . |
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$TAG"

echo "Built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG") bytes)"
