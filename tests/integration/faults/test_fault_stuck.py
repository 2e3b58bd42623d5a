"""A zfs process that never ends (issue 17, row 9): stopped with SIGSTOP or hung on its
host. The run must end that pair in a clear failure within a bound the user set (the
pair's stall limit), and ``replicate`` must go on to the other pairs and submit every
pair's results: a run that waits for ever sends none.

The fault is forced from outside: the source's ``zfs send`` is stopped (SIGSTOP) while
its stream runs. On zfs-fuse the daemon still writes the stream, so it arrives but for
what the source's mbuffer holds, and the stopped process keeps the pipeline open. On
OpenZFS, the destination pool's disk is suspended (device-mapper): the zfs receive
sleeps in the kernel, and SIGKILL does not end it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from lab.nscad import NscaDaemon
from tests.conftest import Zb
from tests.integration.faults.conftest import Faults, Sshd, cmdline, kill, stuck_send, wait_until

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
    faults: Faults, sshd: Sshd
) -> None:
    """``transport=local`` on a remote host: ``zfs send | dd | zfs receive`` runs there as
    one command, and only dd's count says how it goes. With its zfs send stopped
    (SIGSTOP) once its stream is out, holding the stream's pipe open (as a send stopped
    mid-stream does on zfs-fuse, whose daemon writes the stream), that command never
    ended, and the update was waited for without limit. Both ends reach the host
    through a second sshd whose zfs stops its own sends (:func:`stuck_send`): a send
    stopped from outside may have ended before it is seen."""
    zb = faults.zb
    gate = stuck_send(faults.tmp / "stuck-send")
    sshd.start(path_first=gate)
    remote = zb.srcside.address  # the source's host serves the destination pool too
    options = f"transport=local,stall={STALL},{sshd.options()}"
    stuck = faults.replica("stuck", mb=1, options=options, host=remote)
    (gate / "armed").touch()  # from here on, a send stops once its stream is out
    stuck.grow(2)
    faults.expect(
        "source zfs send stopped (SIGSTOP) after its stream, transport=local on a remote host",
        f"fails within its stall={STALL}s naming the host and what to look for there; "
        "runtime CRITICAL; recovers once continued",
    )
    try:
        started = time.monotonic()
        # before the fix: no end until the zfs send was continued (the test's limit)
        outcome = faults.run("zettabee", "update", stuck.fs, timeout=120)
        took = time.monotonic() - started  # for the table: no assert on a duration
    finally:
        stopped = gate / "pid"
        if stopped.exists():
            kill([int(stopped.read_text())], signal.SIGCONT)
    (gate / "zfs").unlink()
    says = rf"zfs send \| zfs receive on \S+ made no progress for {STALL} s"
    shown = rf"zfs send / zfs receive on \S+ made no progress for {STALL} s"
    faults.check(stuck, outcome, code=1, lag=0, runtime=2, says=says, plugin_says=shown)
    assert "ps -o pid,stat,cmd -C zfs" in outcome.stderr, outcome.stderr
    assert faults.row is not None
    after = re.search(r"made no progress for \d+ s( after \d+ bytes)?", outcome.stderr)
    faults.row.observed = (
        f"exit 1, {took:.0f} s after the start: 'zfs send | zfs receive on SOURCE "
        f"{after.group(0) if after else '?'} (stall={STALL}); it was stopped ... Look on "
        "SOURCE for a zfs process that is stopped or hung'; lag OK; runtime CRITICAL"
    )
    faults.recovers(stuck)


# -- a zfs receive stuck in the kernel (OpenZFS) -----------------------------------------


@pytest.fixture
def dm_pool(zb: Zb) -> Iterator[str]:
    """A pool in the guest whose one vdev is a device-mapper device over a loop device:
    ``dmsetup suspend`` holds all its I/O, as a vanished disk or a hung controller does,
    and a zfs waiting on it sleeps in the kernel, where no signal reaches it."""
    guest = zb.backend.host
    assert guest is not None, "OpenZFS only: the guest has device-mapper"
    image = "/var/tmp/zbdm.img"
    guest.shell(
        f"modprobe dm-mod; rm -f {image} && truncate -s 128M {image} && "
        f"l=$(losetup -f --show {image}) && echo $l >{image}.loop && "
        f'dmsetup create zbdm --table "0 $(blockdev --getsz $l) linear $l 0" && '
        "zpool create -f -o cachefile=none -O mountpoint=/zbdm zbdm /dev/mapper/zbdm"
    )
    try:
        yield "zbdm"
    finally:
        guest.shell(
            "dmsetup resume zbdm; zpool destroy -f zbdm; dmsetup remove zbdm; "
            f'losetup -d "$(cat {image}.loop)"; rm -f {image} {image}.loop',
            check=False,
        )


@pytest.mark.parametrize("zb", ["openzfs-2.1", "openzfs-2.3"], indirect=True)
@pytest.mark.one_openzfs  # the kernel's wait is OpenZFS's own, the same on 2.3
def test_a_zfs_receive_stuck_in_the_kernel_fails_its_pair(faults: Faults, dm_pool: str) -> None:
    """The destination pool's disk stops answering (``dmsetup suspend``): the update's
    zfs receive sleeps in the kernel (state D, waiting for a txg), and neither SIGTERM
    nor SIGKILL ends it. The run was waited for without limit after the SIGKILL; now it
    gives the process up and fails naming it, where to look and what for."""
    guest = faults.guest
    assert guest is not None
    replica = faults.replica(mb=1, options=f"stall={STALL}", dest=f"{dm_pool}/{faults.zb.name}")
    replica.grow(2)
    faults.expect(
        "destination pool's disk suspended (dmsetup suspend): zfs receive stuck in the kernel",
        f"fails after stall={STALL}s and the two 5 s graces: the receive outlives SIGKILL, "
        "is left behind and named with zpool status; runtime CRITICAL; recovers once the "
        "disk is back",
    )
    guest.shell(f"dmsetup suspend {dm_pool}")
    try:
        started = time.monotonic()
        run = faults.popen("zettabee", "update", replica.fs)
        try:
            # before the fix: no end until the disk came back (the test's limit)
            outcome = faults.finish(run, timeout=240)
        except subprocess.TimeoutExpired:
            ps = guest.shell("ps -eo pid,stat,wchan:32,args", check=False).stdout
            pytest.fail(f"the run still waits after 240 s:\n{ps}")  # where it waits
        took = time.monotonic() - started  # for the table: no assert on a duration
        left = guest.shell("ps -eo stat=,args= | grep '^D.*[z]fs receive'", check=False).stdout
    finally:
        guest.shell(f"dmsetup resume {dm_pool}", check=False)
    wait_until(
        "the stuck receive to end",
        lambda: not guest.shell("pgrep -f '^zfs receive'", check=False).stdout.strip(),
    )
    says = r"zfs receive on \S+ did not exit after SIGKILL: stuck in the kernel"
    faults.check(replica, outcome, code=1, lag=0, runtime=2, says=says)
    assert "zpool status" in outcome.stderr, outcome.stderr
    assert left.strip(), "the receive was not in the kernel (state D) when the run ended"
    assert faults.row is not None
    faults.row.observed = (
        f"exit 1, {took:.0f} s after the start: 'zfs receive on HOST did not exit after "
        "SIGKILL: stuck in the kernel; it was left behind. Check zpool status on HOST for a "
        "suspended pool ...'; lag OK; runtime CRITICAL; the receive in state D"
    )
    faults.recovers(replica)
