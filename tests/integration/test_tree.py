"""Recursive pairs on the zfs-fuse lab: a tree three levels deep, each child its own pair."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lab.nscad import NscaDaemon
from tests.conftest import REPO, Zb, destroy

pytestmark = pytest.mark.integration

TREE = ("a", "a/b", "a/b/c", "d")


def make_tree(zb: Zb, children: tuple[str, ...] = TREE) -> str:
    root = zb.make_source(mb=1)
    for relative in children:
        add_child(zb, relative)
    return root


def add_child(zb: Zb, relative: str, mb: int = 1) -> None:
    zb.src.run("zfs", "create", f"{zb.src_fs()}/{relative}")
    zb.srcside.write_random(zb.src_dir() / relative / "file.bin", mb)


def assert_same_child(zb: Zb, relative: str) -> None:
    src = own_files(zb.srcside.checksums(zb.src_dir() / relative))
    dst = own_files(zb.dstside.checksums(zb.dst_dir() / relative))
    assert src and dst == src, relative


def own_files(sums: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in sums.items() if "/" not in name}


def status(zb: Zb) -> list[dict[str, object]]:
    out = zb.run("status", "--json")
    assert out.returncode == 0, out.stderr
    data: list[dict[str, object]] = json.loads(out.stdout)
    return data


def test_a_tree_three_levels_deep_initializes_and_updates_child_by_child(zb: Zb) -> None:
    make_tree(zb)
    zb.write_pairs(zb.pair_line(options="recursive=yes"))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    for relative in ("", *TREE):
        assert_same_child(zb, relative)
    fps = {d["child"]: d["fingerprint"] for d in status(zb)}
    assert set(fps) == {"", *TREE} and len(set(fps.values())) == 5
    assert fps[""] == zb.fingerprint()  # the line keeps its own fingerprint
    for relative in TREE:  # each child its own pair: its own property, snapshot, log
        dest = f"{zb.dst_fs()}/{relative}"
        assert zb.dstside.zget(dest, "zettabee:fingerprint") == fps[relative]
        assert zb.dstside.snapshots(dest)[0].startswith(f"zettabee.{fps[relative]}.")
        # a plain send carries no properties: the child mounts below the line's replica
        where = zb.dstside.run("zfs", "get", "-H", "-o", "value,source", "mountpoint", dest)
        mountpoint, _, origin = where.stdout.strip().partition("\t")
        assert mountpoint == f"{zb.dst_dir()}/{relative}" and origin.startswith("inherited")
        intruder = zb.dstside.sh(f"echo x >{zb.dst_dir()}/{relative}/intruder", check=False)
        assert intruder.returncode != 0 and "Read-only" in intruder.stderr
        log = zb.run("logfile", dest).stdout.strip()
        assert log.endswith(f"{fps[relative]}.log")
        assert zb.run("fingerprint", dest).stdout.split()[-1] == fps[relative]
    zb.srcside.write_random(zb.src_dir() / "a/b/c/more.bin", 1)
    zb.srcside.write_text(zb.src_dir() / "d" / "note.txt", "changed\n")
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    for relative in ("", *TREE):
        assert_same_child(zb, relative)
    assert {d["state"] for d in status(zb)} == {"Synchronized"}
    text = zb.run("status").stdout
    assert "recursive: 4 child(ren)" in text and f"{zb.dst_fs()}/a/b/c" in text


def test_a_line_without_recursive_says_its_children_are_left_out(zb: Zb) -> None:
    make_tree(zb, ("a",))
    zb.write_pairs(zb.pair_line())
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert "recursive=yes" in out.stderr and "1 file system(s) below it (a)" in out.stderr


def initialized_tree(zb: Zb, children: tuple[str, ...] = TREE, options: str = "") -> None:
    make_tree(zb, children)
    line_options = ",".join(o for o in ("recursive=yes", options) if o)
    zb.write_pairs(zb.pair_line(options=line_options))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr


def exists(zb: Zb, relative: str) -> bool:
    fs = f"{zb.dst_fs()}/{relative}"
    return zb.dstside.run("zfs", "list", "-H", "-o", "name", fs, check=False).returncode == 0


def test_a_child_added_is_initialized_and_one_destroyed_keeps_its_replica(zb: Zb) -> None:
    initialized_tree(zb, ("a", "d"))
    add_child(zb, "a/new")
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert_same_child(zb, "a/new")
    assert "a/new" in {d["child"] for d in status(zb)}

    destroy(f"{zb.src_fs()}/d", zb.srcside)  # its holds released first, as an admin would
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr  # a warning, not a failure of the tree
    assert f"{zb.dst_fs()}/d" in out.stderr and "zfs destroy -r" in out.stderr
    assert exists(zb, "d")  # zettabee never destroys a replica by itself
    gone = [d for d in status(zb) if d["source_gone"]]
    assert [d["child"] for d in gone] == ["d"]
    text = zb.run("status").stdout
    assert f"{zb.dst_fs()}/d: its source" in text and "is gone" in text
    code, out_text = lag_check(zb, zb.dst_fs())
    assert code == 1 and "is gone" in out_text and f"zfs destroy -r {zb.dst_fs()}/d" in out_text


def test_an_excluded_child_and_an_excluded_subtree_are_not_replicated(zb: Zb) -> None:
    make_tree(zb, ("a", "a/b", "a/b/c", "d", "tmp"))
    zb.src.run("zfs", "set", "zettabee:exclude=on", f"{zb.src_fs()}/a/b")  # inherited by a/b/c
    zb.write_pairs(zb.pair_line(options="recursive=yes,exclude=tmp"))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert [exists(zb, r) for r in ("a", "a/b", "a/b/c", "d", "tmp")] == [
        True, False, False, True, False,
    ]  # fmt: skip
    assert_same_child(zb, "a")
    assert "3 excluded" in zb.run("status").stdout
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert not exists(zb, "a/b")


def test_one_diverged_child_fails_alone(zb: Zb) -> None:
    initialized_tree(zb)
    zb.dstside.run("zfs", "snapshot", f"{zb.dst_fs()}/a/b@local-extra")
    for relative in ("", *TREE):
        zb.srcside.write_random(zb.src_dir() / relative / "more.bin", 1)
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 1
    failing = [line for line in out.stderr.splitlines() if "local-extra" in line]
    assert len(failing) == 1 and f"{zb.dst_fs()}/a/b" in failing[0]
    for relative in ("", "a", "a/b/c", "d"):  # the others, a/b's own child included
        assert_same_child(zb, relative)
    code, text = plugin(zb, "check_zettabee_runtime", f"{zb.dst_fs()}/a/b")
    assert code == 2 and "local-extra" in text and "rollback=yes" in text
    code, text = plugin(zb, "check_zettabee_runtime", f"{zb.dst_fs()}/a")
    assert code == 0, text
    code, text = plugin(zb, "check_zettabee_runtime", zb.dst_fs())  # the line: worst child
    assert code == 2 and f"{zb.dst_fs()}/a/b" in text


def test_a_run_killed_in_the_middle_of_the_tree_is_finished_by_the_next(zb: Zb) -> None:
    initialized_tree(zb, options=zb.mbuffer("bwlimit=2M"))
    zb.srcside.write_random(zb.src_dir() / "a/b/big.bin", 24)
    zb.srcside.write_random(zb.src_dir() / "d/after.bin", 1)
    fps = {d["child"]: d["fingerprint"] for d in status(zb)}
    proc = zb.popen("zettabee", "update", zb.dst_fs())
    zb.wait_for_transfer(fps["a/b"], "the transfer of a/b")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    for relative in ("", *TREE):
        assert_same_child(zb, relative)
    assert {d["state"] for d in status(zb)} == {"Synchronized"}


def test_the_lag_plugin_on_a_recursive_line_reports_each_child(zb: Zb) -> None:
    initialized_tree(zb)
    code, text = lag_check(zb, zb.dst_fs())
    assert code == 0, text
    assert "5 pairs synchronized" in text
    perfdata = text.partition(" | ")[2]
    for relative in TREE:
        assert f"'{zb.dst_fs()}/{relative}'=" in perfdata
    code, text = lag_check(zb, f"{zb.dst_fs()}/a/b")  # a child on its own
    assert code == 0 and "lag=" in text


def plugin(zb: Zb, name: str, *args: str) -> tuple[int, str]:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [str(REPO / "plugins" / name), "--settings", str(zb.settings), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.stderr == ""
    return proc.returncode, proc.stdout


def lag_check(zb: Zb, *args: str) -> tuple[int, str]:
    return plugin(zb, "check_zettabee_lag", *args)


def test_replicate_updates_the_tree_and_reports_one_service_per_line(
    zb: Zb, nscad: NscaDaemon
) -> None:
    zb.write_settings(
        f"[monitoring]\nhost_name = backup1\npassive = nsca\n\n"
        f"[nsca]\nhost = {nscad.host}\nport = {nscad.port}\npassword = {nscad.password}\n"
        "encryption = xor\ntimeout = 5\n"
    )
    initialized_tree(zb)
    add_child(zb, "e")  # new since the initialize: replicate initializes it
    zb.dstside.run("zfs", "snapshot", f"{zb.dst_fs()}/d@local-extra")
    zb.srcside.write_random(zb.src_dir() / "d" / "more.bin", 1)
    run = zb.exe("replicate", "--all", "--jobs", "4")
    assert run.returncode == 1 and run.stdout == ""
    failing = [line for line in run.stderr.splitlines() if "local-extra" in line]
    assert len(failing) == 1 and f"{zb.dst_fs()}/d:" in failing[0], run.stderr
    assert_same_child(zb, "e")
    for relative in ("", "a", "a/b", "a/b/c"):
        assert_same_child(zb, relative)
    got = {line.service: line for line in nscad.wait_for(2)}
    assert set(got) == {f"zettabee lag {zb.dst_fs()}", f"zettabee runtime {zb.dst_fs()}"}
    runtime = got[f"zettabee runtime {zb.dst_fs()}"]
    assert runtime.code == 2 and f"{zb.dst_fs()}/d last update failed" in runtime.output
    lag = got[f"zettabee lag {zb.dst_fs()}"]
    assert lag.code == 0 and f"{zb.dst_fs()}/e" in lag.output  # the children: long text


def test_a_tree_received_into_an_unmounted_parent_needs_no_mount_directories(zb: Zb) -> None:
    """A source parent that is not mounted holds no mount directories for its children:
    under a destination parent with mountpoint=none, nothing is mounted and each child
    replicates all the same (its newest snapshot's guid is the source's)."""
    root = zb.src_fs()
    zb.src.run("zfs", "create", "-o", "mountpoint=none", root)
    for relative in ("a", "a/b", "d"):
        zb.src.run("zfs", "create", f"{root}/{relative}")
    parent = zb.dst_fs("parent")
    zb.dstside.run("zfs", "create", "-o", "mountpoint=none", parent)
    line = f"{zb.srcside.address}:{root}  {zb.dstside.address}:{parent}/data  recursive=yes"
    zb.write_pairs(line)
    out = zb.run("initialize", f"{parent}/data")
    assert out.returncode == 0, out.stderr
    zb.src.run("zfs", "create", f"{root}/d/new")  # a child new to the destination
    out = zb.run("update", f"{parent}/data")
    assert out.returncode == 0, out.stderr
    for relative in ("", "a", "a/b", "d", "d/new"):
        suffix = f"/{relative}" if relative else ""
        src, dst = f"{root}{suffix}", f"{parent}/data{suffix}"
        newest = zb.dstside.snapshots(dst)[-1]
        assert zb.srcside.zget(f"{src}@{newest}", "guid") == zb.dstside.zget(
            f"{dst}@{newest}", "guid"
        )
        assert zb.dstside.zget(dst, "mounted") == "no"
