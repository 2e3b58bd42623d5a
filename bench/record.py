"""What every benchmark records beside its figures: the machine it ran on, how busy it
was, one JSON line; the package prepared as an installation has it; the lab the
benchmarks on ZFS share with the test suite; and the OpenZFS lab guest with this tree's
package installed."""

from __future__ import annotations

import compileall
import contextlib
import importlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from lab.guest import Guest
from lab.zfslab import ZfsLab, test_lab_name

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


def append(out: str | Path, record: Mapping[str, object]) -> None:
    """Add ``record`` as one JSON line to ``out``: a results file keeps every run, so the
    figures of busy and quiet days stand side by side."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def compile_package() -> None:
    """Write the bytecode of zettabee and nsca, as installing the package does.

    With PYTHONDONTWRITEBYTECODE set (as in some shells) a source tree would otherwise
    compile every module anew in every run: 15-20 ms that no installation pays.
    """
    for package in ("zettabee", "nsca"):
        compileall.compile_dir(str(REPO / package), quiet=1)


@contextlib.contextmanager
def lab_held(keep: bool = False, name: str | None = None) -> Iterator[ZfsLab]:
    """The test suite's lab (``name``, else ZETTABEE_LAB), held so that no test session
    tears it down during the run. A lab that was down is brought up, and down again at
    the end unless ``keep``; one already up (a kept test lab) is left as it was."""
    lab = ZfsLab(name or test_lab_name(), pool_size="3G")
    with lab.held():
        started_lab = not lab.is_up()
        if started_lab:
            lab.up()
        try:
            yield lab
        finally:
            if started_lab and not keep:
                lab.down()


@contextlib.contextmanager
def guest_installed(lab: str, zfs: str, prefix: str) -> Iterator[tuple[Guest, Path]]:
    """The lab guest ``lab`` of OpenZFS ``zfs`` in the main topology: booted, its source
    host started and this tree's package installed. Yields the guest and the folder it
    shares with this host (made with ``prefix``); the guest goes down at the end, its
    pools with it."""
    # The tests' harness builds the package (loaded by name: the tests are not
    # type-checked with the package).
    harness = importlib.import_module("tests.conftest")
    share = Path(tempfile.mkdtemp(prefix=prefix))
    share.chmod(0o755)
    deb = harness.build_package(share / "deb")
    vm = Guest(lab, zfs=zfs, share=share)
    with vm.held():
        vm.build()
        vm.up()
        try:
            vm.start_source_host()
            vm.install_package(deb)
            yield vm, share
        finally:
            vm.down()


@contextlib.contextmanager
def torn_down_after(tear_down: Callable[[], None], keep: bool) -> Iterator[None]:
    """Runs the block, then ``tear_down`` unless ``keep``; a tear-down that fails is a
    warning, not a failure: the figures are taken by then."""
    try:
        yield
    finally:
        if not keep:
            try:
                tear_down()
            except RuntimeError as exc:
                print(f"warning: {exc}", file=sys.stderr)
