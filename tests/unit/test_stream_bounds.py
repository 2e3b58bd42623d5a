"""A stream's processes that do not end once the stream has: the run must fail within a
bound the user set (the pair's stall limit), naming the stuck process, never hang.

Real processes on this host (``sh``, ``head``, ``cat``) stand in for ``zfs send`` and
``zfs receive``: what is tested is how zettabee waits for them."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from zettabee.errors import ZettabeeError
from zettabee.host import LocalHost
from zettabee.transport import stream_via_processes

HOST = LocalHost("backup1")
NEVER = 60.0  # a run still going after this has hung: the test fails, it does not wait


def run_bounded(send: list[str], recv: list[str], stall: int) -> BaseException | None:
    """The stream's outcome (its error, or None), or a test failure if it hangs."""
    outcome: list[BaseException | None] = []

    def stream() -> None:
        try:
            stream_via_processes(HOST, HOST, send, recv, stall)
            outcome.append(None)
        except BaseException as exc:  # the outcome is judged by the test
            outcome.append(exc)

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    worker.join(NEVER)
    assert outcome, f"the stream still waits after {NEVER:.0f} s (stall={stall})"
    return outcome[0]


def end_stopped(pid: Path) -> None:
    """Continue and kill the stopped process whose pid the file ``pid`` holds, if any."""
    if not pid.exists():
        return
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(int(pid.read_text()), sig)
        except ProcessLookupError:
            return


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
    pid = tmp_path / "pid"
    got = tmp_path / "got"
    # the whole stream read, then stopped: as a zfs receive stuck committing
    recv = ["sh", "-c", f"cat >{got}; echo $$ >{pid}; kill -STOP $$"]
    try:
        error = run_bounded(["head", "-c", "200000", "/dev/zero"], recv, stall=2)
    finally:
        end_stopped(pid)
    assert isinstance(error, ZettabeeError), error
    message = str(error)
    assert "zfs receive on backup1 did not exit within 2 s of the end of its stream" in message
    assert "The replica may hold the new snapshot already" in message
    assert got.stat().st_size == 200000


def test_a_receive_that_takes_a_moment_to_commit_is_not_hurried(tmp_path: Path) -> None:
    got = tmp_path / "got"
    recv = ["sh", "-c", f"cat >{got}; sleep 0.5"]
    assert run_bounded(["head", "-c", "200000", "/dev/zero"], recv, stall=2) is None
    assert got.stat().st_size == 200000
