"""The engine in the main topology on every lab back end: zettabee on the backup host
with the destination pool local, pulling from a source host over SSH; zfs-fuse here,
OpenZFS 2.1 and 2.3 in their guests (see ``tests/conftest.py``)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BACKENDS, Zb, backend_zb

pytestmark = pytest.mark.integration


@pytest.fixture(params=BACKENDS)
def zb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Zb]:
    yield from backend_zb(request, tmp_path)


def test_remote_snapshot_and_full_stream_over_ssh(zb: Zb) -> None:
    """The lab's promise: a snapshot made over SSH, a full stream received, same files."""
    fs = zb.make_source(mb=8)
    zb.src.run("zfs", "snapshot", f"{fs}@lab")
    assert "lab" in zb.srcside.snapshots(fs)
    send = zb.src.ssh_argv("zfs", "send", f"{fs}@lab")
    sender = subprocess.Popen(send, stdout=subprocess.PIPE)
    receive = zb.dstside.argv(f"zfs receive {zb.dst_fs()}")
    recv = subprocess.run(receive, stdin=sender.stdout, capture_output=True)
    assert sender.wait() == 0 and recv.returncode == 0, recv.stderr
    zb.assert_same_data()


@pytest.mark.parametrize("transport", ["ssh", "mbuffer"])
def test_initialize_then_updates_keep_the_data_identical(zb: Zb, transport: str) -> None:
    # Under emulation the guest moves a few MB/s: a smaller file proves the same there.
    zb.make_source(mb=24 if zb.backend.modern else 100)
    options = zb.mbuffer() if transport == "mbuffer" else f"transport={transport}"
    zb.write_pairs(zb.pair_line(options=options))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""  # quiet on success
    zb.assert_same_data()
    intruder = zb.dstside.sh(f"echo x >{zb.dst_dir()}/intruder", check=False)
    assert intruder.returncode != 0 and "Read-only" in intruder.stderr  # the replica is read-only
    assert zb.dstside.zget(zb.dst_fs(), "zettabee:fingerprint") == zb.fingerprint()

    src = zb.src_dir()
    zb.srcside.write_random(src / "added.bin", 3)
    zb.srcside.write_text(src / "note.txt", "changed\n")
    zb.srcside.sh(  # 4 KiB rewritten in the middle of a file
        f"dd if=/dev/urandom of={src}/random.bin bs=4096 seek=256 count=1 conv=notrunc 2>/dev/null"
    )
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    zb.assert_same_data()

    zb.srcside.sh(f"rm {src}/added.bin")
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    assert "added.bin" not in zb.dstside.checksums(zb.dst_dir())

    # nothing changed: still correct, and our old snapshots are pruned on both sides
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    src_snaps, dst_snaps = zb.srcside.snapshots(zb.src_fs()), zb.dstside.snapshots(zb.dst_fs())
    assert len(src_snaps) == 1 and src_snaps == dst_snaps
    assert zb.dstside.zget(zb.dst_fs(), "zettabee:lastsnap") == dst_snaps[0]


@pytest.mark.zfs_independent
def test_the_readme_mbuffer_line_into_localhost_replicates(zb: Zb) -> None:
    """The README's mbuffer example, ``SRC:tank/pg localhost:backup/pg
    transport=mbuffer,port=9090``: the source's mbuffer connects back to the address its
    SSH connection comes from, not to ``localhost`` (itself: "unable to connect to
    localhost:PORT", exit 1)."""
    zb.make_source(mb=8)
    with socket.socket() as probe:  # the README's 9090 may be another lab's
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    line = f"{zb.srcside.address}:{zb.src_fs()}  localhost:{zb.dst_fs()}"
    zb.write_pairs(f"{line}  transport=mbuffer,port={port}")
    zb.initialize_then_update()


def test_local_transport(zb: Zb) -> None:
    """Both pools on the backup host: ``zfs send | zfs receive`` there, no SSH."""
    zb.make_source(mb=4)
    zb.write_pairs(f"localhost:{zb.src_fs()}  localhost:{zb.dst_fs()}  transport=local")
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    zb.srcside.write_text(zb.src_dir() / "x", "x")
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    assert json.loads(zb.run("status", "--json").stdout)[0]["last_bytes"] > 0


@pytest.mark.zfs_independent
def test_status_columns_json_and_all_pairs(zb: Zb) -> None:
    zb.make_source("a", mb=1)
    zb.make_source("b", mb=1)
    zb.write_pairs(zb.pair_line("a"), zb.pair_line("b", zb.mbuffer("port=19555")))
    assert zb.run("initialize", zb.dst_fs("a")).returncode == 0
    out = zb.run("status")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    first = lines[0].split()
    assert first[0] == f"{zb.src.address}:{zb.src_fs('a')}"
    assert first[2] == "Synchronized"
    assert first[4].startswith("zettabee.") and first[4].endswith(":-")
    assert "Uninitialized" in lines[1] and ":19555" in lines[1]
    full = zb.run("status", "--fullstatus", zb.dst_fs("a")).stdout
    assert zb.fingerprint("a") in full
    data = json.loads(zb.run("status", "--json").stdout)
    assert [d["state"] for d in data] == ["Synchronized", "Uninitialized"]
    assert data[0]["lag"] is not None and 0 <= data[0]["lag"] < 120


@pytest.mark.zfs_independent
def test_actions_output_and_exit_codes(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line())
    fp = zb.fingerprint()
    assert len(fp) == 32
    log = zb.run("logfile", zb.dst_fs().split("/")[-1])  # last component, as the seed allowed
    assert log.returncode == 0 and log.stdout.strip().endswith(f"{fp}.log")
    assert zb.run("update", zb.dst_fs()).returncode == 1  # not initialized yet
    assert "zettabee initialize" in zb.run("update", zb.dst_fs()).stderr
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    again = zb.run("initialize", zb.dst_fs())
    assert again.returncode == 1 and "--force" in again.stderr
    assert Path(log.stdout.strip()).read_text().count("initialized") >= 1
    unknown = zb.run("update", "no-such-pair")
    assert unknown.returncode == 2 and "no-such-pair" in unknown.stderr
    assert zb.run("bogus-action").returncode == 2
    assert zb.run("unlock", zb.dst_fs()).stdout.strip().endswith("not locked")
    help_text = zb.run("initialize", "--help").stdout
    assert "DESTROYS" in help_text


@pytest.mark.zfs_independent
def test_initialize_force_replaces_destination(zb: Zb) -> None:
    zb.make_source(mb=2)
    zb.write_pairs(zb.pair_line())
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    out = zb.run("initialize", "--force", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()


@pytest.mark.zfs_independent
def test_bad_config_reported_and_good_pairs_still_replicate(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(
        zb.pair_line(),
        "badhost;rm:tank/x  localhost:tdstpool/y",
        f"{zb.src.address}:{zb.src_fs('other')}  localhost:$(reboot)/x",
        f"{zb.src.address}:{zb.src_fs('z')}  localhost:tdstpool/z  transport=pigeon",
    )
    check = zb.run("check-config")
    assert check.returncode == 2
    assert f"{zb.pairfile}:2" in check.stderr and f"{zb.pairfile}:4" in check.stderr
    assert "pigeon" in check.stderr
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    zb.srcside.write_text(zb.src_dir() / "more", "more")
    upd = zb.run("update", "--all")
    assert upd.returncode == 1  # the broken lines are reported: not a silent success
    assert f"{zb.pairfile}:3" in upd.stderr
    zb.assert_same_data()


@pytest.mark.zfs_independent
def test_diverged_destination_is_refused_then_rolled_back_when_allowed(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line())
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    zb.dstside.run("zfs", "snapshot", f"{zb.dst_fs()}@local-extra")
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 1
    assert "local-extra" in out.stderr and "rollback=yes" in out.stderr
    assert "local-extra" in zb.dstside.snapshots(zb.dst_fs())  # nothing destroyed silently
    zb.write_pairs(zb.pair_line(options="rollback=yes"))
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    assert "local-extra" not in zb.dstside.snapshots(zb.dst_fs())  # rolled back, as allowed


@pytest.mark.zfs_independent
def test_no_common_snapshot_refuses_without_resending(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line(options="hold=no"))  # else the hold keeps the base alive
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    for snap in zb.srcside.snapshots(zb.src_fs()):
        zb.src.run("zfs", "destroy", f"{zb.src_fs()}@{snap}")
    before = zb.dstside.snapshots(zb.dst_fs())
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 1
    assert "no common snapshot" in out.stderr and "initialize --force" in out.stderr
    assert zb.dstside.snapshots(zb.dst_fs()) == before


@pytest.mark.zfs_independent
def test_purge_keeps_the_common_snapshot_and_dry_run_destroys_nothing(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line(options="keep=3"))
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    for _ in range(4):
        time.sleep(1.05)
        assert zb.run("update", zb.dst_fs()).returncode == 0
    assert len(zb.dstside.snapshots(zb.dst_fs())) == 3
    zb.write_pairs(zb.pair_line(options="keep=1"))
    dry = zb.run("purge", "--dry-run", zb.dst_fs())
    assert dry.returncode == 0
    assert dry.stdout.count("would destroy") == 2
    assert len(zb.dstside.snapshots(zb.dst_fs())) == 3
    assert zb.run("purge", zb.dst_fs()).returncode == 0
    assert zb.dstside.snapshots(zb.dst_fs()) == zb.srcside.snapshots(zb.src_fs())
    assert len(zb.dstside.snapshots(zb.dst_fs())) == 1
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr


@pytest.mark.zfs_independent
def test_sigkill_mid_transfer_then_status_then_update(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line(options=zb.mbuffer("bwlimit=2M")))
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    zb.srcside.write_random(zb.src_dir() / "big.bin", 40)
    proc = zb.popen("zettabee", "update", zb.dst_fs())
    zb.wait_for_transfer(zb.fingerprint())
    zb.kill(proc, signal.SIGKILL)
    proc.wait()
    status = zb.run("status", zb.dst_fs())
    assert "Interrupted" in status.stdout
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    assert "Idle" in zb.run("status", zb.dst_fs()).stdout


@pytest.mark.zfs_independent
def test_two_concurrent_updates_of_one_pair(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line(options=zb.mbuffer("bwlimit=1M")))
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    zb.srcside.write_random(zb.src_dir() / "big.bin", 8)
    first = zb.popen("zettabee", "update", zb.dst_fs())
    lock = zb.tmp / "run" / f"{zb.fingerprint()}.lock"
    deadline = time.monotonic() + 30
    while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = zb.run("update", zb.dst_fs())
    assert second.returncode == 3
    assert "in progress" in second.stderr and str(zb.pid(first)) in second.stderr
    unlock = zb.run("unlock", zb.dst_fs())
    assert unlock.returncode == 3 and "refuses" in unlock.stderr
    assert first.wait(timeout=120) == 0, first.stderr.read() if first.stderr else ""
    zb.assert_same_data()


@pytest.mark.zfs_independent
def test_stage_errors_quote_the_tool(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line())
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    zb.dstside.run("zfs", "set", "readonly=off", zb.dst_fs())
    zb.dstside.write_text(zb.dst_dir() / "local-change", "oops")
    zb.srcside.write_text(zb.src_dir() / "x", "x")
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 1
    assert "modified" in out.stderr and "rollback=yes" in out.stderr
    assert "local-change" in zb.dstside.checksums(zb.dst_dir())  # nothing discarded silently


@pytest.mark.zfs_independent
def test_unknown_host_key_is_refused(zb: Zb) -> None:
    zb.make_source(mb=1)
    empty = zb.tmp / "empty_known_hosts"
    empty.write_text("")
    zb.write_pairs(zb.pair_line(options=f"knownhosts={empty}"))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 1
    assert "unknown" in out.stderr and "--accept-new-host-key" in out.stderr
    setup = zb.run("setup", "--accept-new-host-key", zb.dst_fs())
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert zb.src.address in empty.read_text()
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    zb.assert_same_data()
