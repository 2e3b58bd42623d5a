"""``zettabee-source``: the one command a restricted key may run on a source host.

A pull needs little from its source: learn what its ZFS can do, read the file system's
snapshots and bookmarks, take a zettabee snapshot and hold it, estimate and send it (down
the SSH channel, or into an mbuffer that connects back to the destination), go on with an
interrupted send from its resume token, bookmark the new base, and release and destroy
what is no longer needed. Made the forced command of zettabee's key in the source's
``authorized_keys``, this program lets the key do exactly that, for the file systems
named on its own command line, and nothing else:

    restrict,command="/usr/bin/zettabee-source tank/home tank/pg" ssh-ed25519 AAAA... zettabee@backup1

With ``--pair FP`` (once per pair the key serves), the snapshots, bookmarks and holds it
may make and remove are those of these pairs alone, so that one backup server's key
cannot break another's chain on the same file system; without, any zettabee pair's.

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
snapshot name, ``zettabee.<fingerprint>.<UTC time>``):

- ``sh -c PROBE zettabee-probe POOL``, ``zpool get all POOL``: the capability probe;
- ``zfs list -H -o name POOL|FS``, ``zfs get -Hp [-d 1] [-t filesystem,volume,snapshot,
  bookmark] -o name,property,value PROPS -- FS...``: listings;
- ``zfs snapshot FS@OWN``, ``zfs destroy FS@OWN``, ``zfs destroy FS#OWN``;
- ``zfs hold zettabee.<fp> FS@OWN`` (the snapshot's own fingerprint), ``zfs release
  zettabee.<fp> FS@SNAP``, ``zfs bookmark FS@OWN FS#OWN``;
- ``zfs send [-nvP] [-w] [-c] [-p] [-i|-I FS@SNAP | -i FS#MARK] FS@OWN``, and ``zfs send
  [-nvP] -t TOKEN`` where the token's snapshot is ``FS@OWN`` with the token's guid, and
  its incremental source a snapshot or bookmark of FS (see :func:`_check_token`);
- ``zfs send ... | mbuffer ... -O HOST:PORT`` to the client's address or an allowed host,
  also after the ``zfs snapshot FS@OWN`` (and its hold) of the snapshot it sends;
  ``mbuffer -V``;
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
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from zettabee import fastpath, zfs
from zettabee.capabilities import PROBE_SCRIPT
from zettabee.host import LIFELINE
from zettabee.names import validate_dataset, validate_host
from zettabee.pair import hold_tag, parse_snapshot_name
from zettabee.relay import STAGE_MARK, pipeline_script

REFUSED = 126
COMMAND_ENV = "SSH_ORIGINAL_COMMAND"
# The longest request a pull sends is the one-round-trip update script: 1,353 characters
# for tank/home with a base check, a hold and the old base let go; 3,081 with every name
# at ZFS's limit of 255 characters and every option on (tests/unit/test_source.py builds
# it). Anything longer is refused before it is read at all.
MAX_REQUEST = 16 * 1024

# A snapshot name a sent increment may start from: the common snapshot can be one the
# operator took by hand, so any plain ZFS snapshot name, but nothing a shell or zfs
# would read as more than a name.
_SNAPSHOT_WORD = re.compile(r"[A-Za-z0-9_.:-]+")
_PROPERTIES = re.compile(r"[a-z0-9_.:]+(?:,[a-z0-9_.:]+)*")
_SIZE = re.compile(r"[0-9]+[kMG]?")
_SECONDS = re.compile(r"[0-9]{1,9}")
_PORT = re.compile(r"[0-9]{1,5}")
_HOLD_TAG = re.compile(r"zettabee\.[0-9a-f]{32}")
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")
# What the source's listing asks for where bookmarks exist (zfs.list_snapshots).
_LISTING_TYPES = "filesystem,volume,snapshot,bookmark"


class Refused(Exception):
    """The request is not one that a pull of the configured file systems makes."""


def read_guids(fs: str) -> dict[str, int]:
    """The guid of each snapshot and bookmark of ``fs``, read from this host's ZFS.
    Only resume tokens need it, and only OpenZFS has them (``zfs get -t``)."""
    argv = zfs.get([fs], ["guid"], depth=1, types=["snapshot", "bookmark"])
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Refused(f"cannot read the guids of {fs!r} to check the resume token: {exc}") from None
    if result.returncode != 0:
        said = result.stderr.strip()
        raise Refused(f"cannot read the guids of {fs!r} to check the resume token: {said}")
    guids = {}
    for name, props in zfs.parse_get(result.stdout).items():
        value = props.get("guid", "")
        if name.partition("@" if "@" in name else "#")[0] == fs and value.isdigit():
            guids[name] = int(value)
    return guids


@dataclass(frozen=True)
class Policy:
    """What this key may touch: its file systems, and where mbuffer may connect.
    ``guids`` reads the guids of a file system's snapshots and bookmarks (ZFS's, here).
    ``pairs``, the fingerprints of the pairs the key serves: the only ones whose
    snapshots, bookmarks and holds it may make and remove (any, when empty: the key
    lines written before ``--pair``)."""

    datasets: frozenset[str]
    mbuffer_hosts: frozenset[str]
    guids: Callable[[str], dict[str, int]] = read_guids
    pairs: frozenset[str] = frozenset()

    def serves(self, fp: str) -> bool:
        return not self.pairs or fp in self.pairs

    @property
    def pools(self) -> frozenset[str]:
        return frozenset(fs.split("/", 1)[0] for fs in self.datasets)


# -- what a pull sends ---------------------------------------------------------------


def _dataset(word: str, policy: Policy) -> str:
    if word not in policy.datasets:
        raise Refused(f"{word!r} is not a file system this key serves")
    return word


def _pool(word: str, policy: Policy) -> str:
    if word not in policy.pools:
        raise Refused(f"{word!r} is not a pool of a file system this key serves")
    return word


def _own_snapshot(word: str, policy: Policy, sep: str = "@") -> str:
    """``fs@zettabee.<fp>.<stamp>`` of a served file system: what zettabee creates,
    holds, sends as the newest snapshot, and destroys (``fs#...``: its bookmark)."""
    fs, at, name = word.partition(sep)
    _dataset(fs, policy)
    parsed = parse_snapshot_name(name) if at and _SNAPSHOT_WORD.fullmatch(name) else None
    if parsed is None:
        raise Refused(f"{word!r} is not a zettabee {'snapshot' if sep == '@' else 'bookmark'}")
    if not policy.serves(parsed[0]):
        raise Refused(f"{word!r} is of pair {parsed[0]}, not one this key serves (--pair)")
    return word


def _any_snapshot(word: str, policy: Policy, sep: str = "@") -> str:
    fs, at, name = word.partition(sep)
    _dataset(fs, policy)
    if not at or not _SNAPSHOT_WORD.fullmatch(name):
        raise Refused(f"{word!r} is not a {'snapshot' if sep == '@' else 'bookmark'} name")
    return word


def _check_get(words: list[str], policy: Policy) -> None:
    # zfs get -Hp [-d 1] [-t filesystem,volume,snapshot,bookmark] -o name,property,value
    #   PROPS -- FS...
    rest = words[3:]
    if rest[:2] == ["-d", "1"]:
        rest = rest[2:]
        if rest[:2] == ["-t", _LISTING_TYPES]:
            rest = rest[2:]
    if len(rest) < 5 or rest[:2] != ["-o", "name,property,value"] or rest[3] != "--":
        raise Refused("not the zfs get that zettabee runs")
    if not _PROPERTIES.fullmatch(rest[2]):
        raise Refused(f"{rest[2]!r} is not a list of properties")
    for target in rest[4:]:
        _dataset(target, policy)


def _check_send(words: list[str], policy: Policy, dry_run: bool = False) -> None:
    """``zfs send [-nvP] [-w] [-c] [-p] [-i|-I BASE] FS@OWN`` (flags in the builder's
    order; a bookmark base only with -i) or ``zfs send [-nvP] -t TOKEN``. The dry run
    (-nvP) only where ``dry_run`` allows it: it never feeds a pipeline."""
    rest = words[2:]
    if dry_run and rest[:1] == ["-nvP"]:
        rest = rest[1:]
    if len(rest) == 2 and rest[0] == "-t":
        _check_token(rest[1], policy)
        return
    for flag in ("-w", "-c", "-p"):
        if rest[:1] == [flag]:
            rest = rest[1:]
    if len(rest) == 3 and rest[0] in ("-i", "-I"):
        mark = rest[0] == "-i" and "#" in rest[1]
        base = _any_snapshot(rest[1], policy, "#" if mark else "@")
        target = _own_snapshot(rest[2], policy)
        if base.partition("#" if mark else "@")[0] != target.partition("@")[0]:
            raise Refused("an increment between two file systems")
    elif len(rest) == 1:
        _own_snapshot(rest[0], policy)
    else:
        raise Refused("not the zfs send that zettabee runs")


# What a resume token of zettabee's send carries besides the snapshots it names: where
# the stream stopped, and flags (embedok, compressok, rawok, largeblockok, ...).
_TOKEN_POSITIONS = ("object", "offset", "bytes")


def _check_token(token: str, policy: Policy) -> None:
    """A resume token goes on with the send of the snapshot it names: one of zettabee's,
    of a served file system, as for a send from the start.

    ``zfs send -t`` finds that snapshot by the token's ``toguid``, not by its name: when
    no snapshot of that name has that guid, it searches the file systems above for one
    that has (a snapshot renamed since). So the snapshot the token names must have the
    token's guid here and now, and its incremental source (``fromguid``) must be a
    snapshot or bookmark of the same file system; a token that names anything else
    (the snapshots of a redacted send) is none of zettabee's. A snapshot gone or changed
    is said as zfs says it ("cannot resume send"), so that the destination aborts the
    stale receive as it would on zfs's word."""
    try:
        fields = zfs.decode_resume_token(token)
    except ValueError as exc:
        raise Refused(f"not a resume token zfs wrote: {exc}") from None
    toname = fields.get("toname")
    if not isinstance(toname, str):
        raise Refused("the resume token names no snapshot")
    try:
        _own_snapshot(toname, policy)
    except Refused as exc:
        raise Refused(f"the resume token sends {toname!r}: {exc}") from None
    for key, value in fields.items():
        number = isinstance(value, int) and not isinstance(value, bool)
        if key in ("toguid", "fromguid", *_TOKEN_POSITIONS) and not number:
            raise Refused(f"the resume token's {key} is {value!r}, not a number")
        if key not in ("toname", "toguid", "fromguid", *_TOKEN_POSITIONS) and value is not True:
            raise Refused(f"the resume token carries {key!r}, which no send of zettabee's does")
    toguid, fromguid = fields.get("toguid"), fields.get("fromguid", 0)
    if not isinstance(toguid, int) or not toguid:
        raise Refused("the resume token names no snapshot guid")
    fs = toname.partition("@")[0]
    guids = policy.guids(fs)
    if guids.get(toname) != toguid:
        now = f"has guid {guids[toname]:#x}" if toname in guids else "does not exist"
        raise Refused(
            f"cannot resume send: the resume token is of {toname!r} with guid {toguid:#x}, "
            f"and {toname!r} {now}"
        )
    sources = {guid for name, guid in guids.items() if name != toname}
    if fromguid and fromguid not in sources:
        raise Refused(
            f"cannot resume send: the resume token's incremental source, guid {fromguid:#x}, "
            f"is no snapshot or bookmark of {fs!r}"
        )


def _check_hold(tag: str, target: str, policy: Policy) -> None:
    """The pair's hold goes on the pair's own snapshot: the tag carries its fingerprint."""
    _own_snapshot(target, policy)
    parsed = parse_snapshot_name(target)
    if parsed is None or tag != hold_tag(parsed[0]):
        raise Refused(f"{tag!r} is not the hold tag of {target!r}")


def _check_release(tag: str, target: str, policy: Policy) -> None:
    """A pair releases its tag on its own snapshots and on the base it sent from, which
    may be any snapshot; a release takes away no one's hold but zettabee's."""
    if not _HOLD_TAG.fullmatch(tag):
        raise Refused(f"{tag!r} is not a zettabee hold tag")
    if not policy.serves(tag.partition(".")[2]):
        raise Refused(
            f"{tag!r} is the hold of pair {tag.partition('.')[2]}, not one this key serves (--pair)"
        )
    _any_snapshot(target, policy)


def _check_bookmark(snap: str, mark: str, policy: Policy) -> None:
    """``zfs bookmark FS@OWN FS#OWN``: the new base, bookmarked under its own name."""
    _own_snapshot(snap, policy)
    if mark != snap.replace("@", "#", 1):
        raise Refused(f"{mark!r} is not the bookmark zettabee makes of {snap!r}")


def check_command(words: list[str], policy: Policy) -> None:
    """Raise :class:`Refused` unless ``words`` is a command a pull runs on its source."""
    match words:
        case ["sh", "-c", script, "zettabee-probe", *pools] if script == PROBE_SCRIPT and pools:
            for pool in pools:
                _pool(pool, policy)
        case ["zpool", "get", "all", pool]:
            _pool(pool, policy)
        case ["zfs", "get", "-Hp", *_]:
            _check_get(words, policy)
        case ["zfs", "list", "-H", "-o", "name", target]:
            if target not in policy.datasets | policy.pools:
                raise Refused(f"{target!r} is not a pool or file system this key serves")
        case ["zfs", "snapshot", target]:
            _own_snapshot(target, policy)
        case ["zfs", "send", *_]:
            _check_send(words, policy, dry_run=True)
        case ["zfs", "destroy", target]:
            _own_snapshot(target, policy, "#" if "#" in target else "@")
        case ["zfs", "hold", tag, target]:
            _check_hold(tag, target, policy)
        case ["zfs", "release", tag, target]:
            _check_release(tag, target, policy)
        case ["zfs", "bookmark", snap, mark]:
            _check_bookmark(snap, mark, policy)
        case ["mbuffer", "-V"]:
            pass
        case _:
            raise Refused("not a command of a zettabee pull")


def check_mbuffer(words: list[str], policy: Policy) -> None:
    """The sending mbuffer: options zettabee gives, connecting only where it may."""
    values = {"-s": _SIZE, "-m": _SIZE, "-W": _SECONDS, "-r": _SIZE, "-O": None}
    if words[:1] != ["mbuffer"]:
        raise Refused("the second stage is not mbuffer")
    seen: set[str] = set()
    rest = words[1:]
    while rest:
        option = rest.pop(0)
        if option == "-q" and option not in seen:
            seen.add(option)
            continue
        if option not in values or option in seen or not rest:
            raise Refused(f"mbuffer option {option!r} is not one zettabee gives")
        seen.add(option)
        value = rest.pop(0)
        pattern = values[option]
        if pattern is not None and not pattern.fullmatch(value):
            raise Refused(f"mbuffer {option} {value!r}")
        if option == "-O":
            host, _, port = value.rpartition(":")
            if host not in policy.mbuffer_hosts or not _PORT.fullmatch(port):
                raise Refused(f"mbuffer may not connect to {value!r}")
    if "-O" not in seen:
        raise Refused("mbuffer without -O")


def check_update_script(command: str, policy: Policy) -> None:
    """The one-round-trip update's script (:func:`fastpath.script`): its commands are
    taken out and checked one by one, and the script zettabee builds from them must be
    the command, character for character, before it may run in a shell."""
    lines = command.split("\n")
    commands = [_split(line[: -len("; s=$?")]) for line in lines if line.endswith("; s=$?")]
    after = [_split(line[: -len("; r=$?")]) for line in lines if line.endswith("; r=$?")]
    if len(commands) not in (2, 3):
        raise Refused("not the update script of a zettabee pull")
    snapshot, *held, send = commands
    if snapshot[:2] != ["zfs", "snapshot"] or len(snapshot) != 3 or send[:2] != ["zfs", "send"]:
        raise Refused("the update script does not snapshot and send")
    target = _check_taken(snapshot, held, send, policy, "the update script")
    fs, _, snap = target.partition("@")
    tag = held[0][2] if held else None
    base = _checked_base(lines, fs, policy)
    then = [(_check_after(words, fs, policy), words) for words in after]
    clock = "date +%s.%N" in lines[0]
    for holds in (False, True):
        for listing in (True, False):
            if fastpath.script(fs, snap, send, clock, base, tag, holds, then, listing) == command:
                return
    raise Refused("the update script is not written as zettabee writes it")


_GUID_CHECK = '[ "${g##*\tguid\t}" = '
_GUID = re.compile(r"[0-9]{1,20}")


def _checked_base(lines: list[str], fs: str, policy: Policy) -> zfs.Snapshot | None:
    """The base whose guid the update script checks before it snapshots, if it does: the
    snapshot its ``g=$(zfs get ...)`` line reads and the guid the next line compares.
    Read line by line, without a regular expression that could backtrack."""
    for line, after in zip(lines, lines[1:], strict=False):
        if line.startswith("g=$(") and line.endswith(" 2>/dev/null)"):
            words = _split(line[len("g=$(") : -len(" 2>/dev/null)")])
            guid = after[len(_GUID_CHECK) :].partition(" ")[0]
            if not words or not after.startswith(_GUID_CHECK) or not _GUID.fullmatch(guid):
                raise Refused("the update script checks its base otherwise than zettabee")
            name = _any_snapshot(f"{fs}@{words[-1].rpartition('@')[2]}", policy)
            return zfs.Snapshot(fs, name.partition("@")[2], int(guid), 0)
    return None


def _check_after(words: list[str], fs: str, policy: Policy) -> str:
    """A command the update script runs once the stream was received: the hold of a
    zettabee snapshot, the release of a zettabee hold, or the destroy of a zettabee
    snapshot, on the script's file system.
    Its step's name, as :func:`fastpath.script` reports it."""
    match words:
        case ["zfs", "hold", tag, target]:
            _check_hold(tag, target, policy)
        case ["zfs", "release", tag, target]:
            _check_release(tag, target, policy)
        case ["zfs", "destroy", target]:
            _own_snapshot(target, policy)
        case _:
            raise Refused("the update script runs something else than a hold, release or destroy")
    if target.partition("@")[0] != fs:
        raise Refused(f"the update script of {fs!r} touches {target!r}")
    return words[1]


def check_snapshot_and_send(
    words: list[list[str]], first: int, command: str, policy: Policy
) -> None:
    """``zfs snapshot FS@OWN [; zfs hold TAG FS@OWN]; zfs send ... FS@OWN | mbuffer -O``:
    the full send of ``initialize`` over mbuffer, which takes its snapshot in the same
    command. Checked stage by stage, then rebuilt and compared whole."""
    before, (send, out) = words[:first], words[first:]
    if pipeline_script([send, out], first=before) != command:
        raise Refused("the pipeline is not written as zettabee writes it")
    snapshot, *held = before
    if snapshot[:2] != ["zfs", "snapshot"] or len(snapshot) != 3:
        raise Refused("the command before the send is not zfs snapshot")
    if send[:2] != ["zfs", "send"]:
        raise Refused("the first stage is not zfs send")
    _check_taken(snapshot, held, send, policy, "the pipeline")
    check_mbuffer(out, policy)


def _check_taken(
    snapshot: list[str], held: list[list[str]], send: list[str], policy: Policy, what: str
) -> str:
    """``zfs snapshot FS@OWN``, then maybe its hold, then a send of that very snapshot:
    how the update script and an initialize's mbuffer pipeline take what they send.
    The snapshot, ``FS@OWN``."""
    target = _own_snapshot(snapshot[2], policy)
    _check_send(send, policy)
    if send[-1] != target:
        raise Refused(f"{what} sends {send[-1]!r}, not the snapshot it takes")
    if held:
        if held[0][:2] != ["zfs", "hold"] or len(held[0]) != 4 or held[0][3] != target:
            raise Refused(f"{what} holds something else than its snapshot")
        _check_hold(held[0][2], target, policy)
    return target


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
        stages = [_split(text) for text in texts]
        if pipeline_script(stages) != command:
            raise Refused("the pipeline is not written as zettabee writes it")
        if stages[0][:2] != ["zfs", "send"]:
            raise Refused("the first stage is not zfs send")
        _check_send(stages[0], policy)
        check_mbuffer(stages[1], policy)
        return stages
    for first in (1, 2):
        texts = _pipeline_stages(command, 2, first)
        if texts is not None:
            check_snapshot_and_send([_split(text) for text in texts], first, command, policy)
            return [["sh", "-c", command]]
    words = _split(command)
    if not words or shlex.join(words) != command:
        raise Refused("not written as zettabee writes its commands")
    check_command(words, policy)
    return [words]


def _split(text: str) -> list[str]:
    """The words of a command as a POSIX shell reads them; an unbalanced quote is a
    refusal like any other, not a crash."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise Refused(f"cannot split into words: {exc}") from None


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
    parser.add_argument("datasets", nargs="+", metavar="FS", help="file systems this key serves")
    parser.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="FP",
        help="the fingerprint of a pair this key serves (zettabee fingerprint DEST on the "
        "destination), once per pair: the key may then make, hold, release and destroy only "
        "those pairs' snapshots, bookmarks and holds; without it, any zettabee pair's",
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
    problems = [m for m in map(validate_dataset, args.datasets) if m]
    problems += [m for m in map(validate_host, args.mbuffer_host) if m]
    problems += [f"--pair {fp!r}: not a pair's fingerprint (32 hex digits)"
                 for fp in args.pair if not _FINGERPRINT.fullmatch(fp)]  # fmt: skip
    if problems:
        raise SystemExit(f"zettabee-source: {'; '.join(problems)}")
    hosts = set(args.mbuffer_host)
    client = environ.get("SSH_CONNECTION", "").split(" ", 1)[0]
    if client:
        hosts.add(client)
    return Policy(frozenset(args.datasets), frozenset(hosts), pairs=frozenset(args.pair))


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
