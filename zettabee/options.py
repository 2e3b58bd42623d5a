"""Pair options: each key's parser, and options built over their defaults.

The pair file's option column and the settings' ``[defaults]`` go through the same code,
so that a default can never hold a value a pair line would refuse.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from zettabee.errors import Problem
from zettabee.names import validate_host, validate_path, validate_user
from zettabee.pair import TRANSPORTS, PairOptions
from zettabee.records import fields, replace
from zettabee.units import parse_duration, short_duration

TYPE_CHECKING = False  # typing for the annotations only: importing it costs every check
if TYPE_CHECKING:
    from typing import Any

OPTION_NAMES: tuple[str, ...] = fields(PairOptions)

_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True}
_BOOLEANS.update({"no": False, "false": False, "off": False, "0": False})
# As text, not compiled: re compiles (and caches) it when an option uses it, not in every check.
_BWLIMIT = r"[0-9]+[kMG]?"
_COMPRESSION = (
    r"on|off|lzjb|zle|lz4|gzip|gzip-[1-9]|zstd|zstd-(?:[1-9]|1[0-9])"
    r"|zstd-fast|zstd-fast-(?:[1-9]|10|20|30|40|50|60|70|80|90|100|500|1000)"
)


def _transport(text: str) -> str:
    if text not in TRANSPORTS:
        raise ValueError(f"must be one of {', '.join(TRANSPORTS)}, not {text!r}")
    return text


def _port(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"must be a port number from 1 to 65535, not {text!r}")
    return int(text)


def _absolute_path(text: str) -> str:
    message = validate_path(text)
    if message:
        raise ValueError(f"must be an absolute path: {message}")
    return text


def _user(text: str) -> str:
    message = validate_user(text)
    if message:
        raise ValueError(message)
    return text


# Thresholds and the stall time beyond this are typos (a missing unit, a doubled digit),
# and they end up where they break things: ssh refuses ServerAliveCountMax past 2**31.
MAX_DURATION = 10 * 365 * 86400


def _positive_duration(text: str) -> int:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, not {text!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"{text!r} is more than ten years ({short_duration(MAX_DURATION)})")
    return seconds


def _boolean(text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError(f"must be yes/no, true/false, on/off or 1/0, not {text!r}") from None


def _keep(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ValueError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _bwlimit(text: str) -> str:
    if not re.fullmatch(_BWLIMIT, text) or int(text.rstrip("kMG")) == 0:
        raise ValueError(
            f"must be a positive rate in bytes per second, digits with an optional k, M or G "
            f"(500k, 10M, 1G), not {text!r}"
        )
    return text


def _host(text: str) -> str:
    message = validate_host(text)
    if message:
        raise ValueError(message)
    return text


def _patterns(text: str) -> tuple[str, ...]:
    """``exclude=``: relative names or shell patterns (``tmp``, ``*/cache``), ``|``
    between them (a comma separates options, and ZFS names never hold a ``|``)."""
    patterns = tuple(text.split("|"))
    for pattern in patterns:
        if not pattern or pattern.startswith("/") or pattern.endswith("/"):
            raise ValueError(
                f"{pattern!r} is not a pattern of a name below the source; give names "
                "relative to it without a leading or trailing '/', '|' between them "
                "(exclude=tmp|*/cache)"
            )
    return patterns


def _compression(text: str) -> str:
    if not re.fullmatch(_COMPRESSION, text):
        raise ValueError(
            f"{text!r} is not a ZFS compression value; use on, off, lz4, lzjb, zle, gzip, "
            "gzip-1..gzip-9, zstd, zstd-1..zstd-19 or zstd-fast[-N]"
        )
    return text


_OPTION_PARSERS: dict[str, Callable[[str], object]] = {
    "transport": _transport,
    "port": _port,
    "sshport": _port,
    "sshkey": _absolute_path,
    "user": _user,
    "knownhosts": _absolute_path,
    "wlag": _positive_duration,
    "clag": _positive_duration,
    "wrun": _positive_duration,
    "crun": _positive_duration,
    "intermediate": _boolean,
    "rollback": _boolean,
    "keep": _keep,
    "bwlimit": _bwlimit,
    "stall": _positive_duration,
    "mbufferhost": _host,
    "compression": _compression,
    "resume": _boolean,
    "hold": _boolean,
    "bookmark": _boolean,
    "raw": _boolean,
    "props": _boolean,
    "recursive": _boolean,
    "exclude": _patterns,
}


def parse_option(key: str, value: str) -> object:
    """The typed value of one pair option; ValueError says what is allowed.

    Shared by the pair file and the settings' ``[defaults]`` so that a default can never
    hold a value a pair line would refuse.
    """
    parser = _OPTION_PARSERS.get(key)
    if parser is None:
        raise ValueError(f"unknown option {key!r}{suggest(key, OPTION_NAMES)}")
    if value == "":
        raise ValueError(f"option {key!r} has no value")
    try:
        return parser(value)
    except ValueError as exc:
        raise ValueError(f"option {key}: {exc}") from None


def suggest(word: str, known: Sequence[str]) -> str:
    import difflib  # only a mistake needs it: 10 ms off every start

    close = difflib.get_close_matches(word.lower(), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known: {', '.join(known)}"


def build_options(
    items: Iterable[tuple[str, str, int]],
    base: PairOptions,
    path: str,
    line: int,
) -> tuple[PairOptions | None, list[Problem]]:
    """PairOptions from ``(key, value, line)`` items over ``base``, or every problem.

    The threshold pairs are compared after merging with the defaults: ``wlag=8h`` on a
    line is wrong when the default ``clag`` is 6h, even though each value alone is fine.
    """
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key, value, where in items:
        if key in lines:
            problems.append(Problem(path, where, f"option {key!r} given twice"))
            continue
        lines[key] = where
        try:
            values[key] = parse_option(key, value)
        except ValueError as exc:
            problems.append(Problem(path, where, str(exc)))
    options = replace(base, **values)
    for warn, crit in (("wlag", "clag"), ("wrun", "crun")):
        warn_value, crit_value = getattr(options, warn), getattr(options, crit)
        if warn_value > crit_value:
            warn_note = "" if warn in lines else " (default)"
            crit_note = "" if crit in lines else " (default)"
            problems.append(
                Problem(
                    path,
                    lines.get(warn, lines.get(crit, line)),
                    f"{warn} {short_duration(warn_value)}{warn_note} is greater than "
                    f"{crit} {short_duration(crit_value)}{crit_note}: the warning threshold "
                    "must not exceed the critical one",
                )
            )
    return (None if problems else options), problems
