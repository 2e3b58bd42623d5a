"""The ``zettabee`` command line: its actions, options and ``--help`` (what each action
does is in :mod:`zettabee.cli`)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import NoReturn

from zettabee import __version__
from zettabee.monconf import MODES, NAGIOS_HOST_TEMPLATE, PASSIVE
from zettabee.units import parse_duration

# Exit codes: 0 success; 1 a pair failed; 2 usage or configuration error; 3 the pair is
# busy (another run holds its lock).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


ACTIONS = {
    "setup": "create zettabee's directories and check each pair end to end (SSH, host key, zfs, mbuffer, datasets)",
    "check-config": "validate the settings and the pair file; report every problem with file and line",
    "initialize": "full transfer of the source into a destination that does not exist yet",
    "update": "incremental transfer from the newest snapshot both sides share",
    "status": "show source, destination, state, lag, snapshot:port and run status of pairs",
    "runstatus": "follow a running transfer: bytes, rate, percentage and ETA where known (Ctrl-C quits; the transfer goes on)",
    "unlock": "clear what an interrupted run left behind; refuses while a live process holds the pair",
    "logfile": "print the path of a pair's log file (tail -f $(zettabee logfile DEST))",
    "fingerprint": "print source, destination and MD5 fingerprint of one pair or all",
    "purge": "destroy obsolete zettabee snapshots on both sides, never the newest common one; release holds no longer needed",
    "icinga-config": "print Icinga 2 host and service objects for the pairs, named as replicate submits them",
    "nagios-config": "print Nagios host and service definitions for the pairs, named as replicate submits them",
    "enroll": "set up a source host for the pairs that pull from it: zettabee-source of this version, "
    "the restricted key line in authorized_keys, its host key pinned (first contact, over paramiko)",
}

ENROLL_EPILOG = (
    "Logs in as --admin with --admin-key, else the password on --password-fd, else the "
    "agent's keys, else a password typed on the terminal (never from argv or the "
    "environment). The host key is pinned in the pairs' known_hosts file only if it "
    "equals --host-key-fingerprint or you answer yes on the terminal; a key that differs "
    "from one pinned is refused. Everything is checked before anything is written; "
    "enroll again with nothing changed writes nothing. Exit status: 0 enrolled, 1 the "
    "host refused or lacks something (the message says what), 2 usage or configuration "
    "error. Example: zettabee enroll db1.example.com --host-key-fingerprint "
    "SHA256:... 3</root/db1.password --password-fd 3"
)


class _WholeOptionNames(argparse.HelpFormatter):
    """Wraps text without breaking a word at its hyphens, so that an option named in a
    paragraph (``--host-key-fingerprint``) stays whole on one line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = " ".join(text.split())
        return textwrap.fill(
            text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    opts = common.add_argument_group("common options")
    opts.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                      help="pair file (default: [paths] pairs of the settings, /etc/zettabee/zettabee.cfg)")  # fmt: skip
    opts.add_argument("--settings", metavar="FILE", default=argparse.SUPPRESS,
                      help="settings file (default: $ZETTABEE_SETTINGS or /etc/zettabee/zettabee.ini)")  # fmt: skip
    opts.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="log every command as one could paste it, and timings")  # fmt: skip
    opts.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                      help="say what is done, not only what fails")  # fmt: skip
    opts.add_argument("--nagios", action="store_true", default=argparse.SUPPRESS,
                      help="also submit the result as a passive check result (back ends from the settings)")  # fmt: skip
    parser = _Parser(
        prog="zettabee",
        parents=[common],
        description="ZFS remote replication: zfs send | zfs recv pulled over SSH (or mbuffer), "
        "one pair per line of the pair file, watched by Nagios or Icinga.",
        epilog="Exit status: 0 success, 1 a pair failed, 2 usage or configuration error, "
        "3 the pair is busy with another run. Under cron nothing is printed on success.",
    )
    parser.add_argument("--version", action="version", version=f"zettabee {__version__}")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    for name, text in ACTIONS.items():
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        if name in ("initialize", "runstatus", "unlock", "logfile", "purge"):
            p.add_argument("destination", help="host:pool/fs, pool/fs, or its last component")
        elif name in ("update",):
            p.add_argument("destination", nargs="*", help="pairs to update (or --all)")
            p.add_argument("--all", action="store_true", help="every pair of the pair file")
        elif name in ("status", "fingerprint", "setup", "icinga-config", "nagios-config"):
            p.add_argument("destination", nargs="*", help="pairs (default: all)")
        if name == "initialize":
            p.add_argument("--force", action="store_true",
                           help="DESTROYS the existing destination file system, all its "
                           "snapshots and descendants (zfs destroy -r), then sends everything anew")  # fmt: skip
        if name == "status":
            p.add_argument("--fullstatus", "--full-status", action="store_true",
                           help="add the fingerprint and mbuffer port")  # fmt: skip
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "purge":
            p.add_argument("--dry-run", "-n", action="store_true",
                           help="print exactly what would be destroyed or released, change nothing")  # fmt: skip
            p.add_argument("--release", action="store_true",
                           help="also release the pair's hold on the newest common snapshot, "
                           "so that nothing of the pair pins a snapshot (a pair being retired)")  # fmt: skip
        if name == "setup":
            p.add_argument("--accept-new-host-key", action="store_true",
                           help="pin the key of each remote host (source, destination) in the "
                           "known_hosts file if it is not there yet (a changed key is still "
                           "refused)")  # fmt: skip
        if name in ("icinga-config", "nagios-config"):
            _monitoring_options(p, icinga=name == "icinga-config")
        if name == "enroll":
            p.epilog = ENROLL_EPILOG
            p.formatter_class = _WholeOptionNames
            _enroll_options(p)
    return parser


def _enroll_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "host", metavar="HOST", help="a source host of the pair file, as the pairs name it"
    )
    p.add_argument("--admin", metavar="USER", default="root",
                   help="who logs in to set it up (default: root); it must be able to write "
                   "the key user's authorized_keys and the zettabee-source path")  # fmt: skip
    p.add_argument(
        "--admin-key", metavar="FILE", help="the admin's private key (else agent or password)"
    )
    p.add_argument("--password-fd", metavar="N", type=_fd,
                   help="read the admin's password from file descriptor N (its first line)")  # fmt: skip
    p.add_argument("--host-key-fingerprint", metavar="SHA256:...",
                   help="the host key's fingerprint as ssh-keygen -lf prints it on the host: "
                   "pinned without asking when it matches, refused when not")  # fmt: skip
    p.add_argument("--authorized-keys", metavar="PATH",
                   help="the key user's authorized_keys on the host, as sshd's "
                   "AuthorizedKeysFile (%%h home, %%u user; default: %%h/.ssh/authorized_keys)")  # fmt: skip
    p.add_argument("--source-path", metavar="PATH",
                   help="where zettabee-source is or goes (default: /usr/bin/zettabee-source "
                   "or /usr/local/bin/zettabee-source, whichever is this version; this "
                   "version's zipapp at the latter if neither)")  # fmt: skip
    p.add_argument("--from", dest="from_patterns", metavar="PATTERNS", type=_patterns,
                   help="the key line's from= (comma-separated addresses or patterns; "
                   "'any' for none; default: the address the host sees this one come from)")  # fmt: skip
    p.add_argument("--timeout", metavar="SECONDS", type=float,
                   help="connect, banner and login timeout (default: 15)")  # fmt: skip
    p.add_argument("--user", metavar="NAME", dest="delegate",
                   help="OpenZFS: the pairs' own non-root user= on the host: created if missing "
                   "(no password, not locked) and given exactly the zfs allow a pull of each "
                   "source file system needs (send,snapshot,destroy,mount,hold,release, and "
                   "bookmark for pairs with bookmark=yes)")  # fmt: skip
    p.add_argument("--remove-user", action="store_true",
                   help="with --remove and --user: remove that user and its home as well")  # fmt: skip
    p.add_argument("--dry-run", "-n", action="store_true", help="print every change, make none")
    p.add_argument("--remove", action="store_true",
                   help="take zettabee's line out of authorized_keys (and the zipapp enroll "
                   "placed, when no line uses it any more)")  # fmt: skip


def _fd(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number")
    return int(text)


def _patterns(text: str) -> tuple[str, ...]:
    return () if text == "any" else tuple(w for w in text.split(",") if w)


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _monitoring_options(p: argparse.ArgumentParser, icinga: bool) -> None:
    p.add_argument("--host", metavar="NAME",
                   help="name of the destination host object (default: [monitoring] host_name, "
                   "else this machine's FQDN: the host replicate submits for)")  # fmt: skip
    p.add_argument("--mode", choices=MODES, default=PASSIVE,
                   help="passive: replicate's results, stale alarm when they stop (default); "
                   "active: the server runs the check plugins; both: active checks and "
                   "replicate's results for the same services")  # fmt: skip
    p.add_argument(
        "--address", metavar="ADDR", help="the host object's address (default: its name)"
    )
    p.add_argument("--no-host", action="store_true",
                   help="services only, for a host object defined elsewhere")  # fmt: skip
    default = "none" if icinga else NAGIOS_HOST_TEMPLATE
    p.add_argument("--host-template", metavar="NAME",
                   help=f"template the host object uses (default: {default})")  # fmt: skip
    p.add_argument("--cron-period", metavar="DURATION", type=_duration,
                   help="passive: how often cron runs replicate (templates: 15m)")  # fmt: skip
    p.add_argument("--slack", metavar="DURATION", type=_duration,
                   help="passive: how late a result may be before the stale alarm (templates: 10m)")  # fmt: skip
    p.add_argument("--sudo", action="store_true",
                   help="active: run the plugins through sudo -n (for a monitoring user that "
                   "cannot read ZFS; needs the sudoers rule in icinga-conf/README.md)")  # fmt: skip
    p.add_argument("--per-child", action="store_true",
                   help="active: also one lag and one runtime service per child of a "
                   "recursive line, as its last run listed them (replicate submits one "
                   "result per line, so passive services stay per line)")  # fmt: skip
    if icinga:
        p.add_argument("--endpoint", metavar="NAME",
                       help="active: the Endpoint (agent on the destination host) that runs the plugins")  # fmt: skip
