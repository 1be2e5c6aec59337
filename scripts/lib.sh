# Shared helpers of the project's shell scripts; sourced, not run.

bh_log() { printf '[blackhole] %s\n' "$*" >&2; }
bh_die() { printf '[blackhole] error: %s\n' "$*" >&2; exit 1; }

# The runtime directory for sockets and engine settings. The controller
# computes the same default (controller.config.default_run_dir).
bh_run_dir() {
  if [ -n "${BLACKHOLE_RUN_DIR:-}" ]; then
    echo "$BLACKHOLE_RUN_DIR"
  elif [ "$(id -u)" -eq 0 ]; then
    echo /run/blackhole
  elif [ -n "${XDG_RUNTIME_DIR:-}" ]; then
    echo "$XDG_RUNTIME_DIR/blackhole"
  else
    echo "/tmp/blackhole-$(id -u)"
  fi
}

bh_can_install() {
  [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && [ -f /etc/debian_version ]
}
