"""Capability probing: the probe's own output, recorded on zfs-fuse (the lab) and on
OpenZFS 2.1.11 (Debian 12's, the lab guest)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from zettabee import capabilities, zfs
from zettabee.capabilities import Prober, plan_features
from zettabee.host import Result

RECORDED = Path(__file__).parent / "recorded"
FUSE_PROBE = (RECORDED / "zfs-fuse-probe.txt").read_text()
OPENZFS_PROBE = (RECORDED / "openzfs-2.1-probe.txt").read_text()


def caps(text: str, pool: str, host: str = "h") -> capabilities.Capabilities:
    tool, pools = capabilities.parse_probe(text, [pool])
    return capabilities.capabilities(host, tool, pools[pool])


def test_openzfs_21_offers_every_extra() -> None:
    c = caps(OPENZFS_PROBE, "gsrc")
    assert c.zfs == "OpenZFS 2.1.11-1+deb12u1"
    assert (c.holds, c.bookmarks, c.resumable, c.estimates, c.raw, c.compressed) == (
        True, True, True, True, True, True,
    )  # fmt: skip
    assert c.absent() == []
    assert c.describe().startswith("OpenZFS 2.1.11-1+deb12u1 (pool gsrc): holds, bookmarks")


def test_zfs_fuse_has_holds_and_nothing_else() -> None:
    """Recorded on zfs-fuse: hold and release exist (pool version 23 >= 18), but no
    bookmark command, no receive -s, no send -n/-v/-P/-w/-c."""
    c = caps(FUSE_PROBE, "tdstpool")
    assert c.zfs == "zfs-fuse"
    assert c.pool_version == 23
    assert c.holds
    assert c.absent() == [
        "bookmarks", "resumable receive", "size estimates", "raw send", "compressed send",
    ]  # fmt: skip
    assert "version 23" in c.describe() and "lacks bookmarks" in c.describe()


def test_a_compatibility_pool_under_openzfs_lacks_what_its_features_lack() -> None:
    """The binary has every command; a pool without the features does not."""
    legacy = OPENZFS_PROBE.replace(
        "feature@bookmarks              enabled", "feature@bookmarks              disabled"
    )
    legacy = legacy.replace(
        "feature@extensible_dataset     active", "feature@extensible_dataset     disabled"
    )
    legacy = legacy.replace(
        "feature@encryption             enabled", "feature@encryption             disabled"
    )
    c = caps(legacy, "gsrc")
    assert c.holds and c.estimates and c.compressed
    assert not c.bookmarks and not c.resumable and not c.raw


def test_a_pool_that_cannot_be_read_has_no_extras_and_says_why() -> None:
    text = OPENZFS_PROBE.split("@@zettabee-probe pools")[0]
    text += "@@zettabee-probe pools\ncannot open 'gone': no such pool\n"
    c = caps(text, "gone")
    # what the binary alone decides stays; what needs the pool goes
    assert c.present() == ["size estimates", "compressed send"]
    assert "no such pool" in c.note


def test_the_probe_keeps_each_pool_s_guid_the_replica_id_comes_from() -> None:
    """``zpool get all`` prints the guid on zfs-fuse and OpenZFS alike: no command more."""
    assert caps(FUSE_PROBE, "tdstpool").pool_guid == "2591689529063941839"
    assert caps(OPENZFS_PROBE, "gsrc").pool_guid == "10396368085209583401"
    text = OPENZFS_PROBE.split("@@zettabee-probe pools")[0]
    gone = caps(text + "@@zettabee-probe pools\ncannot open 'gone': no such pool\n", "gone")
    assert gone.pool_guid == ""
    again = capabilities.Capabilities.from_dict(caps(FUSE_PROBE, "tdstpool").as_dict())
    assert again is not None and again.pool_guid == "2591689529063941839"


def test_a_destination_pool_without_a_guid_is_refused_naming_the_pool() -> None:
    from zettabee.errors import StateError
    from zettabee.pair import Endpoint, Pair, replica_id
    from zettabee.run import replica_of

    pair = Pair(Endpoint("src", "tank/a"), Endpoint("localhost", "gone/a"))
    text = OPENZFS_PROBE.split("@@zettabee-probe pools")[0]
    gone = caps(text + "@@zettabee-probe pools\ncannot open 'gone': no such pool\n", "gone")
    fuse = caps(FUSE_PROBE, "tdstpool")
    with pytest.raises(StateError, match="guid of the destination pool gone on h .*no such pool"):
        replica_of(pair, plan_features(fuse, gone))
    replica = replica_of(pair, plan_features(gone, fuse))  # the source's guid is not asked
    assert replica.rid == replica_id("2591689529063941839")
    assert replica.fp == pair.fingerprint


def test_usage_parser_reads_option_letters_and_continuation_lines() -> None:
    usage = capabilities.parse_usage(OPENZFS_PROBE)
    assert {"n", "v", "P", "w", "c", "t", "i"} <= usage["send"]
    assert {"s", "F", "u", "A", "d", "e", "o", "x"} <= usage["receive"]
    assert "bookmark" in usage and "hold" in usage and "release" in usage
    fuse = capabilities.parse_usage(FUSE_PROBE)
    assert fuse["send"] == frozenset("RDpiI")
    assert "s" not in fuse["receive"] and "bookmark" not in fuse


def test_probe_is_one_constant_script_with_pools_as_arguments(tmp_path: Path) -> None:
    """Pool names never enter the script: a hostile one stays an argument."""
    target = tmp_path / "pwned"
    argv = capabilities.probe_argv([f"tank; touch {target}", "$(touch {target})"])
    assert argv[:2] == ["sh", "-c"] and argv[2] == capabilities.PROBE_SCRIPT
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("zfs", "zpool"):
        (fake / tool).write_text('#!/bin/sh\necho "$@"\n')
        (fake / tool).chmod(0o755)
    out = subprocess.run(
        argv, capture_output=True, text=True, env={"PATH": f"{fake}:/usr/bin:/bin"}
    )
    assert out.returncode == 0
    assert f"get all tank; touch {target}" in out.stdout
    assert not target.exists()


class CountingHost:
    name = "h"
    is_local = True

    def __init__(self, text: str) -> None:
        self.text = text
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], **_: object) -> Result:
        self.calls.append(list(argv))
        if argv[0] == "zpool":
            pools = self.text.split("@@zettabee-probe pools\n")[1]
            return Result(list(argv), self.name, 0, pools.replace("gsrc", argv[-1]), "")
        return Result(list(argv), self.name, 0, self.text, "")

    def close(self) -> None:
        pass


def test_prober_asks_each_host_once_per_run() -> None:
    host = CountingHost(OPENZFS_PROBE)
    prober = Prober()
    for _ in range(3):
        assert prober.of(host, "gsrc").resumable  # type: ignore[arg-type]
    assert len(host.calls) == 1
    assert prober.of(host, "other").bookmarks  # type: ignore[arg-type]
    assert host.calls[1] == ["zpool", "get", "all", "other"]
    assert len(host.calls) == 2


class RemoteHost(CountingHost):
    is_local = False


def test_a_remote_host_s_answer_is_kept_for_the_next_runs_for_an_hour(tmp_path: Path) -> None:
    host = RemoteHost(OPENZFS_PROBE)
    assert Prober(str(tmp_path)).of(host, "gsrc").resumable  # type: ignore[arg-type]
    assert Prober(str(tmp_path)).of(host, "gsrc").resumable  # type: ignore[arg-type]
    assert len(host.calls) == 1  # the second run believed the first one's answer
    (kept,) = tmp_path.glob("probe-*.txt")
    assert kept.stat().st_mode & 0o777 == 0o640
    Prober(str(tmp_path)).of(host, "other")  # type: ignore[arg-type]
    assert len(host.calls) == 2  # another pool: asked
    old = time.time() - 3601
    for path in tmp_path.glob("probe-*.txt"):
        os.utime(path, (old, old))
    Prober(str(tmp_path)).of(host, "gsrc")  # type: ignore[arg-type]
    assert len(host.calls) == 3  # too old: asked again
    Prober(str(tmp_path)).forget(host, "gsrc")  # type: ignore[arg-type]
    Prober(str(tmp_path)).of(host, "gsrc")  # type: ignore[arg-type]
    assert len(host.calls) == 4  # forgotten after a failed run: asked again


def test_this_host_and_failed_probes_are_never_kept(tmp_path: Path) -> None:
    local = CountingHost(OPENZFS_PROBE)
    Prober(str(tmp_path)).of(local, "gsrc")  # type: ignore[arg-type]
    Prober(str(tmp_path)).of(local, "gsrc")  # type: ignore[arg-type]
    assert len(local.calls) == 2
    failing = RemoteHost(OPENZFS_PROBE)
    failing.run = lambda argv, **_: Result(list(argv), "h", 255, "", "refused")  # type: ignore[method-assign]
    assert not Prober(str(tmp_path)).of(failing, "gsrc").holds  # type: ignore[arg-type]
    assert not list(tmp_path.glob("probe-*.txt"))


def test_plan_features_uses_what_both_sides_have() -> None:
    modern = caps(OPENZFS_PROBE, "gsrc", "src")
    fuse = caps(FUSE_PROBE, "tdstpool", "dst")
    both = plan_features(modern, caps(OPENZFS_PROBE, "gsrc", "dst"))
    assert both.uses() == ["holds (source and destination)", "resumable receive", "size estimates"]
    mixed = plan_features(modern, fuse)
    assert mixed.resume is False  # the destination cannot receive -s
    assert mixed.estimate and mixed.hold_source and mixed.hold_destination
    off = plan_features(modern, fuse, hold=False, resume=False)
    assert not off.hold_source and not off.hold_destination


def test_demanded_options_a_side_cannot_honour_are_problems() -> None:
    modern = caps(OPENZFS_PROBE, "gsrc", "src")
    fuse = caps(FUSE_PROBE, "tdstpool", "backup1")
    raw = plan_features(modern, fuse, raw=True)
    assert not raw.raw
    [problem] = raw.problems
    assert "raw=yes" in problem and "destination backup1 (zfs-fuse" in problem
    assert "encryption" in problem
    mark = plan_features(fuse, modern, bookmark=True)
    assert any("bookmark=yes" in p and "source backup1" in p for p in mark.problems)
    fine = plan_features(modern, caps(OPENZFS_PROBE, "gsrc", "dst"), raw=True, bookmark=True)
    assert fine.problems == () and fine.raw and fine.bookmark


def test_capabilities_survive_the_status_file() -> None:
    c = caps(OPENZFS_PROBE, "gsrc")
    assert capabilities.Capabilities.from_dict(c.as_dict()) == c
    assert capabilities.Capabilities.from_dict({"host": "h"}) is None


# -- argv builders and parsers of the modern commands ---------------------------------


def test_modern_argv() -> None:
    assert zfs.send("p/fs@b", base="p/fs@a", raw=True, estimate=True) == [
        "zfs", "send", "-nvP", "-w", "-i", "p/fs@a", "p/fs@b",
    ]  # fmt: skip
    # -I cannot start at a bookmark: an intermediate pair sends -i from one
    assert zfs.send("p/fs@b", base="p/fs#a", intermediate=True) == [
        "zfs", "send", "-i", "p/fs#a", "p/fs@b",
    ]  # fmt: skip
    assert zfs.send_resume("1-abc-de-789c") == ["zfs", "send", "-t", "1-abc-de-789c"]
    assert zfs.send_resume("T", estimate=True) == ["zfs", "send", "-nvP", "-t", "T"]
    assert zfs.recv_abort("d/fs") == ["zfs", "receive", "-A", "d/fs"]
    assert zfs.hold("zettabee.x", "p/fs@s") == ["zfs", "hold", "zettabee.x", "p/fs@s"]
    assert zfs.release("zettabee.x", "p/fs@s") == ["zfs", "release", "zettabee.x", "p/fs@s"]
    assert zfs.bookmark("p/fs@s", "p/fs#s") == ["zfs", "bookmark", "p/fs@s", "p/fs#s"]
    assert zfs.destroy("p/fs#s") == ["zfs", "destroy", "p/fs#s"]
    assert zfs.list_snapshots("p/fs", holds=True, bookmarks=True) == [
        "zfs", "get", "-Hp", "-d", "1", "-t", "filesystem,volume,snapshot,bookmark",
        "-o", "name,property,value", "guid,creation,createtxg,userrefs", "--", "p/fs",
    ]  # fmt: skip
    assert zfs.list_snapshots("p/fs") == zfs.get(["p/fs"], zfs.SNAPSHOT_PROPS, depth=1)


ESTIMATE = (
    "incremental\tzettabee.a\ttank/data@zettabee.b\t52690464\n"
    "size\t52690464\n"
)  # fmt: skip
RESUME_ESTIMATE = (
    "resume token contents:\n"
    "nvlist version: 0\n"
    "\tfromguid = 0x2ef6e1b47a1c0d35\n"
    "\tobject = 0x80\n"
    "\toffset = 0x1800000\n"
    "\tbytes = 0x1819f88\n"
    "\ttoguid = 0x6f9a2d3cc3b9e1a7\n"
    "\ttoname = tank/data@zettabee.b\n"
    "\tcompressok = 1\n"
    "incremental\tzettabee.a\ttank/data@zettabee.b\t27393408\n"
    "size\t27393408\n"
)


def test_parse_estimate_and_resume_contents() -> None:
    assert zfs.parse_estimate(ESTIMATE) == 52690464
    assert zfs.parse_estimate("full\ttank/data@s\t123\nsize\t123\n") == 123
    assert zfs.parse_estimate("") is None
    fields = zfs.parse_resume_contents(RESUME_ESTIMATE)
    assert fields["toname"] == "tank/data@zettabee.b"
    assert zfs.hex_or_int(fields["bytes"]) == 0x1819F88
    assert zfs.hex_or_int(fields["toguid"]) == 0x6F9A2D3CC3B9E1A7
    assert zfs.parse_estimate(RESUME_ESTIMATE) == 27393408


def test_tokens_tags_and_stale_resumes_are_recognised() -> None:
    assert zfs.resume_token("-") is None
    assert zfs.resume_token("1-e604ea4bf-e0-789c63a2") == "1-e604ea4bf-e0-789c63a2"
    for said in (
        "cannot resume send: 'tank/data@zettabee.b' used in the initial send no longer exists",
        "cannot resume send: 'tank/data@x' is no longer the same snapshot used in the initial send",
        "cannot resume send: incremental source 0x2ef6e1b47a1c0d35 no longer exists",
    ):
        assert zfs.stale_token(said)
    assert not zfs.stale_token("ssh: connect to host src port 22: Connection refused")
    assert zfs.tag_missing("cannot release 'x' from 'p@s': no such tag on this dataset")
    assert zfs.tag_exists("cannot hold 'p@s': tag already exists on this dataset")


LISTING = (
    "tank/data\tguid\t111\n"
    "tank/data\tcreation\t1000\n"
    "tank/data\tcreatetxg\t1\n"
    "tank/data\tuserrefs\t-\n"
    "tank/data@old\tguid\t2\n"
    "tank/data@old\tcreation\t1005\n"
    "tank/data@old\tcreatetxg\t30\n"
    "tank/data@old\tuserrefs\t1\n"
    "tank/data#old\tguid\t2\n"
    "tank/data#old\tcreation\t1005\n"
    "tank/data#old\tcreatetxg\t30\n"
    "tank/data#older\tguid\t1\n"
    "tank/data#older\tcreation\t1001\n"
    "tank/data#older\tcreatetxg\t20\n"
)


def test_listing_with_holds_and_bookmarks() -> None:
    [old] = zfs.parse_snapshots("tank/data", LISTING)
    assert old.userrefs == 1 and old.full == "tank/data@old"
    marks = zfs.parse_bookmarks("tank/data", LISTING)
    assert [m.full for m in marks] == ["tank/data#older", "tank/data#old"]


def test_common_base_falls_back_to_a_bookmark() -> None:
    src = [zfs.Snapshot("s", "c", 3, 30)]
    marks = [zfs.Bookmark("s", "b", 2, 20)]
    dst = [zfs.Snapshot("d", "a", 1, 10), zfs.Snapshot("d", "b", 2, 20)]
    assert zfs.common_base(src, marks, dst) == (dst[1], "s#b")
    src.append(zfs.Snapshot("s", "b", 2, 20))
    assert zfs.common_base(src, marks, dst) == (dst[1], "s@b")  # a snapshot is preferred
    assert zfs.common_base([], [], dst) is None


def test_both_sides_of_a_pair_are_probed_once_each() -> None:
    src, dst = CountingHost(OPENZFS_PROBE), CountingHost(FUSE_PROBE.replace("tdstpool", "gsrc"))
    prober = Prober()
    for _ in range(2):
        s, d = prober.of_both(src, "gsrc", dst, "gsrc")  # type: ignore[arg-type]
        assert s.resumable and not d.resumable and d.zfs == "zfs-fuse"
    assert len(src.calls) == len(dst.calls) == 1
    same = CountingHost(OPENZFS_PROBE)
    s, d = prober.of_both(same, "gsrc", same, "gsrc")  # type: ignore[arg-type]
    assert s == d and len(same.calls) == 1


def test_pairs_of_one_host_starting_together_probe_it_once() -> None:
    import threading

    class SlowHost(CountingHost):
        def run(self, argv: list[str], **kw: object) -> Result:
            time.sleep(0.05)  # a probe takes a while: the other workers arrive meanwhile
            return super().run(argv, **kw)

    host = SlowHost(OPENZFS_PROBE)
    prober = Prober()
    workers = [threading.Thread(target=prober.of, args=(host, "gsrc")) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(host.calls) == 1


class RefusingSource(CountingHost):
    """A source whose zettabee-source is of another version: it refuses our probe."""

    is_local = False

    def run(self, argv: list[str], **_: object) -> Result:
        said = (
            "zettabee-source: refused: not a command of a zettabee pull: 'sh -c ...'\n"
            if self.text == "old"
            else "zettabee-source: refused: 'gsrc' is not a pool of a file system this key serves\n"
        )
        return Result(list(argv), self.name, 126, "", said)


def test_a_probe_refused_by_another_zettabee_source_version_says_to_enroll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="zettabee.capabilities"):
        assert not Prober().of(RefusingSource("old"), "gsrc").holds  # type: ignore[arg-type]
    assert "h: its zettabee-source refused the capability probe" in caplog.text
    assert "run `zettabee enroll h`" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="zettabee.capabilities"):
        Prober().of(RefusingSource("pool"), "gsrc")  # type: ignore[arg-type]
    assert "enroll" not in caplog.text


def test_a_child_is_received_unmounted_where_the_destination_s_receive_has_u() -> None:
    modern, dst = caps(OPENZFS_PROBE, "gsrc", "src"), caps(OPENZFS_PROBE, "gsrc", "dst")
    fuse = caps(FUSE_PROBE, "tdstpool", "backup1")
    assert dst.receive_unmounted and not fuse.receive_unmounted
    assert plan_features(modern, dst, child=True).unmounted
    assert "received unmounted" in plan_features(modern, dst, child=True).uses()
    assert not plan_features(modern, dst).unmounted  # a line's own file system: mounted
    assert not plan_features(fuse, fuse, child=True).unmounted


def test_props_need_send_p_and_receive_x_and_leave_the_mount_out() -> None:
    """props=yes: the source's properties in the stream, but never where the source's
    host mounts or shares the file system (a replica mounted over this host's /var/lib/
    postgresql, say); zfs-fuse has send -p but no receive -x, so it is refused there."""
    modern, dst = caps(OPENZFS_PROBE, "gsrc", "src"), caps(OPENZFS_PROBE, "gsrc", "dst")
    assert modern.send_props and modern.receive_exclude
    fuse = caps(FUSE_PROBE, "tdstpool", "backup1")
    assert fuse.send_props and not fuse.receive_exclude
    refused = plan_features(modern, fuse, props=True)
    assert not refused.props and refused.kept_local(volume=False) == ()
    [problem] = refused.problems
    assert (
        "props=yes" in problem and "destination backup1 (zfs-fuse) has no zfs receive -x" in problem
    )
    assert "mountpoint" in problem and "remove props=yes" in problem
    props = plan_features(modern, dst, props=True)
    assert props.problems == () and "the source's properties" in props.uses()
    assert props.kept_local(volume=False) == ("mountpoint", "sharenfs", "sharesmb")
    assert props.kept_local(volume=True) == ()  # OpenZFS 2.1 refuses -x mountpoint on one
    assert plan_features(modern, dst).kept_local(volume=False) == ()
    assert zfs.recv("d/fs", resumable=True, exclude=("mountpoint", "sharenfs")) == [
        "zfs", "receive", "-s", "-x", "mountpoint", "-x", "sharenfs", "d/fs",
    ]  # fmt: skip
    assert zfs.send("p/fs@b", base="p/fs@a", props=True) == [
        "zfs", "send", "-p", "-i", "p/fs@a", "p/fs@b",
    ]  # fmt: skip
