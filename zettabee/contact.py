"""First contact with a source over paramiko, for ``zettabee enroll``: the administrator's
password (a file descriptor or the terminal), agent or key; the host key's fingerprint shown,
checked against one pinned and pinned only on ``--host-key-fingerprint`` or a yes; the
administrator's session (commands and SFTP)."""

from __future__ import annotations

import base64
import getpass
import hashlib
import logging
import os
import shlex
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zettabee.errors import UsageError
from zettabee.host import SshTarget

if TYPE_CHECKING:
    import paramiko

from zettabee.enrollplan import _HOST_KEY_ALGORITHMS, EnrollError, Request

log = logging.getLogger("zettabee.enroll")

# -- secrets ----------------------------------------------------------------------------


def read_password_fd(fd: int) -> str:
    """The password on file descriptor ``fd``: its first line (or all of it, without a
    newline). Read until the newline or the end: a writer may hand it over in pieces,
    and a single read returns only what has arrived so far."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\n" in chunk:
                break
        os.close(fd)
    except OSError as exc:
        raise UsageError(f"--password-fd {fd}: cannot read it ({exc.strerror})") from None
    text = b"".join(chunks).split(b"\n", 1)[0].removesuffix(b"\r")
    if not text:
        raise UsageError(f"--password-fd {fd}: no password on it (an empty first line)")
    return text.decode("utf-8", errors="surrogateescape")


def _on_terminal() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


# -- host keys --------------------------------------------------------------------------


def sha256_fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it (paramiko's own since 3.2)."""
    own = getattr(key, "fingerprint", None)
    if isinstance(own, str) and own.startswith("SHA256:"):
        return own
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _normal_fingerprint(text: str) -> str:
    return "SHA256:" + text.strip().removeprefix("SHA256:").rstrip("=")


def pinned_keys(known_hosts: str, target: SshTarget) -> dict[str, paramiko.PKey]:
    """The keys known_hosts holds for the host, by type (hashed names too)."""
    import paramiko

    keys = paramiko.HostKeys()
    try:
        keys.load(known_hosts)
    except FileNotFoundError:
        return {}
    except (OSError, paramiko.SSHException) as exc:
        raise EnrollError(f"cannot read the known_hosts file {known_hosts}: {exc}") from None
    found = keys.lookup(target.known_host_name)
    return dict(found.items()) if found is not None else {}


def check_host_key(
    offered: paramiko.PKey,
    pinned: dict[str, paramiko.PKey],
    request: Request,
    target: SshTarget,
    confirm: Callable[[str], bool],
) -> bool:
    """Whether the offered key is one to trust; True when it must still be pinned.
    A key that differs from a pinned one is refused whatever the options say."""
    kind, fingerprint = offered.get_name(), sha256_fingerprint(offered)
    name = target.known_host_name
    print(f"{request.host}: host key {kind} {fingerprint}")
    if pinned:
        if any(k.asbytes() == offered.asbytes() for k in pinned.values()):
            return False
        was = ", ".join(f"{k.get_name()} {sha256_fingerprint(k)}" for k in pinned.values())
        raise EnrollError(
            f"{request.host} offers host key {kind} {fingerprint}, but {target.known_hosts} "
            f"pins {was} for {name}: the host or someone between changed it. If the host was "
            f"reinstalled, check its new key, remove the old one "
            f"(ssh-keygen -R '{name}' -f {target.known_hosts}) and enroll again"
        )
    if request.host_key_fingerprint is not None:
        given = _normal_fingerprint(request.host_key_fingerprint)
        if given != fingerprint:
            raise EnrollError(
                f"{request.host} offers host key {kind} {fingerprint}, not the {given} given "
                "with --host-key-fingerprint: nothing was changed (compare with "
                "ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub on the host itself)"
            )
        return True
    question = (
        f"{request.host}: no key is pinned for {name} in {target.known_hosts}. Compare "
        f"{fingerprint} with `ssh-keygen -lf /etc/ssh/ssh_host_{_key_file_kind(kind)}_key.pub` "
        "run on the host itself. Pin it and go on? (yes/no) "
    )
    if not _on_terminal():
        raise EnrollError(
            f"{request.host}: host key {kind} {fingerprint} is not pinned in "
            f"{target.known_hosts}: check it on the host and give it with "
            f"--host-key-fingerprint {fingerprint} (no terminal to ask on)"
        )
    if not confirm(question):
        raise EnrollError(f"{request.host}: host key not confirmed; nothing was changed")
    return True


def _key_file_kind(kind: str) -> str:
    """The word of the host key's file name in /etc/ssh for a key type."""
    for word in ("ed25519", "ecdsa", "rsa"):
        if word in kind:
            return word
    return "*"


def ask_yes(question: str) -> bool:
    try:
        answer = input(question)
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return False
    return answer.strip().lower() == "yes"


def pin_host_key(known_hosts: str, target: SshTarget, key: paramiko.PKey) -> None:
    """Append the host's key to known_hosts (in clear, as OpenSSH's accept-new writes it),
    atomically: a new file renamed over the old one, which keeps every other line."""
    path = Path(known_hosts)
    try:
        old = path.read_text() if path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        text = f"{old}{target.known_host_name} {key.get_name()} {key.get_base64()}\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.zettabee-{os.getpid()}")
        temporary.write_text(text)
        os.chmod(temporary, path.stat().st_mode & 0o7777 if old else 0o644)
        os.replace(temporary, path)
    except OSError as exc:
        raise EnrollError(f"cannot pin the host key in {known_hosts}: {exc}") from None


# -- the connection ---------------------------------------------------------------------


@dataclass
class Remote:
    """The administrator's paramiko session on the source: commands and SFTP."""

    host: str
    transport: paramiko.Transport
    timeout: float
    _sftp: paramiko.SFTPClient | None = None

    def run(self, argv: Sequence[str]) -> tuple[int, str, str]:
        """Run ``argv`` (quoted once, here) in the admin's shell: status, stdout, stderr."""
        command = shlex.join(argv)
        log.debug("%s (as admin, over paramiko): %s", self.host, command)
        channel = self.transport.open_session(timeout=self.timeout)
        channel.settimeout(max(self.timeout, 60.0))
        try:
            channel.exec_command(command)
            out = _read_all(channel.recv)
            err = _read_all(channel.recv_stderr)
            return channel.recv_exit_status(), out, err
        except TimeoutError:
            raise EnrollError(f"{self.host}: {command!r} did not finish in time") from None
        finally:
            channel.close()

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            import paramiko

            try:
                self._sftp = paramiko.SFTPClient.from_transport(self.transport)
            except paramiko.SSHException as exc:
                raise EnrollError(
                    f"{self.host}: no SFTP ({exc}): enroll writes its files over SFTP; "
                    "give sshd a Subsystem sftp line"
                ) from None
            assert self._sftp is not None
        return self._sftp

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self.transport.close()


def _read_all(receive: Callable[[int], bytes]) -> str:
    chunks = []
    while chunk := receive(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def connect(
    request: Request, target: SshTarget, confirm: Callable[[str], bool] = ask_yes
) -> tuple[Remote, paramiko.PKey, bool]:
    """The admin's session, the host's key, and whether that key must be pinned."""
    import paramiko

    # paramiko logs its thread's failures with their tracebacks: the errors below say
    # what happened, in one line, and no traceback reaches the operator.
    quiet = logging.getLogger("paramiko")
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    where = f"{target.address} port {target.port}"
    password = read_password_fd(request.password_fd) if request.password_fd is not None else None
    pinned = pinned_keys(target.known_hosts or "", target)
    try:
        sock = socket.create_connection((target.address, target.port), timeout=request.timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise EnrollError(f"cannot reach {request.host} ({where}): {reason}") from None
    transport = paramiko.Transport(sock)
    transport.banner_timeout = request.timeout
    transport.auth_timeout = request.timeout
    if pinned:  # the key type known_hosts holds, as OpenSSH asks for it
        wanted = [a for kind in pinned for a in _HOST_KEY_ALGORITHMS.get(kind, (kind,))]
        supported = set(transport.get_security_options().key_types)
        if any(a in supported for a in wanted):
            transport.get_security_options().key_types = [a for a in wanted if a in supported]
    try:
        transport.start_client(timeout=request.timeout)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        transport.close()
        raise EnrollError(
            f"no SSH handshake with {request.host} ({where}): {exc or type(exc).__name__}"
        ) from None
    remote = Remote(request.host, transport, request.timeout)
    try:
        offered = transport.get_remote_server_key()
        to_pin = check_host_key(offered, pinned, request, target, confirm)
        authenticate(remote, request, password)
    except BaseException:
        remote.close()
        raise
    return remote, offered, to_pin


def authenticate(remote: Remote, request: Request, password: str | None) -> None:
    """As the admin: the key given, else the password from the descriptor, else the
    agent's keys and then a password typed on the terminal."""
    import paramiko

    transport, who = remote.transport, f"{request.admin}@{request.host}"
    try:
        if request.admin_key:
            transport.auth_publickey(request.admin, _load_key(request.admin_key))
            return
        if password is not None:
            _auth_password(transport, request.admin, password)
            return
        for key in paramiko.Agent().get_keys():
            try:
                transport.auth_publickey(request.admin, key)
                return
            except paramiko.AuthenticationException:
                continue
        if not _on_terminal():
            raise EnrollError(
                f"cannot log in as {who}: the agent has no key it accepts, and there is no "
                "terminal to ask for a password on: give --admin-key FILE, or --password-fd N"
            )
        try:
            typed = getpass.getpass(f"password of {who}: ")
        except (EOFError, KeyboardInterrupt):
            raise EnrollError(f"no password typed for {who}; nothing was changed") from None
        _auth_password(transport, request.admin, typed)
    except paramiko.BadAuthenticationType as exc:
        allowed = ", ".join(exc.allowed_types) or "none"
        raise EnrollError(
            f"{request.host} does not let {request.admin} log in that way (it allows: {allowed})"
        ) from None
    except paramiko.AuthenticationException:
        raise EnrollError(
            f"{request.host} refused the login of {who}: a wrong password or key (or its sshd "
            "takes none for that user: PermitRootLogin, PasswordAuthentication)"
        ) from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise EnrollError(f"{request.host}: the connection broke while logging in: {exc}") from None


def _auth_password(transport: paramiko.Transport, user: str, password: str) -> None:
    """Password authentication, or keyboard-interactive answered with the password
    (sshd with PAM offers only that)."""
    import paramiko

    try:
        transport.auth_password(user, password)
    except paramiko.BadAuthenticationType as exc:
        if "keyboard-interactive" not in exc.allowed_types:
            raise
        transport.auth_interactive(user, lambda _t, _i, prompts: [password for _ in prompts])


def _load_key(path: str) -> paramiko.PKey:
    import paramiko

    kinds = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)
    for kind in kinds:
        try:
            return kind.from_private_key_file(path)
        except paramiko.PasswordRequiredException:
            raise EnrollError(
                f"--admin-key {path}: the key has a passphrase: load it into ssh-agent instead"
            ) from None
        except (paramiko.SSHException, ValueError):
            continue
        except OSError as exc:
            raise EnrollError(f"--admin-key {path}: {exc.strerror}") from None
    raise EnrollError(f"--admin-key {path}: not a private key paramiko can read")
