"""scripts/loaded.sh: the command runs beside a CPU hog, its exit code comes back, the hog goes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "loaded.sh"


def test_the_command_runs_beside_the_hog_and_the_hog_is_gone_after() -> None:
    done = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "sh",
            "-c",
            'test -d "/proc/$BLACKHOLE_HOG_PID" || exit 1; echo "$BLACKHOLE_HOG_PID"; exit 7',
        ],
        env={**os.environ, "HOG_WORKERS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 7, done.stderr
    hog = int(done.stdout.strip())
    assert not Path(f"/proc/{hog}").exists() or "zombie" in Path(f"/proc/{hog}/status").read_text()
