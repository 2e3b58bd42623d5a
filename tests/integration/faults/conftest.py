"""Fault injection on the real lab, and the report table every fault adds a row to.

Faults are forced from outside zettabee, as they happen to users: processes killed, the
link cut or throttled, packets dropped, the pool filled, state files and snapshots
changed behind its back, a command held at a gate until the test kills the run. Each
fault records what was expected and what was observed (exit status, the Nagios states of
check_zettabee_lag and check_zettabee_runtime, the message), and whether the
destination's last good snapshot is intact: it still exists with its guid, and a clone of
it holds exactly the files (SHA-256) it held when it was received.

The table is printed at the end of the pytest run (``make fault-test``, ``make test``).

The core rows run on every back end of the main topology (``every_backend``): on
zfs-fuse here, and on OpenZFS 2.1 and 2.3, where zettabee, the plugins and the faults'
tools (tc, ip link, the gates) act inside the guest; a row off zfs-fuse names its back
end. The other rows use what only the zfs-fuse lab has (a second sshd, strace,
libfaketime, nftables).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.guest import SOURCE_NETNS, Guest
from lab.hosts import LabRecord, SecondZfsServer, sh, start_sshd, stop_pid
from lab.zfslab import ZfsLab
from tests.conftest import (
    BACKENDS,
    Backend,
    Side,
    Zb,
    backend_zb,
    destroy,
    executable,
    settle,
)

STATES = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
INTACT = "intact"

# A fault row that proves something on every back end: zfs-fuse, OpenZFS 2.1 and 2.3.
every_backend = pytest.mark.parametrize("zb", BACKENDS, indirect=True)


# -- the report -------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    expected: str
    observed: str = "not reached (the test failed before)"
    data: str = "not checked"


ROWS: list[Row] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    terminalreporter.section("faults: expected, observed, data")
    for line in table(ROWS):
        terminalreporter.write_line(line)
    damaged = [row for row in ROWS if row.data != INTACT]
    verdict = (
        f"{len(ROWS)} faults, every replica intact"
        if not damaged
        else f"{len(ROWS)} faults, {len(damaged)} NOT intact"
    )
    terminalreporter.write_line(verdict, bold=True, red=bool(damaged), green=not damaged)


def table(rows: list[Row]) -> list[str]:
    widths = (34, 44, 62, 9)
    head = ("fault", "expected", "observed", "data")
    lines = [_cells(head, widths), "-+-".join("-" * w for w in widths)]
    for row in rows:
        lines += _cells((row.fault, row.expected, row.observed, row.data), widths).split("\n")
    return lines


def _cells(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    wrapped = [textwrap.wrap(c, w) or [""] for c, w in zip(cells, widths, strict=True)]
    height = max(len(w) for w in wrapped)
    out = []
    for i in range(height):
        parts = [
            (w[i] if i < len(w) else "").ljust(n) for w, n in zip(wrapped, widths, strict=True)
        ]
        out.append(" | ".join(parts).rstrip())
    return "\n".join(out)


# -- processes --------------------------------------------------------------------------


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree = children_of()
    found, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def in_netns(netns: str) -> list[int]:
    want = os.stat(f"/run/netns/{netns}").st_ino
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(proc / "ns" / "net").st_ino == want:
                    pids.append(int(proc.name))
    return pids


def alive(pid: int) -> bool:
    from zettabee.state import pid_alive

    return pid_alive(pid)


def kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_until(what: str, ready: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# -- a replica and its last good snapshot -----------------------------------------------


def zget(target: str, prop: str) -> str:
    return sh("zfs", "get", "-Hp", "-o", "value", prop, target, check=False).stdout.strip()


def snapshots(fs: str) -> list[str]:
    out = sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", fs, check=False).stdout
    return [n.split("@", 1)[1] for n in out.split() if n.startswith(f"{fs}@")]


@dataclass
class Replica:
    """One initialized pair and what its destination held after the last good run."""

    zb: Zb
    leaf: str
    snapshot: str = ""
    guid: str = ""
    sums: dict[str, str] = field(default_factory=dict)
    dest: str = ""  # another destination file system than the lab pool's

    @property
    def fs(self) -> str:
        return self.dest or self.zb.dst_fs(self.leaf)

    @property
    def dest_dir(self) -> Path:
        return Path(self.zb.dstside.zget(self.fs, "mountpoint"))

    @property
    def source_dir(self) -> Path:
        return self.zb.src_dir(self.leaf)

    @property
    def fingerprint(self) -> str:
        return self.zb.fingerprint(self.leaf)

    def remember(self) -> None:
        """The destination as it is now is the good state faults must not damage."""
        self.same_as_source()
        dst = self.zb.dstside
        self.snapshot = dst.zget(self.fs, "zettabee:lastsnap")
        assert self.snapshot in dst.snapshots(self.fs)
        self.guid = dst.zget(f"{self.fs}@{self.snapshot}", "guid")
        self.sums = dst.checksums(self.dest_dir)
        assert self.sums

    def same_as_source(self) -> None:
        settle()
        source = self.zb.srcside.checksums(self.source_dir)
        assert source, "the source tree is empty: nothing was compared"
        assert self.zb.dstside.checksums(self.dest_dir) == source

    def grow(self, mb: int, name: str = "more.bin") -> None:
        self.zb.srcside.write_random(self.source_dir / name, mb)

    def source_holds(self) -> dict[str, int]:
        """The source's snapshots of the pair and the holds on each."""
        fs = self.zb.src_fs(self.leaf)
        argv = ("zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", fs)
        rows = [line.split("\t") for line in self.zb.srcside.run(*argv).stdout.splitlines()]
        return {name.partition("@")[2]: int(refs) for name, refs in rows if f"{fs}@" in name}

    def intact(self, snapshot_destroyed: bool = False) -> str:
        """``intact``, or what is wrong with the last good state.

        The last good snapshot must still exist with its guid, and a clone of it must hold
        the same files. When the fault itself destroyed that snapshot, the destination file
        system (read-only, never rolled back without consent) must still hold them."""
        settle()
        dst = self.zb.dstside
        live = dst.checksums(self.dest_dir)
        if snapshot_destroyed:
            return INTACT if live == self.sums else "file system CHANGED"
        if self.snapshot not in dst.snapshots(self.fs):
            return f"snapshot {self.snapshot} GONE"
        if dst.zget(f"{self.fs}@{self.snapshot}", "guid") != self.guid:
            return "snapshot guid CHANGED"
        # beside the pool's root: a replica's parent may be a read-only replica itself
        clone = f"{self.fs.partition('/')[0]}/verify-{self.fs.replace('/', '-')}"
        made = dst.run("zfs", "clone", f"{self.fs}@{self.snapshot}", clone, check=False)
        if made.returncode != 0 and "out of space" in made.stderr:
            # OpenZFS keeps a full pool's last bytes from a new clone: read the snapshot
            # where OpenZFS shows it, below the file system's .zfs directory
            held = dst.checksums(self.dest_dir / ".zfs" / "snapshot" / self.snapshot)
            return INTACT if held and held == self.sums else "snapshot content CHANGED"
        assert made.returncode == 0, made.stderr
        try:
            mount = Path(dst.zget(clone, "mountpoint"))
            settle()
            held = dst.checksums(mount)
        finally:
            destroy(clone, dst)
        return INTACT if held == self.sums else "snapshot content CHANGED"


def destroy_past_the_hold(side: Side, snapshot: str, tag: str) -> None:
    """Destroy a snapshot the pair holds, as a determined operator would: the hold makes
    a plain destroy fail (ZFS says the dataset is busy), so the tag is released first."""
    refused = side.run("zfs", "destroy", snapshot, check=False)
    refusal = re.search(r"busy|see holders", refused.stderr)  # 2.3 names the holds
    assert refused.returncode != 0 and refusal, (snapshot, refused.stderr)
    side.run("zfs", "release", tag, snapshot)
    side.run("zfs", "destroy", snapshot)


# -- running zettabee and the plugins ---------------------------------------------------


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


class Faults:
    """A test's pairs on the lab, with the means to break things and the report row."""

    def __init__(self, zb: Zb, lab: ZfsLab | None, tmp: Path) -> None:
        self.zb = zb
        self._lab = lab
        self.tmp = tmp
        self.row: Row | None = None
        self.gates: list[Gate] = []

    @property
    def lab(self) -> ZfsLab:
        assert self._lab is not None, "this fault needs the zfs-fuse lab"
        return self._lab

    @property
    def guest(self) -> Guest | None:
        """The guest whose backup host runs zettabee, or None (zfs-fuse, here)."""
        return self.zb.backend.host

    def gate(self, name: str, pattern: str) -> Gate:
        """A gate (see :class:`Gate`) that the test's end opens if the test did not."""
        gate = Gate(self.tmp / name, pattern)
        self.gates.append(gate)
        return gate

    # running ------------------------------------------------------------------------
    def env(self, path_first: Path | None = None) -> dict[str, str]:
        env = self.zb.env()
        if path_first is not None:
            env["PATH"] = f"{path_first}:{env['PATH']}"
        return env

    def killed_before_the_record(self, *args: str) -> None:
        """``zettabee ARGS`` SIGKILLed once its receive is done, as it records the pair's
        snapshot on the destination (held there by a gate on ``zettabee:lastsnap=``)."""
        gate = self.gate("dest-gate", "zettabee:lastsnap=")
        gate.arm()
        run = self.popen("zettabee", *args, path_first=gate.dir)
        gate.wait(run)
        kill([run.pid])
        run.wait()
        gate.abort()

    def popen(
        self,
        name: str,
        *args: str,
        path_first: Path | None = None,
        umask: int | None = None,
        strace: Path | None = None,
    ) -> subprocess.Popen[str]:
        """Start a zettabee program; ``path_first`` heads its PATH (a gate), ``umask`` is
        its umask, and ``strace`` appends every execve of it and its children to a file."""
        settle()
        if self.guest is not None:
            assert umask is None and strace is None, "not in the guest"
            path = {"PATH": f"{path_first}:/usr/sbin:/usr/bin:/sbin:/bin"} if path_first else {}
            proc = subprocess.Popen(
                self.zb.argv(name, *args, env=path),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.zb.env(),
            )  # fmt: skip
            self.zb.started(proc)
            return proc
        argv = [*executable(name), *args]
        if strace is not None:
            trace = ["strace", "-f", "-qq", "-v", "-s", "65536", "-e", "trace=execve"]
            argv = [*trace, "-A", "-o", str(strace), *argv]
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(path_first),
            preexec_fn=None if umask is None else lambda: os.umask(umask) and None,
        )

    def run(
        self,
        name: str,
        *args: str,
        path_first: Path | None = None,
        umask: int | None = None,
        strace: Path | None = None,
        timeout: float = 300,
    ) -> Outcome:
        proc = self.popen(name, *args, path_first=path_first, umask=umask, strace=strace)
        return self.finish(proc, timeout)

    def run_faketime(self, offset: str, name: str, *args: str) -> Outcome:
        """A command under a clock stepped by ``offset`` (libfaketime, this process only)."""
        settle()
        proc = subprocess.run(
            ["faketime", "-f", offset, *executable(name), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=300,
        )
        return Outcome(proc.returncode, proc.stdout, proc.stderr)

    def finish(self, proc: subprocess.Popen[str], timeout: float = 300) -> Outcome:
        out, err = proc.communicate(timeout=timeout)
        return Outcome(proc.returncode, out, err)

    def kill(self, run: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
        """``sig`` (SIGKILL) to the program ``run`` started, where it runs."""
        self.zb.kill(run, sig)

    def pid(self, run: subprocess.Popen[str]) -> int:
        return self.zb.pid(run)

    def helpers(self, run: subprocess.Popen[str]) -> dict[int, str]:
        """The processes the program ``run`` started (pid -> its command line), where it
        runs."""
        if self.guest is None:
            return {pid: " ".join(cmdline(pid)) for pid in descendants(run.pid)}
        table = self.guest.run("ps", "-eo", "pid=,ppid=,args=").stdout
        rows = [line.split(None, 2) for line in table.splitlines() if line.strip()]
        tree: dict[int, list[int]] = {}
        args = {}
        for pid, ppid, *rest in rows:
            tree.setdefault(int(ppid), []).append(int(pid))
            args[int(pid)] = rest[0] if rest else ""
        found, todo = {}, [self.pid(run)]
        while todo:
            for child in tree.get(todo.pop(), []):
                found[child] = args[child]
                todo.append(child)
        return found

    def alive(self, pids: dict[int, str]) -> list[int]:
        """Those of ``pids`` that still run, where the programs run."""
        if self.guest is None:
            return [pid for pid in pids if alive(pid)]
        listed = self.guest.run("ps", "-eo", "pid=").stdout.split()
        return [pid for pid in pids if str(pid) in listed]

    def plugin(self, name: str, fs: str, faketime: str | None = None) -> tuple[int, str]:
        """A check plugin as Icinga runs it: its own argv, no shell, a bare environment."""
        proc = self.zb.plugin(name, fs, faketime=faketime)
        assert proc.stderr == "", (
            f"{name} wrote to stderr, which Nagios does not show: {proc.stderr}"
        )
        return proc.returncode, proc.stdout.strip()

    def shown(self, text: str, replica: Replica, limit: int = 110) -> str:
        """A plugin's or command's words for the table: without the check name, the
        perfdata, the pair's name and the test's temporary path."""
        text = text.split(" | ")[0]
        text = re.sub(r"^ZETTABEE_\w+ \w+ - ", "", text)
        text = text.replace("zettabee: ", "").replace("replicate: ", "")
        text = text.replace(f"{self.zb.dstside.address}:", "")
        text = text.replace(f"{replica.fs}: ", "").replace(f"{replica.fs} ", "")
        text = text.replace(f" {replica.fs}", "").replace(str(self.zb.tmp), "...")
        return _short(_one_line(text), limit)

    def progress(self, replica: Replica) -> int:
        path = self.zb.tmp / "state" / f"{replica.fingerprint}.progress"
        with contextlib.suppress(OSError, ValueError):
            import json

            return int(json.loads(path.read_text()).get("bytes", 0))
        return 0

    def wait_for_stream(self, proc: subprocess.Popen[str], replica: Replica) -> None:
        """Until the stream has moved data; the run must still be going."""

        def moving() -> bool:
            assert proc.poll() is None, f"the run ended before the fault: {proc.communicate()}"
            return self.progress(replica) > 0

        wait_until("the stream to move data", moving)

    def update_broken_mid_stream(
        self, replica: Replica, break_it: Callable[[], object], says: str
    ) -> None:
        """An update whose stream ``break_it`` breaks once data moves ends as
        :meth:`failed`, saying ``says``."""
        run = self.popen("zettabee", "update", replica.fs)
        self.wait_for_stream(run, replica)
        break_it()
        self.failed(replica, self.finish(run), says)

    # pairs ----------------------------------------------------------------------------
    def replica(
        self, leaf: str = "data", mb: int = 2, options: str = "", dest: str = "", host: str = ""
    ) -> Replica:
        """An initialized pair (into ``dest`` instead of the lab's destination pool, on
        ``host`` instead of the lab's destination address: on zfs-fuse the one daemon
        serves every pool to every host)."""
        self.zb.make_source(leaf, mb)
        line = self.zb.pair_line(leaf, options)
        if dest:
            line = line.replace(f":{self.zb.dst_fs(leaf)}", f":{dest}")
        if host:
            before, _, after = line.rpartition(f"{self.zb.dstside.address}:")
            line = f"{before}{host}:{after}"
        self.zb.write_pairs(line)
        replica = Replica(self.zb, leaf, dest=dest)
        out = self.zb.run("initialize", replica.fs)
        assert out.returncode == 0, out.stderr
        replica.remember()
        return replica

    # the row --------------------------------------------------------------------------
    def expect(self, fault: str, expected: str) -> Row:
        if self.zb.backend.name != "zfs-fuse":
            fault = f"{fault} [{self.zb.backend.name}]"
        self.row = Row(fault, expected)
        ROWS.append(self.row)
        return self.row

    def check(
        self,
        replica: Replica,
        outcome: Outcome,
        *,
        code: int,
        lag: int,
        runtime: int,
        says: str,
        plugin_says: str | None = None,
        snapshot_destroyed: bool = False,
        updated: bool = False,
    ) -> None:
        """Assert the user's view of a fault, and fill the row with what was seen.

        ``says`` must match what the command printed (stderr); ``plugin_says`` (default:
        the same) what check_zettabee_runtime shows when the run failed."""
        assert self.row is not None, "expect() first"
        lag_code, lag_text = self.plugin("check_zettabee_lag", replica.fs)
        run_code, run_text = self.plugin("check_zettabee_runtime", replica.fs)
        self.row.observed = (
            f"exit {outcome.code}; lag {STATES[lag_code]}; runtime {STATES[run_code]}; "
            f"says: {self.shown(outcome.stderr, replica, 160)}"
        )
        if updated:  # the run succeeded: its new snapshot is the last good one now
            replica.remember()
        self.row.data = replica.intact(snapshot_destroyed)
        assert outcome.code == code, outcome.stderr
        assert re.search(says, outcome.stderr), (says, outcome.stderr)
        assert outcome.stdout == "", "errors go to stderr"
        assert lag_code == lag, lag_text
        assert run_code == runtime, run_text
        if runtime == 2 and (plugin_says or says):
            assert re.search(plugin_says or says, run_text), (plugin_says or says, run_text)
        assert self.row.data == INTACT

    def failed(
        self,
        replica: Replica,
        outcome: Outcome,
        says: str,
        *,
        lag: int = 0,
        snapshot_destroyed: bool = False,
    ) -> None:
        """What most faults must end in: exit 1 saying ``says``, check_zettabee_runtime
        CRITICAL with the same words, check_zettabee_lag ``lag`` (OK while the last good
        snapshot stays recorded) and the replica intact."""
        self.check(
            replica,
            outcome,
            code=1,
            lag=lag,
            runtime=2,
            says=says,
            snapshot_destroyed=snapshot_destroyed,
        )

    def update_fails(
        self, replica: Replica, says: str, *, lag: int = 0, snapshot_destroyed: bool = False
    ) -> None:
        """An update run under a fault that is already in place ends as :meth:`failed`."""
        outcome = self.run("zettabee", "update", replica.fs)
        self.failed(replica, outcome, says, lag=lag, snapshot_destroyed=snapshot_destroyed)

    def check_killed(self, replica: Replica, *, lag: int, runtime: int, says: str) -> None:
        """After a SIGKILL: what ``zettabee status`` and the plugins tell the user."""
        assert self.row is not None, "expect() first"
        status = self.run("zettabee", "status", replica.fs)
        lag_code, lag_text = self.plugin("check_zettabee_lag", replica.fs)
        run_code, run_text = self.plugin("check_zettabee_runtime", replica.fs)
        self.row.observed = (
            f"killed; status {status_word(status.stdout)}; lag {STATES[lag_code]}; "
            f"runtime {STATES[run_code]}: {self.shown(run_text, replica)}"
        )
        self.row.data = replica.intact()
        assert status.code == 0 and "Interrupted" in status.stdout, status
        assert lag_code == lag, lag_text
        assert run_code == runtime, run_text
        assert re.search(says, run_text), (says, run_text)
        assert self.row.data == INTACT

    def recovers(self, replica: Replica, *args: str, path_first: Path | None = None) -> None:
        """The next update, once the fault is gone, succeeds on its own and says nothing."""
        out = self.run("zettabee", "update", *args, replica.fs, path_first=path_first)
        assert (out.code, out.stdout) == (0, ""), out.stderr
        replica.same_as_source()
        lag_code, lag_text = self.plugin("check_zettabee_lag", replica.fs)
        run_code, run_text = self.plugin("check_zettabee_runtime", replica.fs)
        assert (lag_code, run_code) == (0, 0), (lag_text, run_text)
        replica.remember()
        if self.row is not None:
            self.row.observed += "; next update: exit 0, lag OK, runtime OK"

    # network faults -------------------------------------------------------------------
    @property
    def netns(self) -> str:
        return SOURCE_NETNS if self.guest is not None else self.lab.layout.netns

    def ns(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command in the source host's network namespace (in the guest on OpenZFS)."""
        inside = ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]
        if self.guest is not None:
            return self.guest.run(*inside, check=check)
        return sh(*inside, check=check)

    @property
    def source_link(self) -> str:
        return f"{SOURCE_NETNS}1" if self.guest is not None else self.lab.layout.veth[:-1] + "1"

    @contextlib.contextmanager
    def rate(self, rate: str) -> Iterator[Callable[[str], None]]:
        """Traffic from the source throttled by a token bucket (tc tbf); yields a function
        that changes the rate."""
        dev = self.source_link

        def change(new: str) -> None:
            self.ns("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", new,
                    "burst", "16kb", "latency", "2s")  # fmt: skip

        change(rate)
        try:
            yield change
        finally:
            self.ns("tc", "qdisc", "del", "dev", dev, "root", check=False)

    @contextlib.contextmanager
    def dropping(self) -> Iterator[Callable[[], None]]:
        """Yields a function that starts dropping every packet the source sends (nftables,
        in the source's namespace only)."""
        table = "zbfault"
        rules = (
            f"table inet {table} {{\n  chain out {{\n"
            "    type filter hook output priority 0; policy accept;\n"
            f"    ip daddr {self.lab.dest_address} drop\n  }}\n}}\n"
        )
        netns = f"--net=/run/netns/{self.netns}"
        try:
            yield lambda: sh("nsenter", netns, "--", "nft", "-f", "-", input=rules) and None
        finally:
            self.ns("nft", "delete", "table", "inet", table, check=False)

    @contextlib.contextmanager
    def link(self) -> Iterator[Callable[[], None]]:
        """Yields a function that cuts the link between the hosts (ip link set down)."""
        guest = self.guest
        dev = f"{SOURCE_NETNS}0" if guest is not None else self.lab.layout.veth

        def ip_link(state: str) -> None:
            if guest is not None:
                guest.run("ip", "link", "set", dev, state)
            else:
                sh("ip", "link", "set", dev, state)

        try:
            yield lambda: ip_link("down")
        finally:
            ip_link("up")
            wait_until("the link back up", lambda: self._reachable(), timeout=30)

    def _reachable(self) -> bool:
        if self.guest is not None:  # the guests have no ping: a TCP connect to the sshd
            probe = f"exec 3<>/dev/tcp/{self.zb.src.address}/22"
            return self.guest.run("timeout", "2", "bash", "-c", probe, check=False).returncode == 0
        return sh("ping", "-c1", "-W1", self.lab.source.address, check=False).returncode == 0

    def processes(self, pids: list[int], program: str, flag: str) -> list[int]:
        """Those of ``pids`` that run ``program`` with ``flag`` among their arguments."""
        found = []
        for pid in pids:
            argv = cmdline(pid)
            if argv and Path(argv[0]).name == program and flag in argv:
                found.append(pid)
        return found

    def sshd_sessions(self) -> list[int]:
        """The lab sshd's per-connection processes (never the listener)."""
        record = LabRecord.load(self.lab.record_path)
        assert record is not None and record.sshd_pid
        return descendants(record.sshd_pid)


def _one_line(text: str) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def status_word(line: str) -> str:
    match = re.search(r"(\w+) \(", line)
    return match.group(1) if match else "?"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- gates: a command held until the test decides -----------------------------------------


class Gate:
    """A ``zfs`` in front of the real one that holds the command matching ``pattern``.

    The run then waits inside that command: the test kills it there, then lets the held
    command go on (``release``) or end without running (``abort``)."""

    def __init__(self, where: Path, pattern: str) -> None:
        self.dir = where
        self.pattern = pattern
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)

    def arm(self) -> None:
        """From now on, the matching command waits at the gate."""
        real = shutil.which("zfs", path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert real, "zfs not found"
        pattern = self.pattern
        gate = self.dir / "zfs"
        gate.write_text(
            "#!/bin/sh\n"
            f'case " $* " in\n  *{shlex.quote(pattern)}*)\n'
            f"    : > {shlex.quote(str(self.dir / 'reached'))}\n"
            f"    n=0; while [ ! -e {shlex.quote(str(self.dir / 'go'))} ] && [ $n -lt 6000 ]; do\n"
            "      sleep 0.05; n=$((n+1)); done\n"
            f'    [ "$(cat {shlex.quote(str(self.dir / "go"))})" = run ] || exit 99 ;;\n'
            "esac\n"
            f'exec {shlex.quote(real)} "$@"\n'
        )
        gate.chmod(0o755)

    def wait(self, proc: subprocess.Popen[str] | None = None) -> None:
        def reached() -> bool:
            if proc is not None:
                assert proc.poll() is None, f"the run ended before the gate: {proc.communicate()}"
            return (self.dir / "reached").exists()

        wait_until("the run to reach the gate", reached)

    def abort(self) -> None:
        (self.dir / "go").write_text("abort")

    def remove(self) -> None:
        """Let every later command through to the real zfs."""
        (self.dir / "zfs").unlink(missing_ok=True)

    def release(self) -> None:
        (self.dir / "go").write_text("run")


def stuck_send(where: Path) -> Path:
    """A ``zfs`` in front of the real one whose ``zfs send`` stops itself (SIGSTOP) once
    its whole stream is out, holding the stream's pipe open: a send that never exits
    (once ``armed`` exists in ``where``)."""
    real = shutil.which("zfs", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert real, "zfs not found"
    where.mkdir(parents=True, exist_ok=True)
    os.chmod(where, 0o755)
    wrapper = where / "zfs"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  send) {shlex.quote(real)} "$@"; s=$?\n'
        f"        [ -e {shlex.quote(str(where / 'armed'))} ] || exit $s\n"
        f"        echo $$ > {shlex.quote(str(where / 'pid'))}; kill -STOP $$; exit $s ;;\n"
        "esac\n"
        f'exec {shlex.quote(real)} "$@"\n'
    )
    wrapper.chmod(0o755)
    return where


# -- a second sshd on the source host ---------------------------------------------------


class AuthLog:
    """A syslog socket: the messages sent to it, in order, without their priority."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.lines: list[tuple[int, str]] = []  # (priority, message)

    def read(self) -> list[tuple[int, str]]:
        while True:
            try:
                data = self.sock.recv(1 << 17)
            except BlockingIOError:
                return self.lines
            match = re.match(rb"<(\d+)>", data)
            text = data[match.end() if match else 0 :].decode(errors="replace").strip()
            self.lines.append((int(match[1]) if match else -1, text))

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Sshd:
    """An sshd of the test's own in the source's namespace, on its own port.

    The lab's sshd stays untouched; this one can be stopped, given another host key, a
    restricted authorized_keys, or a PATH that starts with a gate."""

    def __init__(self, lab: ZfsLab, root: Path, port: int) -> None:
        self.lab = lab
        self.root = root
        self.port = port
        self.pid: int | None = None
        self.auth_logs: list[AuthLog] = []
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.host_key = self.root / "host_ed25519"
        self.authorized_keys = self.root / "authorized_keys"
        self.known_hosts = self.root / "known_hosts"
        self.new_host_key()
        lab_keys = Path(lab.source.key).parent
        self.authorized_keys.write_text((lab_keys / "client_ed25519.pub").read_text())
        self.trust(self.host_key)

    @property
    def address(self) -> str:
        return self.lab.source.address

    def new_host_key(self) -> None:
        for path in (self.host_key, self.host_key.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key))

    def trust(self, key: Path) -> None:
        """Pin ``key`` for this sshd in its known_hosts file (and nothing else)."""
        kind, blob = Path(f"{key}.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[{self.address}]:{self.port} {kind} {blob}\n")

    def start(self, path_first: Path | None = None) -> None:
        config = self.root / "sshd_config"
        lines = [
            f"ListenAddress {self.address}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "MaxSessions 100",
            "LogLevel VERBOSE",
        ]
        if path_first is not None:
            lines.append(
                f"SetEnv PATH={path_first}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            )
        config.write_text("\n".join(lines) + "\n")
        passwd = Path(self.lab.source.key).parent / "passwd"
        self.pid = start_sshd(
            self.lab.layout.netns, passwd, config, self.root / "sshd.log",
            f"{self.address}:{self.port}",
        )  # fmt: skip

    def stop(self) -> None:
        if self.pid is not None:
            kill(descendants(self.pid))
            stop_pid(self.pid)
            self.pid = None

    def capture_auth_log(self) -> AuthLog:
        """What the commands this sshd runs write to syslog (the source's auth log):
        read from a socket of the test's own, bound over ``/dev/log`` in the sshd's mount
        namespace only (an overlay of ``/dev`` there; the machine has no syslog daemon)."""
        assert self.pid is not None, "start() first"
        log = AuthLog(self.root / "log.sock")
        upper, work = self.root / "dev-upper", self.root / "dev-work"
        for directory in (upper, work):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
        sh("nsenter", f"--target={self.pid}", "--mount", "--", "sh", "-c",
           'mount -t overlay overlay -o "lowerdir=/dev,upperdir=$1,workdir=$2" /dev '
           '&& touch /dev/log && mount --bind "$3" /dev/log',
           "sh", str(upper), str(work), str(log.path))  # fmt: skip
        self.auth_logs.append(log)
        return log

    def log(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")

    def options(self) -> str:
        """Pair options that reach the source through this sshd."""
        return f"sshport={self.port},knownhosts={self.known_hosts}"


@pytest.fixture
def zb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Zb]:
    """The test's pairs on zfs-fuse, or on the back end ``every_backend`` names."""
    yield from backend_zb(request, tmp_path)


@pytest.fixture
def faults(zb: Zb, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Faults]:
    lab = request.getfixturevalue("lab") if zb.backend.host is None else None
    found = Faults(zb, lab, tmp_path)
    try:
        yield found
    finally:
        for gate in found.gates:
            gate.abort()


@pytest.fixture
def sshd(lab: ZfsLab, tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(lab, tmp_path / "sshd", 2222)
    try:
        yield server
    finally:
        server.stop()
        for log in server.auth_logs:
            log.close()


class SecondServer(Zb):
    """A second backup server on this machine: its own zettabee settings, pair file and
    state, and its own ZFS (:class:`lab.hosts.SecondZfsServer`), whose destination pool
    has the name of the lab's. It reaches the lab's source host over SSH as the first
    does, by the same address: the same pair line is the same pair to both."""

    def __init__(self, first: Zb, zfs: SecondZfsServer, tmp: Path) -> None:
        self.zfs = zfs
        dst = Side(
            "localhost", zfs.pool, str(zfs.mountpoint),
            lambda script: zfs.argv("sh", "-c", script), local_files=False,
        )  # fmt: skip
        super().__init__(Backend("zfs-fuse", first.src, first.srcside, dst), tmp, first.name)

    def argv(self, name: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
        return self.zfs.argv(*super().argv(name, *args, env=env))


@pytest.fixture
def second_server(zb: Zb, lab: ZfsLab, tmp_path: Path) -> Iterator[SecondServer]:
    """Server B beside the lab's destination (server A, ``zb``); zfs-fuse only."""
    zfs = SecondZfsServer(tmp_path / "second", lab.dst_pool)
    zfs.start()
    try:
        yield SecondServer(zb, zfs, tmp_path / "second")
    finally:
        zfs.stop()


@pytest.fixture
def tiny_pool(zb: Zb, request: pytest.FixtureRequest) -> Iterator[str]:
    """A pool of the lab's own that a few tens of MB fill (zfs-fuse's and OpenZFS's
    smallest is 64 MB); in the guest on OpenZFS."""
    from lab.hosts import ZfsServer

    guest = zb.backend.host
    if guest is not None:
        image = "/var/tmp/zbtiny.img"
        guest.shell(f"rm -f {image} && truncate -s 80M {image} && "
                    f"zpool create -f -o cachefile=none -O mountpoint=/zbtiny zbtiny {image}")  # fmt: skip
        try:
            yield "zbtiny"
        finally:
            guest.shell(f"zpool destroy -f zbtiny; rm -f {image}", check=False)
        return
    lab: ZfsLab = request.getfixturevalue("lab")
    name = f"{lab.layout.name}tiny"
    mount = lab.root / "mnt" / name
    ZfsServer.create_pool(name, lab.root / "pools" / f"{name}.img", mount, "80M")
    try:
        yield name
    finally:
        ZfsServer.destroy_pool(name, mount)
