"""A real NSCA daemon (Debian's ``nsca``) for tests, demos and benchmarks.

``NscaDaemon`` runs ``nsca -f -c <cfg> --single`` (foreground, one process, so the pid we
start is the daemon itself and ``stop()`` signals exactly that pid) on 127.0.0.1 and a
free port, with a config of its own in a temporary directory. Its ``command_file`` is a
plain file there (opened in append mode by nsca), so a test reads the external-command
lines that Nagios or Icinga would have received::

    with NscaDaemon(password="s3cret", decryption=1) as nscad:
        NscaClient("127.0.0.1", nscad.port, password="s3cret").send([...])
        line = nscad.wait_for(1)[0]    # CommandLine(host=..., service=..., code=..., ...)

NSCA reports bad packets (a wrong password, say) only to syslog, and this machine has no
``/dev/log``. With ``capture_syslog`` (the default, needs root and ``unshare``), nsca is
started in a private mount namespace where ``/dev`` is an overlay holding a ``log`` socket
that this class reads: ``syslog()`` then returns nsca's messages. The rest of the machine
sees no change. If that setup fails, nsca still runs, without captured syslog.

``stop()`` then ``start()`` again keeps the port and the files: that is how a test makes the
daemon "go down" and "come back".
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lab.daemon import LabDaemon, terminate

NSCA_BINARY = "/usr/sbin/nsca"
SEND_NSCA_BINARY = "/usr/sbin/send_nsca"

_LINE = re.compile(r"^\[(\d+)\] (PROCESS_SERVICE_CHECK_RESULT|PROCESS_HOST_CHECK_RESULT);(.*)$")

# The mount namespace recipe; paths come in as positional arguments, never spliced in.
_SYSLOG_WRAPPER = r"""
upper=$1 work=$2 sock=$3; shift 3
if mount -t overlay overlay -o "lowerdir=/dev,upperdir=$upper,workdir=$work" /dev \
   && touch /dev/log && mount --bind "$sock" /dev/log; then :; else
   echo "nscad: syslog capture unavailable" >&2
fi
exec "$@"
"""


@dataclass(frozen=True)
class CommandLine:
    """One external command written by nsca, parsed."""

    timestamp: int
    host: str
    service: str | None
    code: int
    output: str
    raw: str


def parse_command_line(raw: str) -> CommandLine:
    match = _LINE.match(raw)
    if not match:
        raise ValueError(f"not a check-result command: {raw!r}")
    timestamp, command, rest = match.groups()
    if command == "PROCESS_SERVICE_CHECK_RESULT":
        host, service, code, output = rest.split(";", 3)
        return CommandLine(int(timestamp), host, service, int(code), output, raw)
    host, code, output = rest.split(";", 2)
    return CommandLine(int(timestamp), host, None, int(code), output, raw)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick from the high range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_listening(host: str, port: int) -> bool:
    """Whether a socket listens on host:port, read from /proc (no probe connection)."""
    wanted = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    try:
        with open("/proc/net/tcp", encoding="ascii") as table:
            return any(
                fields[1] == wanted and fields[3] == "0A"
                for fields in (line.split() for line in table.readlines()[1:])
            )
    except OSError:
        return False


class NscaDaemon(LabDaemon):
    """Debian's nsca daemon on loopback with its own config, command file and syslog."""

    def __init__(
        self,
        *,
        password: str = "",
        decryption: int = 1,
        port: int | None = None,
        host: str = "127.0.0.1",
        workdir: str | os.PathLike[str] | None = None,
        capture_syslog: bool = True,
        binary: str = NSCA_BINARY,
        keep_workdir: bool = False,
    ) -> None:
        self.password = password
        self.decryption = decryption
        self.host = host
        self.port = port or free_port(host)
        self.binary = binary
        self.capture_syslog = capture_syslog
        self.keep_workdir = keep_workdir or workdir is not None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="zb-nscad-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = self.workdir / "nsca.cfg"
        self.command_file = self.workdir / "nsca.cmd"
        self.dump_file = self.workdir / "nsca.dump"
        self.stderr_file = self.workdir / "nsca.stderr"
        self._syslog_socket_path = self.workdir / "log.sock"
        self._process: subprocess.Popen[bytes] | None = None
        self._syslog: list[str] = []
        self._syslog_lock = threading.Lock()
        self._syslog_socket: socket.socket | None = None
        self._syslog_thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"NscaDaemon({self.host}:{self.port}, decryption={self.decryption}, {state})"

    # life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> NscaDaemon:
        if self.running:
            return self
        if not Path(self.binary).exists():
            raise FileNotFoundError(f"{self.binary} missing: apt-get install nsca")
        self._write_config()
        self.command_file.touch(mode=0o600, exist_ok=True)
        argv = [self.binary, "-f", "-c", str(self.config_file), "--single"]
        if self.capture_syslog and os.geteuid() == 0 and shutil.which("unshare"):
            argv = self._with_syslog_capture(argv)
        with open(self.stderr_file, "ab") as stderr:
            self._process = subprocess.Popen(  # noqa: S603 - argv list, no shell of ours
                argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        deadline = time.monotonic() + timeout
        while not is_listening(self.host, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"nsca did not listen on {self.host}:{self.port}: "
                    f"{self.stderr_file.read_text(errors='replace').strip()} "
                    f"{' | '.join(self.syslog()[-5:])}"
                )
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate exactly the process we started, and wait for it."""
        process, self._process = self._process, None
        if process is not None:
            terminate(process, timeout)
        if self._syslog_socket is not None:
            self._syslog_socket.close()
            self._syslog_socket = None
        if self._syslog_thread is not None:
            self._syslog_thread.join(2)
            self._syslog_thread = None

    # what arrived --------------------------------------------------------------------------

    def lines(self) -> list[str]:
        """The external-command lines nsca wrote so far, in order."""
        try:
            text = self.command_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line]

    def results(self) -> list[CommandLine]:
        return [parse_command_line(line) for line in self.lines()]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[CommandLine]:
        """Wait until at least ``count`` results arrived (fewer after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            results = self.results()
            if len(results) >= count or time.monotonic() > deadline:
                return results
            time.sleep(0.02)

    def clear(self) -> None:
        """Forget what arrived (nsca appends, so truncating under it is safe)."""
        self.command_file.write_text("")
        with self._syslog_lock:
            self._syslog.clear()

    def syslog(self) -> list[str]:
        """nsca's syslog messages, without the priority prefix (empty without capture)."""
        with self._syslog_lock:
            return list(self._syslog)

    def wait_for_syslog(self, needle: str, timeout: float = 5.0) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.syslog():
                if needle in message:
                    return message
            time.sleep(0.02)
        return None

    @property
    def syslog_captured(self) -> bool:
        return self._syslog_thread is not None

    def write_send_nsca_config(
        self, path: str | os.PathLike[str], password: str | None = None
    ) -> Path:
        """A send_nsca.cfg matching this daemon (or with another ``password``), mode 0600."""
        secret = self.password if password is None else password
        target = Path(path)
        lines = [f"encryption_method={self.decryption}"]
        if secret:
            lines.insert(0, f"password={secret}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        return target

    # internals -----------------------------------------------------------------------------

    def _write_config(self) -> None:
        settings = {
            "pid_file": self.workdir / "nsca.pid",
            "server_port": self.port,
            "server_address": self.host,
            "nsca_user": os.getuid(),
            "nsca_group": os.getgid(),
            "debug": 1,
            "command_file": self.command_file,
            "alternate_dump_file": self.dump_file,
            "aggregate_writes": 0,
            # nsca reopens the file for every result: "w" would keep only the last line.
            "append_to_file": 1,
            "max_packet_age": 30,
            "decryption_method": self.decryption,
        }
        if self.password:
            settings["password"] = self.password
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.writelines(f"{key}={value}\n" for key, value in settings.items())

    def _with_syslog_capture(self, argv: list[str]) -> list[str]:
        if self._syslog_socket is None:
            self._syslog_socket_path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(self._syslog_socket_path))
            self._syslog_socket = sock
            self._syslog_thread = threading.Thread(
                target=self._read_syslog, args=(sock,), name="nscad-syslog", daemon=True
            )
            self._syslog_thread.start()
        upper, work = self.workdir / "dev-upper", self.workdir / "dev-work"
        for directory in (upper, work):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
        wrapper = ["sh", "-c", _SYSLOG_WRAPPER, "nscad"]
        paths = [str(upper), str(work), str(self._syslog_socket_path)]
        return ["unshare", "--mount", "--propagation", "slave", *wrapper, *paths, *argv]

    def _read_syslog(self, sock: socket.socket) -> None:
        # A short timeout rather than a blocking recv: closing a socket does not wake a
        # thread blocked on it, so the loop looks at the socket's state between waits.
        sock.settimeout(0.2)
        while sock.fileno() != -1:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            message = re.sub(r"^<\d+>", "", data.decode(errors="replace")).strip()
            with self._syslog_lock:
                self._syslog.append(message)
