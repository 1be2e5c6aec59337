#!/usr/bin/env bash
# Create the project's virtual environment and install into it what a make target
# needs: venv.sh PYTHON VENV [PROFILE]
#   base  the controller (bhctl) and the SDK: enough for make demo
#   dev   base and the development tools (lint, types, tests, protobuf generation; the default)
#   docs  base and mkdocs with the material theme (make docs)
# Each long step says what it does, and pip says each package it fetches.
set -euo pipefail
python=$1
venv=$2
profile=${3:-dev}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

case $profile in
  base) extras= ;;
  dev) extras='[dev]' ;;
  docs) extras='[docs]' ;;
  *) bh_die "unknown profile '$profile'; use base, dev or docs" ;;
esac

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
  bh_die "$python is missing or older than 3.11; install Python 3.11+ and run again with PYTHON=/path/to/python3"
if ! "$python" -m venv --help >/dev/null 2>&1; then
  bh_can_install || bh_die "$python has no venv module; install it (Debian: python3-venv)"
  bh_log "installing python3-venv from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
# The process runtime's seccomp filter is built with the system's libseccomp.
if ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then
  bh_can_install || bh_die "libseccomp is missing; install it (Debian: libseccomp2)"
  bh_log "installing libseccomp2 from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libseccomp2 >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
  bh_log "creating the virtual environment $venv"
  "$python" -m venv "$venv"
fi

# pip install ARGS, one line per package it fetches or builds; its whole output is kept
# in $venv/pip.log and shown when it fails.
pip_install() {
  local what=$1 start count=0 line name
  shift
  bh_log "$what"
  start=$(date +%s)
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 |
    tee "$venv/pip.log" | while IFS= read -r line; do
      case $line in
        Collecting\ * | Obtaining\ *)
          count=$((count + 1))
          name=${line#* }
          printf '[blackhole]   %3d %s\n' "$count" "${name%% (from*}" >&2
          ;;
        Installing\ collected\ packages:*) bh_log "  unpacking and compiling them" ;;
      esac
    done; then
    tail -n 30 "$venv/pip.log" >&2
    bh_die "pip failed ($what); its whole output is in $venv/pip.log"
  fi
  bh_log "  done in $(($(date +%s) - start)) s"
}

pip_install "upgrading pip" --upgrade pip
case $profile in
  base) what="installing the controller (bhctl) and the SDK" ;;
  dev) what="installing the controller, the SDK and the development tools" ;;
  docs) what="installing the controller, the SDK and the docs tools" ;;
esac
pip_install "$what" -e "$here/../sdk" -e "$here/..$extras"
