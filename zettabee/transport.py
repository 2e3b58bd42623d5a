"""The data path: a ``zfs send`` stream carried into ``zfs receive``.

Where the stream passes through this machine, a relay splices it from the sending
process into the receiving one, counting bytes: that count gives progress, rate and ETA
for ``runstatus`` and feeds the stall watchdog, whatever carries the stream.

- ``ssh``: each remote end is an OpenSSH client (paramiko streams at a third of its
  speed, see DESIGN.md) running ``zfs send`` on the source and ``zfs receive`` on the
  destination; with both ends remote the stream is relayed through this machine;
- ``mbuffer``: the source pipes ``zfs send`` into ``mbuffer -O`` (started over the control
  connection) and ``mbuffer -I`` listens on the destination: here, feeding the relay, or
  on a remote destination, where its own status line is the byte count;
- ``local``: ``zfs send | zfs receive`` on one host: here through the relay, or on a
  remote host as one command, so the stream never crosses the network.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from zettabee.errors import StateError, TransportError
from zettabee.host import Host, SshHost
from zettabee.mbuffer import stream_via_mbuffer
from zettabee.pair import Pair
from zettabee.pipeline import STAGE_MARK, parse_pipeline_stderr, pipeline_script
from zettabee.relay import (
    ProgressFn,
    Stage,
    StderrMeter,
    StreamResult,
    describe_failure,
    finish_metered,
    finish_stages,
    name_ssh_failure,
    overdue_message,
    relay_stages,
    remote_argv,
    spawn,
)


def stream(
    pair: Pair,
    src: Host,
    dst: Host,
    send: list[str],
    recv: list[str],
    progress: ProgressFn | None,
    first: Sequence[Sequence[str]] = (),
) -> StreamResult:
    """The stream on the pair's transport; ``first`` (mbuffer only) runs on the source
    in the sending command, before the send."""
    opts = pair.options
    if opts.transport == "mbuffer":
        if not isinstance(src, SshHost):
            raise StateError(f"{pair.name}: transport=mbuffer needs a remote source host")
        # Into this host, the source connects back to where its SSH connection comes from.
        connect = opts.mbufferhost or (None if dst.is_local else pair.destination.host)
        return stream_via_mbuffer(
            src, dst, send, recv, opts.stall, opts.port, connect, opts.bwlimit, progress,
            first=first,
        )  # fmt: skip
    if opts.transport == "local":
        if not (src is dst or (src.is_local and dst.is_local)):
            raise StateError(
                f"{pair.name}: transport=local runs zfs send | zfs receive on one host, "
                f"but the source is on {pair.source.host} and the destination on "
                f"{pair.destination.host}; use transport=ssh or mbuffer"
            )
        if isinstance(src, SshHost):
            return stream_on_host(src, send, recv, opts.stall, progress)
    return stream_via_processes(src, dst, send, recv, opts.stall, progress)


def stream_via_processes(
    source: Host,
    dest: Host,
    send_argv: list[str],
    recv_argv: list[str],
    stall: int,
    progress: ProgressFn | None = None,
) -> StreamResult:
    """``ssh`` and ``local``: sender process -> relay -> receiver process."""
    started = time.monotonic()
    sender = Stage("zfs send", source.name, remote_argv(source, send_argv, stall))
    if not source.is_local:
        sender.label = "zfs send (over ssh)"
    receiver = Stage("zfs receive", dest.name, remote_argv(dest, recv_argv, stall))
    if not dest.is_local:
        receiver.label = "zfs receive (over ssh)"
    relay = relay_stages(sender, receiver, stall, progress)
    _classify_ssh(sender, source)
    _classify_ssh(receiver, dest)
    return finish_stages([sender, receiver], relay, started)


def dd_bytes(text: str) -> int | None:
    """The last byte count dd printed: ``N bytes ...`` starts its progress lines and its
    summary, in GNU and BSD dd alike."""
    found = re.findall(r"(?:^|[\r\n])([0-9]+) bytes", text)
    return int(found[-1]) if found else None


def stream_on_host(
    host: SshHost,
    send_argv: list[str],
    recv_argv: list[str],
    stall: int,
    progress: ProgressFn | None = None,
) -> StreamResult:
    """``local`` on a remote host: ``zfs send | dd | zfs receive`` runs there as one
    command through an OpenSSH client, and the stream never leaves that host.

    ``dd status=progress`` (GNU and FreeBSD dd) writes its count every second to the
    client's stderr: that is the progress here, and the write that fails when this side
    goes away is what stops the remote pipeline instead of leaving it running. That
    count is the stall watch too: a command whose count has not moved for ``stall``
    seconds (a zfs send stopped, a receive stuck committing) is stopped, never waited
    for without limit."""
    started = time.monotonic()
    count = ["dd", "bs=1048576", "status=progress"]
    script = pipeline_script([send_argv, count, recv_argv], live=1)
    runner = Stage("zfs send | zfs receive", host.name, host.stream_argv(script, stall))
    spawn(runner, None, None)
    meter = StderrMeter(runner, progress, dd_bytes)
    meter.start()
    finish_metered(runner, meter, stall)
    meter.stop()
    if runner.overdue:
        raise TransportError(stuck_on_host(runner, meter.count))
    stages = [
        Stage("zfs send", host.name, list(send_argv)),
        Stage("dd", host.name, count),
        Stage("zfs receive", host.name, list(recv_argv)),
    ]
    if STAGE_MARK not in runner.stderr:
        name_ssh_failure(runner)
        stages = [runner]
    else:
        codes, errs, head = parse_pipeline_stderr(runner.stderr, len(stages))
        errs[1] = head.replace("\r", "\n")
        for stage, code, err in zip(stages, codes, errs, strict=True):
            stage.returncode, stage.stderr = code, err
    ended = time.monotonic()
    result = StreamResult(meter.count, ended - started, stages, ended)
    if any(s.failed for s in stages):
        raise describe_failure(stages, None)
    return result


def stuck_on_host(runner: Stage, count: int) -> str:
    """What a run says of the one command of ``local`` on a remote host, stopped for a
    count that did not move: after the whole stream (dd's summary says it passed), the
    pipeline did not exit; before, no data came."""
    if "records out" not in runner.stderr:
        host, seconds = runner.host, runner.overdue
        after = f" after {count} bytes" if count else ""  # dd counts each second, or at its end
        return (
            f"{runner.label} on {host} made no progress for {seconds:.0f} s{after} "
            f"(stall={seconds:.0f}); it was stopped. The replica may hold the new snapshot "
            f"already: the next run records it. Look on {host} for a zfs process that is "
            "stopped or hung (ps -o pid,stat,cmd -C zfs) and for a busy or suspended pool "
            "(zpool status)."
        )
    return overdue_message(runner)


def _classify_ssh(stage: Stage, host: Host) -> None:
    """The OpenSSH client exits 255 for its own failures, else with the remote status."""
    if not host.is_local and stage.returncode is None and stage.proc is not None:
        stage.finish()
    if not host.is_local:
        name_ssh_failure(stage)
