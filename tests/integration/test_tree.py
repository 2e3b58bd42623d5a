"""Recursive pairs: a tree three levels deep, each child its own pair, on the main
topology's back ends (zfs-fuse, and OpenZFS 2.1 and 2.3 in their guests).

What the tree does on top of its pairs (exclusions, a diverged child, a killed run, the
monitoring side) is zettabee's own code, the same whatever ZFS is below: those rows run
on zfs-fuse alone (``zfs_independent``). On the guests run the rows where OpenZFS does
something else: its receive leaves a child unmounted (``zfs receive -u``), it has
volumes, and raw streams of encrypted children.
"""

from __future__ import annotations

import json
import shlex
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.nscad import NscaDaemon
from tests.conftest import BACKENDS, Side, Zb, backend_zb, destroy

pytestmark = pytest.mark.integration


@pytest.fixture(params=BACKENDS)
def zb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Zb]:
    yield from backend_zb(request, tmp_path)


TREE = ("a", "a/b", "a/b/c", "d")
CHAIN = TREE[:3]  # three levels below the line, and no more pairs than that on a guest


def make_tree(zb: Zb, children: tuple[str, ...] = TREE) -> str:
    root = zb.make_source(mb=1)
    for relative in children:
        add_child(zb, relative)
    return root


def add_child(zb: Zb, relative: str, mb: int = 1) -> None:
    zb.src.run("zfs", "create", f"{zb.src_fs()}/{relative}")
    zb.srcside.write_random(zb.src_dir() / relative / "file.bin", mb)


def assert_same_child(zb: Zb, relative: str) -> None:
    mount_replicas(zb, [relative])
    src = own_files(zb.srcside.checksums(zb.src_dir() / relative))
    dst = own_files(zb.dstside.checksums(zb.dst_dir() / relative))
    assert src and dst == src, relative


def replica(zb: Zb, relative: str) -> str:
    return f"{zb.dst_fs()}/{relative}" if relative else zb.dst_fs()


def receives_unmounted(zb: Zb) -> bool:
    """Does the back end's ``zfs receive`` leave a child unmounted (``-u``: OpenZFS has
    it, zfs-fuse not)?"""
    return zb.backend.modern


def mount_replicas(zb: Zb, relatives: list[str]) -> None:
    """Mount the replicas of children (and their parents, first) that a receive left
    unmounted, as an admin who looks into a backup would: ``zfs mount``, each at its
    inherited mountpoint (one shell on the backup host)."""
    names = set()
    for relative in relatives:
        parts = relative.split("/") if relative else []
        names.update("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    quoted = [shlex.quote(replica(zb, r)) for r in sorted(names, key=lambda r: r.count("/"))]
    if quoted:
        zb.dstside.sh(
            " && ".join(f'{{ [ "$(zfs get -H -o value mounted {q})" = yes ] || zfs mount {q}; }}'
                        for q in quoted)
        )  # fmt: skip


def below(side: Side, fs: str, props: str) -> dict[str, dict[str, str]]:
    """``fs`` and everything below it, snapshots too, by name relative to ``fs`` (``""``,
    ``a/b``, ``a/b@snap``, ``@snap``): ``{property: value}`` (one ``zfs get -r``)."""
    out = side.run("zfs", "get", "-Hp", "-r", "-o", "name,property,value,source", props, fs)
    rows: dict[str, dict[str, str]] = {}
    for line in out.stdout.splitlines():
        name, prop, value, origin = line.split("\t")
        relative = name[len(fs) :].removeprefix("/")
        rows.setdefault(relative, {})[prop] = value
        rows[relative][f"{prop}:source"] = origin
    return rows


def assert_same_newest(zb: Zb, members: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Each member's newest snapshot on the destination (its ``zettabee:lastsnap``) is the
    source's (its guid); the destination's listing, for more."""
    props = "guid,zettabee:lastsnap,mounted,canmount,mountpoint,type"
    dst = below(zb.dstside, zb.dst_fs(), props)
    src = below(zb.srcside, zb.src_fs(), "guid")
    for relative in members:
        newest = f"{relative}@{dst[relative]['zettabee:lastsnap']}"
        assert dst[newest]["guid"] == src[newest]["guid"], relative
    return dst


def add_volume(zb: Zb, relative: str) -> bool:
    """A 16 MB volume at ``relative`` with 2 MB of random data, where the back end makes
    one; False where it refuses (zfs-fuse has no volumes: asked, not assumed)."""
    fs = f"{zb.src_fs()}/{relative}"
    made = zb.srcside.run("zfs", "create", "-V", "16M", fs, check=False)
    if made.returncode != 0:
        assert zb.backend.name == "zfs-fuse", made.stderr
        return False
    write_volume(zb, relative, 0, 2)
    return True


def on_volume(side: Side, fs: str, command: str) -> str:
    """``command`` on a volume's device (``{dev}``), once udev has made it (at most 10 s)."""
    dev = shlex.quote(f"/dev/zvol/{fs}")
    wait = f"udevadm settle; for i in $(seq 100); do [ -e {dev} ] && break; sleep 0.1; done"
    return side.sh(f"{wait}; {command.format(dev=dev)}").stdout


def write_volume(zb: Zb, relative: str, at_mb: int, mb: int) -> None:
    on_volume(
        zb.srcside, f"{zb.src_fs()}/{relative}",
        f"dd if=/dev/urandom of={{dev}} bs=1M seek={at_mb} count={mb} conv=fsync status=none",
    )  # fmt: skip


def volume_digest(zb: Zb, relative: str, dest: bool) -> str:
    side, fs = (zb.dstside, zb.dst_fs()) if dest else (zb.srcside, zb.src_fs())
    return on_volume(side, f"{fs}/{relative}", "sha256sum <{dev}").split()[0]


def own_files(sums: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in sums.items() if "/" not in name}


def status(zb: Zb) -> list[dict[str, object]]:
    out = zb.run("status", "--json")
    assert out.returncode == 0, out.stderr
    data: list[dict[str, object]] = json.loads(out.stdout)
    return data


def test_a_tree_three_levels_deep_initializes_and_updates_child_by_child(zb: Zb) -> None:
    make_tree(zb, CHAIN)
    volume = add_volume(zb, "a/vol")  # a volume where the back end has them: a child too
    members = ("", *CHAIN, *(("a/vol",) if volume else ()))
    zb.write_pairs(zb.pair_line(options="recursive=yes"))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    fps = {d["child"]: d["fingerprint"] for d in status(zb)}
    assert set(fps) == set(members) and len(set(fps.values())) == len(members)
    dst = assert_same_newest(zb, members)
    unmounted = receives_unmounted(zb)
    for relative in CHAIN:
        # a plain send carries no properties: the child's mountpoint is below the line's
        # replica, never one of the backup host's own paths
        assert dst[relative]["mountpoint"] == f"{zb.dst_dir()}/{relative}"
        assert dst[relative]["mountpoint:source"].startswith("inherited")
        # received unmounted where the receive can (-u), and kept so at boot; mounted
        # when received where it cannot
        assert dst[relative]["mounted"] == ("no" if unmounted else "yes")
        assert dst[relative]["canmount"] == ("noauto" if unmounted else "on")
    assert dst[""]["mounted"] == "yes" and dst[""]["canmount"] == "on"  # the line's: as ever
    mount_replicas(zb, list(CHAIN))  # as an admin would, to look
    zb.assert_same_data()  # every file of every child, each in its place
    intruders = " ; ".join(
        f"echo x >{shlex.quote(str(zb.dst_dir() / r / 'intruder'))}" for r in ("", *CHAIN)
    )
    refused = zb.dstside.sh(intruders, check=False).stderr
    assert refused.count("Read-only file system") == 4, refused
    if volume:
        assert dst["a/vol"]["type"] == "volume" and dst["a/vol"]["canmount"] == "-"
        assert volume_digest(zb, "a/vol", dest=True) == volume_digest(zb, "a/vol", dest=False)
        write_volume(zb, "a/vol", 8, 1)
    zb.srcside.write_random(zb.src_dir() / "a/b/c/more.bin", 1)
    zb.srcside.write_text(zb.src_dir() / "a" / "note.txt", "changed\n")
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    dst = assert_same_newest(zb, members)
    assert {dst[r]["mounted"] for r in ("", *CHAIN)} == {"yes"}  # a mounted child stays so
    zb.assert_same_data()
    if volume:
        assert volume_digest(zb, "a/vol", dest=True) == volume_digest(zb, "a/vol", dest=False)
    assert {d["state"] for d in status(zb)} == {"Synchronized"}


@pytest.mark.zfs_independent
def test_each_child_is_a_pair_of_its_own(zb: Zb) -> None:
    """Its own fingerprint (on its replica), snapshots, log and status line, found by
    its destination; the line keeps its own fingerprint."""
    initialized_tree(zb)
    fps = {d["child"]: d["fingerprint"] for d in status(zb)}
    assert fps[""] == zb.fingerprint()
    for relative in TREE:
        dest = f"{zb.dst_fs()}/{relative}"
        assert zb.dstside.zget(dest, "zettabee:fingerprint") == fps[relative]
        assert zb.dstside.snapshots(dest)[0].startswith(f"zettabee.{fps[relative]}.")
        log = zb.run("logfile", dest).stdout.strip()
        assert log.endswith(f"{fps[relative]}.log")
        assert zb.run("fingerprint", dest).stdout.split()[-1] == fps[relative]
    text = zb.run("status").stdout
    assert "recursive: 4 child(ren)" in text and f"{zb.dst_fs()}/a/b/c" in text


@pytest.mark.zfs_independent
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


@pytest.mark.zfs_independent
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


@pytest.mark.zfs_independent
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


@pytest.mark.zfs_independent
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


@pytest.mark.zfs_independent
def test_a_run_killed_in_the_middle_of_the_tree_is_finished_by_the_next(zb: Zb) -> None:
    initialized_tree(zb, options=zb.mbuffer("bwlimit=2M"))
    zb.srcside.write_random(zb.src_dir() / "a/b/big.bin", 24)
    zb.srcside.write_random(zb.src_dir() / "d/after.bin", 1)
    fps = {d["child"]: d["fingerprint"] for d in status(zb)}
    proc = zb.popen("zettabee", "update", zb.dst_fs())
    zb.wait_for_transfer(fps["a/b"], "the transfer of a/b")
    zb.kill(proc, signal.SIGKILL)
    proc.wait()
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    for relative in ("", *TREE):
        assert_same_child(zb, relative)
    assert {d["state"] for d in status(zb)} == {"Synchronized"}


@pytest.mark.zfs_independent
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
    proc = zb.plugin(name, *args)
    assert proc.stderr == ""
    return proc.returncode, proc.stdout


def lag_check(zb: Zb, *args: str) -> tuple[int, str]:
    return plugin(zb, "check_zettabee_lag", *args)


@pytest.mark.zfs_independent
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


@pytest.mark.parametrize("zb", ["zfs-fuse"], indirect=True)
def test_a_tree_received_into_an_unmounted_parent_needs_no_mount_directories(zb: Zb) -> None:
    """A source parent that is not mounted holds no mount directories for its children:
    under a destination parent with mountpoint=none, nothing is mounted and each child
    replicates all the same (its newest snapshot's guid is the source's). The way out
    where the receive mounts what it receives (zfs-fuse's has no ``-u``); OpenZFS's
    leaves the children unmounted, the row after this one."""
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


OPENZFS = pytest.mark.parametrize("zb", [b for b in BACKENDS if b != "zfs-fuse"], indirect=True)


@OPENZFS
@pytest.mark.one_openzfs
def test_a_child_its_parents_replica_has_no_directory_for_is_received_unmounted(zb: Zb) -> None:
    """A source file system with ``canmount=off`` holds no directories for its children
    (they mount on the file system above it), so its replica, mounted and read-only on
    the backup host, has none to mount them on. OpenZFS's receive leaves each child
    unmounted (``zfs receive -u``, probed): the tree replicates all the same, and the
    line's own replica is mounted as ever. (zfs-fuse's receive has no ``-u``: there the
    README's way out, ``mountpoint=none`` above the line, is the row before this one.)

    On 2.1 alone: without ``-u``, 2.1's receive failed here ("cannot mount ...: failed
    to create mountpoint: Read-only file system", exit 1), 2.3's did not (the row passed
    there before ``-u``); that 2.3 receives a child unmounted is the tree row's."""
    root = zb.make_source(mb=1)
    zb.src.run("zfs", "set", "canmount=off", root)
    for relative in ("a", "a/b"):
        add_child(zb, relative)
    zb.write_pairs(zb.pair_line(options="recursive=yes"))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    add_child(zb, "a/new")  # a child new to the destination: initialized by the update
    zb.srcside.write_random(zb.src_dir() / "a/b/more.bin", 1)
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    dst = assert_same_newest(zb, ("", "a", "a/b", "a/new"))
    assert [dst[r]["mounted"] for r in ("", "a", "a/b", "a/new")] == ["yes", "no", "no", "no"]


PASSPHRASE = "correct horse battery staple"


@OPENZFS
@pytest.mark.one_openzfs  # 2.3 did all of it alike (2026-12-08), inner root included
def test_an_encrypted_child_sent_raw_keeps_its_encryption_root(zb: Zb) -> None:
    """``raw=yes``: a child that is an encryption root on the source (``vault``) is one
    on the backup host, its key never there, and its data is the source's once loaded.
    A child that inherits its key on the source (``vault/inner``) is an encryption root
    of its own on the backup host (each child is a raw stream of one file system, not
    ``zfs send -R``, and OpenZFS makes such a receive a root), which the same passphrase
    loads."""
    secret = shlex.quote(PASSPHRASE)
    zb.make_source(mb=1)
    vault = f"{zb.src_fs()}/vault"
    zb.srcside.sh(
        f"printf '%s\\n' {secret} | zfs create -o encryption=on -o keyformat=passphrase "
        f"-o keylocation=prompt {vault}"
    )
    zb.srcside.write_random(zb.src_dir() / "vault/secret.bin", 1)
    add_child(zb, "vault/inner")  # inherits the vault's key on the source
    zb.write_pairs(zb.pair_line(options="recursive=yes,raw=yes"))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.srcside.write_random(zb.src_dir() / "vault/inner/more.bin", 1)
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    dst = assert_same_newest(zb, ("", "vault", "vault/inner"))
    crypt = below(zb.dstside, zb.dst_fs(), "encryption,encryptionroot,keystatus")
    assert crypt[""]["encryption"] == "off"
    for relative in ("vault", "vault/inner"):
        assert crypt[relative]["encryption"] == "aes-256-gcm"
        assert crypt[relative]["keystatus"] == "unavailable"  # the key never travelled
        assert crypt[relative]["encryptionroot"] == replica(zb, relative)
        assert dst[relative]["mounted"] == "no"
    assert zb.srcside.zget(f"{vault}/inner", "encryptionroot") == vault
    for relative in ("vault", "vault/inner"):
        zb.dstside.sh(f"printf '%s\\n' {secret} | zfs load-key {replica(zb, relative)}")
    for relative in ("vault", "vault/inner"):
        assert_same_child(zb, relative)  # the key opens exactly the source's data
