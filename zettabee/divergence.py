"""When the two sides disagree: whose the destination is, adopting one that an
interrupted initialize received, rolling back snapshots the source does not have, no
common snapshot at all, and what a refused receive means."""

from __future__ import annotations

import logging

from zettabee import snapshots, zfs
from zettabee.errors import CommandError, StateError, TransportError, ZettabeeError
from zettabee.host import Host
from zettabee.pair import Pair, is_pair_snapshot
from zettabee.run import PairRun

log = logging.getLogger(__name__)


def check_identity(pair: Pair, props: dict[str, str], dsnaps: list[zfs.Snapshot]) -> bool:
    """Is the destination this pair's? True: it may be, by an initialize that was
    killed after its receive and before it recorded the pair (see :func:`adopt`)."""
    owner = zfs.user_prop(props.get(zfs.PROP_FINGERPRINT))
    if owner is None and any(is_pair_snapshot(s.name, pair.fingerprint) for s in dsnaps):
        return True
    if owner is None:
        raise StateError(
            f"{pair.name}: {pair.destination.fs} exists but was not made by zettabee "
            f"(no {zfs.PROP_FINGERPRINT} property); refusing to touch it"
        )
    if owner != pair.fingerprint:
        raise StateError(
            f"{pair.name}: {pair.destination.fs} belongs to another pair (fingerprint "
            f"{owner}, this pair is {pair.fingerprint}); check the pair file"
        )
    return False


def adopt(pair: Pair, dst: Host, common: zfs.Snapshot | None, noauto: bool = False) -> None:
    """Record the pair on a destination its own initialize received but never marked
    (``noauto``: as the initialize would have, see :func:`zettabee.snapshots.record`).

    Safe only when the newest snapshot both sides share is one of this pair's (its
    name carries the fingerprint, its guid is the source's): then nobody else can
    have made it. The alternative, initialize --force, would send everything again."""
    fs = pair.destination.fs
    if common is None or not is_pair_snapshot(common.name, pair.fingerprint):
        raise StateError(
            f"{pair.name}: {fs} exists but was not made by zettabee (no "
            f"{zfs.PROP_FINGERPRINT} property, and no snapshot of this pair shared with "
            "the source); refusing to touch it"
        )
    log.warning(
        "%s: adopting %s: an initialize of this pair was interrupted after receiving "
        "%s, which the source also holds; recording the pair instead of sending it again",
        pair.name, fs, common.name,
    )  # fmt: skip
    snapshots.record(pair, dst, common.name, first=True, noauto=noauto)


def roll_back_newer(
    run: PairRun, dsnaps: list[zfs.Snapshot], common: zfs.Snapshot
) -> list[zfs.Snapshot]:
    """Refuse destination snapshots newer than the common one, or with rollback=yes roll
    the destination back to it; the destination's snapshots from then on."""
    pair = run.pair
    newer = dsnaps[dsnaps.index(common) + 1 :]
    if newer and not pair.options.rollback:
        raise StateError(
            f"{pair.name}: the destination has snapshots the source does not have "
            f"after the common snapshot {common.name}: "
            f"{', '.join(s.name for s in newer)}; destroy them, or set rollback=yes on "
            "the pair to let zettabee roll the destination back"
        )
    if not newer:
        return dsnaps
    # rollback=yes allows it. Done here, not left to `receive -F`: old ZFS (zfs-fuse)
    # receives on top of a newer snapshot that holds no changes and keeps it, so the
    # replica would go on diverged.
    fs = pair.destination.fs
    log.warning(
        "%s: rollback=yes: rolling %s back to %s, destroying %s",
        pair.name, fs, common.name, ", ".join(s.name for s in newer),
    )  # fmt: skip
    if run.feats.destination.holds:  # the pair's own hold would make the rollback fail
        snapshots.move_holds(pair, run.dst, newer, run.replica.on_destination, keep="")
    run.dst.run(zfs.rollback(f"{fs}@{common.name}"))
    return dsnaps[: dsnaps.index(common) + 1]


def no_common_message(pair: Pair, ssnaps: list[zfs.Snapshot], dsnaps: list[zfs.Snapshot]) -> str:
    dnew = dsnaps[-1].name if dsnaps else "none"
    snew = ssnaps[-1].name if ssnaps else "none"
    return (
        f"{pair.name}: no common snapshot between {pair.source} (newest {snew}) and "
        f"{pair.destination} (newest {dnew}); an incremental update is impossible and "
        "zettabee will not resend over existing data: `zettabee initialize --force` "
        "starts the replica over (destroying the destination)"
    )


def explain_receive(
    pair: Pair, exc: CommandError | TransportError, base: str | None = None
) -> ZettabeeError:
    """The error of a failed stream, in the pair's terms where zfs's words say more."""
    text = str(exc)
    if "has been modified" in text:
        return StateError(
            f"{pair.name}: the destination {pair.destination.fs} was modified since the "
            f"common snapshot {base}; set rollback=yes on the pair to discard those "
            f"changes, or inspect them first (zfs diff {pair.destination.fs}@{base}). "
            f"zfs said: {text}"
        )
    if "partially-complete state" in text:
        return StateError(
            f"{pair.name}: {pair.destination.fs} holds a partial receive (zfs receive -s) "
            "that this run could not resume; the next update resumes it, or "
            f"`zfs receive -A {pair.destination.fs}` discards it. zfs said: {text}"
        )
    if isinstance(exc, TransportError):
        return TransportError(f"{pair.name}: {text}", exc.transient)
    exc.args = (f"{pair.name}: {text}",)
    return exc
