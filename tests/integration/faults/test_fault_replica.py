"""The replicas themselves in trouble: a full pool, changes behind zettabee's back, lost
common snapshots.

zettabee must stop, say what happened and what to do, and destroy or roll back nothing
without consent; the advice it gives must then work.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import write_random
from tests.integration.faults.conftest import Faults, destroy_past_the_hold, snapshots
from zettabee.pair import hold_tag

pytestmark = pytest.mark.integration

NO_COMMON = r"no common snapshot .*`zettabee initialize --force` starts the replica over"


def test_destination_pool_full_mid_receive(faults: Faults, tiny_pool: str) -> None:
    replica = faults.replica(mb=4, dest=f"{tiny_pool}/{faults.zb.name}")
    replica.grow(120, "too-big.bin")
    faults.expect(
        "destination pool full mid-receive",
        "exit 1; lag OK; runtime CRITICAL quoting zfs receive's 'out of space'; recovers "
        "once the data fits",
    )
    faults.update_fails(replica, r"zfs receive on \S+ failed .*space")
    (replica.source_dir / "too-big.bin").unlink()
    faults.recovers(replica)


def test_destination_modified_since_the_common_snapshot(faults: Faults) -> None:
    replica = faults.replica(mb=2)
    subprocess.run(["zfs", "set", "readonly=off", replica.fs], check=True)
    (replica.dest_dir / "local-change.txt").write_text("written on the replica\n")
    replica.grow(1)
    faults.expect(
        "destination modified since the common snapshot",
        "exit 1; lag OK; runtime CRITICAL 'modified ... rollback=yes'; nothing discarded; "
        "rollback=yes (as told) recovers",
    )
    faults.update_fails(
        replica, r"was modified since the common snapshot .*set rollback=yes .*zfs diff"
    )
    assert (replica.dest_dir / "local-change.txt").exists()  # kept until the operator says
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


@pytest.mark.parametrize("where", ["source", "destination", "both"])
def test_common_snapshot_destroyed(faults: Faults, where: str) -> None:
    zb = faults.zb
    replica = faults.replica(mb=2)
    common = replica.snapshot
    tag = hold_tag(replica.fingerprint)
    if where in ("source", "both"):
        destroy_past_the_hold(zb.srcside, f"{zb.src_fs()}@{common}", tag)
    if where in ("destination", "both"):
        destroy_past_the_hold(zb.dstside, f"{replica.fs}@{common}", tag)
    write_random(replica.source_dir / "after.bin", 1)
    on_destination = where != "source"
    faults.expect(
        f"common snapshot destroyed on {where} (its hold released first)",
        f"plain destroy refused (held); then: exit 1 'no common snapshot ... initialize "
        f"--force'; lag {'CRITICAL (recorded snapshot missing)' if on_destination else 'OK'}; "
        "runtime CRITICAL; nothing resent; initialize --force (as told) recovers",
    )
    before = snapshots(replica.fs)
    faults.update_fails(
        replica, NO_COMMON, lag=2 if on_destination else 0, snapshot_destroyed=on_destination
    )
    assert snapshots(replica.fs) == before  # nothing received over it, nothing destroyed
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
