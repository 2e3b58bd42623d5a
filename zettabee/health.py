"""How every pair stands, read from ZFS on the destination and the local state.

``status``, the check plugins and ``replicate``'s passive results all read this, so they
agree. One ``zfs get`` answers for every pair of a destination host at once (two when some
pairs need a closer look, see :func:`read_health`): here for destinations on this machine,
and, when the caller allows SSH (``zettabee status``), over the control connection for
each remote destination host. The check plugins never open SSH: for them a remote
destination is judged from what the last run recorded.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

from zettabee import zfs
from zettabee.errors import ZettabeeError
from zettabee.host import Host, LocalHost, is_local_host
from zettabee.pair import Pair, is_pair_snapshot, parse_snapshot_name, replica_id
from zettabee.records import Record
from zettabee.state import FAILED, IDLE, INTERRUPTED, RUNNING, StateStore, Status
from zettabee.units import format_bytes

TYPE_CHECKING = False  # typing for the annotations only: importing it costs every check
if TYPE_CHECKING:
    from typing import Any

DestinationHosts = Callable[[Pair], Host]

SYNCHRONIZED, UNINITIALIZED, INCONSISTENT, UNREADABLE = (
    "Synchronized",
    "Uninitialized",
    "Inconsistent!",
    "Unreadable",
)


class Health(Record):
    pair: Pair
    state: str
    reason: str = ""
    lastsnap: str = ""
    lag: int | None = None
    status: Status | None = None
    run_state: str = "idle"
    runtime: int | None = None
    lock_pid: int | None = None
    unwritable: str = ""  # why no run can record its status now (StateStore.unwritable)

    @property
    def running(self) -> bool:
        return self.run_state == RUNNING

    @property
    def last_error(self) -> str:
        return self.status.error if self.status and self.run_state in (FAILED, INTERRUPTED) else ""

    @property
    def resume(self) -> dict[str, Any] | None:
        """The resumable receive the last run left (or the running one works on)."""
        entry = self.status.extra.get("resume") if self.status else None
        return entry if isinstance(entry, dict) and entry.get("snapshot") else None

    @property
    def resume_note(self) -> str:
        """One sentence about a partial receive kept on the destination, for people."""
        entry = self.resume
        if entry is None or self.running:
            return ""
        since = entry.get("since")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(since)) if since else "?"
        runs = int(entry.get("runs", 1))
        kept = int(entry.get("kept", 0))
        size = f"about {format_bytes(kept)}" if kept else "a part"
        tried = f", {runs} runs so far" if runs > 1 else ""
        return (
            f"partial receive of {entry['snapshot']} kept since {when} ({size} received"
            f"{tried}); the next update resumes it"
        )

    @property
    def replica(self) -> str:
        """The replica id of the pair on this server (:func:`zettabee.pair.replica_id`):
        of the destination pool's guid the last run probed, else of the last snapshot's
        name; empty before any run."""
        dst = (self.features or {}).get("destination")
        guid = dst.get("pool_guid") if isinstance(dst, dict) else None
        if isinstance(guid, str) and guid:
            return replica_id(guid)
        named = parse_snapshot_name(self.lastsnap) if self.lastsnap else None
        return named.rid or "" if named else ""

    @property
    def features(self) -> dict[str, Any] | None:
        entry = self.status.extra.get("features") if self.status else None
        return entry if isinstance(entry, dict) else None


def read_health(
    pairs: Sequence[Pair],
    store: StateStore,
    host: Host | None = None,
    now: float | None = None,
    hosts: DestinationHosts | None = None,
) -> list[Health]:
    """The health of ``pairs``, in their order, from one ``zfs get`` per destination host
    (two when some pairs need a closer look).

    ``host`` answers for every destination when given (a test's fake); ``hosts`` gives
    each pair's destination host, remote ones included (SSH allowed). Without either, a
    destination on this machine is read here and a remote one from the status file.

    ZFS answers in time proportional to the objects it opens (zfs-fuse: about 0.5 ms
    each), so the call asks for one object per pair: the snapshot its last run recorded
    (the status file names it), whose answer carries, inherited, its file system's
    zettabee properties. Pairs without such a hint, whose hint ZFS
    contradicts, or whose last run failed or was interrupted (where the newest snapshot
    may not be the recorded one) are then read whole, file system and snapshots, in a
    second call for them all.
    """
    now = time.time() if now is None else now
    statuses = {p.fingerprint: store.read_status(p.fingerprint) for p in pairs}
    holders = {p.fingerprint: store.lock_holder(p.fingerprint) for p in pairs}
    groups: dict[int, tuple[Host | None, list[int]]] = {}
    for index, pair in enumerate(pairs):
        if host is not None:
            where: Host | None = host
        elif hosts is not None:
            where = hosts(pair)
        elif _is_local(pair.destination.host):
            where = _LOCAL
        else:
            where = None
        groups.setdefault(id(where), (where, []))[1].append(index)
    healths: dict[int, Health] = {}
    for where, indexes in groups.values():
        group = [pairs[i] for i in indexes]
        state = [(statuses[p.fingerprint], holders[p.fingerprint]) for p in group]
        if where is None:
            found = [_recorded(p, *st, now) for p, st in zip(group, state, strict=True)]
        else:
            view = _read_destinations(where, group, state)
            found = [_one(p, view, *st, now) for p, st in zip(group, state, strict=True)]
        healths.update(zip(indexes, found, strict=True))
    unwritable = store.unwritable() if pairs else ""
    for health in healths.values():
        health.unwritable = unwritable
    return [healths[i] for i in range(len(pairs))]


_LOCAL = LocalHost()


@functools.lru_cache(maxsize=64)
def _is_local(name: str) -> bool:
    return is_local_host(name)


def _read_destinations(
    host: Host, pairs: Sequence[Pair], state: Sequence[tuple[Status, dict[str, Any] | None]]
) -> _View:
    """The zettabee properties and snapshots of every destination on one host: the
    recorded snapshots first, then whole the file systems they do not answer for."""
    view = _View()
    hinted = [_hint(p, *st) for p, st in zip(pairs, state, strict=True)]
    first = sorted({hint for hint in hinted if hint})
    if first:
        view.read(host, first, depth=None)
    whole = sorted(
        {
            p.destination.fs
            for p, hint in zip(pairs, hinted, strict=True)
            if not view.answers(p, hint)
        }
    )
    if whole and not view.error:
        view.read(host, whole, depth=1)
    return view


def _hint(pair: Pair, status: Status, holder: dict[str, Any] | None) -> str:
    """``fs@snapshot`` of the pair's last recorded run, when its outcome can be trusted."""
    clean = status.result == "ok" and status.state == IDLE and not status.corrupt
    if not clean or holder is not None or not status.snapshot:
        return ""
    return f"{pair.destination.fs}@{status.snapshot}"


class _View:
    """What ZFS said, by file system: its properties and its snapshots'."""

    # createtxg orders snapshots whatever the source's clock did between them
    PROPS = ("createtxg", zfs.PROP_FINGERPRINT, zfs.PROP_LASTSNAP)

    def __init__(self) -> None:
        self.props: dict[str, dict[str, str]] = {}
        self.snaps: dict[str, dict[str, dict[str, str]]] = {}
        self.error = ""

    def read(self, host: Host, targets: list[str], depth: int | None) -> None:
        try:
            result = host.run(zfs.get(targets, self.PROPS, depth=depth, own=True), check=False)
        except ZettabeeError as exc:  # a remote destination host out of reach
            self.error = f"on {host.name}: {exc}"
            return
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


def _base(pair: Pair, status: Status, holder: dict[str, Any] | None, now: float) -> Health:
    """What the local state says: the run state, the lock holder, the run time."""
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
    return health


def _recorded(pair: Pair, status: Status, holder: dict[str, Any] | None, now: float) -> Health:
    """A remote destination, judged without SSH: the snapshot the last successful run
    received, its age from the UTC time in its name."""
    health = _base(pair, status, holder, now)
    parsed = parse_snapshot_name(status.snapshot) if status.last_success else None
    if parsed is None or parsed[0] != pair.fingerprint:
        health.reason = health.reason or (
            f"no successful run recorded for {pair.destination} (a remote destination is "
            "not read by the check plugins): run `zettabee initialize` or `zettabee status`"
        )
        return health
    health.state = SYNCHRONIZED
    health.lastsnap = status.snapshot
    health.lag = _lag(status.snapshot, now)
    return health


def _one(
    pair: Pair,
    view: _View,
    status: Status,
    holder: dict[str, Any] | None,
    now: float,
) -> Health:
    fs = pair.destination.fs
    fp = pair.fingerprint
    health = _base(pair, status, holder, now)
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
        (n for n in snaps if is_pair_snapshot(n, fp)), key=lambda n: int(snaps[n]["createtxg"])
    )
    if own and own[-1] != lastsnap and not health.running:
        health.state = INCONSISTENT
        health.reason = (
            f"the newest zettabee snapshot {own[-1]} is not the recorded one {lastsnap}; "
            "the next update reconciles it"
        )
    else:
        health.state = SYNCHRONIZED
    health.lag = _lag(lastsnap, now)
    return health


def _lag(snapshot: str, now: float) -> int | None:
    """Seconds since ``snapshot`` was taken, by the clock that named it: this host's.

    Not by its ``creation``, which the source stamps with its own clock: a source a second
    ahead would make the lag negative right after every run."""
    parsed = parse_snapshot_name(snapshot)
    return None if parsed is None else int(now - parsed[1].timestamp())
