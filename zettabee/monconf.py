"""Monitoring objects for the pairs: what ``zettabee icinga-config`` and ``nagios-config`` print.

The commands and templates ship in ``icinga-conf/``; this module writes the objects that
use them: the destination host and two services per pair, named by the settings'
``service_template`` exactly as ``replicate`` names its passive results
(:meth:`Settings.service_name`). A hand-typed service name that differs by one character
receives nothing, and the stale alarm it raises a day later blames cron, not the typo.

Every service is written out as an object of its own, whatever the template: the apply
rules of ``services.conf`` only know the default names. Nothing here depends on the
clock or the machine beyond the settings, so the output of an unchanged pair file is the
same on every run and can be kept under version control or compared before a reload.

Modes:

- ``passive``: replicate's results only; the server raises the stale alarm when they stop
  (freshness: the shipped templates' cron period plus slack, or ``freshness``);
- ``active``: the server runs ``check_zettabee_lag`` and ``check_zettabee_runtime``, with
  the settings and pair file this run read, so the plugins see the same pairs;
- ``both``: the active checks, and replicate's results for the same services in between.

Where the monitoring user cannot read ZFS itself, ``sudo`` selects the shipped commands
that run the plugins through ``sudo -n`` (``zettabee_lag_sudo``, ``check_zettabee_lag_sudo``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from zettabee.config import CHECKS, DEFAULT_SETTINGS_PATH, Settings
from zettabee.errors import ConfigError, Problem, UsageError
from zettabee.names import describe_char
from zettabee.pair import Pair

PASSIVE, ACTIVE, BOTH = "passive", "active", "both"
MODES = (PASSIVE, ACTIVE, BOTH)
KINDS = ("icinga", "nagios")

# What the shipped templates assume: cron every 15 minutes, 10 minutes of slack.
TEMPLATE_CRON_PERIOD = 15 * 60
TEMPLATE_SLACK = 10 * 60

ACTIVE_TEMPLATE = "zettabee-active-service"
PASSIVE_TEMPLATE = "zettabee-passive-service"
ICINGA_COMMANDS = {"lag": "zettabee_lag", "runtime": "zettabee_runtime"}
NAGIOS_COMMANDS = {"lag": "check_zettabee_lag", "runtime": "check_zettabee_runtime"}
NAGIOS_HOST_TEMPLATE = "linux-server"  # Nagios' sample configuration, Debian's included

# Nagios' default illegal_object_name_chars; ';' starts a comment in its object files and
# separates the fields of PROCESS_SERVICE_CHECK_RESULT, so no passive result reaches a
# name that holds one.
_ILLEGAL_NAME_CHARS = frozenset("`~!$%^&*|'\"<>?,()=;")
# A path on a Nagios command line: $ARGn$ is pasted in and the line split on blanks (or
# handed to /bin/sh when it holds shell characters), so only plain characters can pass.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./:@+,%=-]+")


@dataclass(frozen=True)
class Service:
    """One service of one pair, as the monitoring server must know it."""

    check: str  # "lag" or "runtime"
    name: str
    pair: Pair
    argument: str  # what names the pair on the plugin's command line


@dataclass(frozen=True)
class Request:
    """What to print, from the command line; the defaults fit a single backup host."""

    host: str
    mode: str = PASSIVE
    address: str | None = None  # the host object's address (default: its name)
    host_object: bool = True  # False: services only, for a host defined elsewhere
    host_template: str | None = None  # Nagios default: linux-server; Icinga: none
    endpoint: str | None = None  # Icinga: the agent that runs the active checks
    freshness: int | None = None  # seconds without a result before the stale alarm
    sudo: bool = False  # active: the plugins run through sudo (the *_sudo commands)
    settings_file: str | None = None  # --settings for the plugins
    pair_file: str | None = None  # --config for the plugins


# --------------------------------------------------------------------------------------
# What goes in: names and paths, checked once
# --------------------------------------------------------------------------------------


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a host or service in both syntaxes and receive passive
    results, or None."""
    if not name:
        return "is empty"
    if name != name.strip():
        return "begins or ends with a blank, which Nagios drops"
    for char in name:
        if char in _ILLEGAL_NAME_CHARS or not char.isprintable() and char != " ":
            return f"contains {describe_char(char)}, which Nagios or Icinga refuse in names"
    return None


def _checked_name(what: str, name: str) -> str:
    problem = name_problem(name)
    if problem:
        raise UsageError(f"{what} {name!r} {problem}")
    return name


def services(settings: Settings, pairs: Sequence[Pair]) -> list[Service]:
    """The lag and runtime services of ``pairs``, in pair-file order.

    Two pairs whose services would share a name (the same file system on two destination
    hosts, under a ``service_template`` with ``{fs}`` only) are refused with both lines:
    one of them would never be monitored.
    """
    by_fs: dict[str, int] = {}
    for pair in pairs:
        by_fs[pair.destination.fs] = by_fs.get(pair.destination.fs, 0) + 1
    found: list[Service] = []
    seen: dict[str, Pair] = {}
    problems = []
    for pair in pairs:
        # The file system is what an admin reads; the fingerprint when it names two pairs.
        unique = by_fs[pair.destination.fs] == 1
        argument = pair.destination.fs if unique else pair.fingerprint
        for check in CHECKS:
            name = settings.service_name(pair, check)
            problem = name_problem(name)
            if problem:
                where = settings.path or "the settings"
                problems.append(
                    Problem(where, 0, f"service name {name!r} (service_template) {problem}")
                )
                continue
            other = seen.get(name)
            if other is not None:
                problems.append(
                    Problem(
                        pair.path,
                        pair.line,
                        f"{pair.name}: its {check} service {name!r} is also that of "
                        f"{other.name} (line {other.line}); service_template must tell them "
                        "apart, e.g. with {destination}",
                    )
                )
                continue
            seen[name] = pair
            found.append(Service(check, name, pair, argument))
    if problems:
        raise ConfigError(problems)
    return found


def with_children(lines: Sequence[Pair], state_dir: str) -> list[Pair]:
    """``lines`` with, after each recursive one, its children as its last run listed
    them (a line not yet run has none: its services appear once it has)."""
    from zettabee.tree import recorded

    pairs: list[Pair] = []
    for line in lines:
        pairs += recorded(state_dir, line).pairs if line.options.recursive else [line]
    return pairs


def plugin_files(settings: Settings, pair_file: str) -> tuple[str | None, str | None]:
    """``--settings`` and ``--config`` for the plugins, when the defaults would not do.

    The monitoring server starts the plugins with its own environment, from its own
    directory: without these they would read the default files, not the ones this run
    read (``--settings``, ``$ZETTABEE_SETTINGS``, ``-c``).
    """
    settings_file = None
    if settings.path and os.path.abspath(settings.path) != DEFAULT_SETTINGS_PATH:
        settings_file = os.path.abspath(settings.path)
    config_file = None
    if os.path.abspath(pair_file) != os.path.abspath(settings.pairs):
        config_file = os.path.abspath(pair_file)
    return settings_file, config_file


def freshness(cron_period: int | None, slack: int | None) -> int | None:
    """Seconds without a result before the stale alarm; None when the templates' own."""
    if cron_period is None and slack is None:
        return None
    period = TEMPLATE_CRON_PERIOD if cron_period is None else cron_period
    total = period + (TEMPLATE_SLACK if slack is None else slack)
    if total <= 0:
        raise UsageError("--cron-period plus --slack must be longer than 0 seconds")
    return None if total == TEMPLATE_CRON_PERIOD + TEMPLATE_SLACK else total


def host_mismatch(settings: Settings, request: Request) -> str | None:
    """A warning when passive results would go to another host than the one printed."""
    if request.mode == ACTIVE:
        return None
    submitted = settings.monitoring_host()
    if request.host == submitted:
        return None
    return (
        f"replicate submits its results for host {submitted!r} ([monitoring] host_name), "
        f"not {request.host!r}: set host_name = {request.host} in the settings, or these "
        "services receive nothing"
    )


def _check_request(request: Request, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if request.mode not in MODES:
        raise UsageError(f"mode {request.mode!r}: choose one of {', '.join(MODES)}")
    _checked_name("host", request.host)
    if request.host_template is not None:
        _checked_name("host template", request.host_template)
    if request.endpoint is not None:
        if kind == "nagios":
            raise UsageError("--endpoint is an Icinga 2 setting; Nagios has no agents")
        _checked_name("endpoint", request.endpoint)
    if request.address is not None and (
        not request.address or any(c.isspace() or c == ";" for c in request.address)
    ):
        raise UsageError(f"address {request.address!r}: one host name or IP address")
    if request.freshness is not None and request.mode != PASSIVE:
        raise UsageError(
            "--cron-period and --slack set when a passive service turns stale; in "
            f"--mode {request.mode} the server checks the pairs itself"
        )
    if request.mode == PASSIVE:
        if request.sudo:
            raise UsageError("--sudo runs the check plugins; --mode passive runs none")
        return
    for option, path in (("--settings", request.settings_file), ("--config", request.pair_file)):
        if path is None:
            continue
        if kind == "nagios" and not _PLAIN_PATH.fullmatch(path):
            raise UsageError(
                f"{path!r} cannot go on a Nagios command line as the plugins' {option}: "
                "use a path of letters, digits and _ . / : @ + , % = -"
            )
        if kind == "icinga" and "$" in path:
            raise UsageError(
                f"{path!r} cannot be the plugins' {option}: Icinga reads '$' as a macro"
            )


def render(kind: str, settings: Settings, pairs: Sequence[Pair], request: Request) -> str:
    """The objects for ``pairs`` in ``kind``'s syntax (``icinga`` or ``nagios``)."""
    _check_request(request, kind)
    found = services(settings, pairs)
    if kind == "icinga":
        return icinga_config(found, request)
    return nagios_config(found, request)


# --------------------------------------------------------------------------------------
# Icinga 2
# --------------------------------------------------------------------------------------


def icinga_string(value: str) -> str:
    """An Icinga DSL string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def icinga_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def icinga_config(found: Sequence[Service], request: Request) -> str:
    """The host (unless left out) and the services, for the shipped commands.conf and
    templates.conf."""
    q = icinga_string
    parts = [
        "/*\n"
        f" * zettabee: replication services from `zettabee icinga-config --mode {request.mode}`.\n"
        " * Needs commands.conf and templates.conf from zettabee's icinga-conf/icinga2.\n"
        " * The service names are those replicate submits its passive results for: to\n"
        " * rename them, change service_template in zettabee's settings and generate\n"
        " * this file anew.\n"
        " */\n"
    ]
    if request.host_object:
        lines = [f"object Host {q(request.host)} {{"]
        if request.host_template:
            lines.append(f"\timport {q(request.host_template)}")
        else:
            lines.append('\tcheck_command = "hostalive"')
        lines.append(f"\taddress = {q(request.address or request.host)}")
        parts.append("\n".join(lines) + "\n}\n")
    for service in found:
        fs = service.pair.destination.fs
        lines = [f"object Service {q(service.name)} {{", f"\thost_name = {q(request.host)}"]
        if request.mode == PASSIVE:
            lines.append(f"\timport {q(PASSIVE_TEMPLATE)}")
            if request.freshness is not None:
                interval = icinga_duration(request.freshness)
                lines += [f"\tcheck_interval = {interval}", f"\tretry_interval = {interval}"]
        else:
            command = ICINGA_COMMANDS[service.check]
            check_command = f"{command}_sudo" if request.sudo else command
            lines += [f"\timport {q(ACTIVE_TEMPLATE)}", f"\tcheck_command = {q(check_command)}"]
            if request.mode == BOTH:
                lines.append("\tenable_passive_checks = true")
            if request.endpoint:
                lines.append(f"\tcommand_endpoint = {q(request.endpoint)}")
            lines.append(f"\tvars.{command}_destination = {q(service.argument)}")
            if request.settings_file:
                lines.append(f"\tvars.{command}_settings = {q(request.settings_file)}")
            if request.pair_file:
                lines.append(f"\tvars.{command}_config = {q(request.pair_file)}")
        lines += [
            f"\tvars.zettabee_destination = {q(fs)}",
            f"\tvars.zettabee_mode = {q(request.mode)}",
        ]
        parts.append("\n".join(lines) + "\n}\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# Nagios 4
# --------------------------------------------------------------------------------------


def _nagios_define(kind: str, attributes: Sequence[tuple[str, str]]) -> str:
    lines = [f"define {kind} {{"]
    lines += [f"    {key:<32}{value}".rstrip() for key, value in attributes]
    return "\n".join(lines) + "\n}\n"


def nagios_config(found: Sequence[Service], request: Request) -> str:
    """The host (unless left out) and the services, for the shipped commands.cfg and
    templates.cfg."""
    parts = [
        "#" * 79 + "\n"
        f"# zettabee: replication services from `zettabee nagios-config --mode {request.mode}`.\n"
        "# Needs commands.cfg and templates.cfg from zettabee's icinga-conf/nagios.\n"
        "# The service descriptions are those replicate submits its passive results\n"
        "# for: to rename them, change service_template in zettabee's settings and\n"
        "# generate this file anew.\n" + "#" * 79 + "\n"
    ]
    if request.host_object:
        parts.append(
            _nagios_define(
                "host",
                [
                    ("use", request.host_template or NAGIOS_HOST_TEMPLATE),
                    ("host_name", request.host),
                    ("address", request.address or request.host),
                ],
            )
        )
    options = []
    if request.settings_file:
        options += ["--settings", request.settings_file]
    if request.pair_file:
        options += ["--config", request.pair_file]
    for service in found:
        template = PASSIVE_TEMPLATE if request.mode == PASSIVE else ACTIVE_TEMPLATE
        attributes = [
            ("use", template),
            ("host_name", request.host),
            ("service_description", service.name),
        ]
        if request.mode == PASSIVE:
            if request.freshness is not None:
                attributes.append(("freshness_threshold", str(request.freshness)))
        else:
            command = NAGIOS_COMMANDS[service.check]
            args = [f"{command}_sudo" if request.sudo else command, service.argument]
            if options:
                args.append(" ".join(options))
            attributes.append(("check_command", "!".join(args)))
            if request.mode == BOTH:
                attributes.append(("passive_checks_enabled", "1"))
        parts.append(_nagios_define("service", attributes))
    return "\n".join(parts)
