"""replicate: the cron job. Updates pairs, several at once with --jobs, then reports each
pair's lag and runtime to the monitoring system as passive results.

Quiet on success, like the seed's cron runs: problems go to stderr (cron mails them), and
--verbose says what was done.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NoReturn, Protocol

from zettabee import __version__, logs
from zettabee.cli import App
from zettabee.errors import ConfigError, LockHeld, UsageError, ZettabeeError, naming_pair
from zettabee.hosts import Hosts
from zettabee.pair import Pair
from zettabee.replicator import Replicator
from zettabee.state import StateStore
from zettabee.tree import Tree, expand, gone_note
from zettabee.views import Prefetch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Pairs from one source share its control connection; OpenSSH's sshd allows 10 sessions
# (channels) per connection by default (MaxSessions), one of which is the connection's
# own (its lifeline, see zettabee.host), so fewer pairs than that use it at once.
PER_SOURCE = 8

log = logging.getLogger("zettabee.replicate")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="replicate",
        usage="%(prog)s [DESTINATION...|--all] [--jobs N] [--config PAIRFILE] "
        "[--settings INIFILE] [--no-passive] [--debug] [--verbose]",
        description="Update zettabee pairs (the cron job), then submit each pair's lag and "
        "runtime as passive check results to the back ends of the settings' [monitoring] "
        "passive. A failing pair never stops the others; results the monitoring system "
        "cannot take now are spooled and sent first by the next run.",
        epilog="Exit status: 0 every pair updated (a pair that another run still holds is "
        "skipped, not failed: check_zettabee_runtime watches that run), 1 a pair failed or "
        "a line of the pair file is broken (with --all), 2 usage or configuration error. "
        "Nothing is printed on success. Example crontab line: "
        "*/15 * * * * root replicate --all --jobs 4",
    )
    parser.add_argument("destination", nargs="*", metavar="DESTINATION",
                        help="pairs to update: host:pool/fs, pool/fs, fingerprint or last component")  # fmt: skip
    parser.add_argument("--all", action="store_true", help="every pair of the pair file")
    parser.add_argument("-j", "--jobs", type=_jobs, default=1, metavar="N",
                        help=f"update up to N pairs at once (default 1; at most {PER_SOURCE} "
                        "from the same source host)")  # fmt: skip
    parser.add_argument("-c", "--config", metavar="PAIRFILE",
                        help="pair file (default: [paths] pairs of the settings)")  # fmt: skip
    parser.add_argument("--settings", metavar="INIFILE",
                        help="settings file (default: $ZETTABEE_SETTINGS or /etc/zettabee/zettabee.ini)")  # fmt: skip
    parser.add_argument("--no-passive", action="store_true",
                        help="do not submit passive results (nor send the spooled ones)")  # fmt: skip
    parser.add_argument("--debug", action="store_true",
                        help="log every command as one could paste it, and timings")  # fmt: skip
    parser.add_argument(
        "--verbose", action="store_true", help="say what is done, not only what fails"
    )
    parser.add_argument(
        "--version", action="version", version=f"replicate (zettabee {__version__})"
    )
    return parser


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of jobs (1 or more)")
    return int(text)


class Updater(Protocol):
    """What the scheduler needs of the engine (:class:`Replicator`, or a test's stand-in)."""

    store: StateStore

    def update(self, pair: Pair) -> object: ...

    def initialize(self, pair: Pair) -> object: ...

    def prefetch_destinations(self, pairs: list[Pair]) -> None: ...


def update_one(
    replicator: Updater,
    pair: Pair,
    gate: threading.Semaphore,
    debug: bool,
    initialize: bool = False,
    after: Future[ZettabeeError | None] | None = None,
    after_new: bool = False,
) -> ZettabeeError | None:
    """Update one pair (``initialize``: a child the destination lacks, initialized);
    whatever happens is returned, never raised, so the others go on. ``after``: the run
    of the pair whose destination is this one's parent, which must exist first (it does
    not when that run, an initialize (``after_new``), failed: this one waits for the next
    run, and the parent's failure says why)."""
    # Submitted before this one, the parent's run is running or done, never queued behind.
    if after is not None and after.result() is not None and initialize and after_new:
        log.info("%s: not initialized: its parent's initialize failed", pair.name)
        return None
    with logs.PairLog(replicator.store, pair, debug, this_thread_only=True):
        try:
            with gate:
                if initialize:
                    replicator.initialize(pair)
                    log.info("%s: initialized: a child new to the destination", pair.name)
                else:
                    replicator.update(pair)  # logs what it did at info level (--verbose)
            return None
        except LockHeld as exc:
            log.info("%s: skipped: %s", pair.name, exc)
            return exc
        except ZettabeeError as exc:
            log.error("%s", naming_pair(pair.name, exc))
            return exc
        except Exception as exc:  # a bug in one pair's run must not take the others down
            log.exception("%s: unexpected error", pair.name)
            return ZettabeeError(f"{pair.name}: unexpected error: {exc!r}")


def _prefetch(replicator: Updater, pairs: Sequence[Pair]) -> None:
    """List the destinations here in one call (each update would list its own)."""
    try:
        replicator.prefetch_destinations(list(pairs))
    except Exception as exc:  # an update that finds no listing makes its own
        log.debug("no listing of the destinations ahead: %s", exc)


def run_fleet(
    replicator: Updater,
    pairs: Sequence[Pair],
    jobs: int,
    debug: bool,
    initialize: frozenset[str] = frozenset(),
) -> dict[str, ZettabeeError | None]:
    """Update ``pairs``, up to ``jobs`` at once and at most :data:`PER_SOURCE` of one
    source host; each pair's outcome by fingerprint (None: updated). The pairs whose
    fingerprint is in ``initialize`` are initialized instead; a pair whose destination's
    parent is another's destination (a tree's child) starts once that one has ended."""
    width = min(jobs, PER_SOURCE)
    gates = {pair.source.host: threading.BoundedSemaphore(width) for pair in pairs}
    by_destination: dict[str, Future[ZettabeeError | None]] = {}
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="replicate") as pool:
        if len(pairs) > jobs:  # the first pairs start at once, the rest find it done
            threading.Thread(
                target=_prefetch, args=(replicator, pairs), name="prefetch", daemon=True
            ).start()
        futures = {}
        new: set[str] = set()  # destinations this run initializes
        for pair in pairs:
            parent = pair.destination.fs.rpartition("/")[0] if pair.is_child else ""
            future = pool.submit(
                update_one, replicator, pair, gates[pair.source.host], debug,
                pair.fingerprint in initialize, by_destination.get(parent), parent in new,
            )  # fmt: skip
            futures[pair.fingerprint] = by_destination[pair.destination.fs] = future
            if pair.fingerprint in initialize:
                new.add(pair.destination.fs)
        return {fp: future.result() for fp, future in futures.items()}


def fleet_plan(
    trees: Sequence[Tree],
) -> tuple[list[Pair], frozenset[str], dict[str, ZettabeeError]]:
    """The pairs a run updates, the children it initializes, and the lines whose tree
    could not be listed (their own pair still runs). A line not initialized yet keeps its
    children back: its own update says what to do."""
    pairs: list[Pair] = []
    new: set[str] = set()
    errors: dict[str, ZettabeeError] = {}
    for tree in trees:
        if tree.error is not None:
            errors[tree.line.fingerprint] = tree.error
            pairs.append(tree.line)
            continue
        for pair in tree.pairs:
            if pair.is_child and tree.line.fingerprint in tree.new:
                continue
            pairs.append(pair)
            if pair.is_child and pair.fingerprint in tree.new:
                new.add(pair.fingerprint)
        for gone in tree.gone:
            log.warning("%s", gone_note(gone))
    return pairs, frozenset(new), errors


def update_all(
    app: App, pairs: Sequence[Pair], jobs: int, debug: bool
) -> dict[str, ZettabeeError | None]:
    """:func:`run_fleet` with one registry of hosts (and connections) for every thread."""
    hosts = Hosts(app.settings.known_hosts, probe_cache=app.settings.state_dir)
    try:
        replicator = Replicator(app.store, hosts, prefetch=Prefetch(hosts))
        trees = expand(pairs, hosts.get, app.settings.state_dir, app.pairfile.pairs)
        run, new, unlisted = fleet_plan(trees)
        errors: dict[str, ZettabeeError | None] = dict(run_fleet(replicator, run, jobs, debug, new))
        for fp, error in unlisted.items():
            errors[fp] = errors.get(fp) or error
        return errors
    finally:
        hosts.close()


def submit(app: App, pairs: Sequence[Pair], errors: dict[str, ZettabeeError | None]) -> None:
    """Every pair's lag and runtime to the settings' passive back ends."""
    from zettabee.passive import submit_pair_results

    for delivery in submit_pair_results(app.settings, app.store, pairs, errors, "update"):
        log.info(
            "passive %s: %d delivered, %d from the spool, %d spooled, %d rejected, %d lost",
            delivery.backend, delivery.delivered, delivery.resent, delivery.spooled,
            delivery.rejected, delivery.lost,
        )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup("replicate", args.verbose, args.debug, loggers=("zettabee", "nsca"))
    try:
        if args.all and args.destination:
            raise UsageError("give destinations or --all, not both")
        if not args.all and not args.destination:
            raise UsageError("name the pairs to update, or --all")
        app = App(args)
        app.report_problems()
        pairs = app.select(args.destination, all_when_empty=args.all)
    except (UsageError, ConfigError) as exc:
        print(f"replicate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    errors = update_all(app, pairs, args.jobs, args.debug)
    if not args.no_passive and app.settings.passive:
        submit(app, pairs, errors)
    failed = [
        fp for fp, error in errors.items() if error is not None and not isinstance(error, LockHeld)
    ]
    if failed or (args.all and app.pairfile.problems):
        return EXIT_FAILED
    return EXIT_OK
