"""Hosts that run commands: this machine, or a remote one over one SSH connection.

Commands are argv lists everywhere. A local command runs without a shell; a remote one is
quoted exactly once, here, where it becomes the single string SSH carries.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence

from zettabee.errors import CommandError, TransportError, ZfsError
from zettabee.records import Record

# typing for the annotations only: importing it costs every check (which loads this
# module). Host is a Protocol to the type checker; at run time, nothing needs it to be.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Protocol
else:
    Protocol = object

log = logging.getLogger(__name__)
# The OpenSSH client's exit status for its own failures (else it exits with the remote
# command's status): a 255 with no word from the remote side is the connection's.
SSH_FAILED = 255

CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 300.0
# Seconds a command killed for its timeout has to exit after SIGKILL.
KILL_GRACE = 5.0


class Result(Record, frozen=True):
    argv: list[str]
    host: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error(self, stage: str) -> CommandError:
        """The error of this failed command, as the ``stage`` of a run names it."""
        return CommandError(self.argv, self.host, self.returncode, self.stderr, stage)


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


_ABANDONED = "abandoned"  # the output of the TimeoutExpired of a command SIGKILL did not end


def _run_bounded(argv: list[str], input: str | None, timeout: float | None) -> tuple[int, str, str]:
    """``subprocess.run``'s exit status, stdout and stderr, but a command killed for its
    timeout is waited for :data:`KILL_GRACE` seconds, never without limit as
    ``subprocess.run`` does after its SIGKILL: a zfs asleep in the kernel (on a suspended
    pool) does not exit. TimeoutExpired says so by its output :data:`_ABANDONED`."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        try:
            proc.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            exc.output = _ABANDONED
        raise exc from None
    return proc.returncode, stdout, stderr


class Host(Protocol):
    name: str

    @property
    def is_local(self) -> bool: ...

    def start(self) -> None:
        """Begin connecting, in the background; nothing to do for this machine."""

    def connect(self) -> None:
        """Wait until commands can run; raises TransportError saying why they cannot."""

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
            returncode, stdout, stderr = _run_bounded(argv, input, timeout)
        except FileNotFoundError as exc:
            raise CommandError(argv, self.name, 127, f"{argv[0]}: command not found") from exc
        except subprocess.TimeoutExpired as exc:
            said = f"timed out after {timeout:.0f}s"
            if exc.output == _ABANDONED:
                said += (
                    ", and did not exit after SIGKILL: stuck in the kernel; it was left "
                    f"behind. Check zpool status on {self.name} for a suspended pool and "
                    "ps -o pid,stat,cmd -C zfs for a zfs in state D"
                )
            raise CommandError(argv, self.name, -1, said) from exc
        log.debug("  exit %d in %.3fs", returncode, time.monotonic() - started)
        result = Result(argv, self.name, returncode, stdout, stderr)
        if check and returncode != 0:
            raise error_for(argv, self.name, returncode, stderr)
        return result

    def start(self) -> None:
        pass

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass


class SshTarget(Record, frozen=True):
    """Where and how to reach a remote host with the OpenSSH client."""

    host: str
    port: int = 22
    user: str = "root"
    key: str | None = None
    known_hosts: str | None = None

    @property
    def address(self) -> str:
        return self.host[1:-1] if self.host.startswith("[") else self.host

    @property
    def known_host_name(self) -> str:
        """How known_hosts names this host: ``[host]:port`` off port 22."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def ssh_client_argv(
        self,
        remote_command: str | None,
        stall: int = 300,
        control_path: str | None = None,
        master: bool = False,
        accept_new_host_key: bool = False,
    ) -> list[str]:
        """The OpenSSH client argv for a command or the data stream (``None``: the master
        connection itself, no command).

        With ``control_path`` the session rides on a master connection opened earlier (and
        falls back to a connection of its own when that master is not there)."""
        argv = ["ssh", "-p", str(self.port)]
        if control_path:
            argv += ["-o", f"ControlPath={control_path}"]
            argv += ["-o", f"ControlMaster={'yes' if master else 'no'}"]
        if self.key:
            argv += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if accept_new_host_key:  # setup --accept-new-host-key: pin an unknown key, in clear
            argv += ["-o", "StrictHostKeyChecking=accept-new", "-o", "HashKnownHosts=no"]
        else:
            argv += ["-o", "StrictHostKeyChecking=yes"]
        interval = max(5, min(30, stall // 4 or 5))
        argv += [
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
    """A remote host reached with the OpenSSH client over one master connection per run.

    The master (``ControlMaster``) starts in the background as soon as the run knows the
    host, so its handshake (0.2-0.3 s) overlaps the local work; every control command and
    every stream then rides on it as one more session, about 10 ms each here (a paramiko
    channel took 50 ms, and importing paramiko 0.15 s, on the same machine). Host keys are
    checked strictly by ssh against the configured known_hosts file: an unknown or changed
    key is refused, and accepting a new one is an explicit operator action (``setup
    --accept-new-host-key``).
    """

    is_local = False

    def __init__(self, target: SshTarget, accept_new_host_key: bool = False) -> None:
        self.target = target
        self.name = target.host
        self.accept_new_host_key = accept_new_host_key
        self.connections = 0
        # replicate's worker threads share this host: one of them starts the master,
        # every one of them waits for it.
        self._lock = threading.Lock()
        self._master: subprocess.Popen[bytes] | None = None
        self._master_err: IO[bytes] | None = None
        self._mux_dir: str | None = None
        self._started = 0.0
        self._ready = False
        self._failure: TransportError | None = None

    # -- the master connection ---------------------------------------------------------

    def start(self) -> None:
        """Start the master connection without waiting for it."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._master is not None or self._failure is not None:
            return
        if self._master_err is not None:
            self._master_err.close()
        known = self.target.known_hosts
        if known and not self.accept_new_host_key and not os.path.exists(known):
            self._failure = TransportError(
                f"known_hosts file {known} does not exist: run `zettabee setup "
                f"--accept-new-host-key DESTINATION` once to pin {self.name}'s key",
                transient=False,
            )
            return
        self._mux_dir = tempfile.mkdtemp(prefix="zb-ssh-")
        argv = self.target.ssh_client_argv(
            LIFELINE,
            control_path=self._control_path(),
            master=True,
            accept_new_host_key=self.accept_new_host_key,
        )
        log.debug("start ssh master for %s: %s", self.name, shlex.join(argv))
        self._master_err = tempfile.TemporaryFile()
        self._started = time.monotonic()
        try:
            # Tied to this process as well as by its lifeline: a master whose own session
            # ended lingers while a session on it is still open, and a killed client's
            # session stays open as long as its remote command writes (mbuffer's status).
            self._master = subprocess.Popen(
                tied_to_us(argv),
                stdin=subprocess.PIPE,  # the lifeline: closed when this process ends
                stdout=subprocess.DEVNULL,
                stderr=self._master_err,
                start_new_session=True,
            )
        except FileNotFoundError:
            self._failure = TransportError(
                "the OpenSSH client `ssh` is not installed (apt-get install openssh-client)",
                transient=False,
            )

    def connect(self) -> None:
        """Wait until the master is up; a failure names its cause and the fix."""
        with self._lock:
            if self._ready and self._master is not None:
                if self._master.poll() is None:
                    return
                log.warning("ssh connection to %s was lost: connecting again", self.name)
                self._stop_master()
            self._start_locked()
            if self._failure is not None:
                raise self._failure
            self._wait_for_master()

    def _wait_for_master(self) -> None:
        assert self._master is not None
        socket_path = self._control_path()
        deadline = self._started + 2 * CONNECT_TIMEOUT
        delay = 0.002
        while not os.path.exists(socket_path):
            if self._master.poll() is not None:
                self._failure = self._master_failure()
                raise self._failure
            if time.monotonic() > deadline:
                self._stop_master()
                self._failure = TransportError(
                    f"ssh to {self.target.user}@{self.name} port {self.target.port}: no "
                    f"session after {2 * CONNECT_TIMEOUT:.0f}s (the host accepts TCP but "
                    "does not finish the SSH handshake)"
                )
                raise self._failure
            time.sleep(delay)
            delay = min(delay * 2, 0.004)
        self._ready = True
        self.connections += 1
        t = self.target
        log.debug(
            "ssh to %s@%s:%d in %.3fs", t.user, t.host, t.port, time.monotonic() - self._started
        )
        if self.accept_new_host_key:
            self._report_pinned_key()

    def _master_failure(self) -> TransportError:
        assert self._master is not None and self._master_err is not None
        self._master_err.seek(0)
        stderr = self._master_err.read().decode(errors="replace")
        return ssh_failure(self.target, self._master.returncode or SSH_FAILED, stderr)

    def _report_pinned_key(self) -> None:
        assert self._master_err is not None
        self._master_err.seek(0)
        said = self._master_err.read().decode(errors="replace")
        if "Permanently added" in said and self.target.known_hosts:
            key = subprocess.run(
                ["ssh-keygen", "-l", "-F", self.target.known_host_name, "-f",
                 self.target.known_hosts],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            lines = [line for line in key.stdout.splitlines() if not line.startswith("#")]
            log.warning(
                "pinned new host key for %s in %s: %s",
                self.name,
                self.target.known_hosts,
                lines[0] if lines else said.strip(),
            )

    def _control_path(self) -> str:
        assert self._mux_dir is not None
        return f"{self._mux_dir}/m"

    def _live_control_path(self) -> str | None:
        if self._ready and self._master is not None and self._master.poll() is None:
            return self._control_path()
        return None

    # -- commands and streams ----------------------------------------------------------

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
        argv = argv if argv is not None else ["sh", "-c", command]
        self.connect()
        # Tied to this process like every stage: a killed run must not leave a remote
        # command (an mbuffer sender, say) running over a master kept alive for it.
        client = tied_to_us(
            self.target.ssh_client_argv(command, control_path=self._live_control_path())
        )
        log.debug("run on %s: %s", self.name, command)
        started = time.monotonic()
        try:
            proc = subprocess.run(
                client,
                input=input.encode() if input is not None else None,
                stdin=subprocess.DEVNULL if input is None else None,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TransportError(
                f"command on {self.name} gave no answer for {timeout:.0f}s: {command}"
            ) from exc
        stderr = proc.stderr.decode(errors="replace")
        if proc.returncode == SSH_FAILED and self._lost(stderr):
            raise TransportError(f"ssh connection to {self.name} failed: {stderr.strip()}")
        log.debug("  exit %d in %.3fs", proc.returncode, time.monotonic() - started)
        result = Result(
            argv, self.name, proc.returncode, proc.stdout.decode(errors="replace"), stderr
        )
        if check and proc.returncode != 0:
            raise error_for(argv, self.name, proc.returncode, stderr)
        return result

    def _lost(self, stderr: str) -> bool:
        """Did the connection fail (rather than the remote command exit 255)?"""
        if self._master is None or self._master.poll() is not None:
            return True
        return any(mark in stderr for mark in _SSH_CLIENT_FAILURES)

    def stream_argv(self, remote_command: str, stall: int) -> list[str]:
        """argv of an OpenSSH client that runs ``remote_command`` for the data stream, on
        the master once it is up (a connection of its own otherwise)."""
        return self.target.ssh_client_argv(
            remote_command, stall, control_path=self._live_control_path()
        )

    def _stop_master(self) -> None:
        if self._master is not None:
            if self._master.stdin is not None:
                self._master.stdin.close()
            self._master.terminate()
            try:
                self._master.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
            self._master = None
        self._ready = False
        if self._mux_dir is not None:
            shutil.rmtree(self._mux_dir, ignore_errors=True)
            self._mux_dir = None

    def close(self) -> None:
        with self._lock:
            self._stop_master()
            if self._master_err is not None:
                self._master_err.close()
                self._master_err = None


# The master's own session: it ends, and the master with it, when the master's stdin
# closes, which the kernel does when this process ends however it ends (a master started
# with -N would outlive a killed zettabee).
LIFELINE = "cat >/dev/null"

# What the OpenSSH client says when the connection, not the remote command, failed.
_SSH_CLIENT_FAILURES = (
    "mux_client",
    "Control socket",
    "Session open refused",
    "Connection closed by",
    "Connection reset",
    "Broken pipe",
    "ssh: connect to host",
)


def ssh_failure(target: SshTarget, returncode: int, stderr: str) -> TransportError:
    """The error for an OpenSSH connection that failed, from what ssh said: what went
    wrong, whether trying again can help, and what the operator should do."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = "; ".join(line for line in lines if not line.startswith("@")) or f"exit {returncode}"
    where = f"{target.host} port {target.port}"
    known = target.known_hosts or "~/.ssh/known_hosts"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or "has changed and" in stderr:
        sent = [line.rstrip(".") for line in lines if line.startswith("SHA256:")]
        got = f" (it sent {sent[0]})" if sent else ""
        return TransportError(
            f"host key of {where} has CHANGED{got}, refusing to connect; if the host was "
            f"really reinstalled, remove its line from {known} and run `zettabee setup "
            "--accept-new-host-key`",
            transient=False,
        )
    if "Host key verification failed" in stderr:
        return TransportError(
            f"host key of {where} is unknown (not in {known}); check it and run `zettabee "
            "setup --accept-new-host-key DESTINATION` to pin it",
            transient=False,
        )
    if "Permission denied" in stderr:
        key = f" (key {target.key})" if target.key else ""
        return TransportError(f"ssh to {target.user}@{where} failed: {said}{key}", transient=False)
    if "ssh: connect to host" in stderr or "Connection timed out" in stderr:
        # "ssh: connect to host H port P: Connection refused": the reason is the news.
        reason = next(line for line in lines if "connect to host" in line or "timed out" in line)
        return TransportError(f"cannot connect to {where}: {reason.rsplit(': ', 1)[-1]}")
    return TransportError(f"ssh to {target.user}@{where} failed (exit {returncode}): {said}")


def is_local_host(name: str) -> bool:
    """Does ``name`` mean this machine? Names resolve; addresses must be bindable here.

    An address goes to the bind test at once: a check must not wait on the resolver for
    this host's names (nor load the idna codec, 5 M instructions) to compare them with one.
    """
    if name in ("localhost", "127.0.0.1", "::1", "[::1]"):
        return True
    import socket  # only another name needs it: 14 M instructions off a check of localhost

    address = name[1:-1] if name.startswith("[") else name
    try:
        literal = ipaddress.ip_address(address)
    except ValueError:
        pass
    else:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        return _bindable(family, address)
    if name in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return any(_bindable(family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos)


def _bindable(family: int, address: str) -> bool:
    import socket  # is_local_host's, loaded already

    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True
