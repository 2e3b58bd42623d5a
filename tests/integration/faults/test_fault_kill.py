"""Runs killed with SIGKILL at the points that matter, and runs that meet each other.

A SIGKILL leaves no chance to clean up: the kernel drops the pair's flock, the status
file still says "running" for a pid that is gone. The user must see the interruption
(status, CRITICAL runtime with the fix), the last good snapshot must be untouched, and the
next update must find a consistent state by itself. The kill points are reached by
holding one command at a gate (a ``zfs`` in front of the real one) while the run waits
for it, so each kill lands exactly there.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.faults.conftest import (
    INTACT,
    STATES,
    Faults,
    Replica,
    Sshd,
    every_backend,
    kill,
    snapshots,
    status_word,
    wait_until,
)

pytestmark = pytest.mark.integration

INTERRUPTED = r"update was interrupted \(pid \d+ is gone\).*zettabee unlock"


def test_sigkill_before_the_snapshot(faults: Faults, sshd: Sshd) -> None:
    gate = faults.gate("source-gate", " snapshot ")
    sshd.start(path_first=gate.dir)
    replica = faults.replica(mb=2, options=sshd.options())
    replica.grow(4)
    before = snapshots(faults.zb.src_fs())
    gate.arm()
    faults.expect(
        "SIGKILL before the snapshot",
        "status Interrupted; lag OK; runtime CRITICAL with the fix; update recovers alone",
    )
    run = faults.popen("zettabee", "update", replica.fs)
    gate.wait(run)
    kill([run.pid])
    run.wait()
    gate.abort()
    assert snapshots(faults.zb.src_fs()) == before  # killed before the snapshot existed
    faults.check_killed(replica, lag=0, runtime=2, says=INTERRUPTED)
    gate.remove()
    faults.recovers(replica)


@every_backend
def test_sigkill_during_the_stream(faults: Faults) -> None:
    replica = faults.replica(mb=2)
    replica.grow(24)
    faults.expect(
        "SIGKILL during the stream",
        "status Interrupted; lag OK; runtime CRITICAL with the fix; update recovers alone",
    )
    with faults.rate("16mbit"):
        run = faults.popen("zettabee", "update", replica.fs)
        faults.wait_for_stream(run, replica)
        helpers = faults.helpers(run)
        assert any("ControlMaster=yes" in h for h in helpers.values()), "the ssh master"
        faults.kill(run)
        run.wait()
    # Nothing the run started outlives it: not the stream, not the ssh master.
    wait_until("the killed run's helpers to end", lambda: not faults.alive(helpers))
    faults.check_killed(replica, lag=0, runtime=2, says=INTERRUPTED)
    faults.recovers(replica)


@every_backend
def test_sigkill_after_the_receive_before_the_state_is_recorded(faults: Faults) -> None:
    replica = faults.replica(mb=2)
    replica.grow(4)
    gate = faults.gate("dest-gate", "zettabee:lastsnap=")
    gate.arm()
    faults.expect(
        "SIGKILL after the receive, before the state is recorded",
        "status Interrupted; lag CRITICAL (newest snapshot not the recorded one); runtime "
        "CRITICAL; update reconciles alone",
    )
    run = faults.popen("zettabee", "update", replica.fs, path_first=gate.dir)
    gate.wait(run)
    faults.kill(run)
    run.wait()
    gate.abort()
    dst = faults.zb.dstside
    received = dst.snapshots(replica.fs)[-1]
    assert (
        received != replica.snapshot
        and dst.zget(replica.fs, "zettabee:lastsnap") == replica.snapshot
    )
    faults.check_killed(replica, lag=2, runtime=2, says=INTERRUPTED)
    lag = faults.plugin("check_zettabee_lag", replica.fs)[1]
    assert "next update reconciles it" in lag
    faults.recovers(replica)


def test_sigkill_of_initialize_after_its_receive(faults: Faults) -> None:
    zb = faults.zb
    zb.make_source("data", 4)
    zb.write_pairs(zb.pair_line("data"))
    row = faults.expect(
        "SIGKILL of initialize after its receive",
        "status Interrupted; lag UNKNOWN (not initialized); runtime CRITICAL; update adopts "
        "the received snapshot, no resend",
    )
    faults.killed_before_the_record("initialize", zb.dst_fs())
    status = faults.run("zettabee", "status", zb.dst_fs())
    lag_code, lag_text = faults.plugin("check_zettabee_lag", zb.dst_fs())
    run_code, run_text = faults.plugin("check_zettabee_runtime", zb.dst_fs())
    row.observed = (
        f"killed; status {status_word(status.stdout)}; lag {STATES[lag_code]}; "
        f"runtime {STATES[run_code]}"
    )
    assert "Interrupted" in status.stdout and "Uninitialized" in status.stdout, status
    assert (lag_code, run_code) == (3, 2), (lag_text, run_text)
    assert re.search(r"initialize was interrupted", run_text), run_text
    [received] = snapshots(zb.dst_fs())
    update = faults.run("zettabee", "update", "--verbose", zb.dst_fs())
    assert update.code == 0, update.stderr
    assert f"adopting {zb.dst_fs()}" in update.stderr, update.stderr
    assert f"updated {received} -> " in update.stderr  # the base of an increment: not resent
    adopted = Replica(zb, "data")
    adopted.remember()
    assert (
        faults.plugin("check_zettabee_lag", adopted.fs)[0],
        faults.plugin("check_zettabee_runtime", adopted.fs)[0],
    ) == (0, 0)
    row.observed += "; update adopts the received snapshot: exit 0, lag OK, runtime OK"
    row.data = adopted.intact()
    assert row.data == INTACT


@every_backend
@pytest.mark.one_openzfs  # the second run stops at zettabee's own lock, before any zfs
def test_two_runs_of_one_pair_at_once(faults: Faults) -> None:
    replica = faults.replica(mb=1, options="transport=mbuffer,bwlimit=1M")
    # 24 s of stream at 1 MB/s: the second run and the plugins come while it runs (under a
    # load of 12, 6 MB ended before the plugins had answered, and its prune took the base)
    replica.grow(24)
    row = faults.expect(
        "two updates of one pair at once",
        "second: exit 3 naming the first's pid; runtime OK (running); first completes",
    )
    first = faults.popen("zettabee", "update", replica.fs)
    faults.wait_for_stream(first, replica)
    second = faults.run("zettabee", "update", replica.fs)
    run_code, run_text = faults.plugin("check_zettabee_runtime", replica.fs)
    pid = faults.pid(first)
    assert run_code == 0 and f"pid {pid}" in run_text, run_text
    faults.check(
        replica,
        second,
        code=3,
        lag=0,
        runtime=0,
        says=rf"another update is in progress \(pid {pid}, since .*\); not starting a second",
    )
    done = faults.finish(first)
    assert (done.code, done.stderr) == (0, "")
    replica.remember()
    row.observed += "; the first then completes: exit 0"
    row.data = replica.intact()
    assert row.data == INTACT


def test_replicate_all_overlapping_with_itself(faults: Faults) -> None:
    zb = faults.zb
    zb.make_source("slow", 1)
    zb.make_source("quick", 1)
    zb.write_pairs(zb.pair_line("slow", "transport=mbuffer,bwlimit=1M"), zb.pair_line("quick"))
    for leaf in ("slow", "quick"):
        assert zb.run("initialize", zb.dst_fs(leaf)).returncode == 0
    slow, quick = Replica(zb, "slow"), Replica(zb, "quick")
    slow.grow(24)  # 24 s of stream: both later runs come while it runs, even under load
    quick.grow(1)
    row = faults.expect(
        "replicate --all overlapping with itself (cron)",
        "second: exit 0, quiet, skips the busy pair; both pairs end up updated",
    )
    first = faults.popen("replicate", "--all", "--no-passive")
    faults.wait_for_stream(first, slow)
    quiet = faults.run("replicate", "--all", "--no-passive")
    verbose = faults.run("replicate", "--all", "--no-passive", "--verbose")
    done = faults.finish(first)
    row.observed = (
        f"second: exit {quiet.code}, {'quiet' if not quiet.stderr else 'NOT quiet'} "
        f"(--verbose says it skipped the busy pair); first: exit {done.code}"
    )
    assert (quiet.code, quiet.stdout, quiet.stderr) == (0, "", "")
    assert verbose.code == 0 and f"{slow.fs}: skipped: " in verbose.stderr, verbose.stderr
    assert "in progress" in verbose.stderr
    assert (done.code, done.stderr) == (0, "")
    states = []
    for replica in (slow, quick):
        replica.remember()
        states.append(faults.plugin("check_zettabee_lag", replica.fs)[0])
        states.append(faults.plugin("check_zettabee_runtime", replica.fs)[0])
    row.observed += f"; both pairs: lag and runtime {'OK' if states == [0] * 4 else states}"
    row.data = INTACT if all(r.intact() == INTACT for r in (slow, quick)) else "CHANGED"
    assert states == [0] * 4
    assert row.data == INTACT


def test_a_pair_another_run_updated_meanwhile_is_listed_again(faults: Faults) -> None:
    """``replicate`` lists the destinations here ahead, in one call. A pair that another
    run (a hand-started update, say) updated after that listing must not be sent from
    what the listing said: its update lists it again and goes in one round trip."""
    zb = faults.zb
    replicas = []
    for leaf in ("a", "b", "c"):
        zb.make_source(leaf, 1)
    zb.write_pairs(*(zb.pair_line(leaf) for leaf in ("a", "b", "c")))
    for leaf in ("a", "b", "c"):
        assert zb.run("initialize", zb.dst_fs(leaf)).returncode == 0
        replicas.append(Replica(zb, leaf))
        replicas[-1].grow(1)
    row = faults.expect(
        "a pair updated by another run after replicate listed it",
        "listed again (no step-by-step fallback); exit 0; every pair updated",
    )
    gate = faults.gate("receive-gate", " receive ")
    gate.arm()
    run = faults.popen("replicate", "--all", "--jobs", "1", "--debug", path_first=gate.dir)
    gate.wait(run)  # the first pair waits in its zfs receive, the listing ahead taken
    other = faults.run("zettabee", "update", replicas[2].fs)
    assert other.code == 0, other.stderr
    gate.release()
    done = faults.finish(run)
    fallbacks = [line for line in done.stderr.splitlines() if "step by step" in line]
    row.observed = f"exit {done.code}; step-by-step fallbacks: {len(fallbacks)}"
    assert done.code == 0, done.stderr
    assert not fallbacks, fallbacks
    for replica in replicas:
        replica.remember()
    row.data = INTACT if all(r.intact() == INTACT for r in replicas) else "CHANGED"
    assert row.data == INTACT


def test_a_nested_pair_killed_after_its_receive_reads_only_its_own_record(
    faults: Faults,
) -> None:
    """Pairs into ``backup/home`` and ``backup/home/alice``: alice's file system inherits
    home's ``zettabee:*`` properties until alice's own are recorded. Killed in between,
    alice must read as not initialized yet (and be adopted), never as home's replica."""
    zb = faults.zb
    zb.make_source("home", 2)
    # the place alice mounts in home's replica (read-only: zettabee cannot make it there)
    zb.srcside.sh(f"mkdir {zb.src_dir('home')}/alice")
    zb.write_pairs(zb.pair_line("home"))
    assert zb.run("initialize", zb.dst_fs("home")).returncode == 0
    home = Replica(zb, "home")
    home.remember()
    zb.make_source("alice", 2)
    nested = f"{home.fs}/alice"
    alice_line = zb.pair_line("alice").replace(f":{zb.dst_fs('alice')}", f":{nested}")
    zb.write_pairs(zb.pair_line("home"), alice_line)
    row = faults.expect(
        "SIGKILL of a nested pair's initialize after its receive (its parent a replica)",
        "lag UNKNOWN (not initialized), not CRITICAL 'carries fingerprint' of the parent; "
        "update adopts it, no resend",
    )
    faults.killed_before_the_record("initialize", nested)
    lag_code, lag_text = faults.plugin("check_zettabee_lag", nested)
    row.observed = f"killed; lag {STATES[lag_code]}: {lag_text.splitlines()[0][:90]}"
    assert "carries fingerprint" not in lag_text, lag_text
    assert lag_code == 3 and "not completed an initialize" in lag_text, lag_text
    [received] = snapshots(nested)
    update = faults.run("zettabee", "update", "--verbose", nested)
    assert update.code == 0, update.stderr
    assert f"adopting {nested}" in update.stderr, update.stderr
    assert f"updated {received} -> " in update.stderr  # the base of an increment: not resent
    alice = Replica(zb, "alice", dest=nested)
    alice.remember()
    codes = [faults.plugin("check_zettabee_lag", fs)[0] for fs in (nested, home.fs)]
    assert codes == [0, 0]
    row.observed += "; update adopts it: exit 0, both lags OK"
    row.data = alice.intact() if home.intact() == INTACT else "parent " + home.intact()
    assert row.data == INTACT
