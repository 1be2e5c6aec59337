#!/usr/bin/env bash
# Generate the plugin protocol's Python modules (and their type stubs) from
# sdk/blackhole_sdk/proto/plugin.proto: scripts/proto.sh [PYTHON]
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${1:-$top/.venv/bin/python}
cd "$top/sdk"
"$python" -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  --plugin=protoc-gen-mypy="$(dirname "$python")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$python")/protoc-gen-mypy_grpc" \
  blackhole_sdk/proto/plugin.proto
