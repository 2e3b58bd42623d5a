"""One pair's run: its lock, its status (RUNNING, then IDLE or FAILED), its progress
file, its hosts connected and probed, and the pair named on its errors, all opened by
:func:`pair_run`, which yields the run's facts as one :class:`PairRun`.

A run belongs to one thread. What a fleet run shares between its threads is
:class:`Engine`: the state store, the hosts registry and the destinations listed ahead
(each with its own lock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from zettabee import transport, zfs
from zettabee.capabilities import PairFeatures
from zettabee.errors import StateError, ZettabeeError
from zettabee.host import Host
from zettabee.hosts import Hosts
from zettabee.pair import Pair, Replica, replica_id
from zettabee.relay import ProgressFn, StreamResult
from zettabee.state import FAILED, IDLE, RUNNING, StateStore, Status, StatusUnwritable
from zettabee.views import DestView, Prefetch, dest_view

log = logging.getLogger(__name__)

# In a pair's status: its last update left the source as planned (see
# update.in_one_round_trip), so the next one need not list it.
TIDY = "tidy"


@dataclass
class RunReport:
    pair: Pair
    action: str
    snapshot: str = ""
    base: str = ""
    bytes: int = 0
    seconds: float = 0.0
    destroyed: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    resumed: str = ""

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class Stopwatch:
    """Seconds spent in each part of a run, for ``--debug``: ``with clock("listing"):``
    adds to that part (a part met twice, as the listing of a fallback, adds up)."""

    def __init__(self, parts: dict[str, float]) -> None:
        self.parts = parts

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.add({part: time.monotonic() - started})

    def add(self, parts: dict[str, float]) -> None:
        for part, seconds in parts.items():
            self.parts[part] = self.parts.get(part, 0.0) + seconds

    def __str__(self) -> str:
        return " ".join(f"{part}={seconds:.3f}s" for part, seconds in self.parts.items())


# The stream of a run: (run, send argv, receive argv, expected size, commands first).
Streamer = Callable[
    ["PairRun", list[str], list[str], "int | None", "Sequence[Sequence[str]]"], StreamResult
]


def replica_of(pair: Pair, feats: PairFeatures) -> Replica:
    """The pair as its destination's pool receives it (see :mod:`zettabee.pair`); a
    pool whose guid is unknown is refused, as zettabee could not tell its snapshots
    and holds from those of another backup server under the same pair line."""
    dst = feats.destination
    if not dst.pool_guid:
        said = dst.note or f"`zpool get all {dst.pool}` printed no guid"
        raise StateError(
            f"{pair.name}: cannot read the guid of the destination pool {dst.pool} on "
            f"{dst.host} ({said}); zettabee names the pair's snapshots and holds after it. "
            f"Check that the pool is imported there (`zpool list {dst.pool}`)"
        )
    return Replica(pair.fingerprint, replica_id(dst.pool_guid))


def pair_stream(
    run: PairRun,
    send: list[str],
    recv: list[str],
    total: int | None = None,
    first: Sequence[Sequence[str]] = (),
) -> StreamResult:
    """The stream on the pair's transport, its progress in the pair's progress file."""
    return transport.stream(run.pair, run.src, run.dst, send, recv, run.progress(total), first)


@dataclass
class Engine:
    """What every run of this process shares: the state, the hosts, the destinations
    listed ahead, and how a stream is carried (a test's stand-in, or the transports)."""

    store: StateStore
    hosts: Hosts
    prefetch: Prefetch
    streamer: Streamer = pair_stream


@dataclass(frozen=True)
class PairRun:
    """The facts of one run of one pair: fixed when it opens, handed to every step.

    ``status`` and ``report`` are the run's own (no other thread sees them); ``view`` is
    the destination as the run found it (None: it does not exist, or it was not listed);
    ``tidy_before``: the run before left the source as planned (updates only)."""

    pair: Pair
    src: Host
    dst: Host
    feats: PairFeatures
    status: Status
    report: RunReport
    clock: Stopwatch
    engine: Engine
    view: DestView | None = None
    tidy_before: bool = False

    @property
    def name(self) -> str:
        return self.pair.name

    @property
    def replica(self) -> Replica:
        """Whose the pair's snapshots and holds are: this destination's."""
        return replica_of(self.pair, self.feats)

    def write_status(self) -> None:
        self.engine.store.write_status(self.status)

    def send_argv(self, target: str, base: str | None = None, estimate: bool = False) -> list[str]:
        """The pair's ``zfs send`` of ``target`` (from ``base``), as its options say."""
        opts = self.pair.options
        return zfs.send(
            target, base, opts.intermediate, raw=opts.raw, props=self.feats.props,
            estimate=estimate,
        )  # fmt: skip

    def receive_argv(self, volume: bool, force: bool = False, resumable: bool = False) -> list[str]:
        """The pair's ``zfs receive`` into its destination (``volume``: the stream is
        a volume's); a child received unmounted where the destination can."""
        fs, feats = self.pair.destination.fs, self.feats
        return zfs.recv(
            fs, force, resumable, exclude=feats.kept_local(volume), unmounted=feats.unmounted
        )

    def progress(self, total: int | None = None) -> ProgressFn:
        return progress_writer(self.engine.store, self.pair, total)

    def stream(
        self,
        send: list[str],
        recv: list[str],
        total: int | None = None,
        first: Sequence[Sequence[str]] = (),
    ) -> StreamResult:
        """``send`` on the source into ``recv`` on the destination; ``first`` (mbuffer
        only) runs on the source in the sending command, before the send."""
        return self.engine.streamer(self, send, recv, total, first)


def progress_writer(store: StateStore, pair: Pair, total: int | None = None) -> ProgressFn:
    """Writes a stream's count, rate (and ``total``) to the pair's progress file."""
    fp = pair.fingerprint

    def report(count: int, elapsed: float) -> None:
        rate = count / elapsed if elapsed > 0 else 0.0
        data: dict[str, object] = {"bytes": count, "elapsed": elapsed, "rate": rate}
        data["updated"] = time.time()
        if total:
            data["total"] = total
        store.write_progress(fp, data)

    return report


@contextmanager
def pair_run(engine: Engine, pair: Pair, action: str, listing: bool = True) -> Iterator[PairRun]:
    """Open a run of ``pair``: its lock, its status RUNNING, its hosts connected and
    probed and (``listing``) its destination listed; at the end its status IDLE, or
    FAILED with the error, which names the pair (once)."""
    report = RunReport(pair, action)
    with engine.store.lock(pair.fingerprint, pair.name, action):
        try:
            status, settled_at, tidy = _running(engine.store, pair, action)
        except StatusUnwritable as exc:  # nothing started, and nothing to record it in
            raise StatusUnwritable(f"{pair.name}: {exc}") from exc
        try:
            yield _open(engine, pair, status, report, (settled_at, tidy), listing)
        except BaseException as exc:
            _failed(engine, pair, status, exc)
            raise
        try:
            _succeeded(engine.store, status)
        except StatusUnwritable as exc:
            raise StatusUnwritable(f"{pair.name}: {exc}") from exc


def _running(store: StateStore, pair: Pair, action: str) -> tuple[Status, float | None, bool]:
    """Mark the pair's status RUNNING (under its lock). When its last run ended, if it
    ended, and whether that run left the source tidy (only an update asks, only now)."""
    status = store.read_status(pair.fingerprint)
    previous = status.state
    status.pair = str(pair)
    status.state, status.action, status.pid = RUNNING, action, os.getpid()
    settled = previous in (IDLE, FAILED) and not status.corrupt
    settled_at = status.ended if settled else None
    status.started, status.ended, status.error, status.corrupt = time.time(), None, "", ""
    status.extra["previous_state"] = previous
    tidy = status.extra.pop(TIDY, False) is True and previous == IDLE
    store.write_status(status)
    return status, settled_at, tidy and action == "update"


def _failed(engine: Engine, pair: Pair, status: Status, exc: BaseException) -> None:
    if isinstance(exc, ZettabeeError) and not str(exc).startswith(pair.name):
        exc.args = (f"{pair.name}: {exc}",)  # every message names its pair
    engine.hosts.forget_probes(pair)
    status.state, status.result = FAILED, "failed"
    status.error = str(exc) if isinstance(exc, ZettabeeError) else repr(exc)
    status.ended, status.pid = time.time(), None
    try:
        engine.store.write_status(status)
    except StatusUnwritable as unwritable:  # the run's own error goes on; this one is said
        if not isinstance(exc, StatusUnwritable):
            log.error("%s: %s", pair.name, unwritable)
    with contextlib.suppress(OSError):  # a read-only state directory: nothing to clear
        engine.store.clear_progress(pair.fingerprint)


def _succeeded(store: StateStore, status: Status) -> None:
    status.state, status.result, status.pid = IDLE, "ok", None
    status.ended = time.time()
    status.last_success = status.ended
    status.last_duration = status.ended - (status.started or status.ended)
    status.extra.pop("previous_state", None)
    store.write_status(status)
    store.clear_progress(status.fingerprint)


def _open(
    engine: Engine,
    pair: Pair,
    status: Status,
    report: RunReport,
    before: tuple[float | None, bool],
    listing: bool,
) -> PairRun:
    """Both hosts of the pair connected and probed, and (``listing``) the destination's
    view. A local destination is probed and listed while the source's handshake runs."""
    hosts, clock = engine.hosts, Stopwatch(report.timings)
    settled_at, tidy = before
    src, dst = hosts.get(pair.source, pair), hosts.get(pair.destination, pair)
    view = None
    if listing:
        src.start()  # the handshakes overlap the local work
        dst.start()
        if dst.is_local:
            with clock("listing"):
                here = hosts.prober.of(dst, pair.destination.pool)
                view = engine.prefetch.take(pair, settled_at) or dest_view(pair, dst, here)
        with clock("connection"):
            src.connect()
            dst.connect()
    with clock("probe"):
        feats = features(hosts, pair, src, dst, status)
    if listing and not dst.is_local:
        with clock("listing"):
            view = dest_view(pair, dst, feats.destination)
    return PairRun(pair, src, dst, feats, status, report, clock, engine, view, tidy)


def features(hosts: Hosts, pair: Pair, src: Host, dst: Host, status: Status) -> PairFeatures:
    """Probe both sides (once per host and run), record what the pair uses in its
    status, and refuse an option the pair demands but a side cannot honour, or a
    destination pool whose guid (the pair's replica id) the probe did not tell."""
    feats = hosts.features(pair, src, dst)
    status.extra["features"] = {**feats.as_dict(), "probed": time.time()}
    if feats.problems:
        raise StateError(f"{pair.name}: {'; '.join(feats.problems)}")
    replica_of(pair, feats)
    log.debug("%s: uses %s", pair.name, feats.describe())
    return feats
