"""A test plugin: listens on its socket, or misbehaves as its MODE says.

MODE=serve (default): listen on $BLACKHOLE_SOCKET until SIGTERM.
MODE=crash: print a line and exit 3 at once.
MODE=mute: run, but never listen (never Ready).
"""

import os
import signal
import socket
import sys
import time

mode = os.environ.get("MODE", "serve")
print(f"test plugin {os.environ.get('BLACKHOLE_PLUGIN')} mode={mode}", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if mode == "crash":
    print("boom: crashing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "mute":
    while True:
        time.sleep(3600)
path = os.environ["BLACKHOLE_SOCKET"]
if os.path.exists(path):
    os.unlink(path)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
print("listening on", path, flush=True)
while True:
    connection, _ = server.accept()
    connection.close()
