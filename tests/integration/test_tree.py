"""Recursive pairs on the zfs-fuse lab: a tree three levels deep, each child its own pair."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Zb

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
        assert zb.dstside.zget(dest, "mounted") in ("yes", "-")
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
