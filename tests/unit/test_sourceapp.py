"""The zipapp of zettabee-source that enroll places on a source without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from zettabee import __version__, sourceapp


def test_the_zipapp_is_the_same_bytes_every_time() -> None:
    assert sourceapp.build().data == sourceapp.build().data


def test_the_zipapp_runs_zettabee_source_alone(tmp_path: Path) -> None:
    app = tmp_path / "zettabee-source"
    app.write_bytes(sourceapp.build().data)
    app.chmod(0o755)
    env = {"PATH": os.environ["PATH"]}  # no PYTHONPATH: only what the archive holds
    version = subprocess.run(
        [str(app), "--version"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert version.stdout.strip() == f"zettabee-source {__version__}", version.stderr
    env["SSH_ORIGINAL_COMMAND"] = "rm -rf /"
    refused = subprocess.run(
        [sys.executable, str(app), "tank/home"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert refused.returncode == 126
    assert refused.stderr.startswith("zettabee-source: refused: ")
