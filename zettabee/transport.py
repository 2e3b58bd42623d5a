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

import contextlib
import fcntl
import logging
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

from zettabee.errors import CommandError, TransportError, last_lines
from zettabee.host import Host, Result, SshHost, tied_to_us

log = logging.getLogger(__name__)

CHUNK = 1 << 20
F_SETPIPE_SZ = 1031
STAGE_MARK = "@@zettabee-stage"
MBUFFER_BLOCK = "128k"
MBUFFER_MEMORY = "64M"

ProgressFn = Callable[[int, float], None]


@dataclass
class Stage:
    """One process of the stream, with its stderr kept apart for the error message."""

    label: str
    host: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    errfile: IO[bytes] | None = None
    returncode: int | None = None
    stderr: str = ""
    killed: bool = False
    ended: float | None = None  # time.monotonic() when the process was seen to exit
    feed: bool = False  # a sender whose stdin stays open for :func:`answer`
    # A sender that reports after its stream (the update script): when the receiver
    # fails it is cut off from it, not killed, and says what it found.
    lingers: bool = False

    def finish(self, timeout: float | None = None) -> None:
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.returncode = self.proc.wait()
        if self.ended is None:
            self.ended = time.monotonic()
        if self.errfile is not None:
            self.errfile.seek(0)
            self.stderr = self.errfile.read().decode(errors="replace").strip()
            self.errfile.close()
            self.errfile = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    @property
    def failed(self) -> bool:
        return self.returncode not in (0, None)


@dataclass
class StreamResult:
    bytes: int
    seconds: float
    stages: list[Stage] = field(default_factory=list)
    ended: float = 0.0  # time.monotonic() when the last byte passed the relay

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def pipeline_script(
    stages: Sequence[Sequence[str]],
    live: int | None = None,
    first: Sequence[Sequence[str]] = (),
) -> str:
    """A POSIX sh pipeline that reports every stage's exit status and stderr.

    Each command is quoted once here. After the pipeline, the script prints for each
    stage a line ``@@zettabee-stage <i> <status>`` followed by that stage's stderr, on
    stderr, so the caller can say which stage failed and quote it. The stage numbered
    ``live`` keeps its stderr on the script's own, as it is written (a status line read
    while the stream runs), and reports an empty one. The commands ``first`` run one
    after the other before the pipeline, each only if the one before succeeded, and the
    pipeline only if all did; they are reported as the first stages (what they print
    too: only the pipeline writes the stream), and the pipeline's stages follow
    (``live`` counts from the pipeline's first stage). A stage that did not run reports
    255 and nothing said.
    """
    parts = []
    offset = len(first)
    for i, argv in enumerate(stages, start=offset):
        if live is not None and i == live + offset:
            parts.append(f'{{ {shlex.join(argv)}; echo $? >"$d/s{i}"; : >"$d/e{i}"; }}')
            continue
        parts.append(f'{{ {shlex.join(argv)} 2>"$d/e{i}"; echo $? >"$d/s{i}"; }}')
    pipeline = " | ".join(parts)
    for i, argv in reversed(list(enumerate(first))):
        pipeline = (
            f'{shlex.join(argv)} 2>"$d/e{i}" >&2; s=$?; echo $s >"$d/s{i}"; '
            f"if [ $s = 0 ]; then {pipeline}; fi"
        )
    report = " ".join(str(i) for i in range(len(stages) + offset))
    return (
        "d=$(mktemp -d) || exit 125; "
        + pipeline
        + f"; for i in {report}; do "
        + f'printf "\\n{STAGE_MARK} %s %s\\n" "$i" "$(cat "$d/s$i" 2>/dev/null || echo 255)" >&2; '
        + 'cat "$d/e$i" >&2 2>/dev/null; done; '
        + "rc=0; for i in "
        + report
        + '; do s=$(cat "$d/s$i" 2>/dev/null || echo 255); [ "$s" = 0 ] || rc=$s; done; '
        + 'rm -rf "$d"; exit $rc'
    )


def parse_pipeline_stderr(text: str, count: int) -> tuple[list[int], list[str], str]:
    """Exit statuses and stderr per stage from :func:`pipeline_script`'s report."""
    codes = [255] * count
    errs = [""] * count
    head, *blocks = text.split(f"\n{STAGE_MARK} ")
    for block in blocks:
        first, _, rest = block.partition("\n")
        try:
            index, code = (int(x) for x in first.split())
        except ValueError:
            continue
        if 0 <= index < count:
            codes[index] = code
            errs[index] = rest.strip()
    return codes, errs, head.strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    """Is anything on this machine listening on TCP ``port``? (no connection made:
    mbuffer -I accepts exactly one.)"""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                if proc_net_listening(handle.read(), port):
                    return True
        except OSError:
            continue
    return False


def proc_net_listening(text: str, port: int) -> bool:
    """Does a Linux ``/proc/net/tcp`` table show a listener on ``port``?"""
    want = f":{port:04X}"
    for line in text.splitlines():
        cols = line.split()
        if len(cols) > 3 and cols[1].endswith(want) and cols[3] == "0A":
            return True
    return False


def netstat_listening(text: str, port: int) -> bool:
    """Does ``netstat -an`` (BSD, illumos) show a TCP listener on ``port``?"""
    for line in text.splitlines():
        cols = line.split()
        if "LISTEN" in cols and any(re.search(rf"[.:]{port}$", col) for col in cols):
            return True
    return False


def remote_listening(host: SshHost, port: int) -> bool:
    """Is anything listening on TCP ``port`` on a remote host? Read over the control
    connection: /proc/net/tcp on Linux, ``netstat -an`` elsewhere."""
    res = host.run(["cat", "/proc/net/tcp", "/proc/net/tcp6"], check=False, timeout=30)
    if res.stdout.strip():
        return proc_net_listening(res.stdout, port)
    res = host.run(["netstat", "-an"], check=False, timeout=30)
    return netstat_listening(res.stdout, port)


_MBUFFER_COUNT = re.compile(
    r"(?:(?P<total>[0-9]+(?:\.[0-9]+)?) (?P<tunit>[kMGT]?)i?B total"
    r"|summary: +(?P<sum>[0-9]+(?:\.[0-9]+)?) (?P<sunit>[kMGT]?)i?Byte)"
)
_UNITS = {"": 1, "k": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def mbuffer_bytes(text: str) -> int | None:
    """The bytes an mbuffer has moved, from the last status or summary line it printed
    (``... 47.6 MiB total ...``, ``summary: 47.7 MiByte in 2.4sec``): three significant
    digits, enough for progress and rate."""
    found = None
    for match in _MBUFFER_COUNT.finditer(text):
        number = match["total"] or match["sum"]
        unit = match["tunit"] if match["total"] else match["sunit"]
        found = int(float(number) * _UNITS[unit or ""])
    return found


def dd_bytes(text: str) -> int | None:
    """The last byte count dd printed: ``N bytes ...`` starts its progress lines and its
    summary, in GNU and BSD dd alike."""
    found = re.findall(r"(?:^|[\r\n])([0-9]+) bytes", text)
    return int(found[-1]) if found else None


class StderrMeter:
    """Progress read from a remote counter's status line (mbuffer's, dd's) as it lands in
    a stage's stderr file: the only count there is when the stream does not pass through
    this machine."""

    def __init__(
        self,
        stage: Stage,
        progress: ProgressFn | None,
        parse: Callable[[str], int | None] = mbuffer_bytes,
    ) -> None:
        self.stage = stage
        self.progress = progress
        self.parse = parse
        self.count = 0
        self.started = time.monotonic()
        self._offset = 0
        self._tail = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def read(self) -> None:
        errfile = self.stage.errfile
        if errfile is None:
            return
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.pread(errfile.fileno(), 1 << 16, self._offset):
                self._offset += len(chunk)
                self._tail = (self._tail + chunk.decode(errors="replace"))[-4096:]
        found = self.parse(self._tail)
        if found is not None:
            self.count = found

    def _watch(self) -> None:
        while not self._done.wait(1.0):
            self.read()
            if self.progress:
                self.progress(self.count, time.monotonic() - self.started)

    def stop(self) -> None:
        """Call after the stage finished: its whole stderr holds the final count."""
        self._done.set()
        self._thread.join()
        found = self.parse(self.stage.stderr)
        if found is not None:
            self.count = found
        if self.progress:
            self.progress(self.count, time.monotonic() - self.started)


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)


class Relay:
    """Moves the stream between two processes, counting bytes, watching for stalls."""

    def __init__(self, src: IO[bytes], dst: IO[bytes], stall: float, progress: ProgressFn | None):
        self.src = src
        self.dst = dst
        self.stall = stall
        self.progress = progress
        self.count = 0
        self.started = time.monotonic()
        self.last_move = self.started
        self.ended = self.started
        self.stalled = False
        self.receiver_left = False  # the receiver closed its end before the sender's EOF
        self.error: str | None = None
        self._done = threading.Event()

    def run(self, on_stall: Callable[[], None]) -> None:
        watchdog = threading.Thread(target=self._watch, args=(on_stall,), daemon=True)
        watchdog.start()
        try:
            self._copy()
        finally:
            self.ended = time.monotonic()
            self._done.set()
            with contextlib.suppress(OSError):
                self.dst.close()
            with contextlib.suppress(OSError):
                self.src.close()
            watchdog.join()
            if self.progress:
                self.progress(self.count, time.monotonic() - self.started)

    def _copy(self) -> None:
        fin, fout = self.src.fileno(), self.dst.fileno()
        _grow_pipe(fin)
        _grow_pipe(fout)
        use_splice = hasattr(os, "splice")
        poller = select.poll()
        poller.register(fin, select.POLLIN | select.POLLHUP | select.POLLERR)
        # The receiver's end too: its error event says the receiver has gone. zfs receive
        # leaves on the stream's last record, and the sender's end-of-file may be long
        # in coming (an update script that still works on the source keeps its stdout).
        poller.register(fout, 0)
        while True:
            # Wait with a timeout, so a stall aborts the relay even when the stuck writer
            # is a grandchild that killing our child does not reach.
            events = dict(poller.poll(500))
            if not events:
                if self.stalled:
                    self.error = "aborted: the stream stalled"
                    return
                continue
            if fout in events and not events.get(fin, 0) & select.POLLIN:
                self.receiver_left = True
                return
            try:
                if use_splice:
                    moved = os.splice(fin, fout, CHUNK)
                else:
                    data = os.read(fin, CHUNK)
                    moved = len(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fout, view) :]
            except BrokenPipeError:
                # The receiver went away. zfs receive leaves on the stream's last record,
                # often before the sender's end-of-file (and splice(2) then says EPIPE
                # with nothing left to move): with no byte waiting in the pipe, the
                # receiver's exit status tells whether it had the whole stream.
                self.receiver_left = True
                if self._pending(fin):
                    self.error = "the receiving side closed the stream"
                return
            except OSError as exc:
                if use_splice and exc.errno in (22, 38):  # EINVAL/ENOSYS: not splicable
                    use_splice = False
                    continue
                self.error = f"stream relay: {exc.strerror}"
                return
            if moved == 0:
                return
            self.count += moved
            self.last_move = time.monotonic()

    @staticmethod
    def _pending(fd: int) -> bool:
        """Does the sender's pipe hold bytes that nobody will read now?"""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return any(event & select.POLLIN for _, event in poller.poll(0))

    def _watch(self, on_stall: Callable[[], None]) -> None:
        while not self._done.wait(1.0):
            now = time.monotonic()
            if self.progress:
                self.progress(self.count, now - self.started)
            if self.stall and now - self.last_move > self.stall:
                self.stalled = True
                # info, not error: the run's own error says it once, with the pair's name
                log.info("no data moved for %.0fs: aborting the stream", now - self.last_move)
                on_stall()
                return


def _spawn(stage: Stage, stdin: int | IO[bytes] | None, stdout: int | None) -> None:
    stage.errfile = tempfile.TemporaryFile()
    log.debug("start %s on %s: %s", stage.label, stage.host, shlex.join(stage.argv))
    try:
        stage.proc = subprocess.Popen(
            tied_to_us(stage.argv),
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=stage.errfile,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(stage.argv, stage.host, 127, f"{stage.argv[0]}: not installed") from exc


def _start_pipe(sender: Stage, receiver: Stage) -> None:
    """Start the receiver, then the process feeding it; a sender that cannot start
    leaves no receiver behind."""
    _spawn(receiver, subprocess.PIPE, None)
    try:
        _spawn(sender, subprocess.PIPE if sender.feed else None, subprocess.PIPE)
    except BaseException:
        receiver.kill()
        receiver.finish()
        raise


def remote_argv(host: Host, argv: Sequence[str], stall: int) -> list[str]:
    """argv that runs ``argv`` on ``host``: directly here, or through the OpenSSH client."""
    if host.is_local:
        return list(argv)
    assert isinstance(host, SshHost)
    return host.stream_argv(shlex.join(argv), stall=stall)


def describe_failure(stages: Sequence[Stage], relay: Relay | None) -> TransportError | CommandError:
    """One error naming the stage that failed first, quoting what the tools said."""
    if relay is not None and relay.stalled:
        return TransportError(
            f"the stream stalled: no data for {relay.stall:.0f}s after {relay.count} bytes; "
            "aborted (raise the pair's stall= option if the link is that slow)"
        )
    failed = [s for s in stages if s.failed and not s.killed]
    if not failed:
        failed = [s for s in stages if s.failed]
    if not failed:
        return TransportError(relay.error if relay and relay.error else "the stream failed")
    # A stage killed by a signal we did not send is the cause; the stages around it then
    # fail on a broken pipe, and the first of those in the pipeline is not the one to name.
    # So is a stage that said why before one that exited 1 without a word: zfs send does
    # that when its receiver refused the stream and left (if the stream outgrew the pipe).
    failed.sort(key=lambda s: (_signal_of(s) is None, not s.stderr and s.returncode == 1))
    first = failed[0]
    notes = [f"{s.label} on {s.host}: {last_lines(s.stderr)}" for s in failed[1:] if s.stderr]
    said = first.stderr or f"no error output (exit {first.returncode})"
    number = _signal_of(first)
    if number is not None and not first.stderr:
        said = f"killed by signal {number} ({_signal_name(number)})"
    if first.label == "ssh" or (first.argv and first.argv[0] == "ssh" and first.returncode == 255):
        # A connection killed on the far side or lost on the way leaves ssh nothing to say.
        said = first.stderr or "the connection ended without a message from ssh (killed or lost)"
        return TransportError(
            f"ssh to {first.host} failed (exit {first.returncode}): {said}"
            + (f"; then {'; '.join(notes)}" if notes else "")
        )
    err = CommandError(first.argv, first.host, first.returncode or 1, said, stage=first.label)
    if notes:
        err.args = (f"{err}; then {'; '.join(notes)}",)
    return err


def _signal_of(stage: Stage) -> int | None:
    """The signal that ended a stage: a negative status here, 128+N from a remote shell."""
    code = stage.returncode
    if code is None or stage.killed:
        return None
    if code < 0:
        return -code
    if 128 < code < 128 + 65 and not (stage.label == "ssh" or stage.argv[:1] == ["ssh"]):
        return code - 128
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _finish(stages: Sequence[Stage], relay: Relay | None, started: float) -> StreamResult:
    for stage in reversed(stages):
        stage.finish(timeout=None)
    result = StreamResult(relay.count if relay else 0, time.monotonic() - started, list(stages))
    result.ended = relay.ended if relay else time.monotonic()
    if any(s.failed for s in stages) or (relay and (relay.stalled or relay.error)):
        raise describe_failure(stages, relay)
    return result


def _kill_all(stages: Sequence[Stage]) -> Callable[[], None]:
    def kill() -> None:
        for stage in stages:
            stage.kill()

    return kill


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
    return _finish([sender, receiver], relay, started)


def relay_stages(
    sender: Stage,
    receiver: Stage,
    stall: int,
    progress: ProgressFn | None = None,
    on_received: Callable[[], None] | None = None,
) -> Relay:
    """Start both processes, relay the stream to its end and wait for both; the caller
    judges the outcome from the stages and the relay. ``on_received`` runs as soon as the
    receiver has taken the whole stream, while the sender may still be finishing."""
    stages = [sender, receiver]
    _start_pipe(sender, receiver)
    assert sender.proc and sender.proc.stdout and receiver.proc and receiver.proc.stdin
    relay = Relay(sender.proc.stdout, receiver.proc.stdin, stall, progress)
    relay.run(_kill_all(stages))
    if relay.error:  # the receiver went away: the sender must not wait forever
        sender.kill()
    receiver.finish()
    if receiver.failed and not sender.lingers:
        sender.kill()
    try:
        if on_received is not None and not (receiver.failed or relay.error or relay.stalled):
            on_received()
    finally:
        answer(sender, "")  # a sender still waiting for a line reads the end of its input
        # A sender still writing after its receiver left would wait forever.
        cut_off = relay.receiver_left or receiver.failed
        sender.finish(timeout=stall or None if cut_off else None)
    return relay


def answer(stage: Stage, line: str) -> None:
    """Write ``line`` to a fed stage's stdin and close it; a stage that has gone (its
    connection lost) hears nothing, and says so by its own exit status."""
    stdin = stage.proc.stdin if stage.proc is not None else None
    if stdin is None or stdin.closed:
        return
    with contextlib.suppress(OSError):
        stdin.write(line.encode())
    with contextlib.suppress(OSError):
        stdin.close()  # closes the pipe even when the flush fails


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
    goes away is what stops the remote pipeline instead of leaving it running."""
    started = time.monotonic()
    count = ["dd", "bs=1048576", "status=progress"]
    script = pipeline_script([send_argv, count, recv_argv], live=1)
    runner = Stage("zfs send | zfs receive", host.name, host.stream_argv(script, stall))
    _spawn(runner, None, None)
    meter = StderrMeter(runner, progress, dd_bytes)
    meter.start()
    runner.finish()
    meter.stop()
    stages = [
        Stage("zfs send", host.name, list(send_argv)),
        Stage("dd", host.name, count),
        Stage("zfs receive", host.name, list(recv_argv)),
    ]
    if STAGE_MARK not in runner.stderr:
        runner.label = "ssh" if runner.returncode == 255 else runner.label
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


def _classify_ssh(stage: Stage, host: Host) -> None:
    """The OpenSSH client exits 255 for its own failures, else with the remote status."""
    if not host.is_local and stage.returncode is None and stage.proc is not None:
        stage.finish()
    if not host.is_local and stage.returncode == 255:
        stage.label = "ssh"


def stream_via_mbuffer(
    source: SshHost,
    dest: Host,
    send_argv: list[str],
    recv_argv: list[str],
    stall: int,
    port: int | None,
    connect_host: str,
    bwlimit: str | None = None,
    progress: ProgressFn | None = None,
    first: Sequence[Sequence[str]] = (),
) -> StreamResult:
    """The seed's unencrypted TCP stream: source ``zfs send | mbuffer -O``, local ``mbuffer -I``.

    The local listener is up before the source is told to connect (no fixed sleep), and
    both mbuffers run with a ``-W`` watchdog so a dead peer cannot hang the run. The
    listener starts before the control connection is waited for, so that both come up
    together. ``first`` (to a destination on this host) runs on the source before the
    send, in the same command (:func:`pipeline_script`): the snapshot to send, say.
    """
    if first and not dest.is_local:
        raise ValueError("commands before an mbuffer stream only to a local destination")
    if not dest.is_local:
        assert isinstance(dest, SshHost)
        return _mbuffer_to_remote(
            source, dest, send_argv, recv_argv, stall, port, connect_host, bwlimit, progress
        )
    started = time.monotonic()
    port = port or free_port()
    listen = ["mbuffer", "-q", "-s", MBUFFER_BLOCK, "-m", MBUFFER_MEMORY, "-W", str(stall)]
    listen += mbuffer_listen_for(source.target.address, port)
    listener = Stage("mbuffer -I", dest.name, listen)
    receiver = Stage("zfs receive", dest.name, list(recv_argv))
    stages = [listener, receiver]
    _start_pipe(listener, receiver)
    deadline = time.monotonic() + 10
    while not listening(port):
        if listener.proc and listener.proc.poll() is not None:
            receiver.kill()
            for stage in stages:
                stage.finish()
            raise describe_failure(stages, None)
        if time.monotonic() > deadline:
            _kill_all(stages)()
            raise TransportError(f"mbuffer did not listen on port {port} within 10s")
        time.sleep(0.002)
    out = _mbuffer_out(stall, bwlimit, connect_host, port)
    script = pipeline_script([send_argv, out], first=first)
    remote: dict[str, object] = {}

    def run_remote() -> None:
        try:
            result = source.run_command(script, check=False, timeout=None)
            remote["result"] = result
        except BaseException as exc:  # reported after the local side ends
            remote["error"] = exc
            _kill_all(stages)()
            return
        if result.returncode != 0:  # nothing more will come: the listener must not wait
            _kill_all(stages)()

    sender_thread = threading.Thread(target=run_remote, daemon=True)
    sender_thread.start()
    assert listener.proc and listener.proc.stdout and receiver.proc and receiver.proc.stdin
    relay = Relay(listener.proc.stdout, receiver.proc.stdin, stall, progress)
    relay.run(_kill_all(stages))
    if relay.error:
        listener.kill()
    for stage in reversed(stages):
        stage.finish()
    sender_thread.join(timeout=stall + 30)
    all_stages = _sender_stages(source, send_argv, out, remote, first) + stages
    result = StreamResult(relay.count, time.monotonic() - started, all_stages, relay.ended)
    if any(s.failed for s in all_stages) or relay.stalled or relay.error:
        raise describe_failure(all_stages, relay)
    return result


def mbuffer_listen_for(peer: str, port: int) -> list[str]:
    """The listening mbuffer's options that accept ``peer`` alone on ``port``.

    mbuffer R20241007 (Debian 13) listens on IPv6 and sees an IPv4 peer as
    ``::ffff:A.B.C.D``, which ``-I A.B.C.D:PORT`` then rejects ("rejected connection"):
    the sender got "Broken pipe" after 110 KB. An IPv4 peer gets an IPv4 listener
    (``-4``, which R20230301 of Debian 12 has too)."""
    return [*(["-4"] if _ipv4_only(peer) else []), "-I", f"{peer}:{port}"]


def _ipv4_only(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(info[0] == socket.AF_INET for info in infos)


def _mbuffer_out(stall: int, bwlimit: str | None, connect_host: str, port: int) -> list[str]:
    out = ["mbuffer", "-q", "-s", MBUFFER_BLOCK, "-m", MBUFFER_MEMORY, "-W", str(stall)]
    if bwlimit:
        out += ["-r", bwlimit]
    return [*out, "-O", f"{connect_host}:{port}"]


def _sender_stages(
    source: SshHost,
    send_argv: list[str],
    out: list[str],
    remote: dict[str, object],
    first: Sequence[Sequence[str]] = (),
) -> list[Stage]:
    """The source's ``zfs send | mbuffer -O`` as two stages (after those of the commands
    ``first``), from its pipeline report."""
    stages = [Stage(" ".join(argv[:2]), source.name, list(argv)) for argv in first]
    stages += [
        Stage("zfs send", source.name, list(send_argv)),
        Stage("mbuffer -O", source.name, out),
    ]
    if "error" in remote:
        raise TransportError(f"control connection to {source.name} failed: {remote['error']}")
    res = remote.get("result")
    if res is not None:
        codes, errs, _ = parse_pipeline_stderr(res.stderr, len(stages))  # type: ignore[attr-defined]
        for stage, code, err in zip(stages, codes, errs, strict=True):
            stage.returncode, stage.stderr = code, err
    return stages


def _mbuffer_to_remote(
    source: SshHost,
    dest: SshHost,
    send_argv: list[str],
    recv_argv: list[str],
    stall: int,
    port: int | None,
    connect_host: str,
    bwlimit: str | None,
    progress: ProgressFn | None,
) -> StreamResult:
    """mbuffer between two remote hosts: ``mbuffer -I | zfs receive`` runs on the
    destination through an OpenSSH client, and is listening before the source connects.

    The stream goes straight from source to destination, so nothing here can count it:
    the listening mbuffer's status line (it runs without ``-q``) is read from its stderr
    as it arrives. Its ``-W`` watchdog, and the sender's, stop a stalled stream."""
    started = time.monotonic()
    port = port or free_port()
    # The listener accepts only the source; a source that is the destination host itself
    # connects from the address it was told to use.
    peer = connect_host if source.name == dest.name else source.target.address
    listen = ["mbuffer", "-s", MBUFFER_BLOCK, "-m", MBUFFER_MEMORY, "-W", str(stall)]
    listen += mbuffer_listen_for(peer, port)
    script = pipeline_script([listen, recv_argv], live=0)
    listener = Stage("mbuffer -I | zfs receive", dest.name, dest.stream_argv(script, stall))
    _spawn(listener, None, None)
    assert listener.proc is not None
    deadline = time.monotonic() + 30
    while not remote_listening(dest, port):
        if listener.proc.poll() is not None or time.monotonic() > deadline:
            listener.kill()
            listener.finish()
            stages = _listener_stages(dest, listen, recv_argv, listener)
            if not any(s.failed for s in stages):
                raise TransportError(f"mbuffer did not listen on {dest.name} port {port}")
            raise describe_failure(stages, None)
        time.sleep(0.1)
    meter = StderrMeter(listener, progress)
    meter.start()
    out = _mbuffer_out(stall, bwlimit, connect_host, port)
    remote: dict[str, object] = {}
    try:
        remote["result"] = source.run_command(
            pipeline_script([send_argv, out]), check=False, timeout=None
        )
    except BaseException as exc:  # reported after the listener ends
        remote["error"] = exc
        listener.kill()
    sent = remote.get("result")
    sender_ok = isinstance(sent, Result) and sent.ok
    # A sender that failed may never have connected: the listener gets its watchdog's time.
    listener.finish(timeout=None if sender_ok else stall + 30)
    meter.stop()
    all_stages = _sender_stages(source, send_argv, out, remote) + _listener_stages(
        dest, listen, recv_argv, listener
    )
    ended = time.monotonic()
    result = StreamResult(meter.count, ended - started, all_stages, ended)
    if any(s.failed for s in all_stages):
        raise describe_failure(all_stages, None)
    return result


def _listener_stages(
    dest: SshHost, listen: list[str], recv_argv: list[str], listener: Stage
) -> list[Stage]:
    """The remote ``mbuffer -I | zfs receive`` as two stages, from its pipeline report;
    the OpenSSH client's own failure (exit 255, no report) stays one ssh stage."""
    stages = [
        Stage("mbuffer -I", dest.name, listen),
        Stage("zfs receive", dest.name, list(recv_argv)),
    ]
    if STAGE_MARK not in listener.stderr:
        listener.label = "ssh" if listener.returncode == 255 else listener.label
        return [listener]
    codes, errs, head = parse_pipeline_stderr(listener.stderr, 2)
    errs[0] = head  # the listener's stderr came live, before the report
    for stage, code, err in zip(stages, codes, errs, strict=True):
        stage.returncode, stage.stderr = code, _without_status_lines(err)
    return stages


def _without_status_lines(text: str) -> str:
    """mbuffer's stderr minus its carriage-return status lines and summary."""
    lines = [part for line in text.splitlines() for part in line.split("\r")]
    keep = [
        line for line in lines if line.strip() and " total, buffer " not in line
        and not line.startswith("summary:") and "No controlling terminal" not in line
    ]  # fmt: skip
    return "\n".join(keep)
