"""``zettabee-source``: the one command a restricted key may run on a source host.

A pull needs little from its source: learn what its ZFS can do, read the file system's
snapshots and bookmarks, take a zettabee snapshot and hold it, estimate and send it (down
the SSH channel, or into an mbuffer that connects back to the destination), go on with an
interrupted send from its resume token, bookmark the new base, and release and destroy
what is no longer needed. Made the forced command of zettabee's key in the source's
``authorized_keys``, this program lets the key do exactly that, for the file systems
named on its own command line, and nothing else:

    restrict,command="/usr/bin/zettabee-source tank/home tank/pg" ssh-ed25519 AAAA... zettabee@backup1

With ``--pair FP.RID`` (once per pair the key serves: its fingerprint and its replica
id), the snapshots, bookmarks and holds it may make and remove are those of these pairs'
replicas alone, so that one backup server's key cannot break another's chain on the same
file system, not even under the same pair line (one fingerprint, two replica ids); with
``--pair FP``, those of the pair whichever replica; without, any zettabee pair's.
``--tree FS`` (the source of a recursive line) serves FS and every file system below it;
a child's pair is the one whose fingerprint derives from a ``--pair`` and its name below
FS (:func:`zettabee.pair.child_fingerprint`).

sshd hands over what the client asked for in ``SSH_ORIGINAL_COMMAND``. It never reaches a
shell: it is split into words, must be written exactly as zettabee writes it (one
``shlex.join``), and each word is compared with the command lines zettabee builds
(:mod:`zettabee.zfs`, :mod:`zettabee.capabilities`, :mod:`zettabee.relay`). The one
shell script that runs is the capability probe, compared whole with zettabee's own. What
passes runs directly; everything else is refused with exit status 126, a message on
stderr that the destination shows its operator, and a line in the source's auth log:
first anything longer than :data:`MAX_REQUEST`, and whatever cannot be read. Requests
are read in one pass, never by a regular expression that could backtrack.

The commands, for the served file systems FS of pools POOL (``OWN`` is a zettabee
snapshot name, ``zettabee.<fingerprint>.<replica id>.<UTC time>``, or without the
replica id as named before it):

- ``sh -c PROBE zettabee-probe POOL``, ``zpool get all POOL``: the capability probe;
- ``zfs list -H -o name POOL|FS``, ``zfs get -Hp [-d 1] [-t filesystem,volume,snapshot,
  bookmark] -o name,property,value PROPS -- FS...``, ``zfs list -H -r -t filesystem,volume
  -o name,zettabee:exclude FS``: listings (the last, a recursive line's tree);
- ``zfs snapshot FS@OWN``, ``zfs destroy FS@OWN``, ``zfs destroy FS#OWN``;
- ``zfs hold TAG FS@OWN`` (``TAG`` the one the snapshot's name gives,
  ``zettabee.<fp>.<replica id>``, or ``zettabee.<fp>`` before the replica id), ``zfs
  release TAG FS@SNAP``, ``zfs bookmark FS@OWN FS#OWN``;
- ``zfs send [-nvP] [-w] [-c] [-p] [-i|-I FS@SNAP | -i FS#MARK] FS@OWN``, and ``zfs send
  [-nvP] -t TOKEN`` where the token's snapshot is ``FS@OWN`` with the token's guid, and
  its incremental source a snapshot or bookmark of FS (see :func:`_check_token`);
- ``zfs send ... | mbuffer ... -O HOST:PORT`` to the client's address or an allowed host,
  also after the ``zfs snapshot FS@OWN`` (and its hold) of the snapshot it sends;
  ``mbuffer -V``; ``printenv SSH_CONNECTION``, where the client learns the address its
  connection comes from, the one its mbuffer is to connect back to;
- ``cat >/dev/null``, the session of the run's OpenSSH master connection: it is not run,
  zettabee-source itself reads its input until zettabee closes it;
- the routine update in one round trip (:mod:`zettabee.fastpath`): a shell script made of
  the commands above (``zfs snapshot FS@OWN``, its hold, the send of ``FS@OWN``, a guid
  check of the base, once the destination says it received the stream the hold of the
  new snapshot and the release and destroy of the old base, the listing of FS), compared
  whole with the script zettabee builds from those commands.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import IO

from zettabee import __version__
from zettabee.host import LIFELINE
from zettabee.names import validate_dataset, validate_host
from zettabee.pipeline import STAGE_MARK, pipeline_script
from zettabee.sourcerules import (
    PAIR_WORD,
    Policy,
    Refused,
    check_command,
    check_mbuffer,
    check_send,
    check_snapshot_and_send,
    check_update_script,
    read_guids,
    split_words,
)

__all__ = [
    "MAX_REQUEST",
    "REFUSED",
    "Policy",
    "Refused",
    "main",
    "parse_request",
    "read_guids",
    "run_pipeline",
]

REFUSED = 126
COMMAND_ENV = "SSH_ORIGINAL_COMMAND"
# The longest request a pull sends is the one-round-trip update script: about 1,500
# characters for tank/home with a base check, a hold, a size estimate and the old base
# let go (under the replica id's names); 3,099 with every name
# at ZFS's limit of 255 characters and every option on (tests/unit/test_source.py builds
# it). Anything longer is refused before it is read at all.
MAX_REQUEST = 16 * 1024


@functools.cache
def _pipeline_text(count: int, first: int = 0) -> list[str]:
    """What :func:`pipeline_script` writes around ``count`` stages (and ``first``
    commands before them): the text before the first, between each two, after the last."""
    holes = [f"ZETTABEESTAGE{i}" for i in range(first + count)]
    stages = [[hole] for hole in holes]
    rest = pipeline_script(stages[first:], first=stages[:first])
    pieces = []
    for hole in holes:
        before, _, rest = rest.partition(hole)
        pieces.append(before)
    return [*pieces, rest]


def _pipeline_stages(command: str, count: int, first: int = 0) -> list[str] | None:
    """The text of each stage if ``command`` has the shape of :func:`pipeline_script`'s
    script, else None. One pass: a stage ends where the text after it first appears.
    The words zettabee writes in a stage never hold that text (it is in no name), and
    the caller builds the script again from the stages' words and compares, so a stage
    cut short by such text in a quoted word is a refusal, never a wrong reading."""
    head, *between, tail = _pipeline_text(count, first)
    if len(command) < len(head) + len(tail):
        return None
    if not command.startswith(head) or not command.endswith(tail):
        return None
    body, at, stages = command[len(head) : len(command) - len(tail)], 0, []
    for text in between:
        end = body.find(text, at)
        if end < 0:
            return None
        stages.append(body[at:end])
        at = end + len(text)
    return [*stages, body[at:]]


def parse_request(command: str, policy: Policy) -> list[list[str]]:
    """The stages to run for ``command``: one command, or ``zfs send | mbuffer -O``.

    The string must be exactly what zettabee sends (each stage one ``shlex.join``), so
    that no quoting trick can make these words differ from what the client meant.
    """
    if len(command) > MAX_REQUEST:
        raise Refused(f"{len(command)} characters, over the {MAX_REQUEST} of any request")
    if not command.strip():
        raise Refused("no command given: this key only serves zettabee pulls")
    if command.startswith("step() {"):
        check_update_script(command, policy)
        return [["sh", "-c", command]]
    texts = _pipeline_stages(command, 2)
    if texts is not None:
        stages = [split_words(text) for text in texts]
        if pipeline_script(stages) != command:
            raise Refused("the pipeline is not written as zettabee writes it")
        if stages[0][:2] != ["zfs", "send"]:
            raise Refused("the first stage is not zfs send")
        check_send(stages[0], policy)
        check_mbuffer(stages[1], policy)
        return stages
    for first in (1, 2):
        texts = _pipeline_stages(command, 2, first)
        if texts is not None:
            check_snapshot_and_send([split_words(text) for text in texts], first, command, policy)
            return [["sh", "-c", command]]
    words = split_words(command)
    if not words or shlex.join(words) != command:
        raise Refused("not written as zettabee writes its commands")
    check_command(words, policy)
    return [words]


# -- running it ----------------------------------------------------------------------


def run_pipeline(stages: list[list[str]]) -> int:
    """``zfs send | mbuffer`` without a shell, reporting each stage as
    :func:`pipeline_script` does, so the destination reads it the same way."""
    errs = [tempfile.TemporaryFile() for _ in stages]
    procs: list[subprocess.Popen[bytes]] = []
    upstream = None
    for i, argv in enumerate(stages):
        last = i == len(stages) - 1
        try:
            proc = subprocess.Popen(
                argv, stdin=upstream, stdout=None if last else subprocess.PIPE, stderr=errs[i]
            )
        except OSError as exc:
            errs[i].write(f"{argv[0]}: {exc.strerror}\n".encode())
            for earlier in procs:
                earlier.kill()
            codes = [p.wait() for p in procs] + [127] * (len(stages) - i)
            return _report(codes, errs)
        if upstream is not None:
            upstream.close()
        upstream = proc.stdout
        procs.append(proc)
    return _report([p.wait() for p in procs], errs)


def _report(codes: list[int], errs: Sequence[IO[bytes]]) -> int:
    out = sys.stderr.buffer
    status = 0
    for i, (code, err) in enumerate(zip(codes, errs, strict=True)):
        code = 128 - code if code < 0 else code  # killed by a signal, as a shell says
        err.seek(0)
        out.write(f"\n{STAGE_MARK} {i} {code}\n".encode() + err.read())
        if code:
            status = code
    out.flush()
    return status


def _lifeline() -> int:
    """The session of the OpenSSH master connection that a run keeps to this host: it
    reads its input until zettabee closes it (however zettabee ends), and runs nothing.
    Refused, it ended at once, and the master with it: every command of the run took a
    connection of its own, and each run left a refusal in the auth log."""
    while sys.stdin.buffer.read(1 << 16):
        pass
    return 0


def _refuse(reason: str, command: str) -> int:
    """Exit status 126, and why: on stderr for the destination's operator, and in the
    source's auth log. Both on one line and shortened, whatever the request (the
    reason quotes words of it too)."""
    printable = "".join(c if c.isprintable() else repr(c)[1:-1] for c in _shorten(reason))
    message = f"{printable}: {_shorten(command)!r}"
    print(f"zettabee-source: refused: {message}", file=sys.stderr)
    _audit(message)
    return REFUSED


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _audit(message: str) -> None:
    import syslog

    client = os.environ.get("SSH_CONNECTION", "").split(" ", 1)[0] or "unknown"
    syslog.openlog("zettabee-source", syslog.LOG_PID, syslog.LOG_AUTH)
    syslog.syslog(syslog.LOG_WARNING, f"refused from {client}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zettabee-source",
        description="Forced command for zettabee's key on a source host: runs the command "
        f"in ${COMMAND_ENV} only if it is one a zettabee pull of the named file systems "
        "runs (the capability probe, zfs get/list, zfs snapshot/hold/release/bookmark/"
        "send/destroy of zettabee snapshots, send -t of their resume tokens, the sending "
        "mbuffer), without a shell; refuses everything else with exit status 126.",
        epilog='authorized_keys: restrict,command="/usr/bin/zettabee-source tank/home '
        'tank/pg" ssh-ed25519 AAAA... zettabee@backup1',
    )
    parser.add_argument("--version", action="version", version=f"zettabee-source {__version__}")
    parser.add_argument("datasets", nargs="*", metavar="FS", help="file systems this key serves")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="FS",
        help="the source of a recursive pair line: FS and every file system below it are "
        "served (their pairs' fingerprints come from --pair's and their names below FS)",
    )
    parser.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="FP[.RID]",
        help="a pair this key serves, once per pair: its fingerprint and replica id, as "
        "`zettabee fingerprint DEST` prints them on the destination (FP alone: any replica "
        "of the pair); the key may then make, hold, release and destroy only those pairs' "
        "snapshots, bookmarks and holds; without it, any zettabee pair's",
    )
    parser.add_argument(
        "--mbuffer-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host the sending mbuffer may connect to (the pair's mbufferhost); the "
        "address the SSH connection comes from is always allowed",
    )
    return parser


def policy_from(args: argparse.Namespace, environ: dict[str, str]) -> Policy:
    problems = [m for m in map(validate_dataset, [*args.datasets, *args.tree]) if m]
    if not args.datasets and not args.tree:
        problems.append("name the file systems this key serves (FS... or --tree FS)")
    problems += [m for m in map(validate_host, args.mbuffer_host) if m]
    problems += [f"--pair {fp!r}: not a pair's fingerprint (32 hex digits), with or "
                 "without its replica id (FP.RID, 8 hex digits more)"
                 for fp in args.pair if not PAIR_WORD.fullmatch(fp)]  # fmt: skip
    if problems:
        raise SystemExit(f"zettabee-source: {'; '.join(problems)}")
    hosts = set(args.mbuffer_host)
    client = environ.get("SSH_CONNECTION", "").split(" ", 1)[0]
    if client:
        hosts.add(client)
    return Policy(
        frozenset(args.datasets),
        frozenset(hosts),
        pairs=frozenset(args.pair),
        trees=frozenset(args.tree),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    environ = dict(os.environ)
    policy = policy_from(args, environ)
    command = environ.get(COMMAND_ENV, "")
    if command == LIFELINE:
        return _lifeline()
    try:
        stages = parse_request(command, policy)
    except Refused as exc:
        return _refuse(str(exc), command)
    except Exception as exc:  # noqa: BLE001 - a check that fails refuses, it never lets through
        return _refuse(f"the request could not be checked ({type(exc).__name__}: {exc})", command)
    if len(stages) > 1:
        return run_pipeline(stages)
    sys.stdout.flush()
    try:
        os.execvp(stages[0][0], stages[0])
    except OSError as exc:
        print(f"zettabee-source: {stages[0][0]}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
