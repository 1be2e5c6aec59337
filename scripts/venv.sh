#!/usr/bin/env bash
# Create the project's virtual environment and install the controller, the SDK
# and the development tools into it: venv.sh PYTHON VENV
set -euo pipefail
python=$1
venv=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
  bh_die "$python is missing or older than 3.11; install Python 3.11+ and run again with PYTHON=/path/to/python3"
if ! "$python" -m venv --help >/dev/null 2>&1; then
  bh_can_install || bh_die "$python has no venv module; install it (Debian: python3-venv)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
# The process runtime's seccomp filter is built with the system's libseccomp.
if ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then
  bh_can_install || bh_die "libseccomp is missing; install it (Debian: libseccomp2)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libseccomp2 >/dev/null
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here/../sdk" -e "$here/..[dev]"
