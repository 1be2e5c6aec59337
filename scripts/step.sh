#!/usr/bin/env bash
# Run one step of a make target and report how long it took: step.sh NAME COMMAND...
set -uo pipefail
name=$1
shift
start=$(date +%s%N)
"$@"
rc=$?
ms=$((($(date +%s%N) - start) / 1000000))
printf '[step] %-12s %4d.%01d s%s\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) \
  "$([ $rc -eq 0 ] || echo "  (failed, exit $rc)")" >&2
exit $rc
