"""An update in one round trip: snapshot, send and listing as one command on the source.

A routine update sends from the destination's newest snapshot, which is still on the
source. Nothing has to be decided on this side between taking the new snapshot and
sending it, so the source runs one script: the snapshot, the send (its stdout is the
stream) and then, while ``zfs receive`` finishes here, the listing that pruning needs.
Its stderr reports each step: exit status, what the tool said, and the source's clock
for ``--debug`` timings. That saves the round trips of a step-by-step update, most of a
no-change update's cost.

A plain incremental stream needs no check of its base first: ``zfs receive`` refuses
one whose base is not the destination's newest snapshot (by guid), before it changes
anything. (Pairs with ``intermediate`` or ``rollback`` are checked first: see
:func:`update`.) When the update fails and the listing shows the base gone from the
source or replaced by another snapshot of the same name, the premise was wrong: the
update goes on step by step, which explains the situation properly. At worst the script
left a new snapshot on the source, which the prune of that step-by-step update takes.

A full send (``initialize``) uses the same script without a base.

Where the pair holds its snapshots, the script of an initialize holds the new one before
it sends it (step ``hold``).

Where the source estimates a stream's size (OpenZFS), the script runs the dry run
``zfs send -nvP`` with the send's own flags once the snapshot exists, its report on
stderr (step ``estimate``): this side reads it from there while the stream runs, so
``runstatus`` shows a percentage and an ETA. An estimate that fails never stops the
send. Where the receive is resumable, the caller keeps the resume bookkeeping around
the one round trip as around any stream (:mod:`zettabee.resume`).

What the source does once the new snapshot is safely on the destination (hold it,
release the hold on the old base, destroy that) waits in the same script. Until then
the old base, held, is the common snapshot; the new one needs its hold only once it is
the common snapshot too (unless a broken stream would leave a resume token that goes on
from it: then it is held before it is sent, step ``hold``). So the script reads one line from its stdin after the send,
and runs those commands only if it says ``received``, which this side writes once the
receive has succeeded. A run killed before that closes the connection, the script reads
the end of its input instead, and the old base stays, held. The steps after the stream
get :data:`relay.LINGER_LIMIT` seconds: one stuck on a busy pool (a destroy) is stopped,
and the run fails naming it (:func:`lingered_message`).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zettabee import relay, zfs
from zettabee.errors import CommandError, ZettabeeError
from zettabee.host import Host, SshHost

if TYPE_CHECKING:
    from zettabee.capabilities import PairFeatures
    from zettabee.pair import Pair

log = logging.getLogger(__name__)

STEP_MARK = "@@zettabee-step"
# The steps, in the order the script reports them.
# "base" comes first when the base is checked, "hold" after "snapshot" when an initialize
# holds its snapshot, "estimate" before "send" where the stream's size is estimated; the
# closing steps of an update (see script's then) after "send".
STEPS = ("start", "snapshot", "send", "listing", "listed")
# The line the script waits for before its commands that follow a received stream.
RECEIVED = "received"
# How the script's size estimate ends: its report goes to stderr, never into the stream.
ESTIMATE_END = " >&2; e=$?"

# Makes a stream's progress report, given the stream's estimated size (None: unknown).
ProgressFor = Callable[[int | None], relay.ProgressFn]


@dataclass
class Step:
    name: str
    status: int
    at: float | None  # seconds since the epoch on the source (with --debug)
    said: str = ""  # what its tools wrote on stderr; for "listed", the listing


@dataclass
class Report:
    """What the script said about each step, and what came after the last one (the ssh
    client's own complaint when the connection failed)."""

    steps: dict[str, Step] = field(default_factory=dict)
    trailer: str = ""

    def ok(self, name: str) -> bool:
        step = self.steps.get(name)
        return step is not None and step.status == 0

    def duration(self, first: str, last: str) -> float | None:
        a, b = self.steps.get(first), self.steps.get(last)
        if a is None or b is None or a.at is None or b.at is None:
            return None
        return max(0.0, b.at - a.at)

    def durations(self) -> dict[str, float]:
        """How long each step took on the source's clock, from the one before it (the
        steps the script reported with a time: with ``--debug``)."""
        names = [name for name in self.steps if name != "listed"]
        spans = {b: self.duration(a, b) for a, b in zip(names, names[1:], strict=False)}
        return {name: seconds for name, seconds in spans.items() if seconds is not None}


def script(
    fs: str,
    snap: str,
    send_argv: Sequence[str],
    clock: bool = False,
    base: zfs.Snapshot | None = None,
    hold: str | None = None,
    holds: bool = False,
    then: Sequence[tuple[str, Sequence[str]]] = (),
    listing: bool = True,
    estimate: Sequence[str] | None = None,
) -> str:
    """The remote command that snapshots ``fs@snap``, runs ``send_argv`` with its stream
    on stdout, and lists ``fs`` after it; with ``base``, it first checks that this
    snapshot is on ``fs`` with the same guid, and stops (step ``base``) if not; with
    ``hold``, it holds the new snapshot under that tag before sending it, and stops
    (step ``hold``) if it cannot. ``holds`` lists each snapshot's hold count too.
    ``then`` are the steps (name, argv) that run after a successful send once the line
    :data:`RECEIVED` arrives on stdin, each reported whatever the one before did, except
    after a step ``hold`` that failed: the new snapshot is not held, so the old base is
    left alone.
    Without ``listing`` the script lists only when the update did not go through: the
    caller knows the source from the runs before. ``estimate``, the send's dry run
    (``zfs send -nvP``), runs just before the send with its report on stderr (step
    ``estimate``); the send goes on whatever it said.

    After each step the script writes a line ``@@zettabee-step NAME STATUS [TIME]`` on
    stderr, after what the tool itself said there; the listing is written after its own
    line and closed by a ``listed`` line. Each command is quoted once, here, where it
    becomes the string SSH carries. The script needs a POSIX login shell, as every remote
    pipeline does, and forks nothing but the zfs commands: a fork costs the source a few
    milliseconds. ``clock`` adds the source's time to each line, for ``--debug`` (one
    ``date`` each).
    """
    now = ' "$(date +%s.%N 2>/dev/null)"' if clock else ""
    lines = [
        f'step() {{ printf \'\\n{STEP_MARK} %s %s %s\\n\' "$1" "$2"{now} >&2; }}',
        "step start 0",
    ]
    if base is not None:
        guid = shlex.join(zfs.get([f"{fs}@{base.name}"], ["guid"]))
        lines += [
            f"g=$({guid} 2>/dev/null)",
            f'[ "${{g##*\tguid\t}}" = {base.guid} ] || {{ step base 1; exit 3; }}',
        ]
    lines += [
        f"{shlex.join(zfs.snapshot(fs, snap))}; s=$?",
        "step snapshot $s",
        "[ $s = 0 ] || exit $s",
    ]
    if hold is not None:
        lines += [
            f"{shlex.join(zfs.hold(hold, f'{fs}@{snap}'))}; s=$?",
            "step hold $s",
            "[ $s = 0 ] || exit $s",
        ]
    if estimate is not None:
        lines += [f"{shlex.join(estimate)}{ESTIMATE_END}", "step estimate $e"]
    lines += [f"{shlex.join(send_argv)}; s=$?", "step send $s"]
    if then or not listing:
        lines.append(f'if [ $s = 0 ] && read -r r && [ "$r" = {RECEIVED} ]; then')
        gates = 0
        for i, (name, argv) in enumerate(then):
            lines += [f"{shlex.join(argv)}; r=$?", f"step {name} $r"]
            if name == "hold" and i < len(then) - 1:  # a hold alone gates nothing
                lines.append("if [ $r = 0 ]; then")
                gates += 1
        lines += ["fi"] * gates
        lines += [] if listing else ["exit 0"]
        lines.append("fi")
    return "\n".join(
        [
            *lines,
            f"o=$({shlex.join(zfs.list_snapshots(fs, holds=holds))}); l=$?",
            "step listing $l",
            "printf '%s\\n' \"$o\" >&2",
            "step listed 0",
            "exit $s",
        ]
    )


def parse(stderr: str) -> Report:
    """The steps :func:`script` reported, from its stderr. What a step's tools said is
    what came before its line; the listing is what ``listed`` closes."""
    head, *blocks = f"\n{stderr}".split(f"\n{STEP_MARK} ")  # the first line may start it
    report = Report()
    said = head
    for block in blocks:
        first, _, rest = block.partition("\n")
        parts = first.split()
        if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
            said += block
            continue
        try:
            at: float | None = float(parts[2]) if len(parts) > 2 else None
        except ValueError:  # a date without %N (BSD, busybox): no timings from there
            at = None
        report.steps[parts[0]] = Step(parts[0], int(parts[1]), at, said.strip("\n"))
        said = rest
    report.trailer = said.strip()
    return report


@dataclass
class Outcome:
    """A finished one-round-trip update: what the source held, and the stream."""

    source_snapshots: list[zfs.Snapshot] | None  # None: not listed (see Plan.listing)
    stream: relay.StreamResult
    timings: dict[str, float]
    then: dict[str, Step] = field(default_factory=dict)  # the steps after the receive


@dataclass(frozen=True)
class Plan:
    """What one round trip does: snapshot ``fs@snap``, send it with ``send`` (from
    ``base``; None for a full send, ``initialize``) into ``recv`` here.

    ``check_base`` checks the base on the source before anything else: a plain
    incremental stream (``-i``) from a missing or replaced base is refused by zfs
    receive before it changes anything, but a missing base makes zfs-fuse's ``send -I``
    write a replication header that ``receive -F`` takes as a stream, and ``-F`` would
    roll the destination back for nothing.

    ``hold`` holds the new snapshot on the source under that tag before it is sent; a
    hold that fails stops the update with zfs's words. ``holds`` lists the hold counts
    with the source's snapshots, for the caller to release what earlier runs left.
    ``then`` are the source's steps once the receive has succeeded (see :func:`script`):
    they start before the caller's ``on_received``, and the caller judges what they
    reported (:attr:`Outcome.then`). Without ``listing``, the source is listed only when
    the update fails (:attr:`Outcome.source_snapshots` is None then). ``estimate``, the
    send's dry run (``zfs send -nvP``), gives the stream's size before it starts."""

    fs: str
    base: zfs.Snapshot | None
    snap: str
    send: list[str]
    recv: list[str]
    check_base: bool = False
    hold: str | None = None
    holds: bool = False
    then: Sequence[tuple[str, Sequence[str]]] = ()
    listing: bool = True
    estimate: list[str] | None = None

    def script(self) -> str:
        checked = self.base if self.check_base else None
        return script(
            self.fs, self.snap, self.send, clock=debug_wanted(log), base=checked,
            hold=self.hold, holds=self.holds, then=self.then, listing=self.listing,
            estimate=self.estimate,
        )  # fmt: skip


def update(
    src: Host,
    dst: Host,
    plan: Plan,
    stall: int,
    progress: ProgressFor | None = None,
    on_received: Callable[[], None] | None = None,
) -> Outcome | None:
    """Run the update in one round trip; None when its premise failed (the caller goes
    on step by step): the snapshot failed, or the stream failed and the listing shows
    the base gone. A failing send or receive raises otherwise, as in
    :func:`transport.stream_via_processes`. ``on_received`` runs once both the send and
    the receive have succeeded, beside the source's listing. ``progress`` makes the
    stream's progress report, given its estimated size once the script said it."""
    started = time.monotonic()
    command = plan.script()
    if isinstance(src, SshHost):
        sender = relay.Stage("zfs send (over ssh)", src.name, src.stream_argv(command, stall))
    else:
        sender = relay.Stage("zfs send", src.name, ["sh", "-c", command])
    sender.feed = bool(plan.then) or not plan.listing
    sender.lingers = True  # its listing tells a base gone from a broken stream
    receiver = relay.Stage("zfs receive", dst.name, relay.remote_argv(dst, plan.recv, stall))
    through = False  # the stream went through: the send said it ended, the receive too

    def received() -> None:
        nonlocal through
        # The whole stream is in: a send that does not say it ended within the stall
        # limit is stuck (a zfs process stopped or hung on the source), never waited for.
        step = _await_step(sender, "send", timeout=stall or None)
        if step is None and sender.proc is not None and sender.proc.poll() is None:
            sender.overdue = float(stall)
            sender.kill()
        if step is None or step.status != 0:
            return
        through = True
        if sender.feed:
            relay.answer(sender, f"{RECEIVED}\n")
        if on_received is not None:
            on_received()

    meter = _progress(sender, progress, plan.estimate is not None) if progress else None
    piped = relay.relay_stages(sender, receiver, stall, meter, received)
    if sender.overdue:
        raise ZettabeeError(relay.overdue_message(sender))
    if sender.lingered:
        raise ZettabeeError(lingered_message(plan, sender, through))
    outcome = _judge(src, plan, sender, receiver, piped)
    if outcome is not None:
        outcome.stream.seconds = time.monotonic() - started
    return outcome


def lingered_message(plan: Plan, sender: relay.Stage, through: bool) -> str:
    """What a run says of a script stopped in its steps after the stream (``lingered``):
    the step it had not reported, in the order the script runs them (``through``: the
    stream went through, and a fed script heard it and ran the plan's steps after it)."""
    reported = parse(sender.stderr).steps
    told = through and sender.feed
    steps = [*plan.then] if told else []
    if plan.listing or not told:
        steps.append(("listing", zfs.list_snapshots(plan.fs, holds=plan.holds)))
    stuck = next((argv for name, argv in steps if name not in reported), None)
    host, limit = sender.host, sender.lingered
    what = " ".join(stuck[:2]) if stuck else "the update's script"
    command = f" ({shlex.join(stuck)})" if stuck else ""
    return (
        f"{what} on {host}{command} did not end within {limit:.0f} s, the limit of the "
        "update's steps on the source after its stream; it was stopped."
        + (" The replica has the new snapshot." if through else "")
        + f" Look on {host} for a zfs process that is stopped or hung (ps -o pid,stat,cmd "
        "-C zfs) and for a busy or suspended pool (zpool status)."
    )


def _judge(
    src: Host, plan: Plan, sender: relay.Stage, receiver: relay.Stage, piped: relay.Relay
) -> Outcome | None:
    """What the script and the receiver said: None (step by step), an error, or the
    outcome."""
    fs, base = plan.fs, plan.base
    report = parse(sender.stderr)
    listed = report.steps.get("listed")
    listed_snapshots = (
        zfs.parse_snapshots(fs, listed.said) if report.ok("listing") and listed else []
    )
    stages = [sender, receiver]
    failed = any(s.failed for s in stages) or piped.stalled or piped.error
    premise_failed = base is not None and not _has(listed_snapshots, base) and report.ok("listing")
    if not report.ok("snapshot") or (failed and premise_failed):
        log.debug("%s: no update in one round trip (%s): step by step", fs, _why(src, base, report))
        return None
    held = report.steps.get("hold")
    if plan.hold is not None and held is not None and held.status != 0:
        argv = zfs.hold(plan.hold, f"{fs}@{plan.snap}")
        raise CommandError(argv, src.name, held.status, held.said, "zfs hold")
    send = report.steps.get("send")
    sender.stderr = "\n".join(x for x in (send.said if send else "", report.trailer) if x)
    if send is not None and send.status == 128 + signal.SIGPIPE:
        # Its zfs send died of the broken pipe: the victim of a receive that left, as
        # a send that ssh carries alone would be; the script's status says so here.
        sender.returncode = -signal.SIGPIPE
    if send is None and isinstance(src, SshHost):
        relay.name_ssh_failure(sender)
    if failed:
        raise relay.describe_failure(stages, piped)
    source: list[zfs.Snapshot] | None = listed_snapshots
    if not plan.listing and "listing" not in report.steps:
        source = None
    elif not report.ok("listing"):  # the update is done; only the leftovers' prune waits
        step = report.steps.get("listing")
        said = (step.said if step else report.trailer) or "no answer"
        log.warning("%s: listing %s on %s after the send failed: %s", fs, fs, src.name, said)
    measured = report.durations()
    if receiver.ended is not None:
        measured["receive"] = max(0.0, receiver.ended - piped.ended)
    stream = relay.StreamResult(piped.count, 0.0, stages, piped.ended)
    after = {name: report.steps[name] for name, _argv in plan.then if name in report.steps}
    return Outcome(source, stream, measured, after)


def _progress(sender: relay.Stage, progress_for: ProgressFor, estimated: bool) -> relay.ProgressFn:
    """The progress report of the script's stream: with the stream's size once its
    step ``estimate`` has said it (read from the sender's stderr as it runs)."""
    current = progress_for(None)
    if not estimated:
        return current
    waiting = True  # for the step

    def report(count: int, elapsed: float) -> None:
        nonlocal current, waiting
        step = _reported(sender, "estimate") if waiting else None
        if step is not None:
            waiting = False
            total = zfs.parse_estimate(step.said) if step.status == 0 else None
            log.debug("estimated stream size %s", total)
            if total:
                current = progress_for(total)
        current(count, elapsed)

    return report


def _reported(stage: relay.Stage, name: str) -> Step | None:
    """The step ``name`` if the running script has reported it so far: its stderr is a
    file this process can read while the script writes it."""
    errfile = stage.errfile
    if errfile is None:
        return None
    try:
        text = os.pread(errfile.fileno(), 1 << 20, 0).decode(errors="replace")
    except (OSError, ValueError):  # closed once the stage finished
        return None
    return parse(text).steps.get(name)


def _await_step(stage: relay.Stage, name: str, timeout: float | None = None) -> Step | None:
    """The step ``name`` as soon as the running script has reported it (None if it ends
    without, or has not said it within ``timeout`` seconds)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        ended = stage.proc is not None and stage.proc.poll() is not None
        if stage.errfile is not None:
            step = _reported(stage, name)
            if step is not None or ended:
                return step
        if ended or stage.errfile is None:
            return None
        time.sleep(0.002)
    return None


def _has(snapshots: list[zfs.Snapshot], wanted: zfs.Snapshot) -> bool:
    return any(s.name == wanted.name and s.guid == wanted.guid for s in snapshots)


def debug_wanted(logger: logging.Logger) -> bool:
    """Will a debug line be written anywhere? zettabee's loggers pass everything and
    their handlers choose, so the logger's own level does not say."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(handler.level <= logging.DEBUG for handler in current.handlers):
            return logger.isEnabledFor(logging.DEBUG)
        current = current.parent if current.propagate else None
    return False


def _why(src: Host, base: zfs.Snapshot | None, report: Report) -> str:
    if "base" in report.steps and base is not None:
        return f"{base.name} with guid {base.guid} is not on {src.name}"
    step = report.steps.get("snapshot")
    if step is None:
        return f"the command on {src.name} did not start: {report.trailer or 'no output'}"
    if step.status != 0:
        return f"snapshot on {src.name} failed: {step.said.strip() or f'exit {step.status}'}"
    if base is not None:
        return f"{base.name} with guid {base.guid} is not on {src.name}"
    return "the send failed"


def needs_steps(
    pair: Pair,
    src: Host,
    dst: Host,
    feats: PairFeatures,
    token: str | None,
    adopt: bool = False,
    streams: tuple[str, ...] = ("ssh",),
) -> str:
    """Why this run cannot go in one round trip, or "".

    It saves round trips to a remote source whose stream comes here over ssh, and it
    takes the new snapshot's hold in its script and moves the holds after the
    receive; its script estimates the stream's size too, and the caller keeps a
    resumable receive's bookkeeping around it. What needs a step of its own around
    the stream goes step by step: a resume token to go on with, a bookmark, the
    adoption of a destination that an interrupted initialize received; so do a remote
    destination and the transports other than ``streams``. The mbuffer pipeline
    (initialize takes its snapshot in its command too) has no place for an estimate
    or the resume bookkeeping."""
    piped = pair.options.transport != "ssh"
    reasons = [
        (pair.options.transport not in streams, f"transport={pair.options.transport}"),
        (not isinstance(src, SshHost), "the source is on this host"),
        (not dst.is_local, "the destination is remote"),
        (bool(token), "a resume token is pending"),
        (piped and feats.estimate, "size estimate"),
        (piped and feats.resume, "resumable receive"),
        (feats.bookmark, "bookmarks"),
        (adopt, "an interrupted initialize to adopt"),
    ]
    return ", ".join(why for applies, why in reasons if applies)
