#!/usr/bin/env bash
# The one set-up step of `make demo` and `make test`: install on a Debian host, as root, what
# the project needs, and nothing that is already there. Idempotent and quiet when all is
# present; one line per thing it installs (what and why); one line and exit 1 when it cannot.
#
#   Debian packages  rsync, OpenSSH server and client, debootstrap, zstd, age, docker-compose,
#                    setpriv (util-linux), chromium (the status page's browser test);
#                    docker.io when no Docker engine answers
#   the Docker engine started when `docker info` fails
#   the Python package with its test extras (pip install -e '.[test]'), redone when
#                    pyproject.toml changes
#   the local base image (tools/build-base-image.sh: debootstrap + docker import; no image
#                    registry is needed)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root: it installs Debian packages and starts dockerd (run it with sudo)"
command -v apt-get >/dev/null 2>&1 || die "no apt-get: this set-up is for Debian hosts; install rsync, openssh-server, debootstrap, zstd, age, docker-compose, chromium and Docker by hand"

# ------------------------------------------------------------------ Debian packages
need=()
for tool in rsync:rsync sshd:openssh-server ssh:openssh-client debootstrap:debootstrap \
            zstd:zstd age:age setpriv:util-linux docker-compose:docker-compose chromium:chromium; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || need+=("${tool#*:}")
done
if ! docker info >/dev/null 2>&1 && ! command -v dockerd >/dev/null 2>&1; then
    need+=(docker.io)
fi
if [ "${#need[@]}" -gt 0 ]; then
    say "installing ${need[*]} (Debian packages the agents, the tests and the demo run)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed: check the host's apt sources and network"
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || die "apt-get install ${need[*]} failed (see the lines above)"
fi

# ------------------------------------------------------------------ the Docker engine
if ! docker info >/dev/null 2>&1 && [ -n "${DOCKER_HOST:-}" ]; then
    die "the Docker engine at DOCKER_HOST=$DOCKER_HOST does not answer: start it, or unset DOCKER_HOST to use (and start) the local one"
fi
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (no Docker engine answered; its log: /var/log/dockerd-setup.log)"
    (setsid dockerd >/var/log/dockerd-setup.log 2>&1 &)
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 \
        || die "no Docker daemon reachable after starting dockerd; see /var/log/dockerd-setup.log"
fi

# ------------------------------------------------------------------ the Python package
command -v python3 >/dev/null 2>&1 || die "no python3: install Python >= 3.11 with pip (e.g. apt-get install python3-pip)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$(python3 --version 2>&1) is too old: the agent needs Python >= 3.11"
python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip: install it (apt-get install python3-pip) or use a Python that has it"
stamp="build/.setup-python"
want="$(python3 --version 2>&1) $(sha256sum pyproject.toml | cut -c1-16) $PWD"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
        || ! (cd / && python3 -c 'import agent, pytest, xdist') >/dev/null 2>&1; then
    say "installing the backup-agent package with its test extras (pip install -e '.[test]')"
    python3 -m pip install -q --disable-pip-version-check --no-warn-script-location -e '.[test]' \
        2>&1 | grep -v -e "^WARNING: Running pip as the 'root' user" -e "dependency resolver" \
                      -e "requires .*, but you have" >&2 || true
    (cd / && python3 -c 'import agent, pytest, xdist') >/dev/null 2>&1 \
        || die "pip install -e '.[test]' failed (see the lines above)"
    mkdir -p build
    echo "$want" >"$stamp"
fi

# ------------------------------------------------------------------ the base image
if ! docker image inspect "${BASE_IMAGE:-backup-agent-base:bookworm}" >/dev/null 2>&1; then
    say "building the base image ${BASE_IMAGE:-backup-agent-base:bookworm} (debootstrap + docker import, about a minute, once)"
fi
bash tools/build-base-image.sh "${BASE_IMAGE:-backup-agent-base:bookworm}" >/dev/null \
    || die "building the base image failed (run bash tools/build-base-image.sh to see why)"
