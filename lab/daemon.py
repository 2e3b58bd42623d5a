"""The life cycle the lab's private daemons (``NscaDaemon``, ``Icinga2Daemon``) share.

Each runs one process it started itself, in a work directory of its own that goes away
afterwards unless kept. Used as a context manager it is started on entry and stopped and
cleaned up on exit; a start that fails still removes the directory, because ``__exit__``
does not run then.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self


class LabDaemon(ABC):
    """A daemon the lab started: ``start()`` sets ``_process``, ``stop()`` ends it."""

    _process: subprocess.Popen[bytes] | None
    workdir: Path
    keep_workdir: bool

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()  # __exit__ will not run: do not leave the directory behind
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.cleanup()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def cleanup(self) -> None:
        if self.running:
            self.stop()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to exactly ``process``, SIGKILL if it is still there after ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
