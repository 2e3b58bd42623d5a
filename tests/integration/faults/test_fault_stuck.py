"""A zfs process that never ends (issue 17, row 9): stopped with SIGSTOP or hung on its
host. The run must end that pair in a clear failure within a bound the user set (the
pair's stall limit), and ``replicate`` must go on to the other pairs and submit every
pair's results: a run that waits for ever sends none.

The fault is forced from outside: the source's ``zfs send`` is stopped (SIGSTOP) while
its stream runs. On zfs-fuse the daemon still writes the stream, so it arrives but for
what the source's mbuffer holds, and the stopped process keeps the pipeline open.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator

import pytest

from lab.nscad import NscaDaemon
from tests.integration.faults.conftest import Faults, cmdline, wait_until

pytestmark = pytest.mark.integration

HOST = "backup1"
STALL = 5


def nsca_settings(nscad: NscaDaemon) -> str:
    return (
        f"[monitoring]\nhost_name = {HOST}\npassive = nsca\n\n[nsca]\nhost = {nscad.host}\n"
        f"port = {nscad.port}\npassword = {nscad.password}\nencryption = xor\ntimeout = 5\n"
    )


def source_sends(faults: Faults, fs: str) -> list[int]:
    """The source's ``zfs send`` processes of ``fs`` (below the lab's sshd). zfs-fuse's
    zfs cuts its own ``FS@SNAP`` arguments in two: FS is one of them."""
    found = []
    for pid in faults.sshd_sessions():
        argv = cmdline(pid)
        if argv[:1] and os.path.basename(argv[0]) == "zfs" and argv[1:2] == ["send"]:
            if any(arg.partition("@")[0] == fs for arg in argv):
                found.append(pid)
    return found


@contextlib.contextmanager
def stopped_later(pids: list[int]) -> Iterator[None]:
    """The processes ``pids`` are continued when the block ends, however it ends."""
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_a_stopped_zfs_send_fails_its_pair_and_replicate_reports_every_pair(
    faults: Faults, nscad: NscaDaemon
) -> None:
    """The stuck pair goes first, on one job: every other pair waits for it. Into a
    remote destination over mbuffer, the source's pipeline was waited for without limit:
    replicate hung (and sent no result) until the zfs send was continued."""
    zb = faults.zb
    zb.write_settings(nsca_settings(nscad))
    options = f"transport=mbuffer,stall={STALL},bwlimit=1M"
    remote = zb.srcside.address  # the destination reached over SSH, as another host
    stuck = faults.replica("stuck", mb=1, options=options, host=remote)
    stuck_line = zb.pairfile.read_text().strip()
    good = faults.replica("good", mb=1)
    zb.write_pairs(stuck_line, zb.pairfile.read_text().strip())
    stuck.grow(6)
    good.grow(1)
    faults.expect(
        "source zfs send stopped (SIGSTOP) mid-stream, mbuffer into a remote destination, "
        "replicate --all",
        f"that pair fails within its stall={STALL}s naming the zfs send; the next pair "
        "updates; 4 passive results sent; runtime CRITICAL; recovers once continued",
    )
    run = faults.popen("replicate", "--all", "--jobs", "1")
    faults.wait_for_stream(run, stuck)
    wait_until("the source's zfs send", lambda: source_sends(faults, zb.src_fs("stuck")))
    sends = source_sends(faults, zb.src_fs("stuck"))
    with stopped_later(sends):
        for pid in sends:
            os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        # before the fix: no end until the zfs send was continued (the test's limit)
        outcome = faults.finish(run, timeout=120)
        took = time.monotonic() - stopped  # for the table: no assert on a duration
        got = {line.service: line for line in nscad.wait_for(4)}
    says = rf"zfs send \| mbuffer -O on \S+ did not exit within {STALL} s of the end of its stream"
    # the status line has no "|" (it starts the perfdata there)
    shown = rf"zfs send / mbuffer -O on \S+ did not exit within {STALL} s"
    faults.check(stuck, outcome, code=1, lag=0, runtime=2, says=says, plugin_says=shown)
    assert f"{zb.dst_fs('good')}" not in outcome.stderr, outcome.stderr
    good.same_as_source()  # the pair after the stuck one was updated
    assert len(got) == 4, got
    runtime = got[f"zettabee runtime {stuck.fs}"]
    assert runtime.code == 2 and "did not exit within" in runtime.output, runtime.output
    assert got[f"zettabee lag {stuck.fs}"].code == 0
    assert (got[f"zettabee lag {good.fs}"].code, got[f"zettabee runtime {good.fs}"].code) == (0, 0)
    assert faults.row is not None
    faults.row.observed = (
        f"exit 1, {took:.0f} s after the stop: 'zfs send | mbuffer -O on SOURCE did not exit "
        f"within {STALL} s of the end of its stream ... Then mbuffer -I ...'; lag OK; runtime "
        "CRITICAL; the other pair updated; 4 passive results (the stuck pair's CRITICAL)"
    )
    faults.recovers(stuck)  # the zfs send continued, as the block above ended


def test_a_stopped_zfs_send_on_one_remote_host_fails_within_the_stall_limit(
    faults: Faults,
) -> None:
    """``transport=local`` on a remote host: ``zfs send | dd | zfs receive`` runs there as
    one command, and only dd's count says how it goes. With its zfs send stopped (whose
    pipe zfs-fuse's daemon fills, and the stopped process keeps open), that command
    never ended, and the update was waited for without limit."""
    zb = faults.zb
    remote = zb.srcside.address  # the source's host serves the destination pool too
    stuck = faults.replica("stuck", mb=1, options=f"transport=local,stall={STALL}", host=remote)
    stuck.grow(20)
    faults.expect(
        "source zfs send stopped (SIGSTOP) mid-stream, transport=local on a remote host",
        f"fails within its stall={STALL}s naming the host and what to look for there; "
        "runtime CRITICAL; recovers once continued",
    )
    run = faults.popen("zettabee", "update", stuck.fs)
    wait_until("the source's zfs send", lambda: source_sends(faults, zb.src_fs("stuck")))
    sends = source_sends(faults, zb.src_fs("stuck"))
    with stopped_later(sends):
        for pid in sends:
            os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        # before the fix: no end until the zfs send was continued (the test's limit)
        outcome = faults.finish(run, timeout=120)
        took = time.monotonic() - stopped  # for the table: no assert on a duration
    says = rf"zfs send \| zfs receive on \S+ made no progress for {STALL} s"
    shown = rf"zfs send / zfs receive on \S+ made no progress for {STALL} s"
    faults.check(stuck, outcome, code=1, lag=0, runtime=2, says=says, plugin_says=shown)
    assert "ps -o pid,stat,cmd -C zfs" in outcome.stderr, outcome.stderr
    assert faults.row is not None
    after = re.search(r"made no progress for \d+ s( after \d+ bytes)?", outcome.stderr)
    faults.row.observed = (
        f"exit 1, {took:.0f} s after the stop: 'zfs send | zfs receive on SOURCE "
        f"{after.group(0) if after else '?'} (stall={STALL}); it was stopped ... Look on "
        "SOURCE for a zfs process that is stopped or hung'; lag OK; runtime CRITICAL"
    )
    faults.recovers(stuck)  # the zfs send continued, as the block above ended
