"""paramiko is enroll's alone: the check plugins, replicate and the update path never
load it (it costs 0.15-0.2 s and 40 MB of every run, and cron runs use OpenSSH)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent

# Every module of the plugins and of a cron run: what they import, and the engine too.
CRON_MODULES = (
    "zettabee.checks", "zettabee.plugin", "zettabee.cli", "zettabee.replicator",
    "zettabee.transport", "zettabee.fastpath", "zettabee.hosts", "zettabee.host",
    "zettabee.preflight", "zettabee.health", "zettabee.state", "zettabee.passive",
    "zettabee.source", "zettabee.replicate", "zettabee.logs", "nsca",
    "zettabee.run", "zettabee.update", "zettabee.initialize", "zettabee.purge",
    "zettabee.resume", "zettabee.divergence", "zettabee.snapshots", "zettabee.views",
    "zettabee.relay", "zettabee.mbuffer", "zettabee.tree", "zettabee.cliparser",
    "zettabee.sourcerules",
)  # fmt: skip


def loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'paramiko'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout)  # noqa: S307 - our own probe's list of names


def test_the_plugins_and_update_modules_never_import_paramiko() -> None:
    assert loaded_after("\n".join(f"import {m}" for m in CRON_MODULES)) == []


def test_the_command_line_of_update_and_replicate_never_imports_paramiko() -> None:
    code = (
        "from zettabee import cli\n"
        "cli.build_parser().parse_args(['update', '--all'])\n"
        "cli.build_parser().parse_args(['enroll', 'src.example.com'])\n"
        "import contextlib, io, runpy\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        f"    sys.argv = ['replicate', '--help']; runpy.run_path({str(REPO / 'plugins' / 'replicate')!r}, run_name='__main__')\n"
    )
    assert loaded_after(code) == []


def test_enroll_is_where_paramiko_is() -> None:
    assert "paramiko" in loaded_after(
        "from zettabee import contact\nfrom zettabee.host import SshTarget\ncontact.pinned_keys('/nonexistent', SshTarget('h'))"
    )


def test_python_importtime_of_each_plugin_and_of_replicate_names_no_paramiko() -> None:
    """What ``python -X importtime`` sees a plugin and replicate import, as they start."""
    for script in ("check_zettabee_lag", "check_zettabee_runtime", "replicate"):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", str(REPO / "plugins" / script), "--help"],
            capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        imported = [
            line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line
        ]
        assert "nagiosplugin" in imported or script == "replicate", out.stderr[-500:]
        assert "zettabee" in imported, out.stderr[-500:]
        assert not [name for name in imported if name.split(".")[0] == "paramiko"], script
