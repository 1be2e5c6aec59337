"""The committed protocol modules are what the committed .proto generates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
GENERATED = ["plugin_pb2.py", "plugin_pb2.pyi", "plugin_pb2_grpc.py", "plugin_pb2_grpc.pyi"]


def test_generated_protocol_modules_are_up_to_date(tmp_path: Path) -> None:
    copy = tmp_path / "sdk"
    (copy / "blackhole_sdk" / "proto").mkdir(parents=True)
    shutil.copy(TOP / "sdk/blackhole_sdk/proto/plugin.proto", copy / "blackhole_sdk/proto")
    script = tmp_path / "scripts" / "proto.sh"
    script.parent.mkdir()
    shutil.copy(TOP / "scripts/proto.sh", script)
    subprocess.run(["bash", str(script), sys.executable], check=True, capture_output=True)
    for name in GENERATED:
        committed = (TOP / "sdk/blackhole_sdk/proto" / name).read_text()
        fresh = (copy / "blackhole_sdk/proto" / name).read_text()
        assert committed == fresh, f"{name} is stale: run make proto"
