"""A replication pair: two endpoints, their options, the fingerprint and snapshot names.

A pair's snapshots and holds carry its fingerprint and the replica id of the destination
pool that receives them (:func:`replica_id`): two backup servers that pull one source
under the same pair line (``SRC:tank/home localhost:backup/home`` on each) have one
fingerprint, but their pools differ, and so do their snapshots and holds on the source.
Names from before the replica id (``zettabee.<fp>.<stamp>``, hold ``zettabee.<fp>``)
still count as the pair's.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import namedtuple
from datetime import UTC, datetime

from zettabee.records import Record, field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple

SNAPSHOT_PREFIX = "zettabee"
_STAMP = "%Y%m%dT%H%M%SZ"
# zettabee.<fp>.<rid>.<stamp>, and the names from before the replica id without <rid>.
_SNAPSHOT_RE = re.compile(
    r"^zettabee\.(?P<fp>[0-9a-f]{32})\.(?:(?P<rid>[0-9a-f]{8})\.)?(?P<stamp>\d{8}T\d{6}Z)$"
)

TRANSPORTS = ("ssh", "mbuffer", "local")


class Endpoint(Record, frozen=True):
    """``host:pool/fs``; the host is a name or address, the file system a ZFS name."""

    host: str
    fs: str

    @property
    def pool(self) -> str:
        return self.fs.split("/", 1)[0]

    @property
    def leaf(self) -> str:
        return self.fs.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{self.host}:{self.fs}"


class PairOptions(Record, frozen=True):
    """Per-pair settings; every default is defined once, in the settings file's [defaults]."""

    transport: str = "ssh"
    port: int | None = None
    sshport: int = 22
    sshkey: str | None = None
    user: str = "root"
    knownhosts: str | None = None
    wlag: int = 2 * 3600
    clag: int = 6 * 3600
    wrun: int = 3600
    crun: int = 4 * 3600
    intermediate: bool = False
    rollback: bool = False
    keep: int = 1
    bwlimit: str | None = None
    stall: int = 300
    mbufferhost: str | None = None
    compression: str | None = None
    # Modern ZFS: used where both hosts have it (resume, hold), demanded when set (raw,
    # bookmark): a replica's safety must not change silently with the host.
    resume: bool = True
    hold: bool = True
    bookmark: bool = False
    raw: bool = False
    # The source's properties in the stream (send -p), but never those that say where
    # and how the source's own host serves the file system (see PairFeatures.kept_local).
    props: bool = False
    # A tree: the source and each descendant file system and volume, each its own pair
    # (zettabee.tree); ``exclude`` holds patterns of relative names left out.
    recursive: bool = False
    exclude: tuple[str, ...] = ()


class Pair(Record, frozen=True):
    source: Endpoint
    destination: Endpoint
    options: PairOptions = field(default_factory=PairOptions)
    path: str = ""
    line: int = 0
    # A child of a recursive line: its name relative to the line's source and destination
    # (``a/b``); empty for the line's own pair.
    relative: str = ""

    @functools.cached_property
    def fingerprint(self) -> str:  # asked for often: thousands of times in a fleet's status
        if self.relative:
            return child_fingerprint(self.line_fingerprint, self.relative)
        return fingerprint(self.source, self.destination)

    @functools.cached_property
    def line_fingerprint(self) -> str:
        """The fingerprint of the pair line this pair comes from (its own, for a line)."""
        if not self.relative:
            return self.fingerprint
        suffix = len(self.relative) + 1
        return fingerprint(
            Endpoint(self.source.host, self.source.fs[:-suffix]),
            Endpoint(self.destination.host, self.destination.fs[:-suffix]),
        )

    @property
    def is_child(self) -> bool:
        return bool(self.relative)

    @property
    def name(self) -> str:
        return str(self.destination)

    def __str__(self) -> str:
        return f"{self.source} -> {self.destination}"


def fingerprint(source: Endpoint, destination: Endpoint) -> str:
    """The seed's identity of a pair: MD5 of ``shost:sfs::dhost:dfs``."""
    text = f"{source.host}:{source.fs}::{destination.host}:{destination.fs}"
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def child_fingerprint(line_fp: str, relative: str) -> str:
    """A recursive line's child: MD5 of ``<the line's fingerprint>/<relative name>``, so
    that it stays with the line (not with the names of its two file systems) and no two
    children of one line, nor a child and its line, share one."""
    text = f"{line_fp}/{relative}"
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def replica_id(pool_guid: str) -> str:
    """The replica id of the destination pool with guid ``pool_guid`` (as ``zpool get``
    prints it): the first 8 hex digits of its MD5. The guid is the pool's own, random
    when it was created: it moves with the pool (export, import, a new host) and differs
    between two backup servers' pools of one name. Eight digits keep snapshot names
    short (ZFS allows 255 characters for ``fs@snapshot``); two pools share them once in
    four billion."""
    return hashlib.md5(pool_guid.encode(), usedforsecurity=False).hexdigest()[:8]


def snapshot_name(fp: str, rid: str, when: datetime) -> str:
    """``zettabee.<fp>.<rid>.<UTC stamp>``: sortable by time within a replica,
    unambiguous in every time zone."""
    if when.tzinfo is None:
        raise ValueError("snapshot times must be aware datetimes")
    return f"{SNAPSHOT_PREFIX}.{fp}.{rid}.{when.astimezone(UTC).strftime(_STAMP)}"


if TYPE_CHECKING:

    class SnapshotName(NamedTuple):
        fp: str
        when: datetime
        rid: str | None  # None: a name from before the replica id

else:  # the same class, without importing typing (which costs every check)
    SnapshotName = namedtuple("SnapshotName", "fp when rid")


def parse_snapshot_name(name: str) -> SnapshotName | None:
    """Fingerprint, time and replica id of one of our snapshot names (with or without
    ``fs@``)."""
    match = _SNAPSHOT_RE.match(name.rsplit("@", 1)[-1])
    if not match:
        return None
    # The stamp is ISO 8601's basic format, which fromisoformat reads as strptime(_STAMP)
    # would, without strptime's import (the check plugins read one name per pair).
    try:  # the digits of a time, but no time (month 13): not a name zettabee made
        when = datetime.fromisoformat(match["stamp"])
    except ValueError:
        return None
    return SnapshotName(match["fp"], when, match["rid"])


def hold_tag(fp: str, rid: str | None) -> str:
    """The tag of a replica's holds, ``zettabee.<fp>.<rid>``: ``zfs holds`` names the
    pair and the destination that placed it (``rid`` None: the tag from before the
    replica id, ``zettabee.<fp>``). It is the name of the snapshot it holds without
    the time."""
    return f"{SNAPSHOT_PREFIX}.{fp}" if rid is None else f"{SNAPSHOT_PREFIX}.{fp}.{rid}"


def tag_of(name: str) -> str | None:
    """The tag zettabee holds the snapshot ``name`` (with or without ``fs@``) under;
    None for a snapshot that is not zettabee's."""
    parsed = parse_snapshot_name(name)
    return None if parsed is None else hold_tag(parsed.fp, parsed.rid)


def is_pair_snapshot(name: str, fp: str) -> bool:
    """A snapshot of pair ``fp``, whichever replica's: what a destination holds of the
    pair is all its own (only its pair receives into it)."""
    parsed = parse_snapshot_name(name)
    return parsed is not None and parsed.fp == fp


def is_own_snapshot(name: str, fp: str, rid: str) -> bool:
    """A snapshot of pair ``fp`` that replica ``rid`` may release and destroy on the
    source: its own, or one named before the replica id (then the pair's; a second
    server under the same pair line may share those, see the README)."""
    parsed = parse_snapshot_name(name)
    return parsed is not None and parsed.fp == fp and parsed.rid in (rid, None)


class Replica(Record, frozen=True):
    """A pair as one destination receives it: the pair's fingerprint and the replica id
    of the destination's pool."""

    fp: str
    rid: str

    @property
    def tag(self) -> str:
        return hold_tag(self.fp, self.rid)

    def snapshot_name(self, when: datetime) -> str:
        return snapshot_name(self.fp, self.rid, when)

    def on_source(self, name: str) -> bool:
        """Is the source's snapshot or bookmark ``name`` this replica's to release and
        destroy?"""
        return is_own_snapshot(name, self.fp, self.rid)

    def on_destination(self, name: str) -> bool:
        """Is the destination's snapshot ``name`` the pair's?"""
        return is_pair_snapshot(name, self.fp)
