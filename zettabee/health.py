"""How every pair stands, read from ZFS on this host and the local state: never SSH.

``status``, the check plugins and ``replicate``'s passive results all read this, so they
agree. One ``zfs get`` answers for every pair at once (two when some pairs need a closer
look, see :func:`read_health`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zettabee import zfs
from zettabee.host import Host, LocalHost
from zettabee.pair import Pair, is_own_snapshot
from zettabee.state import FAILED, IDLE, INTERRUPTED, RUNNING, StateStore, Status

SYNCHRONIZED, UNINITIALIZED, INCONSISTENT, UNREADABLE = (
    "Synchronized",
    "Uninitialized",
    "Inconsistent!",
    "Unreadable",
)


@dataclass
class Health:
    pair: Pair
    state: str
    reason: str = ""
    lastsnap: str = ""
    lag: int | None = None
    status: Status | None = None
    run_state: str = "idle"
    runtime: int | None = None
    lock_pid: int | None = None

    @property
    def running(self) -> bool:
        return self.run_state == RUNNING

    @property
    def last_error(self) -> str:
        return self.status.error if self.status and self.run_state in (FAILED, INTERRUPTED) else ""


def read_health(
    pairs: Sequence[Pair], store: StateStore, host: Host | None = None, now: float | None = None
) -> list[Health]:
    """The health of ``pairs``, in their order, from one ``zfs get`` on this host.

    ZFS answers in time proportional to the objects it opens (zfs-fuse: about 0.5 ms
    each), so the call asks for one object per pair: the snapshot its last run recorded
    (the status file names it), whose answer carries its ``creation`` and, inherited,
    its file system's zettabee properties. Pairs without such a hint, whose hint ZFS
    contradicts, or whose last run failed or was interrupted (where the newest snapshot
    may not be the recorded one) are then read whole, file system and snapshots, in a
    second call for them all.
    """
    host = host or LocalHost()
    now = time.time() if now is None else now
    statuses = {p.fingerprint: store.read_status(p.fingerprint) for p in pairs}
    holders = {p.fingerprint: store.lock_holder(p.fingerprint) for p in pairs}
    view = _View()
    hinted = {
        p.fingerprint: _hint(p, statuses[p.fingerprint], holders[p.fingerprint]) for p in pairs
    }
    first = sorted({hint for hint in hinted.values() if hint})
    if first:
        view.read(host, first, depth=None)
    whole = sorted({p.destination.fs for p in pairs if not view.answers(p, hinted[p.fingerprint])})
    if whole and not view.error:
        view.read(host, whole, depth=1)
    return [_one(p, view, statuses[p.fingerprint], holders[p.fingerprint], now) for p in pairs]


def _hint(pair: Pair, status: Status, holder: dict[str, Any] | None) -> str:
    """``fs@snapshot`` of the pair's last recorded run, when its outcome can be trusted."""
    clean = status.result == "ok" and status.state == IDLE and not status.corrupt
    if not clean or holder is not None or not status.snapshot:
        return ""
    return f"{pair.destination.fs}@{status.snapshot}"


class _View:
    """What ZFS said, by file system: its properties and its snapshots'."""

    PROPS = ("creation", zfs.PROP_FINGERPRINT, zfs.PROP_LASTSNAP)

    def __init__(self) -> None:
        self.props: dict[str, dict[str, str]] = {}
        self.snaps: dict[str, dict[str, dict[str, str]]] = {}
        self.error = ""

    def read(self, host: Host, targets: list[str], depth: int | None) -> None:
        result = host.run(zfs.get(targets, self.PROPS, depth=depth), check=False)
        try:
            table = zfs.parse_get(result.stdout)
        except ValueError as exc:
            self.error = str(exc)
            return
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        # Missing datasets are uninitialized pairs or stale hints, not an unreadable ZFS.
        if result.returncode != 0 and not all(zfs.missing_dataset(line) for line in errors):
            self.error = result.stderr.strip() or f"zfs get exited {result.returncode}"
            return
        for name, props in table.items():
            fs, at, snap = name.partition("@")
            if at:
                self.snaps.setdefault(fs, {})[snap] = props
                if depth is None:  # a snapshot asked by name: its inherited user properties
                    self.props.setdefault(fs, props)
            else:
                self.props[fs] = props

    def answers(self, pair: Pair, hint: str) -> bool:
        """Did the first call tell all about ``pair``: its hint exists and is the last?"""
        if not hint:
            return False
        fs, _, snap = hint.partition("@")
        props = self.props.get(fs)
        return (
            snap in self.snaps.get(fs, {})
            and props is not None
            and zfs.user_prop(props.get(zfs.PROP_LASTSNAP)) == snap
        )


def _one(
    pair: Pair,
    view: _View,
    status: Status,
    holder: dict[str, Any] | None,
    now: float,
) -> Health:
    fp = pair.fingerprint
    fs = pair.destination.fs
    run_state = status.effective_state(lock_held=holder is not None)
    if holder is not None:
        run_state = RUNNING
    health = Health(pair, UNINITIALIZED, status=status, run_state=run_state)
    if holder is not None:
        health.lock_pid = holder.get("pid")
        started = holder.get("started") or status.started
        health.runtime = int(now - started) if started else None
    elif status.last_duration is not None:
        health.runtime = int(status.last_duration)
    if status.corrupt:
        health.reason = status.corrupt
    if view.error:
        health.state, health.reason = UNREADABLE, f"cannot read ZFS: {view.error}"
        return health
    props = view.props.get(fs)
    if props is None:
        health.reason = health.reason or f"{fs} does not exist: run `zettabee initialize`"
        return health
    owner = zfs.user_prop(props.get(zfs.PROP_FINGERPRINT))
    lastsnap = zfs.user_prop(props.get(zfs.PROP_LASTSNAP)) or ""
    health.lastsnap = lastsnap
    if owner is None and not lastsnap:
        health.reason = f"{fs} exists but zettabee has not completed an initialize"
        return health
    if owner != pair.fingerprint:
        health.state = INCONSISTENT
        health.reason = f"{fs} carries fingerprint {owner}, not this pair's {fp}"
        return health
    snaps = view.snaps.get(fs, {})
    if lastsnap not in snaps:
        health.state = INCONSISTENT
        health.reason = f"the recorded snapshot {fs}@{lastsnap} is missing on the destination"
        return health
    own = sorted(
        (n for n in snaps if is_own_snapshot(n, fp)), key=lambda n: int(snaps[n]["creation"])
    )
    if own and own[-1] != lastsnap and not health.running:
        health.state = INCONSISTENT
        health.reason = (
            f"the newest zettabee snapshot {own[-1]} is not the recorded one {lastsnap}; "
            "the next update reconciles it"
        )
    else:
        health.state = SYNCHRONIZED
    health.lag = int(now) - int(snaps[lastsnap]["creation"])
    return health
