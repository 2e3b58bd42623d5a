"""What ``zettabee enroll`` checks and writes on the source, over the administrator's
session: the key user's account, the file systems, python3 and ``zettabee-source``, the
``authorized_keys`` file, the delegated user and its ``zfs allow``, the key."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zettabee import __version__, authkeys, sourceapp
from zettabee.errors import UsageError

if TYPE_CHECKING:
    import paramiko

from zettabee.contact import Remote
from zettabee.enrollplan import DEFAULT_SOURCE_PATHS, EnrollError, Plan, Request

log = logging.getLogger("zettabee.enroll")

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
            f"{remote.host}: cannot write {path}: {sftp_reason(exc)}{_as_whom(exc, remote)}"
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


def sftp_reason(exc: OSError) -> str:
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
            f"{remote.host}: cannot read {path}: {sftp_reason(exc)}{_as_whom(exc, remote)}"
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
            f"{remote.host}: cannot write {old.path}: {sftp_reason(exc)}{_as_whom(exc, remote)}; it is unchanged"
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
