"""The checks Nagios and Icinga see: lag and run time of pairs, as nagiosplugin compositions.

The active plugins (``check_zettabee_lag``, ``check_zettabee_runtime``) and the passive
results that ``replicate`` submits after a run are built from the same compositions here,
so a service reads the same whichever way its result arrived. :func:`evaluate` runs a
check without nagiosplugin's process-wide ``Runtime`` (which prints and exits), for the
passive side; the plugins call ``check.main()`` as usual, through their command line in
``plugin``.

A plugin runs thousands of times a day and reads only this host: local state files and
one ``zfs get``. This module must never import the replication engine (replicator,
transport, fastpath), directly or through what it imports; a unit test holds it to that.

States, as documented in the plugins' ``--help``:

- lag: OK within the pair's ``wlag``/``clag`` (or ``-w``/``-c``), WARNING/CRITICAL
  beyond; CRITICAL when the replica is inconsistent; UNKNOWN when the pair is unknown,
  not initialized, or ZFS cannot be read; WARNING for a negative lag (this host's clock
  is behind the source's: the lag cannot be measured, and the clock needs fixing).
- runtime: OK within ``wrun``/``crun`` for the running run (or the last one, when idle);
  CRITICAL when the last run failed (with its error) or was interrupted (with the fix,
  ``zettabee unlock``), naming the partial receive a resumable transfer left behind;
  WARNING when such a partial receive outlives a run that did not fail; UNKNOWN when no
  run is recorded or the status file is unreadable.
- ``--all`` ranks states CRITICAL > WARNING > UNKNOWN > OK, as the monitoring plugins'
  ``max_state_alt`` does: a new or unreadable pair must not hide a late one.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import nagiosplugin
from nagiosplugin.output import Output
from nagiosplugin.state import Critical, Ok, ServiceState, Unknown, Warn

from zettabee.errors import ZettabeeError
from zettabee.health import INCONSISTENT, SYNCHRONIZED, UNINITIALIZED, Health
from zettabee.pair import Pair
from zettabee.records import Record
from zettabee.state import FAILED, IDLE, INTERRUPTED, RUNNING
from zettabee.survey import HealthSource, Survey, configured, tree_pairs, tree_survey
from zettabee.units import format_duration, parse_duration

TYPE_CHECKING = False  # typing for the annotations only: importing it costs every check
if TYPE_CHECKING:
    from typing import Any

LAG = "ZETTABEE_LAG"
RUNTIME = "ZETTABEE_RUNTIME"


# A replica that is known to be late matters more than one that cannot be judged.
_SEVERITY = {Ok: 0, Unknown: 1, Warn: 2, Critical: 3}


# --------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------

# As text, not compiled: re compiles (and caches) it when a -w or -c is given, not in every check.
_NUMBER = r"-?[0-9]+(?:\.[0-9]*)?"


def threshold(spec: str) -> nagiosplugin.Range:
    """A Nagios range (``[@][start:][end]``, ``~`` for minus infinity) of seconds.

    Bounds may also be durations as in the pair file (``2h``, ``30m``, ``1h30m``): an
    operator who wrote ``wlag=2h`` should not have to multiply for ``-w``. Perfdata always
    carries plain seconds.
    """
    text = spec.strip()
    if not text:
        raise ValueError("an empty range is not a threshold")
    invert = text.startswith("@")
    body = text[1:] if invert else text
    start, colon, end = body.rpartition(":") if ":" in body else ("", "", body)
    atoms = []
    for atom in (start, end):
        if atom in ("", "~") or re.fullmatch(_NUMBER, atom):
            atoms.append(atom)
        else:
            atoms.append(str(parse_duration(atom)))
    rendered = ("@" if invert else "") + (f"{atoms[0]}{colon}" if colon else "") + atoms[1]
    return nagiosplugin.Range(rendered)


def _describe_violation(value: int, limit: nagiosplugin.Range) -> str:
    """``over 2:00:00`` for the usual ``0:N`` range; the range's bounds otherwise."""
    if limit.invert:
        return f"inside {_bound(limit.start, str)}:{_bound(limit.end, str)}"
    if value > limit.end:
        return f"over {_bound(limit.end)}"
    return f"under {_bound(limit.start)}"


def _bound(value: float, show: Callable[[float], str] = format_duration) -> str:
    if value in (float("inf"), float("-inf")):
        return "~" if value < 0 else ""
    return show(value)


# --------------------------------------------------------------------------------------
# Results ranked for replicas
# --------------------------------------------------------------------------------------


class ReplicaResults(nagiosplugin.Results):
    """Results whose worst state is CRITICAL > WARNING > UNKNOWN > OK.

    nagiosplugin ranks UNKNOWN above CRITICAL (it compares exit codes); in a check over
    many pairs that would let one new pair hide a broken one.
    """

    def _states(self) -> list[ServiceState]:
        present = [state for state, results in self.by_state.items() if results]
        return sorted(present, key=_SEVERITY.__getitem__, reverse=True)

    def __iter__(self) -> Iterator[nagiosplugin.Result]:
        for state in self._states():
            yield from self.by_state[state]

    @property
    def most_significant_state(self) -> ServiceState:
        states = self._states()
        if not states:
            raise ValueError("no results")
        return states[0]


def _problems(results: nagiosplugin.Results) -> list[nagiosplugin.Result]:
    return [r for r in results if r.state != Ok]


class PairSummary(nagiosplugin.Summary):
    """The first line names the pair and says what is wrong in words, not ranges."""

    def __init__(self, every: bool = False) -> None:
        self.every = every

    def ok(self, results: nagiosplugin.Results) -> str:
        lags = [r.metric for r in results if r.metric is not None and r.metric.uom == "s"]
        if self.every or any(m.name != "lag" for m in lags if m.context == "lag"):
            pairs = sum(
                1 for r in results if r.metric is not None and r.metric.context == "replica"
            )
            if not lags:
                return f"{pairs} pairs"
            worst = max(lags, key=lambda m: m.value)
            return (
                f"{pairs} pairs synchronized, highest lag {format_duration(worst.value)} "
                f"({worst.name})"
            )
        return "; ".join(r.hint for r in results if r.hint)

    def problem(self, results: nagiosplugin.Results) -> str:
        problems = _problems(results)
        text = str(problems[0].hint or problems[0])
        if len(problems) > 1:
            text += f" (+{len(problems) - 1} more)"
        return text

    def verbose(self, results: nagiosplugin.Results) -> list[str]:
        return [f"{r.state.text}: {r.hint}" for r in results if r.hint]


# --------------------------------------------------------------------------------------
# Where the pairs come from (zettabee.survey)
# --------------------------------------------------------------------------------------


def given(healths: Sequence[Health], gone: frozenset[str] = frozenset()) -> HealthSource:
    """A source for healths already read (the passive results after a run)."""
    return lambda: Survey(list(healths), gone=gone)


def label(pair: Pair) -> str:
    """How outputs name a pair: its destination file system."""
    return pair.destination.fs


def _one_line(text: str) -> str:
    """``text`` for a plugin's status line: one line, and no ``|``, which starts the
    perfdata there (nagiosplugin would drop it and add a warning line): a pipeline such
    as ``zfs send | mbuffer -O`` reads ``zfs send / mbuffer -O``."""
    one = "; ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return one.replace("|", "/")


def _without_pair_prefix(text: str, pair: Pair) -> str:
    """Errors start with the pair (``host:pool/fs: ...``); the summary names it already."""
    for prefix in (f"{pair.name}: ", f"{pair.destination.fs}: "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


class PairResource(nagiosplugin.Resource):
    """Reads the survey once; contexts find a metric's pair through :meth:`health`."""

    def __init__(self, source: HealthSource) -> None:
        self.source = source
        self.by_metric: dict[str, Health] = {}

    def survey(self) -> Survey:
        try:
            survey = self.source()
        except ZettabeeError as exc:
            raise nagiosplugin.CheckError(_one_line(str(exc))) from exc
        except OSError as exc:
            raise nagiosplugin.CheckError(
                f"{_one_line(str(exc))} (see --help for the permissions the plugin needs)"
            ) from exc
        if not survey.healths and not survey.broken:
            raise nagiosplugin.CheckError("no pairs in the pair file")
        return survey

    def health(self, metric_name: str) -> Health:
        return self.by_metric[metric_name]

    def broken_lines(self, survey: Survey) -> Iterator[nagiosplugin.Metric]:
        if survey.broken:
            yield nagiosplugin.Metric("pairfile", survey.broken, context="pairfile")


# --------------------------------------------------------------------------------------
# Lag
# --------------------------------------------------------------------------------------


class Lag(PairResource):
    """Seconds since the newest snapshot both sides hold was taken, per pair."""

    def __init__(self, source: HealthSource, every: bool = False) -> None:
        super().__init__(source)
        self.every = every

    def probe(self) -> Iterator[nagiosplugin.Metric]:
        survey = self.survey()
        counts = Counter(label(h.pair) for h in survey.healths)
        every = self.every or len(survey.healths) > 1  # --all, or a tree: a label each
        for health in survey.healths:
            name = label(health.pair)
            if health.pair.fingerprint in survey.gone:
                yield nagiosplugin.Metric(f"{name} gone", health, context="gone")
                continue
            if every and counts[name] > 1:
                name = health.pair.name  # the same pool/fs on two hosts: keep labels apart
            metric = name if every else "lag"
            self.by_metric[metric] = health
            yield nagiosplugin.Metric(f"{name} replica", health, context="replica")
            if health.lag is not None:
                yield nagiosplugin.Metric(metric, health.lag, "s", min=0, context="lag")
        yield from self.broken_lines(survey)


class ReplicaContext(nagiosplugin.Context):
    """Whether the destination is a replica of this pair at all (no perfdata)."""

    def __init__(self) -> None:
        super().__init__("replica")

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        health: Health = metric.value
        name = label(health.pair)
        reason = _one_line(health.reason)
        if health.state == SYNCHRONIZED:
            return nagiosplugin.Result(Ok, None, metric)
        if health.state == INCONSISTENT:
            return nagiosplugin.Result(Critical, f"{name} inconsistent: {reason}", metric)
        if health.state == UNINITIALIZED:
            text = reason if name in reason else f"{name} not initialized: {reason}"
            if health.running and health.runtime is not None:
                action = health.status.action if health.status else "run"
                text += f"; {action or 'run'} running for {format_duration(health.runtime)}"
            return nagiosplugin.Result(Unknown, text, metric)
        return nagiosplugin.Result(Unknown, f"{name}: {reason}", metric)


class GoneContext(nagiosplugin.Context):
    """A tree's replica whose source is gone: kept, not updated, for someone to decide."""

    def __init__(self) -> None:
        super().__init__("gone")

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        from zettabee.tree import gone_note  # loaded already: the gone come from a tree

        health: Health = metric.value
        return nagiosplugin.Result(Warn, gone_note(health.pair), metric)


class PairThresholds(nagiosplugin.ScalarContext):
    """A ScalarContext whose ranges default to each pair's own options.

    ``warning``/``critical`` given (``-w``/``-c``) replace the pair's values for every pair.
    Ranges from the pair file are ``0:N``: a value below zero is out of range, and is
    reported as what it is (see :meth:`negative`) before any range is applied.
    """

    def __init__(
        self,
        name: str,
        options: tuple[str, str],
        warning: nagiosplugin.Range | None = None,
        critical: nagiosplugin.Range | None = None,
    ) -> None:
        super().__init__(name)
        self.options = options
        self.override = (warning, critical)

    def ranges(self, health: Health) -> tuple[nagiosplugin.Range, nagiosplugin.Range]:
        opts = health.pair.options
        warning, critical = self.override
        return (
            warning
            if warning is not None
            else nagiosplugin.Range(str(getattr(opts, self.options[0]))),
            critical
            if critical is not None
            else nagiosplugin.Range(str(getattr(opts, self.options[1]))),
        )

    def describe_value(self, health: Health, value: int) -> str:
        raise NotImplementedError

    def negative(self, health: Health, value: int) -> str:
        raise NotImplementedError

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        health = resource.health(metric.name)
        value = metric.value
        text = self.describe_value(health, value)
        if value < 0:
            return nagiosplugin.Result(Warn, self.negative(health, value), metric)
        warning, critical = self.ranges(health)
        if not critical.match(value):
            return nagiosplugin.Result(
                Critical, f"{text} ({_describe_violation(value, critical)})", metric
            )
        if not warning.match(value):
            return nagiosplugin.Result(
                Warn, f"{text} ({_describe_violation(value, warning)})", metric
            )
        return nagiosplugin.Result(Ok, text, metric)

    def performance(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Performance:
        warning, critical = self.ranges(resource.health(metric.name))
        return nagiosplugin.Performance(
            metric.name, metric.value, metric.uom, warning, critical, metric.min, metric.max
        )


class LagThresholds(PairThresholds):
    def __init__(
        self, warning: nagiosplugin.Range | None = None, critical: nagiosplugin.Range | None = None
    ) -> None:
        super().__init__("lag", ("wlag", "clag"), warning, critical)

    def describe_value(self, health: Health, value: int) -> str:
        return f"{label(health.pair)} lag {format_duration(value)}"

    def negative(self, health: Health, value: int) -> str:
        return (
            f"{label(health.pair)} lag {format_duration(value)} is negative: this host's "
            "clock is behind the time it named the last replicated snapshot with (clock "
            "stepped back); fix the clock, the lag cannot be measured"
        )


class PairFileContext(nagiosplugin.Context):
    """Lines of the pair file that did not load: their pairs are checked by nobody."""

    def __init__(self) -> None:
        super().__init__("pairfile")

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        broken: list[str] = metric.value
        more = f" (+{len(broken) - 1} more broken lines)" if len(broken) > 1 else ""
        return nagiosplugin.Result(
            Unknown, f"pair not checked: {_one_line(broken[0])}{more}", metric
        )


def lag_check(
    source: HealthSource | Sequence[Health],
    warning: nagiosplugin.Range | None = None,
    critical: nagiosplugin.Range | None = None,
    every: bool = False,
) -> nagiosplugin.Check:
    """The lag of one pair (``lag=...`` perfdata) or, with ``every``, of all pairs (one
    perfdata label per pair: its destination file system)."""
    if not callable(source):
        source = given(source)
    check = nagiosplugin.Check(
        Lag(source, every),
        ReplicaContext(),
        GoneContext(),
        LagThresholds(warning, critical),
        PairFileContext(),
        PairSummary(every),
        ReplicaResults(),
    )
    check.name = LAG  # an attribute, not Check(name=): Debian's nagiosplugin 1.3.2 lacks it
    return check


# --------------------------------------------------------------------------------------
# Run time
# --------------------------------------------------------------------------------------


class Runtime(PairResource):
    """How long the running run has been going, or how long the last one took."""

    def probe(self) -> Iterator[nagiosplugin.Metric]:
        survey = self.survey()
        healths = [h for h in survey.healths if h.pair.fingerprint not in survey.gone]
        for health in healths:
            metric = label(health.pair) if len(healths) > 1 else "runtime"  # a tree: each
            self.by_metric[metric] = health
            yield nagiosplugin.Metric(f"{label(health.pair)} run", health, context="run")
            if health.runtime is not None:
                yield nagiosplugin.Metric(metric, health.runtime, "s", min=0, context="runtime")


def _action(health: Health) -> str:
    return (health.status.action if health.status else "") or "run"


class RunContext(nagiosplugin.Context):
    """The run's own state: failed and interrupted runs are CRITICAL whatever they took."""

    def __init__(self) -> None:
        super().__init__("run")

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        health: Health = metric.value
        name = label(health.pair)
        status = health.status
        action = _action(health)
        kept = f"; {health.resume_note}" if health.resume_note else ""
        if health.unwritable and not health.running:
            # The status file below still tells the last run that could write it.
            return nagiosplugin.Result(Critical, f"{name}: {health.unwritable}", metric)
        if health.run_state == INTERRUPTED:
            pid = status.pid if status else None
            gone = f" (pid {pid} is gone)" if pid else ""
            return nagiosplugin.Result(
                Critical,
                f"{name} {action} was interrupted{gone} and left its lock behind: "
                f"run `zettabee unlock {name}`, then update{kept}",
                metric,
            )
        if health.run_state == FAILED:
            error = _without_pair_prefix(
                _one_line(health.last_error or "no error recorded"), health.pair
            )
            if kept and "resumable" in error:
                kept = ""  # the error says it already
            return nagiosplugin.Result(
                Critical, f"{name} last {action} failed: {error}{kept}", metric
            )
        if kept:
            # A partial receive outlived a run that did not fail: it pins space on the
            # destination until an update resumes or discards it.
            return nagiosplugin.Result(Warn, f"{name}: {health.resume_note}", metric)
        if status is not None and status.corrupt:
            return nagiosplugin.Result(
                Unknown,
                f"{name}: {_one_line(status.corrupt)} (`zettabee unlock {name}` resets it)",
                metric,
            )
        if health.run_state == RUNNING and health.runtime is None:
            holder = f" (pid {health.lock_pid})" if health.lock_pid else ""
            return nagiosplugin.Result(Ok, f"{name} {action} running{holder}", metric)
        if health.run_state == IDLE and health.runtime is None:
            text = f"{name}: no completed run recorded"
            if health.state == UNINITIALIZED:
                text += " (not initialized yet: run `zettabee initialize`)"
            return nagiosplugin.Result(Unknown, text, metric)
        return nagiosplugin.Result(Ok, None, metric)


class RuntimeThresholds(PairThresholds):
    def __init__(
        self, warning: nagiosplugin.Range | None = None, critical: nagiosplugin.Range | None = None
    ) -> None:
        super().__init__("runtime", ("wrun", "crun"), warning, critical)

    def describe_value(self, health: Health, value: int) -> str:
        name, action, took = label(health.pair), _action(health), format_duration(value)
        if health.running:
            pid = f", pid {health.lock_pid}" if health.lock_pid else ""
            return f"{name} {action} running for {took}{pid}"
        return f"{name} last {action} took {took}"

    def negative(self, health: Health, value: int) -> str:
        return (
            f"{label(health.pair)} run time {format_duration(value)} is negative: the clock "
            "stepped back during the run"
        )


def runtime_check(
    source: HealthSource | Sequence[Health],
    warning: nagiosplugin.Range | None = None,
    critical: nagiosplugin.Range | None = None,
) -> nagiosplugin.Check:
    """The run time and run state of one pair (``runtime=...`` perfdata)."""
    if not callable(source):
        source = given(source)
    check = nagiosplugin.Check(
        Runtime(source),
        RunContext(),
        RuntimeThresholds(warning, critical),
        PairSummary(),
        ReplicaResults(),
    )
    check.name = RUNTIME
    return check


# --------------------------------------------------------------------------------------
# Evaluating without the Runtime singleton (passive results)
# --------------------------------------------------------------------------------------


class Evaluation(Record, frozen=True):
    """A check's outcome as the active plugin prints it at verbosity 0."""

    code: int
    text: str  # the whole output: status line | perfdata (and warning lines, if any)
    output: str  # the same without the perfdata
    perfdata: tuple[str, ...]


def evaluate(check: nagiosplugin.Check, long: bool = False) -> Evaluation:
    """Run ``check`` and format it as ``check.main()`` would, without printing or exiting.

    nagiosplugin's ``Runtime`` is a process-wide singleton that prints, exits and keeps
    earlier output; a run that reports many pairs evaluates checks here instead.
    ``long`` adds the long text (each finding a line) that the plugins print with -v.
    """
    check()
    out = Output(logging.StreamHandler(io.StringIO()))
    out.add(check)
    if long:  # a tree's children, one line each, below the status line
        out.add_longoutput(check.verbose_str)
    text = str(out).rstrip("\n")
    first, newline, rest = text.partition("\n")
    status = first.partition(" | ")[0] if check.perfdata else first
    return Evaluation(check.exitcode, text, status + newline + rest, tuple(check.perfdata))


# Where the plugins and the passive results take these from: zettabee.survey holds them.
__all__ = ["HealthSource", "Survey", "configured", "tree_pairs", "tree_survey"]
