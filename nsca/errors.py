"""The errors of the passive-submission package.

Callers catch one type, :class:`SubmitError`, whatever the back end. It names the back end
and says why in words an admin can act on, and ``transient`` tells a caller (the spool)
whether keeping the results and trying later can help (daemon down, timeout) or not
(wrong credentials, unknown object). Secrets never enter the message: the back ends build
messages from host names, ports, URLs and user names only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nsca.result import PassiveResult


class SubmitError(Exception):
    """Results could not be handed to the monitoring system.

    ``undelivered`` lists the results that were not handed over (``None``: assume none
    of them was). ``rejected`` is the subset the server refused for reasons tied to the
    result itself (no such host or service object, an invalid exit status): submitting
    them again can never succeed, so the spool drops them instead of retrying forever.
    """

    def __init__(
        self,
        backend: str,
        message: str,
        *,
        transient: bool = False,
        undelivered: Sequence[PassiveResult] | None = None,
        rejected: Sequence[PassiveResult] = (),
    ) -> None:
        self.backend = backend
        self.message = message
        self.transient = transient
        self.undelivered = None if undelivered is None else tuple(undelivered)
        self.rejected = tuple(rejected)
        super().__init__(f"{backend}: {message}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, message={self.message!r}, "
            f"transient={self.transient})"
        )


class NscaError(SubmitError):
    """The NSCA client failed: connection, timeout, a broken init packet, a result too big."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool = True,
        undelivered: Sequence[PassiveResult] | None = None,
        rejected: Sequence[PassiveResult] = (),
    ) -> None:
        super().__init__(
            "nsca", message, transient=transient, undelivered=undelivered, rejected=rejected
        )


class BackendConfigError(ValueError):
    """Back-end options that cannot be used; lists every problem at once."""

    def __init__(self, kind: str, problems: Sequence[str]) -> None:
        self.kind = kind
        self.problems = list(problems)
        super().__init__(f"back end {kind!r}: " + "; ".join(self.problems))
