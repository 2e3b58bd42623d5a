"""The pair file (the seed's format): one pair a line, ``source destination [options]``.

Every problem carries its line, and good pairs load next to broken ones: an operator fixing
a file of hundreds of pairs should not have to rerun once per mistake, and a broken line
must never stop cron from replicating the good ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from zettabee.config import BOM, Settings
from zettabee.errors import ConfigError, Problem, UsageError
from zettabee.names import parse_endpoint
from zettabee.options import build_options
from zettabee.pair import Endpoint, Pair, PairOptions
from zettabee.records import Record

_COMMENT_RE = re.compile(r"(?:^|[ \t])#.*")
_COLUMNS_RE = re.compile(r"[ \t]+")
_LINE_SHAPE = "a pair line is 'source destination [options]'"


class PairFile(Record, frozen=True):
    """The pairs that can run, and everything wrong with the others."""

    path: str
    pairs: list[Pair]
    problems: list[Problem]

    def raise_for_problems(self) -> None:
        """For commands that must not go on with a partly broken file (``setup``, checks)."""
        if self.problems:
            raise ConfigError(self.problems)


def load_pairs(path: str, settings: Settings) -> PairFile:
    """Read the pair file; the valid pairs load even next to broken lines.

    Cron must keep replicating the good pairs while someone fixes a typo in another. Of
    two lines that clash (same destination, fingerprint or mbuffer port) the earlier wins,
    so adding a line can never take an existing pair away.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [
                Problem(
                    path, 0, f"cannot read the pair file: {reason}; name another with --config FILE"
                )
            ]
        ) from exc
    return parse_pairs(text, path, settings)


def parse_pairs(text: str, path: str, settings: Settings) -> PairFile:
    """The pair file's ``text`` parsed as if read from ``path``."""
    text = text.removeprefix(BOM)
    pairs: list[Pair] = []
    problems: list[Problem] = []
    taken = _Taken(path)
    # split("\n"), not splitlines(): a stray form feed or U+2028 must not shift every
    # following line number away from what the operator's editor shows.
    for number, raw in enumerate(text.split("\n"), 1):
        line = _COMMENT_RE.sub("", raw.removesuffix("\r"), count=1).strip(" \t")
        if not line:
            continue
        pair, found = _parse_line(line, path, number, settings.defaults)
        if pair is not None:
            found.extend(taken.clashes(pair, number))
        problems.extend(found)
        if pair is None or found:
            continue
        pairs.append(pair)
        taken.add(pair, number)
    return PairFile(path=path, pairs=pairs, problems=problems)


def _parse_line(
    line: str, path: str, number: int, defaults: PairOptions
) -> tuple[Pair | None, list[Problem]]:
    columns = _COLUMNS_RE.split(line)
    problems: list[Problem] = []
    if len(columns) == 1:
        return None, [Problem(path, number, f"missing destination: {_LINE_SHAPE}")]
    if len(columns) > 3:
        problems.append(
            Problem(
                path,
                number,
                f"too many columns ({len(columns)}): {_LINE_SHAPE}, options are key=value "
                "separated by commas, without spaces",
            )
        )
    endpoints: list[Endpoint] = []
    for role, text in zip(("source", "destination"), columns[:2], strict=True):
        try:
            endpoints.append(parse_endpoint(text))
        except ValueError as exc:
            problems.append(Problem(path, number, f"{role}: {exc}"))
    options: PairOptions | None = defaults
    if len(columns) == 3:
        items, found = _split_options(columns[2], path, number)
        problems.extend(found)
        options, found = build_options(items, defaults, path, number)
        problems.extend(found)
    if options is not None and options.exclude and not options.recursive:
        problems.append(
            Problem(path, number, "exclude= leaves children out of a tree: add recursive=yes")
        )
    if problems or options is None:
        return None, problems
    source, destination = endpoints
    if source == destination:
        return None, [Problem(path, number, f"source and destination are both {source}")]
    return Pair(source, destination, options, path=path, line=number), []


def _split_options(
    column: str, path: str, number: int
) -> tuple[list[tuple[str, str, int]], list[Problem]]:
    items: list[tuple[str, str, int]] = []
    problems: list[Problem] = []
    for item in column.split(","):
        key, equals, value = item.partition("=")
        if not item:
            empty = Problem(path, number, "empty option (a doubled or trailing ',')")
            if empty not in problems:
                problems.append(empty)
        elif not equals:
            problems.append(Problem(path, number, f"option {item!r} is not key=value"))
        elif not key:
            problems.append(Problem(path, number, f"option {item!r} has no name before '='"))
        else:
            items.append((key, value, number))
    return items, problems


class _Taken:
    """What the lines loaded so far hold: destinations, fingerprints, mbuffer ports.

    One host may be written several ways: host names compare without case, and every
    name of this machine (``localhost``, ``127.0.0.1``, its own name or addresses) is one
    host, as the runners see it. Whether a name is this machine is asked only of a file
    system name or port that recurs, so a file of distinct destinations costs no lookup.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.destinations: dict[str, list[tuple[Endpoint, int]]] = {}
        self.fingerprints: dict[str, int] = {}
        self.ports: dict[int, list[tuple[str, int]]] = {}
        self._local: dict[str, bool] = {}

    def add(self, pair: Pair, number: int) -> None:
        self.destinations.setdefault(pair.destination.fs, []).append((pair.destination, number))
        self.fingerprints[pair.fingerprint] = number
        if pair.options.transport == "mbuffer" and pair.options.port is not None:
            self.ports.setdefault(pair.options.port, []).append((pair.destination.host, number))

    def clashes(self, pair: Pair, number: int) -> list[Problem]:
        problems = []
        destination = pair.destination
        earlier = self._destination(destination)
        if earlier is not None:
            seen, line, why = earlier
            if seen == destination:
                message = f"destination {destination} is already used on line {line}"
            else:
                message = (
                    f"destination {destination} is {seen} of {self.path}:{line} under "
                    f"another name ({why})"
                )
            message += "; a file system can receive from one pair only"
            problems.append(Problem(self.path, number, message))
        elif pair.fingerprint in self.fingerprints:
            problems.append(
                Problem(
                    self.path,
                    number,
                    f"fingerprint {pair.fingerprint} is already used on line "
                    f"{self.fingerprints[pair.fingerprint]}",
                )
            )
        # mbuffer listens on the destination host: a port is taken per destination host.
        port = pair.options.port or 0
        used = self._port(destination.host, port) if pair.options.transport == "mbuffer" else None
        if used is not None:
            problems.append(
                Problem(
                    self.path,
                    number,
                    f"mbuffer port {port} on {destination.host} is already used on line "
                    f"{used}; give each mbuffer pair its own port, or none to pick a free one",
                )
            )
        return problems

    def _destination(self, endpoint: Endpoint) -> tuple[Endpoint, int, str] | None:
        """The earlier destination, its line and why it is ``endpoint``, if one is."""
        for seen, line in self.destinations.get(endpoint.fs, ()):
            why = self._same_host(seen.host, endpoint.host)
            if why is not None:
                return seen, line, why
        return None

    def _port(self, host_name: str, port: int) -> int | None:
        for seen, line in self.ports.get(port, ()):
            if self._same_host(seen, host_name) is not None:
                return line
        return None

    def _same_host(self, a: str, b: str) -> str | None:
        """Why host names ``a`` and ``b`` name one host, or None if they do not."""
        if a == b:
            return "the same name"
        if a.lower().removesuffix(".") == b.lower().removesuffix("."):
            return "host names compare without case or a final '.'"
        if self._is_local(a) and self._is_local(b):
            return f"{a} and {b} both name this machine"
        return None

    def _is_local(self, name: str) -> bool:
        if name not in self._local:
            from zettabee import host  # the runners, only when a name recurs: off every start

            self._local[name] = host.is_local_host(name)
        return self._local[name]


# --------------------------------------------------------------------------------------
# Choosing a pair from the command line
# --------------------------------------------------------------------------------------


def find_pair(pairs: Sequence[Pair], arg: str, path: str | None = None) -> Pair:
    """The one pair ``arg`` names: ``host:pool/fs``, fingerprint, ``pool/fs``, or leaf.

    Tried from the most to the least precise, so an exact name always wins over a
    shorter one that happens to match more; a short name that matches several pairs is
    refused with the candidates rather than guessed.
    """
    where = path or next((p.path for p in pairs if p.path), None) or "the pair file"
    tests: tuple[Callable[[Pair], bool], ...] = (
        lambda p: str(p.destination) == arg,
        lambda p: p.fingerprint == arg.lower(),
        lambda p: p.destination.fs == arg,
        lambda p: "/" not in arg and p.destination.leaf == arg,
    )
    for test in tests:
        found = [p for p in pairs if test(p)]
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(str(p.destination) for p in found)
            raise UsageError(f"{arg!r} matches {len(found)} pairs: {names}; name one of them")
    raise UsageError(f"no pair {arg!r} in {where}; `zettabee fingerprint` lists them")
