"""A bounded on-disk queue for results the monitoring system could not take.

When the NSCA daemon or the Icinga API is down at the end of a cron run, the results are
kept here and sent with the next run, oldest first, so that the monitoring history stays
in order and a maintenance window does not hide a failed replication.

Layout: ``<path>/<backend name>/<ns timestamp>-<pid>-<seq>.json``, one result per file,
written to a temporary name and renamed (a crash never leaves half a result), mode 0600
in 0700 directories (outputs can name hosts and datasets). The name sorts by age.

Bounded: past ``max_items`` per back end the oldest results are dropped, with a warning
and a count, rather than filling the disk during a long outage; the newest results say
the most about the present.

Two processes (two cron runs) may flush at once: ``flush`` takes an exclusive ``flock``
on the back end's directory and a second flusher returns at once with ``busy`` set instead
of sending the same results twice. The kernel drops the lock if the process dies.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nsca.errors import SubmitError
from nsca.result import PassiveResult

if TYPE_CHECKING:
    from nsca.backends import Backend

log = logging.getLogger(__name__)

RECORD_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENTRY = re.compile(r"^\d{20}-\d+-\d+\.json$")
_sequence = itertools.count()


@dataclass(frozen=True)
class SpooledResult:
    path: Path
    result: PassiveResult
    queued_at: float


@dataclass(frozen=True)
class FlushReport:
    """What a flush did. ``error`` is the failure that stopped it (or rejected results)."""

    delivered: int = 0
    rejected: int = 0
    remaining: int = 0
    busy: bool = False
    error: SubmitError | None = None

    @property
    def complete(self) -> bool:
        return not self.busy and self.remaining == 0


class Spool:
    """Per-back-end queues of undelivered results under ``path``."""

    def __init__(self, path: str | os.PathLike[str], max_items: int = 10000) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.path = Path(path)
        self.max_items = max_items

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r}, max_items={self.max_items})"

    # writing -----------------------------------------------------------------------------

    def put(self, backend_name: str, results: Sequence[PassiveResult]) -> int:
        """Queue ``results``; return how many old results were dropped to stay bounded."""
        directory = self._directory(backend_name, create=True)
        for result in results:
            self._write(directory, result)
        _fsync_directory(directory)
        return self._enforce_bound(backend_name, directory)

    def _write(self, directory: Path, result: PassiveResult) -> Path:
        now = time.time_ns()
        name = f"{now:020d}-{os.getpid()}-{next(_sequence):09d}.json"
        record = {"version": RECORD_VERSION, "queued_at": now / 1e9, "result": result.to_dict()}
        temporary = directory / f".tmp-{name}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle, ensure_ascii=False)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, directory / name)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return directory / name

    def _enforce_bound(self, backend_name: str, directory: Path) -> int:
        names = self._names(directory)
        excess = len(names) - self.max_items
        if excess <= 0:
            return 0
        for name in names[:excess]:
            (directory / name).unlink(missing_ok=True)
        log.warning(
            "spool %s for %s is full (max %d results): dropped the %d oldest",
            directory,
            backend_name,
            self.max_items,
            excess,
        )
        return excess

    # reading -----------------------------------------------------------------------------

    def pending(self, backend_name: str) -> list[PassiveResult]:
        """The queued results, oldest first."""
        return [entry.result for entry in self.entries(backend_name)]

    def count(self, backend_name: str) -> int:
        directory = self._directory(backend_name)
        return len(self._names(directory)) if directory.is_dir() else 0

    def entries(self, backend_name: str) -> list[SpooledResult]:
        """The queued results with their files, oldest first; unreadable files set aside."""
        directory = self._directory(backend_name)
        if not directory.is_dir():
            return []
        entries = []
        for name in self._names(directory):
            path = directory / name
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                result = PassiveResult.from_dict(record["result"])
                queued_at = float(record.get("queued_at", 0))
            except FileNotFoundError:
                continue  # delivered or dropped by another process meanwhile
            except (ValueError, KeyError, TypeError) as exc:
                log.error("spool file %s is unreadable (%s); renamed to *.bad", path, exc)
                path.rename(path.with_suffix(".bad"))
                continue
            entries.append(SpooledResult(path, result, queued_at))
        return entries

    # delivering --------------------------------------------------------------------------

    def flush(self, backend_name: str, backend: Backend, *, batch_size: int = 100) -> FlushReport:
        """Resubmit queued results through ``backend``, oldest first.

        Delivered results are deleted. On a failure the undelivered ones stay for the
        next flush, except results the server refused for their own sake (an unknown
        service, say), which can never succeed: they are dropped and logged as errors.
        """
        directory = self._directory(backend_name)
        if not directory.is_dir():
            return FlushReport()
        with self._flush_lock(directory) as locked:
            if not locked:
                log.info("spool %s: another process is flushing it", directory)
                return FlushReport(busy=True, remaining=self.count(backend_name))
            entries = self.entries(backend_name)
            delivered = rejected = 0
            error: SubmitError | None = None
            for start in range(0, len(entries), batch_size):
                batch = entries[start : start + batch_size]
                try:
                    backend.submit([entry.result for entry in batch])
                except SubmitError as exc:
                    undelivered = (
                        {e.result for e in batch}
                        if exc.undelivered is None
                        else set(exc.undelivered)
                    )
                    refused = set(exc.rejected)
                    kept = 0
                    for entry in batch:
                        if entry.result in refused:
                            log.error(
                                "dropping spooled result for %s (%s): %s",
                                entry.result.object_name,
                                backend_name,
                                exc.message,
                            )
                            entry.path.unlink(missing_ok=True)
                            rejected += 1
                        elif entry.result in undelivered:
                            kept += 1
                        else:
                            entry.path.unlink(missing_ok=True)
                            delivered += 1
                    error = exc
                    if kept:
                        break
                else:
                    for entry in batch:
                        entry.path.unlink(missing_ok=True)
                    delivered += len(batch)
            remaining = len(self._names(directory))
            if delivered or rejected:
                log.info(
                    "spool %s: %d delivered, %d rejected, %d remaining",
                    backend_name,
                    delivered,
                    rejected,
                    remaining,
                )
            return FlushReport(delivered, rejected, remaining, False, error)

    # helpers -----------------------------------------------------------------------------

    def _directory(self, backend_name: str, create: bool = False) -> Path:
        if not _NAME.match(backend_name):
            raise ValueError(f"back-end name {backend_name!r} cannot name a spool directory")
        directory = self.path / backend_name
        if create:
            for level in (self.path, directory):
                level.mkdir(mode=0o700, exist_ok=True)
                os.chmod(level, 0o700)
        return directory

    @staticmethod
    def _names(directory: Path) -> list[str]:
        try:
            return sorted(n for n in os.listdir(directory) if _ENTRY.match(n))
        except FileNotFoundError:
            return []

    @staticmethod
    @contextmanager
    def _flush_lock(directory: Path) -> Iterator[bool]:
        fd = os.open(directory / ".flush.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                yield False
                return
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable: without it a power cut can forget a queued result."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
