"""How every pair stands, read from ZFS on the destination and the local state.

``status``, the check plugins and ``replicate``'s passive results all read this, so they
agree. One ``zfs get`` answers for every pair of a destination host at once: here for
destinations on this machine, and, when the caller allows SSH (``zettabee status``), over
the control connection for each remote destination host. The check plugins never open
SSH: for them a remote destination is judged from what the last run recorded.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from zettabee import zfs
from zettabee.capabilities import Capabilities
from zettabee.config import format_bytes
from zettabee.errors import ZettabeeError
from zettabee.host import Host, LocalHost, is_local_host
from zettabee.pair import Pair, is_own_snapshot, parse_snapshot_name
from zettabee.state import FAILED, INTERRUPTED, RUNNING, StateStore, Status

DestinationHosts = Callable[[Pair], Host]

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
    def features(self) -> dict[str, Any] | None:
        entry = self.status.extra.get("features") if self.status else None
        return entry if isinstance(entry, dict) else None

    def feature_lines(self) -> list[str]:
        """What each side offers and what the pair uses, as the last run probed them."""
        entry = self.features
        if entry is None:
            return [
                "features: not probed yet (`zettabee setup` shows them; every run records them)"
            ]
        lines = []
        for side in ("source", "destination"):
            data = entry.get(side)
            caps = Capabilities.from_dict(data) if isinstance(data, dict) else None
            if caps is not None:
                lines.append(f"{side} {caps.host}: {caps.describe()}")
        uses = entry.get("uses") or []
        lines.append(
            f"uses: {', '.join(uses) if uses else 'none of the extras (plain send and receive)'}"
        )
        lines.extend(f"problem: {problem}" for problem in entry.get("problems") or [])
        return lines


def read_health(
    pairs: Sequence[Pair],
    store: StateStore,
    host: Host | None = None,
    now: float | None = None,
    hosts: DestinationHosts | None = None,
) -> list[Health]:
    """The health of ``pairs``, in their order, from one ``zfs get`` per destination host.

    ``host`` answers for every destination when given (a test's fake); ``hosts`` gives
    each pair's destination host, remote ones included (SSH allowed). Without either, a
    destination on this machine is read here and a remote one from the status file."""
    now = time.time() if now is None else now
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
        if where is None:
            found = [_recorded(p, store, now) for p in group]
        else:
            table, zfs_error = _read_destinations(where, group)
            found = [_one(p, table, zfs_error, store, now) for p in group]
        healths.update(zip(indexes, found, strict=True))
    return [healths[i] for i in range(len(pairs))]


_LOCAL = LocalHost()


@functools.lru_cache(maxsize=64)
def _is_local(name: str) -> bool:
    return is_local_host(name)


def _read_destinations(host: Host, pairs: Sequence[Pair]) -> tuple[dict[str, dict[str, str]], str]:
    """The zettabee properties and snapshots of every destination on one host."""
    table: dict[str, dict[str, str]] = {}
    props = ["creation", zfs.PROP_FINGERPRINT, zfs.PROP_LASTSNAP]
    targets = sorted({p.destination.fs for p in pairs})
    try:
        result = host.run(zfs.get(targets, props, depth=1), check=False)
    except ZettabeeError as exc:
        return table, f"on {host.name}: {exc}"
    try:
        table = zfs.parse_get(result.stdout)
    except ValueError as exc:
        return table, str(exc)
    if result.returncode != 0 and not table:
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        # Missing destinations are uninitialized pairs, not an unreadable ZFS.
        if not errors or not all(zfs.missing_dataset(line) for line in errors):
            return table, result.stderr.strip() or f"zfs get exited {result.returncode}"
    return table, ""


def _base(pair: Pair, store: StateStore, now: float) -> Health:
    """What the local state says: the run state, the lock holder, the run time."""
    fp = pair.fingerprint
    status = store.read_status(fp)
    holder = store.lock_holder(fp)
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


def _recorded(pair: Pair, store: StateStore, now: float) -> Health:
    """A remote destination, judged without SSH: the snapshot the last successful run
    received, its age from the UTC time in its name."""
    health = _base(pair, store, now)
    status = health.status
    parsed = parse_snapshot_name(status.snapshot) if status and status.last_success else None
    if parsed is None or parsed[0] != pair.fingerprint:
        health.reason = health.reason or (
            f"no successful run recorded for {pair.destination} (a remote destination is "
            "not read by the check plugins): run `zettabee initialize` or `zettabee status`"
        )
        return health
    health.state = SYNCHRONIZED
    health.lastsnap = status.snapshot if status else ""
    health.lag = int(now - parsed[1].timestamp())
    return health


def _one(
    pair: Pair, table: dict[str, dict[str, str]], zfs_error: str, store: StateStore, now: float
) -> Health:
    fp = pair.fingerprint
    fs = pair.destination.fs
    health = _base(pair, store, now)
    if zfs_error:
        health.state, health.reason = UNREADABLE, f"cannot read ZFS: {zfs_error}"
        return health
    props = table.get(fs)
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
    snaps = {n.split("@", 1)[1]: p for n, p in table.items() if n.startswith(f"{fs}@")}
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
