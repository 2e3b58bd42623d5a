"""What every benchmark records beside its figures: the machine it ran on, how busy it
was, one JSON line; and the package prepared as an installation has it."""

from __future__ import annotations

import compileall
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, object]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "zfs": "zfs-fuse",
    }


def load() -> list[float]:
    """The load averages (1, 5, 15 min): the machine is shared, figures move with it."""
    return [round(x, 2) for x in os.getloadavg()]


def compile_package() -> None:
    """Write the bytecode of zettabee and nsca, as installing the package does.

    With PYTHONDONTWRITEBYTECODE set (as in some shells) a source tree would otherwise
    compile every module anew in every run: 15-20 ms that no installation pays.
    """
    for package in ("zettabee", "nsca"):
        compileall.compile_dir(str(REPO / package), quiet=1)
