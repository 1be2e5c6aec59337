#!/usr/bin/env bash
# Run a command beside a CPU hog that keeps the machine's cores busy, as a
# loaded host would: the suite must hold there too (waits on conditions, time
# limits scaled for load).
#
# Usage: scripts/loaded.sh COMMAND...
#   HOG_WORKERS   CPU workers of the hog (default: one per core)
# The tests' waits on conditions and pytest's per-test limit are scaled for the load
# (BLACKHOLE_TEST_TIME_SCALE, default 3; PYTEST_TIMEOUT, default 900 s) unless set.
# The hog is stress-ng from Debian's package (installed when missing, as root).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

[ $# -gt 0 ] || bh_die "usage: scripts/loaded.sh COMMAND..."
if ! command -v stress-ng >/dev/null 2>&1; then
  bh_can_install || bh_die "stress-ng is not installed: install it (Debian: apt-get install stress-ng) and run this again."
  bh_log "apt-get install stress-ng"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends stress-ng >/dev/null
fi
workers=${HOG_WORKERS:-$(nproc)}
stress-ng --cpu "$workers" --quiet &
hog=$!
export BLACKHOLE_HOG_PID=$hog
export BLACKHOLE_TEST_TIME_SCALE=${BLACKHOLE_TEST_TIME_SCALE:-3}
export PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-900}
trap 'kill "$hog" 2>/dev/null || true; wait "$hog" 2>/dev/null || true' EXIT
bh_log "running beside a CPU hog ($workers stress-ng workers, pid $hog)"
"$@"
