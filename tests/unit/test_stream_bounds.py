"""A stream's processes that do not end once the stream has: the run must fail within a
bound the user set (the pair's stall limit), naming the stuck process, never hang.

Real processes on this host (``sh``, ``head``, ``cat``) stand in for ``zfs send`` and
``zfs receive``: what is tested is how zettabee waits for them. On the mbuffer
transport the two mbuffers are real too, over TCP on this host; the source's pipeline
runs in a local ``sh`` where the OpenSSH client would run it on the source."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from zettabee import relay
from zettabee.errors import ZettabeeError
from zettabee.host import Host, LocalHost, Result, SshHost, SshTarget
from zettabee.mbuffer import stream_via_mbuffer
from zettabee.pipeline import STAGE_MARK
from zettabee.relay import Stage, describe_failure, name_ssh_failure, start_pipe
from zettabee.transport import stream_on_host, stream_via_processes

HOST = LocalHost("backup1")
NEVER = 60.0  # a run still going after this has hung: the test fails, it does not wait


def outcome_within(what: str, stream: Callable[[], object]) -> BaseException | None:
    """The outcome of ``stream()`` (its error, or None), or a test failure naming
    ``what`` if it still runs after :data:`NEVER` seconds."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            stream()
            outcome.append(None)
        except BaseException as exc:  # the outcome is judged by the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(NEVER)
    assert outcome, f"{what} still waits after {NEVER:.0f} s"
    return outcome[0]


def run_bounded(send: list[str], recv: list[str], stall: int) -> BaseException | None:
    """The stream's outcome (its error, or None), or a test failure if it hangs."""
    return outcome_within(
        f"the stream (stall={stall})",
        lambda: stream_via_processes(HOST, HOST, send, recv, stall),
    )


def end_stopped(pid: Path) -> None:
    """Continue and kill the stopped process whose pid the file ``pid`` holds, if any."""
    if not pid.exists():
        return
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(int(pid.read_text()), sig)
        except ProcessLookupError:
            return


def stopped_receive_error(
    tmp_path: Path, bounded: Callable[[list[str], list[str], int], BaseException | None]
) -> str:
    """The error of a 200,000-byte stream run by ``bounded`` (stall=2) whose receive reads
    it all and then stops, as a zfs receive stuck committing; every byte reached it."""
    pid = tmp_path / "pid"
    got = tmp_path / "got"
    recv = ["sh", "-c", f"cat >{got}; echo $$ >{pid}; kill -STOP $$"]
    try:
        error = bounded(["head", "-c", "200000", "/dev/zero"], recv, 2)
    finally:
        end_stopped(pid)
    assert isinstance(error, ZettabeeError), error
    assert got.stat().st_size == 200000
    return str(error)


def test_a_send_that_never_exits_after_its_stream_fails_within_the_stall_limit(
    tmp_path: Path,
) -> None:
    pid = tmp_path / "pid"
    got = tmp_path / "got"
    # the whole stream, its output closed, then stopped: as a zfs send stopped or hung
    send = ["sh", "-c", f"head -c 200000 /dev/zero; exec >&-; echo $$ >{pid}; kill -STOP $$"]
    try:
        error = run_bounded(send, ["sh", "-c", f"cat >{got}"], stall=2)
    finally:
        end_stopped(pid)
    assert isinstance(error, ZettabeeError), error
    message = str(error)
    assert "zfs send on backup1 did not exit within 2 s of the end of its stream" in message
    assert "ps -o pid,stat,cmd -C zfs" in message  # what to look for
    assert got.stat().st_size == 200000  # the stream itself went through


def test_a_send_that_exits_at_once_is_not_hurried(tmp_path: Path) -> None:
    got = tmp_path / "got"
    send = ["sh", "-c", "head -c 200000 /dev/zero; sleep 0.5"]
    assert run_bounded(send, ["sh", "-c", f"cat >{got}"], stall=2) is None
    assert got.stat().st_size == 200000


def test_a_receive_that_never_exits_after_its_stream_fails_within_the_stall_limit(
    tmp_path: Path,
) -> None:
    message = stopped_receive_error(tmp_path, run_bounded)
    assert "zfs receive on backup1 did not exit within 2 s of the end of its stream" in message
    assert "The replica may hold the new snapshot already" in message


def test_a_receive_that_takes_a_moment_to_commit_is_not_hurried(tmp_path: Path) -> None:
    got = tmp_path / "got"
    recv = ["sh", "-c", f"cat >{got}; sleep 0.5"]
    assert run_bounded(["head", "-c", "200000", "/dev/zero"], recv, stall=2) is None
    assert got.stat().st_size == 200000


# -- the mbuffer transport ---------------------------------------------------------------


class SourceHere(LocalHost):
    """The source host of an mbuffer stream, on this machine: its pipeline (the script
    the OpenSSH client would run there) runs in a local ``sh``, and the listening
    mbuffer accepts its connection from 127.0.0.1."""

    class Target:
        address = "127.0.0.1"

    target = Target()

    def stream_argv(self, remote_command: str, stall: int) -> list[str]:
        return ["sh", "-c", remote_command]

    def run_command(self, command: str, **kw: object) -> Result:
        return self.run(["sh", "-c", command], check=False, timeout=None)


SOURCE = SourceHere("source1")


def mbuffer_bounded(
    send: list[str], recv: list[str], stall: int, dest: Host = HOST
) -> BaseException | None:
    """The outcome of an mbuffer stream into ``dest`` (its error, or None), or a test
    failure if it hangs."""
    source: SshHost = SOURCE  # type: ignore[assignment]
    return outcome_within(
        f"the mbuffer stream (stall={stall})",
        lambda: stream_via_mbuffer(source, dest, send, recv, stall, None, "127.0.0.1"),
    )


def test_an_mbuffer_stream_that_ends_well_is_not_hurried(tmp_path: Path) -> None:
    got = tmp_path / "got"
    send = ["sh", "-c", "head -c 200000 /dev/zero; sleep 0.5"]
    recv = ["sh", "-c", f"cat >{got}; sleep 0.5"]
    assert mbuffer_bounded(send, recv, stall=2) is None
    assert got.stat().st_size == 200000


def test_an_mbuffer_send_that_never_exits_after_its_stream_fails_within_the_stall_limit(
    tmp_path: Path,
) -> None:
    """A zfs send stopped once its whole stream is out (zfs-fuse's daemon writes it):
    the source's pipeline never ends, and holds the pipe into its mbuffer open, so the
    last part of a block never leaves it and the stream stalls (or, should that
    mbuffer's watchdog end it first, the pipeline does not exit). Either way the run
    fails, and the source's pipeline is stopped with it: it was left running, waited
    for in a thread of the run, while the run failed after stall+30 s."""
    pid = tmp_path / "pid"
    send = ["sh", "-c", f"head -c 200000 /dev/zero; exec >&-; echo $$ >{pid}; kill -STOP $$"]
    try:
        error = mbuffer_bounded(send, ["sh", "-c", "cat >/dev/null"], stall=2)
        left = pipelines_of_ours()
    finally:
        end_stopped(pid)
    assert isinstance(error, ZettabeeError), error
    message = str(error)
    assert (
        "the stream stalled: no data for 2s" in message
        or "zfs send | mbuffer -O on source1 did not exit within 2 s of the end" in message
    ), message
    assert left == [], f"the source's pipeline was left running: {left}"


def pipelines_of_ours() -> list[int]:
    """The source pipelines (scripts of :func:`pipeline_script`) this process still runs."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if argv[:2] == [b"sh", b"-c"] and STAGE_MARK.encode() in argv[2] and ppid == os.getpid():
            found.append(int(entry.name))
    return found


def test_an_mbuffer_receive_that_never_exits_after_its_stream_fails_within_the_stall_limit(
    tmp_path: Path,
) -> None:
    message = stopped_receive_error(tmp_path, mbuffer_bounded)
    assert "zfs receive on backup1 did not exit within 2 s of the end of its stream" in message


def test_a_stopped_listening_mbuffer_fails_within_the_stall_limit(tmp_path: Path) -> None:
    """The mbuffer that listens here stopped mid-stream: the stream stalls, and the
    stopped mbuffer, which holds SIGTERM pending, is killed, not waited for."""
    go = tmp_path / "go"
    send = ["sh", "-c", f"head -c 100000 /dev/zero; while [ ! -e {go} ]; do sleep 0.1; done"]
    stopped: list[int] = []

    def stop_the_listener() -> None:
        for _ in range(300):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if argv[:1] == [b"mbuffer"] and b"-I" in argv and ppid == os.getpid():
                    os.kill(int(entry.name), signal.SIGSTOP)
                    stopped.append(int(entry.name))
                    return
            threading.Event().wait(0.1)

    stopper = threading.Thread(target=stop_the_listener, daemon=True)
    stopper.start()
    try:
        error = mbuffer_bounded(send, ["sh", "-c", "cat >/dev/null"], stall=2)
    finally:
        go.touch()
        for found in stopped:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(found, sig)
                except ProcessLookupError:
                    break
    assert stopped, "the listening mbuffer was never found"
    assert isinstance(error, ZettabeeError), error
    assert "the stream stalled: no data for 2s" in str(error), error


# -- the mbuffer transport into a remote destination ----------------------------------------


class DestinationThere(SshHost):
    """A remote host, on this machine: the script the OpenSSH client would run there (an
    mbuffer stream's ``mbuffer -I | zfs receive``, the ``zfs send | dd | zfs receive`` of
    ``transport=local``), and the commands run there, run in a local ``sh``."""

    def __init__(self, name: str) -> None:
        super().__init__(SshTarget(name))

    def connect(self) -> None:
        pass

    def stream_argv(self, remote_command: str, stall: int) -> list[str]:
        return ["sh", "-c", remote_command]

    def run_command(self, command: str, **kw: Any) -> Result:
        return HOST.run(["sh", "-c", command], check=False, timeout=kw.get("timeout"))


DESTINATION = DestinationThere("backup2")


def mbuffer_there_bounded(send: list[str], recv: list[str], stall: int) -> BaseException | None:
    """The outcome of an mbuffer stream into a remote destination (its error, or None), or
    a test failure if it hangs."""
    return mbuffer_bounded(send, recv, stall, DESTINATION)


def test_an_mbuffer_stream_into_a_remote_destination_that_ends_well_is_not_hurried(
    tmp_path: Path,
) -> None:
    got = tmp_path / "got"
    send = ["sh", "-c", "head -c 200000 /dev/zero; sleep 0.5"]
    recv = ["sh", "-c", f"cat >{got}; sleep 0.5"]
    assert mbuffer_there_bounded(send, recv, stall=2) is None
    assert got.stat().st_size == 200000


def test_an_mbuffer_send_into_a_remote_destination_that_never_exits_fails_within_the_stall_limit(
    tmp_path: Path,
) -> None:
    """A zfs send stopped once its stream is out (zfs-fuse's daemon writes it): the pipe
    into the source's mbuffer stays open, the last part of a block stays in that mbuffer,
    the watchdogs end both mbuffers, and the source's pipeline never ends. It was waited
    for without limit (the run hung until someone continued the zfs send); now it gets
    the stall limit after the destination's end, and the run names it, then what the
    destination said."""
    pid = tmp_path / "pid"
    send = ["sh", "-c", f"head -c 200000 /dev/zero; echo $$ >{pid}; kill -STOP $$"]
    try:
        error = mbuffer_there_bounded(send, ["sh", "-c", "cat >/dev/null"], stall=2)
        left = pipelines_of_ours()
    finally:
        end_stopped(pid)
    assert isinstance(error, ZettabeeError), error
    message = str(error)
    assert "zfs send | mbuffer -O on source1 did not exit within 2 s" in message, message
    assert "Then mbuffer -I on backup2: " in message, message  # the cut stream, after
    assert left == [], f"the source's pipeline was left running: {left}"


# -- transport=local on a remote host ---------------------------------------------------


def on_host_bounded(send: list[str], recv: list[str], stall: int) -> BaseException | None:
    """The outcome of ``send | dd | recv`` run as one command on a remote host (its error,
    or None), or a test failure if it hangs."""
    return outcome_within(
        f"the stream on one host (stall={stall})",
        lambda: stream_on_host(DESTINATION, send, recv, stall),
    )


def test_a_stream_on_one_remote_host_that_ends_well_is_not_hurried(tmp_path: Path) -> None:
    got = tmp_path / "got"
    send = ["sh", "-c", "head -c 200000 /dev/zero; sleep 0.5"]
    recv = ["sh", "-c", f"cat >{got}; sleep 0.5"]
    assert on_host_bounded(send, recv, stall=2) is None
    assert got.stat().st_size == 200000


def test_a_stopped_send_on_one_remote_host_fails_within_the_stall_limit(tmp_path: Path) -> None:
    """A zfs send stopped with its stream's pipe open (zfs-fuse's daemon writes the
    stream): dd's count stops, and the one command on that host never ends. It was
    waited for without limit; now the count that has not moved for the stall limit
    stops it, and the run names the host and what to look for there."""
    pid = tmp_path / "pid"
    got = tmp_path / "got"
    send = ["sh", "-c", f"head -c 200000 /dev/zero; echo $$ >{pid}; kill -STOP $$"]
    try:
        error = on_host_bounded(send, ["sh", "-c", f"cat >{got}"], stall=2)
    finally:
        end_stopped(pid)
    assert isinstance(error, ZettabeeError), error
    message = str(error)
    assert "zfs send | zfs receive on backup2 made no progress for 2 s" in message, message
    assert "ps -o pid,stat,cmd -C zfs" in message  # what to look for
    assert got.stat().st_size == 200000


def test_a_receive_stuck_committing_on_one_remote_host_fails_within_the_stall_limit(
    tmp_path: Path,
) -> None:
    """The whole stream passed dd (its summary says so), and the receive never exits."""
    message = stopped_receive_error(tmp_path, on_host_bounded)
    assert (
        "zfs send | zfs receive on backup2 did not exit within 2 s of the end of its stream"
        in message
    ), message
    assert "The replica may hold the new snapshot already" in message


# -- a stage sent SIGTERM ------------------------------------------------------------------


def test_a_stage_that_outlives_sigterm_gets_sigkill() -> None:
    """The receiver of a stream whose sender cannot start is stopped: one that does not
    exit on SIGTERM (ignores it, or is stopped and holds it pending) was waited for
    without limit; it gets SIGKILL after the grace seconds."""
    sender = Stage("zfs send", "backup1", ["zettabee-test-no-such-program"])
    receiver = Stage("zfs receive", "backup1", ["sh", "-c", "while :; do sleep 1; done"])
    outcome: list[BaseException] = []

    def start() -> None:
        try:
            start_pipe(sender, receiver)
        except BaseException as exc:  # the outcome is judged by the test
            outcome.append(exc)

    # ignored from its start (inherited): no moment where SIGTERM would still end it
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        worker = threading.Thread(target=start, daemon=True)
        worker.start()
        worker.join(NEVER)
    finally:
        signal.signal(signal.SIGTERM, before)
        if not outcome and receiver.proc is not None:
            receiver.proc.kill()
    assert outcome, f"the receiver that outlived SIGTERM was still waited for after {NEVER:.0f} s"
    assert "not installed" in str(outcome[0]), outcome
    assert receiver.returncode == -signal.SIGKILL


def test_an_overdue_stage_over_ssh_keeps_its_name() -> None:
    """The OpenSSH client of a stage stopped for not exiting exits 255 on SIGTERM: that
    is no ssh failure, and the run names the stage (it said "ssh on HOST did not exit")."""
    sender = Stage("zfs send | mbuffer -O", "source1", ["ssh", "--", "source1", "sh -c ..."])
    sender.returncode, sender.overdue, sender.killed = 255, 5.0, True
    name_ssh_failure(sender)
    message = str(describe_failure([sender], None))
    assert message.startswith("zfs send | mbuffer -O on source1 did not exit within 5 s"), message


# -- a stage that SIGKILL does not end ------------------------------------------------------


class InTheKernel(subprocess.Popen):  # type: ignore[type-arg]
    """A zfs receive in uninterruptible sleep (in the kernel, on a suspended pool): no
    signal ends it, and a wait without limit never returns (here it fails the test
    instead: a process SIGKILL cannot end cannot be made from userspace)."""

    def send_signal(self, sig: int) -> None:  # kill() and terminate() come here
        pass

    def wait(self, timeout: float | None = None) -> int:
        assert timeout is not None, "waited without limit for a process SIGKILL cannot end"
        return super().wait(timeout)


def unkillable_receive_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recv_script: str, size: int
) -> str:
    """The error of a bounded stream of ``size`` bytes into a receive (``recv_script``,
    given ``$PID_FILE``) that no signal ends, as a zfs in the kernel; it must be one that
    names it so."""
    pid = tmp_path / "pid"
    recv = ["sh", "-c", recv_script.replace("$PID_FILE", str(pid))]
    real = subprocess.Popen

    def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        return (InTheKernel if argv[-1] == recv[-1] else real)(argv, **kw)

    monkeypatch.setattr(relay, "KILL_GRACE", 0.5)
    monkeypatch.setattr(relay.subprocess, "Popen", popen)
    try:
        error = run_bounded(["head", "-c", str(size), "/dev/zero"], recv, stall=1)
    finally:
        end_stopped(pid)
    assert isinstance(error, ZettabeeError), error
    message = str(error)
    assert message.startswith(
        "zfs receive on backup1 did not exit after SIGKILL: stuck in the kernel"
    ), message
    return message


def test_a_receive_that_sigkill_does_not_end_is_given_up_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receive took the whole stream and never exits, nor on SIGTERM, nor on SIGKILL:
    it was waited for without limit after the SIGKILL; now for the grace seconds, and
    the run says where it is stuck and what to check."""
    script = "cat >/dev/null; echo $$ >$PID_FILE; exec sleep 60"
    message = unkillable_receive_error(tmp_path, monkeypatch, script, 200000)
    assert "zpool status" in message, message


def test_a_receive_that_stops_reading_and_outlives_sigkill_does_not_hold_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receive stops reading mid-stream and sleeps in the kernel (seen on OpenZFS
    with its pool's disk suspended): its pipe fills, the stream stalls, and killing it
    does not free the pipe. The relay was blocked for ever writing into it (the run in
    pipe_wait_writable until the disk came back); now the stall ends it all the same."""
    unkillable_receive_error(tmp_path, monkeypatch, "echo $$ >$PID_FILE; exec sleep 60", 8000000)
