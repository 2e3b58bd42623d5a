"""An update in one round trip: listing, snapshot and send as one command on the source.

A routine update finds the destination's newest snapshot still on the source. Then the
source's listing, the check that this snapshot is the same one there (by guid), the new
snapshot and the incremental send need no decision from this side in between, so they
run as one script whose stdout is the stream and whose stderr reports each step: its exit
status, when it ended (the source's clock, for ``--debug`` timings), and the listing that
pruning needs afterwards. On loopback that saves three round trips of a step-by-step
update, most of a no-change update's cost.

When the premise fails (the snapshot is gone from the source, or is another one under the
same name; the listing or the snapshot fails) the script stops before it sends anything,
and the update goes on step by step, which explains the situation properly. Nothing was
received, and at worst a new snapshot was left on the source for the next prune.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from zettabee import transport, zfs
from zettabee.host import Host, SshHost

log = logging.getLogger(__name__)

STEP_MARK = "@@zettabee-step"
# The order of the steps; "base" appears only when the premise failed.
STEPS = ("start", "listing", "listed", "base", "snapshot", "send")


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


def script(
    fs: str, base: zfs.Snapshot, snap: str, send_argv: Sequence[str], clock: bool = False
) -> str:
    """The remote command that lists ``fs``, checks that ``base`` is on it with the same
    guid, snapshots ``fs@snap`` and runs ``send_argv`` with its stream on stdout.

    After each step the script writes a line ``@@zettabee-step NAME STATUS [TIME]`` on
    stderr, after what the tool itself said there; the listing is written after its own
    line and closed by a ``listed`` line. Each command is quoted once, here, where it
    becomes the string SSH carries. The script needs a POSIX login shell, as every remote
    pipeline does, and forks nothing but the zfs commands: a fork costs the source a few
    milliseconds. ``clock`` adds the source's time to each line, for ``--debug`` (one
    ``date`` each).
    """
    expected = f"\n{fs}@{base.name}\tguid\t{base.guid}\n"
    now = ' "$(date +%s.%N 2>/dev/null)"' if clock else ""
    return "\n".join(
        [
            f'step() {{ printf \'\\n{STEP_MARK} %s %s %s\\n\' "$1" "$2"{now} >&2; }}',
            "step start 0",
            f"o=$({shlex.join(zfs.list_snapshots(fs))}); s=$?",
            "step listing $s",
            "[ $s = 0 ] || exit $s",
            "printf '%s\\n' \"$o\" >&2",
            "step listed 0",
            f"e={shlex.quote(expected)}",
            "n='\n'",
            'case "$n$o$n" in *"$e"*) ;; *) step base 1; exit 3 ;; esac',
            f"{shlex.join(zfs.snapshot(fs, snap))}; s=$?",
            "step snapshot $s",
            "[ $s = 0 ] || exit $s",
            f"{shlex.join(send_argv)}; s=$?",
            "step send $s",
            "exit $s",
        ]
    )


def parse(stderr: str) -> Report:
    """The steps :func:`script` reported, from its stderr. What a step's tools said is
    what came before its line; the listing is what ``listed`` closes."""
    head, *blocks = stderr.split(f"\n{STEP_MARK} ")
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

    source_snapshots: list[zfs.Snapshot]
    stream: transport.StreamResult
    timings: dict[str, float]


def update(
    src: Host,
    dst: Host,
    fs: str,
    base: zfs.Snapshot,
    snap: str,
    send_argv: list[str],
    recv_argv: list[str],
    stall: int,
    progress: transport.ProgressFn | None = None,
) -> Outcome | None:
    """Run the update in one round trip; None when its premise failed before anything
    was sent (the caller goes on step by step). A failing send or receive raises, as in
    :func:`transport.stream_via_processes`."""
    started = time.monotonic()
    command = script(fs, base, snap, send_argv, clock=debug_wanted(log))
    if isinstance(src, SshHost):
        sender = transport.Stage("zfs send (over ssh)", src.name, src.stream_argv(command, stall))
    else:
        sender = transport.Stage("zfs send", src.name, ["sh", "-c", command])
    receiver = transport.Stage(
        "zfs receive", dst.name, transport.remote_argv(dst, recv_argv, stall)
    )
    relay = transport.relay_stages(sender, receiver, stall, progress)
    report = parse(sender.stderr)
    if not report.ok("snapshot"):
        log.debug("%s: no update in one round trip (%s): step by step", fs, _why(src, base, report))
        return None
    send = report.steps.get("send")
    sender.stderr = "\n".join(x for x in (send.said if send else "", report.trailer) if x)
    if send is None and sender.returncode == 255 and isinstance(src, SshHost):
        sender.label = "ssh"
    stages = [sender, receiver]
    if any(s.failed for s in stages) or relay.stalled or relay.error:
        raise transport.describe_failure(stages, relay)
    timings = {
        "listing": report.duration("start", "listing"),
        "snapshot": report.duration("listed", "snapshot"),
        "send": report.duration("snapshot", "send"),
    }
    measured = {part: seconds for part, seconds in timings.items() if seconds is not None}
    if receiver.ended is not None:
        measured["receive"] = max(0.0, receiver.ended - relay.ended)
    stream = transport.StreamResult(relay.count, time.monotonic() - started, stages, relay.ended)
    return Outcome(zfs.parse_snapshots(fs, report.steps["listed"].said), stream, measured)


def debug_wanted(logger: logging.Logger) -> bool:
    """Will a debug line be written anywhere? zettabee's loggers pass everything and
    their handlers choose, so the logger's own level does not say."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(handler.level <= logging.DEBUG for handler in current.handlers):
            return logger.isEnabledFor(logging.DEBUG)
        current = current.parent if current.propagate else None
    return False


def _why(src: Host, base: zfs.Snapshot, report: Report) -> str:
    if "base" in report.steps:
        return f"{base.name} with guid {base.guid} is not on {src.name}"
    for name in ("listing", "snapshot"):
        step = report.steps.get(name)
        if step is not None and step.status != 0:
            return f"{name} on {src.name} failed: {step.said.strip() or f'exit {step.status}'}"
    return f"the command on {src.name} did not start: {report.trailer or 'no output'}"
