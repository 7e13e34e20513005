#!/usr/bin/env bash
# Build the two agent images from this checkout, offline: the wheels of the agent and of its
# dependencies are made on the host (for the base image's Python), and the Dockerfiles install
# only from them.
#
# Usage: tools/build-images.sh [BASE_IMAGE] [TAG]
#   BASE_IMAGE  default: the local Debian image of tools/build-base-image.sh (built if missing)
#   TAG         default: dev  →  backup-agent-source:dev, backup-agent-sink:dev
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE="${1:-backup-agent-base:bookworm}"
TAG="${2:-dev}"
if [ "$BASE_IMAGE" = "backup-agent-base:bookworm" ]; then
    bash tools/build-base-image.sh "$BASE_IMAGE"
fi

python_tag="$(docker run --rm --entrypoint python3 "$BASE_IMAGE" \
    -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
machine="$(uname -m)"
# The agent's wheel in build/wheels/agent, its dependencies' in build/wheels/deps: the images
# install them in two steps, so a new agent leaves the dependency layers as they were.
rm -rf build/wheels
mkdir -p build/wheels/agent build/wheels/deps
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir build/wheels/agent .
python3 -m pip download --quiet --disable-pip-version-check --dest build/wheels/deps \
    --only-binary=:all: --python-version "$python_tag" --implementation cp \
    --platform "manylinux2014_$machine" --platform "manylinux_2_17_$machine" \
    --platform "manylinux_2_28_$machine" "$(echo build/wheels/agent/backup_agent-*.whl)[kubernetes]"
rm -f build/wheels/deps/backup_agent-*.whl

for role in source sink; do
    docker build --quiet --build-arg "BASE_IMAGE=$BASE_IMAGE" -f "Dockerfile.$role" \
        -t "backup-agent-$role:$TAG" . >/dev/null
    echo "built backup-agent-$role:$TAG ($(docker image inspect -f '{{.Size}}' \
        "backup-agent-$role:$TAG") bytes) on $BASE_IMAGE"
done
