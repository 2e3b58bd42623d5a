"""What ZFS cannot hold: per-pair locks, status files, progress and log files.

File names come from the pair's fingerprint, as in the seed: ``<fp>.lock``,
``<fp>.json``, ``<fp>.progress``, ``<fp>.log``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from zettabee.errors import LockHeld, StateError
from zettabee.records import Record, asdict, field, fields

TYPE_CHECKING = False  # typing for the annotations only: importing it costs every check
if TYPE_CHECKING:
    from typing import Any

IDLE, RUNNING, FAILED, INTERRUPTED = "idle", "running", "failed", "interrupted"


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def write_atomic(path: Path, text: str, mode: int = 0o640, durable: bool = True) -> None:
    """Write a whole file or nothing: readers never see half a status. ``durable``
    also waits for the disk (7-8 ms here), which passing progress does not need."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class StatusUnwritable(StateError):
    """The state directory takes no status file (full, read-only): no run may go on
    that its status could not record."""


class Status(Record):
    """The status file of one pair; unknown keys from newer versions are kept."""

    fingerprint: str
    pair: str = ""
    state: str = IDLE
    action: str = ""
    pid: int | None = None
    started: float | None = None
    ended: float | None = None
    result: str = ""
    bytes: int = 0
    seconds: float = 0.0
    snapshot: str = ""
    error: str = ""
    last_success: float | None = None
    last_duration: float | None = None
    corrupt: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def effective_state(self, lock_held: bool) -> str:
        """A 'running' file whose process is gone means the run was interrupted."""
        if self.state == RUNNING and not lock_held and not pid_alive(self.pid):
            return INTERRUPTED
        return self.state


STATUS_FIELDS = frozenset(fields(Status))

_TEXT = ("pair", "state", "action", "result", "snapshot", "error")
_NUMBERS = ("bytes", "seconds")
_OPTIONAL_NUMBERS = ("pid", "started", "ended", "last_success", "last_duration")


def _wrongly_typed(data: dict[str, Any]) -> str:
    """What in a status file has a type the readers cannot use (empty when nothing).

    The file is ours, but an editor, a full disk or another version can leave anything in
    it; a string where a time belongs must read as a damaged file, not crash the plugin
    that does arithmetic with it."""

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    for key, value in data.items():
        if key in _TEXT and not isinstance(value, str):
            return f"{key} is {value!r}, not text"
        if key in _NUMBERS and not number(value):
            return f"{key} is {value!r}, not a number"
        if key in _OPTIONAL_NUMBERS and value is not None and not number(value):
            return f"{key} is {value!r}, not a number"
    return ""


class StateStore:
    """Directories for status, locks and logs; created by ``setup`` (or on first use)."""

    def __init__(self, state_dir: str | Path, lock_dir: str | Path, log_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.lock_dir = Path(lock_dir)
        self.log_dir = Path(log_dir)

    def ensure_dirs(self) -> None:
        for path in (self.state_dir, self.lock_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o750)
            # Keep a set-group-ID bit: it is how the monitoring group keeps reading the
            # status files that every run writes anew (icinga-conf/README.md).
            os.chmod(path, 0o750 | (path.stat().st_mode & stat.S_ISGID))

    def status_path(self, fp: str) -> Path:
        return self.state_dir / f"{fp}.json"

    def progress_path(self, fp: str) -> Path:
        return self.state_dir / f"{fp}.progress"

    def lock_path(self, fp: str) -> Path:
        return self.lock_dir / f"{fp}.lock"

    def log_path(self, fp: str) -> Path:
        return self.log_dir / f"{fp}.log"

    def log_handler(self, fp: str) -> logging.FileHandler:
        """A handler appending to the pair's log file, created 0640 whatever the umask.

        logging.FileHandler would create it 0666 under umask 000 (cron jobs and some
        daemons run with one), letting anyone rewrite the record of what was done."""
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        path = self.log_path(fp)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o022:  # left loose by an older version
                os.fchmod(fd, mode & ~0o022)
        finally:
            os.close(fd)
        return logging.FileHandler(path)

    def read_status(self, fp: str) -> Status:
        path = self.status_path(fp)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return Status(fingerprint=fp)
        except (OSError, ValueError) as exc:
            return Status(fingerprint=fp, corrupt=f"status file {path} unreadable: {exc}")
        if not isinstance(data, dict):
            return Status(fingerprint=fp, corrupt=f"status file {path} is not a JSON object")
        known = {k: v for k, v in data.items() if k in STATUS_FIELDS}
        extra = {k: v for k, v in data.items() if k not in STATUS_FIELDS}
        known["fingerprint"] = fp
        wrong = _wrongly_typed(known)
        if wrong:
            return Status(fingerprint=fp, corrupt=f"status file {path} malformed: {wrong}")
        try:
            status = Status(**known)
        except TypeError as exc:
            return Status(fingerprint=fp, corrupt=f"status file {path} malformed: {exc}")
        status.extra = extra
        return status

    def unwritable(self) -> str:
        """Why no run can write its status here now (the state directory's file system
        full or read-only), or "" (also when that cannot be told: no such directory)."""
        try:
            fs = os.statvfs(self.state_dir)
        except OSError:
            return ""
        if fs.f_flag & os.ST_RDONLY:
            why = "is on a read-only file system"
        elif fs.f_bfree == 0 or fs.f_ffree == 0:
            why = "is full"
        else:
            return ""
        return (
            f"the state directory {self.state_dir} {why}: every run fails before it starts, "
            "unable to write its status; free space there or make it writable"
        )

    def write_status(self, status: Status) -> None:
        """Write the pair's status file; :class:`StatusUnwritable` names the directory,
        the cause and the fix when it cannot be written (a full or read-only disk)."""
        data = asdict(status)
        extra = data.pop("extra")
        data.pop("corrupt")
        data.update(extra)
        path = self.status_path(status.fingerprint)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            write_atomic(path, json.dumps(data, indent=1) + "\n")
        except OSError as exc:
            raise StatusUnwritable(
                f"cannot write the status file {path}: {exc.strerror or exc}; every run "
                f"records its outcome in {self.state_dir} ([paths] state_dir), where "
                "check_zettabee_runtime reads it: free space on its file system or make it "
                "writable, then run again"
            ) from exc

    def write_progress(self, fp: str, progress: dict[str, Any]) -> None:
        write_atomic(self.progress_path(fp), json.dumps(progress) + "\n", durable=False)

    def read_progress(self, fp: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.progress_path(fp).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def clear_progress(self, fp: str) -> None:
        self.progress_path(fp).unlink(missing_ok=True)

    def lock_holder(self, fp: str) -> dict[str, Any] | None:
        """Who holds the pair's lock right now (None when nobody does)."""
        path = self.lock_path(fp)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    info = json.loads(os.read(fd, 4096) or b"{}")
                except ValueError:
                    info = {}
                return info if isinstance(info, dict) else {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, fp: str, pair: str, action: str) -> Iterator[None]:
        """An flock the kernel releases when the process dies, however it dies.

        The lock file is never removed, by anyone: a run that opened it before it was
        removed would hold a lock on a file no one else can open, and the next run would
        lock a new one beside it."""

        def busy(info: dict[str, Any]) -> LockHeld:
            since = info.get("started")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
            return LockHeld(
                f"{pair}: another {info.get('action', 'run')} is in progress "
                f"(pid {info.get('pid', '?')}, since {when}); not starting a second one",
                pid=info.get("pid"),
            )

        with self._locked(fp, action, busy):
            yield

    @contextlib.contextmanager
    def _locked(
        self, fp: str, action: str, busy: Callable[[dict[str, Any]], LockHeld]
    ) -> Iterator[int]:
        """The pair's lock, held with a record of who holds it; ``busy`` makes the error
        when another process holds it, from that one's record."""
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.lock_path(fp), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy(_lock_record(fd)) from None
            record = json.dumps({"pid": os.getpid(), "started": time.time(), "action": action})
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
            yield fd
        finally:
            os.close(fd)

    def unlock(self, fp: str, pair: str) -> str:
        """Clear what an interrupted run left behind; refuse while a live process works.

        Done holding the pair's lock, as a run does: a run that starts meanwhile is
        refused, and a run that got there first makes unlock refuse. The lock file stays
        (see :meth:`lock`); its record of the run that is gone is cleared."""

        def busy(info: dict[str, Any]) -> LockHeld:
            return LockHeld(
                f"{pair}: pid {info.get('pid', '?')} is running {info.get('action', 'a run')}"
                " right now; unlock refuses (stop that process first if it is really stuck)",
                pid=info.get("pid"),
            )

        with self._locked(fp, "unlock", busy) as fd:
            status = self.read_status(fp)
            self.clear_progress(fp)
            said = f"{pair}: not locked"
            if status.state in (RUNNING, INTERRUPTED) or status.corrupt:
                previous = status.corrupt or f"state {status.state} (pid {status.pid})"
                status.state = FAILED if status.state != IDLE else IDLE
                status.error = f"unlocked by operator after {previous}"
                status.pid = None
                status.corrupt = ""
                self.write_status(status)
                said = f"{pair}: cleared {previous}; the next update checks consistency first"
            os.ftruncate(fd, 0)
            return said


def _lock_record(fd: int) -> dict[str, Any]:
    """What the lock file says of its holder (empty when it says nothing readable)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def require_not_running(store: StateStore, fp: str, pair: str) -> None:
    holder = store.lock_holder(fp)
    if holder is not None:
        raise StateError(f"{pair}: busy, pid {holder.get('pid', '?')} holds the lock")
