#!/usr/bin/env bash
# Make sure the container engines the controller and its tests need answer:
# Docker (dockerd) and Podman (its Docker-compatible API service).
#
# Does nothing for an engine that already answers. Otherwise, on Debian as
# root, installs Debian's packages, starts the engine in the background and
# waits for it. Anywhere else it prints what the user must do and fails.
#
# Usage: scripts/engines.sh [docker] [podman] [prometheus] [compose] [browser] [netns]
#   (default: docker podman; browser: Debian's chromium, for the dashboard's tests;
#   netns: iproute2's ip, for the tests of plugins on other hosts as network namespaces)
# Writes the endpoints to "$BLACKHOLE_RUN_DIR/engines.env" for the tools to source.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(docker podman)

run_dir=$(bh_run_dir)
mkdir -p "$run_dir"
chmod 0700 "$run_dir"

apt_updated=0
apt_install() {
  if ! bh_can_install; then
    bh_die "cannot install $* here: this needs Debian and root. Install the packages ($*) with your system's package manager and run this script again."
  fi
  if [ $apt_updated -eq 0 ]; then
    bh_log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  bh_log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      return 1
    fi
    sleep 0.2
  done
  bh_log "$what answers"
}

ensure_docker() {
  if docker_answers; then
    bh_log "docker answers"
    return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    if pgrep -x dockerd >/dev/null; then
      bh_die "dockerd runs but does not answer you ($(id -un)): add yourself to the 'docker' group (sudo usermod -aG docker $(id -un), then log in again), or point DOCKER_HOST at a Docker API you may use."
    fi
    command -v dockerd >/dev/null 2>&1 ||
      bh_die "Docker is not installed: install it as root (Debian: sudo apt-get install docker.io), start it (sudo dockerd &), and run this script again."
    bh_die "dockerd is installed but not running, and starting it needs root: run 'sudo dockerd &' (or 'sudo systemctl start docker') and try again."
  fi
  command -v dockerd >/dev/null 2>&1 || apt_install docker.io
  if [ -S /var/run/docker.sock ] && ! pgrep -x dockerd >/dev/null; then
    rm -f /var/run/docker.sock
  fi
  if ! pgrep -x dockerd >/dev/null; then
    bh_log "starting dockerd (log: $run_dir/dockerd.log)"
    # From /, so that the daemon does not hold (or depend on) the caller's directory.
    (cd / && exec setsid dockerd >"$run_dir/dockerd.log" 2>&1 </dev/null) &
  fi
  wait_for 60 docker docker_answers || bh_die "dockerd did not answer within 60 s; its log is $run_dir/dockerd.log"
}

docker_answers() {
  # The Debian client at /usr/bin/docker matches the Debian daemon; any client works.
  docker version --format '{{.Server.APIVersion}}' >/dev/null 2>&1
}

podman_conf() {
  # Root in a VM without CAP_SYS_RESOURCE cannot raise rlimits above its own,
  # and there is no systemd: lower the default ulimits, use cgroupfs and a
  # file events logger.
  local conf="$run_dir/containers.conf"
  cat >"$conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
CONF
  echo "$conf"
}

podman_answers() {
  curl -fsS --max-time 2 --unix-socket "$run_dir/podman/podman.sock" http://d/_ping >/dev/null 2>&1
}

ensure_podman() {
  local conf
  conf=$(podman_conf)
  export CONTAINERS_CONF=$conf
  if podman_answers; then
    bh_log "podman answers"
    return
  fi
  command -v podman >/dev/null 2>&1 || apt_install podman
  command -v curl >/dev/null 2>&1 || apt_install curl
  mkdir -p "$run_dir/podman"
  rm -f "$run_dir/podman/podman.sock"
  bh_log "starting podman system service (log: $run_dir/podman.log)"
  # From /: conmon needs the service's working directory to exist for every container.
  (cd / && exec setsid podman system service --time=0 "unix://$run_dir/podman/podman.sock" \
    >"$run_dir/podman.log" 2>&1 </dev/null) &
  wait_for 30 podman podman_answers || bh_die "podman system service did not answer within 30 s; its log is $run_dir/podman.log"
}

ensure_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    bh_log "prometheus installed"
    return
  fi
  apt_install prometheus
}

ensure_compose() {  # the peer the benchmarks compare with: Debian's docker-compose 1.29
  if command -v docker-compose >/dev/null 2>&1; then
    bh_log "docker-compose installed"
    return
  fi
  apt_install docker-compose
}

ensure_browser() {  # the dashboard's browser tests: Debian's Chromium, driven by playwright
  if [ -x /usr/bin/chromium ]; then
    bh_log "chromium installed"
    return
  fi
  apt_install chromium
}

ensure_netns() {
  if command -v ip >/dev/null 2>&1; then
    bh_log "ip (iproute2) is there"
    return
  fi
  apt_install iproute2
}

for engine in "${want[@]}"; do
  case $engine in
    docker) ensure_docker ;;
    podman) ensure_podman ;;
    prometheus) ensure_prometheus ;;
    compose) ensure_compose ;;
    browser) ensure_browser ;;
    netns) ensure_netns ;;
    *) bh_die "unknown engine '$engine'; use docker, podman, prometheus, compose, browser or netns" ;;
  esac
done

cat >"$run_dir/engines.env" <<ENV
BLACKHOLE_RUN_DIR=$run_dir
BLACKHOLE_DOCKER_HOST=unix:///var/run/docker.sock
BLACKHOLE_PODMAN_HOST=unix://$run_dir/podman/podman.sock
CONTAINERS_CONF=$run_dir/containers.conf
ENV
