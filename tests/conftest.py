"""Shared fixtures: the real lab back ends, and a per-test zettabee environment.

Two back ends carry the same integration tests:

- ``zfs-fuse``: the two-host lab (``lab``), a source host in a network namespace reached
  over SSH, the destination on this machine;
- ``openzfs``: the OpenZFS 2.1 QEMU guest (``guest``), source and destination pools both
  in the guest, so every pair there has two remote ends.

A test module runs on both by asking for ``zb`` through :func:`backend_zb` (see
``test_replication.py``); the other modules use the zfs-fuse lab only.

When CI=true, an integration test that skips (no root, no zfs-fuse, no sshd, no daemon,
no guest) fails the run: a CI that skipped the real parts has proven nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.guest import Guest, GuestError  # noqa: E402
from lab.hosts import SourceHost  # noqa: E402
from lab.zfslab import ZfsLab, test_lab_name  # noqa: E402

BACKENDS = ("zfs-fuse", "openzfs")


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


def _guest_rank(item: pytest.Item) -> int:
    """0 for a test that needs no OpenZFS guest, else 1 + the guest's place in the order
    the images are built (2.1 first, then 2.3)."""
    callspec = getattr(item, "callspec", None)
    names = [
        *getattr(item, "fixturenames", ()),
        *(str(v) for v in (callspec.params.values() if callspec else ())),
    ]
    if any(
        "2.3" in name or name.endswith("23")
        for name in names
        if "guest" in name or "openzfs" in name
    ):
        return 2
    return 1 if any(name.startswith(("guest", "openzfs")) for name in names) else 0


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """The guests' tests last, 2.1's before 2.3's, and their images built meanwhile.

    Building an image compiles OpenZFS (minutes); the zfs-fuse tests mostly wait on
    sshd, zfs-fuse and timers. So when the selected tests need an image the cache lacks,
    ``python -m lab.guest build --zfs all`` starts in the background now, while the
    zfs-fuse tests run; a guest fixture that comes to an image still being built waits on
    the machine-wide build lock, then boots it."""
    items.sort(key=_guest_rank)  # stable: each group keeps the order it was collected in
    if os.geteuid() != 0 or config.option.collectonly or not any(map(_guest_rank, items)):
        return
    from lab.guest import SUITES  # noqa: PLC0415

    if all(Guest(test_lab_name(), zfs=zfs).built() for zfs in SUITES):
        return
    log = (
        Path(os.environ.get("ZETTABEE_GUEST_CACHE", "/var/tmp/zettabee-lab/guest")) / "prebuild.log"
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "lab.guest", "build", "--zfs", "all"], cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    config.stash[_PREBUILD] = log


_PREBUILD = pytest.StashKey[Path]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    log = terminalreporter.config.stash.get(_PREBUILD, None)
    if log:
        terminalreporter.write_line(f"guest images were built in the background: {log}")


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


def guest_missing() -> str | None:
    if os.geteuid() != 0:
        return "the OpenZFS guest needs root (debootstrap, network namespaces)"
    for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "ssh", "ip", "nsenter"):
        if not shutil.which(tool):
            return f"{tool} is not installed (make deps)"
    return None


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    """The OpenZFS guest, booted once for the session (built first unless cached).

    A guest that cannot be built or booted is an error, not a skip: the test that needed
    it fails with the build log's or the console's last lines."""
    missing = guest_missing()
    if missing:
        pytest.skip(missing)
    vm = Guest(test_lab_name())
    with vm.held():
        try:
            vm.build()
            vm.up()
        except GuestError as exc:
            vm.down()
            pytest.fail(str(exc), pytrace=False)
        try:
            yield vm
        finally:
            if not os.environ.get("ZETTABEE_KEEP_LAB"):
                vm.down()


@dataclass
class Side:
    """One end of the lab's pairs as a test reaches it: the host as pair files name it,
    its pool, and shell commands run there (locally, or over SSH)."""

    address: str
    pool: str
    mountpoint: str
    argv: Callable[[str], list[str]]  # the argv that runs a shell command line there
    local_files: bool
    gone: Callable[[], str] | None = None  # why the host cannot answer, when it has gone

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(script), capture_output=True, text=True)
        if check and proc.returncode != 0:
            why = self.gone() if self.gone is not None and proc.returncode == 255 else ""
            raise AssertionError(
                f"{script}: exit {proc.returncode}: {proc.stderr.strip()}"
                + (f"\n{why}" if why else "")
            )
        return proc

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sh(shlex.join(argv), check=check)

    def snapshots(self, fs: str) -> list[str]:
        out = self.run("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", fs).stdout
        return [n.split("@", 1)[1] for n in out.split() if n.startswith(f"{fs}@")]

    def zget(self, target: str, prop: str) -> str:
        return self.run("zfs", "get", "-Hp", "-o", "value", prop, target).stdout.strip()

    def write_random(self, path: PurePosixPath, mb: int) -> None:
        if self.local_files:
            write_random(Path(path), mb)
        else:
            self.sh(f"mkdir -p {shlex.quote(str(path.parent))} && "
                    f"head -c {mb << 20} /dev/urandom >{shlex.quote(str(path))}")  # fmt: skip

    def write_text(self, path: PurePosixPath, text: str) -> None:
        if self.local_files:
            Path(path).write_text(text)
        else:
            self.sh(f"printf %s {shlex.quote(text)} >{shlex.quote(str(path))}")

    def checksums(self, top: PurePosixPath) -> dict[str, str]:
        """SHA-256 of every regular file below ``top``, by relative path."""
        if self.local_files:
            return ZfsLab.checksum_tree(Path(top))
        out = self.sh(
            f"cd {shlex.quote(str(top))} && find . -type f -exec sha256sum {{}} +", check=False
        ).stdout
        sums = {}
        for line in out.splitlines():
            digest, _, name = line.partition("  ")
            sums[name.removeprefix("./")] = digest
        return sums


@dataclass
class Backend:
    """A lab back end as the tests see it: a source and a destination side, the SSH
    host of the source, and pair options the back end needs."""

    name: str
    src_host: SourceHost
    src: Side
    dst: Side
    mbuffer_options: str = ""


def _local_argv(script: str) -> list[str]:
    return ["sh", "-c", script]


def zfs_fuse_backend(zlab: ZfsLab) -> Backend:
    """The source host is reached over SSH by zettabee; the tests look at both pools
    here, where the one zfs-fuse daemon serves them all (a destroy through the source
    host's sshd would unmount in its mount namespace only and leave the dataset busy)."""
    src = zlab.source
    return Backend(
        name="zfs-fuse",
        src_host=src,
        src=Side(src.address, src.pool, src.mountpoint, _local_argv, local_files=True),
        dst=Side(
            zlab.dest_address,
            zlab.dst_pool,
            str(zlab.dst_mountpoint),
            _local_argv,
            local_files=True,
        ),  # fmt: skip
    )


def openzfs_backend(vm: Guest) -> Backend:
    """Both pools in the guest: every pair has two remote ends on one host."""
    src, dst = vm.source, vm.dest
    return Backend(
        name="openzfs",
        src_host=src,
        src=Side(src.address, src.pool, src.mountpoint, src.ssh_argv, False, vm.gone),
        dst=Side(dst.address, dst.pool, dst.mountpoint, dst.ssh_argv, False, vm.gone),
        # Only the guest's SSH port is reachable from here: its mbuffers meet on its loopback.
        mbuffer_options="mbufferhost=127.0.0.1",
    )


class Zb:
    """One test's pairs, settings and state, on one back end; runs the real executables."""

    def __init__(self, backend: Backend, tmp: Path, name: str) -> None:
        self.backend = backend
        self.tmp = tmp
        self.name = name
        self.src = backend.src_host
        self.srcside = backend.src
        self.dstside = backend.dst
        self.settings = tmp / "zettabee.ini"
        self.pairfile = tmp / "pairs.cfg"
        self.extra_settings = ""
        self.write_settings()

    # datasets -------------------------------------------------------------------------
    def src_fs(self, leaf: str = "data") -> str:
        return f"{self.srcside.pool}/{self.name}-{leaf}"

    def dst_fs(self, leaf: str = "data") -> str:
        return f"{self.dstside.pool}/{self.name}-{leaf}"

    def src_dir(self, leaf: str = "data") -> Path:
        return Path(self.srcside.mountpoint) / f"{self.name}-{leaf}"

    def dst_dir(self, leaf: str = "data") -> Path:
        return Path(self.dstside.mountpoint) / f"{self.name}-{leaf}"

    def make_source(self, leaf: str = "data", mb: int = 4) -> str:
        fs = self.src_fs(leaf)
        self.src.run("zfs", "create", fs)
        if mb:
            self.srcside.write_random(self.src_dir(leaf) / "random.bin", mb)
        return fs

    # configuration --------------------------------------------------------------------
    def write_settings(self, extra: str | None = None) -> None:
        if extra is not None:
            self.extra_settings = extra
        self.settings.write_text(
            f"[paths]\npairs = {self.pairfile}\nstate_dir = {self.tmp}/state\n"
            f"log_dir = {self.tmp}/log\nlock_dir = {self.tmp}/run\n"
            f"spool_dir = {self.tmp}/spool\nknown_hosts = {self.src.known_hosts}\n\n"
            f"[defaults]\nsshkey = {self.src.key}\n" + self.extra_settings
        )

    def pair_line(self, leaf: str = "data", options: str = "") -> str:
        line = f"{self.srcside.address}:{self.src_fs(leaf)}  {self.dstside.address}:{self.dst_fs(leaf)}"
        return f"{line}  {options}" if options else line

    def mbuffer(self, options: str = "") -> str:
        """Pair options for the mbuffer transport on this back end."""
        return ",".join(
            o for o in ("transport=mbuffer", self.backend.mbuffer_options, options) if o
        )

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
        src = self.srcside.checksums(self.src_dir(leaf))
        dst = self.dstside.checksums(self.dst_dir(leaf))
        assert src, "the source tree is empty: nothing was compared"
        assert dst == src

    def cleanup(self) -> None:
        for side in (self.dstside, self.srcside):
            prefix = f"{side.pool}/{self.name}-"
            names = side.run("zfs", "list", "-H", "-o", "name", "-r", side.pool).stdout.split()
            for name in names:
                if name.startswith(prefix) and name.count("/") == 1:
                    destroy(name, side)


def settle() -> None:
    """zfs-fuse sits behind FUSE's page cache: flush what the test wrote before a snapshot
    sees the file system, and drop cached pages of files a receive changed underneath."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def destroy(fs: str, side: Side | None = None) -> None:
    """zfs-fuse answers 'dataset is busy' for a moment after a mount change: retry. A
    snapshot held by a pair is busy for good: its hold is released first."""
    import time

    from lab.hosts import release_foreign_mounts

    release_holds(fs, side)
    said = ""
    for attempt in range(30):
        if side is not None:
            proc = side.run("zfs", "destroy", "-r", fs, check=False)
        else:
            proc = subprocess.run(["zfs", "destroy", "-r", fs], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        said = proc.stderr.strip()
        if attempt == 10 and (side is None or side.local_files):
            # a private mount namespace made meanwhile (another lab's sshd) may hold a copy
            mountpoint = subprocess.run(
                ["zfs", "get", "-H", "-o", "value", "mountpoint", fs],
                capture_output=True,
                text=True,
            ).stdout.strip()
            if mountpoint.startswith("/"):
                release_foreign_mounts(Path(mountpoint))
        time.sleep(0.2)
    raise RuntimeError(f"cannot destroy {fs}: {said}")


def release_holds(fs: str, side: Side | None = None) -> None:
    """Release the pairs' holds (tag ``zettabee.<fingerprint>``, read from the snapshot
    name: zfs-fuse cannot list holds) on every snapshot below ``fs``."""

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        if side is not None:
            return side.run(*argv, check=False)
        return subprocess.run(argv, capture_output=True, text=True)

    out = run("zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", fs).stdout
    for line in out.splitlines():
        name, _, refs = line.partition("\t")
        snap = name.partition("@")[2]
        if refs.isdigit() and int(refs) > 0 and snap.startswith("zettabee."):
            run("zfs", "release", ".".join(snap.split(".")[:2]), name)


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


def _zb(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Zb]:
    import hashlib

    words = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:28]
    name = f"{words}-{hashlib.md5(request.node.nodeid.encode()).hexdigest()[:6]}"
    env = Zb(backend, tmp_path, name)
    env.cleanup()
    try:
        yield env
    finally:
        env.cleanup()


@pytest.fixture
def zb(lab: ZfsLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Zb]:
    """A test's environment on the zfs-fuse lab."""
    yield from _zb(zfs_fuse_backend(lab), tmp_path, request)


def backend_zb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Zb]:
    """A test's environment on the back end ``request.param`` names; a module that runs
    on every back end overrides ``zb`` with a fixture parametrised over BACKENDS that
    yields from this."""
    if request.param == "openzfs":
        backend = openzfs_backend(request.getfixturevalue("guest"))
    else:
        backend = zfs_fuse_backend(request.getfixturevalue("lab"))
    yield from _zb(backend, tmp_path, request)


class _Daemon(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def cleanup(self) -> None: ...


@contextlib.contextmanager
def running_daemon(daemon: _Daemon) -> Iterator[_Daemon]:
    """A lab monitoring daemon for the length of a test: skipped (and the run then fails,
    see the suite's end) only where its Debian package is missing."""
    try:
        daemon.start()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield daemon
    finally:
        daemon.stop()
        daemon.cleanup()
