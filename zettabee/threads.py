"""One call in a background thread, and waiting for several: the engine's one idiom for
doing things at once (each is a command that mostly waits, on the network or on ZFS)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """One call run in a thread, its outcome collected later with :meth:`result`.

    The thread carries its parent's name: a pair's log (``replicate``) keeps the lines of
    the threads that work for it."""

    def __init__(self, call: Callable[[], T]) -> None:
        self._call = call
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=threading.current_thread().name, daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set, since no error


def wait_all(calls: list[Background[T]]) -> list[T]:
    """Wait for every call, then raise the first failure: none is left running. What
    each returned, in order."""
    values, errors = [], []
    for call in calls:
        try:
            values.append(call.result())
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return values
