"""The check plugins' command line: their options, ``--help``, and every exit UNKNOWN.

What the plugins check lives in ``checks``; this is how they are called. Like ``checks``,
it must never import the replication engine or paramiko: Nagios starts a plugin thousands
of times a day.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

import nagiosplugin

from zettabee import __version__
from zettabee.checks import threshold
from zettabee.units import parse_duration

TYPE_CHECKING = False  # typing for the annotations only: importing it costs every check
if TYPE_CHECKING:
    from typing import Any, NoReturn

UNKNOWN_EXIT = 3
DEFAULT_TIMEOUT = 10

PERMISSIONS = (
    "The plugins need no root. The user that runs them (nagios) must be able to read the "
    "settings and the pair file, read the state directory ([paths] state_dir, "
    "/var/lib/zettabee: the status files) and open the lock files in [paths] lock_dir "
    "(/run/zettabee) for reading; zettabee creates both 0750 and the files 0640, so "
    "`chgrp -R nagios` them and keep the group. It must also be able to run `zfs get` on "
    "a destination pool on this host: OpenZFS lets every user read properties; with "
    "zfs-fuse or a restricted /dev/zfs, give it a sudo rule for the plugin and put `sudo` "
    "in front of the command line. A destination on a remote host is judged from the "
    "snapshot its last successful run received. Nothing is written, and no SSH "
    "connection is made."
)


class Parser(argparse.ArgumentParser):
    """argparse as the plugin guidelines want it: every exit is UNKNOWN, on stdout.

    argparse exits 2 (CRITICAL to Nagios) on a usage error and writes it to stderr, which
    Nagios does not show; ``--help`` and ``--version`` exit 0.
    """

    def __init__(self, check_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check_name = check_name

    def error(self, message: str) -> NoReturn:
        self.exit(UNKNOWN_EXIT, f"{self.check_name} UNKNOWN - {message}\n{self.format_usage()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stdout.write(message)
        sys.stdout.flush()
        sys.exit(UNKNOWN_EXIT)


def _timeout(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _range_arg(text: str) -> nagiosplugin.Range:
    try:
        return threshold(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range: {exc}") from None


def command_line(
    check_name: str, prog: str, description: str, thresholds: str, every: bool = False
) -> Parser:
    """The command line shared by the check plugins."""
    what = "(DESTINATION | --all)" if every else "DESTINATION"
    parser = Parser(
        check_name,
        prog=prog,
        usage=f"%(prog)s [--config PAIRFILE] [--settings INIFILE] [-w RANGE] [-c RANGE] "
        f"[-t SECONDS] [-v] {what}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(prog, thresholds, every),
    )
    parser.add_argument(
        "--config",
        metavar="PAIRFILE",
        help="the pair file (default: [paths] pairs of the settings)",
    )
    parser.add_argument("--settings", metavar="INIFILE",
                        help="the settings file (default: $ZETTABEE_SETTINGS, else /etc/zettabee/zettabee.ini)")  # fmt: skip
    parser.add_argument("-w", "--warning", metavar="RANGE", type=_range_arg,
                        help="warning range in seconds (default: the pair's own threshold)")  # fmt: skip
    parser.add_argument("-c", "--critical", metavar="RANGE", type=_range_arg,
                        help="critical range in seconds (default: the pair's own threshold)")  # fmt: skip
    parser.add_argument("-t", "--timeout", metavar="SECONDS", type=_timeout, default=DEFAULT_TIMEOUT,
                        help=f"give up after this long, UNKNOWN (default {DEFAULT_TIMEOUT}; 0: never)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more output: -v every finding, -vv and -vvv the commands run")  # fmt: skip
    parser.add_argument(
        "-V", "--version", action="version", version=f"{prog} (zettabee {__version__})"
    )
    if every:
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("destination", metavar="DESTINATION", nargs="?",
                            help="the pair's destination: pool/fs, host:pool/fs, fingerprint or last component")  # fmt: skip
        target.add_argument(
            "--all", action="store_true", help="check every pair of the pair file at once"
        )
    else:
        parser.add_argument("destination", metavar="DESTINATION",
                            help="the pair's destination: pool/fs, host:pool/fs, fingerprint or last component")  # fmt: skip
    return parser


def _epilog(prog: str, thresholds: str, every: bool) -> str:
    paragraphs = [
        thresholds,
        "RANGE is a Nagios range, [@][start:][end] in seconds (~ for minus infinity); the "
        "bounds may also be durations such as 90m, 2h or 1h30m.",
        "Exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also for usage errors, "
        "--help and --version).",
        f"Permissions: {PERMISSIONS}",
    ]
    examples = [f"  {prog} backup/data", f"  {prog} -w 1h -c 3h backup/data"]
    if every:
        examples.append(f"  {prog} --all")
    text = "\n\n".join(textwrap.fill(p, width=79) for p in paragraphs)
    return text + "\n\nExamples:\n" + "\n".join(examples)


def run(check: nagiosplugin.Check, verbose: int, timeout: int) -> NoReturn:
    """``check.main()`` with zettabee's own log lines (the commands run) in the output
    from ``-vv`` on."""
    runtime = nagiosplugin.Runtime()
    zlog = logging.getLogger("zettabee")
    if runtime.logchan is not None and runtime.logchan not in zlog.handlers:
        zlog.addHandler(runtime.logchan)
        zlog.setLevel(logging.DEBUG)
    check.main(verbose=verbose, timeout=timeout)
    raise AssertionError("unreachable: Check.main() exits")
