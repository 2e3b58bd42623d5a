"""A resumable receive: the note in the pair's status before its stream, what a broken
one keeps, going on from a resume token; and one stream with its size estimated first."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from zettabee import divergence, zfs
from zettabee.errors import CommandError, TransportError, ZettabeeError
from zettabee.host import Host
from zettabee.pair import Pair
from zettabee.relay import StreamResult
from zettabee.run import PairRun
from zettabee.units import format_bytes
from zettabee.views import dest_view

log = logging.getLogger(__name__)


def abort_receive(run: PairRun, why: str) -> None:
    fs = run.pair.destination.fs
    log.warning("%s: %s; discarding the partial receive (zfs receive -A %s)", run.name, why, fs)
    run.dst.run(zfs.recv_abort(fs))
    run.status.extra.pop("resume", None)
    run.write_status()


def note_transfer(run: PairRun, target: str, kept: int = 0) -> dict[str, Any]:
    """Record in the status, before the stream starts, that the receive is resumable:
    a run killed in the middle leaves a token, and status and the runtime check say so."""
    status = run.status
    entry = status.extra.get("resume")
    if not isinstance(entry, dict) or entry.get("snapshot") != target:
        entry = {"snapshot": target, "since": time.time(), "runs": 0}
    entry["runs"] = int(entry.get("runs", 0)) + 1
    entry["kept"] = max(int(entry.get("kept", 0)), kept)
    status.extra["resume"] = entry
    run.write_status()
    return entry


def kept_after_failure(run: PairRun, entry: dict[str, Any], failure: str = "") -> str:
    """After a resumable stream failed: is there a token? Say what the next run does.

    A receive that ran out of space keeps no partial state: resuming it would need room
    for the whole stream it began, changed data and all, and fail again every run."""
    fs, dst = run.pair.destination.fs, run.dst
    if "out of space" in failure:
        with contextlib.suppress(ZettabeeError):
            abort_receive(run, "the destination pool is full")
            return (
                f"; the partial receive was discarded (zfs receive -A {fs}), so the next "
                "update sends again from the common snapshot: make room on the pool first"
            )
    try:
        result = dst.run(zfs.get([fs], [zfs.PROP_RESUME_TOKEN]), check=False)
    except ZettabeeError:
        return ""
    value = (
        zfs.parse_get(result.stdout).get(fs, {}).get(zfs.PROP_RESUME_TOKEN) if result.ok else None
    )
    if not zfs.resume_token(value):
        run.status.extra.pop("resume", None)
        return ""
    progress = run.engine.store.read_progress(run.pair.fingerprint) or {}
    entry["kept"] = int(entry.get("kept", 0)) + int(progress.get("bytes", 0))
    entry["token"] = True
    run.status.extra["resume"] = entry
    return (
        f"; the receive is resumable: about {format_bytes(entry['kept'])} of "
        f"{entry['snapshot']} are kept on {dst.name}, and the next update resumes from there"
    )


def transfer(
    run: PairRun,
    send: list[str],
    recv: list[str],
    target: str,
    estimate_argv: list[str] | None,
    base: str | None = None,
) -> StreamResult:
    """One stream, with its size estimated first where the source can, and the
    resume bookkeeping around it where the receive is resumable."""
    feats = run.feats
    total = estimate(run.pair, run.src, estimate_argv) if estimate_argv and feats.estimate else None
    entry = note_transfer(run, target) if feats.resume else None
    try:
        stream = run.stream(send, recv, total)
    except (CommandError, TransportError) as exc:
        raise failed(run, entry, exc, base) from exc
    run.status.extra.pop("resume", None)
    return stream


def failed(
    run: PairRun,
    entry: dict[str, Any] | None,
    exc: CommandError | TransportError,
    base: str | None = None,
) -> ZettabeeError:
    """The error a failed stream ends its run with, as the destination explains it; for
    a resumable receive (``entry``, its note), what it kept and what the next run does."""
    error = divergence.explain_receive(run.pair, exc, base)
    if entry is not None:
        note = kept_after_failure(run, entry, str(error))
        if note:
            error.args = (f"{error}{note}",)
    return error


def estimate(pair: Pair, src: Host, argv: list[str]) -> int | None:
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


def resume(run: PairRun, token: str, force: bool = False) -> tuple[str, StreamResult] | None:
    """Go on with an interrupted receive from its token.

    Returns the snapshot received and the stream that finished it, or None when the
    token no longer applies: then it is cleared, and the caller goes on as if there had
    been none. ``zfs send -nvP -t`` checks the token first where it can (and says what
    it names and how much is left); a token that ``send -t`` itself refuses is cleared
    the same way."""
    checked = _check_token(run, token)
    if checked is None:
        return None
    toname, kept, total = checked
    resumed = str(run.status.extra.get("resume", {}).get("snapshot", ""))
    target = toname.partition("@")[2] or resumed
    log.info(
        "%s: resuming the interrupted receive of %s (%s already on %s)",
        run.name, target or "?", format_bytes(kept), run.dst.name,
    )  # fmt: skip
    entry = note_transfer(run, target or "?", kept)
    volume = run.view is not None and run.view.volume
    recv = run.receive_argv(volume, force=force, resumable=True)
    try:
        stream = run.stream(zfs.send_resume(token), recv, total)
    except (CommandError, TransportError) as exc:
        if (
            isinstance(exc, CommandError)
            and exc.stage.startswith("zfs send")
            and zfs.stale_token(exc.stderr)
        ):
            abort_receive(run, f"the resume token no longer applies ({exc.stderr})")
            return None
        error = divergence.explain_receive(run.pair, exc)
        error.args = (f"{error}{kept_after_failure(run, entry, str(error))}",)
        raise error from exc
    run.status.extra.pop("resume", None)
    run.write_status()
    if not target:
        view = dest_view(run.pair, run.dst)
        target = view.snapshots[-1].name if view and view.snapshots else ""
    log.info(
        "%s: resumed receive of %s completed, %s more in %.1fs",
        run.name, target, format_bytes(stream.bytes), stream.seconds,
    )  # fmt: skip
    return (target, stream) if target else None


def _check_token(run: PairRun, token: str) -> tuple[str, int, int | None] | None:
    """What the token names, what is kept and what is left (``send -nvP -t``, where the
    source estimates); None when the source says the token no longer applies."""
    if not run.feats.estimate:
        return "", 0, None
    result = run.src.run(zfs.send_resume(token, estimate=True), check=False)
    said = result.stdout + "\n" + result.stderr
    if not result.ok:
        if zfs.stale_token(result.stderr):
            why = f"the resume token no longer applies ({result.stderr.strip()})"
            abort_receive(run, why)
            return None
        raise result.error("zfs send")
    fields = zfs.parse_resume_contents(said)
    return (
        fields.get("toname", ""),
        zfs.hex_or_int(fields.get("bytes")) or 0,
        zfs.parse_estimate(said),
    )
