"""Where a run's log lines go: stderr for the one who ran it (cron mails it), and each
pair's own log file (``zettabee logfile``) while that pair is worked on.

``zettabee`` and ``replicate`` set them up here, the same way.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported before a run has started its connections
    from zettabee.pair import Pair
    from zettabee.state import StateStore

log = logging.getLogger("zettabee")


def setup(prog: str, verbose: bool, debug: bool, loggers: tuple[str, ...] = ("zettabee",)) -> None:
    """One handler on stderr, ``PROG: message``, for each of ``loggers``: warnings and
    errors; what was done with ``verbose``; every command and timing with ``debug``."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    handler.setLevel(level)
    for name in loggers:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG)


class PairLog:
    """Appends a run's log lines to the pair's own log file, from ``with`` to its end.

    With ``this_thread_only`` (several pairs at once) the file takes only the lines of
    the thread that opened it, and of the helper threads that carry its name (see
    :class:`zettabee.replicator.Background`). A log file that cannot be written is
    said once and does not stop the run."""

    def __init__(self, store: StateStore, pair: Pair, debug: bool, this_thread_only: bool) -> None:
        self.store, self.pair, self.debug = store, pair, debug
        self.this_thread_only = this_thread_only
        self.handler: logging.Handler | None = None

    def __enter__(self) -> PairLog:
        pair = self.pair
        try:
            handler: logging.Handler = self.store.log_handler(pair.fingerprint)
        except OSError as exc:
            log.warning("%s: cannot write its log file: %s", pair.name, exc)
            return self
        if self.this_thread_only:
            thread = threading.current_thread().name
            handler.addFilter(lambda record: record.threadName == thread)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [{pair.name}] %(message)s")
        )
        handler.setLevel(logging.DEBUG if self.debug else logging.INFO)
        logging.getLogger("zettabee").addHandler(handler)
        self.handler = handler
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.handler is not None:
            logging.getLogger("zettabee").removeHandler(self.handler)
            self.handler.close()
            self.handler = None
