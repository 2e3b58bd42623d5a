"""update: the incremental transfer from the newest snapshot both sides share.

The routine update goes in one round trip (:mod:`zettabee.fastpath`); what needs a step
of its own around the stream goes step by step. Both end the same way once the receive
succeeded: :func:`received` records the new snapshot, moves the destination's holds
to it and destroys the destination's surplus.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from zettabee import divergence, fastpath, resume, snapshots, zfs
from zettabee.errors import CommandError, StateError, TransportError, ZettabeeError
from zettabee.pair import tag_of
from zettabee.relay import StreamResult
from zettabee.run import TIDY, PairRun, RunReport
from zettabee.threads import Background
from zettabee.views import dest_view, source_view

log = logging.getLogger(__name__)


def update(run: PairRun) -> RunReport:
    pair, report, status = run.pair, run.report, run.status
    if run.view is None:
        raise StateError(
            f"{pair.name}: not initialized (the destination {pair.destination} does not "
            "exist); run `zettabee initialize` first"
        )
    props, dsnaps = run.view
    adopt = divergence.check_identity(pair, props, dsnaps)
    token = zfs.resume_token(props.get(zfs.PROP_RESUME_TOKEN))
    done = None
    needs = fastpath.needs_steps(pair, run.src, run.dst, run.feats, token, adopt)
    if needs:
        log.debug("%s: update step by step (%s)", pair.name, needs)
    else:
        # The run before left the source as planned: this one need not list it.
        done = in_one_round_trip(run, dsnaps, listing=not run.tidy_before)
    if done is None:
        done = step_by_step(run, props, dsnaps, adopt)
    snap, common, stream = done
    report.snapshot, report.base = snap, common.name
    report.bytes += stream.bytes  # after what a resume moved, if anything
    report.seconds += stream.seconds
    status.snapshot, status.bytes, status.seconds = snap, report.bytes, report.seconds
    log.info(
        "%s: updated %s -> %s, %d bytes in %.1fs",
        pair.name, report.base, report.snapshot, report.bytes, report.seconds,
    )  # fmt: skip
    log.debug("%s: timings %s", pair.name, run.clock)
    return report


def received(run: PairRun, snap: str, dsnaps: list[zfs.Snapshot]) -> list[str]:
    """The receive of ``snap`` succeeded: record it and hold it (releasing the earlier
    holds) at once, then destroy the destination's surplus. Only then: until the new
    snapshot is recorded, the recorded one is what a killed run leaves for status, the
    checks and the next run; and a snapshot still held cannot go."""
    pair, clock = run.pair, run.clock
    with clock("prune"):
        holds = Background(functools.partial(move_dest_holds, run, dsnaps, snap))
        try:
            with clock("record"):
                snapshots.record(pair, run.dst, snap, first=False)
        finally:
            holds.result()
        names = [s.name for s in dsnaps] + [snap]
        doomed = snapshots.plan_prune(run.replica, [], names, snap, pair.options.keep)[1]
        return snapshots.destroy_and_say(pair, run.dst, pair.destination.fs, doomed)


def move_dest_holds(run: PairRun, dsnaps: list[zfs.Snapshot], snap: str) -> None:
    """Hold the snapshot just received, then let go of the earlier holds. Where the
    host has holds, earlier ones go even when the pair stopped using them (hold=no):
    a forgotten hold would pin its snapshot for good."""
    pair, feats = run.pair, run.feats
    if feats.hold_destination:
        snapshots.hold(pair, run.dst, f"{pair.destination.fs}@{snap}")
    if feats.destination.holds:
        keep = snap if feats.hold_destination else ""
        owns = run.replica.on_destination
        snapshots.move_holds(pair, run.dst, dsnaps, owns, keep=keep)


# -- in one round trip ---------------------------------------------------------------


def in_one_round_trip(
    run: PairRun, dsnaps: list[zfs.Snapshot], listing: bool = True
) -> tuple[str, zfs.Snapshot, StreamResult] | None:
    """The routine update (see :mod:`fastpath`); None when it does not apply.

    Once both the send and the receive have succeeded, the new snapshot is the
    common one: the script holds it on the source (a resumable one is held before
    it is sent: see :func:`_plan`), releases the pair's hold on the old base and
    destroys that, while here :func:`received` does its part. What the
    source's listing adds (rare: leftovers of killed runs) goes after; a failed run's
    new snapshot goes at once (:func:`discard_new`).

    Without ``listing`` (the run before left the source tidy), the source is listed
    only if the update fails. A run that found and left the source as planned says
    so in the status, for the next one (:data:`TIDY`)."""
    if not dsnaps:
        return None
    pair, base = run.pair, dsnaps[-1]
    snap = snapshots.fresh_name(run.replica, {base.name})
    plan = _plan(run, base, snap, listing)
    early = [base.name] if run.replica.on_source(base.name) else []

    def on_received() -> None:
        run.report.destroyed.extend(received(run, snap, dsnaps))

    log.debug("%s: update in one round trip%s", pair.name, _folded(run))
    entry = resume.note_transfer(run, snap) if run.feats.resume else None
    with run.clock("stream"):
        try:
            outcome = fastpath.update(
                run.src, run.dst, plan, pair.options.stall, run.progress, on_received
            )
        except (CommandError, TransportError) as exc:
            error = resume.failed(run, entry, exc, base.name)
            discard_new(run, snap, exc, held=plan.hold is not None)
            raise error from exc
    run.status.extra.pop("resume", None)
    if outcome is None:
        return None
    run.clock.add(outcome.timings)
    log.info("%s: snapshot %s@%s", pair.name, pair.source.fs, snap)
    as_planned = all(step.status == 0 for step in outcome.then.values())
    run.report.destroyed.extend(source_base_gone(run, base.name, plan.then, outcome.then))
    if outcome.source_snapshots is not None:
        dest_names = [s.name for s in dsnaps] + [snap]
        none_left = source_leftovers(
            run, outcome.source_snapshots, base.name, snap, dest_names, early
        )
        as_planned = as_planned and none_left
    if as_planned:
        run.status.extra[TIDY] = True
    return snap, base, outcome.stream


def _folded(run: PairRun) -> str:
    """What the one round trip does of what a step-by-step update would do apart."""
    parts = [
        (run.feats.estimate, "a size estimate"),
        (run.feats.resume, "a resumable receive"),
        (run.feats.hold_source, "the source's hold"),
    ]
    done = [what for applies, what in parts if applies]
    return f", with {', '.join(done)}" if done else ""


def _plan(run: PairRun, base: zfs.Snapshot, snap: str, listing: bool) -> fastpath.Plan:
    """The script's send and receive, and its steps on the source once received: the
    new snapshot's hold, the old base's release and its destroy (if it is this
    replica's, or the pair's from before the replica id; each hold under the tag its
    snapshot's name gives).

    A resumable receive's snapshot is held before it is sent, as step by step: a stream
    that breaks leaves a resume token that goes on from it, and the hold keeps it for
    the next run. Otherwise its hold waits until it is the common snapshot."""
    pair, opts, feats = run.pair, run.pair.options, run.feats
    src_fs = pair.source.fs
    send = run.send_argv(f"{src_fs}@{snap}", f"{src_fs}@{base.name}")
    estimate = run.send_argv(f"{src_fs}@{snap}", f"{src_fs}@{base.name}", estimate=True)
    assert run.view is not None
    recv = run.receive_argv(run.view.volume, force=opts.rollback, resumable=feats.resume)
    tag = run.replica.tag if feats.hold_source else None
    first = tag if tag and feats.resume else None
    ours = run.replica.on_source(base.name)
    base_tag = tag_of(base.name) if ours else None
    then = []
    if tag and not first:
        then.append(("hold", zfs.hold(tag, f"{src_fs}@{snap}")))
    if tag and base_tag:
        then.append(("release", zfs.release(base_tag, f"{src_fs}@{base.name}")))
    if ours:
        then.append(("destroy", zfs.destroy(f"{src_fs}@{base.name}")))
    return fastpath.Plan(
        src_fs, base, snap, send, recv,
        check_base=opts.intermediate or opts.rollback, hold=first, holds=feats.source.holds,
        then=then, listing=listing, estimate=estimate if feats.estimate else None,
    )  # fmt: skip


def source_leftovers(
    run: PairRun,
    listed: list[zfs.Snapshot],
    base: str,
    snap: str,
    dest_names: list[str],
    gone: list[str],
) -> bool:
    """Release the holds and destroy the snapshots that failed runs left on the
    source, as its listing after the send shows them; True when there were none."""
    pair, feats, src, owns = run.pair, run.feats, run.src, run.replica.on_source
    rest = [s for s in listed if s.name != base]
    stray: list[zfs.Snapshot] = []
    if feats.source.holds:  # holds a failed run may have left
        keep = snap if feats.hold_source else ""
        stray = [s for s in snapshots.held(rest, owns) if s.name != keep]
        snapshots.move_holds(pair, src, rest, owns, keep=keep)
    source_names = [s.name for s in listed]
    planned = snapshots.plan_prune(run.replica, source_names, dest_names, snap, pair.options.keep)[
        0
    ]
    late = [n for n in planned if n not in gone]
    if late:
        run.report.destroyed.extend(snapshots.destroy_planned(pair, src, run.dst, late, []))
    return not stray and not late


def source_base_gone(
    run: PairRun,
    base: str,
    then: Sequence[tuple[str, Sequence[str]]],
    done: dict[str, fastpath.Step],
) -> list[str]:
    """Judge the script's hold of the new snapshot and its release and destroy of the
    old base on the source; what it could not do (a destroy that found the snapshot
    busy, a connection lost after the receive) is done here, step by step; a base
    that another tag's hold keeps stays. A hold that failed fails the update, the old
    base left held. The source's snapshots destroyed."""
    pair, src = run.pair, run.src
    target = f"{pair.source.fs}@{base}"
    planned = {name: list(argv) for name, argv in then}
    if "hold" in planned:
        held = done.get("hold")
        if held is None:
            snapshots.hold(pair, src, planned["hold"][-1])
        elif held.status != 0:
            raise CommandError(planned["hold"], src.name, held.status, held.said, "zfs hold")
    if "release" in planned:
        released = done.get("release")
        if released is None:
            snapshots.let_go(pair, src, target)
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
        snapshots.let_go(pair, src, target)  # held since hold=yes, say
        return snapshots.destroy_and_say(pair, src, pair.source.fs, [base])
    log.info("%s: destroyed %s:%s", pair.name, src.name, target)
    return [f"{src.name}:{target}"]


def discard_new(run: PairRun, snap: str, cause: ZettabeeError, held: bool) -> None:
    """After a failed update, its new snapshot on the source goes again (``held``: its
    hold first), so that failed runs, one after another, leave the source as the last
    good one left it; unless the destination has it after all (the receive went through
    and a later step failed) or a resume token there goes on from it, and then the next
    run needs it. Nothing else is touched: the base and older snapshots stay. A cleanup
    that fails is only said: the run's own error is the one that counts.

    When the link is what failed (``cause`` a :class:`TransportError`: a stall, a cut
    connection), the source is not asked again: over a dead or crawling link each command
    would wait out its own timeout, and the run would hang minutes past its stall limit.
    The snapshot stays for the next update that gets through, which destroys the pair's
    leftovers it lists."""
    pair, src = run.pair, run.src
    target = f"{pair.source.fs}@{snap}"
    if isinstance(cause, TransportError):
        log.info("%s: %s:%s kept: the link failed; the next update removes it",
                 pair.name, src.name, target)  # fmt: skip
        return
    try:
        view = dest_view(pair, run.dst, run.feats.destination)
    except ZettabeeError as exc:
        log.debug("%s: %s kept: the destination cannot be read (%s)", pair.name, target, exc)
        return
    if view is not None and snap in [s.name for s in view.snapshots]:
        return
    token = zfs.resume_token(view.props.get(zfs.PROP_RESUME_TOKEN)) if view else None
    if token and _resumes(token, target):
        log.info("%s: %s kept for the resumable receive of it", pair.name, target)
        return
    try:
        if held:
            snapshots.let_go(pair, src, target)
        snapshots.destroy(src, target)
    except ZettabeeError as exc:
        log.warning(
            "%s: the failed update's new snapshot %s:%s stays (%s); the next update that "
            "succeeds destroys it",
            pair.name, src.name, target, exc,
        )  # fmt: skip
        return
    log.info("%s: destroyed %s:%s, the failed update's new snapshot", pair.name, src.name, target)


def _resumes(token: str, target: str) -> bool:
    """Does the resume token go on with the send of ``target``? (Yes when it cannot be
    read: a snapshot kept for nothing goes with the next good run.)"""
    try:
        return zfs.decode_resume_token(token).get("toname") in (target, None)
    except ValueError:
        return True


# -- step by step --------------------------------------------------------------------


def step_by_step(
    run: PairRun, props: dict[str, str], dsnaps: list[zfs.Snapshot], adopt: bool = False
) -> tuple[str, zfs.Snapshot, StreamResult]:
    pair, feats, clock, src = run.pair, run.feats, run.clock, run.src
    with clock("listing"):
        ssnaps, marks = source_view(pair, src, feats)
    token = zfs.resume_token(props.get(zfs.PROP_RESUME_TOKEN))
    if token:
        dsnaps = _resume_first(run, token, dsnaps)
    found = zfs.common_base(ssnaps, marks, dsnaps)
    if adopt:
        noauto = feats.noauto(run.view is not None and run.view.volume)
        divergence.adopt(pair, run.dst, found[0] if found else None, noauto)
    if found is None:
        raise StateError(divergence.no_common_message(pair, ssnaps, dsnaps))
    common, source_base = found
    dsnaps = divergence.roll_back_newer(run, dsnaps, common)
    if "#" in source_base:
        log.warning(
            "%s: the source no longer has %s@%s; sending from its bookmark %s",
            pair.name, pair.source.fs, common.name, source_base,
        )  # fmt: skip
    with clock("snapshot"):
        snap = snapshots.new_snapshot(pair, run.replica, src, ssnaps)
    try:
        if feats.hold_source:
            with clock("snapshot"):
                snapshots.hold(pair, src, f"{pair.source.fs}@{snap}")
        stream = _send(run, snap, source_base, common.name)
    except ZettabeeError as exc:
        discard_new(run, snap, exc, held=feats.hold_source)
        raise
    run.report.destroyed = received(run, snap, dsnaps)
    with clock("record"):
        if feats.source.holds:
            keep = snap if feats.hold_source else ""
            snapshots.move_holds(pair, src, ssnaps, run.replica.on_source, keep=keep)
        if feats.bookmark:
            snapshots.bookmark(pair, run.replica, src, snap, marks)
    source_names = [s.name for s in ssnaps] + [snap]
    dest_names = [s.name for s in dsnaps] + [snap]
    with clock("prune"):
        doomed = snapshots.plan_prune(
            run.replica, source_names, dest_names, snap, pair.options.keep
        )[0]
        run.report.destroyed += snapshots.destroy_and_say(pair, src, pair.source.fs, doomed)
    return snap, common, stream


def _resume_first(run: PairRun, token: str, dsnaps: list[zfs.Snapshot]) -> list[zfs.Snapshot]:
    """A pending resume token: the interrupted receive goes on first (or, resume=no, is
    discarded); the destination's snapshots after it."""
    if not run.feats.resume:
        resume.abort_receive(run, "this pair does not resume (resume=no)")
        return dsnaps
    with run.clock("resume"):
        resumed = resume.resume(run, token, force=run.pair.options.rollback)
    if resumed is not None:
        snapshots.record(run.pair, run.dst, resumed[0], first=False)
        run.report.resumed = resumed[0]
        run.report.bytes, run.report.seconds = resumed[1].bytes, resumed[1].seconds
    view = dest_view(run.pair, run.dst, run.feats.destination)
    assert view is not None
    return view.snapshots


def _send(run: PairRun, snap: str, source_base: str, common: str) -> StreamResult:
    """The incremental stream from ``source_base`` (a snapshot or bookmark) to ``snap``."""
    pair, opts = run.pair, run.pair.options
    target = f"{pair.source.fs}@{snap}"
    send = run.send_argv(target, source_base)
    estimate = run.send_argv(target, source_base, estimate=True)
    assert run.view is not None
    recv = run.receive_argv(run.view.volume, force=opts.rollback, resumable=run.feats.resume)
    with run.clock("stream"):
        stream = resume.transfer(run, send, recv, snap, estimate, base=common)
    receiver = stream.stages[-1] if stream.stages else None
    if receiver is not None and receiver.ended is not None and stream.ended:
        run.clock.add({"receive": max(0.0, receiver.ended - stream.ended)})
    return stream
