"""Recursive pairs: a line with ``recursive=yes`` and the tree below its source.

At run time the line expands into one pair per file system and volume of the source's
tree (one ``zfs list -r`` of the source), each into the same relative place under the
destination. Each is an ordinary pair: its own fingerprint (:func:`zettabee.pair.
child_fingerprint`), lock, status, log, snapshots and holds, so that one child's failure
or divergence stays its own. Left out: the children that match one of the line's
``exclude=`` patterns, those whose source says ``zettabee:exclude=on`` (an inherited
property: set on a file system, it leaves its whole subtree out), and everything below
a file system left out (a replica cannot exist without its parent).

What the last listing found is recorded next to the line's status (``<fp>.tree.json``),
so that the check plugins, which never open SSH, know the children too. A replica whose
source is gone (a child destroyed on the source) is kept: zettabee never destroys it by
itself; ``status`` and the checks report it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zettabee import records, zfs
from zettabee.errors import ZettabeeError
from zettabee.host import Host
from zettabee.pair import Endpoint, Pair
from zettabee.state import write_atomic

PROP_EXCLUDE = "zettabee:exclude"
TREE_COLUMNS = f"name,{PROP_EXCLUDE}"  # zettabee-source allows the listing with these
_TRUE = ("on", "yes", "true", "1")

log = logging.getLogger("zettabee.tree")

HostOf = Callable[[Endpoint, Pair], Host]


@dataclass
class Tree:
    """A line and what its source's tree makes of it."""

    line: Pair
    pairs: list[Pair]  # the line's own pair first, then its children, parents first
    excluded: list[str] = field(default_factory=list)  # relative names left out
    gone: list[Pair] = field(default_factory=list)  # replicas whose source is gone
    new: set[str] = field(default_factory=set)  # fingerprints the destination lacks
    error: ZettabeeError | None = None  # the listing failed: the pairs last recorded
    listed: float | None = None  # when the source was listed

    @property
    def children(self) -> list[Pair]:
        return [p for p in self.pairs if p.is_child]


def child(line: Pair, relative: str) -> Pair:
    """The pair of ``relative`` (``a/b``) below ``line``. A fixed mbuffer port is the
    line's own: its children each pick a free one, since several may run at once."""
    options = line.options
    if options.port is not None:
        options = records.replace(options, port=None)
    return Pair(
        Endpoint(line.source.host, f"{line.source.fs}/{relative}"),
        Endpoint(line.destination.host, f"{line.destination.fs}/{relative}"),
        options,
        path=line.path,
        line=line.line,
        relative=relative,
    )


def source_listing(fs: str) -> list[str]:
    """The source's tree with the exclusion property, inherited values included."""
    return ["zfs", "list", "-H", "-r", "-t", "filesystem,volume", "-o", TREE_COLUMNS, fs]


def destination_listing(fs: str) -> list[str]:
    return [
        "zfs", "list", "-H", "-r", "-t", "filesystem,volume",
        "-o", f"name,{zfs.PROP_FINGERPRINT}", fs,
    ]  # fmt: skip


def parse_listing(text: str, root: str) -> dict[str, str]:
    """``relative name -> second column`` of a ``zfs list -H -r ROOT`` (``""``: root)."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition("\t")
        if name == root:
            rows[""] = value
        elif name.startswith(f"{root}/"):
            rows[name[len(root) + 1 :]] = value
    return rows


def is_excluded(relative: str, patterns: Sequence[str], prop: str) -> bool:
    """Does the line leave ``relative`` out by itself (its parents aside)?"""
    if prop.lower() in _TRUE:
        return True
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns)


def plan(
    line: Pair,
    source_rows: dict[str, str],
    dest_rows: dict[str, str],
    taken: frozenset[str] = frozenset(),
) -> Tree:
    """The line's tree from the two listings (``relative name -> property``).

    ``taken``: destinations other lines of the pair file replicate into; a child there
    is theirs, not this line's."""
    pairs = [line]
    excluded: list[str] = []
    out: set[str] = set()  # left out, with everything below
    for relative in sorted(r for r in source_rows if r):
        parent = relative.rpartition("/")[0]
        below_out = parent in out
        pair = child(line, relative)
        if below_out or is_excluded(relative, line.options.exclude, source_rows[relative]):
            out.add(relative)
            excluded.append(relative)
            continue
        if pair.destination.fs in taken:
            log.info("%s: %s has a pair line of its own", line.name, pair.destination)
            out.add(relative)
            continue
        pairs.append(pair)
    new = {p.fingerprint for p in pairs if p.relative not in dest_rows}
    gone = []
    for relative, owner in sorted(dest_rows.items()):
        if relative and relative not in source_rows:
            pair = child(line, relative)
            if owner == pair.fingerprint:  # a replica of this line's, not any file system
                gone.append(pair)
    return Tree(line, pairs, excluded, gone, new)


def record_path(state_dir: str | Path, line: Pair) -> Path:
    return Path(state_dir) / f"{line.fingerprint}.tree.json"


def save(state_dir: str | Path, tree: Tree) -> None:
    data = {
        "listed": tree.listed,
        "children": [p.relative for p in tree.children],
        "excluded": tree.excluded,
        "gone": [p.relative for p in tree.gone],
    }
    path = record_path(state_dir, tree.line)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    write_atomic(path, json.dumps(data, indent=1) + "\n", durable=False)


def recorded(state_dir: str | Path, line: Pair) -> Tree:
    """The tree as the last run listed it; the line alone before any run has."""
    try:
        data = json.loads(record_path(state_dir, line).read_text())
    except (OSError, ValueError):
        return Tree(line, [line])
    if not isinstance(data, dict):
        return Tree(line, [line])

    def names(key: str) -> list[str]:
        value = data.get(key)
        return [n for n in value if isinstance(n, str) and n] if isinstance(value, list) else []

    listed = data.get("listed")
    return Tree(
        line,
        [line, *(child(line, r) for r in names("children"))],
        names("excluded"),
        [child(line, r) for r in names("gone")],
        listed=float(listed) if isinstance(listed, int | float) else None,
    )


def list_tree(line: Pair, host_of: HostOf, taken: frozenset[str] = frozenset()) -> Tree:
    """List the line's source and destination trees and plan the line's pairs."""
    src = host_of(line.source, line)
    started = time.time()
    result = src.run(source_listing(line.source.fs))
    source_rows = parse_listing(result.stdout, line.source.fs)
    dst = host_of(line.destination, line)
    listing = dst.run(destination_listing(line.destination.fs), check=False)
    if listing.returncode != 0 and not zfs.missing_dataset(listing.stderr):
        listing = dst.run(destination_listing(line.destination.fs))  # raises, saying why
    dest_rows = parse_listing(listing.stdout, line.destination.fs) if listing.ok else {}
    tree = plan(line, source_rows, dest_rows, taken)
    tree.listed = started
    return tree


def expand(
    lines: Sequence[Pair], host_of: HostOf, state_dir: str | Path, all_lines: Sequence[Pair] = ()
) -> list[Tree]:
    """Each line's tree: listed now for a recursive line (and recorded), the line alone
    for the others. A listing that fails leaves the tree last recorded, with the error."""
    taken = frozenset(p.destination.fs for p in (all_lines or lines))
    trees = []
    for line in lines:
        if not line.options.recursive or line.is_child:
            trees.append(Tree(line, [line]))
            continue
        try:
            tree = list_tree(line, host_of, taken - {line.destination.fs})
        except ZettabeeError as exc:
            tree = recorded(state_dir, line)
            tree.error = exc
            log.error("%s: cannot list the tree below %s: %s", line.name, line.source, exc)
            trees.append(tree)
            continue
        save(state_dir, tree)
        trees.append(tree)
    return trees


def pairs_of(trees: Sequence[Tree]) -> list[Pair]:
    return [pair for tree in trees for pair in tree.pairs]


def untracked_children(pair: Pair, src: Host) -> list[str]:
    """The descendants of a pair's source that a line without ``recursive=yes`` leaves
    out (their relative names); empty for a recursive line or a child."""
    if pair.options.recursive or pair.is_child:
        return []
    result = src.run(source_listing(pair.source.fs), check=False)
    if not result.ok:
        return []
    return sorted(r for r in parse_listing(result.stdout, pair.source.fs) if r)


def untracked_note(pair: Pair, names: Sequence[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"{pair.name}: {pair.source} has {len(names)} file system(s) below it ({shown}) that "
        "this pair does not replicate; add recursive=yes to its line to replicate each as "
        "a pair of its own (exclude=PATTERN|PATTERN leaves some out)"
    )


def find_in_trees(lines: Sequence[Pair], state_dir: str | Path, arg: str) -> Pair | None:
    """A child of a recursive line named by ``arg`` (``host:pool/fs``, its fingerprint or
    ``pool/fs``), from the trees last recorded; None when none is."""
    for line in lines:
        if not line.options.recursive:
            continue
        tree = recorded(state_dir, line)
        for pair in [*tree.children, *tree.gone]:
            if arg.lower() == pair.fingerprint or arg in (
                str(pair.destination),
                pair.destination.fs,
            ):
                return pair
        for prefix in (f"{line.destination}/", f"{line.destination.fs}/"):
            if arg.startswith(prefix) and zfs_name_ok(arg[len(prefix) :]):
                return child(line, arg[len(prefix) :])  # not listed yet: named all the same
    return None


def zfs_name_ok(relative: str) -> bool:
    return all(part and part not in (".", "..") for part in relative.split("/"))


def gone_note(pair: Pair) -> str:
    return (
        f"{pair.name}: its source {pair.source} is gone (destroyed or renamed on the "
        "source); the replica is kept and no longer updated: `zfs destroy -r "
        f"{pair.destination.fs}` on {pair.destination.host} once it is not needed, or "
        "recreate the source file system and `zettabee initialize --force` the child"
    )


def tree_note(tree: Tree, now: float | None = None) -> str:
    """What ``status`` says under a recursive line."""
    count = len(tree.children)
    if tree.listed is None:
        return (
            f"{tree.line.name}: recursive: the source's tree is listed by the next update, "
            "which initializes each child the destination lacks"
        )
    from zettabee.units import format_duration

    ago = format_duration(int((time.time() if now is None else now) - tree.listed))
    parts = [f"{count} child(ren) as listed {ago} ago"]
    if tree.excluded:
        parts.append(f"{len(tree.excluded)} excluded ({', '.join(tree.excluded[:5])})")
    return (
        f"{tree.line.name}: recursive: {'; '.join(parts)}; a child created on the source "
        "since is initialized by the next update"
    )
