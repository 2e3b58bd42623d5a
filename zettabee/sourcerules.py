"""What ``zettabee-source`` lets a restricted key run: each command a pull makes, checked
word by word against the file systems (and, with ``--pair``, the pairs) the key serves
(:class:`Policy`), and the resume tokens it may go on from; the request itself is read
and run by :mod:`zettabee.source`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from zettabee import __version__, fastpath, zfs
from zettabee.capabilities import PROBE_SCRIPT
from zettabee.pair import child_fingerprint, parse_snapshot_name, tag_of
from zettabee.pipeline import pipeline_script

# What a refused probe tells the destination: both hosts need the same zettabee version.
VERSION_ADVICE = "run `zettabee enroll HOST` on the destination to install its version here"
# The columns of a recursive line's tree listing (zettabee.tree.source_listing).
TREE_COLUMNS = "name,zettabee:exclude"

# A snapshot name a sent increment may start from: the common snapshot can be one the
# operator took by hand, so any plain ZFS snapshot name, but nothing a shell or zfs
# would read as more than a name.
_SNAPSHOT_WORD = re.compile(r"[A-Za-z0-9_.:-]+")
_PROPERTIES = re.compile(r"[a-z0-9_.:]+(?:,[a-z0-9_.:]+)*")
_SIZE = re.compile(r"[0-9]+[kMG]?")
_SECONDS = re.compile(r"[0-9]{1,9}")
_PORT = re.compile(r"[0-9]{1,5}")
# zettabee.<fp>.<replica id>, and zettabee.<fp> from before the replica id (zettabee.pair).
_HOLD_TAG = re.compile(r"zettabee\.[0-9a-f]{32}(?:\.[0-9a-f]{8})?")
FINGERPRINT_WORD = re.compile(r"[0-9a-f]{32}")
# What --pair takes: a pair's fingerprint, or a pair's fingerprint and a replica id.
PAIR_WORD = re.compile(r"[0-9a-f]{32}(?:\.[0-9a-f]{8})?")
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
    ``pairs``, the pairs the key serves (``FP``, or ``FP.RID``: the pair's replica
    ``RID`` alone): the only ones whose snapshots, bookmarks and holds it may make and
    remove (any, when empty: the key lines written before ``--pair``)."""

    datasets: frozenset[str]
    mbuffer_hosts: frozenset[str]
    guids: Callable[[str], dict[str, int]] = read_guids
    pairs: frozenset[str] = frozenset()
    trees: frozenset[str] = frozenset()  # recursive lines' sources: each and all below

    def serves(self, fp: str, fs: str = "", rid: str | None = None) -> bool:
        """May the key touch the snapshots of pair ``fp``'s replica ``rid`` (on ``fs``)?
        Below a tree's root, a child's fingerprint comes from its line's (a ``--pair``)
        and its relative name. A ``--pair FP.RID`` serves that replica alone: another
        server's under the same pair line has the same fingerprint, not the same replica
        id. Names from before the replica id (``rid`` None) are the pair's, whichever
        replica (the first update after the upgrade lets its old base go)."""
        if not self.pairs:
            return True
        for word in self.pairs:
            line, _, bound = word.partition(".")
            if bound and rid is not None and rid != bound:
                continue
            if fp == line or self._child_of(line, fp, fs):
                return True
        return False

    def _child_of(self, line: str, fp: str, fs: str) -> bool:
        for root in self.trees:
            if fs.startswith(f"{root}/") and child_fingerprint(line, fs[len(root) + 1 :]) == fp:
                return True
        return False

    def refuse(self, what: str, fp: str, fs: str, rid: str | None) -> None:
        """Refused unless the key serves pair ``fp``'s replica ``rid`` (:meth:`serves`):
        the refusal names the pair, and the replica when the pair is the key's."""
        if self.serves(fp, fs, rid):
            return
        if rid is not None and self.serves(fp, fs):
            raise Refused(
                f"{what} is of pair {fp}'s replica {rid}, not the one this key serves "
                "(--pair FP.RID)"
            )
        raise Refused(f"{what} is of pair {fp}, not one this key serves (--pair)")

    def has(self, fs: str) -> bool:
        return (
            fs in self.datasets
            or fs in self.trees
            or any(fs.startswith(f"{root}/") for root in self.trees)
        )

    @property
    def pools(self) -> frozenset[str]:
        return frozenset(fs.split("/", 1)[0] for fs in self.datasets | self.trees)


# -- what a pull sends ---------------------------------------------------------------


def _dataset(word: str, policy: Policy) -> str:
    if not policy.has(word):
        raise Refused(f"{word!r} is not a file system this key serves")
    return word


def _pool(word: str, policy: Policy) -> str:
    if word not in policy.pools:
        raise Refused(f"{word!r} is not a pool of a file system this key serves")
    return word


def _own_snapshot(word: str, policy: Policy, sep: str = "@") -> str:
    """``fs@zettabee.<fp>.<rid>.<stamp>`` (or, named before the replica id,
    ``fs@zettabee.<fp>.<stamp>``) of a served file system and pair: what zettabee
    creates, holds, sends as the newest snapshot, and destroys (``fs#...``: its
    bookmark)."""
    fs, at, name = word.partition(sep)
    _dataset(fs, policy)
    parsed = parse_snapshot_name(name) if at and _SNAPSHOT_WORD.fullmatch(name) else None
    if parsed is None:
        raise Refused(f"{word!r} is not a zettabee {'snapshot' if sep == '@' else 'bookmark'}")
    policy.refuse(repr(word), parsed.fp, fs, parsed.rid)
    return word


def _any_snapshot(word: str, policy: Policy, sep: str = "@") -> str:
    fs, at, name = word.partition(sep)
    _dataset(fs, policy)
    if not at or not _SNAPSHOT_WORD.fullmatch(name):
        raise Refused(f"{word!r} is not a {'snapshot' if sep == '@' else 'bookmark'} name")
    return word


def _check_get(words: list[str], policy: Policy) -> None:
    # zfs get -Hp [-d 1] [-t filesystem,volume,snapshot,bookmark] -o name,property,value[,source]
    #   PROPS -- FS...
    rest = words[3:]
    if rest[:2] == ["-d", "1"]:
        rest = rest[2:]
        if rest[:2] == ["-t", _LISTING_TYPES]:
            rest = rest[2:]
    columns = ("name,property,value", "name,property,value,source")
    if len(rest) < 5 or rest[0] != "-o" or rest[1] not in columns or rest[3] != "--":
        raise Refused("not the zfs get that zettabee runs")
    if not _PROPERTIES.fullmatch(rest[2]):
        raise Refused(f"{rest[2]!r} is not a list of properties")
    for target in rest[4:]:
        _dataset(target, policy)


def check_send(words: list[str], policy: Policy, dry_run: bool = False) -> None:
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
    """The pair's hold goes on the pair's own snapshot: the tag is the one the
    snapshot's name gives, its fingerprint and replica id."""
    _own_snapshot(target, policy)
    if tag != tag_of(target):
        raise Refused(f"{tag!r} is not the hold tag of {target!r}")


def _check_release(tag: str, target: str, policy: Policy) -> None:
    """A pair releases its tag on its own snapshots and on the base it sent from, which
    may be any snapshot; a release takes away no one's hold but zettabee's."""
    if not _HOLD_TAG.fullmatch(tag):
        raise Refused(f"{tag!r} is not a zettabee hold tag")
    _, fp, *rid = tag.split(".")
    policy.refuse(f"the hold {tag!r}", fp, target.partition("@")[0], rid[0] if rid else None)
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
        case ["sh", "-c", _, "zettabee-probe", *_]:
            raise Refused(
                f"the capability probe of another zettabee version (this is zettabee-source "
                f"{__version__}): {VERSION_ADVICE}"
            )
        case ["zpool", "get", "all", pool]:
            _pool(pool, policy)
        case ["zfs", "get", "-Hp", *_]:
            _check_get(words, policy)
        case ["zfs", "list", "-H", "-o", "name", target]:
            if target not in policy.pools and not policy.has(target):
                raise Refused(f"{target!r} is not a pool or file system this key serves")
        case ["zfs", "list", "-H", "-r", "-t", "filesystem,volume", "-o", columns, target]:
            if columns != TREE_COLUMNS:
                raise Refused(f"{columns!r} is not the tree listing's columns")
            _dataset(target, policy)
        case ["zfs", "snapshot", target]:
            _own_snapshot(target, policy)
        case ["zfs", "send", *_]:
            check_send(words, policy, dry_run=True)
        case ["zfs", "destroy", target]:
            _own_snapshot(target, policy, "#" if "#" in target else "@")
        case ["zfs", "hold", tag, target]:
            _check_hold(tag, target, policy)
        case ["zfs", "release", tag, target]:
            _check_release(tag, target, policy)
        case ["zfs", "bookmark", snap, mark]:
            _check_bookmark(snap, mark, policy)
        case ["mbuffer", "-V"] | ["printenv", "SSH_CONNECTION"]:
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
    commands = [split_words(line[: -len("; s=$?")]) for line in lines if line.endswith("; s=$?")]
    after = [split_words(line[: -len("; r=$?")]) for line in lines if line.endswith("; r=$?")]
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
    estimate = _checked_estimate(lines, send)
    clock = "date +%s.%N" in lines[0]
    for holds in (False, True):
        for listing in (True, False):
            written = fastpath.script(
                fs, snap, send, clock, base, tag, holds, then, listing, estimate
            )
            if written == command:
                return
    raise Refused("the update script is not written as zettabee writes it")


def _checked_estimate(lines: list[str], send: list[str]) -> list[str] | None:
    """The size estimate the update script runs before its send, if it does: that very
    send as a dry run (``zfs send -nvP``, the same flags and snapshots), nothing else."""
    found = [
        split_words(line[: -len(fastpath.ESTIMATE_END)])
        for line in lines
        if line.endswith(fastpath.ESTIMATE_END)
    ]
    if not found:
        return None
    if len(found) > 1 or found[0] != [*send[:2], "-nvP", *send[2:]]:
        raise Refused("the update script estimates something else than its send")
    return found[0]


_GUID_CHECK = '[ "${g##*\tguid\t}" = '
_GUID = re.compile(r"[0-9]{1,20}")


def _checked_base(lines: list[str], fs: str, policy: Policy) -> zfs.Snapshot | None:
    """The base whose guid the update script checks before it snapshots, if it does: the
    snapshot its ``g=$(zfs get ...)`` line reads and the guid the next line compares.
    Read line by line, without a regular expression that could backtrack."""
    for line, after in zip(lines, lines[1:], strict=False):
        if line.startswith("g=$(") and line.endswith(" 2>/dev/null)"):
            words = split_words(line[len("g=$(") : -len(" 2>/dev/null)")])
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
    check_send(send, policy)
    if send[-1] != target:
        raise Refused(f"{what} sends {send[-1]!r}, not the snapshot it takes")
    if held:
        if held[0][:2] != ["zfs", "hold"] or len(held[0]) != 4 or held[0][3] != target:
            raise Refused(f"{what} holds something else than its snapshot")
        _check_hold(held[0][2], target, policy)
    return target


def split_words(text: str) -> list[str]:
    """The words of a command as a POSIX shell reads them; an unbalanced quote is a
    refusal like any other, not a crash."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise Refused(f"cannot split into words: {exc}") from None
