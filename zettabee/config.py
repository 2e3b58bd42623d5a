"""Configuration: the settings file (INI) and the pair file (the seed's format).

Both are parsed into frozen dataclasses when a run starts, and every name that will later
reach a command line (hosts, pools, file systems, users, paths) is validated here, once, so
that the runners can trust what they are given. Every problem is reported at once with its
file and line: an operator fixing a file of hundreds of pairs should not have to rerun once
per mistake, and a broken line must never stop cron from replicating the good ones.
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import ipaddress
import os
import re
import socket
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zettabee.errors import ConfigError, Problem, UsageError
from zettabee.pair import TRANSPORTS, Endpoint, Pair, PairOptions

DEFAULT_SETTINGS_PATH = "/etc/zettabee/zettabee.ini"
SETTINGS_ENV = "ZETTABEE_SETTINGS"
DEFAULT_PAIRS_PATH = "/etc/zettabee/zettabee.cfg"

CHECKS = ("lag", "runtime")
PASSIVE_BACKENDS = ("nsca", "send_nsca", "icinga2-api")
TEMPLATE_FIELDS = ("check", "fs", "destination", "source", "fingerprint")
DEFAULT_SERVICE_TEMPLATE = "zettabee {check} {fs}"

OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PairOptions))

_PATH_KEYS = ("pairs", "state_dir", "log_dir", "lock_dir", "spool_dir", "known_hosts")
_MONITORING_KEYS = ("host_name", "service_template", "passive")
_SECTIONS = ("paths", "defaults", "monitoring", *PASSIVE_BACKENDS)

# Nagios' default illegal_object_name_chars, plus what would break a tab- or line-delimited
# passive result: a service or host name holding them is rejected by the monitoring server
# long after the run, where nobody looks.
_ILLEGAL_OBJECT_CHARS = frozenset("`~!$%^&*|'\"<>?,()=\t\n\r")


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------

_DATASET_CHARS = frozenset(string.ascii_letters + string.digits + "_.:-/")
_HOST_CHARS = frozenset(string.ascii_letters + string.digits + ".-")
_IPV6_LITERAL_RE = re.compile(r"\[(?P<addr>[0-9A-Fa-f:.]+)(?:%(?P<zone>[A-Za-z0-9_.-]+))?\]")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]*")
MAX_DATASET_LENGTH = 255


def describe_char(char: str) -> str:
    """Name a character so that a message shows it even when it is invisible.

    Echoing a newline or an escape sequence back to the terminal would hide the very
    thing the operator must find.
    """
    named = {" ": "a space", "\t": "a tab", "\n": "a newline", "\r": "a carriage return"}
    if char in named:
        return named[char]
    if not char.isprintable():
        return f"a control character (U+{ord(char):04X})"
    if ord(char) > 127:
        return f"{char!r} (U+{ord(char):04X})"
    return repr(char)


def validate_dataset(name: str) -> str | None:
    """Why ``name`` cannot be a ZFS file system name for zettabee, or None if it can.

    Stricter than ZFS itself (no spaces, no ``%``): these names end up in argv lists on
    two hosts and in one remote command string, and a name that needs quoting is a name
    that will one day be quoted wrongly.
    """
    if not name:
        return "empty file system name"
    for char in name:
        if char == "@":
            return f"file system {name!r} contains '@': that names a snapshot, not a file system"
        if char == "#":
            return f"file system {name!r} contains '#': that names a bookmark, not a file system"
        if char not in _DATASET_CHARS:
            return (
                f"file system {name!r} contains {describe_char(char)}; file system names may "
                "only contain letters, digits, '_', '.', ':', '-' and '/'"
            )
    if len(name) > MAX_DATASET_LENGTH:
        return f"file system name is {len(name)} characters long; ZFS allows {MAX_DATASET_LENGTH}"
    components = name.split("/")
    if "" in components:
        return f"file system {name!r} has an empty component (a leading, trailing or doubled '/')"
    for component in components:
        if component.startswith("-"):
            return f"file system {name!r}: component {component!r} starts with '-'"
        if component in (".", ".."):
            return f"file system {name!r}: component {component!r} is not allowed"
    if not components[0][0].isalpha():
        return f"file system {name!r}: the pool name {components[0]!r} must start with a letter"
    return None


def validate_host(name: str) -> str | None:
    """Why ``name`` cannot be a host for zettabee, or None if it can.

    A DNS name or IPv4 address, or an IPv6 address in brackets (``[fe80::1]``) so that
    ``host:pool/fs`` stays unambiguous. A leading ``-`` would be read by ssh as an option.
    """
    if not name:
        return "empty host name"
    if name.startswith("-"):
        return f"host {name!r} starts with '-'"
    if name.startswith("["):
        return _validate_ipv6_literal(name)
    for char in name:
        if char not in _HOST_CHARS:
            hint = "; write an IPv6 address in brackets, like [fe80::1]" if char == ":" else ""
            return (
                f"host {name!r} contains {describe_char(char)}; host names may only contain "
                f"letters, digits, '.' and '-'{hint}"
            )
    if len(name) > 253:
        return f"host name is {len(name)} characters long; DNS allows 253"
    labels = (name[:-1] if name.endswith(".") else name).split(".")
    for label in labels:
        if not label:
            return f"host {name!r} has an empty label (a leading or doubled '.')"
        if label.startswith("-"):
            return f"host {name!r}: label {label!r} starts with '-'"
        if len(label) > 63:
            return f"host {name!r}: label {label[:20]!r}... is longer than 63 characters"
    return None


def _validate_ipv6_literal(name: str) -> str | None:
    allowed = frozenset(string.hexdigits + ":.%[]_-" + string.ascii_letters)
    for char in name:
        if char not in allowed:
            return f"host {name!r} contains {describe_char(char)}"
    match = _IPV6_LITERAL_RE.fullmatch(name)
    if not match:
        return f"host {name!r} is not an IPv6 address in brackets, like [fe80::1]"
    try:
        ipaddress.IPv6Address(match["addr"])
    except ValueError:
        return f"host {name!r}: {match['addr']!r} is not a valid IPv6 address"
    return None


def validate_user(name: str) -> str | None:
    """Why ``name`` cannot be a remote login name, or None: the portable POSIX subset."""
    if not _USER_RE.fullmatch(name) or len(name) > 32:
        bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "_-"))), None)
        what = f" (it contains {describe_char(bad)})" if bad else ""
        return (
            f"user {name!r} is not a valid login name{what}; use lower-case letters, "
            "digits, '_' and '-', starting with a letter or '_', at most 32 characters"
        )
    return None


def validate_path(path: str) -> str | None:
    """Why ``path`` cannot be a file zettabee uses, or None.

    Relative paths are refused because cron and Nagios run us from directories nobody
    chose; control characters because they hide in every message that shows the path.
    """
    if not path:
        return "empty path"
    for char in path:
        if not char.isprintable() and char != " ":
            return f"path {path!r} contains {describe_char(char)}"
    if not path.startswith("/"):
        return f"path {path!r} is not absolute"
    return None


def split_endpoint(text: str) -> tuple[str, str]:
    """``host:pool/fs`` into host and file system, on the first ``:`` outside brackets.

    File system names may themselves contain ``:``, and IPv6 hosts always do, so the
    host's own colons must be fenced off by brackets.
    """
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise ValueError(f"endpoint {text!r} opens '[' without a closing ']'")
        if text[close + 1 : close + 2] != ":":
            raise ValueError(f"endpoint {text!r} is not host:pool/fs (no ':' after ']')")
        return text[: close + 1], text[close + 2 :]
    host, colon, fs = text.partition(":")
    if not colon:
        raise ValueError(f"endpoint {text!r} is not host:pool/fs (no ':')")
    return host, fs


def parse_endpoint(text: str) -> Endpoint:
    """A validated Endpoint from ``host:pool/fs``; ValueError says every reason it is not."""
    host, fs = split_endpoint(text)
    if not host:
        messages = [f"endpoint {text!r} has an empty host"]
    else:
        messages = [m for m in (validate_host(host),) if m]
    fs_message = validate_dataset(fs)
    if fs_message:
        messages.append(fs_message)
    if messages:
        raise ValueError("; ".join(messages))
    return Endpoint(host, fs)


# --------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------

_DURATION_RE = re.compile(
    r"(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?"
)
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> int:
    """Seconds from ``90``, ``30m``, ``2h``, ``1d`` or ``1h30m`` (units largest first).

    Thresholds in the seed were bare seconds; the suffixes are for humans reading
    ``clag=21600`` at 3 a.m. Upper-case ``M`` is refused rather than guessed (months?).
    """
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    match = _DURATION_RE.fullmatch(text)
    if not text or not match:
        raise ValueError(
            f"{text!r} is not a duration; use seconds (90) or numbers with d, h, m, s "
            "largest first (30m, 2h, 1d, 1h30m)"
        )
    return sum(int(match[unit]) * secs for unit, secs in _UNIT_SECONDS.items() if match[unit])


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, or ``Nd HH:MM:SS`` from one day, as status lines and plugins show lag.

    Negative values (a clock that jumped) keep their sign rather than look healthy.
    """
    total = int(abs(seconds))
    sign = "-" if seconds < 0 and total else ""
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{sign}{hours}:{minutes:02d}:{secs:02d}"


def format_bytes(count: float) -> str:
    """``512 B``, ``1.5 MiB``: sizes as status lines, runstatus and the checks show them."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _short_duration(seconds: int) -> str:
    """The inverse of parse_duration (``1h30m``), to quote thresholds back in messages."""
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


# --------------------------------------------------------------------------------------
# Pair options
# --------------------------------------------------------------------------------------

_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True}
_BOOLEANS.update({"no": False, "false": False, "off": False, "0": False})
_BWLIMIT_RE = re.compile(r"[0-9]+[kMG]?")
_COMPRESSION_RE = re.compile(
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
        raise ValueError(f"{text!r} is more than ten years ({_short_duration(MAX_DURATION)})")
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
    if not _BWLIMIT_RE.fullmatch(text) or int(text.rstrip("kMG")) == 0:
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


def _compression(text: str) -> str:
    if not _COMPRESSION_RE.fullmatch(text):
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
}


def parse_option(key: str, value: str) -> object:
    """The typed value of one pair option; ValueError says what is allowed.

    Shared by the pair file and the settings' ``[defaults]`` so that a default can never
    hold a value a pair line would refuse.
    """
    parser = _OPTION_PARSERS.get(key)
    if parser is None:
        raise ValueError(f"unknown option {key!r}{_suggest(key, OPTION_NAMES)}")
    if value == "":
        raise ValueError(f"option {key!r} has no value")
    try:
        return parser(value)
    except ValueError as exc:
        raise ValueError(f"option {key}: {exc}") from None


def _suggest(word: str, known: Sequence[str]) -> str:
    import difflib  # only a mistake needs it: 10 ms off every start

    close = difflib.get_close_matches(word.lower(), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known: {', '.join(known)}"


def _build_options(
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
    options = dataclasses.replace(base, **values)
    for warn, crit in (("wlag", "clag"), ("wrun", "crun")):
        warn_value, crit_value = getattr(options, warn), getattr(options, crit)
        if warn_value > crit_value:
            warn_note = "" if warn in lines else " (default)"
            crit_note = "" if crit in lines else " (default)"
            problems.append(
                Problem(
                    path,
                    lines.get(warn, lines.get(crit, line)),
                    f"{warn} {_short_duration(warn_value)}{warn_note} is greater than "
                    f"{crit} {_short_duration(crit_value)}{crit_note}: the warning threshold "
                    "must not exceed the critical one",
                )
            )
    return (None if problems else options), problems


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn()


@dataclass(frozen=True)
class Settings:
    """The site-wide settings; ``Settings()`` is what a machine without the file gets.

    ``backends`` keeps the passive back ends' sections as raw strings: their meaning
    belongs to the code in ``nsca/``, which validates them when it is used.
    """

    path: str | None = None
    pairs: str = DEFAULT_PAIRS_PATH
    state_dir: str = "/var/lib/zettabee"
    log_dir: str = "/var/log/zettabee"
    lock_dir: str = "/run/zettabee"
    spool_dir: str = "/var/spool/zettabee"
    known_hosts: str = "/etc/zettabee/known_hosts"
    defaults: PairOptions = field(default_factory=PairOptions)
    host_name: str | None = None
    service_template: str = DEFAULT_SERVICE_TEMPLATE
    passive: tuple[str, ...] = ()
    backends: dict[str, dict[str, str]] = field(default_factory=dict, hash=False)

    def monitoring_host(self) -> str:
        """The host the pairs' services belong to: as configured, else this machine's FQDN.

        Resolved only when asked, because a check plugin that never submits passively
        should not wait on a slow resolver.
        """
        return self.host_name or _fqdn()

    def service_name(self, pair: Pair, check: str) -> str:
        """The Nagios/Icinga service of ``check`` (lag or runtime) for ``pair``."""
        if check not in CHECKS:
            raise ValueError(f"unknown check {check!r}; known: {', '.join(CHECKS)}")
        return self.service_template.format(
            check=check,
            fs=pair.destination.fs,
            destination=str(pair.destination),
            source=str(pair.source),
            fingerprint=pair.fingerprint,
        )


def load_settings(path: str | None = None) -> Settings:
    """Read the settings from ``path``, else ``$ZETTABEE_SETTINGS``, else the default.

    A missing file at the default location means all defaults, so a fresh install works
    with no settings at all; a file that was named on purpose and is missing is a mistake
    worth stopping for.
    """
    env = os.environ.get(SETTINGS_ENV) or None
    chosen = path or env or DEFAULT_SETTINGS_PATH
    try:
        with open(chosen, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except FileNotFoundError:
        if path is None and env is None:
            return Settings()
        named = f" (named by {SETTINGS_ENV})" if path is None else ""
        raise ConfigError([Problem(chosen, 0, f"settings file not found{named}")]) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([Problem(chosen, 0, f"cannot read settings file: {reason}")]) from exc
    return parse_settings(text, chosen)


class _IniLines:
    """Where each section and key sits in an INI text, since configparser forgets.

    Mirrors configparser's rules closely enough for messages: section headers, ``key =``
    or ``key:`` lines, whole-line comments, and indented continuation lines.
    """

    _SECTION_RE = re.compile(r"\[(?P<name>.+)\]")

    def __init__(self, text: str) -> None:
        self.sections: dict[str, int] = {}
        self.keys: dict[tuple[str, str], int] = {}
        section: str | None = None
        key_indent: int | None = None
        for number, raw in enumerate(text.split("\n"), 1):
            stripped = raw.strip()
            if not stripped or stripped[0] in "#;":
                key_indent = None  # blank and comment lines end a value here
                continue
            indent = len(raw) - len(raw.lstrip())
            if key_indent is not None and indent > key_indent:
                continue
            header = self._SECTION_RE.match(stripped)
            if header:
                section = header["name"]
                self.sections.setdefault(section, number)
                key_indent = None
                continue
            if section is not None:
                key = re.split(r"[=:]", stripped, maxsplit=1)[0].strip().lower()
                self.keys.setdefault((section, key), number)
                key_indent = indent

    def key(self, section: str, key: str) -> int:
        return self.keys.get((section, key), self.sections.get(section, 0))


def parse_settings(text: str, path: str = "<settings>") -> Settings:
    """Settings from INI ``text``; ConfigError lists every problem with ``path:line``.

    Only whole-line comments are recognised: the back-end sections hold passwords, and a
    password may contain ``#`` or ``;``.
    """
    parser = configparser.ConfigParser(
        interpolation=None,
        # "[DEFAULT]" would silently leak its keys into every section: make it unknown.
        default_section="\0zettabee: no default section",
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
    )
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(_configparser_problems(exc, text, path)) from None

    lines = _IniLines(text)
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    backends: dict[str, dict[str, str]] = {}

    for section in parser.sections():
        if section not in _SECTIONS:
            problems.append(
                Problem(
                    path,
                    lines.sections.get(section, 0),
                    f"unknown section [{section}]{_suggest(section, _SECTIONS)}",
                )
            )
        elif section in PASSIVE_BACKENDS:
            backends[section] = dict(parser.items(section))

    if parser.has_section("paths"):
        for key, value in parser.items("paths"):
            where = lines.key("paths", key)
            if key not in _PATH_KEYS:
                problems.append(
                    Problem(
                        path, where, f"unknown key {key!r} in [paths]{_suggest(key, _PATH_KEYS)}"
                    )
                )
                continue
            message = validate_path(value)
            if message:
                problems.append(Problem(path, where, f"{key}: {message}"))
            else:
                values[key] = value

    if parser.has_section("defaults"):
        items = []
        for key, value in parser.items("defaults"):
            where = lines.key("defaults", key)
            if key == "port":
                problems.append(
                    Problem(
                        path,
                        where,
                        "port cannot have a default: each mbuffer pair needs its own port; "
                        "set it on the pair's line, or leave it out to pick a free one",
                    )
                )
                continue
            items.append((key, value, where))
        defaults, found = _build_options(
            items, PairOptions(), path, lines.sections.get("defaults", 0)
        )
        problems.extend(found)
        if defaults is not None:
            values["defaults"] = defaults

    if parser.has_section("monitoring"):
        problems.extend(_monitoring(parser, lines, path, values))

    for name in values.get("passive", ()):
        if not parser.has_section(name):
            where = lines.key("monitoring", "passive")
            problems.append(
                Problem(
                    path, where, f"passive back end {name!r} is listed but has no [{name}] section"
                )
            )

    if problems:
        raise ConfigError(sorted(problems, key=lambda p: p.line))
    return Settings(path=path, backends=backends, **values)


def _monitoring(
    parser: configparser.ConfigParser, lines: _IniLines, path: str, values: dict[str, Any]
) -> list[Problem]:
    problems: list[Problem] = []
    for key, value in parser.items("monitoring"):
        where = lines.key("monitoring", key)
        if key not in _MONITORING_KEYS:
            problems.append(
                Problem(
                    path,
                    where,
                    f"unknown key {key!r} in [monitoring]{_suggest(key, _MONITORING_KEYS)}",
                )
            )
        elif key == "host_name":
            message = _object_name_problem(value)
            if message:
                problems.append(Problem(path, where, f"host_name {value!r} {message}"))
            else:
                values["host_name"] = value or None
        elif key == "service_template":
            message = check_service_template(value)
            if message:
                problems.append(Problem(path, where, message))
            else:
                values["service_template"] = value
        else:
            seen: list[str] = []
            for name in (name.strip() for name in value.split(",")):
                if not name:
                    continue
                if name not in PASSIVE_BACKENDS:
                    known = ", ".join(PASSIVE_BACKENDS)
                    message = f"passive: unknown back end {name!r}; known: {known}"
                    problems.append(Problem(path, where, message))
                elif name in seen:
                    problems.append(Problem(path, where, f"passive: {name!r} is listed twice"))
                else:
                    seen.append(name)
            values["passive"] = tuple(seen)
    return problems


def _object_name_problem(name: str) -> str | None:
    for char in name:
        if char in _ILLEGAL_OBJECT_CHARS or not char.isprintable() and char != " ":
            return f"contains {describe_char(char)}, which Nagios and Icinga refuse in names"
    return None


def check_service_template(template: str) -> str | None:
    """Why ``template`` cannot name services, or None.

    It must hold ``{check}`` (else lag and runtime collide) and one of ``{fs}``,
    ``{destination}``, ``{fingerprint}`` (else every pair reports to one service).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"service_template {template!r}: {exc}"
    allowed = ", ".join("{" + name + "}" for name in TEMPLATE_FIELDS)
    used = set()
    for literal, name, spec, conversion in parsed:
        message = _object_name_problem(literal)
        if message:
            return f"service_template {template!r} {message}"
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "")
            shown += (f":{spec}" if spec else "") + "}"
            return f"service_template {template!r}: unknown field {shown}; allowed: {allowed}"
        used.add(name)
    if "check" not in used:
        return f"service_template {template!r} lacks {{check}}: lag and runtime would collide"
    if not used & {"fs", "destination", "fingerprint"}:
        return (
            f"service_template {template!r} names no pair: use {{fs}}, {{destination}} "
            "or {fingerprint}"
        )
    return None


def _configparser_problems(exc: configparser.Error, text: str, path: str) -> list[Problem]:
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return [
            Problem(path, exc.lineno, "a key outside any section; start with [paths] or similar")
        ]
    if isinstance(exc, configparser.ParsingError):
        # exc.errors holds repr()s of the lines; quote the file's own text instead.
        source = text.split("\n")
        return [
            Problem(
                path, lineno, f"cannot parse {source[lineno - 1].strip()!r}: expected 'key = value'"
            )
            for lineno, _ in exc.errors
        ]
    if isinstance(exc, configparser.DuplicateSectionError):
        return [Problem(path, exc.lineno or 0, f"section [{exc.section}] given twice")]
    if isinstance(exc, configparser.DuplicateOptionError):
        message = f"key {exc.option!r} given twice in [{exc.section}]"
        return [Problem(path, exc.lineno or 0, message)]
    return [Problem(path, 0, str(exc))]


# --------------------------------------------------------------------------------------
# The pair file
# --------------------------------------------------------------------------------------

_COMMENT_RE = re.compile(r"(?:^|[ \t])#.*")
_COLUMNS_RE = re.compile(r"[ \t]+")
_LINE_SHAPE = "a pair line is 'source destination [options]'"


@dataclass(frozen=True)
class PairFile:
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
    pairs: list[Pair] = []
    problems: list[Problem] = []
    destinations: dict[Endpoint, int] = {}
    fingerprints: dict[str, int] = {}
    ports: dict[tuple[str, int], int] = {}
    # split("\n"), not splitlines(): a stray form feed or U+2028 must not shift every
    # following line number away from what the operator's editor shows.
    for number, raw in enumerate(text.split("\n"), 1):
        line = _COMMENT_RE.sub("", raw.removesuffix("\r"), count=1).strip(" \t")
        if not line:
            continue
        pair, found = _parse_line(line, path, number, settings.defaults)
        if pair is not None:
            found.extend(_clashes(pair, destinations, fingerprints, ports, path, number))
        problems.extend(found)
        if pair is None or found:
            continue
        pairs.append(pair)
        destinations[pair.destination] = number
        fingerprints[pair.fingerprint] = number
        if pair.options.transport == "mbuffer" and pair.options.port is not None:
            ports[(pair.destination.host, pair.options.port)] = number
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
        options, found = _build_options(items, defaults, path, number)
        problems.extend(found)
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


def _clashes(
    pair: Pair,
    destinations: dict[Endpoint, int],
    fingerprints: dict[str, int],
    ports: dict[tuple[str, int], int],
    path: str,
    number: int,
) -> list[Problem]:
    problems = []
    if pair.destination in destinations:
        problems.append(
            Problem(
                path,
                number,
                f"destination {pair.destination} is already used on line "
                f"{destinations[pair.destination]}; a file system can receive from one pair only",
            )
        )
    elif pair.fingerprint in fingerprints:
        problems.append(
            Problem(
                path,
                number,
                f"fingerprint {pair.fingerprint} is already used on line "
                f"{fingerprints[pair.fingerprint]}",
            )
        )
    # mbuffer listens on the destination host: a port is taken per destination host.
    port = (pair.destination.host, pair.options.port or 0)
    if pair.options.transport == "mbuffer" and port in ports:
        problems.append(
            Problem(
                path,
                number,
                f"mbuffer port {port[1]} on {port[0]} is already used on line {ports[port]}; "
                "give each mbuffer pair its own port, or none to pick a free one",
            )
        )
    return problems


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
