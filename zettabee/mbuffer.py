"""The ``mbuffer`` transport, the seed's unencrypted TCP stream: the source pipes
``zfs send`` into ``mbuffer -O`` (started over the control connection) and ``mbuffer -I``
listens on the destination: here, feeding the relay, or on a remote destination, where
its own status line is the byte count.

The stream is not encrypted, so the source is told to connect only once the listening
socket on the port is known to be the listening mbuffer's own: the kernel's table of
listening sockets (``/proc/net/tcp``) names the socket, and it must be one of the
mbuffer process's open files (``/proc/PID/fd``), on the host where it listens. Anything
else listening on the port (another service, another pair's mbuffer) fails the run, or,
when the pair fixes no port, makes it try another one.
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading
import time
from collections.abc import Sequence

from zettabee.errors import TransportError
from zettabee.host import Host, SshHost
from zettabee.names import validate_host
from zettabee.pipeline import STAGE_MARK, parse_pipeline_stderr, pipeline_script
from zettabee.relay import (
    ProgressFn,
    Relay,
    Stage,
    StderrMeter,
    StreamResult,
    describe_failure,
    kill_all,
    name_ssh_failure,
    spawn,
    start_pipe,
)

MBUFFER_BLOCK = "128k"
MBUFFER_MEMORY = "64M"
# Ports a run tries when the pair fixes none and the one it picked was taken meanwhile.
PORT_TRIES = 5
# Where a destination's free port is picked: Linux's default local port range.
EPHEMERAL_PORTS = range(32768, 61000)
# What the source says its SSH connection comes from (``CLIENT PORT SERVER PORT``).
CLIENT_ADDRESS = ["printenv", "SSH_CONNECTION"]
# The remote listener's first line on stderr: its pid, for /proc/PID/fd.
PID_MARK = "@@zettabee-listener"
_IN_USE = "Address already in use"


class PortTaken(TransportError):
    """Another program listens on the port the mbuffer was to listen on."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def free_port_in(tables: str) -> int:
    """A port of :data:`EPHEMERAL_PORTS` that no socket of a host's ``/proc/net/tcp``
    tables uses, listening or connected: a free port of that host's."""
    used = set()
    for line in tables.splitlines():
        cols = line.split()
        if len(cols) > 3 and ":" in cols[1]:
            used.add(int(cols[1].rpartition(":")[2], 16))
    free = [port for port in EPHEMERAL_PORTS if port not in used]
    if not free:
        raise TransportError(f"no free port between {EPHEMERAL_PORTS[0]} and {EPHEMERAL_PORTS[-1]}")
    return random.choice(free)


def listeners(tables: str, port: int) -> set[str]:
    """The socket inodes a Linux ``/proc/net/tcp`` (and ``tcp6``) table lists as
    listening on ``port``, on any address."""
    want = f":{port:04X}"
    found = set()
    for line in tables.splitlines():
        cols = line.split()
        if len(cols) > 9 and cols[1].endswith(want) and cols[3] == "0A":
            found.add(cols[9])
    return found


def socket_inodes(fd_listing: str) -> set[str]:
    """The socket inodes among a process's open files: ``socket:[INODE]``, as
    ``readlink`` of ``/proc/PID/fd/N`` (or ``ls -l /proc/PID/fd``) shows them."""
    return set(re.findall(r"socket:\[([0-9]+)\]", fd_listing))


def listener_is_ours(tables: str, fd_listing: str, port: int, where: str) -> bool:
    """Is every socket listening on ``port`` one of the mbuffer's own? False while none
    listens yet; :class:`PortTaken` when another program's socket does, besides it."""
    listening = listeners(tables, port)
    ours = socket_inodes(fd_listing)
    if listening & ours:
        if listening - ours:
            raise PortTaken(
                f"port {port} on {where} has another listener besides zettabee's mbuffer: "
                "the stream could go to it; stop the other program or choose another port="
            )
        return True
    return False


def local_tables() -> str:
    """This host's ``/proc/net/tcp`` and ``tcp6`` tables, as one text."""
    text = ""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                text += handle.read()
        except OSError:
            continue
    return text


def local_fds(pid: int) -> str:
    """Where each open file of process ``pid`` of this host leads, one a line."""
    links = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    except OSError:
        return ""
    return "\n".join(links)


def address_seen_by(source: SshHost) -> str:
    """The address this host's SSH connection to ``source`` comes from, as the source
    sees it (``SSH_CONNECTION``): where its mbuffer can reach the listener here, and
    the one address ``zettabee-source`` lets that mbuffer connect to."""
    res = source.run(CLIENT_ADDRESS, check=False, timeout=30)
    words = res.stdout.split()
    if res.ok and len(words) == 4 and validate_host(words[0]) is None:
        return words[0]
    said = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "nothing said"
    raise TransportError(
        f"{source.name} did not say which address its SSH connection comes from "
        f"(`{' '.join(CLIENT_ADDRESS)}` there: exit {res.returncode}, {said}), which its "
        "mbuffer is to connect back to: set the pair's mbufferhost= to the address the "
        "source reaches this host at (and zettabee-source --mbuffer-host to it), or update "
        f"zettabee on {source.name}",
        transient=False,
    )


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


def stream_via_mbuffer(
    source: SshHost,
    dest: Host,
    send_argv: list[str],
    recv_argv: list[str],
    stall: int,
    port: int | None,
    connect_host: str | None,
    bwlimit: str | None = None,
    progress: ProgressFn | None = None,
    first: Sequence[Sequence[str]] = (),
) -> StreamResult:
    """The seed's unencrypted TCP stream: source ``zfs send | mbuffer -O``, local ``mbuffer -I``.

    The local listener is up, and known to be the one listening on its port, before the
    source is told to connect (no fixed sleep), and both mbuffers run with a ``-W``
    watchdog so a dead peer cannot hang the run. The source connects to
    ``connect_host`` (the pair's ``mbufferhost``), or else back to where its SSH
    connection comes from. ``first`` (to a destination on this host) runs on the source
    before the send, in the same command (:func:`pipeline_script`): the snapshot to
    send, say.
    """
    if first and not dest.is_local:
        raise ValueError("commands before an mbuffer stream only to a local destination")
    if not dest.is_local:
        assert isinstance(dest, SshHost)
        return _mbuffer_to_remote(
            source, dest, send_argv, recv_argv, stall, port, connect_host, bwlimit, progress
        )
    started = time.monotonic()
    connect_host = connect_host or address_seen_by(source)
    listen, listener, receiver, port = _listen_here(source, dest, recv_argv, stall, port)
    stages = [listener, receiver]
    out = _mbuffer_out(stall, bwlimit, connect_host, port)
    script = pipeline_script([send_argv, out], first=first)
    source.connect()
    sender = Stage("zfs send | mbuffer -O", source.name, source.stream_argv(script, stall))
    try:
        spawn(sender, None, None)
    except BaseException:
        kill_all(stages)()
        for stage in stages:
            stage.finish(timeout=stall)
        raise
    watcher = threading.Thread(target=_stop_on_failure, args=(sender, stages), daemon=True)
    watcher.start()
    assert listener.proc and listener.proc.stdout and receiver.proc and receiver.proc.stdin
    relay = Relay(listener.proc.stdout, receiver.proc.stdin, stall, progress)
    relay.run(kill_all([*stages, sender]))
    if relay.error:
        listener.kill()
    # None of the three is waited for without limit once the stream has ended (or
    # stalled): each gets the stall limit, then it is stopped and named (a zfs receive
    # hung committing, an mbuffer or a zfs send stopped).
    for stage in (receiver, listener, sender):
        _finish_in_time(stage, stall)
    watcher.join()
    all_stages = _sender_stages(source, send_argv, out, sender, first) + stages
    result = StreamResult(relay.count, time.monotonic() - started, all_stages, relay.ended)
    if any(s.failed for s in all_stages) or relay.stalled or relay.error:
        raise describe_failure(all_stages, relay)
    return result


def _stop_on_failure(sender: Stage, stages: list[Stage]) -> None:
    """A source pipeline that failed sends nothing more: the listener must not wait."""
    assert sender.proc is not None
    if sender.proc.wait() != 0:
        kill_all(stages)()


def _finish_in_time(stage: Stage, stall: int) -> None:
    """Wait for ``stage`` for the stall limit; one that had to be stopped then, and was
    not stopped before, is overdue (:func:`zettabee.relay.overdue_message`)."""
    killed_before = stage.killed
    stage.finish(timeout=stall or None)
    if stage.killed and not killed_before:
        stage.overdue = float(stall)


def _listen_here(
    source: SshHost, dest: Host, recv_argv: list[str], stall: int, port: int | None
) -> tuple[list[str], Stage, Stage, int]:
    """``mbuffer -I | zfs receive`` here, its mbuffer known to be the one listening on
    the port: that of the pair, or a free one (another, if it was taken meanwhile)."""
    for tries_left in reversed(range(PORT_TRIES if port is None else 1)):
        chosen = port or free_port()
        listen = ["mbuffer", "-q", "-s", MBUFFER_BLOCK, "-m", MBUFFER_MEMORY, "-W", str(stall)]
        listen += listen_for(source.target.address, chosen)
        listener = Stage("mbuffer -I", dest.name, listen)
        receiver = Stage("zfs receive", dest.name, list(recv_argv))
        start_pipe(listener, receiver)
        try:
            _await_local_listener(listener, receiver, chosen, dest.name, port is not None)
        except PortTaken:
            if tries_left:
                continue
            raise
        return listen, listener, receiver, chosen
    raise AssertionError("unreachable")


def _await_local_listener(
    listener: Stage, receiver: Stage, port: int, where: str, fixed: bool
) -> None:
    """Until the socket listening on ``port`` is the listener's own (its
    ``/proc/PID/fd``). A listener that ended is the failure; one that could not bind
    the port (another program holds it) is :class:`PortTaken`."""
    stages = [listener, receiver]
    assert listener.proc is not None
    deadline = time.monotonic() + 10
    while True:
        try:
            if listener_is_ours(local_tables(), local_fds(listener.proc.pid), port, where):
                return
        except PortTaken:
            kill_all(stages)()
            for stage in stages:
                stage.finish()
            raise
        if listener.proc.poll() is not None:
            receiver.kill()
            for stage in stages:
                stage.finish()
            if _IN_USE in listener.stderr:
                raise _port_taken(port, where, listener.stderr, fixed)
            raise describe_failure(stages, None)
        if time.monotonic() > deadline:
            kill_all(stages)()
            for stage in stages:
                stage.finish()
            raise TransportError(
                f"mbuffer did not listen on port {port} within 10s"
                + (" (another program listens there)" if listeners(local_tables(), port) else "")
            )
        time.sleep(0.002)


def _port_taken(port: int, where: str, said: str, fixed: bool) -> PortTaken:
    line = next((x for x in said.splitlines() if _IN_USE in x), said).strip()
    advice = (
        "stop it, or choose another port= for the pair (without port=, a free one is picked)"
        if fixed
        else f"{PORT_TRIES} free ports were taken before mbuffer could listen on them"
    )
    return PortTaken(
        f"port {port} on {where} is in use by another program, so the source was not told "
        f"to connect ({line}): {advice}",
        transient=not fixed,
    )


def _mbuffer_out(stall: int, bwlimit: str | None, connect_host: str, port: int) -> list[str]:
    out = ["mbuffer", "-q", "-s", MBUFFER_BLOCK, "-m", MBUFFER_MEMORY, "-W", str(stall)]
    if bwlimit:
        out += ["-r", bwlimit]
    return [*out, "-O", f"{connect_host}:{port}"]


def _sender_stages(
    source: SshHost,
    send_argv: list[str],
    out: list[str],
    sender: Stage,
    first: Sequence[Sequence[str]] = (),
) -> list[Stage]:
    """The source's ``zfs send | mbuffer -O`` as two stages (after those of the commands
    ``first``), from its pipeline report; without one (the OpenSSH client failed, or the
    pipeline was stopped for not ending), the pipeline as one stage."""
    if STAGE_MARK not in sender.stderr:
        name_ssh_failure(sender)
        return [sender]
    stages = [Stage(" ".join(argv[:2]), source.name, list(argv)) for argv in first]
    stages += [
        Stage("zfs send", source.name, list(send_argv)),
        Stage("mbuffer -O", source.name, out),
    ]
    # the report's first mark starts a line: its newline went with the stripped stderr
    codes, errs, _ = parse_pipeline_stderr(f"\n{sender.stderr}", len(stages))
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
    connect_host: str | None,
    bwlimit: str | None,
    progress: ProgressFn | None,
) -> StreamResult:
    """mbuffer between two remote hosts: ``mbuffer -I | zfs receive`` runs on the
    destination through an OpenSSH client, and is known to be the one listening on its
    port there (a free port of the destination's, unless the pair fixes one) before the
    source connects; the source's ``zfs send | mbuffer -O`` runs through another client
    on the run's master connection, a stage of the stream like the listener.

    The stream goes straight from source to destination, so nothing here can count it:
    the listening mbuffer's status line (it runs without ``-q``) is read from its stderr
    as it arrives. Its ``-W`` watchdog, and the sender's, stop a stalled stream."""
    started = time.monotonic()
    connect_host = connect_host or dest.name
    # The listener accepts only the source; a source that is the destination host itself
    # connects from the address it was told to use.
    peer = connect_host if source.name == dest.name else source.target.address
    listen, listener, port = _listen_there(dest, peer, recv_argv, stall, port)
    meter = StderrMeter(listener, progress, mbuffer_bytes)
    meter.start()
    out = _mbuffer_out(stall, bwlimit, connect_host, port)
    script = pipeline_script([send_argv, out])
    try:
        source.connect()
        sender = Stage("zfs send | mbuffer -O", source.name, source.stream_argv(script, stall))
        spawn(sender, None, None)
    except BaseException:
        listener.kill()
        listener.finish()
        meter.stop()
        raise
    # The stream has ended when either side has. Once the source's pipeline has ended
    # well, the destination's (its zfs receive committing) gets the stall limit; once
    # the destination's has ended, the source's does (a zfs send stopped or hung there
    # would hold it forever). A source pipeline that failed may never have connected:
    # the listener gets its watchdog's time. Whichever does not end in time is stopped.
    if _first_to_end(sender, listener) is sender:
        if sender.proc is not None and sender.proc.returncode == 0:
            _finish_in_time(listener, stall)
        else:
            listener.finish(timeout=stall + 30)
    else:
        _finish_in_time(sender, stall)
    sender.finish()
    listener.finish()
    meter.stop()
    all_stages = _sender_stages(source, send_argv, out, sender) + _listener_stages(
        dest, listen, recv_argv, listener
    )
    ended = time.monotonic()
    result = StreamResult(meter.count, ended - started, all_stages, ended)
    if any(s.failed or s.overdue for s in all_stages):
        raise describe_failure(all_stages, None)
    return result


def _first_to_end(*stages: Stage) -> Stage:
    """The first of ``stages`` whose process has exited (they run at once, on two hosts)."""
    while True:
        for stage in stages:
            if stage.proc is None or stage.proc.poll() is not None:
                return stage
        time.sleep(0.05)


def _listen_there(
    dest: SshHost, peer: str, recv_argv: list[str], stall: int, port: int | None
) -> tuple[list[str], Stage, int]:
    """``mbuffer -I | zfs receive`` on ``dest``, its mbuffer known to be the one
    listening on the port there: the pair's, or one free on ``dest``."""
    for tries_left in reversed(range(PORT_TRIES if port is None else 1)):
        chosen = port or free_port_in(_remote_tables(dest))
        listen = ["mbuffer", "-s", MBUFFER_BLOCK, "-m", MBUFFER_MEMORY, "-W", str(stall)]
        listen += listen_for(peer, chosen)
        script = pipeline_script([_telling_its_pid(listen), recv_argv], live=0)
        listener = Stage("mbuffer -I | zfs receive", dest.name, dest.stream_argv(script, stall))
        spawn(listener, None, None)
        try:
            _await_remote_listener(dest, listen, recv_argv, listener, chosen, port is not None)
        except PortTaken:
            if tries_left:
                continue
            raise
        return listen, listener, chosen
    raise AssertionError("unreachable")


def _telling_its_pid(argv: list[str]) -> list[str]:
    """``argv`` run by a shell that first says its pid on stderr, then becomes it."""
    return ["sh", "-c", f'echo "{PID_MARK} $$" >&2; exec "$@"', "sh", *argv]


def _remote_tables(dest: SshHost) -> str:
    res = dest.run(["cat", "/proc/net/tcp", "/proc/net/tcp6"], check=False, timeout=30)
    if not res.stdout.strip():
        raise _no_proc(dest)
    return res.stdout


def _no_proc(dest: SshHost) -> TransportError:
    return TransportError(
        f"cannot tell on {dest.name} which program listens on a port (no /proc/net/tcp "
        "there), so the unencrypted mbuffer stream could go to another program than "
        "zettabee's mbuffer: use transport=ssh for this pair",
        transient=False,
    )


_FD_SCRIPT = 'cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; echo @@fd; ls -l "/proc/$1/fd"'


def _await_remote_listener(
    dest: SshHost,
    listen: list[str],
    recv_argv: list[str],
    listener: Stage,
    port: int,
    fixed: bool,
) -> None:
    """Until the socket listening on ``port`` on ``dest`` is the remote mbuffer's own:
    its pid from the first line it says, its sockets from ``/proc/PID/fd`` there."""
    assert listener.proc is not None
    deadline = time.monotonic() + 30
    pid = None
    while True:
        if pid is None:
            pid = _said_pid(listener)
        if pid is not None:
            res = dest.run(["sh", "-c", _FD_SCRIPT, "zettabee", pid], check=False, timeout=30)
            tables, _, fds = res.stdout.partition("@@fd")
            if not tables.strip():
                listener.kill()
                listener.finish()
                raise _no_proc(dest)
            try:
                if listener_is_ours(tables, fds, port, dest.name):
                    return
            except PortTaken:
                listener.kill()
                listener.finish()
                raise
        if listener.proc.poll() is not None or time.monotonic() > deadline:
            listener.kill()
            listener.finish()
            stages = _listener_stages(dest, listen, recv_argv, listener)
            if _IN_USE in stages[0].stderr:
                raise _port_taken(port, dest.name, stages[0].stderr, fixed)
            if not any(s.failed for s in stages):
                raise TransportError(f"mbuffer did not listen on {dest.name} port {port}")
            raise describe_failure(stages, None)
        time.sleep(0.1)


def _said_pid(listener: Stage) -> str | None:
    """The remote listener's pid, once its first line has come."""
    if listener.errfile is None:
        return None
    head = os.pread(listener.errfile.fileno(), 4096, 0).decode(errors="replace")
    match = re.search(rf"^{PID_MARK} ([0-9]+)$", head, re.MULTILINE)
    return match[1] if match else None


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
        name_ssh_failure(listener)
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
        and not line.startswith(("summary:", PID_MARK)) and "No controlling terminal" not in line
    ]  # fmt: skip
    return "\n".join(keep)


def listen_for(peer: str, port: int) -> list[str]:
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
