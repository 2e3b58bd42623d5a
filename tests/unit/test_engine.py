"""Unit tests of the engine's pure parts: argv builders, parsers, pruning, pipelines, state."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from zettabee import mbuffer, pipeline, relay, transport, zfs
from zettabee.errors import LockHeld
from zettabee.health import INCONSISTENT, SYNCHRONIZED, UNINITIALIZED, read_health
from zettabee.host import Result, SshTarget, error_for
from zettabee.pair import (
    Endpoint,
    Pair,
    Replica,
    fingerprint,
    hold_tag,
    is_own_snapshot,
    is_pair_snapshot,
    parse_snapshot_name,
    replica_id,
    snapshot_name,
    tag_of,
)
from zettabee.replicator import HeldElsewhere, destroy, destroy_all, plan_prune
from zettabee.state import INTERRUPTED, RUNNING, StateStore, Status

FP = "0123456789abcdef0123456789abcdef"
RID, OTHER_RID = "0a1b2c3d", "99887766"


def snap(fp: str, stamp: str, rid: str | None = RID) -> str:
    return f"zettabee.{fp}.{rid}.{stamp}" if rid else f"zettabee.{fp}.{stamp}"


NEW_YEAR = 1767225600  # 20260101T000000Z


# -- zfs argv builders ---------------------------------------------------------------


def test_send_argv() -> None:
    assert zfs.send("p/fs@b") == ["zfs", "send", "p/fs@b"]
    assert zfs.send("p/fs@b", base="p/fs@a") == ["zfs", "send", "-i", "p/fs@a", "p/fs@b"]
    assert zfs.send("p/fs@b", base="p/fs@a", intermediate=True, raw=True) == [
        "zfs", "send", "-w", "-I", "p/fs@a", "p/fs@b",
    ]  # fmt: skip


def test_recv_get_destroy_argv() -> None:
    assert zfs.recv("d/fs") == ["zfs", "receive", "d/fs"]
    assert zfs.recv("d/fs", force=True, resumable=True) == ["zfs", "receive", "-F", "-s", "d/fs"]
    assert zfs.recv("d/fs", resumable=True, unmounted=True) == [
        "zfs", "receive", "-s", "-u", "d/fs",
    ]  # fmt: skip
    assert zfs.get(["a", "b"], ["guid", "creation"], depth=1) == [
        "zfs", "get", "-Hp", "-d", "1", "-o", "name,property,value", "guid,creation", "--", "a", "b",
    ]  # fmt: skip
    assert zfs.destroy("p/fs@s") == ["zfs", "destroy", "p/fs@s"]
    with pytest.raises(ValueError, match="without -r"):
        zfs.destroy("p/fs")
    assert zfs.set_prop("p/fs", "readonly", "on") == ["zfs", "set", "readonly=on", "p/fs"]


ZFS_GET = (
    "p/fs\tguid\t111\n"
    "p/fs\tcreation\t1000\n"
    "p/fs@b\tguid\t3\n"
    "p/fs@b\tcreation\t1005\n"
    "p/fs@b\tcreatetxg\t40\n"
    "p/fs@a\tguid\t2\n"
    "p/fs@a\tcreation\t1005\n"
    "p/fs@a\tcreatetxg\t30\n"
    "p/fs/child\tguid\t9\n"
    "p/fs/child\tcreation\t1006\n"
)


def test_parse_snapshots_orders_by_txg_and_drops_children() -> None:
    snaps = zfs.parse_snapshots("p/fs", ZFS_GET)
    assert [s.name for s in snaps] == ["a", "b"]
    assert snaps[1].full == "p/fs@b" and snaps[1].guid == 3 and snaps[1].creation == 1005


def test_parse_get_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="unexpected"):
        zfs.parse_get("no tabs here\n")


def test_common_snapshot_by_guid_not_name() -> None:
    src = [zfs.Snapshot("s", "a", 1, 10), zfs.Snapshot("s", "b", 2, 20)]
    dst = [zfs.Snapshot("d", "a", 1, 10), zfs.Snapshot("d", "b", 99, 20)]
    common = zfs.common_snapshot(src, dst)
    assert common is not None and common.name == "a"
    assert zfs.common_snapshot(src, [zfs.Snapshot("d", "x", 5, 1)]) is None


# -- pair identity and snapshot names ------------------------------------------------


def test_fingerprint_is_the_seeds_md5() -> None:
    import hashlib

    fp = fingerprint(Endpoint("src", "tank/a"), Endpoint("dst", "backup/a"))
    assert fp == hashlib.md5(b"src:tank/a::dst:backup/a").hexdigest()


def test_snapshot_names_are_utc_and_round_trip() -> None:
    from datetime import timedelta, timezone

    when = datetime(2026, 3, 29, 2, 30, 0, tzinfo=timezone(timedelta(hours=2)))
    name = snapshot_name(FP, RID, when)
    assert name == f"zettabee.{FP}.{RID}.20260329T003000Z"
    parsed = parse_snapshot_name(f"tank/a@{name}")
    assert parsed == (FP, datetime(2026, 3, 29, 0, 30, tzinfo=UTC), RID)
    assert parsed is not None and parsed.rid == RID and parsed.fp == FP
    assert parse_snapshot_name("zettabee.nothex.20260329T003000Z") is None
    with pytest.raises(ValueError):
        snapshot_name(FP, RID, datetime(2026, 1, 1))


def test_names_from_before_the_replica_id_still_parse_without_one() -> None:
    legacy = parse_snapshot_name(f"tank/a@zettabee.{FP}.20260329T003000Z")
    assert legacy == (FP, datetime(2026, 3, 29, 0, 30, tzinfo=UTC), None)
    for bad in (
        f"zettabee.{FP}.0a1b2c3.20260329T003000Z",  # seven digits
        f"zettabee.{FP}.0A1B2C3D.20260329T003000Z",  # not as zettabee writes hex
        f"zettabee.{FP}.{RID}.{RID}.20260329T003000Z",
        f"zettabee.{FP}.{RID}.20261399T003000Z",  # month 13
        f"zettabee.{FP}.{RID}",
    ):
        assert parse_snapshot_name(bad) is None, bad


def test_a_replica_id_is_the_pool_guid_s_and_names_sort_by_time_within_it() -> None:
    import hashlib

    assert replica_id("5005940027499530020") == hashlib.md5(b"5005940027499530020").hexdigest()[:8]
    assert replica_id("5005940027499530020") != replica_id("12366063459609246760")
    names = [
        snapshot_name(FP, RID, datetime(2026, 1, day, hour, tzinfo=UTC))
        for day in (1, 2, 12)
        for hour in (0, 9, 23)
    ]
    assert sorted(names) == names


def test_tags_are_the_snapshot_name_without_the_time() -> None:
    assert hold_tag(FP, RID) == f"zettabee.{FP}.{RID}"
    assert hold_tag(FP, None) == f"zettabee.{FP}"
    assert tag_of(f"tank/a@{snap(FP, '20260101T000000Z')}") == f"zettabee.{FP}.{RID}"
    assert tag_of(snap(FP, "20260101T000000Z", rid=None)) == f"zettabee.{FP}"
    assert tag_of("tank/a@manual") is None
    assert Replica(FP, RID).tag == hold_tag(FP, RID)


def test_on_the_source_a_replica_owns_its_own_and_the_names_from_before_it() -> None:
    mine, legacy = snap(FP, "20260101T000000Z"), snap(FP, "20260101T000000Z", rid=None)
    theirs = snap(FP, "20260101T000000Z", rid=OTHER_RID)
    other_pair = snap("f" * 32, "20260101T000000Z")
    replica = Replica(FP, RID)
    assert [replica.on_source(n) for n in (mine, legacy, theirs, other_pair, "manual")] == [
        True, True, False, False, False,
    ]  # fmt: skip
    assert [is_own_snapshot(n, FP, RID) for n in (mine, legacy, theirs)] == [True, True, False]
    # on the destination, every snapshot of the pair is this replica's
    assert [replica.on_destination(n) for n in (mine, legacy, theirs, other_pair)] == [
        True, True, True, False,
    ]  # fmt: skip
    assert is_pair_snapshot(theirs, FP) and not is_pair_snapshot("manual", FP)


# -- pruning -------------------------------------------------------------------------


def test_plan_prune_never_takes_the_common_snapshot() -> None:
    a, b, c = (snap(FP, f"2026010{i}T000000Z") for i in (1, 2, 3))
    other = snap("f" * 32, "20260101T000000Z")
    replica = Replica(FP, RID)
    src_doomed, dst_doomed = plan_prune(replica, [a, "manual", b, c], [a, other, b, c], c, keep=2)
    assert src_doomed == [a, b]
    assert dst_doomed == [a]  # keeps b and c; never touches other pairs' or manual snapshots
    assert plan_prune(replica, [a, b], [a, b], "", keep=1) == ([], [])
    _, dst_doomed = plan_prune(replica, [a, b, c], [a, b, c], b, keep=1)
    assert dst_doomed == [a]  # c is newer than the common snapshot: not ours to judge here


def test_plan_prune_leaves_another_backup_server_s_snapshots_on_the_source() -> None:
    """Two servers pull one source under one pair line: one fingerprint, two replica ids.
    Each one's prune takes its own older snapshots and never the other's, older or not."""
    theirs_base = snap(FP, "20260101T120000Z", rid=OTHER_RID)
    a, b = snap(FP, "20260101T000000Z"), snap(FP, "20260102T000000Z")
    theirs_older = snap(FP, "20251231T000000Z", rid=OTHER_RID)
    source = [theirs_older, a, theirs_base, b]
    src_doomed, _ = plan_prune(Replica(FP, RID), source, [a, b], b, keep=1)
    assert src_doomed == [a]
    src_doomed, _ = plan_prune(Replica(FP, OTHER_RID), source, [theirs_older, theirs_base],
                               theirs_base, keep=1)  # fmt: skip
    assert src_doomed == [theirs_older]


def test_plan_prune_takes_the_names_from_before_the_replica_id_once() -> None:
    """The first update after the upgrade: the base named before the replica id, and what
    older runs left under such names, go once the new base is common (as before)."""
    old, older = (snap(FP, f"2026010{i}T000000Z", rid=None) for i in (2, 1))
    new = snap(FP, "20260103T000000Z")
    src_doomed, dst_doomed = plan_prune(Replica(FP, RID), [older, old, new], [old, new], new, 1)
    assert src_doomed == [older, old]
    assert dst_doomed == [old]


# -- remote pipelines ------------------------------------------------------------------


def test_pipeline_script_reports_each_stage(tmp_path: Path) -> None:
    script = pipeline.pipeline_script(
        [["sh", "-c", "echo data; echo send-broke >&2; exit 3"], ["cat"]]
    )
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stdout == "data\n"
    codes, errs, _ = pipeline.parse_pipeline_stderr(proc.stderr, 2)
    assert codes == [3, 0]
    assert errs == ["send-broke", ""]


def test_pipeline_script_quotes_hostile_arguments(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    hostile = f"x; touch {target}; $(touch {target}) `touch {target}` 'q\" \n"
    script = pipeline.pipeline_script([["printf", "%s", hostile], ["cat"]])
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert proc.stdout == hostile
    assert not target.exists()


def test_ssh_client_argv_quotes_once() -> None:
    argv = SshTarget("[fe80::1]", 2222, "zb", "/k", "/kh").ssh_client_argv("zfs send 'a b'")
    assert argv[:3] == ["ssh", "-p", "2222"]
    assert argv[-3:] == ["--", "fe80::1", "zfs send 'a b'"]
    assert "StrictHostKeyChecking=yes" in argv and "UserKnownHostsFile=/kh" in argv


def test_errors_carry_the_tools_message() -> None:
    err = error_for(["zfs", "destroy", "p@s"], "h", 1, "cannot destroy 'p@s': dataset is busy\n")
    assert "zfs destroy on h failed (exit 1): cannot destroy 'p@s': dataset is busy" == str(err)


def test_an_error_followed_by_the_usage_text_quotes_the_complaint() -> None:
    """What zfs-fuse says to ``zfs list -t bookmark``: the last lines are its usage."""
    said = (
        "invalid type 'bookmark'\nusage:\n\tlist [-rH][-d max] [-o property[,...]] "
        "[-t type[,...]] [-s property] ...\n\t    [-S property] ... "
        "[filesystem|volume|snapshot] ...\n\nThe following properties are supported:\n"
        '\tSMB SID         (eg: "S-1-234-567-89")\n'
    )
    err = error_for(["zfs", "list", "-t", "bookmark"], "src", 2, said)
    assert str(err) == (
        "zfs list on src failed (exit 2): invalid type 'bookmark' (then its usage: the zfs "
        "there does not take the command zettabee gave)"
    )


def test_relay_counts_and_detects_stall() -> None:
    sender = subprocess.Popen(
        ["sh", "-c", "head -c 3000000 /dev/zero; sleep 30"], stdout=subprocess.PIPE
    )
    receiver = subprocess.Popen(["wc", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert sender.stdout and receiver.stdin
    piped = relay.Relay(sender.stdout, receiver.stdin, stall=1.5, progress=None)
    piped.run(on_stall=sender.kill)
    assert piped.stalled and piped.count == 3000000
    assert receiver.stdout and receiver.stdout.read().strip() == b"3000000"
    receiver.wait()
    sender.wait()


def test_relay_takes_a_receiver_that_exits_on_the_last_byte_as_a_whole_stream() -> None:
    # The receiver has the whole stream and exits before the sender closes its end:
    # zfs receive does that on the stream's last record, and splice(2) then says EPIPE.
    sender = subprocess.Popen(["sh", "-c", "printf abc; sleep 0.3"], stdout=subprocess.PIPE)
    receiver = subprocess.Popen(["head", "-c", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert sender.stdout and receiver.stdin
    piped = relay.Relay(sender.stdout, receiver.stdin, stall=30, progress=None)
    piped.run(on_stall=sender.kill)
    assert piped.error is None and piped.count == 3
    assert receiver.stdout and receiver.stdout.read() == b"abc"
    assert (receiver.wait(), sender.wait()) == (0, 0)


def test_relay_reports_a_receiver_that_leaves_before_the_end() -> None:
    """Bytes wait in the sender's pipe (written before the relay starts, its end still
    open) and the receiver has gone: the stream was cut short. A sending process would
    leave it to the scheduler whether the pipe holds a byte at the moment the receiver
    goes, and the relay cannot tell a cut from an end that way (the CI saw it)."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"\0" * 60000)  # fits a pipe's 64 KiB: written without a reader
    receiver = subprocess.Popen(["true"], stdin=subprocess.PIPE)
    receiver.wait()
    assert receiver.stdin
    with open(read_end, "rb", buffering=0) as src:
        piped = relay.Relay(src, receiver.stdin, stall=30, progress=None)
        piped.run(on_stall=lambda: None)
    os.close(write_end)
    assert piped.error == "the receiving side closed the stream"
    assert piped.receiver_left and piped.count == 0


# -- state ---------------------------------------------------------------------------


def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state", tmp_path / "run", tmp_path / "log")


def test_a_set_group_id_state_dir_keeps_the_monitoring_group_on_new_status_files(
    tmp_path: Path,
) -> None:
    """The README's permissions for plugins run by a monitoring group: every status
    write makes a new file, which must come out in that group, also after `setup`."""
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another group needs root")
    monitoring_gid = 65534
    st = store(tmp_path)
    st.ensure_dirs()
    os.chown(st.state_dir, -1, monitoring_gid)
    os.chmod(st.state_dir, 0o2750)
    st.ensure_dirs()  # what `zettabee setup` does
    assert st.state_dir.stat().st_mode & 0o7777 == 0o2750
    st.write_status(Status(FP, "dst:backup/data"))
    written = st.status_path(FP).stat()
    assert (written.st_gid, written.st_mode & 0o777) == (monitoring_gid, 0o640)


def test_lock_refuses_a_second_holder_and_names_it(tmp_path: Path) -> None:
    st = store(tmp_path)
    child = subprocess.Popen(
        ["python3", "-c", "import fcntl,os,sys,time,json;"
         f"fd=os.open('{tmp_path}/run/{FP}.lock', os.O_RDWR|os.O_CREAT);"
         "fcntl.flock(fd, fcntl.LOCK_EX);"
         "os.write(fd, json.dumps({'pid': os.getpid(), 'action': 'update'}).encode());"
         "print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    (tmp_path / "run").mkdir(exist_ok=True)
    try:
        assert child.stdout and child.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeld, match=f"pid {child.pid}"), st.lock(FP, "p", "update"):
            pass
        holder = st.lock_holder(FP)
        assert holder is not None and holder["pid"] == child.pid
        with pytest.raises(LockHeld, match="refuses"):
            st.unlock(FP, "p")
    finally:
        child.kill()
        child.wait()
    assert st.lock_holder(FP) is None  # the kernel released it with the process
    with st.lock(FP, "p", "update"):
        assert st.lock_holder(FP) is not None


def test_unlock_keeps_the_lock_file_that_a_run_may_have_opened(tmp_path: Path) -> None:
    """A run that opened the lock file just before unlock cleared it must still keep the
    next run out: the file is the same one after unlock, its record of the dead run gone."""
    st = store(tmp_path)
    with st.lock(FP, "p", "update"):
        pass
    st.write_status(Status(FP, pair="a -> b", state=RUNNING, pid=999999999))
    before = os.stat(st.lock_path(FP)).st_ino
    opened = os.open(st.lock_path(FP), os.O_RDWR)  # a run, between open and flock
    try:
        assert "cleared state running" in st.unlock(FP, "p")
        fcntl.flock(opened, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the run takes the lock now
        assert os.stat(st.lock_path(FP)).st_ino == before
        assert st.lock_path(FP).read_text() == ""
        with pytest.raises(LockHeld, match="in progress"), st.lock(FP, "p", "update"):
            pass
    finally:
        os.close(opened)


def test_status_file_is_atomic_and_survives_corruption(tmp_path: Path) -> None:
    st = store(tmp_path)
    st.write_status(Status(FP, pair="a -> b", state=RUNNING, pid=999999999))
    data = json.loads(st.status_path(FP).read_text())
    assert data["state"] == "running" and data["pid"] == 999999999
    status = st.read_status(FP)
    assert status.effective_state(lock_held=False) == INTERRUPTED
    assert oct(os.stat(st.status_path(FP)).st_mode & 0o777) == "0o640"
    st.status_path(FP).write_text('{"state": "idl')
    broken = st.read_status(FP)
    assert "unreadable" in broken.corrupt and broken.state == "idle"
    assert "cleared" in st.unlock(FP, "p")
    assert st.read_status(FP).corrupt == ""


# -- health from one zfs get ---------------------------------------------------------


class FakeHost:
    name = "localhost"
    is_local = True

    def __init__(self, stdout: str, returncode: int = 0, stderr: str = "") -> None:
        self.stdout, self.returncode, self.stderr = stdout, returncode, stderr
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], **_: object) -> Result:
        self.calls.append(list(argv))
        return Result(list(argv), self.name, self.returncode, self.stdout, self.stderr)

    def close(self) -> None:
        pass


def test_health_reads_every_pair_with_one_zfs_call(tmp_path: Path) -> None:
    pairs = [Pair(Endpoint("s", f"t/{n}"), Endpoint("d", f"b/{n}")) for n in ("x", "y", "z")]
    x, y = pairs[0], pairs[1]
    sx = snap(x.fingerprint, "20260101T000000Z")
    sy = snap(y.fingerprint, "20260101T000000Z")
    out = (
        f"b/x\tcreatetxg\t9\nb/x\tzettabee:fingerprint\t{x.fingerprint}\n"
        f"b/x\tzettabee:lastsnap\t{sx}\nb/x@{sx}\tcreatetxg\t10\n"
        f"b/y\tcreatetxg\t9\nb/y\tzettabee:fingerprint\t{'e' * 32}\n"
        f"b/y\tzettabee:lastsnap\t{sy}\nb/y@{sy}\tcreatetxg\t10\n"
    )
    host = FakeHost(out, 1, "cannot open 'b/z': dataset does not exist")
    now = NEW_YEAR + 300  # the lag is read from the snapshot's name
    healths = read_health(pairs, store(tmp_path), host=host, now=now)  # type: ignore[arg-type]
    assert len(host.calls) == 1
    assert [h.state for h in healths] == [SYNCHRONIZED, INCONSISTENT, UNINITIALIZED]
    assert healths[0].lag == 300 and healths[0].lastsnap == sx
    assert "fingerprint" in healths[1].reason
    assert "initialize" in healths[2].reason


def test_a_lone_uninitialized_pair_is_not_an_unreadable_zfs(tmp_path: Path) -> None:
    pair = Pair(Endpoint("s", "t/x"), Endpoint("d", "b/x"))
    host = FakeHost("", 1, "cannot open 'b/x': dataset does not exist\n")
    [health] = read_health([pair], store(tmp_path), host=host)  # type: ignore[arg-type]
    assert health.state == UNINITIALIZED and "zettabee initialize" in health.reason
    broken = FakeHost("", 1, "internal error: out of memory\n")
    [health] = read_health([pair], store(tmp_path), host=broken)  # type: ignore[arg-type]
    assert health.state == "Unreadable" and "out of memory" in health.reason


# -- pairs whose destination is remote -------------------------------------------------


def test_pipeline_script_live_stage_speaks_while_it_runs() -> None:
    """The live stage's stderr comes before the report (read as it is written); the
    report still carries every stage's exit status."""
    script = pipeline.pipeline_script(
        [["sh", "-c", "echo 5 bytes >&2; printf abc"], ["sh", "-c", "cat; exit 4"]], live=0
    )
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 4 and proc.stdout == "abc"
    codes, errs, head = pipeline.parse_pipeline_stderr(proc.stderr, 2)
    assert codes == [0, 4]
    assert head == "5 bytes" and errs == ["", ""]


def test_counts_read_from_mbuffer_and_dd_status_lines() -> None:
    status = (
        "mbuffer: warning: No controlling terminal and no autoloader command specified.\n"
        "\rin @ 67.7 MiB/s, out @ 67.7 MiB/s, 47.6 MiB total, buffer   0% full"
        "\rin @  0.0 kiB/s, out @  0.0 kiB/s, 512 kiB total, buffer   0% full"
    )
    assert mbuffer.mbuffer_bytes(status) == 512 * 1024
    assert mbuffer.mbuffer_bytes(status + "\nsummary: 47.7 MiByte in  2.4sec - avg") == int(
        47.7 * (1 << 20)
    )
    assert mbuffer.mbuffer_bytes("mbuffer: error: nothing moved") is None
    gnu = "1048576 bytes (1.0 MB, 1.0 MiB) copied, 1 s, 1.0 MB/s\r2097152 bytes (2.1 MB) copied"
    assert (
        transport.dd_bytes(
            gnu + "\n2+1 records in\n2+1 records out\n2100000 bytes (2.1 MB, 2.0 MiB) copied, 1.2 s"
        )
        == 2100000
    )
    assert (
        transport.dd_bytes("0+1 records in\n0+1 records out\n12 bytes transferred in 0.01 secs")
        == 12
    )
    assert transport.dd_bytes("dd: unknown operand status") is None


PROC_TCP = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
    "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0 "
    "       0 4242 1 0000000000000000 100 0 0 10 0\n"
    "   1: 0100007F:0016 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0 "
    "       0 5151 1 0000000000000000 20 4 30 10 -1\n"
)
PROC_TCP6 = (
    "   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 100 0 0 10 0\n"
)


def test_listeners_found_in_proc_net_tcp() -> None:
    assert mbuffer.listeners(PROC_TCP, 8080) == {"4242"}
    assert mbuffer.listeners(PROC_TCP, 22) == set()  # established, not listening
    assert mbuffer.listeners(PROC_TCP + PROC_TCP6, 8080) == {"4242", "4343"}
    fds = "lrwx------ 1 root root 64 Dec  3 07:00 3 -> socket:[4242]\n0 -> /dev/null\n"
    assert mbuffer.socket_inodes(fds) == {"4242"}


def test_the_source_connects_only_to_a_listener_that_is_the_mbuffers_own() -> None:
    """Issue 17, row 4: "something listens on the port" let the unencrypted stream go to
    whatever held it. Only the listening mbuffer's own socket (one of its open files)
    will do; another program's socket on the port, beside it, fails the run."""
    ours = "socket:[4242]\n"
    assert mbuffer.listener_is_ours(PROC_TCP, ours, 8080, "here")
    assert not mbuffer.listener_is_ours(PROC_TCP, "socket:[9999]\n", 8080, "here")  # not yet
    assert not mbuffer.listener_is_ours("", ours, 8080, "here")  # nothing listens yet
    with pytest.raises(mbuffer.PortTaken, match="port 8080 on here has another listener"):
        mbuffer.listener_is_ours(PROC_TCP + PROC_TCP6, ours, 8080, "here")


def test_a_free_port_of_the_destination_is_none_its_sockets_use() -> None:
    used = "".join(
        f"   {i}: 00000000:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 0 0 0 {i}\n"
        for i, port in enumerate(mbuffer.EPHEMERAL_PORTS)
        if port != 40000
    )
    assert mbuffer.free_port_in(used) == 40000


class _Answers:
    """A source host that answers ``printenv SSH_CONNECTION`` as it is told to."""

    name = "db1.example.com"

    def __init__(self, code: int, out: str, err: str = "") -> None:
        self.answer = (code, out, err)

    def run(self, argv: list[str], **_: object) -> Result:
        assert argv == ["printenv", "SSH_CONNECTION"]
        return Result(argv, self.name, *self.answer)


def test_a_stream_into_this_host_connects_back_to_where_the_ssh_connection_comes_from() -> None:
    """Issue 17, row 17: into ``localhost`` the source's mbuffer connected to itself."""
    seen = _Answers(0, "10.77.14.1 51234 10.77.14.2 22\n")
    assert mbuffer.address_seen_by(seen) == "10.77.14.1"  # type: ignore[arg-type]
    refused = _Answers(126, "", "zettabee-source: refused: not a command of a zettabee pull")
    with pytest.raises(
        mbuffer.TransportError,
        match=r"exit 126, zettabee-source: refused.*set the pair's mbufferhost=",
    ):
        mbuffer.address_seen_by(refused)  # type: ignore[arg-type]
    with pytest.raises(mbuffer.TransportError, match="nothing said"):
        mbuffer.address_seen_by(_Answers(1, ""))  # type: ignore[arg-type]


def test_mbuffer_sender_argv_names_its_target_once() -> None:
    out = mbuffer._mbuffer_out(60, "2M", "dst.example.com", 9090)
    assert out == [
        "mbuffer", "-q", "-s", "128k", "-m", "64M", "-W", "60", "-r", "2M",
        "-O", "dst.example.com:9090",
    ]  # fmt: skip
    assert out.count("-O") == 1


def test_stages_die_with_the_run() -> None:
    from zettabee.host import tied_to_us

    argv = tied_to_us(["ssh", "-p", "22", "host", "--", "zfs receive p/fs"])
    assert argv[-6:] == ["ssh", "-p", "22", "host", "--", "zfs receive p/fs"]
    if argv[0].endswith("setpriv"):
        assert argv[1:4] == ["--pdeathsig", "TERM", "--"]
    assert tied_to_us(["no-such-tool-here"]) == ["no-such-tool-here"]


class NamedHost(FakeHost):
    is_local = False

    def __init__(self, name: str, stdout: str) -> None:
        super().__init__(stdout)
        self.name = name


def test_health_reads_each_destination_host_once(tmp_path: Path) -> None:
    pairs = [
        Pair(Endpoint("s", "t/x"), Endpoint("b1", "b/x")),
        Pair(Endpoint("s", "t/y"), Endpoint("b2", "b/y")),
        Pair(Endpoint("s", "t/z"), Endpoint("b1", "b/z")),
    ]
    x, y, z = pairs
    rows = []
    for pair in pairs:
        fs, name = pair.destination.fs, snap(pair.fingerprint, "20260101T000000Z")
        rows.append(
            f"{fs}\tzettabee:fingerprint\t{pair.fingerprint}\n{fs}\tzettabee:lastsnap\t{name}\n"
            f"{fs}@{name}\tcreatetxg\t10\n"
        )
    b1 = NamedHost("b1", rows[0] + rows[2])
    b2 = NamedHost("b2", rows[1])
    hosts = {"b1": b1, "b2": b2}
    healths = read_health(
        pairs,
        store(tmp_path),
        now=NEW_YEAR + 60,
        hosts=lambda p: hosts[p.destination.host],  # type: ignore[arg-type,return-value]
    )
    assert [len(b1.calls), len(b2.calls)] == [1, 1]
    assert b1.calls[0][-2:] == ["b/x", "b/z"]
    assert [h.state for h in healths] == [SYNCHRONIZED] * 3
    assert [h.pair for h in healths] == [x, y, z] and healths[1].lag == 60


def test_plugins_judge_a_remote_destination_from_the_last_run(tmp_path: Path) -> None:
    """Without SSH (the check plugins), a remote destination's lag is the age of the
    snapshot the last successful run received, from the UTC time in its name."""
    pair = Pair(Endpoint("s", "t/x"), Endpoint("backup.invalid", "b/x"))
    st = store(tmp_path)
    [fresh] = read_health([pair], st)
    assert fresh.state == UNINITIALIZED and "no successful run" in fresh.reason
    name = snap(pair.fingerprint, "20260101T000000Z")
    st.write_status(Status(pair.fingerprint, snapshot=name, last_success=1.0, result="ok"))
    when = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    [health] = read_health([pair], st, now=when + 90)
    assert health.state == SYNCHRONIZED and health.lag == 90 and health.lastsnap == name


def test_local_transport_needs_one_host(tmp_path: Path) -> None:
    from zettabee.errors import StateError
    from zettabee.hosts import Hosts
    from zettabee.pair import PairOptions

    pair = Pair(
        Endpoint("a.invalid", "t/x"), Endpoint("b.invalid", "b/x"), PairOptions(transport="local")
    )
    src, dst = NamedHost("a.invalid", ""), NamedHost("b.invalid", "")
    with pytest.raises(
        StateError, match=r"transport=local runs zfs send \| zfs receive on one host"
    ):
        transport.stream(pair, src, dst, ["zfs", "send", "t/x@s"], ["zfs", "receive", "b/x"], None)  # type: ignore[arg-type]
    same = Pair(
        Endpoint("a.invalid", "t/x"), Endpoint("a.invalid", "b/x"), PairOptions(transport="local")
    )
    hosts = Hosts(str(tmp_path / "known_hosts"))
    assert hosts.get(same.source, same) is hosts.get(same.destination, same)
    assert not hosts.get(same.source, same).is_local  # the pipeline runs on that host


def test_a_remote_counter_is_read_even_when_the_stream_ends_within_a_tick() -> None:
    """dd's (or mbuffer's) last count is in the stderr the finished stage kept."""
    stage = relay.Stage("dd", "h", ["sh", "-c", "printf '3000000 bytes (3.0 MB) copied\\n' >&2"])
    relay.spawn(stage, None, None)
    meter = relay.StderrMeter(stage, None, transport.dd_bytes)
    meter.start()
    stage.finish()
    meter.stop()
    assert meter.count == 3000000


class ScriptedHost(FakeHost):
    """Answers each command by its verb: ``answers[verb]`` is (exit, stdout, stderr), where
    ``{target}`` in stdout stands for the command's last argument."""

    def __init__(self, answers: dict[str, tuple[int, str, str]]) -> None:
        super().__init__("")
        self.answers = answers

    def run(self, argv: list[str], **_: object) -> Result:
        self.calls.append(list(argv))
        code, out, err = self.answers[argv[1]]
        return Result(list(argv), self.name, code, out.format(target=argv[-1]), err)


BUSY = (1, "", "cannot destroy 'p/fs@a': dataset is busy\n")


def test_a_snapshot_held_under_another_tag_is_not_destroyed_again_and_again() -> None:
    host = ScriptedHost({"destroy": BUSY, "get": (0, "{target}\tuserrefs\t1\n", "")})
    with pytest.raises(HeldElsewhere, match="dataset is busy"):
        destroy(host, "p/fs@a")  # type: ignore[arg-type]
    assert [argv[1] for argv in host.calls] == ["destroy", "get"]
    assert destroy_all(host, "p/fs", ["a", "b"]) == ["a", "b"]  # type: ignore[arg-type]


def test_a_busy_snapshot_nobody_holds_is_tried_again() -> None:
    host = ScriptedHost({"destroy": BUSY, "get": (0, "{target}\tuserrefs\t0\n", "")})
    with pytest.raises(Exception, match="dataset is busy") as caught:
        destroy(host, "p/fs@a", attempts=2)  # type: ignore[arg-type]
    assert not isinstance(caught.value, HeldElsewhere)
    assert [argv[1] for argv in host.calls] == ["destroy", "get", "destroy", "get"]


def test_the_runtime_check_is_critical_while_no_run_can_write_its_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zettabee.checks import evaluate, runtime_check

    pair = Pair(Endpoint("s", "t/x"), Endpoint("backup.invalid", "b/x"))
    st = store(tmp_path)
    st.write_status(Status(pair.fingerprint, last_success=1.0, last_duration=3.0, result="ok"))
    assert evaluate(runtime_check(read_health([pair], st))).code == 0
    real = os.statvfs(st.state_dir)
    fields = {name: getattr(real, name) for name in dir(real) if name.startswith("f_")}

    def full(path: object) -> object:
        return type("Statvfs", (), {**fields, "f_bfree": 0})()

    monkeypatch.setattr("zettabee.state.os.statvfs", full)
    result = evaluate(runtime_check(read_health([pair], st)))
    assert result.code == 2
    assert str(st.state_dir) in result.output and "is full" in result.output
    assert "free space there" in result.output


def test_a_value_inherited_from_the_file_system_above_is_not_the_pairs_own() -> None:
    text = (
        "backup/home/alice\tzettabee:fingerprint\tf00d\tinherited from backup/home\n"
        "backup/home/alice\tzettabee:lastsnap\t-\t-\n"
        "backup/home/alice@s1\tzettabee:lastsnap\ts1\tinherited from backup/home/alice\n"
        "backup/home/alice@s1\tguid\t42\t-\n"
        "backup/home\tzettabee:fingerprint\tf00d\tlocal\n"
    )
    table = zfs.parse_get(text)
    assert "zettabee:fingerprint" not in table["backup/home/alice"]
    assert table["backup/home/alice@s1"] == {"zettabee:lastsnap": "s1", "guid": "42"}
    assert table["backup/home"] == {"zettabee:fingerprint": "f00d"}
    assert zfs.get(["backup/home"], ["guid"], own=True)[-4:] == [
        "name,property,value,source", "guid", "--", "backup/home",
    ]  # fmt: skip
