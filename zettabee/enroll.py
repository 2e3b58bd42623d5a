"""``zettabee enroll HOST``: a source host set up for least privilege, in one command.

First contact with a source is the one place where zettabee speaks SSH through paramiko
(cron runs use OpenSSH, see :mod:`zettabee.host`): an administrator's password (from the
terminal or a file descriptor, never argv or the environment), agent or key; the host
key's fingerprint shown through paramiko's API and pinned only when it equals
``--host-key-fingerprint`` or the operator says yes on a terminal, never by a policy that
adds whatever a host offers; SFTP to place files atomically.

What it does on the source, in this order, after every check has passed (so that a wrong
password, an unknown key, a dead host, no zfs, no python3 or a file it may not write
leaves nothing half-done):

1. ``zettabee-source`` of exactly this version: the one found in place, else this
   version's zipapp (:mod:`zettabee.sourceapp`) written under a temporary name, its
   SHA-256 checked on the source, renamed into place;
2. the restricted line (:mod:`zettabee.authkeys`) in the key user's ``authorized_keys``,
   written to a temporary file with the old file's owner and mode and renamed over it;
   nothing is written when the line is there already;
3. the host key pinned in the pair's known_hosts file, and a pull's command run through
   the restricted key with OpenSSH, as cron will.

Only this module imports paramiko; the check plugins, ``replicate`` and ``update`` never
load it (it costs 0.15-0.2 s and 40 MB).
"""

from __future__ import annotations

import base64
import errno
import getpass
import hashlib
import logging
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from zettabee import __version__, authkeys, sourceapp
from zettabee.errors import UsageError, ZettabeeError
from zettabee.host import SshTarget
from zettabee.pair import Pair

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("zettabee.enroll")

DEFAULT_SOURCE_PATHS = ("/usr/bin/zettabee-source", "/usr/local/bin/zettabee-source")
DEFAULT_AUTHORIZED_KEYS = "%h/.ssh/authorized_keys"
TIMEOUT = 15.0
# paramiko's names of the host key algorithms of each key type a known_hosts line holds.
_HOST_KEY_ALGORITHMS = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
    "ssh-ed25519": ("ssh-ed25519",),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
}


class EnrollError(ZettabeeError):
    """Enrollment stopped; the message says why and what to do."""


@dataclass(frozen=True)
class Request:
    """What the operator asked for on the command line."""

    host: str
    admin: str = "root"
    admin_key: str | None = None
    password_fd: int | None = None
    host_key_fingerprint: str | None = None
    authorized_keys: str = DEFAULT_AUTHORIZED_KEYS
    source_path: str | None = None
    from_patterns: tuple[str, ...] | None = None  # None: the address the source sees
    dry_run: bool = False
    remove: bool = False
    timeout: float = TIMEOUT
    delegate: str | None = None  # --user: the pairs' non-root user, made and given zfs allow
    remove_user: bool = False


@dataclass(frozen=True)
class Plan:
    """The pairs with their source on the host, and what their key needs there."""

    target: SshTarget  # the host as cron reaches it: port, key user, key, known_hosts
    key_path: str
    pairs: tuple[Pair, ...]
    datasets: tuple[str, ...]
    mbuffer_hosts: tuple[str, ...] = field(default=())
    trees: tuple[str, ...] = field(default=())  # the sources of recursive lines


# -- the pairs --------------------------------------------------------------------------


def _same_host(a: str, b: str) -> bool:
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def plan_for(host: str, pairs: Sequence[Pair], known_hosts: str) -> Plan:
    """What the pairs whose source is ``host`` need on it. They must reach it as one
    user with one key: one line of one ``authorized_keys``."""
    mine = tuple(p for p in pairs if _same_host(p.source.host, host))
    if not mine:
        raise UsageError(f"no pair of the pair file has its source on {host!r}")
    ways = {
        (p.options.sshport, p.options.user, p.options.sshkey, p.options.knownhosts) for p in mine
    }
    if len(ways) > 1:
        raise UsageError(
            f"the pairs with their source on {host} reach it in {len(ways)} ways (sshport, "
            "user, sshkey, knownhosts differ): give them the same, one key line serves them all"
        )
    opts = mine[0].options
    key = opts.sshkey or str(Path("~/.ssh/id_ed25519").expanduser())
    target = SshTarget(
        mine[0].source.host, opts.sshport, opts.user, key, opts.knownhosts or known_hosts
    )
    mbuffer = {p.options.mbufferhost for p in mine if p.options.transport == "mbuffer"}
    return Plan(
        target=target,
        key_path=key,
        pairs=mine,
        datasets=tuple(sorted({p.source.fs for p in mine})),
        mbuffer_hosts=tuple(sorted(h for h in mbuffer if h)),
        trees=tuple(sorted({p.source.fs for p in mine if p.options.recursive})),
    )


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


# -- what the source has ----------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    user: str
    uid: int
    gid: int
    home: str


def account(remote: Remote, user: str) -> Account:
    code, out, err = remote.run(["getent", "passwd", user])
    fields = out.strip().split(":")
    if code == 2 or (code == 0 and len(fields) < 7):
        raise EnrollError(
            f"{remote.host} has no user {user!r} (the pairs' user= option): create it first "
            "(README: Least privilege on the source)"
        )
    if code != 0:
        raise EnrollError(
            f"{remote.host}: getent passwd {user} failed (exit {code}): {err.strip()}"
        )
    return Account(user, int(fields[2]), int(fields[3]), fields[5])


def check_datasets(remote: Remote, plan: Plan) -> None:
    """zfs is there and has every source file system of the pairs."""
    for fs in plan.datasets:
        code, out, err = remote.run(["zfs", "list", "-H", "-o", "name", fs])
        if code == 127:
            who = remote.transport.get_username()
            raise EnrollError(
                f"{remote.host}: no zfs command on the PATH of {who} "
                f"({err.strip() or 'not found'}): install ZFS there (zfsutils-linux), or this "
                "is not the source host (a non-root admin's PATH may lack /usr/sbin: enroll "
                "as root)"
            )
        if code != 0 or out.strip() != fs:
            pair = next(p for p in plan.pairs if p.source.fs == fs)
            said = err.strip() or out.strip()
            raise EnrollError(
                f"{remote.host}: source file system {fs} of pair {pair.name}: zfs list says: {said}"
            )


def check_python(remote: Remote) -> None:
    code, out, err = remote.run(
        ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
    )
    wanted = ".".join(map(str, sourceapp.MIN_PYTHON))
    if code != 0:
        said = "not found" if code == 127 else f"exit {code}: {err.strip()}"
        raise EnrollError(
            f"{remote.host}: python3 {said}: zettabee-source needs python3 {wanted} or later "
            "there (apt install python3), or the zettabee package of this version"
        )
    found = tuple(int(n) for n in out.strip().split("."))
    if found < sourceapp.MIN_PYTHON:
        raise EnrollError(
            f"{remote.host}: python3 is {out.strip()}: zettabee-source needs {wanted} or later "
            "(or install the zettabee package of this version there)"
        )


def source_version(remote: Remote, path: str) -> str | None:
    """What ``path --version`` says on the source: None when nothing runs there."""
    code, out, err = remote.run([path, "--version"])
    if code in (126, 127) and not out:
        return None
    words = out.split()
    if code == 0 and len(words) == 2 and words[0] == "zettabee-source":
        return words[1]
    return (
        "older than 0.1.0 (it has no --version)"
        if "arguments" in err
        else f"unknown ({err.strip()[:80]})"
    )


@dataclass(frozen=True)
class Placement:
    """Where zettabee-source is on the source, and whether this enroll writes it."""

    path: str
    install: bool
    found: str | None  # the version found at path


def place_source(remote: Remote, request: Request) -> Placement:
    """The zettabee-source of this version: one in place, else this version's zipapp at
    ``--source-path`` (or /usr/local/bin)."""
    candidates = (request.source_path,) if request.source_path else DEFAULT_SOURCE_PATHS
    found = None
    for path in candidates:
        found = source_version(remote, path)
        if found == __version__:
            return Placement(path, install=False, found=found)
    check_python(remote)
    return Placement(candidates[-1], install=True, found=found)


def install_source(remote: Remote, path: str) -> None:
    """The zipapp written to a temporary name, checked on the source, renamed in place."""
    app = sourceapp.build()
    directory, name = os.path.split(path)
    temporary = f"{directory}/.{name}.zettabee-{os.getpid()}"
    sftp = remote.sftp
    try:
        with sftp.open(temporary, "wb") as handle:
            handle.write(app.data)
        sftp.chmod(temporary, 0o755)
        check = (
            "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"
        )
        code, out, err = remote.run(["python3", "-c", check, temporary])
        if code != 0 or out.strip() != app.sha256:
            raise EnrollError(
                f"{remote.host}: {temporary} is not what was sent (SHA-256 {out.strip() or err.strip()}, sent {app.sha256})"
            )
        sftp.posix_rename(temporary, path)
    except OSError as exc:
        _remove_quietly(sftp, temporary)
        raise EnrollError(
            f"{remote.host}: cannot write {path}: {_sftp_reason(exc)}{_as_whom(exc, remote)}"
        ) from None
    except BaseException:
        _remove_quietly(sftp, temporary)
        raise
    version = source_version(remote, path)
    if version != __version__:
        raise EnrollError(
            f"{remote.host}: {path} installed, but it says version {version}, not {__version__}"
        )


def check_writable(remote: Remote, path: str) -> None:
    """The admin may create ``path`` anew (a temporary file renamed over it): it can
    write its directory, or create that directory in the nearest one it can see."""
    parent = directory = os.path.dirname(path) or "/"
    while directory != "/" and remote.run(["test", "-d", directory])[0] != 0:
        directory = os.path.dirname(directory)
    if remote.run(["test", "-w", directory])[0] == 0:
        return
    who = remote.transport.get_username()
    where = directory if directory == parent else f"{directory} (to make {parent})"
    raise EnrollError(
        f"{remote.host}: {who} may not write in {where}, for {path}: enroll as root "
        "(--admin root), or as the key's own user when the file is in its home; nothing "
        "was changed"
    )


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except OSError:
        pass


def _sftp_reason(exc: OSError) -> str:
    if exc.errno == errno.EACCES:
        return "permission denied"
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    return exc.strerror or str(exc) or type(exc).__name__


def _as_whom(exc: OSError, remote: Remote) -> str:
    if exc.errno != errno.EACCES:
        return ""
    user = remote.transport.get_username()
    return f" for {user} (enroll as root, --admin root, or as the key's own user)"


# -- a delegated user (OpenZFS) ---------------------------------------------------------

# What a pull does on its source file system (README: Least privilege on the source):
# destroy of a snapshot or bookmark needs mount too; bookmark only for pairs that use it.
PULL_PERMISSIONS = ("send", "snapshot", "destroy", "mount", "hold", "release")


def permissions(plan: Plan) -> dict[str, str]:
    """``zfs allow`` of each source file system: exactly what its pairs' pulls use."""
    out = {}
    for fs in plan.datasets:
        names = list(PULL_PERMISSIONS)
        if any(p.options.bookmark for p in plan.pairs if p.source.fs == fs):
            names.append("bookmark")
        out[fs] = ",".join(names)
    return out


def check_delegation(remote: Remote, request: Request, plan: Plan) -> bool:
    """``--user`` can be done here: the pairs log in as that user, the source's zfs has
    ``zfs allow``, and the admin is root. Whether the user must be created."""
    user = request.delegate
    if user is None:
        return False
    if user != plan.target.user or user == "root":
        raise UsageError(
            f"--user {user}: the pairs with their source on {request.host} log in as "
            f"{plan.target.user}: give them user={user} (a non-root user; pair option or "
            "[defaults]) first, so that cron logs in as the user enroll delegates to"
        )
    code, _, err = remote.run(["zfs", "allow", plan.datasets[0]])
    if code != 0:
        raise EnrollError(
            f"{remote.host}: no zfs allow there ({err.strip() or f'exit {code}'}): an older ZFS "
            "port such as zfs-fuse cannot delegate; the key logs in as root there (no --user)"
        )
    code, out, _ = remote.run(["id", "-u"])
    if out.strip() != "0":
        raise EnrollError(
            f"{remote.host}: --user needs --admin root: only root creates users and delegates"
        )
    code, _, _ = remote.run(["getent", "passwd", user])
    return code != 0


def create_user(remote: Remote, user: str) -> None:
    """A system user with a home and a shell, no password but not locked (sshd refuses a
    locked account even its keys)."""
    for argv in (
        ["useradd", "--system", "--create-home", "--shell", "/bin/sh", user],
        ["usermod", "-p", "*", user],
    ):
        code, _, err = remote.run(argv)
        if code != 0:
            raise EnrollError(
                f"{remote.host}: {shlex.join(argv)} failed (exit {code}): {err.strip()}"
            )


def delegate(remote: Remote, user: str, plan: Plan, allow: bool = True) -> None:
    verb = "allow" if allow else "unallow"
    for fs, names in permissions(plan).items():
        argv = ["zfs", verb, "-u", user, names, fs]
        code, _, err = remote.run(argv)
        if code != 0:
            raise EnrollError(
                f"{remote.host}: {shlex.join(argv)} failed (exit {code}): {err.strip()}"
            )


# -- authorized_keys --------------------------------------------------------------------


def keys_path(template: str, who: Account) -> str:
    """sshd's AuthorizedKeysFile tokens: %h the home, %u the user, %% a percent sign;
    a relative path is taken from the home, as sshd does."""
    out, index = [], 0
    while index < len(template):
        char = template[index]
        if char == "%" and index + 1 < len(template):
            token = template[index + 1]
            out.append({"h": who.home, "u": who.user, "%": "%"}.get(token, char + token))
            index += 2
            continue
        out.append(char)
        index += 1
    path = "".join(out)
    return path if path.startswith("/") else f"{who.home.rstrip('/')}/{path}"


@dataclass(frozen=True)
class KeysFile:
    path: str
    text: str
    exists: bool


def read_keys(remote: Remote, path: str) -> KeysFile:
    try:
        with remote.sftp.open(path, "rb") as handle:
            return KeysFile(path, handle.read().decode("utf-8", errors="surrogateescape"), True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return KeysFile(path, "", False)
        raise EnrollError(
            f"{remote.host}: cannot read {path}: {_sftp_reason(exc)}{_as_whom(exc, remote)}"
        ) from None


def write_keys(remote: Remote, old: KeysFile, text: str, owner: Account) -> None:
    """``text`` into the file at once: a temporary file in its directory with the old
    file's owner and mode (0600 and the key user for a new one), renamed over it."""
    sftp = remote.sftp
    directory, name = os.path.split(old.path)
    temporary = f"{directory}/.{name}.zettabee-{os.getpid()}"
    try:
        if old.exists:
            st = sftp.stat(old.path)
            mode, uid, gid = (st.st_mode or 0o600) & 0o7777, st.st_uid, st.st_gid
        else:
            _ensure_directory(remote, directory, owner)
            mode, uid, gid = 0o600, owner.uid, owner.gid
        with sftp.open(temporary, "wb") as handle:
            handle.write(text.encode("utf-8", errors="surrogateescape"))
        sftp.chmod(temporary, mode)
        written = sftp.stat(temporary)
        if (written.st_uid, written.st_gid) != (uid, gid):
            sftp.chown(temporary, uid or 0, gid or 0)
        sftp.posix_rename(temporary, old.path)
    except OSError as exc:
        _remove_quietly(sftp, temporary)
        raise EnrollError(
            f"{remote.host}: cannot write {old.path}: {_sftp_reason(exc)}{_as_whom(exc, remote)}; it is unchanged"
        ) from None


def _ensure_directory(remote: Remote, directory: str, owner: Account) -> None:
    sftp = remote.sftp
    try:
        sftp.stat(directory)
        return
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
    sftp.mkdir(directory, 0o700)
    if directory.rstrip("/").endswith("/.ssh"):
        sftp.chown(directory, owner.uid, owner.gid)


# -- the key of the pairs ---------------------------------------------------------------


def public_key(path: str) -> authkeys.PublicKey | None:
    """The pairs' public key: the .pub beside it, else derived from the private key;
    None when there is no key yet."""
    pub = Path(f"{path}.pub")
    try:
        return authkeys.PublicKey.parse(pub.read_text())
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise EnrollError(f"{pub}: {exc}") from None
    if not Path(path).exists():
        return None
    proc = subprocess.run(["ssh-keygen", "-y", "-f", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EnrollError(f"{path}: ssh-keygen -y cannot read the key: {proc.stderr.strip()}")
    return authkeys.PublicKey.parse(proc.stdout)


def generate_key(path: str) -> authkeys.PublicKey:
    """An ed25519 key without a passphrase (cron uses it unattended), 0600."""
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    comment = f"zettabee@{socket.gethostname()}"
    proc = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if proc.returncode != 0:
        raise EnrollError(f"cannot generate a key at {path}: {proc.stderr.strip()}")
    key = public_key(path)
    assert key is not None
    return key


# -- enroll -----------------------------------------------------------------------------


def from_patterns(remote: Remote, request: Request) -> tuple[str, ...]:
    """Where the key may log in from: as given, else the address the source sees this
    connection come from (``SSH_CONNECTION``)."""
    if request.from_patterns is not None:
        return request.from_patterns
    code, out, _ = remote.run(["printenv", "SSH_CONNECTION"])
    words = out.split()
    if code != 0 or not words:
        raise EnrollError(
            f"{remote.host}: cannot tell the address it sees this host come from: give --from ADDRESS"
        )
    return (words[0],)


def enroll(request: Request, plan: Plan, confirm: Callable[[str], bool] = ask_yes) -> None:
    """Check everything, then install, write the line, pin the key and prove it."""
    remote, offered, to_pin = connect(request, plan.target, confirm)
    try:
        if request.remove:
            _remove(remote, request, plan)
        else:
            _enroll(remote, request, plan, offered, to_pin)
    finally:
        remote.close()


@dataclass(frozen=True)
class Checked:
    """What the checks found on the source, before anything was written."""

    owner: Account
    keys: KeysFile
    placement: Placement
    grant: authkeys.Grant


def _enroll(
    remote: Remote, request: Request, plan: Plan, offered: paramiko.PKey, to_pin: bool
) -> None:
    host, user, dry = request.host, plan.target.user, request.dry_run
    new_user = False
    if request.delegate:  # root's checks first: the user may not exist yet
        check_datasets(remote, plan)
        new_user = check_delegation(remote, request, plan)
    placement = place_source(remote, request)
    if new_user:
        print(f"{host}: {_would(dry)}create the user {user} (no password, not locked)")
        if dry:
            print(f"{host}: (the rest is checked once {user} exists)")
            _print_delegation(host, _would(dry), user, plan)
            return
        create_user(remote, user)
    checked = _check(remote, request, plan, placement)
    if request.delegate:
        _print_delegation(host, _would(dry), user, plan)
        if not dry:
            delegate(remote, user, plan)
    _apply(remote, request, plan, checked)
    if to_pin:
        print(f"{host}: {_would(dry)}pin {offered.get_name()} {sha256_fingerprint(offered)} "
              f"in {plan.target.known_hosts}")  # fmt: skip
        if not dry:
            pin_host_key(plan.target.known_hosts or "", plan.target, offered)
    if not dry:
        prove(plan)


def _would(dry: bool) -> str:
    return "would " if dry else ""


def _check(remote: Remote, request: Request, plan: Plan, placement: Placement) -> Checked:
    """The key user's file may be written, zfs has the file systems, the line can be made."""
    owner = account(remote, plan.target.user)
    path = keys_path(request.authorized_keys, owner)
    check_writable(remote, path)
    if not request.delegate:
        check_datasets(remote, plan)
    if placement.install:
        check_writable(remote, placement.path)
    grant = authkeys.Grant(
        source_command=placement.path,
        datasets=plan.datasets,
        pairs=tuple(p.fingerprint for p in plan.pairs),
        mbuffer_hosts=plan.mbuffer_hosts,
        from_patterns=from_patterns(remote, request),
        trees=plan.trees,
    )
    if grant.problems():
        raise EnrollError(f"{request.host}: {'; '.join(grant.problems())}")
    return Checked(owner, read_keys(remote, path), placement, grant)


def _apply(remote: Remote, request: Request, plan: Plan, checked: Checked) -> None:
    """The pairs' key (generated if missing), zettabee-source, the key line."""
    host, dry, would = request.host, request.dry_run, _would(request.dry_run)
    key = public_key(plan.key_path)
    if key is None:
        print(f"{host}: {would}generate an ed25519 key at {plan.key_path} (the pairs' sshkey)")
        placeholder = authkeys.PublicKey("ssh-ed25519", "NEWKEY", "(generated)")
        key = placeholder if dry else generate_key(plan.key_path)
    placement = checked.placement
    if placement.install:
        had = f" (found: {placement.found})" if placement.found else ""
        print(f"{host}: {would}install zettabee-source {__version__} at {placement.path}{had}")
        if not dry:
            install_source(remote, placement.path)
    else:
        print(f"{host}: zettabee-source {__version__} at {placement.path}")
    keys, owner = checked.keys, checked.owner
    line = authkeys.build_line(checked.grant, key)
    text = authkeys.merge(keys.text, line)
    if text == keys.text:
        print(f"{host}: {keys.path} of {owner.user}: zettabee's line is in place, unchanged")
        return
    verb = (
        "replace zettabee's line in"
        if authkeys.lines_of(keys.text, key)
        else "add zettabee's line to"
    )
    print(f"{host}: {would}{verb} {keys.path} of {owner.user}:\n  {line}")
    if not dry:
        write_keys(remote, keys, text, owner)


def _print_delegation(host: str, would: str, user: str, plan: Plan) -> None:
    for fs, names in permissions(plan).items():
        print(f"{host}: {would}zfs allow -u {user} {names} {fs}")


def prove(plan: Plan) -> None:
    """A pull's first command through the restricted key, with OpenSSH as cron runs it."""
    fs = plan.datasets[0]
    argv = plan.target.ssh_client_argv(shlex.join(["zfs", "list", "-H", "-o", "name", fs]))
    log.debug("prove: %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise EnrollError(
            f"{plan.target.host}: the check through the restricted key did not answer in 60 s"
        ) from None
    if proc.returncode != 0 or proc.stdout.strip() != fs:
        said = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise EnrollError(
            f"{plan.target.host}: enrolled, but a pull's command through the restricted key failed: {said}"
        )
    print(
        f"{plan.target.host}: a pull's command through the restricted key works ({len(plan.pairs)} pairs, {len(plan.datasets)} file systems)"
    )


def _remove(remote: Remote, request: Request, plan: Plan) -> None:
    """Take zettabee's line away, and the zipapp enroll placed when no line uses it."""
    host, dry = request.host, request.dry_run
    would = "would " if dry else ""
    owner = account(remote, plan.target.user)
    keys = read_keys(remote, keys_path(request.authorized_keys, owner))
    key = public_key(plan.key_path)
    text = authkeys.remove(keys.text, key) if key is not None else keys.text
    if text == keys.text:
        print(f"{host}: {keys.path} of {owner.user} has no line of {plan.key_path}")
    else:
        print(f"{host}: {would}remove zettabee's line from {keys.path} of {owner.user}")
        if not dry:
            write_keys(remote, keys, text, owner)
    if request.delegate:
        check_delegation(remote, request, plan)
        for fs, names in permissions(plan).items():
            print(f"{host}: {would}zfs unallow -u {owner.user} {names} {fs}")
        if not dry:
            delegate(remote, owner.user, plan, allow=False)
        if request.remove_user:
            print(f"{host}: {would}remove the user {owner.user} and its home (userdel -r)")
            code, _, err = (0, "", "") if dry else remote.run(["userdel", "-r", owner.user])
            if code != 0:
                raise EnrollError(
                    f"{host}: userdel -r {owner.user} failed (exit {code}): {err.strip()}"
                )
    path = request.source_path or DEFAULT_SOURCE_PATHS[-1]
    if _is_our_zipapp(remote, path) and not authkeys.mentions(text, [path]):
        print(f"{host}: {would}remove the zettabee-source zipapp {path}")
        if not dry:
            try:
                remote.sftp.remove(path)
            except OSError as exc:
                raise EnrollError(f"{host}: cannot remove {path}: {_sftp_reason(exc)}") from None


def _is_our_zipapp(remote: Remote, path: str) -> bool:
    try:
        with remote.sftp.open(path, "rb") as handle:
            return handle.read(len(sourceapp.SHEBANG) + 2) == sourceapp.SHEBANG + b"PK"
    except OSError:
        return False
