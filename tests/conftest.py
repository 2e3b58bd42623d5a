"""Shared fixtures: the real lab back ends, and a per-test zettabee environment.

The back ends of the main topology (zettabee on the backup host, the destination pool
local to it, the source a remote host reached over SSH):

- ``zfs-fuse``: the two-host lab (``lab``), a source host in a network namespace reached
  over SSH, the destination and zettabee on this machine;
- ``openzfs-2.1`` and ``openzfs-2.3``: the QEMU guests (``guest``, ``guest_23``) with
  zettabee installed from its Debian package in the guest, the destination pool local
  there, and the source host a network namespace inside the guest with its own sshd
  (``lab.guest``); pytest's temporary directory is shared into the guest at the same
  path, so the test's pair file, settings and state are the same files on both sides.

And one more: ``openzfs``, the 2.1 guest driven from this machine, source and
destination pools both in the guest, so that every pair there has two remote ends.

A test module runs on the main topology's back ends by asking for ``zb`` through
:func:`backend_zb` over BACKENDS (see ``test_replication.py``).

When CI=true, an integration test that skips (no root, no zfs-fuse, no sshd, no daemon,
no guest) fails the run: a CI that skipped the real parts has proven nothing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.guest import BACKUP_ADDRESS, Guest, GuestError  # noqa: E402
from lab.hosts import SourceHost  # noqa: E402
from lab.zfslab import ZfsLab, test_lab_name  # noqa: E402

BACKENDS = ("zfs-fuse", "openzfs-2.1", "openzfs-2.3")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(trylast=True)  # after -k and -m: a guest no test selected is not started
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The zfs-fuse tests first, then those on the OpenZFS 2.1 guest, then on 2.3 (file
    order kept within each); the guests the session needs are made ready in the
    background meanwhile (:class:`GuestPreparation`), each once.

    A test marked ``one_openzfs`` checks what does not change from one OpenZFS version
    to the next (messages, exit codes, status columns, the monitoring side), or what a
    fault row proves on every version: it runs on zfs-fuse and 2.1, not again on 2.3.
    One marked ``zfs_independent`` checks what no ZFS below changes (the command line's
    messages, exit codes and status columns, host keys, the monitoring side): it runs on
    zfs-fuse alone, as zettabee's own code is the same installed anywhere."""
    once = [
        item for item in items
        if (guest_rank(item) == 2 and item.get_closest_marker("one_openzfs"))
        or (guest_rank(item) and item.get_closest_marker("zfs_independent"))
    ]  # fmt: skip
    if once:
        config.hook.pytest_deselected(items=once)
        items[:] = [item for item in items if item not in once]
    items.sort(key=guest_rank)
    versions = [zfs for rank, zfs in ((1, "2.1"), (2, "2.3")) if rank in map(guest_rank, items)]
    if versions and not config.option.collectonly and guest_missing() is None:
        basetemp = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        PREPARATION.append(GuestPreparation(basetemp, versions))


def pytest_sessionfinish() -> None:
    for preparation in PREPARATION:
        preparation.close()


def guest_rank(item: pytest.Item) -> int:
    """0: no guest; 1: the OpenZFS 2.1 guest; 2: the 2.3 one (a back end named by any of
    the test's parameters, ``zb`` or a module's own guest fixture, or a guest fixture).
    A unit test is never on a guest, whatever its parameters are called."""
    if "integration" not in item.path.parts:
        return 0
    callspec = getattr(item, "callspec", None)
    params = {str(v) for v in callspec.params.values()} if callspec is not None else set()
    fixtures = getattr(item, "fixturenames", ())
    if "openzfs-2.3" in params or "guest_23" in fixtures:
        return 2
    if params & {"openzfs", "openzfs-2.1"} or "guest" in fixtures:
        return 1
    return 0


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


def guest_missing() -> str | None:
    if os.geteuid() != 0:
        return "the OpenZFS guest needs root (debootstrap, network namespaces)"
    for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "ssh", "ip", "nsenter"):
        if not shutil.which(tool):
            return f"{tool} is not installed (make deps)"
    return None


@pytest.fixture(scope="session")
def zettabee_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Debian package built from this tree (``make deb`` in a copy of it, without the
    unit tests its build would run: make test runs those)."""
    top = tmp_path_factory.mktemp("deb")
    return build_package(top)


def build_package(top: Path) -> Path:
    """``make deb`` in a copy of the tree under ``top``; the package's path."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    tree = top / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    for name in filter(None, listing.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    proc = subprocess.run(
        ["make", "deb"], cwd=tree, env={**os.environ, "DEB_BUILD_OPTIONS": "nocheck"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise GuestError(f"make deb failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    [deb] = (tree / "dist").glob("*.deb")
    return deb


class GuestPreparation:
    """The guests a session needs, made ready one after the other in a thread of their
    own while the zfs-fuse tests run (the image built or waited for, the package built
    from this tree, the guest booted with the share, the source host up, the package
    installed): their boots and installs cost the session no time of its own."""

    def __init__(self, basetemp: Path, versions: list[str]) -> None:
        self.basetemp = basetemp
        self.stacks: dict[str, contextlib.ExitStack] = {}
        self.guests: dict[str, Guest] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="guest")
        deb = self.executor.submit(build_package, basetemp / "deb")
        self.futures = {zfs: self.executor.submit(self._prepare, zfs, deb) for zfs in versions}

    def _prepare(self, zfs: str, deb: concurrent.futures.Future[Path]) -> Guest:
        vm = Guest(test_lab_name(), zfs=zfs, share=self.basetemp)
        self.guests[zfs] = vm
        stack = self.stacks[zfs] = contextlib.ExitStack()
        stack.enter_context(vm.held())
        vm.build()
        vm.up()
        vm.start_source_host()
        vm.install_package(deb.result())
        return vm

    def ready(self, zfs: str) -> Guest:
        """The guest, once ready; an error (GuestError, a failed package build) raised."""
        return self.futures[zfs].result()

    def release(self, zfs: str) -> None:
        vm = self.guests.pop(zfs, None)
        if vm is not None and not os.environ.get("ZETTABEE_KEEP_LAB"):
            vm.down()
        stack = self.stacks.pop(zfs, None)
        if stack is not None:
            stack.close()

    def close(self) -> None:
        """At the session's end: nothing left preparing, nothing left running."""
        for future in self.futures.values():
            future.cancel()
        self.executor.shutdown(wait=True)
        for zfs in list(self.guests):
            self.release(zfs)


PREPARATION: list[GuestPreparation] = []


def booted_guest(
    zfs: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Guest]:
    """An OpenZFS guest, booted once for the session (built first unless cached), in the
    main topology: pytest's temporary directory shared in, the source host's namespace
    and sshd up, zettabee's package installed.

    A guest that cannot be built or booted is an error, not a skip: the test that needed
    it fails with the build log's or the console's last lines."""
    missing = guest_missing()
    if missing:
        pytest.skip(missing)
    preparation = next((p for p in PREPARATION if zfs in p.futures), None)
    if preparation is not None:
        try:
            ready = preparation.ready(zfs)
        except GuestError as exc:
            preparation.release(zfs)
            pytest.fail(str(exc), pytrace=False)
        try:
            yield ready
        finally:
            preparation.release(zfs)
        return
    vm = Guest(test_lab_name(), zfs=zfs, share=tmp_path_factory.getbasetemp())
    with vm.held():
        try:
            vm.build()
            deb = request.getfixturevalue("zettabee_deb")
            vm.up()
            vm.start_source_host()
            vm.install_package(deb)
        except GuestError as exc:
            vm.down()
            pytest.fail(str(exc), pytrace=False)
        try:
            yield vm
        finally:
            if not os.environ.get("ZETTABEE_KEEP_LAB"):
                vm.down()


@pytest.fixture(scope="session")
def guest(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Guest]:
    """The OpenZFS 2.1 guest (Debian 12)."""
    yield from booted_guest("2.1", tmp_path_factory, request)


@pytest.fixture(scope="session")
def guest_23(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Guest]:
    """The OpenZFS 2.3 guest (Debian 13)."""
    yield from booted_guest("2.3", tmp_path_factory, request)


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
    host: Guest | None = None  # where zettabee runs, when not on this machine

    @property
    def modern(self) -> bool:
        """OpenZFS: holds, bookmarks, resumable receives, size estimates, raw sends."""
        return self.name.startswith("openzfs")


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


def main_topology_backend(vm: Guest) -> Backend:
    """zettabee in the guest, the destination pool local to it, the source host in the
    guest's namespace ``zbsrc`` (the tests reach both pools through the guest's SSH)."""
    src, dst = vm.netns_source, vm.dest
    return Backend(
        name=f"openzfs-{vm.zfs}",
        src_host=src,
        src=Side(src.address, src.pool, src.mountpoint, vm.source.ssh_argv, False, vm.gone),
        dst=Side(BACKUP_ADDRESS, dst.pool, dst.mountpoint, dst.ssh_argv, False, vm.gone),
        host=vm,
    )


# Where the Debian package puts each program (the guest runs the installed ones).
INSTALLED = {
    "zettabee": "/usr/sbin/zettabee",
    "replicate": "/usr/sbin/replicate",
    "zettabee-source": "/usr/bin/zettabee-source",
    "check_zettabee_lag": "/usr/lib/nagios/plugins/check_zettabee_lag",
    "check_zettabee_runtime": "/usr/lib/nagios/plugins/check_zettabee_runtime",
}


class Zb:
    """One test's pairs, settings and state, on one back end; runs the real executables
    where the back end runs zettabee (here, or in the guest)."""

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
        self.pidfiles: dict[int, Path] = {}  # ssh's pid -> where the program's pid is
        self.pidfile: Path | None = None  # that of the last argv made
        self.counter = itertools.count(1)
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
        return subprocess.run(
            self.argv(name, *args), capture_output=True, text=True, env=self.env(),
            timeout=timeout,
        )  # fmt: skip

    def popen(self, name: str, *args: str) -> subprocess.Popen[str]:
        settle()
        proc = subprocess.Popen(
            self.argv(name, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
        )
        self.started(proc)
        return proc

    def started(self, proc: subprocess.Popen[str]) -> None:
        """Remember where the program of the last :meth:`argv`, which ``proc`` runs,
        writes its pid."""
        if self.pidfile is not None:
            self.pidfiles[proc.pid] = self.pidfile

    def argv(self, name: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
        """The argv that starts program ``name`` where the back end runs zettabee: here,
        or in the guest over SSH, the installed program with the test's settings (and
        ``env``), its pid written to a file of the shared directory (see :meth:`pid`)."""
        if self.backend.host is None:
            return [*executable(name), *args]
        pidfile = self.tmp / ".pids" / str(next(self.counter))
        pidfile.parent.mkdir(exist_ok=True)
        self.pidfile = pidfile
        assigned = {"ZETTABEE_SETTINGS": str(self.settings), **(env or {})}
        script = (
            f"echo $$ >{shlex.quote(str(pidfile))}; exec env "
            + " ".join(f"{k}={shlex.quote(v)}" for k, v in assigned.items())
            + " "
            + shlex.join([INSTALLED.get(name, name), *args])
        )
        return self.backend.host.source.ssh_argv(script)

    def plugin(
        self, name: str, *args: str, faketime: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A check plugin as Icinga runs it: its own argv with ``--settings``, no shell, a
        bare environment; the installed one on the back end's backup host."""
        path = "/usr/sbin:/usr/bin:/sbin:/bin"
        if self.backend.host is None:
            env = {"PATH": f"{Path(sys.executable).parent}:{path}", "PYTHONPATH": str(REPO),
                   "LC_NUMERIC": "C"}  # fmt: skip
            argv = [str(REPO / "plugins" / name), "--settings", str(self.settings), *args]
            if faketime:
                argv = ["faketime", "-f", faketime, *argv]
        else:
            assert faketime is None, "the guests have no libfaketime: step the guest's clock"
            env = dict(os.environ)
            plugin = [INSTALLED[name], "--settings", str(self.settings), *args]
            script = f"exec env -i PATH={path} LC_NUMERIC=C {shlex.join(plugin)}"
            argv = self.backend.host.source.ssh_argv(script)
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)

    def moments(self) -> tuple[str, str]:
        """Regular expressions for a lag or a run time of a few seconds, as the plugins
        print it (H:MM:SS) and in perfdata (seconds): an emulated guest takes a minute or
        two where this machine takes seconds."""
        if self.backend.host is None:
            return r"0:00:0\d", r"\d"
        return r"0:0\d:\d\d", r"\d+"

    def pid(self, proc: subprocess.Popen[str]) -> int:
        """The pid of the program ``proc`` started, on the host where it runs."""
        if self.backend.host is None:
            return proc.pid
        import time

        pidfile = self.pidfiles[proc.pid]

        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, f"{proc.args}: no pid after 30 s"
            time.sleep(0.05)
        return int(pidfile.read_text())

    def wait_for_transfer(self, fingerprint: str, what: str = "the transfer") -> None:
        """Until the pair's progress file counts bytes received (at most a minute)."""
        progress = self.tmp / "state" / f"{fingerprint}.progress"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if progress.exists() and json.loads(progress.read_text() or "{}").get("bytes", 0) > 0:
                return
            time.sleep(0.1)
        pytest.fail(f"{what} never started")

    def kill(self, proc: subprocess.Popen[str], sig: int) -> None:
        """Send ``sig`` to the program ``proc`` started (not to the ssh that carries it)."""
        if self.backend.host is None:
            os.kill(proc.pid, sig)
        else:
            self.backend.host.run("kill", f"-{int(sig)}", str(self.pid(proc)))

    def fingerprint(self, leaf: str = "data") -> str:
        out = self.run("fingerprint", self.dst_fs(leaf))
        assert out.returncode == 0, out.stderr
        return out.stdout.split()[-1]

    def replica_id(self) -> str:
        """The replica id of the destination pool (:func:`zettabee.pair.replica_id` of its
        guid, as ``zpool get`` prints it: zfs-fuse's has no ``-H``)."""
        from zettabee.pair import replica_id

        table = self.dstside.run("zpool", "get", "guid", self.dstside.pool).stdout.splitlines()
        return replica_id(table[-1].split()[2])

    def initialize_then_update(self) -> None:
        """The pair into :meth:`dst_fs`: ``initialize``, then an ``update`` after 2 MB
        more on the source; each exits 0 with the data identical on both sides."""
        out = self.run("initialize", self.dst_fs())
        assert out.returncode == 0, out.stderr
        self.assert_same_data()
        self.srcside.write_random(self.src_dir() / "more.bin", 2)
        out = self.run("update", self.dst_fs())
        assert out.returncode == 0, out.stderr
        self.assert_same_data()

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
    """Release the pairs' holds (the tag the snapshot's name gives, ``zettabee.<fp>.<rid>``
    or ``zettabee.<fp>``: zfs-fuse cannot list holds) on every snapshot below ``fs``."""
    from zettabee.pair import tag_of

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        if side is not None:
            return side.run(*argv, check=False)
        return subprocess.run(argv, capture_output=True, text=True)

    out = run("zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", fs).stdout
    for line in out.splitlines():
        name, _, refs = line.partition("\t")
        tag = tag_of(name.partition("@")[2])
        if refs.isdigit() and int(refs) > 0 and tag is not None:
            run("zfs", "release", tag, name)


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
    """A test's environment on the back end ``request.param`` names (zfs-fuse when the
    test is not parametrised); a module that runs on every back end overrides ``zb`` with
    a fixture parametrised over BACKENDS that yields from this."""
    name = getattr(request, "param", "zfs-fuse")
    if name == "openzfs":
        backend = openzfs_backend(request.getfixturevalue("guest"))
    elif name == "openzfs-2.1":
        backend = main_topology_backend(request.getfixturevalue("guest"))
    elif name == "openzfs-2.3":
        backend = main_topology_backend(request.getfixturevalue("guest_23"))
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
