"""purge: destroy the pair's obsolete snapshots and bookmarks on both sides, never the
newest common snapshot, and release the holds that no longer protect a base."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from zettabee import snapshots, zfs
from zettabee.capabilities import PairFeatures
from zettabee.errors import StateError
from zettabee.host import Host
from zettabee.pair import Pair, tag_of
from zettabee.run import replica_of
from zettabee.views import dest_view, source_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurgeStep:
    """One thing purge does (or, dry, would do): destroy a snapshot or bookmark, or
    release the pair's hold on a snapshot."""

    action: str  # "destroy" or "release"
    target: str  # host:fs@snap or host:fs#mark
    tag: str = ""

    def describe(self, done: bool) -> str:
        if self.action == "release":
            verb = "released" if done else "would release"
            return f"{verb} hold {self.tag} on {self.target}"
        return f"{'destroyed' if done else 'would destroy'} {self.target}"


def purge(
    pair: Pair, src: Host, dst: Host, feats: PairFeatures, dry_run: bool, release: bool
) -> list[PurgeStep]:
    """What purge did (or, ``dry_run``, would do); ``release`` also lets go of the base
    itself (a pair being retired)."""
    view = dest_view(pair, dst, feats.destination)
    if view is None:
        raise StateError(f"{pair.name}: not initialized; nothing to purge")
    dsnaps = view.snapshots
    ssnaps, marks = source_view(pair, src, feats)
    common = zfs.common_snapshot(ssnaps, dsnaps)
    base = common.name if common else ""
    replica = replica_of(pair, feats)
    sides: list[tuple[Host, list[zfs.Snapshot], snapshots.Owns]] = [
        (src, ssnaps, replica.on_source),
        (dst, dsnaps, replica.on_destination),
    ]
    steps = _releases(pair, sides, base, release, dry_run)
    own = [m.name for m in marks if replica.on_source(m.name)]
    for mark in snapshots.old_bookmarks(replica, marks, own[-1] if own else ""):
        steps.append(PurgeStep("destroy", f"{src.name}:{mark.full}"))
        if not dry_run:
            snapshots.destroy(src, mark.full)
            log.info("%s: %s", pair.name, steps[-1].describe(done=True))
    listing = ([s.name for s in ssnaps], [s.name for s in dsnaps], base)
    doomed = snapshots.prune(pair, replica, src, dst, listing, dry_run=dry_run)
    return steps + [PurgeStep("destroy", name) for name in doomed]


def _releases(
    pair: Pair,
    sides: list[tuple[Host, list[zfs.Snapshot], snapshots.Owns]],
    base: str,
    release: bool,
    dry_run: bool,
) -> list[PurgeStep]:
    """Release the pair's holds on both sides but the base's (``release``: that too)."""
    keep = "" if release else base
    steps = []
    for host, snaps, owns in sides:
        for snap in snapshots.held(snaps, owns):
            if snap.name != keep:
                if dry_run or snapshots.release(pair, host, snap.full):
                    tag = tag_of(snap.name) or ""
                    steps.append(PurgeStep("release", f"{host.name}:{snap.full}", tag))
                    if not dry_run:
                        log.info("%s: %s", pair.name, steps[-1].describe(done=True))
    return steps
