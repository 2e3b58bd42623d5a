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
from typing import Any, Generic, TypeVar

from zettabee import fastpath, transport, zfs
from zettabee.capabilities import Capabilities, PairFeatures
from zettabee.errors import CommandError, StateError, TransportError, ZettabeeError
from zettabee.host import Host, SshHost
from zettabee.hosts import Hosts
from zettabee.pair import Pair, hold_tag, is_own_snapshot, snapshot_name
from zettabee.state import FAILED, IDLE, RUNNING, StateStore, Status
from zettabee.units import format_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["Hosts", "Replicator", "RunReport", "plan_prune"]


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
        self._tidy_before: dict[str, bool] = {}  # per fingerprint, for the run under way
        # Destinations listed ahead for many pairs at once (see prefetch_destinations):
        # per file system, its view and when the listing started.
        self._prefetched: dict[str, tuple[float, tuple[dict[str, str], list[zfs.Snapshot]]]] = {}
        # Per fingerprint, when the pair's last run ended, if it ended (read under its lock).
        self._settled_at: dict[str, float | None] = {}

    # -- the run around every mutating action ------------------------------------------

    @contextmanager
    def _run(self, pair: Pair, action: str) -> Iterator[Status]:
        fp = pair.fingerprint
        with self.store.lock(fp, pair.name, action):
            status = self.store.read_status(fp)
            previous = status.state
            status.pair = str(pair)
            status.state, status.action, status.pid = RUNNING, action, os.getpid()
            settled = previous in (IDLE, FAILED) and not status.corrupt
            self._settled_at[fp] = status.ended if settled else None
            status.started, status.ended, status.error, status.corrupt = time.time(), None, "", ""
            status.extra["previous_state"] = previous
            # Whether the last run left the source tidy: only an update asks, only now.
            tidy = status.extra.pop(TIDY, False) is True and previous == IDLE
            if action == "update":
                self._tidy_before[fp] = tidy
            self.store.write_status(status)
            try:
                yield status
            except BaseException as exc:
                if isinstance(exc, ZettabeeError) and not str(exc).startswith(pair.name):
                    exc.args = (f"{pair.name}: {exc}",)  # every message names its pair
                self.hosts.forget_probes(pair)
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

    def _early_stream_connection(self, pair: Pair, src: Host, dst: Host) -> None:
        """Start the connections the run will use now, the source's and a remote
        destination's: their handshakes overlap the local work."""
        src.start()
        dst.start()

    def _stream(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        send: list[str],
        recv: list[str],
        total: int | None = None,
        first: list[list[str]] | None = None,
    ) -> transport.StreamResult:
        """The stream on the pair's transport; ``first`` (mbuffer only) runs on the source
        in the sending command, before the send."""
        opts = pair.options
        progress = self._progress(pair, total)
        if opts.transport == "mbuffer":
            if not isinstance(src, SshHost):
                raise StateError(f"{pair.name}: transport=mbuffer needs a remote source host")
            connect = opts.mbufferhost or pair.destination.host
            return transport.stream_via_mbuffer(
                src, dst, send, recv, opts.stall, opts.port, connect, opts.bwlimit, progress,
                first=first or (),
            )  # fmt: skip
        if opts.transport == "local":
            if not (src is dst or (src.is_local and dst.is_local)):
                raise StateError(
                    f"{pair.name}: transport=local runs zfs send | zfs receive on one host, "
                    f"but the source is on {pair.source.host} and the destination on "
                    f"{pair.destination.host}; use transport=ssh or mbuffer"
                )
            if isinstance(src, SshHost):
                return transport.stream_on_host(src, send, recv, opts.stall, progress)
        return transport.stream_via_processes(src, dst, send, recv, opts.stall, progress)

    # -- what both sides can do ----------------------------------------------------------

    def _features(self, pair: Pair, src: Host, dst: Host, status: Status) -> PairFeatures:
        """Probe both sides (once per host and run), record what the pair uses in its
        status, and refuse an option the pair demands but a side cannot honour."""
        feats = self.hosts.features(pair, src, dst)
        status.extra["features"] = {**feats.as_dict(), "probed": time.time()}
        if feats.problems:
            raise StateError(f"{pair.name}: {'; '.join(feats.problems)}")
        log.debug("%s: uses %s", pair.name, feats.describe())
        return feats

    # -- reading both sides ------------------------------------------------------------

    def _dest_view(
        self, pair: Pair, dst: Host, caps: Capabilities | None = None
    ) -> tuple[dict[str, str], list[zfs.Snapshot]] | None:
        """The destination's zettabee properties, resume token and snapshots, in one call
        (``caps``: what the destination can do, which says what there is to read)."""
        fs = pair.destination.fs
        result = dst.run(zfs.get([fs], _dest_props(caps), depth=1), check=False)
        if result.returncode != 0:
            if zfs.missing_dataset(result.stderr):
                return None
            raise CommandError(result.argv, dst.name, result.returncode, result.stderr, "zfs get")
        table = zfs.parse_get(result.stdout)
        return table.get(fs, {}), zfs.parse_snapshots(fs, result.stdout)

    def prefetch_destinations(self, pairs: list[Pair]) -> None:
        """List the destinations of ``pairs`` on this host with one ``zfs get`` per pool,
        for the updates of a ``replicate`` run: each then spares its own listing, unless
        a run of the pair ended after this listing began (see :meth:`_prefetched_view`).
        A destination the listing lacks (not initialized, say) is listed by its update."""
        by_pool: dict[str, list[Pair]] = {}
        for pair in pairs:
            if self.hosts.get(pair.destination, pair).is_local:
                by_pool.setdefault(pair.destination.pool, []).append(pair)
        for pool, members in by_pool.items():
            dst = self.hosts.get(members[0].destination, members[0])
            started = time.time()
            caps = self.hosts.prober.of(dst, pool)
            names = sorted({p.destination.fs for p in members})
            result = dst.run(zfs.get(names, _dest_props(caps), depth=1), check=False)
            try:  # rows of the file systems that exist, whatever zfs said of the others
                views = _views_by_fs(names, result.stdout)
            except ValueError:
                continue
            for fs, view in views.items():
                self._prefetched[fs] = (started, view)

    def _prefetched_view(self, pair: Pair) -> tuple[dict[str, str], list[zfs.Snapshot]] | None:
        """The destination's view from :meth:`prefetch_destinations`, if nothing of the
        pair's can have changed it since: its last run ended before that listing began
        (read under the pair's lock, which every run that changes a destination takes)."""
        taken = self._prefetched.pop(pair.destination.fs, None)
        settled = self._settled_at.get(pair.fingerprint)
        if taken is None or settled is None or settled >= taken[0]:
            return None
        return taken[1]

    def _source_view(
        self, pair: Pair, src: Host, feats: PairFeatures | None = None
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
            raise CommandError(result.argv, src.name, result.returncode, result.stderr, "zfs get")
        return zfs.parse_snapshots(fs, result.stdout), zfs.parse_bookmarks(fs, result.stdout)

    def _source_snapshots(self, pair: Pair, src: Host) -> list[zfs.Snapshot]:
        return self._source_view(pair, src)[0]

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
            props += [(zfs.PROP_SOURCE, str(pair.source)), ("readonly", "on")]
        # One property per zfs set (zfs-fuse takes no more), all at once.
        wait_all([Background(functools.partial(dst.run, zfs.set_prop(fs, *p))) for p in props])
        if first:
            # The fingerprint last: it claims the destination for the pair, so a run killed
            # before it leaves one the next update adopts (see _adopt), never a pair that
            # is recorded without its snapshot.
            dst.run(zfs.set_prop(fs, zfs.PROP_FINGERPRINT, pair.fingerprint))

    # -- holds and bookmarks -------------------------------------------------------------

    def _hold(self, pair: Pair, host: Host, snap: str) -> None:
        """Keep ``snap`` from being destroyed by anyone until zettabee releases it."""
        result = host.run(zfs.hold(hold_tag(pair.fingerprint), snap), check=False)
        if result.ok or zfs.tag_exists(result.stderr):
            log.debug(
                "%s: hold %s on %s:%s", pair.name, hold_tag(pair.fingerprint), host.name, snap
            )
            return
        raise CommandError(result.argv, host.name, result.returncode, result.stderr, "zfs hold")

    def _release(self, pair: Pair, host: Host, snap: str) -> bool:
        """Release the pair's hold on ``snap``; False when it carried none."""
        result = host.run(zfs.release(hold_tag(pair.fingerprint), snap), check=False)
        if result.ok:
            return True
        if zfs.tag_missing(result.stderr) or zfs.missing_dataset(result.stderr):
            return False
        raise CommandError(result.argv, host.name, result.returncode, result.stderr, "zfs release")

    def _move_holds(
        self, pair: Pair, host: Host, snaps: list[zfs.Snapshot], keep: str, base: str = ""
    ) -> None:
        """Release the pair's holds on its snapshots (and on ``base``, which need not be
        one of its own) except ``keep``. Only snapshots that carry holds are asked: one
        command each, normally just the previous base."""
        for snap in self._held(pair, snaps, base):
            if snap.name != keep:
                self._let_go(pair, host, snap.full)

    def _let_go(self, pair: Pair, host: Host, snap: str) -> None:
        """Release the pair's hold on ``snap`` and say so, if it carried one."""
        if self._release(pair, host, snap):
            log.info("%s: released hold on %s:%s", pair.name, host.name, snap)

    @staticmethod
    def _held(pair: Pair, snaps: list[zfs.Snapshot], base: str = "") -> list[zfs.Snapshot]:
        """Snapshots that may carry the pair's hold: its own and ``base``, when held at all
        (other tags on other snapshots are none of zettabee's business)."""
        fp = pair.fingerprint
        return [
            s for s in snaps if s.userrefs > 0 and (is_own_snapshot(s.name, fp) or s.name == base)
        ]

    def _bookmark(self, pair: Pair, src: Host, snap: str, marks: list[zfs.Bookmark]) -> None:
        """Bookmark ``snap`` (the new base) and drop the pair's older bookmarks: should
        another tool prune the snapshot, the next update still sends from the bookmark."""
        fs = pair.source.fs
        result = src.run(zfs.bookmark(f"{fs}@{snap}", f"{fs}#{snap}"), check=False)
        if not result.ok and "exists" not in result.stderr:
            raise CommandError(
                result.argv, src.name, result.returncode, result.stderr, "zfs bookmark"
            )
        for mark in self._old_bookmarks(pair, marks, snap):
            destroy(src, mark.full)
            log.info("%s: destroyed bookmark %s:%s", pair.name, src.name, mark.full)

    @staticmethod
    def _old_bookmarks(pair: Pair, marks: list[zfs.Bookmark], keep: str) -> list[zfs.Bookmark]:
        return [m for m in marks if is_own_snapshot(m.name, pair.fingerprint) and m.name != keep]

    # -- resumable receive ---------------------------------------------------------------

    def _abort_receive(self, pair: Pair, dst: Host, status: Status, why: str) -> None:
        fs = pair.destination.fs
        log.warning(
            "%s: %s; discarding the partial receive (zfs receive -A %s)", pair.name, why, fs
        )
        dst.run(zfs.recv_abort(fs))
        status.extra.pop("resume", None)
        self.store.write_status(status)

    def _note_transfer(self, status: Status, target: str, kept: int = 0) -> dict[str, Any]:
        """Record in the status, before the stream starts, that the receive is resumable:
        a run killed in the middle leaves a token, and status and the runtime check say so."""
        entry = status.extra.get("resume")
        if not isinstance(entry, dict) or entry.get("snapshot") != target:
            entry = {"snapshot": target, "since": time.time(), "runs": 0}
        entry["runs"] = int(entry.get("runs", 0)) + 1
        entry["kept"] = max(int(entry.get("kept", 0)), kept)
        status.extra["resume"] = entry
        self.store.write_status(status)
        return entry

    def _kept_after_failure(
        self, pair: Pair, dst: Host, status: Status, entry: dict[str, Any]
    ) -> str:
        """After a resumable stream failed: is there a token? Say what the next run does."""
        fs = pair.destination.fs
        try:
            result = dst.run(zfs.get([fs], [zfs.PROP_RESUME_TOKEN]), check=False)
        except ZettabeeError:
            return ""
        value = (
            zfs.parse_get(result.stdout).get(fs, {}).get(zfs.PROP_RESUME_TOKEN)
            if result.ok
            else None
        )
        if not zfs.resume_token(value):
            status.extra.pop("resume", None)
            return ""
        progress = self.store.read_progress(pair.fingerprint) or {}
        entry["kept"] = int(entry.get("kept", 0)) + int(progress.get("bytes", 0))
        entry["token"] = True
        status.extra["resume"] = entry
        return (
            f"; the receive is resumable: about {format_bytes(entry['kept'])} of "
            f"{entry['snapshot']} are kept on {dst.name}, and the next update resumes from there"
        )

    def _transfer(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        feats: PairFeatures,
        status: Status,
        send: list[str],
        recv: list[str],
        target: str,
        estimate: list[str] | None,
        base: str | None = None,
    ) -> transport.StreamResult:
        """One stream, with its size estimated first where the source can, and the
        resume bookkeeping around it where the receive is resumable."""
        total = self._estimate(pair, src, estimate) if estimate and feats.estimate else None
        entry = self._note_transfer(status, target) if feats.resume else None
        try:
            stream = self._stream(pair, src, dst, send, recv, total)
        except (CommandError, TransportError) as exc:
            error = self._explain_receive(pair, exc, base)
            if entry is not None:
                note = self._kept_after_failure(pair, dst, status, entry)
                if note:
                    error.args = (f"{error}{note}",)
            raise error from exc
        status.extra.pop("resume", None)
        return stream

    def _estimate(self, pair: Pair, src: Host, argv: list[str]) -> int | None:
        """The stream's size from ``zfs send -nvP``; progress shows a percentage with it.
        An estimate that fails never fails the run."""
        try:
            result = src.run(argv, check=False)
        except ZettabeeError as exc:
            log.debug("%s: no size estimate: %s", pair.name, exc)
            return None
        size = zfs.parse_estimate(result.stdout + "\n" + result.stderr) if result.ok else None
        log.debug("%s: estimated stream size %s", pair.name, size)
        return size

    def _resume(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        feats: PairFeatures,
        status: Status,
        token: str,
        force: bool = False,
    ) -> tuple[str, transport.StreamResult] | None:
        """Go on with an interrupted receive from its token.

        Returns the snapshot received and the stream that finished it, or None when the
        token no longer applies: then it is cleared, and the caller goes on as if there had
        been none. ``zfs send -nvP -t`` checks the token first where it can (and says what
        it names and how much is left); a token that ``send -t`` itself refuses is cleared
        the same way."""
        fs = pair.destination.fs
        toname, kept, total = "", 0, None
        if feats.estimate:
            result = src.run(zfs.send_resume(token, estimate=True), check=False)
            said = result.stdout + "\n" + result.stderr
            if not result.ok:
                if zfs.stale_token(result.stderr):
                    self._abort_receive(
                        pair,
                        dst,
                        status,
                        f"the resume token no longer applies ({result.stderr.strip()})",
                    )
                    return None
                raise CommandError(
                    result.argv, src.name, result.returncode, result.stderr, "zfs send"
                )
            fields = zfs.parse_resume_contents(said)
            toname = fields.get("toname", "")
            kept = zfs.hex_or_int(fields.get("bytes")) or 0
            total = zfs.parse_estimate(said)
        target = toname.partition("@")[2] or str(status.extra.get("resume", {}).get("snapshot", ""))
        log.info(
            "%s: resuming the interrupted receive of %s (%s already on %s)",
            pair.name, target or "?", format_bytes(kept), dst.name,
        )  # fmt: skip
        entry = self._note_transfer(status, target or "?", kept)
        try:
            stream = self._stream(
                pair,
                src,
                dst,
                zfs.send_resume(token),
                zfs.recv(fs, force=force, resumable=True),
                total,
            )
        except (CommandError, TransportError) as exc:
            if (
                isinstance(exc, CommandError)
                and exc.stage.startswith("zfs send")
                and zfs.stale_token(exc.stderr)
            ):
                self._abort_receive(
                    pair, dst, status, f"the resume token no longer applies ({exc.stderr})"
                )
                return None
            error = self._explain_receive(pair, exc)
            note = self._kept_after_failure(pair, dst, status, entry)
            error.args = (f"{error}{note}",)
            raise error from exc
        status.extra.pop("resume", None)
        self.store.write_status(status)
        if not target:
            view = self._dest_view(pair, dst)
            target = view[1][-1].name if view and view[1] else ""
        log.info(
            "%s: resumed receive of %s completed, %s more in %.1fs",
            pair.name, target, format_bytes(stream.bytes), stream.seconds,
        )  # fmt: skip
        return (target, stream) if target else None

    # -- actions -----------------------------------------------------------------------

    def _open(
        self, pair: Pair, status: Status, clock: Stopwatch
    ) -> tuple[Host, Host, PairFeatures, tuple[dict[str, str], list[zfs.Snapshot]] | None]:
        """Both hosts of the pair connected and probed, and the destination's view (None:
        no destination). A local destination is probed and listed while the source's
        handshake runs."""
        src = self.hosts.get(pair.source, pair)
        dst = self.hosts.get(pair.destination, pair)
        self._early_stream_connection(pair, src, dst)
        view = None
        if dst.is_local:
            with clock("listing"):
                here = self.hosts.prober.of(dst, pair.destination.pool)
                view = self._prefetched_view(pair) or self._dest_view(pair, dst, here)
        with clock("connection"):
            src.connect()
            dst.connect()
        with clock("probe"):
            feats = self._features(pair, src, dst, status)
        if not dst.is_local:
            with clock("listing"):
                view = self._dest_view(pair, dst, feats.destination)
        return src, dst, feats, view

    def initialize(self, pair: Pair, force: bool = False) -> RunReport:
        report = RunReport(pair, "initialize")
        clock = Stopwatch(report.timings)
        with self._run(pair, "initialize") as status:
            src, dst, feats, view = self._open(pair, status, clock)
            fs = pair.destination.fs
            if view is not None:
                props, dsnaps = view
                token = zfs.resume_token(props.get(zfs.PROP_RESUME_TOKEN))
                ours = zfs.user_prop(props.get(zfs.PROP_FINGERPRINT))
                if token and ours is None and not dsnaps and not force:
                    # An initialize that was interrupted: its full stream goes on.
                    if not feats.resume:
                        raise StateError(
                            f"{pair.name}: {fs} holds a partial receive, and this pair does not "
                            f"resume (resume=no); `zfs receive -A {fs}` discards it"
                        )
                    done = self._resume(pair, src, dst, feats, status, token)
                    if done is not None:
                        snap, stream = done
                        self._finish_initialize(
                            pair,
                            src,
                            dst,
                            feats,
                            status,
                            report,
                            snap,
                            stream.bytes,
                            stream.seconds,
                            hold_source=feats.hold_source,
                        )
                        return report
                    view = self._dest_view(pair, dst, feats.destination)
            if view is not None:
                if not force:
                    raise StateError(
                        f"{pair.name}: the destination {pair.destination} already exists; "
                        "`zettabee update` continues a replica, and `initialize --force` "
                        f"destroys {fs} with all its snapshots and descendants and starts over"
                    )
                log.warning("%s: --force: destroying %s and everything below it", pair.name, fs)
                if feats.destination.holds:
                    self._move_holds(pair, dst, view[1], keep="")
                destroy(dst, fs, recursive=True)
            done = None
            needs = self._needs_steps(pair, src, dst, feats, None, streams=("ssh", "mbuffer"))
            if needs:
                log.debug("%s: initialize step by step (%s)", pair.name, needs)
            elif pair.options.transport == "mbuffer":
                done = self._initialize_over_mbuffer(pair, src, dst, feats, clock)
            else:
                done = self._initialize_in_one_round_trip(pair, src, dst, feats, clock)
            if done is not None:
                snap, stream = done
                self._report_initialize(pair, status, report, snap, stream.bytes, stream.seconds)
                log.debug("%s: timings %s", pair.name, clock)
                return report
            # Step by step; also when the script's snapshot failed: the listing says why.
            with clock("listing"):
                ssnaps, _marks = self._source_view(pair, src, feats)
            with clock("snapshot"):
                snap = self._new_snapshot(pair, src, ssnaps)
                if feats.hold_source:
                    self._hold(pair, src, f"{pair.source.fs}@{snap}")
            raw = pair.options.raw
            send = zfs.send(f"{pair.source.fs}@{snap}", raw=raw)
            estimate = zfs.send(f"{pair.source.fs}@{snap}", raw=raw, estimate=True)
            recv = zfs.recv(fs, resumable=feats.resume)
            with clock("stream"):
                stream = self._transfer(pair, src, dst, feats, status, send, recv, snap, estimate)
            with clock("record"):
                self._finish_initialize(
                    pair, src, dst, feats, status, report, snap, stream.bytes, stream.seconds
                )
        log.debug("%s: timings %s", pair.name, clock)
        return report

    def _initialize_in_one_round_trip(
        self, pair: Pair, src: Host, dst: Host, feats: PairFeatures, clock: Stopwatch
    ) -> tuple[str, transport.StreamResult] | None:
        """The snapshot is taken (and held) in the stream's command on the source, and
        the record (and the destination's hold) starts as soon as the receive succeeded;
        None when the snapshot failed (a name taken within the same second, a missing
        source: the caller looks first)."""
        snap = snapshot_name(pair.fingerprint, _now())
        send = zfs.send(f"{pair.source.fs}@{snap}", raw=pair.options.raw)
        recv = zfs.recv(pair.destination.fs)
        tag = hold_tag(pair.fingerprint) if feats.hold_source else None

        def received() -> None:
            with clock("record"):
                self._record(pair, dst, snap, first=True)
                if feats.hold_destination:
                    self._hold(pair, dst, f"{pair.destination.fs}@{snap}")

        with clock("stream"):
            try:
                outcome = fastpath.update(
                    src, dst, pair.source.fs, None, snap, send, recv, pair.options.stall,
                    self._progress(pair), received, hold=tag,
                )  # fmt: skip
            except (CommandError, TransportError) as exc:
                raise self._explain_receive(pair, exc) from exc
        return (snap, outcome.stream) if outcome is not None else None

    def _initialize_over_mbuffer(
        self, pair: Pair, src: Host, dst: Host, feats: PairFeatures, clock: Stopwatch
    ) -> tuple[str, transport.StreamResult] | None:
        """The snapshot is taken (and held) on the source by the command that sends it
        into mbuffer; the record and the destination's hold go together after it. None
        when the snapshot failed (the caller looks first, step by step)."""
        snap = snapshot_name(pair.fingerprint, _now())
        target = f"{pair.source.fs}@{snap}"
        first = [zfs.snapshot(pair.source.fs, snap)]
        if feats.hold_source:
            first.append(zfs.hold(hold_tag(pair.fingerprint), target))
        send = zfs.send(target, raw=pair.options.raw)
        with clock("stream"):
            try:
                stream = self._stream(
                    pair, src, dst, send, zfs.recv(pair.destination.fs), first=first
                )
            except CommandError as exc:
                if exc.stage == "zfs snapshot":
                    log.debug("%s: snapshot on %s failed: step by step", pair.name, src.name)
                    return None
                raise self._explain_receive(pair, exc) from exc
            except TransportError as exc:
                raise self._explain_receive(pair, exc) from exc
        with clock("record"):
            calls = [Background(functools.partial(self._record, pair, dst, snap, True))]
            if feats.hold_destination:
                dst_snap = f"{pair.destination.fs}@{snap}"
                calls.append(Background(functools.partial(self._hold, pair, dst, dst_snap)))
            wait_all(calls)
        return snap, stream

    def _finish_initialize(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        feats: PairFeatures,
        status: Status,
        report: RunReport,
        snap: str,
        count: int,
        seconds: float,
        hold_source: bool = False,
    ) -> None:
        """Record the pair and hold what it received. The source's snapshot was held
        before it travelled; ``hold_source`` holds it here (a resumed receive, whose run
        may have died before its hold)."""
        self._record(pair, dst, snap, first=True)
        if hold_source:
            self._hold(pair, src, f"{pair.source.fs}@{snap}")
        if feats.hold_destination:
            self._hold(pair, dst, f"{pair.destination.fs}@{snap}")
        if feats.bookmark:
            self._bookmark(pair, src, snap, [])
        self._report_initialize(pair, status, report, snap, count, seconds)

    def _report_initialize(
        self, pair: Pair, status: Status, report: RunReport, snap: str, count: int, seconds: float
    ) -> None:
        report.snapshot, report.bytes, report.seconds = snap, count, seconds
        status.snapshot, status.bytes, status.seconds = snap, count, seconds
        log.info(
            "%s: initialized from %s@%s, %d bytes in %.1fs",
            pair.name, pair.source.fs, snap, count, seconds,
        )  # fmt: skip

    def update(self, pair: Pair) -> RunReport:
        report = RunReport(pair, "update")
        clock = Stopwatch(report.timings)
        with self._run(pair, "update") as status:
            src, dst, feats, view = self._open(pair, status, clock)
            if view is None:
                raise StateError(
                    f"{pair.name}: not initialized (the destination {pair.destination} does not "
                    "exist); run `zettabee initialize` first"
                )
            props, dsnaps = view
            adopt = self._check_identity(pair, props, dsnaps)
            token = zfs.resume_token(props.get(zfs.PROP_RESUME_TOKEN))
            # The run before left the source as planned: this one need not list it.
            tidy = self._tidy_before.pop(pair.fingerprint, False)
            done = None
            needs = self._needs_steps(pair, src, dst, feats, token, adopt)
            if needs:
                log.debug("%s: update step by step (%s)", pair.name, needs)
            else:
                done = self._update_in_one_round_trip(
                    pair, src, dst, feats, dsnaps, clock, report, status, listing=not tidy
                )
            if done is None:
                done = self._update_step_by_step(
                    pair, src, dst, feats, status, props, dsnaps, clock, report, adopt
                )
            snap, common, stream = done
            report.snapshot, report.base = snap, common.name
            report.bytes += stream.bytes  # after what a resume moved, if anything
            report.seconds += stream.seconds
            status.snapshot, status.bytes, status.seconds = snap, report.bytes, report.seconds
        log.info(
            "%s: updated %s -> %s, %d bytes in %.1fs",
            pair.name, report.base, report.snapshot, report.bytes, report.seconds,
        )  # fmt: skip
        log.debug("%s: timings %s", pair.name, clock)
        return report

    @staticmethod
    def _needs_steps(
        pair: Pair,
        src: Host,
        dst: Host,
        feats: PairFeatures,
        token: str | None,
        adopt: bool = False,
        streams: tuple[str, ...] = ("ssh",),
    ) -> str:
        """Why this update cannot go in one round trip (see :mod:`fastpath`), or "".

        It saves round trips to a remote source whose stream comes here over ssh, and it
        takes the new snapshot's hold in its script and moves the holds after the
        receive. What needs a step of its own around the stream goes step by step: a
        size estimate (the snapshot must exist first), a resumable receive and its
        bookkeeping, a resume token to go on with, a bookmark, the adoption of a
        destination that an interrupted initialize received; so do a remote destination
        and the transports other than ``streams`` (initialize takes its snapshot in the
        mbuffer pipeline's command too)."""
        reasons = [
            (pair.options.transport not in streams, f"transport={pair.options.transport}"),
            (not isinstance(src, SshHost), "the source is on this host"),
            (not dst.is_local, "the destination is remote"),
            (bool(token), "a resume token is pending"),
            (feats.estimate, "size estimate"),
            (feats.resume, "resumable receive"),
            (feats.bookmark, "bookmarks"),
            (adopt, "an interrupted initialize to adopt"),
        ]
        return ", ".join(why for applies, why in reasons if applies)

    def _update_in_one_round_trip(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        feats: PairFeatures,
        dsnaps: list[zfs.Snapshot],
        clock: Stopwatch,
        report: RunReport,
        status: Status,
        listing: bool = True,
    ) -> tuple[str, zfs.Snapshot, transport.StreamResult] | None:
        """The routine update (see :mod:`fastpath`); None when it does not apply.

        Once both the send and the receive have succeeded, the new snapshot is the
        common one: the script holds it on the source, releases the pair's hold on the
        old base and destroys that, while here the new snapshot is recorded and held,
        the base's hold released and the destination's surplus destroyed. What the
        source's listing adds (rare: leftovers of failed runs) goes after.

        Without ``listing`` (the run before left the source tidy), the source is listed
        only if the update fails. A run that found and left the source as planned says
        so in the status, for the next one (:data:`TIDY`)."""
        if not dsnaps:
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
            raw=pair.options.raw,
        )
        recv = zfs.recv(pair.destination.fs, force=pair.options.rollback)
        dest_names = [s.name for s in dsnaps] + [snap]
        early = (
            [base.name] if is_own_snapshot(base.name, fp) else [],
            plan_prune(fp, [], dest_names, snap, pair.options.keep)[1],
        )
        src_fs, dst_fs = pair.source.fs, pair.destination.fs
        tag = hold_tag(fp) if feats.hold_source else None
        then = []
        if tag:  # the new snapshot's hold, then the old base's release
            then += [
                ("hold", zfs.hold(tag, f"{src_fs}@{snap}")),
                ("release", zfs.release(tag, f"{src_fs}@{base.name}")),
            ]
        then += [("destroy", zfs.destroy(f"{src_fs}@{name}")) for name in early[0]]

        def received() -> None:
            with clock("prune"):
                holds = Background(
                    functools.partial(
                        self._move_dest_holds, pair, dst, feats, dsnaps, snap, base.name
                    )
                )
                try:
                    with clock("record"):
                        self._record(pair, dst, snap, first=False)
                finally:
                    holds.result()
                # Only once the new snapshot is recorded: until then the recorded one is
                # what a killed run leaves for status, the checks and the next run. And
                # once the holds moved: a snapshot still held cannot go.
                report.destroyed += self._destroy_and_say(pair, dst, dst_fs, early[1])

        with clock("stream"):
            try:
                outcome = fastpath.update(
                    src, dst, src_fs, base, snap, send, recv,
                    pair.options.stall, self._progress(pair), received,
                    check_base=pair.options.intermediate or pair.options.rollback,
                    holds=feats.source.holds, then=then, listing=listing,
                )  # fmt: skip
            except (CommandError, TransportError) as exc:
                raise self._explain_receive(pair, exc, base.name) from exc
        if outcome is None:
            return None
        clock.add(outcome.timings)
        log.info("%s: snapshot %s@%s", pair.name, src_fs, snap)
        as_planned = all(step.status == 0 for step in outcome.then.values())
        report.destroyed += self._source_base_gone(pair, src, base.name, then, outcome.then)
        if outcome.source_snapshots is not None:
            none_left = self._source_leftovers(
                pair, src, dst, feats, outcome.source_snapshots, base.name, snap, dest_names,
                early[0], report,
            )  # fmt: skip
            as_planned = as_planned and none_left
        if as_planned:
            status.extra[TIDY] = True
        return snap, base, outcome.stream

    def _source_leftovers(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        feats: PairFeatures,
        listed: list[zfs.Snapshot],
        base: str,
        snap: str,
        dest_names: list[str],
        gone: list[str],
        report: RunReport,
    ) -> bool:
        """Release the holds and destroy the snapshots that failed runs left on the
        source, as its listing after the send shows them; True when there were none."""
        fp = pair.fingerprint
        rest = [s for s in listed if s.name != base]
        stray: list[zfs.Snapshot] = []
        if feats.source.holds:  # holds a failed run may have left
            keep = snap if feats.hold_source else ""
            stray = [s for s in self._held(pair, rest) if s.name != keep]
            self._move_holds(pair, src, rest, keep=keep)
        source_names = [s.name for s in listed]
        late = [n for n in plan_prune(fp, source_names, dest_names, snap, pair.options.keep)[0]
                if n not in gone]  # fmt: skip
        if late:
            report.destroyed += self._destroy_planned(pair, src, dst, late, [])
        return not stray and not late

    def _source_base_gone(
        self,
        pair: Pair,
        src: Host,
        base: str,
        then: list[tuple[str, list[str]]],
        done: dict[str, fastpath.Step],
    ) -> list[str]:
        """Judge the script's hold of the new snapshot and its release and destroy of the
        old base on the source; what it could not do (a destroy that found the snapshot
        busy, a connection lost after the receive) is done here, step by step; a base
        that another tag's hold keeps stays. A hold that failed fails the update, the old
        base left held. The source's snapshots destroyed."""
        target = f"{pair.source.fs}@{base}"
        planned = dict(then)
        if "hold" in planned:
            held = done.get("hold")
            if held is None:
                self._hold(pair, src, planned["hold"][-1])
            elif held.status != 0:
                argv = planned["hold"]
                raise CommandError(argv, src.name, held.status, held.said, "zfs hold")
        if "release" in planned:
            released = done.get("release")
            if released is None:
                self._let_go(pair, src, target)
            elif released.status == 0:
                log.info("%s: released hold on %s:%s", pair.name, src.name, target)
            elif not (zfs.tag_missing(released.said) or zfs.missing_dataset(released.said)):
                argv = planned["release"]
                raise CommandError(argv, src.name, released.status, released.said, "zfs release")
        if "destroy" not in planned:
            return []
        destroyed = done.get("destroy")
        if destroyed is None or destroyed.status != 0:
            if destroyed is not None and "busy" not in destroyed.said:
                argv = planned["destroy"]
                raise CommandError(argv, src.name, destroyed.status, destroyed.said, "zfs destroy")
            self._let_go(pair, src, target)  # held since hold=yes, say
            return self._destroy_and_say(pair, src, pair.source.fs, [base])
        log.info("%s: destroyed %s:%s", pair.name, src.name, target)
        return [f"{src.name}:{target}"]

    def _move_dest_holds(
        self,
        pair: Pair,
        dst: Host,
        feats: PairFeatures,
        dsnaps: list[zfs.Snapshot],
        snap: str,
        base: str,
    ) -> None:
        """Hold the snapshot just received, then let go of the earlier holds. Where the
        host has holds, earlier ones go even when the pair stopped using them (hold=no):
        a forgotten hold would pin its snapshot for good."""
        if feats.hold_destination:
            self._hold(pair, dst, f"{pair.destination.fs}@{snap}")
        if feats.destination.holds:
            keep = snap if feats.hold_destination else ""
            self._move_holds(pair, dst, dsnaps, keep=keep, base=base)

    def _update_step_by_step(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        feats: PairFeatures,
        status: Status,
        props: dict[str, str],
        dsnaps: list[zfs.Snapshot],
        clock: Stopwatch,
        report: RunReport,
        adopt: bool = False,
    ) -> tuple[str, zfs.Snapshot, transport.StreamResult]:
        with clock("listing"):
            ssnaps, marks = self._source_view(pair, src, feats)
        token = zfs.resume_token(props.get(zfs.PROP_RESUME_TOKEN))
        if token:
            if feats.resume:
                with clock("resume"):
                    resumed = self._resume(
                        pair, src, dst, feats, status, token, force=pair.options.rollback
                    )
                if resumed is not None:
                    self._record(pair, dst, resumed[0], first=False)
                    report.resumed = resumed[0]
                    report.bytes, report.seconds = resumed[1].bytes, resumed[1].seconds
                view = self._dest_view(pair, dst, feats.destination)
                assert view is not None
                dsnaps = view[1]
            else:
                self._abort_receive(pair, dst, status, "this pair does not resume (resume=no)")
        found = zfs.common_base(ssnaps, marks, dsnaps)
        if adopt:
            self._adopt(pair, dst, found[0] if found else None)
        if found is None:
            raise StateError(self._no_common_message(pair, ssnaps, dsnaps))
        common, source_base = found
        newer = dsnaps[dsnaps.index(common) + 1 :]
        if newer and not pair.options.rollback:
            raise StateError(
                f"{pair.name}: the destination has snapshots the source does not have "
                f"after the common snapshot {common.name}: "
                f"{', '.join(s.name for s in newer)}; destroy them, or set rollback=yes on "
                "the pair to let zettabee roll the destination back"
            )
        if newer:
            # rollback=yes allows it. Done here, not left to `receive -F`: old ZFS
            # (zfs-fuse) receives on top of a newer snapshot that holds no changes and
            # keeps it, so the replica would go on diverged.
            fs = pair.destination.fs
            log.warning(
                "%s: rollback=yes: rolling %s back to %s, destroying %s",
                pair.name, fs, common.name, ", ".join(s.name for s in newer),
            )  # fmt: skip
            if feats.destination.holds:  # the pair's own hold would make the rollback fail
                self._move_holds(pair, dst, newer, keep="")
            dst.run(zfs.rollback(f"{fs}@{common.name}"))
            dsnaps = dsnaps[: dsnaps.index(common) + 1]
        if "#" in source_base:
            log.warning(
                "%s: the source no longer has %s@%s; sending from its bookmark %s",
                pair.name, pair.source.fs, common.name, source_base,
            )  # fmt: skip
        with clock("snapshot"):
            snap = self._new_snapshot(pair, src, ssnaps)
            if feats.hold_source:
                self._hold(pair, src, f"{pair.source.fs}@{snap}")
        target = f"{pair.source.fs}@{snap}"
        raw, intermediate = pair.options.raw, pair.options.intermediate
        send = zfs.send(target, source_base, intermediate, raw=raw)
        estimate = zfs.send(target, source_base, intermediate, raw=raw, estimate=True)
        recv = zfs.recv(pair.destination.fs, force=pair.options.rollback, resumable=feats.resume)
        with clock("stream"):
            stream = self._transfer(
                pair, src, dst, feats, status, send, recv, snap, estimate, base=common.name
            )
        receiver = stream.stages[-1] if stream.stages else None
        if receiver is not None and receiver.ended is not None and stream.ended:
            clock.add({"receive": max(0.0, receiver.ended - stream.ended)})
        with clock("record"):
            self._record(pair, dst, snap, first=False)
            self._move_dest_holds(pair, dst, feats, dsnaps, snap, common.name)
            if feats.source.holds:
                keep = snap if feats.hold_source else ""
                self._move_holds(pair, src, ssnaps, keep=keep, base=common.name)
            if feats.bookmark:
                self._bookmark(pair, src, snap, marks)
        listing = ([s.name for s in ssnaps] + [snap], [s.name for s in dsnaps] + [snap], snap)
        with clock("prune"):
            report.destroyed = self._prune(pair, src, dst, dry_run=False, listing=listing)
        return snap, common, stream

    def purge(self, pair: Pair, dry_run: bool = False, release: bool = False) -> list[PurgeStep]:
        """Destroy obsolete zettabee snapshots and bookmarks on both sides, never the
        newest common snapshot, and release the pair's holds that no longer protect a
        base. ``release`` also lets go of the base itself (a pair being retired)."""
        if dry_run:
            src = self.hosts.get(pair.source, pair)
            dst = self.hosts.get(pair.destination, pair)
            feats = self.hosts.features(pair, src, dst)
            return self._purge(pair, src, dst, feats, dry_run=True, release=release)
        with self._run(pair, "purge") as status:
            src = self.hosts.get(pair.source, pair)
            dst = self.hosts.get(pair.destination, pair)
            feats = self._features(pair, src, dst, status)
            return self._purge(pair, src, dst, feats, dry_run=False, release=release)

    def _purge(
        self, pair: Pair, src: Host, dst: Host, feats: PairFeatures, dry_run: bool, release: bool
    ) -> list[PurgeStep]:
        view = self._dest_view(pair, dst, feats.destination)
        if view is None:
            raise StateError(f"{pair.name}: not initialized; nothing to purge")
        dsnaps = view[1]
        ssnaps, marks = self._source_view(pair, src, feats)
        common = zfs.common_snapshot(ssnaps, dsnaps)
        base = common.name if common else ""
        keep = "" if release else base
        tag = hold_tag(pair.fingerprint)
        steps = []
        for host, snaps in ((src, ssnaps), (dst, dsnaps)):
            for snap in self._held(pair, snaps, base):
                if snap.name != keep:
                    if dry_run or self._release(pair, host, snap.full):
                        steps.append(PurgeStep("release", f"{host.name}:{snap.full}", tag))
                        if not dry_run:
                            log.info("%s: %s", pair.name, steps[-1].describe(done=True))
        own = [m.name for m in marks if is_own_snapshot(m.name, pair.fingerprint)]
        for mark in self._old_bookmarks(pair, marks, own[-1] if own else ""):
            steps.append(PurgeStep("destroy", f"{src.name}:{mark.full}"))
            if not dry_run:
                destroy(src, mark.full)
                log.info("%s: %s", pair.name, steps[-1].describe(done=True))
        listing = (
            [s.name for s in ssnaps],
            [s.name for s in dsnaps],
            common.name if common else "",
        )
        doomed = self._prune(pair, src, dst, dry_run=dry_run, listing=listing)
        return steps + [PurgeStep("destroy", name) for name in doomed]

    # -- helpers -----------------------------------------------------------------------

    def _check_identity(
        self, pair: Pair, props: dict[str, str], dsnaps: list[zfs.Snapshot]
    ) -> bool:
        """Is the destination this pair's? True: it may be, by an initialize that was
        killed after its receive and before it recorded the pair (see :meth:`_adopt`)."""
        owner = zfs.user_prop(props.get(zfs.PROP_FINGERPRINT))
        if owner is None and any(is_own_snapshot(s.name, pair.fingerprint) for s in dsnaps):
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

    def _adopt(self, pair: Pair, dst: Host, common: zfs.Snapshot | None) -> None:
        """Record the pair on a destination its own initialize received but never marked.

        Safe only when the newest snapshot both sides share is one of this pair's (its
        name carries the fingerprint, its guid is the source's): then nobody else can
        have made it. The alternative, initialize --force, would send everything again."""
        fs = pair.destination.fs
        if common is None or not is_own_snapshot(common.name, pair.fingerprint):
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
        self._record(pair, dst, common.name, first=True)

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

    def _prune(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        dry_run: bool,
        listing: tuple[list[str], list[str], str] | None = None,
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
        return self._destroy_planned(pair, src, dst, src_doomed, dst_doomed)

    def _destroy_planned(
        self,
        pair: Pair,
        src: Host,
        dst: Host,
        src_doomed: list[str],
        dst_doomed: list[str],
    ) -> list[str]:
        sides = [(src, pair.source.fs, src_doomed), (dst, pair.destination.fs, dst_doomed)]
        # Both sides at once: each is a command that mostly waits, on the network or on ZFS.
        runs = [Background(functools.partial(self._destroy_and_say, pair, *side)) for side in sides]
        return [name for gone in wait_all(runs) for name in gone]

    @staticmethod
    def _destroy_and_say(pair: Pair, host: Host, fs: str, names: list[str]) -> list[str]:
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


def _dest_props(caps: Capabilities | None) -> list[str]:
    """What a destination's listing reads: its snapshots, the pair's record, and the
    resume token and hold counts where ``caps`` has them."""
    props = [*zfs.SNAPSHOT_PROPS, zfs.PROP_FINGERPRINT, zfs.PROP_LASTSNAP]
    if caps is not None and caps.resumable:
        props.append(zfs.PROP_RESUME_TOKEN)
    if caps is not None and caps.holds:
        props.append(zfs.PROP_USERREFS)
    return props


def _views_by_fs(
    names: list[str], text: str
) -> dict[str, tuple[dict[str, str], list[zfs.Snapshot]]]:
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
        views[fs] = (zfs.parse_get(own).get(fs, {}), zfs.parse_snapshots(fs, own))
    return views


# In a pair's status: its last update left the source as planned (see
# Replicator._update_in_one_round_trip), so the next one need not list it.
TIDY = "tidy"


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
            raise CommandError(
                result.argv, host.name, result.returncode, result.stderr, "zfs destroy"
            )
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


class Background(Generic[T]):
    """One call run in a thread, its outcome collected later with :meth:`result`.

    The thread carries its parent's name: a pair's log (``replicate``) keeps the lines of
    the threads that work for it."""

    def __init__(self, call: Callable[[], T]) -> None:
        self._call = call
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=threading.current_thread().name, daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set, since no error


def wait_all(calls: list[Background[T]]) -> list[T]:
    """Wait for every call, then raise the first failure: none is left running. What
    each returned, in order."""
    values, errors = [], []
    for call in calls:
        try:
            values.append(call.result())
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return values
