"""The replicas themselves in trouble: a full pool, changes behind zettabee's back, lost
common snapshots, a second backup server pulling the same source under the same pair line.

zettabee must stop, say what happened and what to do, and destroy or roll back nothing
without consent; the advice it gives must then work.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.integration.faults.conftest import (
    INTACT,
    Faults,
    Replica,
    SecondServer,
    Sshd,
    destroy_past_the_hold,
    every_backend,
    snapshots,
)
from zettabee.pair import tag_of

pytestmark = pytest.mark.integration

NO_COMMON = r"no common snapshot .*`zettabee initialize --force` starts the replica over"


@every_backend
def test_destination_pool_full_mid_receive(faults: Faults, tiny_pool: str) -> None:
    replica = faults.replica(mb=4, dest=f"{tiny_pool}/{faults.zb.name}")
    replica.grow(120, "too-big.bin")
    faults.expect(
        "destination pool full mid-receive",
        "exit 1; lag OK; runtime CRITICAL quoting zfs receive's 'out of space'; recovers "
        "once the data fits",
    )
    faults.update_fails(replica, r"zfs receive on \S+ failed .*space")
    faults.zb.srcside.run("rm", str(replica.source_dir / "too-big.bin"))
    faults.recovers(replica)


@every_backend
def test_destination_modified_since_the_common_snapshot(faults: Faults) -> None:
    replica = faults.replica(mb=2)
    dst = faults.zb.dstside
    dst.run("zfs", "set", "readonly=off", replica.fs)
    dst.write_text(replica.dest_dir / "local-change.txt", "written on the replica\n")
    # More than the pipes hold: zfs send is still writing when zfs receive refuses the
    # stream, and either exits 1 without a word or is stopped by the relay first; the
    # message must name the receive either way (before the fix, 4 runs in 6 named the send)
    replica.grow(8)
    faults.expect(
        "destination modified since the common snapshot",
        "exit 1; lag OK; runtime CRITICAL 'modified ... rollback=yes'; nothing discarded; "
        "rollback=yes (as told) recovers",
    )
    faults.update_fails(
        replica, r"was modified since the common snapshot .*set rollback=yes .*zfs diff"
    )
    assert "local-change.txt" in dst.checksums(replica.dest_dir)  # kept until the operator says
    faults.zb.write_pairs(faults.zb.pair_line(replica.leaf, "rollback=yes"))
    faults.recovers(replica)


def test_destination_with_a_snapshot_the_source_lacks(faults: Faults) -> None:
    replica = faults.replica(mb=2)
    subprocess.run(["zfs", "snapshot", f"{replica.fs}@operator-kept"], check=True)
    faults.expect(
        "destination has a snapshot the source lacks",
        "exit 1; runtime CRITICAL naming it and rollback=yes; the snapshot kept",
    )
    faults.update_fails(replica, r"operator-kept; destroy them, or set rollback=yes")
    assert "operator-kept" in snapshots(replica.fs)


@every_backend
# "both" is the other two at once: what OpenZFS does on each side, they prove there.
@pytest.mark.parametrize(
    "where", ["source", "destination", pytest.param("both", marks=pytest.mark.zfs_independent)]
)
def test_common_snapshot_destroyed(faults: Faults, where: str) -> None:
    zb = faults.zb
    replica = faults.replica(mb=2)
    common = replica.snapshot
    tag = str(tag_of(common))
    if where in ("source", "both"):
        destroy_past_the_hold(zb.srcside, f"{zb.src_fs()}@{common}", tag)
    if where in ("destination", "both"):
        destroy_past_the_hold(zb.dstside, f"{replica.fs}@{common}", tag)
    replica.grow(1, "after.bin")
    on_destination = where != "source"
    faults.expect(
        f"common snapshot destroyed on {where} (its hold released first)",
        f"plain destroy refused (held); then: exit 1 'no common snapshot ... initialize "
        f"--force'; lag {'CRITICAL (recorded snapshot missing)' if on_destination else 'OK'}; "
        "runtime CRITICAL; nothing resent; initialize --force (as told) recovers",
    )
    before = zb.dstside.snapshots(replica.fs)
    faults.update_fails(
        replica, NO_COMMON, lag=2 if on_destination else 0, snapshot_destroyed=on_destination
    )
    assert zb.dstside.snapshots(replica.fs) == before  # nothing received over it, nothing destroyed
    if on_destination:
        lag = faults.plugin("check_zettabee_lag", replica.fs)[1]
        assert f"the recorded snapshot {replica.fs}@{common} is missing" in lag
    forced = faults.run("zettabee", "initialize", "--force", replica.fs)
    assert forced.code == 0, forced.stderr
    replica.same_as_source()
    assert faults.plugin("check_zettabee_lag", replica.fs)[0] == 0
    assert faults.plugin("check_zettabee_runtime", replica.fs)[0] == 0
    assert faults.row is not None
    faults.row.observed += "; initialize --force: exit 0, lag OK, runtime OK"


@pytest.mark.parametrize("where", ["source", "destination"])
def test_an_old_base_held_under_another_tag_is_kept(faults: Faults, where: str) -> None:
    """An operator's hold on the base an update leaves behind (a restore point kept by
    hand): the update succeeds at once, quietly, and the snapshot waits for its release."""
    zb = faults.zb
    replica = faults.replica(mb=2)
    old = replica.snapshot
    side, fs = (zb.srcside, zb.src_fs()) if where == "source" else (zb.dstside, replica.fs)
    side.run("zfs", "hold", "operator", f"{fs}@{old}")
    try:
        replica.grow(1)
        faults.expect(
            f"the old base held under another tag on the {where}",
            "exit 0, one destroy tried; lag OK, runtime OK; the snapshot kept (said with "
            "--verbose); later runs quiet; it goes with the run after its release",
        )
        outcome = faults.run("zettabee", "--debug", "update", replica.fs)
        kept = rf"kept \S+:{fs}@{old}: a hold under another tag keeps it"
        faults.check(replica, outcome, code=0, lag=0, runtime=0, says=kept, updated=True)
        destroys = [line for line in outcome.stderr.splitlines()
                    if "zfs destroy" in line and f"{fs}@{old}" in line and "run on" in line]  # fmt: skip
        assert len(destroys) == 1, destroys  # not tried again and again: the hold is not going
        assert old in side.snapshots(fs) and side.zget(f"{fs}@{old}", "userrefs") == "1"

        replica.grow(1)
        quiet = faults.run("zettabee", "update", replica.fs)
        assert (quiet.code, quiet.stdout, quiet.stderr) == (0, "", ""), quiet
        assert old in side.snapshots(fs)
    finally:  # the lab's clean-up cannot destroy what the operator holds
        side.run("zfs", "release", "operator", f"{fs}@{old}", check=False)
    replica.grow(1)
    after = faults.run("zettabee", "--verbose", "update", replica.fs)
    assert after.code == 0, after.stderr
    said = [line for line in after.stderr.splitlines() if "destroyed" in line]
    assert any(f"{fs}@{old}" in line for line in said), after.stderr
    assert old not in side.snapshots(fs), after.stderr
    replica.same_as_source()
    assert faults.row is not None
    faults.row.observed += "; after the release: exit 0, the snapshot destroyed"


def test_the_source_refuses_to_hold_the_new_base_after_the_receive(
    faults: Faults, sshd: Sshd
) -> None:
    """The stream arrived and the replica has the new snapshot, but the source's
    ``zfs hold`` of it fails: the update fails saying so, the old base stays held, and
    the next update, once holds work again, tidies the source."""
    gate = faults.gate("hold-gate", " hold ")
    sshd.start(path_first=gate.dir)
    replica = faults.replica(mb=2, options=sshd.options())
    old = replica.snapshot
    replica.grow(1)
    gate.arm()
    gate.abort()  # every zfs hold on the source fails at once, saying nothing (exit 99)
    faults.expect(
        "the source's zfs hold of the new base fails after the receive",
        "exit 1 naming zfs hold; the replica has the new snapshot, recorded: lag OK; "
        "runtime CRITICAL; the old base still held on the source; the next update tidies",
    )
    outcome = faults.run("zettabee", "update", replica.fs)
    faults.check(
        replica, outcome, code=1, lag=0, runtime=2, says=r"zfs hold on \S+ failed \(exit 99\)",
        updated=True,
    )  # fmt: skip
    assert replica.snapshot != old  # received and recorded before the hold failed
    left = replica.source_holds()
    assert left == {old: 1, replica.snapshot: 0}, left
    gate.remove()
    faults.recovers(replica)
    now = replica.source_holds()
    assert now == {replica.snapshot: 1}, now


@pytest.mark.parametrize("path", ["one round trip", "step by step"])
def test_failed_runs_leave_no_held_snapshots_behind(faults: Faults, path: str) -> None:
    """Every run takes a new snapshot on the source (held, on the step-by-step path)
    before its stream; when the receive refuses the stream and leaves no resume token,
    that snapshot is released and destroyed again: cron's failed runs, one after another,
    must not pile held snapshots up on production. The mbuffer transport goes step by
    step; ssh in one round trip."""
    zb = faults.zb
    steps = path == "step by step"
    options = zb.mbuffer() if steps else ""
    replica = faults.replica(mb=2, options=options)
    before = replica.source_holds()
    assert before == {replica.snapshot: 1}, before
    zb.dstside.run("zfs", "set", "readonly=off", replica.fs)
    zb.dstside.write_text(replica.dest_dir / "local-change.txt", "written on the replica\n")
    replica.grow(8)  # more than the pipes hold: the send is cut off as well as refused
    faults.expect(
        f"five updates refused by a modified replica ({path})",
        "each exit 1 'modified ... rollback=yes'; the source holds after each what it held "
        "before (the base, held once); rollback=yes recovers",
    )
    refused = r"was modified since the common snapshot .*rollback=yes"
    faults.update_fails(replica, refused)
    assert replica.source_holds() == before
    for _ in range(4):
        again = faults.run("zettabee", "update", replica.fs)
        assert again.code == 1 and re.search(refused, again.stderr), again.stderr
        assert replica.source_holds() == before
    assert replica.intact() == INTACT
    zb.write_pairs(zb.pair_line(replica.leaf, ",".join(o for o in (options, "rollback=yes") if o)))
    faults.recovers(replica)
    assert replica.source_holds() == {replica.snapshot: 1}


def test_two_backup_servers_under_one_pair_line_keep_each_other_s_base(
    faults: Faults, second_server: SecondServer
) -> None:
    """Two backup servers pull one source under the same pair line (``SRC:tank/x
    localhost:POOL/x`` on each, as the README writes pairs): one fingerprint. Server A is
    the lab's destination, server B a second ZFS on this machine with a pool of the same
    name, reaching the source by the same address. Each one's prune used to release and
    destroy the other's base, whose next update then found no common snapshot (a full
    resend, every time): each one's updates must stay incremental, each one's base held
    on the source, the data the same on both."""
    a, b = faults.zb, second_server
    fs = a.make_source("data", 2)
    line = f"{a.srcside.address}:{fs}  localhost:{a.dst_fs()}"
    a.write_pairs(line)
    b.write_pairs(line)
    assert a.fingerprint() == b.fingerprint()
    here = subprocess.run(["zpool", "get", "guid", a.dstside.pool], capture_output=True, text=True)
    assert b.zfs.guid() not in here.stdout  # two pools of one name: two ZFS instances
    servers = {"A": a, "B": b}
    replicas = {name: Replica(server, "data") for name, server in servers.items()}
    row = faults.expect(
        "two backup servers, one pair line (one fingerprint), pulling one source",
        "each one's initialize and 2 updates exit 0, incremental (its replica never made "
        "again); each one's base held on the source, the other's left alone; data the same",
    )
    codes: dict[str, list[int]] = {name: [] for name in servers}
    errors: list[str] = []

    def pull(name: str, action: str) -> None:
        server, replica = servers[name], replicas[name]
        out = server.run(action, server.dst_fs())
        codes[name].append(out.returncode)
        if out.returncode != 0:
            errors.append(f"{name} {action}: {out.stderr.strip()}")
            return
        replica.remember()  # the same data as the source, and its last good snapshot
        holds = replica.source_holds()
        mine = {r.snapshot: 1 for r in replicas.values() if r.snapshot}
        if holds != mine:
            errors.append(f"after {name}'s {action} the source holds {holds}, not {mine}")

    for name in servers:
        pull(name, "initialize")
    made = {name: s.dstside.zget(s.dst_fs(), "guid") for name, s in servers.items()}
    for n in range(2):
        replicas["A"].grow(1, f"more{n}.bin")
        for name in servers:
            pull(name, "update")
    remade = [n for n, s in servers.items() if s.dstside.zget(s.dst_fs(), "guid") != made[n]]
    row.observed = (
        "; ".join(f"{name}: exit {', '.join(map(str, c))}" for name, c in codes.items())
        + f"; {'; '.join(errors) or 'each base held on the source, once'}"
        + (f"; made again: {', '.join(remade)}" if remade else "")
    )
    verdicts = {name: replica.intact() for name, replica in replicas.items()}
    row.data = INTACT if set(verdicts.values()) == {INTACT} else str(verdicts)
    assert not errors, errors
    assert codes == {"A": [0, 0, 0], "B": [0, 0, 0]} and not remade
    assert replicas["A"].snapshot != replicas["B"].snapshot
    assert row.data == INTACT
