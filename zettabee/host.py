"""Hosts that run commands: this machine, or a remote one over one SSH connection.

Commands are argv lists everywhere. A local command runs without a shell; a remote one is
quoted exactly once, here, where it becomes the single string SSH carries.
"""

from __future__ import annotations

import functools
import logging
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from zettabee.errors import CommandError, TransportError, ZfsError

if TYPE_CHECKING:  # paramiko costs 0.2 s to import: only the replicating paths pay it
    import paramiko

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 300.0
KEEPALIVE = 15


@dataclass(frozen=True)
class Result:
    argv: list[str]
    host: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def error_for(argv: Sequence[str], host: str, returncode: int, stderr: str) -> CommandError:
    """The typed error for a failed command: zfs and zpool failures are ZfsErrors."""
    kind = ZfsError if argv and argv[0] in ("zfs", "zpool") else CommandError
    stage = " ".join(argv[:2]) if argv and argv[0] in ("zfs", "zpool") else None
    return kind(argv, host, returncode, stderr, stage=stage)


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv")


def tied_to_us(argv: list[str]) -> list[str]:
    """``argv`` run so that the kernel sends it SIGTERM when zettabee dies (Linux
    ``setpriv --pdeathsig``). A stage is a new session, out of reach of a signal to ours;
    a killed run must still not leave an SSH client feeding a remote ``zfs receive``
    that the next run would find busy."""
    setpriv = _setpriv()
    if setpriv is None or shutil.which(argv[0]) is None:
        return argv
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]


class Host(Protocol):
    name: str

    @property
    def is_local(self) -> bool: ...

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float | None = None,
    ) -> Result: ...

    def close(self) -> None: ...


class LocalHost:
    """This machine: commands run directly, no shell."""

    is_local = True

    def __init__(self, name: str = "localhost") -> None:
        self.name = name

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float | None = COMMAND_TIMEOUT,
    ) -> Result:
        argv = list(argv)
        log.debug("run on %s: %s", self.name, shlex.join(argv))
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, input=input, timeout=timeout, check=False
            )
        except FileNotFoundError as exc:
            raise CommandError(argv, self.name, 127, f"{argv[0]}: command not found") from exc
        except subprocess.TimeoutExpired as exc:
            raise CommandError(argv, self.name, -1, f"timed out after {timeout:.0f}s") from exc
        log.debug("  exit %d in %.3fs", proc.returncode, time.monotonic() - started)
        result = Result(argv, self.name, proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise error_for(argv, self.name, proc.returncode, proc.stderr)
        return result

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class SshTarget:
    """Where and how to reach a remote host; the same for paramiko and the ssh client."""

    host: str
    port: int = 22
    user: str = "root"
    key: str | None = None
    known_hosts: str | None = None

    @property
    def address(self) -> str:
        return self.host[1:-1] if self.host.startswith("[") else self.host

    def ssh_client_argv(
        self,
        remote_command: str | None,
        stall: int = 300,
        control_path: str | None = None,
        master: bool = False,
    ) -> list[str]:
        """The OpenSSH client argv for the data stream: same key, port and known_hosts.

        With ``control_path`` the stream rides on a master connection opened earlier (and
        falls back to a connection of its own when that master is not there)."""
        argv = ["ssh", "-p", str(self.port)]
        if control_path:
            argv += ["-o", f"ControlPath={control_path}"]
            argv += ["-o", f"ControlMaster={'yes' if master else 'no'}"]
        if self.key:
            argv += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        interval = max(5, min(30, stall // 4 or 5))
        argv += [
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={int(CONNECT_TIMEOUT)}",
            "-o", f"ServerAliveInterval={interval}",
            "-o", f"ServerAliveCountMax={max(2, stall // interval)}",
            "-o", "Compression=no",
            "-l", self.user,
        ]  # fmt: skip
        # "--" before the host: a host that starts with "-" is then a host, never an
        # option such as -oProxyCommand=..., and ssh reads no option after it either.
        if remote_command is None:
            return [*argv, "-N", "--", self.address]
        return [*argv, "--", self.address, remote_command]


class SshHost:
    """A remote host behind one paramiko connection, opened on first use and reused.

    Host keys are checked strictly against the configured known_hosts file: an unknown or
    changed key is refused, and accepting a new one is an explicit operator action.
    """

    is_local = False

    def __init__(self, target: SshTarget, accept_new_host_key: bool = False) -> None:
        self.target = target
        self.name = target.host
        self.accept_new_host_key = accept_new_host_key
        self._client: paramiko.SSHClient | None = None
        self.connections = 0
        # replicate's worker threads share this host. paramiko's Transport is safe for
        # channels opened and used from several threads; the lazy connect here is not:
        # without the lock two threads would each open a connection.
        self._connect_lock = threading.Lock()
        self._master: subprocess.Popen[bytes] | None = None
        self._mux_dir: str | None = None

    def _connect(self) -> paramiko.SSHClient:
        with self._connect_lock:
            return self._connect_once()

    def _connect_once(self) -> paramiko.SSHClient:
        if self._client is not None:
            transport = self._client.get_transport()
            if transport is not None and transport.is_active():
                return self._client
        import paramiko

        t = self.target
        client = paramiko.SSHClient()
        known = t.known_hosts
        if known:
            try:
                client.load_host_keys(known)
            except FileNotFoundError:
                if not self.accept_new_host_key:
                    raise TransportError(
                        f"known_hosts file {known} does not exist: run `zettabee setup "
                        f"--accept-new-host-key DESTINATION` once to pin {t.host}'s key",
                        transient=False,
                    ) from None
        else:
            client.load_system_host_keys()
        if self.accept_new_host_key:
            client.set_missing_host_key_policy(_pin_new_key_policy(known))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        started = time.monotonic()
        try:
            client.connect(
                t.address,
                port=t.port,
                username=t.user,
                key_filename=t.key,
                look_for_keys=t.key is None,
                allow_agent=False,
                timeout=CONNECT_TIMEOUT,
                banner_timeout=CONNECT_TIMEOUT,
                auth_timeout=CONNECT_TIMEOUT,
                channel_timeout=CONNECT_TIMEOUT,
            )
        except paramiko.BadHostKeyException as exc:
            raise TransportError(
                f"host key of {t.host} port {t.port} has CHANGED (got {exc.key.get_name()} "
                f"{exc.key.get_fingerprint().hex()}), refusing to connect; if the host was "
                f"really reinstalled, remove its line from {known or '~/.ssh/known_hosts'} and "
                "run `zettabee setup --accept-new-host-key`",
                transient=False,
            ) from exc
        except paramiko.SSHException as exc:
            msg = str(exc)
            if "not found in known_hosts" in msg:
                raise TransportError(
                    f"host key of {t.host} port {t.port} is unknown (not in "
                    f"{known or '~/.ssh/known_hosts'}); check it and run `zettabee setup "
                    "--accept-new-host-key DESTINATION` to pin it",
                    transient=False,
                ) from exc
            auth = isinstance(exc, paramiko.AuthenticationException)
            raise TransportError(
                f"ssh to {t.user}@{t.host} port {t.port} failed: {msg}"
                + (f" (key {t.key})" if auth else ""),
                transient=not auth,
            ) from exc
        except (OSError, EOFError) as exc:
            raise TransportError(
                f"cannot connect to {t.host} port {t.port}: {_socket_reason(exc)}"
                if isinstance(exc, OSError)
                else f"connection to {t.host} port {t.port} closed during set-up"
            ) from exc
        except UnicodeError as exc:  # the resolver's IDNA codec: a label over 63 characters
            raise TransportError(f"cannot resolve host {t.host!r}: {exc}", False) from exc
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE)
        self.connections += 1
        log.debug("ssh to %s@%s:%d in %.3fs", t.user, t.host, t.port, time.monotonic() - started)
        self._client = client
        return client

    def connect(self) -> None:
        self._connect()

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float | None = COMMAND_TIMEOUT,
    ) -> Result:
        argv = list(argv)
        command = shlex.join(argv)
        return self.run_command(command, argv=argv, check=check, input=input, timeout=timeout)

    def run_command(
        self,
        command: str,
        *,
        argv: list[str] | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float | None = COMMAND_TIMEOUT,
    ) -> Result:
        """Run one already quoted command string (a pipeline built by :mod:`transport`)."""
        import paramiko

        argv = argv if argv is not None else ["sh", "-c", command]
        client = self._connect()
        log.debug("run on %s: %s", self.name, command)
        started = time.monotonic()
        try:
            transport = client.get_transport()
            assert transport is not None
            chan = transport.open_session(timeout=CONNECT_TIMEOUT)
            chan.settimeout(timeout)
            chan.exec_command(command)
            if input is not None:
                chan.sendall(input.encode())
            chan.shutdown_write()
            out = chan.makefile("rb").read()
            err = chan.makefile_stderr("rb").read()
            code = chan.recv_exit_status()
            chan.close()
        except TimeoutError as exc:
            raise TransportError(
                f"command on {self.name} gave no answer for {timeout:.0f}s: {command}"
            ) from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._client = None
            raise TransportError(f"ssh connection to {self.name} failed: {exc}") from exc
        log.debug("  exit %d in %.3fs", code, time.monotonic() - started)
        result = Result(
            argv, self.name, code, out.decode(errors="replace"), err.decode(errors="replace")
        )
        if check and code != 0:
            raise error_for(argv, self.name, code, result.stderr)
        return result

    def open_stream_master(self) -> None:
        """Start the OpenSSH connection the data stream will use, in the background.

        Its handshake (0.2-0.3 s) then overlaps the control work (listing, snapshot)
        instead of adding to every update."""
        import tempfile

        with self._connect_lock:
            if self._master is not None:
                return
            self._mux_dir = tempfile.mkdtemp(prefix="zb-ssh-")
            argv = self.target.ssh_client_argv(None, control_path=self._control_path(), master=True)
            # close() stops the master; a run killed with SIGKILL cannot, and the master
            # (its own session, -N) would hold its connection to the source forever. The
            # kernel's parent-death signal stops it then. It follows the thread that
            # started it: replicate's workers live as long as the run's hosts do.
            if shutil.which("setpriv"):
                argv = ["setpriv", "--pdeathsig", "TERM", *argv]
            log.debug("start ssh master for %s: %s", self.name, shlex.join(argv))
            self._master = subprocess.Popen(
                tied_to_us(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _control_path(self) -> str:
        assert self._mux_dir is not None
        return f"{self._mux_dir}/m"

    def stream_argv(self, remote_command: str, stall: int) -> list[str]:
        """argv of an OpenSSH client that runs ``remote_command`` for the data stream."""
        if self._master is not None and self._master.poll() is None:
            return self.target.ssh_client_argv(
                remote_command, stall, control_path=self._control_path()
            )
        return self.target.ssh_client_argv(remote_command, stall)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._master is not None:
            self._master.terminate()
            try:
                self._master.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
            self._master = None
        if self._mux_dir is not None:
            shutil.rmtree(self._mux_dir, ignore_errors=True)
            self._mux_dir = None


def _socket_reason(exc: OSError) -> str:
    """What the socket said: paramiko wraps a refused or unreachable connection in an
    error of its own ("Unable to connect to port 22 on ...") that hides the reason."""
    underlying = [e for e in getattr(exc, "errors", {}).values() if isinstance(e, OSError)]
    reasons = {e.strerror or str(e) for e in underlying}
    if reasons:
        return "; ".join(sorted(reasons))
    return exc.strerror or str(exc)


def _pin_new_key_policy(known_hosts: str | None) -> paramiko.MissingHostKeyPolicy:
    """Missing-host-key policy used only by ``setup --accept-new-host-key``: a key that
    is not known yet is written to the known_hosts file; a changed key is still refused
    (paramiko raises BadHostKeyException before asking the policy)."""
    import os

    import paramiko

    class PinNewKey(paramiko.MissingHostKeyPolicy):
        def missing_host_key(
            self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
        ) -> None:
            client.get_host_keys().add(hostname, key.get_name(), key)
            if known_hosts:
                os.makedirs(os.path.dirname(known_hosts) or ".", exist_ok=True)
                with open(known_hosts, "a") as handle:
                    handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            log.warning(
                "pinned new host key for %s: %s %s",
                hostname,
                key.get_name(),
                key.get_fingerprint().hex(),
            )

    return PinNewKey()


def is_local_host(name: str) -> bool:
    """Does ``name`` mean this machine? Names resolve; addresses must be bindable here."""
    if name in ("localhost", "127.0.0.1", "::1", "[::1]"):
        return True
    if name in (socket.gethostname(), socket.getfqdn()):
        return True
    address = name[1:-1] if name.startswith("[") else name
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    for family, _type, _proto, _canon, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))
            except OSError:
                continue
            return True
    return False
