"""How an update gets there, on the real lab: in one round trip when the destination's
newest snapshot is still on the source, step by step otherwise, with ``--debug`` saying
what each part cost."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import Zb, write_random
from zettabee.pair import hold_tag, parse_snapshot_name, snapshot_name, tag_of
from zettabee.state import pid_alive

pytestmark = pytest.mark.integration

PARTS = ("connection", "listing", "snapshot", "send", "receive", "record", "prune")


def initialized(zb: Zb, options: str = "") -> None:
    zb.make_source(mb=2)
    zb.write_pairs(zb.pair_line(options=options))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr


def timings(stderr: str) -> dict[str, float]:
    line = next(line for line in stderr.splitlines() if ": timings " in line)
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)s", line)}


def destroy_from_outside(zb: Zb, snap: str) -> None:
    """What another tool or an operator does: release the pair's hold, then destroy."""
    tag = tag_of(snap)
    assert tag is not None, snap
    zb.src.run("zfs", "release", tag, snap)
    zb.src.run("zfs", "destroy", snap)


def remote_commands(zb: Zb, stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if f"run on {zb.src.address}:" in line]


def test_a_routine_update_is_one_command_on_the_source_and_debug_times_each_part(
    zb: Zb,
) -> None:
    initialized(zb)
    write_random(zb.src_dir() / "more.bin", 3)
    out = zb.run("--debug", "update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    # Snapshot, hold, send, listing, and once the stream was received the release and
    # destroy of the old base, all went as the one stream command. No probe:
    # initialize's answer is believed for an hour.
    assert "step by step" not in out.stderr
    assert remote_commands(zb, out.stderr) == []
    held = zb.src.run(
        "zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", zb.src_fs()
    ).stdout.split("\n")
    snaps = [line.split("\t") for line in held if "@" in line]
    assert len(snaps) == 1 and snaps[0][1] == "1", held  # the new base, and it is held
    parts = timings(out.stderr)
    assert set(PARTS) <= set(parts), parts
    assert out.stderr.count("ssh to ") == 1


def source_snapshots(zb: Zb) -> dict[str, int]:
    """The source's snapshots and their hold counts."""
    out = zb.src.run("zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", zb.src_fs())
    rows = [line.split("\t") for line in out.stdout.splitlines() if "@" in line]
    return {name.partition("@")[2]: int(refs) for name, refs in rows}


def test_what_a_failed_update_left_on_the_source_goes_with_the_next_one(zb: Zb) -> None:
    """After a clean update the next one does not list the source; after a failed one it
    does, and destroys what a killed run left there (a failed run destroys its own)."""
    initialized(zb)
    assert zb.run("update", zb.dst_fs()).returncode == 0  # the source is tidy after it
    (base,) = source_snapshots(zb)
    zb.dstside.run("zfs", "set", "readonly=off", zb.dst_fs())
    zb.dstside.write_text(zb.dst_dir() / "local-change", "oops")
    time.sleep(1.1)  # a snapshot name of its own second
    failed = zb.run("update", zb.dst_fs())
    assert failed.returncode == 1 and "modified" in failed.stderr, failed.stderr
    assert source_snapshots(zb) == {base: 1}  # the base stays, held; the new one is gone
    # What a run killed after its snapshot leaves: a snapshot of the pair's, not held.
    replica = parse_snapshot_name(base)
    assert replica is not None and replica.rid is not None, base
    leftover = snapshot_name(zb.fingerprint(), replica.rid, datetime.now(UTC))
    zb.src.run("zfs", "snapshot", f"{zb.src_fs()}@{leftover}")
    left = source_snapshots(zb)
    zb.dstside.run("zfs", "rollback", f"{zb.dst_fs()}@{base}")
    zb.srcside.write_text(zb.src_dir() / "after", "more")
    time.sleep(1.1)
    out = zb.run("--verbose", "update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    now = source_snapshots(zb)
    assert list(now.values()) == [1] and not set(now) & set(left), (left, now)
    assert f"destroyed {zb.src.address}:{zb.src_fs()}@{leftover}" in out.stderr


def test_a_replaced_base_snapshot_on_the_source_is_never_received(zb: Zb) -> None:
    initialized(zb)
    base = zb.src.run("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", zb.src_fs())
    (snap,) = base.stdout.split()
    destroy_from_outside(zb, snap)
    write_random(zb.src_dir() / "after.bin", 1)
    zb.src.run("zfs", "snapshot", snap)  # the same name, another snapshot (another guid)
    before = zb.dstside.checksums(zb.dst_dir())

    out = zb.run("--debug", "update", zb.dst_fs())
    assert out.returncode == 1
    assert "is not on" in out.stderr and "step by step" in out.stderr
    assert "no common snapshot" in out.stderr and "initialize --force" in out.stderr
    assert zb.dstside.checksums(zb.dst_dir()) == before


def test_when_the_newest_snapshot_is_gone_the_update_goes_step_by_step(zb: Zb) -> None:
    initialized(zb, "intermediate=yes,rollback=yes,keep=3")
    zb.src.run("zfs", "snapshot", f"{zb.src_fs()}@manual")
    write_random(zb.src_dir() / "one.bin", 1)
    assert zb.run("update", zb.dst_fs()).returncode == 0
    newest = zb.src.run("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", zb.src_fs())
    destroy_from_outside(zb, newest.stdout.split()[-1])  # gone from the source only
    write_random(zb.src_dir() / "two.bin", 1)

    out = zb.run("--debug", "update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert "step by step" in out.stderr
    zb.assert_same_data()
    status = zb.run("status", zb.dst_fs())
    assert "Synchronized" in status.stdout


def children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), cmdline))
    return found


def test_a_killed_run_leaves_no_ssh_connection_behind(zb: Zb) -> None:
    initialized(zb)
    write_random(zb.src_dir() / "big.bin", 40)
    run = zb.popen("zettabee", "update", zb.dst_fs())
    masters: list[int] = []
    deadline = time.monotonic() + 30
    while not masters and time.monotonic() < deadline and run.poll() is None:
        masters = [pid for pid, cmd in children(run.pid) if "ControlMaster=yes" in cmd]
        time.sleep(0.01)
    assert masters, "the run's ssh master was never seen"
    run.kill()  # SIGKILL: no handler, no cleanup of its own
    run.communicate()
    deadline = time.monotonic() + 20
    while pid_alive(masters[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(masters[0]), "the killed run's ssh master is still connected"
    out = zb.run("update", zb.dst_fs())  # the pair is interrupted, not broken
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()


@pytest.mark.parametrize("transport", ["ssh", "mbuffer"])
def test_initialize_takes_its_snapshot_with_the_stream_and_says_when_the_source_is_missing(
    zb: Zb, transport: str
) -> None:
    zb.make_source(mb=2)
    zb.write_pairs(
        zb.pair_line(options=f"transport={transport}"),
        zb.pair_line("absent", f"transport={transport}"),
    )
    out = zb.run("--debug", "initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    if transport == "ssh":  # mbuffer's full send goes step by step (holds first)
        assert f"run on {zb.src.address}: zfs snapshot" not in out.stderr
    parts = {"listing", "stream", "record"} | ({"connection"} if transport == "ssh" else set())
    assert parts <= set(timings(out.stderr))

    missing = zb.run("initialize", zb.dst_fs("absent"))
    assert missing.returncode == 1
    assert f"the source {zb.src.address}:{zb.src_fs('absent')} does not exist" in missing.stderr


@pytest.mark.parametrize("path", ["one round trip", "step by step"])
def test_a_pair_named_before_the_replica_id_updates_without_a_resend(zb: Zb, path: str) -> None:
    """A pair that a zettabee without the replica id initialized: its snapshot is
    ``zettabee.<fp>.<stamp>``, held under ``zettabee.<fp>`` on both sides (made here from
    what this version made, renamed and held again: the guids are what count). The first
    update goes on from it, incremental; its new snapshot carries the replica id and is
    held under its tag; the old base is released under its own tag and destroyed on both
    sides. The mbuffer transport goes step by step, ssh in one round trip."""
    initialized(zb, zb.mbuffer() if path == "step by step" else "")
    src_fs, dst_fs = zb.src_fs(), zb.dst_fs()
    [first] = source_snapshots(zb)
    named = parse_snapshot_name(first)
    assert named is not None and named.rid is not None, first
    old = f"zettabee.{named.fp}.{named.when:%Y%m%dT%H%M%SZ}"
    for side, fs in ((zb.srcside, src_fs), (zb.dstside, dst_fs)):
        side.run("zfs", "release", str(tag_of(first)), f"{fs}@{first}")
        side.run("zfs", "rename", f"{fs}@{first}", f"{fs}@{old}")
        side.run("zfs", "hold", hold_tag(named.fp, None), f"{fs}@{old}")
    zb.dstside.run("zfs", "set", f"zettabee:lastsnap={old}", dst_fs)
    made = zb.dstside.zget(dst_fs, "guid")
    zb.srcside.write_random(zb.src_dir() / "after.bin", 1)
    out = zb.run("--verbose", "update", dst_fs)
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    [new] = source_snapshots(zb)
    assert new.startswith(f"zettabee.{named.fp}.{named.rid}.")
    assert source_snapshots(zb) == {new: 1}  # the old base released and gone
    assert f"destroyed {zb.src.address}:{src_fs}@{old}" in out.stderr, out.stderr
    assert zb.dstside.snapshots(dst_fs) == [new]
    assert zb.dstside.zget(f"{dst_fs}@{new}", "userrefs") == "1"
    assert zb.dstside.zget(dst_fs, "guid") == made  # the replica was never sent again
