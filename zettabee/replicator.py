"""initialize, update and purge of one pair, with its lock and status around each run."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from zettabee import fastpath, transport, zfs
from zettabee.errors import CommandError, StateError, TransportError, ZettabeeError
from zettabee.host import Host, Hosts, SshHost
from zettabee.pair import Pair, is_own_snapshot, snapshot_name
from zettabee.state import FAILED, IDLE, RUNNING, StateStore, Status

log = logging.getLogger(__name__)

__all__ = ["Hosts", "Replicator", "RunReport", "each_pair", "plan_prune"]


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

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def _now() -> datetime:
    return datetime.now(UTC)


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


class Replicator:
    def __init__(self, store: StateStore, hosts: Hosts) -> None:
        self.store = store
        self.hosts = hosts

    # -- the run around every mutating action ------------------------------------------

    @contextmanager
    def _run(self, pair: Pair, action: str) -> Iterator[Status]:
        fp = pair.fingerprint
        with self.store.lock(fp, pair.name, action):
            status = self.store.read_status(fp)
            previous = status.state
            status.pair = str(pair)
            status.state, status.action, status.pid = RUNNING, action, os.getpid()
            status.started, status.ended, status.error, status.corrupt = time.time(), None, "", ""
            status.extra["previous_state"] = previous
            self.store.write_status(status)
            try:
                yield status
            except BaseException as exc:
                if isinstance(exc, ZettabeeError) and not str(exc).startswith(pair.name):
                    exc.args = (f"{pair.name}: {exc}",)  # every message names its pair
                status.state, status.result = FAILED, "failed"
                status.error = str(exc) if isinstance(exc, ZettabeeError) else repr(exc)
                status.ended, status.pid = time.time(), None
                self.store.write_status(status)
                self.store.clear_progress(fp)
                raise
            status.state, status.result, status.pid = IDLE, "ok", None
            status.ended = time.time()
            status.last_success = status.ended
            status.last_duration = status.ended - (status.started or status.ended)
            status.extra.pop("previous_state", None)
            self.store.write_status(status)
            self.store.clear_progress(fp)

    def _progress(self, pair: Pair, total: int | None = None) -> transport.ProgressFn:
        fp = pair.fingerprint

        def report(count: int, elapsed: float) -> None:
            rate = count / elapsed if elapsed > 0 else 0.0
            data: dict[str, object] = {"bytes": count, "elapsed": elapsed, "rate": rate}
            data["updated"] = time.time()
            if total:
                data["total"] = total
            self.store.write_progress(fp, data)

        return report

    def _early_stream_connection(self, pair: Pair, src: Host) -> None:
        """Start the source's connection now: its handshake overlaps the local work."""
        src.start()

    def _stream(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        send: list[str],
        recv: list[str],
        first: list[str] | None = None,
    ) -> transport.StreamResult:
        opts = pair.options
        progress = self._progress(pair)
        if opts.transport == "mbuffer":
            if not isinstance(src, SshHost):
                raise StateError(f"{pair.name}: transport=mbuffer needs a remote source host")
            connect = opts.mbufferhost or pair.destination.host
            return transport.stream_via_mbuffer(
                src, dst, send, recv, opts.stall, opts.port, connect, opts.bwlimit, progress,
                first,
            )  # fmt: skip
        return transport.stream_via_processes(src, dst, send, recv, opts.stall, progress)

    # -- reading both sides ------------------------------------------------------------

    def _dest_view(self, pair: Pair, dst: Host) -> tuple[dict[str, str], list[zfs.Snapshot]] | None:
        """The destination's zettabee properties and snapshots, in one zfs call."""
        fs = pair.destination.fs
        props = [*zfs.SNAPSHOT_PROPS, zfs.PROP_FINGERPRINT, zfs.PROP_LASTSNAP]
        result = dst.run(zfs.get([fs], props, depth=1), check=False)
        if result.returncode != 0:
            if zfs.missing_dataset(result.stderr):
                return None
            raise CommandError(result.argv, dst.name, result.returncode, result.stderr, "zfs get")
        table = zfs.parse_get(result.stdout)
        return table.get(fs, {}), zfs.parse_snapshots(fs, result.stdout)

    def _source_snapshots(self, pair: Pair, src: Host) -> list[zfs.Snapshot]:
        fs = pair.source.fs
        result = src.run(zfs.list_snapshots(fs), check=False)
        if result.returncode != 0:
            if zfs.missing_dataset(result.stderr):
                raise StateError(
                    f"{pair.name}: the source {pair.source} does not exist "
                    f"({result.stderr.strip()}); check the pair file"
                )
            raise CommandError(result.argv, src.name, result.returncode, result.stderr, "zfs get")
        return zfs.parse_snapshots(fs, result.stdout)

    def _new_snapshot(self, pair: Pair, src: Host, existing: list[zfs.Snapshot]) -> str:
        names = {s.name for s in existing}
        name = snapshot_name(pair.fingerprint, _now())
        while name in names:  # two runs within one second
            time.sleep(0.2)
            name = snapshot_name(pair.fingerprint, _now())
        src.run(zfs.snapshot(pair.source.fs, name))
        log.info("%s: snapshot %s@%s", pair.name, pair.source.fs, name)
        return name

    def _record(self, pair: Pair, dst: Host, snap: str, first: bool) -> None:
        fs = pair.destination.fs
        props = [(zfs.PROP_LASTSNAP, snap)]
        if first:
            props += [
                (zfs.PROP_FINGERPRINT, pair.fingerprint),
                (zfs.PROP_SOURCE, str(pair.source)),
                ("readonly", "on"),
            ]
        # One property per zfs set (zfs-fuse takes no more), all at once.
        wait_all([Background(functools.partial(dst.run, zfs.set_prop(fs, *p))) for p in props])

    # -- actions -----------------------------------------------------------------------

    def initialize(self, pair: Pair, force: bool = False) -> RunReport:
        report = RunReport(pair, "initialize")
        clock = Stopwatch(report.timings)
        with self._run(pair, "initialize") as status:
            src = self.hosts.get(pair.source, pair)
            dst = self.hosts.get(pair.destination, pair)
            self._early_stream_connection(pair, src)
            with clock("listing"):
                view = self._dest_view(pair, dst)  # here, beside the handshake
            fs = pair.destination.fs
            if view is not None:
                if not force:
                    raise StateError(
                        f"{pair.name}: the destination {pair.destination} already exists; "
                        "`zettabee update` continues a replica, and `initialize --force` "
                        f"destroys {fs} with all its snapshots and descendants and starts over"
                    )
                log.warning("%s: --force: destroying %s and everything below it", pair.name, fs)
                destroy(dst, fs, recursive=True)
            if pair.options.transport != "mbuffer":  # mbuffer's listener starts beside it
                with clock("connection"):
                    src.connect()
            done = self._initialize_in_one_round_trip(pair, src, dst, clock)
            if done is None:  # the snapshot failed: look at the source first, then retry
                with clock("listing"):
                    ssnaps = self._source_snapshots(pair, src)
                with clock("snapshot"):
                    snap = self._new_snapshot(pair, src, ssnaps)
                send, recv = zfs.send(f"{pair.source.fs}@{snap}"), zfs.recv(fs)
                with clock("stream"):
                    try:
                        stream = self._stream(pair, src, dst, send, recv)
                    except (CommandError, TransportError) as exc:
                        raise self._explain_receive(pair, exc) from exc
                with clock("record"):
                    self._record(pair, dst, snap, first=True)
                done = snap, stream
            snap, stream = done
            report.snapshot, report.bytes, report.seconds = snap, stream.bytes, stream.seconds
            status.snapshot, status.bytes, status.seconds = snap, stream.bytes, stream.seconds
            log.info(
                "%s: initialized from %s@%s, %d bytes in %.1fs",
                pair.name, pair.source.fs, snap, stream.bytes, stream.seconds,
            )  # fmt: skip
        log.debug("%s: timings %s", pair.name, clock)
        return report

    def _initialize_in_one_round_trip(
        self, pair: Pair, src: Host, dst: Host, clock: Stopwatch
    ) -> tuple[str, transport.StreamResult] | None:
        """The snapshot travels with the stream's command on the source, and the record
        starts as soon as the receive succeeded; None when the snapshot failed (a name
        taken within the same second, a missing source: the caller looks first)."""
        snap = snapshot_name(pair.fingerprint, _now())

        def record() -> None:
            with clock("record"):
                self._record(pair, dst, snap, first=True)

        with clock("stream"):
            stream = self._initial_stream(pair, src, dst, snap, record)
        if stream is None:
            return None
        if pair.options.transport == "mbuffer":
            record()  # mbuffer's receive ends with its stream
        return snap, stream

    def _initial_stream(
        self, pair: Pair, src: Host, dst: Host, snap: str, on_received: Callable[[], None]
    ) -> transport.StreamResult | None:
        """The full stream of ``snap``, taken in the same command on the source (None if
        the snapshot fails); ``on_received`` runs once the receive succeeded (over
        mbuffer the caller runs it: the receive ends with the stream there)."""
        send = zfs.send(f"{pair.source.fs}@{snap}")
        recv = zfs.recv(pair.destination.fs)
        opts = pair.options
        try:
            if opts.transport == "mbuffer":
                first = zfs.snapshot(pair.source.fs, snap)
                try:
                    return self._stream(pair, src, dst, send, recv, first=first)
                except CommandError as exc:
                    if exc.stage == "zfs snapshot":
                        return None
                    raise
            outcome = fastpath.update(
                src, dst, pair.source.fs, None, snap, send, recv, opts.stall,
                self._progress(pair), on_received,
            )  # fmt: skip
            return outcome.stream if outcome is not None else None
        except (CommandError, TransportError) as exc:
            raise self._explain_receive(pair, exc) from exc

    def update(self, pair: Pair) -> RunReport:
        report = RunReport(pair, "update")
        clock = Stopwatch(report.timings)
        with self._run(pair, "update") as status:
            src = self.hosts.get(pair.source, pair)
            dst = self.hosts.get(pair.destination, pair)
            self._early_stream_connection(pair, src)
            with clock("listing"):
                view = self._dest_view(pair, dst)
            if view is None:
                raise StateError(
                    f"{pair.name}: not initialized (the destination {pair.destination} does not "
                    "exist); run `zettabee initialize` first"
                )
            props, dsnaps = view
            self._check_identity(pair, props)
            with clock("connection"):
                src.connect()
            done = self._update_in_one_round_trip(pair, src, dst, dsnaps, clock, report)
            if done is None:
                done = self._update_step_by_step(pair, src, dst, dsnaps, clock, report)
            snap, common, stream = done
            report.snapshot, report.base = snap, common.name
            report.bytes, report.seconds = stream.bytes, stream.seconds
            status.snapshot, status.bytes, status.seconds = snap, stream.bytes, stream.seconds
        log.info(
            "%s: updated %s -> %s, %d bytes in %.1fs",
            pair.name, common.name, snap, report.bytes, report.seconds,
        )  # fmt: skip
        log.debug("%s: timings %s", pair.name, clock)
        return report

    def _update_in_one_round_trip(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        dsnaps: list[zfs.Snapshot],
        clock: Stopwatch,
        report: RunReport,
    ) -> tuple[str, zfs.Snapshot, transport.StreamResult] | None:
        """The routine update (see :mod:`fastpath`); None when it does not apply.

        Once the receive has succeeded, its base is proven the common snapshot: the new
        one is recorded and what the prune plan takes on both sides without the source's
        listing (its base, the destination's surplus) is destroyed, while the source still
        lists; what that listing adds (rare: leftovers of failed runs) goes after."""
        if not dsnaps or pair.options.transport == "mbuffer":
            return None
        fp, base = pair.fingerprint, dsnaps[-1]
        snap = snapshot_name(fp, _now())
        while snap == base.name:  # two runs within one second
            time.sleep(0.2)
            snap = snapshot_name(fp, _now())
        send = zfs.send(
            f"{pair.source.fs}@{snap}",
            base=f"{pair.source.fs}@{base.name}",
            intermediate=pair.options.intermediate,
        )
        recv = zfs.recv(pair.destination.fs, force=pair.options.rollback)
        dest_names = [s.name for s in dsnaps] + [snap]
        early = (
            [base.name] if is_own_snapshot(base.name, fp) else [],
            plan_prune(fp, [], dest_names, snap, pair.options.keep)[1],
        )

        def received() -> None:
            with clock("prune"):
                report.destroyed = self._destroy_planned(pair, src, dst, *early, meanwhile=record)

        def record() -> None:
            with clock("record"):
                self._record(pair, dst, snap, first=False)

        with clock("stream"):
            try:
                outcome = fastpath.update(
                    src, dst, pair.source.fs, base, snap, send, recv,
                    pair.options.stall, self._progress(pair), received,
                    check_base=pair.options.intermediate or pair.options.rollback,
                )  # fmt: skip
            except (CommandError, TransportError) as exc:
                raise self._explain_receive(pair, exc, base.name) from exc
        if outcome is None:
            return None
        clock.add(outcome.timings)
        log.info("%s: snapshot %s@%s", pair.name, pair.source.fs, snap)
        source_names = [s.name for s in outcome.source_snapshots]
        late = [n for n in plan_prune(fp, source_names, dest_names, snap, pair.options.keep)[0]
                if n not in early[0]]  # fmt: skip
        if late:
            report.destroyed += self._destroy_planned(pair, src, dst, late, [])
        return snap, base, outcome.stream

    def _update_step_by_step(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        dsnaps: list[zfs.Snapshot],
        clock: Stopwatch,
        report: RunReport,
    ) -> tuple[str, zfs.Snapshot, transport.StreamResult]:
        with clock("listing"):
            ssnaps = self._source_snapshots(pair, src)
        common = zfs.common_snapshot(ssnaps, dsnaps)
        if common is None:
            raise StateError(self._no_common_message(pair, ssnaps, dsnaps))
        newer = dsnaps[dsnaps.index(common) + 1 :]
        if newer and not pair.options.rollback:
            raise StateError(
                f"{pair.name}: the destination has snapshots the source does not have "
                f"after the common snapshot {common.name}: "
                f"{', '.join(s.name for s in newer)}; destroy them, or set rollback=yes on "
                "the pair to let zettabee roll the destination back"
            )
        if newer:  # rollback=yes; receive -F alone does not go back past the newest
            log.warning(
                "%s: rolling %s back to %s, destroying %s",
                pair.name, pair.destination.fs, common.name, ", ".join(s.name for s in newer),
            )  # fmt: skip
            dst.run(zfs.rollback(f"{pair.destination.fs}@{common.name}"))
        with clock("snapshot"):
            snap = self._new_snapshot(pair, src, ssnaps)
        send = zfs.send(
            f"{pair.source.fs}@{snap}",
            base=f"{pair.source.fs}@{common.name}",
            intermediate=pair.options.intermediate,
        )
        recv = zfs.recv(pair.destination.fs, force=pair.options.rollback)
        with clock("stream"):
            try:
                stream = self._stream(pair, src, dst, send, recv)
            except (CommandError, TransportError) as exc:
                raise self._explain_receive(pair, exc, common.name) from exc
        receiver = stream.stages[-1] if stream.stages else None
        if receiver is not None and receiver.ended is not None:
            clock.add({"receive": max(0.0, receiver.ended - stream.ended)})
        listing = ([s.name for s in ssnaps] + [snap], [s.name for s in dsnaps] + [snap], snap)

        def record() -> None:
            with clock("record"):
                self._record(pair, dst, snap, first=False)

        with clock("prune"):  # the record runs beside the destroys
            report.destroyed = self._prune(
                pair, src, dst, dry_run=False, listing=listing, meanwhile=record
            )
        return snap, common, stream

    def purge(self, pair: Pair, dry_run: bool = False) -> list[str]:
        """Destroy obsolete zettabee snapshots on both sides; never the newest common one."""
        if dry_run:
            src = self.hosts.get(pair.source, pair)
            dst = self.hosts.get(pair.destination, pair)
            return self._prune(pair, src, dst, dry_run=True)
        with self._run(pair, "purge"):
            src = self.hosts.get(pair.source, pair)
            dst = self.hosts.get(pair.destination, pair)
            return self._prune(pair, src, dst, dry_run=False)

    # -- helpers -----------------------------------------------------------------------

    def _check_identity(self, pair: Pair, props: dict[str, str]) -> None:
        owner = zfs.user_prop(props.get(zfs.PROP_FINGERPRINT))
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

    def _no_common_message(
        self, pair: Pair, ssnaps: list[zfs.Snapshot], dsnaps: list[zfs.Snapshot]
    ) -> str:
        dnew = dsnaps[-1].name if dsnaps else "none"
        snew = ssnaps[-1].name if ssnaps else "none"
        return (
            f"{pair.name}: no common snapshot between {pair.source} (newest {snew}) and "
            f"{pair.destination} (newest {dnew}); an incremental update is impossible and "
            "zettabee will not resend over existing data: `zettabee initialize --force` "
            "starts the replica over (destroying the destination)"
        )

    def _explain_receive(
        self, pair: Pair, exc: CommandError | TransportError, base: str | None = None
    ) -> ZettabeeError:
        text = str(exc)
        if "has been modified" in text:
            return StateError(
                f"{pair.name}: the destination {pair.destination.fs} was modified since the "
                f"common snapshot {base}; set rollback=yes on the pair to discard those "
                f"changes, or inspect them first (zfs diff {pair.destination.fs}@{base}). "
                f"zfs said: {text}"
            )
        if isinstance(exc, TransportError):
            return TransportError(f"{pair.name}: {text}", exc.transient)
        exc.args = (f"{pair.name}: {text}",)
        return exc

    def _prune(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        dry_run: bool,
        listing: tuple[list[str], list[str], str] | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[str]:
        """Destroy what :func:`plan_prune` marks; ``listing`` spares a fresh look when the
        caller has just listed both sides (source names, destination names, common)."""
        if listing is None:
            view = self._dest_view(pair, dst)
            if view is None:
                raise StateError(f"{pair.name}: not initialized; nothing to purge")
            dsnaps = view[1]
            ssnaps = self._source_snapshots(pair, src)
            common = zfs.common_snapshot(ssnaps, dsnaps)
            listing = (
                [s.name for s in ssnaps],
                [s.name for s in dsnaps],
                common.name if common else "",
            )
        src_doomed, dst_doomed = plan_prune(pair.fingerprint, *listing, pair.options.keep)
        if dry_run:
            sides = [(src, pair.source.fs, src_doomed), (dst, pair.destination.fs, dst_doomed)]
            return [f"{host.name}:{fs}@{name}" for host, fs, doomed in sides for name in doomed]
        return self._destroy_planned(pair, src, dst, src_doomed, dst_doomed, meanwhile)

    def _destroy_planned(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        src_doomed: list[str],
        dst_doomed: list[str],
        meanwhile: Callable[[], None] | None = None,
    ) -> list[str]:
        sides = [(src, pair.source.fs, src_doomed), (dst, pair.destination.fs, dst_doomed)]
        names = [f"{host.name}:{fs}@{name}" for host, fs, doomed in sides for name in doomed]
        # Both sides at once, and the caller's ``meanwhile`` (recording the new snapshot)
        # beside them: each is a command that mostly waits, on the network or on ZFS.
        sides_done = [Background(functools.partial(destroy_all, *side)) for side in sides]
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            wait_all(sides_done)
        for name in names:
            log.info("%s: destroyed %s", pair.name, name)
        return names


def plan_prune(
    fp: str, source: list[str], dest: list[str], common: str, keep: int
) -> tuple[list[str], list[str]]:
    """Which of the pair's own snapshots can go (names oldest first on both sides).

    The newest common snapshot is never chosen: it is the base of the next update. On the
    source every older zettabee snapshot of the pair goes; on the destination the newest
    ``keep`` stay. Without a common snapshot nothing is chosen at all.
    """
    if not common:
        return [], []
    src_own = [n for n in source if is_own_snapshot(n, fp)]
    cut = source.index(common) if common in source else -1
    src_doomed = [n for n in src_own if n != common and source.index(n) < cut]
    dst_own = [n for n in dest if is_own_snapshot(n, fp)]
    kept = set(dst_own[-max(1, keep) :]) | {common}
    dst_doomed = [n for n in dst_own if n not in kept and dest.index(n) < dest.index(common)]
    return src_doomed, dst_doomed


def destroy(host: Host, target: str, recursive: bool = False, attempts: int = 10) -> None:
    """``zfs destroy``, tried again while ZFS says the dataset is busy: a mount change or a
    process passing through it holds it for a moment (seen often on zfs-fuse)."""
    for attempt in range(attempts):
        result = host.run(zfs.destroy(target, recursive), check=False)
        if result.ok:
            return
        if "busy" not in result.stderr or attempt == attempts - 1:
            raise CommandError(
                result.argv, host.name, result.returncode, result.stderr, "zfs destroy"
            )
        time.sleep(0.3 * (attempt + 1))


def destroy_all(host: Host, fs: str, names: list[str]) -> None:
    for name in names:
        destroy(host, f"{fs}@{name}")


class Background:
    """One call run in a thread, its outcome collected later with :meth:`result`.

    The thread carries its parent's name: a pair's log (``replicate``) keeps the lines of
    the threads that work for it."""

    def __init__(self, call: Callable[[], object]) -> None:
        self._call = call
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=threading.current_thread().name, daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            self._call()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def wait_all(calls: list[Background]) -> None:
    """Wait for every call, then raise the first failure: none is left running."""
    errors = []
    for call in calls:
        try:
            call.result()
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def each_pair(
    pairs: list[Pair], action: Callable[[Pair], object]
) -> list[tuple[Pair, ZettabeeError | None]]:
    """Run ``action`` on every pair; one failing pair never stops the others."""
    outcome: list[tuple[Pair, ZettabeeError | None]] = []
    for pair in pairs:
        try:
            action(pair)
        except ZettabeeError as exc:
            log.error("%s", exc)
            outcome.append((pair, exc))
        else:
            outcome.append((pair, None))
    return outcome
