#!/usr/bin/env bash
# Build the serving image without a Docker daemon (podman), run it on an
# artifact root and wait until /readyz answers. Used by the opt-in test
# (FISHREC_CONTAINER_TESTS=1 pytest tests/deploy/test_deploy.py) and by hand:
#
#   deploy/podman-smoke.sh ARTIFACTS_ROOT [HOST_PORT]        (from the repository root, as root)
#
# Machines that cannot pull from a registry: unless FISHREC_PYTHON_IMAGE names
# an image podman already has, the python base is built locally, from a Debian
# root filesystem made with debootstrap (the mirror apt uses) plus Debian's
# python3, and passed as the PYTHON_IMAGE build argument. The Dockerfile itself
# is unchanged. Podman's settings go to a private folder (CONTAINERS_CONF), not /etc.
set -euo pipefail

root=$(realpath "${1:?usage: podman-smoke.sh ARTIFACTS_ROOT [HOST_PORT]}")
port=${2:-8000}
image=localhost/fishrec-serve:smoke
base=${FISHREC_PYTHON_IMAGE:-localhost/fishrec-python:3.11-bookworm}
debian=localhost/fishrec-debian:bookworm
name=fishrec-smoke-$$
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
say() { printf '[podman-smoke %(%H:%M:%S)T] %s\n' -1 "$*"; }

install_tools() {
    command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null && return
    [ "$(id -u)" = 0 ] || { echo "podman, runc and debootstrap are needed (apt-get install podman runc debootstrap)" >&2; exit 2; }
    say "installing podman, runc, debootstrap"
    apt-get install -y -q podman runc debootstrap >/dev/null
}

configure_podman() {
    # runc, not crun (crun fails on hybrid cgroup kernels); cgroupfs, not systemd;
    # ulimits within this machine's hard limits (podman caps nproc at 32768).
    local conf nofile nproc
    conf=$(mktemp -d)
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
    cat >"$conf/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
    printf '[storage]\ndriver = "overlay"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' \
        >"$conf/storage.conf"
    export CONTAINERS_CONF="$conf/containers.conf" CONTAINERS_STORAGE_CONF="$conf/storage.conf"
}

debian_mirror() {
    local mirror
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
    echo "$mirror"
}

build_base() {
    podman image exists "$base" && return
    if ! podman image exists "$debian"; then
        say "debootstrap: a minimal Debian bookworm root filesystem"
        local rootfs
        rootfs=$(mktemp -d)
        debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$(debian_mirror)" >/dev/null
        # Trust the CAs this machine trusts (a TLS-intercepting proxy's among them), or pip fails inside.
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
        chroot "$rootfs" update-ca-certificates >/dev/null
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | podman import -q - "$debian" >/dev/null
        rm -rf "$rootfs"
    fi
    say "python base image from Debian's python3 (stand-in for python:3.11-slim-bookworm)"
    podman build -q --network host -t "$base" -f - "$(mktemp -d)" <<EOF >/dev/null
FROM $debian
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && ln -s /usr/bin/python3 /usr/local/bin/python && rm -rf /var/lib/apt/lists/*
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
EOF
}

install_tools
configure_podman
started=$SECONDS
build_base
say "base ready after $((SECONDS - started)) s; building the serving image"
build_started=$SECONDS
podman build -q --format docker --network host --build-arg "PYTHON_IMAGE=$base" -t "$image" \
    -f "$repo/deploy/serving.Dockerfile" "$repo" >/dev/null
say "serving image built in $((SECONDS - build_started)) s ($(podman image inspect --format '{{.Size}}' "$image") bytes)"

trap 'podman rm -f "$name" >/dev/null 2>&1 || true' EXIT
run_started=$SECONDS
podman run -d --name "$name" -p "127.0.0.1:$port:8000" -v "$root:/artifacts:ro" "$image" >/dev/null
for _ in $(seq 1 120); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
        say "ready $((SECONDS - run_started)) s after start; total $((SECONDS - started)) s"
        say "user in the container: $(podman exec "$name" id -u)"
        curl -fsS "http://127.0.0.1:$port/readyz"
        echo
        curl -fsS "http://127.0.0.1:$port/v1/model"
        echo
        exit 0
    fi
    if [ "$(podman inspect --format '{{.State.Running}}' "$name")" != true ]; then
        break
    fi
    sleep 0.5
done
echo "the container did not become ready; its log:" >&2
podman logs "$name" >&2 || true
exit 1
