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

# Wheels for the images, built on the host: containers cannot reach a package index.
wheels="$top/build/wheels"                # the SDK and its dependencies, for plugins
controller_wheels="$top/build/wheels-controller"  # the controller and all it needs
rm -rf "$wheels" "$controller_wheels"
mkdir -p "$wheels" "$controller_wheels"
bh_log "building wheels into $wheels and $controller_wheels"
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" "$top/sdk" pip
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$controller_wheels" \
  --find-links "$wheels" "$top/sdk" "$top" pip

load_into_podman() {
  local run_dir
  run_dir=$(bh_run_dir)
  if [ -f "$run_dir/engines.env" ] && command -v podman >/dev/null 2>&1; then
    bh_log "loading $1 into podman"
    docker save "$1" | CONTAINERS_CONF="$run_dir/containers.conf" podman load --quiet >/dev/null
  fi
}

build() {  # build IMAGE DOCKERFILE CONTEXT [--build-arg NAME=VALUE...]
  local image=$1 dockerfile=$2 context=$3
  shift 3
  bh_log "docker build $image"
  # The Debian engine has no BuildKit: drop the client's notice about the legacy builder.
  docker build --quiet --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "RUNTIME_IMAGE=$runtime" \
    "$@" -f "$dockerfile" -t "$image" "$context" 2>&1 >/dev/null |
    sed '/legacy builder is deprecated/,/environment-variable/d;/^$/d' >&2
  load_into_podman "$image"
}

version=$(cat "$top/VERSION")
runtime="blackhole/plugin-runtime:$version"
build "$runtime" "$top/images/plugin-runtime/Dockerfile" "$wheels"
build "blackhole/controller:$version" "$top/images/controller/Dockerfile" "$controller_wheels"
# The example plugins, tagged as examples/plugins/*.yaml name them.
build blackhole/example-echo:0.1.0 "$top/examples/echo/Dockerfile" "$top/examples/echo"
# The storage example's releases: 1.0.0 keeps state version 1, the later ones version 2.
build blackhole/example-storage:1.0.0 "$top/examples/storage/Dockerfile" "$top/examples/storage" \
  --build-arg STATE_VERSION=1
build blackhole/example-storage:1.1.0 "$top/examples/storage/Dockerfile" "$top/examples/storage"
build blackhole/example-storage:1.2.0 "$top/examples/storage/Dockerfile" "$top/examples/storage"
build blackhole/example-analytics:1.0.0 "$top/examples/analytics/Dockerfile" "$top/examples/analytics"
