"""Typed errors.

Every error a user can meet carries enough to act on: the command that failed, where it
ran and what the tool itself said. ``transient`` tells a scheduler whether trying again
later can help (a dropped link) or not (a missing dataset).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from zettabee.records import Record


class ZettabeeError(Exception):
    """Base of every error zettabee raises on purpose."""

    transient = False


class Problem(Record, frozen=True):
    """One thing wrong in a configuration file, with its place."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


class ConfigError(ZettabeeError):
    """A configuration file (or argument) that cannot be used; lists every problem found."""

    def __init__(self, problems: Sequence[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", 0, problems)]
        self.problems = list(problems)
        super().__init__("\n".join(str(p).lstrip(": ") for p in self.problems))


class UsageError(ZettabeeError):
    """The command line asks for something that cannot be done."""


class CommandError(ZettabeeError):
    """A command exited non-zero; keeps its argv, host and real stderr."""

    def __init__(
        self,
        argv: Sequence[str],
        host: str,
        returncode: int,
        stderr: str,
        stage: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.host = host
        self.returncode = returncode
        self.stderr = stderr.strip()
        self.stage = stage or (argv[0] if argv else "?")
        super().__init__(self._describe())

    def _describe(self) -> str:
        usage = re.search(_USAGE, self.stderr)
        if usage is None:
            said = last_lines(self.stderr) or "no error output"
        else:
            # The tool's complaint comes before its usage text, whose last lines say nothing.
            tool = self.argv[0] if self.argv else self.stage
            said = (
                last_lines(self.stderr[: usage.start()]) or "no complaint"
            ) + f" (then its usage: the {tool} there does not take the command zettabee gave)"
        return f"{self.stage} on {self.host} failed (exit {self.returncode}): {said}"


# The line where a tool starts its usage text, after what it complained of (as text: re
# compiles it when a command fails, not in every check).
_USAGE = r"(?im)^\s*usage:"


def last_lines(text: str, count: int = 3) -> str:
    """What a tool said last, on one line: its last ``count`` lines that are not blank
    (zfs wraps some messages over two)."""
    return "; ".join([line.strip() for line in text.splitlines() if line.strip()][-count:])


class ZfsError(CommandError):
    """A zfs or zpool command failed."""


class TransportError(ZettabeeError):
    """The control connection or the data stream failed."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class StateError(ZettabeeError):
    """The pair's replicas are not in a state that lets the action go on safely."""


class LockHeld(ZettabeeError):
    """Another live process is working on the pair."""

    transient = True

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


def naming_pair(pair: str, exc: BaseException) -> str:
    """The error as one line that starts with its pair.

    Errors of the engine's own checks name the pair already; errors of a host (a refused
    connection, say) cannot, because pairs share their hosts. With many pairs in one run,
    a line without the pair leaves the operator guessing which one stopped."""
    text = str(exc)
    return text if text.startswith(f"{pair}: ") else f"{pair}: {text}"
