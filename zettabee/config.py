"""The settings file (INI): paths, the pairs' [defaults], monitoring, passive back ends.

Parsed into a frozen dataclass when a run starts; every problem is reported at once with
its file and line. The pair file has its own module, ``pairfile``.
"""

from __future__ import annotations

import configparser
import functools
import os
import re
import string

from zettabee.errors import ConfigError, Problem
from zettabee.names import describe_char, validate_path
from zettabee.options import build_options, suggest
from zettabee.pair import Pair, PairOptions
from zettabee.records import Record, field

TYPE_CHECKING = False  # typing for the annotations only: importing it costs every check
if TYPE_CHECKING:
    from typing import Any

# What some editors (Windows Notepad's "UTF-8") put before the first line of a file.
BOM = "\ufeff"

DEFAULT_SETTINGS_PATH = "/etc/zettabee/zettabee.ini"
SETTINGS_ENV = "ZETTABEE_SETTINGS"
DEFAULT_PAIRS_PATH = "/etc/zettabee/zettabee.cfg"

CHECKS = ("lag", "runtime")
PASSIVE_BACKENDS = ("nsca", "send_nsca", "icinga2-api")
TEMPLATE_FIELDS = ("check", "fs", "destination", "source", "fingerprint")
DEFAULT_SERVICE_TEMPLATE = "zettabee {check} {fs}"

_PATH_KEYS = ("pairs", "state_dir", "log_dir", "lock_dir", "spool_dir", "known_hosts")
_MONITORING_KEYS = ("host_name", "service_template", "passive")
_SECTIONS = ("paths", "defaults", "monitoring", *PASSIVE_BACKENDS)

# Nagios' default illegal_object_name_chars, plus what would break a tab- or line-delimited
# passive result: a service or host name holding them is rejected by the monitoring server
# long after the run, where nobody looks.
_ILLEGAL_OBJECT_CHARS = frozenset("`~!$%^&*|'\"<>?,()=\t\n\r")


@functools.cache
def _fqdn() -> str:
    import socket  # only a passive result needs it, and the module costs every check

    return socket.getfqdn()


class Settings(Record, frozen=True):
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
    text = text.removeprefix(BOM)
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
    values: dict[str, Any] = {}
    backends: dict[str, dict[str, str]] = {}
    problems = _sections(parser, lines, path, backends)
    if parser.has_section("paths"):
        problems.extend(_paths(parser, lines, path, values))
    if parser.has_section("defaults"):
        problems.extend(_defaults(parser, lines, path, values))
    if parser.has_section("monitoring"):
        problems.extend(_monitoring(parser, lines, path, values))
    problems.extend(_passive_sections(parser, lines, path, values))
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: p.line))
    return Settings(path=path, backends=backends, **values)


def _sections(
    parser: configparser.ConfigParser,
    lines: _IniLines,
    path: str,
    backends: dict[str, dict[str, str]],
) -> list[Problem]:
    problems: list[Problem] = []
    for section in parser.sections():
        if section not in _SECTIONS:
            problems.append(
                Problem(
                    path,
                    lines.sections.get(section, 0),
                    f"unknown section [{section}]{suggest(section, _SECTIONS)}",
                )
            )
        elif section in PASSIVE_BACKENDS:
            backends[section] = dict(parser.items(section))
    return problems


def _paths(
    parser: configparser.ConfigParser, lines: _IniLines, path: str, values: dict[str, Any]
) -> list[Problem]:
    problems: list[Problem] = []
    for key, value in parser.items("paths"):
        where = lines.key("paths", key)
        if key not in _PATH_KEYS:
            problems.append(
                Problem(path, where, f"unknown key {key!r} in [paths]{suggest(key, _PATH_KEYS)}")
            )
            continue
        message = validate_path(value)
        if message:
            problems.append(Problem(path, where, f"{key}: {message}"))
        else:
            values[key] = value
    return problems


def _defaults(
    parser: configparser.ConfigParser, lines: _IniLines, path: str, values: dict[str, Any]
) -> list[Problem]:
    problems: list[Problem] = []
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
    defaults, found = build_options(items, PairOptions(), path, lines.sections.get("defaults", 0))
    problems.extend(found)
    if defaults is not None:
        values["defaults"] = defaults
    return problems


def _passive_sections(
    parser: configparser.ConfigParser, lines: _IniLines, path: str, values: dict[str, Any]
) -> list[Problem]:
    problems: list[Problem] = []
    for name in values.get("passive", ()):
        if not parser.has_section(name):
            where = lines.key("monitoring", "passive")
            problems.append(
                Problem(
                    path, where, f"passive back end {name!r} is listed but has no [{name}] section"
                )
            )
    return problems


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
                    f"unknown key {key!r} in [monitoring]{suggest(key, _MONITORING_KEYS)}",
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
