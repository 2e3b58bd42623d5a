"""Shared fixtures: the real two-host lab, and a per-test zettabee environment.

When CI=true, an integration test that skips (no root, no zfs-fuse, no sshd, no daemon)
fails the run: a CI that skipped the real parts has proven nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.zfslab import ZfsLab, test_lab_name  # noqa: E402


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if _ci() and report.skipped and item.get_closest_marker("integration") is not None:
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"CI=true: an integration test may not skip ({reason})"


def lab_missing() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, zfs-fuse)"
    for tool in ("zfs-fuse", "zfs", "zpool", "mbuffer", "ssh", "ip", "nsenter"):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (make deps)"
    if not Path("/usr/sbin/sshd").exists():
        return "openssh-server is not installed (make deps)"
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing"
    return None


@pytest.fixture(scope="session")
def lab() -> Iterator[ZfsLab]:
    missing = lab_missing()
    if missing:
        pytest.skip(missing)
    zlab = ZfsLab(test_lab_name(), pool_size="3G")
    with zlab.held():
        zlab.up()
        try:
            yield zlab
        finally:
            if not os.environ.get("ZETTABEE_KEEP_LAB"):
                zlab.down()


class Zb:
    """One test's pairs, settings and state, on the shared lab; runs the real executables."""

    def __init__(self, lab: ZfsLab, tmp: Path, name: str) -> None:
        self.lab = lab
        self.tmp = tmp
        self.name = name
        self.src = lab.source
        self.settings = tmp / "zettabee.ini"
        self.pairfile = tmp / "pairs.cfg"
        self.extra_settings = ""
        self.write_settings()

    # datasets -------------------------------------------------------------------------
    def src_fs(self, leaf: str = "data") -> str:
        return f"{self.lab.source.pool}/{self.name}-{leaf}"

    def dst_fs(self, leaf: str = "data") -> str:
        return f"{self.lab.dst_pool}/{self.name}-{leaf}"

    def src_dir(self, leaf: str = "data") -> Path:
        return Path(self.src.mountpoint) / f"{self.name}-{leaf}"

    def dst_dir(self, leaf: str = "data") -> Path:
        return self.lab.dst_mountpoint / f"{self.name}-{leaf}"

    def make_source(self, leaf: str = "data", mb: int = 4) -> str:
        fs = self.src_fs(leaf)
        self.src.run("zfs", "create", fs)
        if mb:
            write_random(self.src_dir(leaf) / "random.bin", mb)
        return fs

    # configuration --------------------------------------------------------------------
    def write_settings(self, extra: str | None = None) -> None:
        if extra is not None:
            self.extra_settings = extra
        ssh = Path(self.src.key).parent
        self.settings.write_text(
            f"[paths]\npairs = {self.pairfile}\nstate_dir = {self.tmp}/state\n"
            f"log_dir = {self.tmp}/log\nlock_dir = {self.tmp}/run\n"
            f"spool_dir = {self.tmp}/spool\nknown_hosts = {ssh}/known_hosts\n\n"
            f"[defaults]\nsshkey = {ssh}/client_ed25519\n" + self.extra_settings
        )

    def pair_line(self, leaf: str = "data", options: str = "") -> str:
        line = (
            f"{self.src.address}:{self.src_fs(leaf)}  {self.lab.dest_address}:{self.dst_fs(leaf)}"
        )
        return f"{line}  {options}" if options else line

    def write_pairs(self, *lines: str) -> None:
        self.pairfile.write_text("\n".join(lines) + "\n")

    # running --------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["ZETTABEE_SETTINGS"] = str(self.settings)
        env["PYTHONPATH"] = str(REPO)
        return env

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``zettabee ARGS`` as a user types it."""
        return self.exe("zettabee", *args, timeout=timeout)

    def exe(self, name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        settle()
        argv = executable(name)
        return subprocess.run(
            [*argv, *args], capture_output=True, text=True, env=self.env(), timeout=timeout
        )

    def popen(self, name: str, *args: str) -> subprocess.Popen[str]:
        settle()
        return subprocess.Popen(
            [*executable(name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
        )

    def fingerprint(self, leaf: str = "data") -> str:
        out = self.run("fingerprint", self.dst_fs(leaf))
        assert out.returncode == 0, out.stderr
        return out.stdout.split()[-1]

    def assert_same_data(self, leaf: str = "data") -> None:
        settle()
        src = self.lab.checksum_tree(self.src_dir(leaf))
        dst = self.lab.checksum_tree(self.dst_dir(leaf))
        assert src, "the source tree is empty: nothing was compared"
        assert dst == src

    def cleanup(self) -> None:
        for fs in (f"{self.lab.dst_pool}/{self.name}-", f"{self.lab.source.pool}/{self.name}-"):
            out = subprocess.run(
                ["zfs", "list", "-H", "-o", "name"], capture_output=True, text=True
            ).stdout.split()
            for name in out:
                if name.startswith(fs) and name.count("/") == 1:
                    destroy(name)


def settle() -> None:
    """zfs-fuse sits behind FUSE's page cache: flush what the test wrote before a snapshot
    sees the file system, and drop cached pages of files a receive changed underneath."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def destroy(fs: str) -> None:
    """zfs-fuse answers 'dataset is busy' for a moment after a mount change: retry."""
    import time

    from lab.hosts import release_foreign_mounts

    for attempt in range(30):
        if subprocess.run(["zfs", "destroy", "-r", fs], capture_output=True).returncode == 0:
            return
        if attempt == 10:  # a private mount namespace made meanwhile may hold a copy
            mountpoint = subprocess.run(
                ["zfs", "get", "-H", "-o", "value", "mountpoint", fs],
                capture_output=True,
                text=True,
            ).stdout.strip()
            if mountpoint.startswith("/"):
                release_foreign_mounts(Path(mountpoint))
        time.sleep(0.2)
    raise RuntimeError(f"cannot destroy {fs}")


def executable(name: str) -> list[str]:
    """How the tests start a program: the installed one, else from the work tree."""
    bindir = Path(sys.executable).parent
    if (bindir / name).exists():
        return [str(bindir / name)]
    if name == "zettabee":
        return [sys.executable, "-m", "zettabee.cli"]
    return [sys.executable, str(REPO / "plugins" / name)]


def write_random(path: Path, mb: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for _ in range(mb):
            handle.write(os.urandom(1 << 20))


@pytest.fixture
def zb(lab: ZfsLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Zb]:
    import hashlib

    words = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:28]
    name = f"{words}-{hashlib.md5(request.node.nodeid.encode()).hexdigest()[:6]}"
    env = Zb(lab, tmp_path, name)
    env.cleanup()
    try:
        yield env
    finally:
        env.cleanup()
