"""The network and the processes of a transfer fail under a running update.

Each run is killed or starved from outside; the user must get exit status 1, a message
naming what broke, a CRITICAL runtime check with the same words, an untouched replica,
and a next update that simply works once the fault is gone.
"""

from __future__ import annotations

import signal

import pytest

from tests.integration.faults.conftest import (
    Faults,
    Sshd,
    descendants,
    every_backend,
    in_netns,
    kill,
    stuck_send,
)

pytestmark = pytest.mark.integration

THROTTLE = "16mbit"  # 2 MB/s: a few seconds of stream to break
STALLED = r"stalled: no data for 5s"


def test_ssh_connection_killed_mid_transfer(faults: Faults) -> None:
    replica = faults.replica(mb=2)
    replica.grow(24)
    faults.expect(
        "ssh connection killed mid-transfer",
        "exit 1; lag OK; runtime CRITICAL quoting ssh; next update recovers",
    )
    with faults.rate(THROTTLE):
        faults.update_broken_mid_stream(
            replica, lambda: kill(faults.sshd_sessions()), r"ssh to \S+ failed \(exit 255\)"
        )
    faults.recovers(replica)


@every_backend
def test_link_cut_mid_transfer(faults: Faults) -> None:
    replica = faults.replica(mb=2, options="stall=5")
    replica.grow(24)
    faults.expect(
        "link cut mid-transfer (ip link down)",
        "exit 1 once nothing moved for stall=5s; lag OK; runtime CRITICAL; recovers",
    )
    with faults.rate(THROTTLE), faults.link() as cut:
        faults.update_broken_mid_stream(replica, cut, STALLED)
    faults.recovers(replica)
    assert replica.source_holds() == {replica.snapshot: 1}  # the failed run's snapshot gone


def test_source_sshd_gone_before_a_run(faults: Faults, sshd: Sshd) -> None:
    sshd.start()
    replica = faults.replica(mb=2, options=sshd.options())
    sshd.stop()
    faults.expect(
        "source sshd gone before a run",
        "exit 1; lag OK; runtime CRITICAL 'cannot connect ... refused'; recovers",
    )
    faults.update_fails(
        replica, rf"cannot connect to {sshd.address} port {sshd.port}: Connection refused"
    )
    sshd.start()
    faults.recovers(replica)


@pytest.mark.parametrize("transport", ["ssh", "mbuffer"])
def test_stream_stalled_by_dropped_packets(faults: Faults, transport: str) -> None:
    replica = faults.replica(mb=2, options=f"stall=5,transport={transport}")
    replica.grow(24)
    faults.expect(
        f"stream stalled: packets dropped (nftables), {transport}",
        "watchdog aborts after stall=5s: exit 1; lag OK; runtime CRITICAL 'stalled'",
    )
    with faults.rate(THROTTLE), faults.dropping() as drop:
        faults.update_broken_mid_stream(replica, drop, STALLED)
    faults.recovers(replica)


@every_backend
@pytest.mark.one_openzfs  # the watchdog's path on 2.3 is the cut link's, proven there
def test_stream_stalled_by_a_rate_near_zero(faults: Faults) -> None:
    replica = faults.replica(mb=2, options="stall=5")
    replica.grow(24)
    faults.expect(
        "stream stalled: rate near zero (tbf 1kbit)",
        "watchdog aborts after stall=5s: exit 1; lag OK; runtime CRITICAL 'stalled'",
    )
    with faults.rate(THROTTLE) as rate:
        faults.update_broken_mid_stream(replica, lambda: rate("1kbit"), STALLED)
    faults.recovers(replica)
    assert replica.source_holds() == {replica.snapshot: 1}  # the failed run's snapshot gone


@pytest.mark.parametrize(
    ("side", "says"),
    [
        ("listener", r"mbuffer -I on \S+ failed \(exit -9\): killed by signal 9 \(SIGKILL\)"),
        ("sender", r"mbuffer -O on \S+ failed \(exit 137\)"),
    ],
)
def test_mbuffer_killed_mid_transfer(faults: Faults, side: str, says: str) -> None:
    replica = faults.replica(mb=2, options="transport=mbuffer,bwlimit=2M")
    replica.grow(24)
    faults.expect(
        f"mbuffer {side} killed mid-transfer",
        f"exit 1; lag OK; runtime CRITICAL naming the killed mbuffer {side}; recovers",
    )
    run = faults.popen("zettabee", "update", replica.fs)
    faults.wait_for_stream(run, replica)
    if side == "listener":
        victims = faults.processes(descendants(run.pid), "mbuffer", "-I")
    else:
        victims = faults.processes(in_netns(faults.netns), "mbuffer", "-O")
    assert victims, f"no mbuffer {side} found"
    kill(victims)
    outcome = faults.finish(run)
    faults.failed(replica, outcome, says)
    faults.recovers(replica)


def test_a_source_zfs_send_that_never_exits(faults: Faults, sshd: Sshd) -> None:
    gate = stuck_send(faults.tmp / "stuck-send")
    sshd.start(path_first=gate)
    replica = faults.replica(mb=2, options=f"stall=5,{sshd.options()}")
    (gate / "armed").touch()  # from here on, a send stops once its stream is out
    replica.grow(1)
    faults.expect(
        "source zfs send stopped (SIGSTOP) after its stream",
        "exit 1 within the stall limit naming the stuck zfs send; runtime CRITICAL; lag "
        "CRITICAL 'inconsistent' (the replica took the stream, unrecorded) until the next "
        "update reconciles it once the send is continued",
    )
    outcome = faults.run("zettabee", "update", replica.fs, timeout=120)
    try:
        faults.failed(replica, outcome, r"zfs send on \S+ did not exit within 5 s", lag=2)
    finally:
        stopped = gate / "pid"
        if stopped.exists():
            kill([int(stopped.read_text())], signal.SIGCONT)
    (gate / "zfs").unlink()
    faults.recovers(replica)
