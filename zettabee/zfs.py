"""zfs command lines (pure argv builders) and parsers of their ``-H`` output.

Only options that zfs-fuse (pool version 23) and OpenZFS 2.x both understand are used
unconditionally; ``zfs get -Hp`` is the one listing form both print in full precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PROP_FINGERPRINT = "zettabee:fingerprint"
PROP_LASTSNAP = "zettabee:lastsnap"
PROP_SOURCE = "zettabee:source"
# createtxg orders snapshots exactly; creation has a resolution of one second.
SNAPSHOT_PROPS = ["guid", "creation", "createtxg"]


@dataclass(frozen=True)
class Snapshot:
    """A snapshot as ZFS knows it: the guid identifies it on every side of a replication."""

    fs: str
    name: str
    guid: int
    creation: int
    txg: int = 0

    @property
    def full(self) -> str:
        return f"{self.fs}@{self.name}"


def snapshot(fs: str, name: str) -> list[str]:
    return ["zfs", "snapshot", f"{fs}@{name}"]


def get(targets: Sequence[str], props: Iterable[str], depth: int | None = None) -> list[str]:
    argv = ["zfs", "get", "-Hp"]
    if depth is not None:
        argv += ["-d", str(depth)]
    return [*argv, "-o", "name,property,value", ",".join(props), "--", *targets]


def list_snapshots(fs: str) -> list[str]:
    """guid and creation of ``fs`` and its snapshots (depth 1 also lists child file systems,
    which :func:`parse_snapshots` drops)."""
    return get([fs], SNAPSHOT_PROPS, depth=1)


def send(
    snap: str,
    base: str | None = None,
    intermediate: bool = False,
    raw: bool = False,
    compressed: bool = False,
    props: bool = False,
) -> list[str]:
    argv = ["zfs", "send"]
    if raw:
        argv.append("-w")
    if compressed:
        argv.append("-c")
    if props:
        argv.append("-p")
    if base is not None:
        argv += ["-I" if intermediate else "-i", base]
    return [*argv, snap]


def recv(fs: str, force: bool = False, resumable: bool = False) -> list[str]:
    argv = ["zfs", "receive"]
    if force:
        argv.append("-F")
    if resumable:
        argv.append("-s")
    return [*argv, fs]


def set_prop(fs: str, prop: str, value: str) -> list[str]:
    # One property per call: zfs-fuse's `zfs set` takes exactly one.
    return ["zfs", "set", f"{prop}={value}", fs]


def destroy(target: str, recursive: bool = False) -> list[str]:
    if "@" not in target and not recursive:
        raise ValueError(f"refusing to build a destroy of a file system without -r: {target}")
    return ["zfs", "destroy", *(["-r"] if recursive else []), target]


def rollback(snap: str) -> list[str]:
    return ["zfs", "rollback", "-r", snap]


def create(fs: str, parents: bool = True) -> list[str]:
    return ["zfs", "create", *(["-p"] if parents else []), fs]


def parse_get(text: str) -> dict[str, dict[str, str]]:
    """``name -> {property: value}`` from ``zfs get -H -o name,property,value``."""
    table: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"unexpected zfs get line: {line!r}")
        name, prop, value = parts
        table.setdefault(name, {})[prop] = value
    return table


def parse_snapshots(fs: str, text: str) -> list[Snapshot]:
    """The snapshots of ``fs`` itself, oldest first (by the transaction that made them)."""
    snaps = []
    for name, props in parse_get(text).items():
        base, _, snapname = name.partition("@")
        if base != fs or not snapname:
            continue
        txg = int(props.get("createtxg", 0))
        snaps.append(Snapshot(fs, snapname, int(props["guid"]), int(props["creation"]), txg))
    snaps.sort(key=lambda s: (s.txg, s.creation, s.name))
    return snaps


def user_prop(value: str | None) -> str | None:
    """A user property's value, or None where ZFS prints ``-`` for 'not set'."""
    return None if value in (None, "-", "") else value


def missing_dataset(stderr: str) -> bool:
    return "dataset does not exist" in stderr


def common_snapshot(source: Sequence[Snapshot], dest: Sequence[Snapshot]) -> Snapshot | None:
    """The newest destination snapshot whose guid the source still has."""
    on_source = {s.guid for s in source}
    for snap in reversed(dest):
        if snap.guid in on_source:
            return snap
    return None
