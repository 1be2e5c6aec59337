#!/usr/bin/env bash
# Run the controller on the example plugins with Docker, in the background, and show them.
#
# Usage: scripts/demo.sh [BHCTL]    (the controller keeps running; stop it with
#                                    kill "$(cat "$run_dir/demo-controller.pid")")
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$top/scripts/lib.sh"
bhctl=$(realpath "${1:-$top/.venv/bin/bhctl}")
run_dir=$(bh_run_dir)
mkdir -p "$run_dir"
pid_file="$run_dir/demo-controller.pid"
log_file="$run_dir/demo-controller.log"

if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  bh_log "stopping the demo controller that runs already (pid $(cat "$pid_file"))"
  kill -TERM "$(cat "$pid_file")"
  for _ in $(seq 100); do kill -0 "$(cat "$pid_file")" 2>/dev/null || break; sleep 0.1; done
fi

bh_log "starting the controller on $top/examples/plugins (log: $log_file)"
cd /
setsid "$bhctl" run --specs "$top/examples/plugins" --runtime docker >>"$log_file" 2>&1 &
echo $! >"$pid_file"

names=$(cd "$top/examples/plugins" && ls ./*.yaml | wc -l)
for _ in $(seq 600); do
  ready=$("$bhctl" get -o json 2>/dev/null | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
print(sum(any(c["type"] == "Ready" and c["status"] == "True"
              for c in (i.get("status") or {}).get("conditions", [])) for i in items))
' 2>/dev/null || echo 0)
  [ "$ready" = "$names" ] && break
  kill -0 "$(cat "$pid_file")" 2>/dev/null || bh_die "the controller exited; see $log_file"
  sleep 0.1
done
"$bhctl" get -o wide
[ "$ready" = "$names" ] || bh_die "not every example plugin became Ready; see $log_file"
echo
# The gateway (its own process) may still be starting: wait until it routes kv-store.
for _ in $(seq 600); do
  "$bhctl" gateway --status 2>/dev/null | python3 -c '
import json, sys
sys.exit(0 if (json.load(sys.stdin)["plugins"].get("kv-store") or {}).get("endpoint") else 1)
' 2>/dev/null && break
  sleep 0.1
done
bh_log "a call through the gateway: bhctl call kv-store put, then get"
"$bhctl" call kv-store put --data '{"key": "greeting", "value": "hello"}' >/dev/null
"$bhctl" call kv-store get --data '{"key": "greeting"}'
cat <<EOT

The controller runs in the background (pid $(cat "$pid_file"), log $log_file).
Try:  $bhctl describe kv-store
      $bhctl logs kv-store
      $bhctl call analytics ingest --data '{"value": 3}'
      curl -s -X POST localhost:8080/v1/plugins/echo/call/ping -d '{"hello": 1}'
      edit $top/examples/plugins/echo.yaml and watch $bhctl get
Stop: kill $(cat "$pid_file")    (the plugins and the gateway keep running; a new controller adopts them)
      $bhctl gateway --stop          (the gateway too: calls are refused until a controller starts one)
EOT
