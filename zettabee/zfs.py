"""zfs command lines (pure argv builders) and parsers of their ``-H`` output.

Only options that zfs-fuse (pool version 23) and OpenZFS 2.x both understand are used
unconditionally; ``zfs get -Hp`` is the one listing form both print in full precision.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterable, Sequence

from zettabee.records import Record

PROP_FINGERPRINT = "zettabee:fingerprint"
PROP_LASTSNAP = "zettabee:lastsnap"
PROP_SOURCE = "zettabee:source"
PROP_RESUME_TOKEN = "receive_resume_token"
# createtxg orders snapshots exactly; creation has a resolution of one second.
SNAPSHOT_PROPS = ["guid", "creation", "createtxg"]
# How many holds a snapshot carries; asked for only where holds exist.
PROP_USERREFS = "userrefs"


class Snapshot(Record, frozen=True):
    """A snapshot as ZFS knows it: the guid identifies it on every side of a replication."""

    fs: str
    name: str
    guid: int
    creation: int
    txg: int = 0
    userrefs: int = 0

    @property
    def full(self) -> str:
        return f"{self.fs}@{self.name}"


class Bookmark(Record, frozen=True):
    """A bookmark keeps a snapshot's guid and txg after the snapshot is gone: enough to
    be the base of an incremental send (``-i fs#name``), not to receive into."""

    fs: str
    name: str
    guid: int
    creation: int
    txg: int = 0

    @property
    def full(self) -> str:
        return f"{self.fs}#{self.name}"


def snapshot(fs: str, name: str) -> list[str]:
    return ["zfs", "snapshot", f"{fs}@{name}"]


def get(
    targets: Sequence[str],
    props: Iterable[str],
    depth: int | None = None,
    types: Sequence[str] | None = None,
    own: bool = False,
) -> list[str]:
    """``zfs get -Hp``; with ``own``, each value's source too, so that :func:`parse_get`
    drops what a file system inherits from the one above it (see there)."""
    argv = ["zfs", "get", "-Hp"]
    if depth is not None:
        argv += ["-d", str(depth)]
    if types:  # OpenZFS only: zfs-fuse's zfs get has no -t
        argv += ["-t", ",".join(types)]
    columns = "name,property,value,source" if own else "name,property,value"
    return [*argv, "-o", columns, ",".join(props), "--", *targets]


def list_snapshots(fs: str, holds: bool = False, bookmarks: bool = False) -> list[str]:
    """guid and creation of ``fs`` and its snapshots (depth 1 also lists child file systems,
    which :func:`parse_snapshots` drops); the hold counts and bookmarks where asked."""
    props = [*SNAPSHOT_PROPS, *([PROP_USERREFS] if holds else [])]
    types = ["filesystem", "volume", "snapshot", "bookmark"] if bookmarks else None
    return get([fs], props, depth=1, types=types)


def send(
    snap: str,
    base: str | None = None,
    intermediate: bool = False,
    raw: bool = False,
    compressed: bool = False,
    props: bool = False,
    estimate: bool = False,
) -> list[str]:
    """``zfs send``; ``base`` may be a snapshot or a bookmark (``fs#name``, only with -i).

    ``estimate`` makes it the dry run that prints the stream's size (``-nvP``) with the
    same flags, since raw and compressed streams differ in size."""
    argv = ["zfs", "send"]
    if estimate:
        argv.append("-nvP")
    if raw:
        argv.append("-w")
    if compressed:
        argv.append("-c")
    if props:
        argv.append("-p")
    if base is not None:
        argv += ["-I" if intermediate and "#" not in base else "-i", base]
    return [*argv, snap]


def send_resume(token: str, estimate: bool = False) -> list[str]:
    """Go on with an interrupted stream; the token carries the snapshots and the flags."""
    return ["zfs", "send", *(["-nvP"] if estimate else []), "-t", token]


def recv(
    fs: str,
    force: bool = False,
    resumable: bool = False,
    exclude: Sequence[str] = (),
    unmounted: bool = False,
) -> list[str]:
    """``zfs receive``; ``exclude``: properties of the stream it leaves out (``-x``), so
    that the received file system inherits them here; ``unmounted``: not mounted once
    received (``-u``)."""
    argv = ["zfs", "receive"]
    if force:
        argv.append("-F")
    if resumable:
        argv.append("-s")
    if unmounted:
        argv.append("-u")
    for prop in exclude:
        argv += ["-x", prop]
    return [*argv, fs]


def recv_abort(fs: str) -> list[str]:
    """Discard the partial state an interrupted ``receive -s`` kept (and its token)."""
    return ["zfs", "receive", "-A", fs]


def hold(tag: str, snap: str) -> list[str]:
    return ["zfs", "hold", tag, snap]


def release(tag: str, snap: str) -> list[str]:
    return ["zfs", "release", tag, snap]


def bookmark(snap: str, mark: str) -> list[str]:
    return ["zfs", "bookmark", snap, mark]


def set_prop(fs: str, prop: str, value: str) -> list[str]:
    # One property per call: zfs-fuse's `zfs set` takes exactly one.
    return ["zfs", "set", f"{prop}={value}", fs]


def destroy(target: str, recursive: bool = False) -> list[str]:
    if "@" not in target and "#" not in target and not recursive:
        raise ValueError(f"refusing to build a destroy of a file system without -r: {target}")
    return ["zfs", "destroy", *(["-r"] if recursive else []), target]


def rollback(snap: str) -> list[str]:
    return ["zfs", "rollback", "-r", snap]


def create(fs: str, parents: bool = True) -> list[str]:
    return ["zfs", "create", *(["-p"] if parents else []), fs]


INHERITED = "inherited from "


def parse_get(text: str) -> dict[str, dict[str, str]]:
    """``name -> {property: value}`` from ``zfs get -H -o name,property,value[,source]``.

    With the source column, a value a file system inherits from another file system is
    left out: a pair into ``backup/home/alice`` must not take ``backup/home``'s
    ``zettabee:fingerprint`` for its own. A snapshot keeps what it inherits from its own
    file system (that is the file system's record, read through the snapshot)."""
    table: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) not in (3, 4):
            raise ValueError(f"unexpected zfs get line: {line!r}")
        name, prop, value = parts[:3]
        row = table.setdefault(name, {})
        if len(parts) == 4 and parts[3].startswith(INHERITED):
            if parts[3][len(INHERITED) :] != name.partition("@")[0]:
                continue
        row[prop] = value
    return table


def parse_snapshots(fs: str, text: str) -> list[Snapshot]:
    """The snapshots of ``fs`` itself, oldest first (by the transaction that made them)."""
    snaps = []
    for name, props in parse_get(text).items():
        base, _, snapname = name.partition("@")
        if base != fs or not snapname:
            continue
        txg = int(props.get("createtxg", 0))
        refs = _count(props.get(PROP_USERREFS))
        snap = Snapshot(fs, snapname, int(props["guid"]), int(props["creation"]), txg, refs)
        snaps.append(snap)
    snaps.sort(key=lambda s: (s.txg, s.creation, s.name))
    return snaps


def parse_bookmarks(fs: str, text: str) -> list[Bookmark]:
    """The bookmarks of ``fs`` itself, oldest first."""
    marks = []
    for name, props in parse_get(text).items():
        base, _, markname = name.partition("#")
        if base != fs or not markname:
            continue
        txg = int(props.get("createtxg", 0))
        marks.append(Bookmark(fs, markname, int(props["guid"]), int(props["creation"]), txg))
    marks.sort(key=lambda m: (m.txg, m.creation, m.name))
    return marks


def _count(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def parse_estimate(text: str) -> int | None:
    """Bytes of the stream from ``zfs send -nvP`` (its ``size`` line), None without one."""
    size = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "size" and parts[1].isdigit():
            size = int(parts[1])
    return size


def parse_resume_contents(text: str) -> dict[str, str]:
    """The fields of a resume token as ``zfs send -nvP -t`` prints them (``toname``,
    ``toguid``, ``fromguid``, ``bytes``...); numbers stay as printed (hex)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep and key.isidentifier():
            fields[key] = value.strip()
    return fields


def hex_or_int(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(value, 0)
    except ValueError:
        return None


def resume_token(value: str | None) -> str | None:
    """The token from a ``receive_resume_token`` value: ``-`` means none."""
    return user_prop(value)


# As text, not compiled: re compiles (and caches) it when a token is read, not in every check.
_TOKEN = r"1-(?P<sum>[0-9a-f]{1,16})-(?P<size>[0-9a-f]{1,16})-(?P<data>(?:[0-9a-f]{2})+)"
_TOKEN_PACKED_MAX = 1 << 16
# nvpair data types a resume token carries (sys/nvpair.h), each with its value's size
_NV_BOOLEAN, _NV_UINT64, _NV_STRING, _NV_UINT64_ARRAY, _NV_BOOLEAN_VALUE = 1, 8, 9, 16, 21


def decode_resume_token(token: str) -> dict[str, int | str | bool | list[int]]:
    """The fields of a resume token, read the way ``zfs send -t`` reads them.

    A token is ``1-<checksum>-<packed size>-<hex>``: the hex is a zlib-compressed nvlist
    packed in the kernel's native encoding (``toname``, ``toguid``, ``fromguid``,
    ``object``, ``offset``, ``bytes``, flags). The source's restricted command must know
    which snapshot a token sends before it lets ``zfs send -t`` run, without asking that
    zfs: so the nvlist is read here, strictly. Anything but one flat list of the types
    tokens use, each name once, raises ValueError; ZFS checks the checksum itself."""
    match = re.fullmatch(_TOKEN, token)
    if match is None:
        raise ValueError("not a version 1 resume token")
    size = int(match["size"], 16)
    if not 0 < size <= _TOKEN_PACKED_MAX:
        raise ValueError(f"packed size {size} out of range")
    try:
        unzip = zlib.decompressobj()
        packed = unzip.decompress(bytes.fromhex(match["data"]), size + 1)
    except zlib.error as exc:
        raise ValueError(f"not zlib data: {exc}") from None
    if len(packed) != size or not unzip.eof or unzip.unused_data:
        raise ValueError("the packed nvlist is not the size the token says")
    try:
        return _native_nvlist(packed)
    except struct.error as exc:
        raise ValueError(f"truncated nvlist: {exc}") from None


def _native_nvlist(data: bytes) -> dict[str, int | str | bool | list[int]]:
    """A flat nvlist packed with ``NV_ENCODE_NATIVE``: a header (encoding 0, byte order),
    version and flags, then each pair (size, name size, reserved, element count, type,
    the name and the value, each padded to 8 bytes), then a zero size."""
    if len(data) < 16 or data[0] != 0 or data[1] not in (0, 1):
        raise ValueError("not a natively packed nvlist")
    order = "<" if data[1] == 1 else ">"
    version = struct.unpack_from(f"{order}i", data, 4)[0]
    if version != 0:
        raise ValueError(f"nvlist version {version}")
    fields: dict[str, int | str | bool | list[int]] = {}
    pos = 12
    while True:
        (size,) = struct.unpack_from(f"{order}i", data, pos)
        if size == 0:
            if pos + 4 != len(data):
                raise ValueError("bytes after the end of the nvlist")
            return fields
        name_size, _reserved, count, kind = struct.unpack_from(f"{order}hhii", data, pos + 4)
        value_at = pos + _align8(16 + name_size)
        end = pos + size
        if size % 8 or name_size < 2 or value_at > end or end > len(data):
            raise ValueError("an nvpair's size is out of range")
        raw_name = data[pos + 16 : pos + 16 + name_size]
        if raw_name.index(b"\0") != name_size - 1:
            raise ValueError("an nvpair's name is not the size it says")
        name = raw_name[:-1].decode()
        value: int | str | bool | list[int]
        if kind == _NV_BOOLEAN and count == 0:
            value, length = True, 0
        elif kind == _NV_BOOLEAN_VALUE and count == 1:
            value, length = bool(struct.unpack_from(f"{order}i", data, value_at)[0]), 4
        elif kind == _NV_UINT64 and count == 1:
            value, length = struct.unpack_from(f"{order}Q", data, value_at)[0], 8
        elif kind == _NV_UINT64_ARRAY and 0 <= count <= 1024:
            value, length = list(struct.unpack_from(f"{order}{count}Q", data, value_at)), 8 * count
        elif kind == _NV_STRING and count == 1:
            text = data[value_at:end]
            if b"\0" not in text:
                raise ValueError(f"nvpair {name!r}: an unterminated string")
            length = text.index(b"\0") + 1
            value = text[: length - 1].decode()
        else:
            raise ValueError(f"nvpair {name!r}: type {kind} with {count} elements")
        if value_at + _align8(length) != end:
            raise ValueError(f"nvpair {name!r} is not the size it says")
        if name in fields:
            raise ValueError(f"nvpair {name!r} twice")
        fields[name] = value
        pos = end


def _align8(n: int) -> int:
    return (n + 7) & ~7


def stale_token(stderr: str) -> bool:
    """Does ``zfs send -t`` refuse because the token no longer applies (a snapshot it
    names was destroyed or replaced), as opposed to a broken link?"""
    text = stderr.lower()
    return (
        "cannot resume send" in text
        or "invalid resume token" in text
        or ("resume token" in text and "corrupt" in text)
    )


def tag_missing(stderr: str) -> bool:
    return "no such tag" in stderr


def tag_exists(stderr: str) -> bool:
    return "tag already exists" in stderr


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


def common_base(
    source: Sequence[Snapshot], marks: Sequence[Bookmark], dest: Sequence[Snapshot]
) -> tuple[Snapshot, str] | None:
    """The newest destination snapshot the source can send from, and what the source
    sends from (``fs@snap``, or ``fs#mark`` when only a bookmark of it is left)."""
    snaps = {s.guid: s for s in source}
    books = {m.guid: m for m in marks}
    for snap in reversed(dest):
        if snap.guid in snaps:
            return snap, snaps[snap.guid].full
        if snap.guid in books:
            return snap, books[snap.guid].full
    return None
