"""Passive results after a run: the plugins' own checks, handed to the monitoring system.

For every pair two results go out, the lag service and the runtime service (names from
the settings' ``service_template``), with the state, text and perfdata that the active
plugins would print at that moment: both are evaluated by :mod:`zettabee.checks`.

The monitoring system never fails a replication: when a back end is down, misconfigured
or slow, the results wait in the spool (``[paths] spool_dir``) and the next run sends
them first, oldest first, before its own. Only a problem with the spool itself loses
results, and that is logged as an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nsca.backends import Backend, BackendConfigError, make_backend
from nsca.errors import SubmitError
from nsca.result import PassiveResult
from nsca.spool import Spool
from zettabee import checks, records
from zettabee.config import Settings
from zettabee.errors import LockHeld, ZettabeeError
from zettabee.health import Health, read_health
from zettabee.pair import Pair
from zettabee.state import FAILED, StateStore

log = logging.getLogger(__name__)


@dataclass
class Delivery:
    """What happened to one run's results at one back end."""

    backend: str
    delivered: int = 0  # this run's results, handed over
    resent: int = 0  # results from the spool, handed over first
    spooled: int = 0  # this run's results, kept for the next run
    rejected: int = 0  # refused by the server for their own sake (unknown service ...)
    lost: int = 0  # could be neither delivered nor spooled
    error: str = ""


def pair_results(
    settings: Settings,
    store: StateStore,
    pairs: Sequence[Pair],
    errors: Mapping[str, ZettabeeError | None] | None = None,
    action: str = "update",
) -> list[PassiveResult]:
    """The lag and runtime results of ``pairs``, from one ``zfs get`` for all of them.

    ``errors`` maps a fingerprint to the error the run just met (None: it went well). The
    status file already says so when the replicator got far enough to write it; the
    error is laid over the health in case it did not, so a failure is never reported OK.
    A pair skipped because another run holds its lock is not a failure: its results show
    that run.
    """
    errors = errors or {}
    host = settings.monitoring_host()
    results = []
    measured_at = time.time()
    # One service per pair line: a recursive line's children are in its long text.
    trees = [checks.tree_pairs(pair, settings.state_dir) for pair in pairs]
    members = [[*tree, *gone] for tree, gone in trees]
    gone = frozenset(p.fingerprint for _, lost in trees for p in lost)
    healths = iter(read_health([p for group in members for p in group], store))
    for pair, group in zip(pairs, members, strict=True):
        found = [next(healths) for _ in group]
        found = [_with_failure(h, errors.get(h.pair.fingerprint), action) for h in found]
        for check, make in (("lag", checks.lag_check), ("runtime", checks.runtime_check)):
            outcome = checks.evaluate(make(checks.given(found, gone)), long=len(found) > 1)
            results.append(
                PassiveResult(
                    host,
                    settings.service_name(pair, check),
                    outcome.code,
                    outcome.output,
                    list(outcome.perfdata),
                    measured_at,
                )
            )
    return results


def _with_failure(health: Health, error: ZettabeeError | None, action: str) -> Health:
    if error is None or isinstance(error, LockHeld) or health.status is None:
        return health
    status = health.status
    if health.run_state == FAILED and status.error:
        return health
    status = records.replace(status, error=str(error), action=status.action or action)
    return records.replace(health, run_state=FAILED, status=status)


def submit_pair_results(
    settings: Settings,
    store: StateStore,
    pairs: Sequence[Pair],
    errors: Mapping[str, ZettabeeError | None],
    action: str,
) -> list[Delivery]:
    """Submit the pairs' results to every back end of ``[monitoring] passive``.

    Never raises for the monitoring system's sake: what cannot be delivered is spooled,
    and what goes wrong is logged (a warning when results wait, an error when some are
    lost or the back end's settings are wrong).
    """
    if not settings.passive:
        log.warning(
            "passive results requested, but [monitoring] passive in %s names no back end",
            settings.path or "the settings",
        )
        return []
    if not pairs:
        return []
    try:
        results = pair_results(settings, store, pairs, errors, action)
    except Exception:  # the run itself is done; a reporting bug must not turn it into a failure
        log.exception("cannot evaluate the passive results")
        return []
    spool = Spool(settings.spool_dir)
    return [
        deliver(name, settings.backends.get(name, {}), results, spool) for name in settings.passive
    ]


def deliver(
    name: str, options: Mapping[str, str], results: Sequence[PassiveResult], spool: Spool
) -> Delivery:
    """Send the spool's backlog, then ``results``, to the back end ``name``; spool the rest."""
    delivery = Delivery(name)
    try:
        backend = make_backend(name, options)
    except BackendConfigError as exc:
        delivery.error = str(exc)
        log.error("passive: %s; the results wait in the spool until it is fixed", exc)
        _spool(spool, name, results, delivery)
        return delivery
    try:
        _deliver(name, backend, results, spool, delivery)
    except Exception as exc:  # the monitoring system must never fail the run
        delivery.error = str(exc)
        log.exception("passive: %s: unexpected failure", name)
        delivery.lost = len(results) - delivery.delivered - delivery.spooled
    return delivery


def _deliver(
    name: str, backend: Backend, results: Sequence[PassiveResult], spool: Spool, delivery: Delivery
) -> None:
    flushed = spool.flush(name, backend)
    delivery.resent = flushed.delivered
    delivery.rejected = flushed.rejected
    if not flushed.complete:
        # Older results wait: this run's go behind them, so the history stays in order.
        reason = "another run is sending the spool" if flushed.busy else str(flushed.error)
        delivery.error = reason
        _spool(spool, name, results, delivery)
        log.warning(
            "passive: %s: %d older results still undelivered (%s); this run's %d results "
            "are spooled behind them in %s",
            name, flushed.remaining, reason, len(results), spool.path,
        )  # fmt: skip
        return
    try:
        backend.submit(results)
    except SubmitError as exc:
        refused = set(exc.rejected)
        undelivered = set(results) if exc.undelivered is None else set(exc.undelivered)
        keep = [r for r in results if r in undelivered and r not in refused]
        delivery.delivered = len(results) - len(keep) - len([r for r in results if r in refused])
        delivery.rejected += len(refused)
        delivery.error = str(exc)
        for result in results:
            if result in refused:
                log.error("passive: %s refused %s: %s", name, result.object_name, exc.message)
        if keep:
            _spool(spool, name, keep, delivery)
            log.warning(
                "passive: %s (%d results spooled in %s for the next run)",
                exc,
                len(keep),
                spool.path,
            )
        return
    delivery.delivered = len(results)


def _spool(spool: Spool, name: str, results: Sequence[PassiveResult], delivery: Delivery) -> None:
    try:
        dropped = spool.put(name, results)
    except OSError as exc:
        delivery.lost += len(results)
        log.error(
            "passive: %s: cannot spool %d results (%s): they are lost", name, len(results), exc
        )
        return
    delivery.spooled += len(results)
    delivery.lost += dropped
