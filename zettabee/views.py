"""What a run reads of both sides: the destination's record, resume token and
snapshots, the source's snapshots and bookmarks; and the destinations a fleet run lists
ahead for many pairs at once (:class:`Prefetch`)."""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

from zettabee import zfs
from zettabee.capabilities import Capabilities, PairFeatures
from zettabee.errors import StateError
from zettabee.host import Host
from zettabee.hosts import Hosts
from zettabee.pair import Pair


class DestView(NamedTuple):
    """A destination's zettabee properties (and resume token) and its snapshots."""

    props: dict[str, str]
    snapshots: list[zfs.Snapshot]

    @property
    def volume(self) -> bool:
        return self.props.get("type") == "volume"


def dest_props(caps: Capabilities | None) -> list[str]:
    """What a destination's listing reads: its snapshots, the pair's record, its type
    (a volume receives without ``-x``: see PairFeatures.kept_local), and the resume token
    and hold counts where ``caps`` has them."""
    props = [*zfs.SNAPSHOT_PROPS, zfs.PROP_FINGERPRINT, zfs.PROP_LASTSNAP, "type"]
    if caps is not None and caps.resumable:
        props.append(zfs.PROP_RESUME_TOKEN)
    if caps is not None and caps.holds:
        props.append(zfs.PROP_USERREFS)
    return props


def dest_view(pair: Pair, dst: Host, caps: Capabilities | None = None) -> DestView | None:
    """The destination's zettabee properties, resume token and snapshots, in one call
    (``caps``: what the destination can do, which says what there is to read); None when
    the destination does not exist."""
    fs = pair.destination.fs
    result = dst.run(zfs.get([fs], dest_props(caps), depth=1, own=True), check=False)
    if result.returncode != 0:
        if zfs.missing_dataset(result.stderr):
            return None
        raise result.error("zfs get")
    table = zfs.parse_get(result.stdout)
    return DestView(table.get(fs, {}), zfs.parse_snapshots(fs, result.stdout))


def source_view(
    pair: Pair, src: Host, feats: PairFeatures | None = None
) -> tuple[list[zfs.Snapshot], list[zfs.Bookmark]]:
    """The source's snapshots (with their hold counts) and bookmarks, in one call."""
    fs = pair.source.fs
    holds = feats is not None and feats.source.holds
    marks = feats is not None and feats.source.bookmarks
    result = src.run(zfs.list_snapshots(fs, holds=holds, bookmarks=marks), check=False)
    if result.returncode != 0:
        if zfs.missing_dataset(result.stderr):
            raise StateError(
                f"{pair.name}: the source {pair.source} does not exist "
                f"({result.stderr.strip()}); check the pair file"
            )
        raise result.error("zfs get")
    return zfs.parse_snapshots(fs, result.stdout), zfs.parse_bookmarks(fs, result.stdout)


def views_by_fs(names: list[str], text: str) -> dict[str, DestView]:
    """Each listed file system's properties and snapshots, from one ``zfs get -d 1`` of
    them all (a file system absent from ``text`` is absent here)."""
    wanted = set(names)
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        fs = line.partition("\t")[0].partition("@")[0]
        if fs in wanted:
            rows.setdefault(fs, []).append(line)
    views = {}
    for fs, lines in rows.items():
        own = "\n".join(lines)
        views[fs] = DestView(zfs.parse_get(own).get(fs, {}), zfs.parse_snapshots(fs, own))
    return views


class Prefetch:
    """Destinations listed ahead for a fleet run, one ``zfs get`` per pool on this host,
    each view handed to the pair's update once; safe to share between the worker threads
    (the listing thread fills it while they take from it)."""

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        self._lock = threading.Lock()
        # Per file system: when its listing started, and its view.
        self._views: dict[str, tuple[float, DestView]] = {}

    def list(self, pairs: list[Pair]) -> None:
        """List the destinations of ``pairs`` that are on this host: each update then
        spares its own listing, unless a run of the pair ended after this listing began
        (see :meth:`take`). A destination the listing lacks (not initialized, say) is
        listed by its update."""
        by_pool: dict[str, list[Pair]] = {}
        for pair in pairs:
            if self.hosts.get(pair.destination, pair).is_local:
                by_pool.setdefault(pair.destination.pool, []).append(pair)
        for pool, members in by_pool.items():
            dst = self.hosts.get(members[0].destination, members[0])
            started = time.time()
            caps = self.hosts.prober.of(dst, pool)
            names = sorted({p.destination.fs for p in members})
            result = dst.run(zfs.get(names, dest_props(caps), depth=1, own=True), check=False)
            try:  # rows of the file systems that exist, whatever zfs said of the others
                views = views_by_fs(names, result.stdout)
            except ValueError:
                continue
            with self._lock:
                for fs, view in views.items():
                    self._views[fs] = (started, view)

    def take(self, pair: Pair, settled_at: float | None) -> DestView | None:
        """The pair's destination as listed ahead, if nothing of the pair's can have
        changed it since: its last run ended (``settled_at``, read under the pair's lock,
        which every run that changes a destination takes) before that listing began."""
        with self._lock:
            taken = self._views.pop(pair.destination.fs, None)
        if taken is None or settled_at is None or settled_at >= taken[0]:
            return None
        return taken[1]
