"""The pair's snapshots on either side: a new one, the record on the destination, holds
and their release, bookmarks, destroying (busy retried), and which of them can go.

Which snapshots are the pair's depends on the side (see :class:`zettabee.pair.Replica`):
on the source, only this replica's (and those named before the replica id); another
backup server's under the same pair line are never touched there. On the destination
every snapshot of the pair is this replica's.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime

from zettabee import zfs
from zettabee.errors import CommandError
from zettabee.host import Host
from zettabee.pair import Pair, Replica, tag_of
from zettabee.threads import Background, wait_all

log = logging.getLogger(__name__)


# Is this snapshot (or bookmark) name the pair's, on the side it was listed on?
Owns = Callable[[str], bool]


def fresh_name(replica: Replica, taken: Collection[str]) -> str:
    """A new snapshot name of the replica, none of ``taken``: two runs within one second
    wait for the next."""
    name = replica.snapshot_name(datetime.now(UTC))
    while name in taken:
        time.sleep(0.2)
        name = replica.snapshot_name(datetime.now(UTC))
    return name


def new_snapshot(pair: Pair, replica: Replica, src: Host, existing: list[zfs.Snapshot]) -> str:
    name = fresh_name(replica, {s.name for s in existing})
    src.run(zfs.snapshot(pair.source.fs, name))
    log.info("%s: snapshot %s@%s", pair.name, pair.source.fs, name)
    return name


def record(pair: Pair, dst: Host, snap: str, first: bool, noauto: bool = False) -> None:
    """Record ``snap`` as the destination's newest (``first``: and claim it for the pair).

    ``noauto``: a file system received unmounted stays so when the host boots
    (``canmount=noauto``: ``zfs mount -a`` leaves it, and never fails for a directory its
    parent's replica lacks); ``zfs mount`` still mounts it. Set once, by the first
    record: an admin's ``canmount`` later stays."""
    fs = pair.destination.fs
    props = [(zfs.PROP_LASTSNAP, snap)]
    if first:
        props += [(zfs.PROP_SOURCE, str(pair.source)), ("readonly", "on")]
    if first and noauto:
        props.append(("canmount", "noauto"))
    # One property per zfs set (zfs-fuse takes no more), all at once.
    wait_all([Background(functools.partial(dst.run, zfs.set_prop(fs, *p))) for p in props])
    if first:
        # The fingerprint last: it claims the destination for the pair, so a run killed
        # before it leaves one the next update adopts (see divergence.adopt), never a
        # pair that is recorded without its snapshot.
        dst.run(zfs.set_prop(fs, zfs.PROP_FINGERPRINT, pair.fingerprint))


# -- holds and bookmarks -------------------------------------------------------------


def hold(pair: Pair, host: Host, snap: str) -> None:
    """Keep ``snap``, one of zettabee's, from being destroyed by anyone until zettabee
    releases it; the tag is the one its name gives (:func:`zettabee.pair.tag_of`). A
    snapshot of another name (a partial receive that zettabee did not start, resumed)
    is not held: zettabee would never release it."""
    tag = tag_of(snap)
    if tag is None:
        log.warning("%s: %s:%s is not named by zettabee: not held", pair.name, host.name, snap)
        return
    result = host.run(zfs.hold(tag, snap), check=False)
    if result.ok or zfs.tag_exists(result.stderr):
        log.debug("%s: hold %s on %s:%s", pair.name, tag, host.name, snap)
        return
    raise result.error("zfs hold")


def release(pair: Pair, host: Host, snap: str) -> bool:
    """Release the hold zettabee placed on ``snap`` (under the tag its name gives);
    False when it carried none, or is not zettabee's."""
    tag = tag_of(snap)
    if tag is None:
        return False
    result = host.run(zfs.release(tag, snap), check=False)
    if result.ok:
        return True
    if zfs.tag_missing(result.stderr) or zfs.missing_dataset(result.stderr):
        return False
    raise result.error("zfs release")


def move_holds(pair: Pair, host: Host, snaps: list[zfs.Snapshot], owns: Owns, keep: str) -> None:
    """Release the pair's holds on its snapshots (those ``owns`` names) except ``keep``.
    Only snapshots that carry holds are asked: one command each, normally just the
    previous base. (A base taken by hand carries no hold of zettabee's; another
    replica's snapshot on the source, even as the base, is that replica's to release.)"""
    for snap in held(snaps, owns):
        if snap.name != keep:
            let_go(pair, host, snap.full)


def let_go(pair: Pair, host: Host, snap: str) -> None:
    """Release the pair's hold on ``snap`` and say so, if it carried one."""
    if release(pair, host, snap):
        log.info("%s: released hold on %s:%s", pair.name, host.name, snap)


def held(snaps: list[zfs.Snapshot], owns: Owns) -> list[zfs.Snapshot]:
    """Snapshots that may carry the pair's hold: its own (``owns``), when held at all
    (other tags on other snapshots are none of zettabee's business)."""
    return [s for s in snaps if s.userrefs > 0 and owns(s.name)]


def bookmark(pair: Pair, replica: Replica, src: Host, snap: str, marks: list[zfs.Bookmark]) -> None:
    """Bookmark ``snap`` (the new base) and drop the pair's older bookmarks: should
    another tool prune the snapshot, the next update still sends from the bookmark."""
    fs = pair.source.fs
    result = src.run(zfs.bookmark(f"{fs}@{snap}", f"{fs}#{snap}"), check=False)
    if not result.ok and "exists" not in result.stderr:
        raise result.error("zfs bookmark")
    for mark in old_bookmarks(replica, marks, snap):
        destroy(src, mark.full)
        log.info("%s: destroyed bookmark %s:%s", pair.name, src.name, mark.full)


def old_bookmarks(replica: Replica, marks: list[zfs.Bookmark], keep: str) -> list[zfs.Bookmark]:
    return [m for m in marks if replica.on_source(m.name) and m.name != keep]


# -- which snapshots go, and their destruction ---------------------------------------


def plan_prune(
    replica: Replica, source: list[str], dest: list[str], common: str, keep: int
) -> tuple[list[str], list[str]]:
    """Which of the pair's own snapshots can go (names oldest first on both sides).

    The newest common snapshot is never chosen: it is the base of the next update. On the
    source every older snapshot of this replica goes (and of the pair from before the
    replica id), never another replica's; on the destination the newest ``keep`` stay.
    Without a common snapshot nothing is chosen at all.
    """
    if not common:
        return [], []
    src_own = [n for n in source if replica.on_source(n)]
    cut = source.index(common) if common in source else -1
    src_doomed = [n for n in src_own if n != common and source.index(n) < cut]
    dst_own = [n for n in dest if replica.on_destination(n)]
    kept = set(dst_own[-max(1, keep) :]) | {common}
    dst_doomed = [n for n in dst_own if n not in kept and dest.index(n) < dest.index(common)]
    return src_doomed, dst_doomed


def prune(
    pair: Pair,
    replica: Replica,
    src: Host,
    dst: Host,
    listing: tuple[list[str], list[str], str],
    dry_run: bool,
) -> list[str]:
    """Destroy what :func:`plan_prune` marks (``listing``: the source's names, the
    destination's, the common one), or with ``dry_run`` only say it; HOST:FS@NAME each."""
    src_doomed, dst_doomed = plan_prune(replica, *listing, pair.options.keep)
    if dry_run:
        sides = [(src, pair.source.fs, src_doomed), (dst, pair.destination.fs, dst_doomed)]
        return [f"{host.name}:{fs}@{name}" for host, fs, doomed in sides for name in doomed]
    return destroy_planned(pair, src, dst, src_doomed, dst_doomed)


def destroy_planned(
    pair: Pair, src: Host, dst: Host, src_doomed: list[str], dst_doomed: list[str]
) -> list[str]:
    sides = [(src, pair.source.fs, src_doomed), (dst, pair.destination.fs, dst_doomed)]
    # Both sides at once: each is a command that mostly waits, on the network or on ZFS.
    runs = [Background(functools.partial(destroy_and_say, pair, *side)) for side in sides]
    return [name for gone in wait_all(runs) for name in gone]


def destroy_and_say(pair: Pair, host: Host, fs: str, names: list[str]) -> list[str]:
    """Destroy the snapshots ``fs@name`` and say so; a snapshot that a hold under
    another tag keeps stays, said too. The snapshots destroyed, as HOST:FS@NAME."""
    kept = destroy_all(host, fs, names)
    gone = []
    for name in names:
        if name in kept:
            log.info(
                "%s: kept %s:%s@%s: a hold under another tag keeps it; it goes with the "
                "first run after that hold is released",
                pair.name, host.name, fs, name,
            )  # fmt: skip
        else:
            gone.append(f"{host.name}:{fs}@{name}")
            log.info("%s: destroyed %s", pair.name, gone[-1])
    return gone


def destroy(host: Host, target: str, recursive: bool = False, attempts: int = 10) -> None:
    """``zfs destroy``, tried again while ZFS says the dataset is busy: a mount change or a
    process passing through it holds it for a moment (seen often on zfs-fuse). A snapshot
    that is busy because a hold keeps it (another tag's: zettabee releases its own first)
    is not tried again: :class:`HeldElsewhere`."""
    for attempt in range(attempts):
        result = host.run(zfs.destroy(target, recursive), check=False)
        if result.ok:
            return
        busy = "busy" in result.stderr
        if busy and not recursive and "@" in target and _hold_count(host, target):
            raise HeldElsewhere(
                result.argv, host.name, result.returncode, result.stderr, "zfs destroy"
            )
        if not busy or attempt == attempts - 1:
            raise result.error("zfs destroy")
        time.sleep(0.3 * (attempt + 1))


class HeldElsewhere(CommandError):
    """A snapshot zettabee meant to destroy that a hold under another tag keeps."""


def _hold_count(host: Host, snap: str) -> int:
    """The holds on ``snap`` (0 where the host has no holds or cannot tell)."""
    result = host.run(zfs.get([snap], [zfs.PROP_USERREFS]), check=False)
    try:
        props = zfs.parse_get(result.stdout).get(snap, {}) if result.ok else {}
    except ValueError:
        return 0
    value = props.get(zfs.PROP_USERREFS, "")
    return int(value) if value.isdigit() else 0


def destroy_all(host: Host, fs: str, names: list[str]) -> list[str]:
    """Destroy the snapshots ``fs@name``; the names that another tag's hold kept."""
    kept = []
    for name in names:
        try:
            destroy(host, f"{fs}@{name}")
        except HeldElsewhere:
            kept.append(name)
    return kept
