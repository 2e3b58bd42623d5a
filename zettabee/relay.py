"""The mechanics of a stream: its processes (:class:`Stage`), the relay that splices the
stream from the sending process into the receiving one on this machine, counting bytes
(progress, rate and ETA for ``runstatus``, and the stall watchdog), and the one error
that says which stage failed and why.

The transports (:mod:`zettabee.transport`, :mod:`zettabee.mbuffer`) are built of these.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

from zettabee.errors import CommandError, TransportError, last_lines
from zettabee.host import SSH_FAILED, Host, SshHost, tied_to_us

log = logging.getLogger("zettabee.transport")

CHUNK = 1 << 20
F_SETPIPE_SZ = 1031
SPLICE_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)

ProgressFn = Callable[[int, float], None]


# Seconds a stream's process has between SIGTERM and SIGKILL.
KILL_GRACE = 5.0
# Seconds the update script has for its steps on the source once its stream is in (the
# new snapshot's hold, the old base's release and destroy, the listing): zfs commands
# that each run alone would have COMMAND_TIMEOUT (300 s). One stuck on a busy or
# suspended pool is stopped, not waited for.
LINGER_LIMIT = 300.0


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
    # Seconds it was given to exit once its stream had ended, when it did not (and was
    # stopped): a zfs process stopped or hung on its host.
    overdue: float = 0.0
    # Seconds a sender that ``lingers`` was given for its steps after its stream
    # (:data:`LINGER_LIMIT`), when they did not end (and it was stopped).
    lingered: float = 0.0
    # It did not exit after SIGKILL either (a zfs in the kernel, on a suspended pool):
    # it was given up, left behind, and its run says so.
    abandoned: bool = False

    def finish(self, timeout: float | None = None) -> None:
        """Wait for the process, ``timeout`` seconds at most (then it is stopped). One
        sent SIGTERM already is never waited for without limit: :meth:`reap`."""
        assert self.proc is not None
        try:
            if self.killed and timeout is None:
                self.returncode = self.reap()
            else:
                self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.returncode = self.reap()
        if self.ended is None:
            self.ended = time.monotonic()
        if self.errfile is not None:
            self.errfile.seek(0)
            self.stderr = self.errfile.read().decode(errors="replace").strip()
            self.errfile.close()
            self.errfile = None

    def reap(self) -> int:
        """The exit status of a process sent SIGTERM: SIGKILL after :data:`KILL_GRACE`
        seconds, for a process that ignores it or is stopped (it would hold SIGTERM
        pending until someone continued it). One that outlives SIGKILL by as long is in
        the kernel (uninterruptible sleep: zfs on a suspended pool), where nothing ends
        it until the kernel lets go: it is given up (``abandoned``), never waited for."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        try:
            return self.proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            log.debug("%s on %s (pid %s) outlived SIGKILL", self.label, self.host, self.proc.pid)
            self.abandoned = True
            return -signal.SIGKILL

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


class StderrMeter:
    """Progress read from a remote counter's status line (mbuffer's, dd's) as it lands in
    a stage's stderr file: the only count there is when the stream does not pass through
    this machine."""

    def __init__(
        self,
        stage: Stage,
        progress: ProgressFn | None,
        parse: Callable[[str], int | None],
    ) -> None:
        self.stage = stage
        self.progress = progress
        self.parse = parse
        self.count = 0
        self.started = time.monotonic()
        self.moved = self.started  # when the count last changed: the stall watch's clock
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
        if found is not None and found != self.count:
            self.count = found
            self.moved = time.monotonic()

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


def finish_metered(stage: Stage, meter: StderrMeter, stall: int) -> None:
    """Wait for a stage whose stream only its meter sees (a pipeline run as one command
    on another host), while the meter's count moves: one whose count has not moved for
    ``stall`` seconds is stuck (a zfs process stopped, or hung on a busy pool, there)
    and is stopped, marked ``overdue``, never waited for without limit."""
    assert stage.proc is not None
    while stall and stage.proc.poll() is None:
        idle = time.monotonic() - meter.moved
        if idle >= stall:
            stage.overdue = float(stall)
            stage.kill()
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            stage.proc.wait(timeout=min(1.0, stall - idle))
    stage.finish()


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
        # Never blocked writing: a receiver that stops reading and cannot be killed (a zfs
        # receive in the kernel, on a suspended pool) would hold a blocking write for ever.
        os.set_blocking(fout, False)
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
                    moved = os.splice(fin, fout, CHUNK, flags=SPLICE_NONBLOCK)
                else:
                    data = os.read(fin, CHUNK)
                    moved = len(data)
                    view = memoryview(data)
                    while view:
                        try:
                            view = view[os.write(fout, view) :]
                        except BlockingIOError:
                            if not self._writable(fout):
                                return
            except BlockingIOError:  # the receiver's pipe is full
                if not self._writable(fout):
                    return
                continue
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

    def _writable(self, fout: int) -> bool:
        """Wait until the receiver's pipe takes data again (or the receiver has gone);
        False once the stream has stalled: the watchdog stopped its processes, and a
        receiver that still holds its pipe full is stuck where no signal reaches it."""
        poller = select.poll()
        poller.register(fout, select.POLLOUT)
        while not poller.poll(500):
            if self.stalled:
                self.error = "aborted: the stream stalled"
                return False
        return True

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


def spawn(stage: Stage, stdin: int | IO[bytes] | None, stdout: int | None) -> None:
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


def start_pipe(sender: Stage, receiver: Stage) -> None:
    """Start the receiver, then the process feeding it; a sender that cannot start
    leaves no receiver behind."""
    spawn(receiver, subprocess.PIPE, None)
    try:
        spawn(sender, subprocess.PIPE if sender.feed else None, subprocess.PIPE)
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
    abandoned = [s for s in stages if s.abandoned]
    if abandoned:  # whatever else failed, this one needs the admin on its host
        return TransportError(abandoned_message(abandoned[0]), transient=False)
    if relay is not None and relay.stalled:
        return TransportError(
            f"the stream stalled: no data for {relay.stall:.0f}s after {relay.count} bytes; "
            "aborted (raise the pair's stall= option if the link is that slow)"
        )
    overdue = [s for s in stages if s.overdue]
    if overdue:
        # what the other stages said: the end the stuck one left them (a cut stream)
        notes = [
            f"{s.label} on {s.host}: {last_lines(s.stderr)}"
            for s in stages
            if s.failed and s.stderr and s not in overdue
        ]
        return TransportError(
            overdue_message(overdue[0]) + (f" Then {'; '.join(notes)}" if notes else "")
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
    # A broken pipe (SIGPIPE) is the victim's end, never the cause.
    failed.sort(
        key=lambda s: (
            _signal_of(s) == signal.SIGPIPE,
            _signal_of(s) is None,
            not s.stderr and s.returncode == 1,
        )
    )
    first = failed[0]
    notes = [f"{s.label} on {s.host}: {last_lines(s.stderr)}" for s in failed[1:] if s.stderr]
    said = first.stderr or f"no error output (exit {first.returncode})"
    number = _signal_of(first)
    if number is not None and not first.stderr:
        said = f"killed by signal {number} ({_signal_name(number)})"
    if is_ssh_failure(first):
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


def overdue_message(stage: Stage) -> str:
    """What a run says of a stage stopped for not exiting after its stream (``overdue``)."""
    what, host = stage.label.split(" (")[0], stage.host
    return (
        f"{what} on {host} did not exit within {stage.overdue:.0f} s of the end of its "
        f"stream (stall={stage.overdue:.0f}); it was stopped. The replica may hold the new "
        f"snapshot already: the next run records it. Look on {host} for a zfs process "
        "that is stopped or hung (ps -o pid,stat,cmd -C zfs) and for a busy pool."
    )


def abandoned_message(stage: Stage) -> str:
    """What a run says of a stage that SIGKILL did not end (``abandoned``)."""
    what, host = stage.label.split(" (")[0], stage.host
    return (
        f"{what} on {host} did not exit after SIGKILL: stuck in the kernel; it was left "
        f"behind. Check zpool status on {host} for a suspended pool (zpool clear once its "
        "devices are back) and ps -o pid,stat,cmd -C zfs for a zfs in state D; the next "
        "run may find the dataset busy until it ends."
    )


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


def finish_stages(stages: Sequence[Stage], relay: Relay | None, started: float) -> StreamResult:
    for stage in reversed(stages):
        stage.finish(timeout=None)
    result = StreamResult(relay.count if relay else 0, time.monotonic() - started, list(stages))
    result.ended = relay.ended if relay else time.monotonic()
    if any(s.failed for s in stages) or (relay and (relay.stalled or relay.error)):
        raise describe_failure(stages, relay)
    return result


def kill_all(stages: Sequence[Stage]) -> Callable[[], None]:
    def kill() -> None:
        for stage in stages:
            stage.kill()

    return kill


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
    start_pipe(sender, receiver)
    assert sender.proc and sender.proc.stdout and receiver.proc and receiver.proc.stdin
    relay = Relay(sender.proc.stdout, receiver.proc.stdin, stall, progress)
    relay.run(kill_all(stages))
    if relay.error:  # the receiver went away: the sender must not wait forever
        sender.kill()
    # A receive that does not exit within the stall limit of its stream's end is stuck
    # (a zfs receive stopped, or hung committing on a busy pool), never waited for.
    receiver_killed = receiver.killed
    receiver.finish(timeout=stall or None)
    if receiver.killed and not receiver_killed:
        receiver.overdue = float(stall)
    if receiver.failed and not sender.lingers:
        sender.kill()
    try:
        if on_received is not None and not (receiver.failed or relay.error or relay.stalled):
            on_received()
    finally:
        answer(sender, "")  # a sender still waiting for a line reads the end of its input
        # A sender still writing after its receiver left would wait forever; so would
        # one that never exits once its whole stream is out (a zfs send stopped or hung
        # on its host): both get the stall limit. The update script (``lingers``) bounds
        # its send itself (fastpath), and has steps to run after its stream, whose end
        # its receiver does not wait for: they get LINGER_LIMIT.
        cut_off = relay.receiver_left or receiver.failed
        if sender.lingers and not (receiver.failed or sender.killed):
            sender.finish(timeout=LINGER_LIMIT)
            if sender.killed:
                sender.lingered = LINGER_LIMIT
        else:
            killed_before = sender.killed  # by a stall, a failed receiver, the caller
            sender.finish(timeout=stall or None)
            if sender.killed and not (killed_before or cut_off):
                sender.overdue = float(stall)
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


def name_ssh_failure(stage: Stage) -> None:
    """The OpenSSH client exits 255 for its own failures (no connection, a connection
    killed or lost) and with the remote command's status otherwise: a client that
    exited 255 without its command's report is named ``ssh``, and said so; not one that
    was stopped for not exiting (``overdue``): it exits 255 on the SIGTERM it was sent."""
    if stage.returncode == SSH_FAILED and not stage.overdue:
        stage.label = "ssh"


def is_ssh_failure(stage: Stage) -> bool:
    return stage.label == "ssh" or (stage.argv[:1] == ["ssh"] and stage.returncode == SSH_FAILED)
