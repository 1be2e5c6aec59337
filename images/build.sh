#!/usr/bin/env bash
# Build every image of the project against the local base image:
# the base (from Debian packages, when missing), then wheels on the host,
# then the images, each loaded into Podman too when Podman answers.
#
# Usage: images/build.sh     (BASE_IMAGE overrides the base, e.g. python:3.11-slim-bookworm)
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$top/scripts/lib.sh"
export BASE_IMAGE=${BASE_IMAGE:-blackhole/base:bookworm}
python=${PYTHON:-python3}
export DOCKER_BUILDKIT=0

bash "$top/images/base/build.sh"

wheels="$top/build/wheels"
rm -rf "$wheels"
mkdir -p "$wheels"
bh_log "building wheels into $wheels"
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" "$top/sdk" pip

load_into_podman() {
  local run_dir
  run_dir=$(bh_run_dir)
  if [ -f "$run_dir/engines.env" ] && command -v podman >/dev/null 2>&1; then
    bh_log "loading $1 into podman"
    docker save "$1" | CONTAINERS_CONF="$run_dir/containers.conf" podman load --quiet >/dev/null
  fi
}

build() {  # build NAME DOCKERFILE CONTEXT
  local image="blackhole/$1:$(cat "$top/VERSION")"
  bh_log "docker build $image"
  docker build --quiet --build-arg "BASE_IMAGE=$BASE_IMAGE" -f "$2" -t "$image" "$3" >/dev/null
  load_into_podman "$image"
}

build plugin-runtime "$top/images/plugin-runtime/Dockerfile" "$wheels"
