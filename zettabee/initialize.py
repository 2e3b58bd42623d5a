"""initialize: the full transfer of the source into a destination that does not exist
yet, in one round trip (the snapshot taken in the stream's command), over mbuffer (the
snapshot in its sending command), or step by step; an interrupted one resumed."""

from __future__ import annotations

import functools
import logging

from zettabee import divergence, fastpath, resume, snapshots, zfs
from zettabee.errors import CommandError, StateError, TransportError
from zettabee.relay import StreamResult
from zettabee.run import PairRun, RunReport
from zettabee.threads import Background, wait_all
from zettabee.views import DestView, dest_view, source_view

log = logging.getLogger(__name__)


def initialize(run: PairRun, force: bool = False) -> RunReport:
    pair, feats, clock = run.pair, run.feats, run.clock
    view = run.view
    if view is not None and _interrupted(run, view, force):
        done = resume.resume(run, zfs.resume_token(view.props.get(zfs.PROP_RESUME_TOKEN)) or "")
        if done is not None:
            # The interrupted run may have died before its hold: held here.
            volume = _source_is_volume(run)
            return finish(run, *done, hold_source=feats.hold_source, volume=volume)
        view = dest_view(pair, run.dst, feats.destination)
    if view is not None:
        _destroy_for_force(run, view, force)
    done = None
    needs = fastpath.needs_steps(pair, run.src, run.dst, feats, None, streams=("ssh", "mbuffer"))
    if needs:
        log.debug("%s: initialize step by step (%s)", pair.name, needs)
    elif pair.options.transport == "mbuffer":
        done = over_mbuffer(run)
    else:
        done = in_one_round_trip(run)
    if done is not None:
        _report(run, done[0], done[1])
        log.debug("%s: timings %s", pair.name, clock)
        return run.report
    step_by_step(run)
    log.debug("%s: timings %s", pair.name, clock)
    return run.report


def _source_is_volume(run: PairRun) -> bool:
    """Is the source a volume? Asked only of a pair whose receive or record differs for
    a volume: one that sends the source's properties (PairFeatures.kept_local), a child
    received unmounted (a volume has no ``canmount``: PairFeatures.noauto)."""
    if not (run.feats.props or run.feats.unmounted):
        return False
    fs = run.pair.source.fs
    result = run.src.run(zfs.get([fs], ["type"]), check=False)
    if result.returncode != 0:
        raise result.error("zfs get")
    return zfs.parse_get(result.stdout).get(fs, {}).get("type") == "volume"


def _interrupted(run: PairRun, view: DestView, force: bool) -> bool:
    """Is the destination an initialize that was interrupted (its full stream goes on)?"""
    token = zfs.resume_token(view.props.get(zfs.PROP_RESUME_TOKEN))
    ours = zfs.user_prop(view.props.get(zfs.PROP_FINGERPRINT))
    if not (token and ours is None and not view.snapshots and not force):
        return False
    if not run.feats.resume:
        fs = run.pair.destination.fs
        raise StateError(
            f"{run.name}: {fs} holds a partial receive, and this pair does not "
            f"resume (resume=no); `zfs receive -A {fs}` discards it"
        )
    return True


def _destroy_for_force(run: PairRun, view: DestView, force: bool) -> None:
    pair, fs = run.pair, run.pair.destination.fs
    if not force:
        raise StateError(
            f"{pair.name}: the destination {pair.destination} already exists; "
            "`zettabee update` continues a replica, and `initialize --force` "
            f"destroys {fs} with all its snapshots and descendants and starts over"
        )
    log.warning("%s: --force: destroying %s and everything below it", pair.name, fs)
    if run.feats.destination.holds:
        snapshots.move_holds(pair, run.dst, view.snapshots, run.replica.on_destination, keep="")
    snapshots.destroy(run.dst, fs, recursive=True)


def step_by_step(run: PairRun) -> None:
    """Snapshot (and hold), stream, record; also when the script's snapshot failed: the
    listing says why."""
    pair, feats, clock, src = run.pair, run.feats, run.clock, run.src
    with clock("listing"):
        ssnaps, _marks = source_view(pair, src, feats)
    with clock("snapshot"):
        snap = snapshots.new_snapshot(pair, run.replica, src, ssnaps)
        if feats.hold_source:
            snapshots.hold(pair, src, f"{pair.source.fs}@{snap}")
    send = run.send_argv(f"{pair.source.fs}@{snap}")
    estimate = run.send_argv(f"{pair.source.fs}@{snap}", estimate=True)
    volume = _source_is_volume(run)
    recv = run.receive_argv(volume, resumable=feats.resume)
    with clock("stream"):
        stream = resume.transfer(run, send, recv, snap, estimate)
    with clock("record"):
        finish(run, snap, stream, volume=volume)


def in_one_round_trip(run: PairRun) -> tuple[str, StreamResult] | None:
    """The snapshot is taken (and held) in the stream's command on the source, and
    the record (and the destination's hold) starts as soon as the receive succeeded;
    None when the snapshot failed (a name taken within the same second, a missing
    source: the caller looks first)."""
    pair, feats, clock, dst = run.pair, run.feats, run.clock, run.dst
    snap = snapshots.fresh_name(run.replica, ())
    target = f"{pair.source.fs}@{snap}"
    volume = _source_is_volume(run)
    plan = fastpath.Plan(
        pair.source.fs,
        None,
        snap,
        run.send_argv(target),
        run.receive_argv(volume, resumable=feats.resume),
        hold=run.replica.tag if feats.hold_source else None,
        estimate=run.send_argv(target, estimate=True) if feats.estimate else None,
    )

    def received() -> None:
        with clock("record"):
            snapshots.record(pair, dst, snap, first=True, noauto=run.feats.noauto(volume))
            if feats.hold_destination:
                snapshots.hold(pair, dst, f"{pair.destination.fs}@{snap}")

    entry = resume.note_transfer(run, snap) if feats.resume else None
    with clock("stream"):
        try:
            outcome = fastpath.update(
                run.src, dst, plan, pair.options.stall, run.progress, received
            )
        except (CommandError, TransportError) as exc:
            raise resume.failed(run, entry, exc) from exc
    run.status.extra.pop("resume", None)
    return (snap, outcome.stream) if outcome is not None else None


def over_mbuffer(run: PairRun) -> tuple[str, StreamResult] | None:
    """The snapshot is taken (and held) on the source by the command that sends it
    into mbuffer; the record and the destination's hold go together after it. None
    when the snapshot failed (the caller looks first, step by step)."""
    pair, feats, clock, dst = run.pair, run.feats, run.clock, run.dst
    snap = snapshots.fresh_name(run.replica, ())
    target = f"{pair.source.fs}@{snap}"
    first = [zfs.snapshot(pair.source.fs, snap)]
    if feats.hold_source:
        first.append(zfs.hold(run.replica.tag, target))
    send = run.send_argv(target)
    volume = _source_is_volume(run)
    recv = run.receive_argv(volume)
    with clock("stream"):
        try:
            stream = run.stream(send, recv, first=first)
        except CommandError as exc:
            if exc.stage == "zfs snapshot":
                log.debug("%s: snapshot on %s failed: step by step", pair.name, run.src.name)
                return None
            raise divergence.explain_receive(pair, exc) from exc
        except TransportError as exc:
            raise divergence.explain_receive(pair, exc) from exc
    with clock("record"):
        noauto = run.feats.noauto(volume)
        calls = [Background(functools.partial(snapshots.record, pair, dst, snap, True, noauto))]
        if feats.hold_destination:
            dst_snap = f"{pair.destination.fs}@{snap}"
            calls.append(Background(functools.partial(snapshots.hold, pair, dst, dst_snap)))
        wait_all(calls)
    return snap, stream


def finish(
    run: PairRun, snap: str, stream: StreamResult, hold_source: bool = False, volume: bool = False
) -> RunReport:
    """Record the pair and hold what it received. The source's snapshot was held
    before it travelled; ``hold_source`` holds it here (a resumed receive, whose run
    may have died before its hold)."""
    pair, feats, src, dst = run.pair, run.feats, run.src, run.dst
    snapshots.record(pair, dst, snap, first=True, noauto=run.feats.noauto(volume))
    if hold_source:
        snapshots.hold(pair, src, f"{pair.source.fs}@{snap}")
    if feats.hold_destination:
        snapshots.hold(pair, dst, f"{pair.destination.fs}@{snap}")
    if feats.bookmark:
        snapshots.bookmark(pair, run.replica, src, snap, [])
    _report(run, snap, stream)
    return run.report


def _report(run: PairRun, snap: str, stream: StreamResult) -> None:
    report, status = run.report, run.status
    report.snapshot, report.bytes, report.seconds = snap, stream.bytes, stream.seconds
    status.snapshot, status.bytes, status.seconds = snap, stream.bytes, stream.seconds
    log.info(
        "%s: initialized from %s@%s, %d bytes in %.1fs",
        run.name, run.pair.source.fs, snap, stream.bytes, stream.seconds,
    )  # fmt: skip
