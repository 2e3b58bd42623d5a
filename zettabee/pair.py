"""A replication pair: two endpoints, their options, the fingerprint and snapshot names."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

SNAPSHOT_PREFIX = "zettabee"
_STAMP = "%Y%m%dT%H%M%SZ"
_SNAPSHOT_RE = re.compile(r"^zettabee\.(?P<fp>[0-9a-f]{32})\.(?P<stamp>\d{8}T\d{6}Z)$")

TRANSPORTS = ("ssh", "mbuffer", "local")


@dataclass(frozen=True)
class Endpoint:
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


@dataclass(frozen=True)
class PairOptions:
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


@dataclass(frozen=True)
class Pair:
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


def snapshot_name(fp: str, when: datetime) -> str:
    """``zettabee.<fp>.<UTC stamp>``: sortable, unambiguous in every time zone."""
    if when.tzinfo is None:
        raise ValueError("snapshot times must be aware datetimes")
    return f"{SNAPSHOT_PREFIX}.{fp}.{when.astimezone(UTC).strftime(_STAMP)}"


def parse_snapshot_name(name: str) -> tuple[str, datetime] | None:
    """Fingerprint and time of one of our snapshot names (with or without ``fs@``)."""
    match = _SNAPSHOT_RE.match(name.rsplit("@", 1)[-1])
    if not match:
        return None
    try:  # the digits of a time, but no time (month 13): not a name zettabee made
        when = datetime.strptime(match["stamp"], _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None
    return match["fp"], when


def hold_tag(fp: str) -> str:
    """The tag of the pair's holds: ``zfs holds`` names the pair that placed it."""
    return f"{SNAPSHOT_PREFIX}.{fp}"


def is_own_snapshot(name: str, fp: str) -> bool:
    parsed = parse_snapshot_name(name)
    return parsed is not None and parsed[0] == fp
