"""The ``mbuffer`` transport, the seed's unencrypted TCP stream: the source pipes
``zfs send`` into ``mbuffer -O`` (started over the control connection) and ``mbuffer -I``
listens on the destination: here, feeding the relay, or on a remote destination, where
its own status line is the byte count.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Sequence

from zettabee.errors import TransportError
from zettabee.host import Host, Result, SshHost
from zettabee.relay import (
    STAGE_MARK,
    ProgressFn,
    Relay,
    Stage,
    StderrMeter,
    StreamResult,
    describe_failure,
    kill_all,
    name_ssh_failure,
    parse_pipeline_stderr,
    pipeline_script,
    spawn,
    start_pipe,
)

MBUFFER_BLOCK = "128k"
MBUFFER_MEMORY = "64M"


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
    listen += listen_for(source.target.address, port)
    listener = Stage("mbuffer -I", dest.name, listen)
    receiver = Stage("zfs receive", dest.name, list(recv_argv))
    stages = [listener, receiver]
    start_pipe(listener, receiver)
    deadline = time.monotonic() + 10
    while not listening(port):
        if listener.proc and listener.proc.poll() is not None:
            receiver.kill()
            for stage in stages:
                stage.finish()
            raise describe_failure(stages, None)
        if time.monotonic() > deadline:
            kill_all(stages)()
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
            kill_all(stages)()
            return
        if result.returncode != 0:  # nothing more will come: the listener must not wait
            kill_all(stages)()

    sender_thread = threading.Thread(target=run_remote, daemon=True)
    sender_thread.start()
    assert listener.proc and listener.proc.stdout and receiver.proc and receiver.proc.stdin
    relay = Relay(listener.proc.stdout, receiver.proc.stdin, stall, progress)
    relay.run(kill_all(stages))
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
    listen += listen_for(peer, port)
    script = pipeline_script([listen, recv_argv], live=0)
    listener = Stage("mbuffer -I | zfs receive", dest.name, dest.stream_argv(script, stall))
    spawn(listener, None, None)
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
    meter = StderrMeter(listener, progress, mbuffer_bytes)
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
        and not line.startswith("summary:") and "No controlling terminal" not in line
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
