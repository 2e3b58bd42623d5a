"""What each host's ZFS can do, probed once per host and run, never assumed.

One command per host answers everything: the ZFS version (``zfs version``, absent on
zfs-fuse and other old ports), the usage text of ``zfs`` itself (which lists the
subcommands and option letters this very binary accepts) and the properties of the pools
the pairs use (the feature flags: a pool created for compatibility may lack bookmarks or
encryption even under OpenZFS 2.x). The usage text is the most honest witness: zfs-fuse
has ``hold`` and ``release`` but no ``bookmark`` and no ``receive -s``, and it says so.

A capability needs both sides of the truth: the command and option in the binary, and
the pool feature that backs it.

The pool's guid comes with its properties: a destination pool's names the replica whose
snapshots and holds a pair's are (:func:`zettabee.pair.replica_id`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zettabee import __version__
from zettabee.host import Host
from zettabee.state import write_atomic

# Holds arrived with pool version 18; pools with feature flags report version "-".
HOLDS_POOL_VERSION = 18
FEATURE_POOL_VERSION = 5000
_MARK = "@@zettabee-probe"

log = logging.getLogger("zettabee.capabilities")

# The probe is one constant script: pool names travel as its arguments, never inside it.
PROBE_SCRIPT = (
    f"echo {_MARK} version; zfs version 2>&1; "
    f"echo {_MARK} fuse; command -v zfs-fuse; "
    f"echo {_MARK} usage; zfs -? 2>&1; "
    f'echo {_MARK} pools; for p; do zpool get all "$p" 2>&1; done'
)

# What a stream with the source's properties must not set on a replica (PairFeatures).
KEPT_LOCAL = ("mountpoint", "sharenfs", "sharesmb")

# (name shown to people, attribute)
FEATURES = (
    ("holds", "holds"),
    ("bookmarks", "bookmarks"),
    ("resumable receive", "resumable"),
    ("size estimates", "estimates"),
    ("raw send", "raw"),
    ("compressed send", "compressed"),
)


def probe_argv(pools: Sequence[str]) -> list[str]:
    return ["sh", "-c", PROBE_SCRIPT, "zettabee-probe", *pools]


def version_skew(returncode: int, stderr: str) -> bool:
    """Whether the source's zettabee-source refused the probe as a script it does not
    know (another zettabee version: the probe is compared whole), not for a pool its key
    does not serve."""
    return (
        returncode == 126
        and "zettabee-source: refused:" in stderr
        and "this key serves" not in stderr
    )


def pool_argv(pool: str) -> list[str]:
    """The pool part of the probe alone, for a second pool on a host already probed."""
    return ["zpool", "get", "all", pool]


@dataclass(frozen=True)
class ZfsTool:
    """What the ``zfs`` binary of a host offers, from its version and usage text."""

    version: str | None = None  # "2.1.11-1" where `zfs version` exists
    fuse: bool = False
    commands: dict[str, frozenset[str]] = field(default_factory=dict, hash=False)

    def has(self, command: str, *letters: str) -> bool:
        options = self.commands.get(command)
        return options is not None and all(letter in options for letter in letters)

    @property
    def name(self) -> str:
        if self.version:
            return f"OpenZFS {self.version}"
        if self.fuse:
            return "zfs-fuse"
        return "ZFS without a version command"


@dataclass(frozen=True)
class PoolFeatures:
    """A pool's version and feature flags (``enabled`` or ``active`` count as present)."""

    name: str
    version: int | None = None
    features: frozenset[str] = frozenset()
    error: str = ""
    guid: str = ""  # as zpool get prints it, in decimal

    def has(self, feature: str) -> bool:
        return feature in self.features


@dataclass(frozen=True)
class Capabilities:
    """What one side of a pair (a host and its pool) can do."""

    host: str
    pool: str
    zfs: str
    holds: bool = False
    bookmarks: bool = False
    resumable: bool = False
    estimates: bool = False
    raw: bool = False
    compressed: bool = False
    # Properties in a stream (send -p) and left out of a receive (receive -x): what a pair
    # with props=yes needs (not listed among the extras: plain send and receive lack
    # nothing without them).
    send_props: bool = False
    receive_exclude: bool = False
    # zfs receive -u: what is received is not mounted (OpenZFS; zfs-fuse's has no -u)
    receive_unmounted: bool = False
    pool_version: int | None = None
    note: str = ""
    pool_guid: str = ""

    def present(self) -> list[str]:
        return [label for label, attr in FEATURES if getattr(self, attr)]

    def absent(self) -> list[str]:
        return [label for label, attr in FEATURES if not getattr(self, attr)]

    def describe(self) -> str:
        """``OpenZFS 2.1.11 (pool tank): holds, bookmarks, ...; lacks raw send``."""
        pool = f"pool {self.pool}"
        if self.pool_version is not None and self.pool_version < FEATURE_POOL_VERSION:
            pool += f", version {self.pool_version}"
        text = f"{self.zfs} ({pool}): " + (", ".join(self.present()) or "none of the extras")
        if self.absent() and self.present():
            text += f"; lacks {', '.join(self.absent())}"
        if self.note:
            text += f" ({self.note})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capabilities | None:
        try:
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            return cls(**known)
        except TypeError:
            return None


# --------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"^zfs-(\d+\.\d+\S*)$", re.MULTILINE)
_COMMAND_RE = re.compile(r"^\t([a-z][a-z-]*)\b(.*)$")
_OPTION_RE = re.compile(r"(?:^|[\s\[|])-\[?([A-Za-z]+)")


def _sections(text: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(f"{_MARK} "):
            current = sections.setdefault(line[len(_MARK) + 1 :].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def parse_version(text: str) -> str | None:
    """The userland version from ``zfs version`` (``zfs-2.1.11-1``), None without one."""
    match = _VERSION_RE.search(text)
    return match[1] if match else None


def parse_usage(text: str) -> dict[str, frozenset[str]]:
    """Subcommand -> option letters, from the usage text ``zfs -?`` prints.

    Every synopsis line of a subcommand counts (``send [-nvPe] -t <token>`` adds ``t``);
    continuation lines (a tab and spaces) belong to the subcommand above them.
    """
    commands: dict[str, set[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        match = _COMMAND_RE.match(line)
        if match and not line.startswith("\t "):
            current = match[1]
            rest = match[2]
        elif current is not None and line.startswith("\t    "):
            rest = line
        else:
            if not line.strip():
                current = None
            continue
        letters = commands.setdefault(current, set())
        for group in _OPTION_RE.findall(rest):
            letters.update(group)
    if "recv" in commands:  # some ports print the short name
        commands.setdefault("receive", set()).update(commands["recv"])
    return {name: frozenset(letters) for name, letters in commands.items()}


def parse_pools(text: str, pools: Iterable[str]) -> dict[str, PoolFeatures]:
    """Version, guid and enabled features of ``pools`` from ``zpool get all POOL`` tables.

    zfs-fuse's ``zpool get`` has no ``-H``: the human table is read, header and all, and
    only ``version``, ``guid`` and ``feature@*`` rows are used (their values never hold
    spaces).
    """
    wanted = set(pools)
    versions: dict[str, int | None] = {}
    guids: dict[str, str] = {}
    features: dict[str, set[str]] = {}
    errors: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in wanted:
            pool, prop, value = parts[0], parts[1], parts[2]
            features.setdefault(pool, set())
            if prop == "version":
                versions[pool] = int(value) if value.isdigit() else FEATURE_POOL_VERSION
            elif prop == "guid" and value.isdigit():
                guids[pool] = value
            elif prop.startswith("feature@") and value in ("enabled", "active"):
                features[pool].add(prop.split("@", 1)[1])
        elif line.startswith("cannot open"):
            for pool in wanted:
                if f"'{pool}'" in line:
                    errors.setdefault(pool, []).append(line.strip())
    result = {}
    for pool in wanted:
        if pool in features:
            result[pool] = PoolFeatures(
                pool, versions.get(pool), frozenset(features[pool]), guid=guids.get(pool, "")
            )
        else:
            said = "; ".join(errors.get(pool, [])) or "zpool get printed nothing for it"
            result[pool] = PoolFeatures(pool, error=said)
    return result


def parse_probe(text: str, pools: Sequence[str]) -> tuple[ZfsTool, dict[str, PoolFeatures]]:
    sections = _sections(text)
    tool = ZfsTool(
        version=parse_version(sections.get("version", "")),
        fuse=bool(sections.get("fuse", "").strip()),
        commands=parse_usage(sections.get("usage", "")),
    )
    return tool, parse_pools(sections.get("pools", ""), pools)


def capabilities(host: str, tool: ZfsTool, pool: PoolFeatures) -> Capabilities:
    """Join what the binary offers with what the pool backs."""
    version = pool.version
    flags = version is not None and version >= FEATURE_POOL_VERSION
    send, recv = "send", "receive"
    return Capabilities(
        host=host,
        pool=pool.name,
        zfs=tool.name,
        holds=tool.has("hold") and tool.has("release") and (version or 0) >= HOLDS_POOL_VERSION,
        bookmarks=tool.has("bookmark") and flags and pool.has("bookmarks"),
        resumable=(
            tool.has(recv, "s", "A")
            and tool.has(send, "t")
            and flags
            and pool.has("extensible_dataset")
        ),  # fmt: skip
        estimates=tool.has(send, "n", "v", "P"),
        raw=tool.has(send, "w") and flags and pool.has("encryption"),
        compressed=tool.has(send, "c"),
        send_props=tool.has(send, "p"),
        receive_exclude=tool.has(recv, "x"),
        receive_unmounted=tool.has(recv, "u"),
        pool_version=version,
        note=pool.error,
        pool_guid=pool.guid,
    )


# --------------------------------------------------------------------------------------
# Per-run cache
# --------------------------------------------------------------------------------------


# How long a remote host's probe is believed across runs (see Prober).
PROBE_MAX_AGE = 3600.0


class Prober:
    """Probes each host once per run; a further pool costs one ``zpool get``.

    With ``cache_dir``, what a remote host answered is kept there and believed for
    ``max_age`` seconds: a cron run every few minutes then spends no round trip on it
    (about 20 ms of a 0.3 s update on a LAN). A ZFS upgraded in between is noticed within
    the hour; a run that fails forgets its hosts' answers (:meth:`forget`), so the next
    one asks again. ``setup`` always asks."""

    def __init__(self, cache_dir: str | None = None, max_age: float = PROBE_MAX_AGE) -> None:
        self.cache_dir = cache_dir
        self.max_age = max_age
        self._tools: dict[int, ZfsTool] = {}
        self._pools: dict[tuple[int, str], PoolFeatures] = {}
        # replicate's workers share one prober: a host is probed once even when two
        # pairs of it start together
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    def _lock(self, host: Host) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(id(host), threading.Lock())

    def of_both(
        self, src: Host, src_pool: str, dst: Host, dst_pool: str
    ) -> tuple[Capabilities, Capabilities]:
        """Both sides of a pair; two hosts not probed yet are asked at the same time (a
        remote probe is a round trip, and the two are independent)."""
        if src is not dst and id(src) not in self._tools and id(dst) not in self._tools:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=1) as pool:
                remote = pool.submit(self.of, src, src_pool)
                local = self.of(dst, dst_pool)
                return remote.result(), local
        return self.of(src, src_pool), self.of(dst, dst_pool)

    def of(self, host: Host, pool: str) -> Capabilities:
        with self._lock(host):
            return self._of(host, pool)

    def _of(self, host: Host, pool: str) -> Capabilities:
        key = id(host)
        if key not in self._tools:
            text = self._recall(host, pool)
            if text is None:
                result = host.run(probe_argv([pool]), check=False, timeout=60)
                text = result.stdout + "\n" + result.stderr
                if result.ok:
                    self._keep(host, pool, text)
                elif version_skew(result.returncode, result.stderr):
                    log.warning(
                        "%s: its zettabee-source refused the capability probe of zettabee %s "
                        "(another version there?): pulls from it go on without holds, "
                        "bookmarks, resume or size estimates; run `zettabee enroll %s` to "
                        "install this version there",
                        host.name, __version__, host.name,
                    )  # fmt: skip
            tool, pools = parse_probe(text, [pool])
            self._tools[key] = tool
            self._pools[(key, pool)] = pools[pool]
        elif (key, pool) not in self._pools:
            result = host.run(pool_argv(pool), check=False, timeout=60)
            self._pools[(key, pool)] = parse_pools(result.stdout + result.stderr, [pool])[pool]
        return capabilities(host.name, self._tools[key], self._pools[(key, pool)])

    def _cache_path(self, host: Host, pool: str) -> str | None:
        if self.cache_dir is None or host.is_local:
            return None
        target = getattr(host, "target", None)
        where = f"{host.name}\0{getattr(target, 'port', '')}\0{getattr(target, 'user', '')}"
        digest = hashlib.sha256(f"{where}\0{pool}".encode()).hexdigest()[:32]
        return os.path.join(self.cache_dir, f"probe-{digest}.txt")

    def _recall(self, host: Host, pool: str) -> str | None:
        path = self._cache_path(host, pool)
        if path is None:
            return None
        try:
            with open(path) as handle:
                if time.time() - os.fstat(handle.fileno()).st_mtime > self.max_age:
                    return None
                return handle.read()
        except (OSError, UnicodeError):
            return None

    def _keep(self, host: Host, pool: str, text: str) -> None:
        path = self._cache_path(host, pool)
        if path is None:
            return
        try:  # a cache that cannot be written costs the next run a round trip, no more
            os.makedirs(self.cache_dir or ".", mode=0o750, exist_ok=True)
            write_atomic(Path(path), text, durable=False)
        except OSError:
            pass

    def forget(self, host: Host, pool: str) -> None:
        path = self._cache_path(host, pool)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


# --------------------------------------------------------------------------------------
# What a pair uses
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairFeatures:
    """What one pair uses, given both sides and its options; ``problems`` are options
    the pair demands (raw, bookmark) that a side cannot honour."""

    source: Capabilities
    destination: Capabilities
    hold_source: bool = False
    hold_destination: bool = False
    resume: bool = False
    estimate: bool = False
    raw: bool = False
    bookmark: bool = False
    props: bool = False
    # A child of a recursive line is received unmounted where the destination can
    # (``zfs receive -u``): its parent's replica, read-only, may hold no directory to
    # mount it on (a source parent with canmount=off or mountpoint=none holds none).
    unmounted: bool = False
    problems: tuple[str, ...] = ()

    def kept_local(self, volume: bool) -> tuple[str, ...]:
        """The properties a receive leaves out of a stream that carries the source's
        (``props``): where the source's host mounts the file system and what it shares.
        Received, they would mount the replica over a path of this host's own (the
        source's ``/var/lib/postgresql``, say) and export it. Left out, the replica
        inherits them from the file system above it, as without props. A volume has
        none of them, and OpenZFS 2.1 refuses ``-x mountpoint`` on one."""
        return () if not self.props or volume else KEPT_LOCAL

    def noauto(self, volume: bool) -> bool:
        """Is a replica received unmounted kept so at boot (``canmount=noauto``, see
        :func:`zettabee.snapshots.record`)? A volume has no ``canmount``."""
        return self.unmounted and not volume

    def uses(self) -> list[str]:
        used = []
        sides = [
            n
            for n, on in (("source", self.hold_source), ("destination", self.hold_destination))
            if on
        ]
        if sides:
            used.append(f"holds ({' and '.join(sides)})")
        for label, on in (
            ("resumable receive", self.resume),
            ("size estimates", self.estimate),
            ("raw send", self.raw),
            ("bookmarks", self.bookmark),
            ("the source's properties", self.props),
            ("received unmounted", self.unmounted),
        ):
            if on:
                used.append(label)
        return used

    def describe(self) -> str:
        return ", ".join(self.uses()) or "none of the extras (plain send and receive)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.as_dict(),
            "destination": self.destination.as_dict(),
            "uses": self.uses(),
            "problems": list(self.problems),
        }


def feature_lines(recorded: dict[str, Any] | None) -> list[str]:
    """What each side offers and what the pair uses, as the last run recorded them
    (:meth:`PairFeatures.as_dict`, kept in the pair's status file)."""
    if recorded is None:
        return ["features: not probed yet (`zettabee setup` shows them; every run records them)"]
    lines = []
    for side in ("source", "destination"):
        data = recorded.get(side)
        caps = Capabilities.from_dict(data) if isinstance(data, dict) else None
        if caps is not None:
            lines.append(f"{side} {caps.host}: {caps.describe()}")
    uses = recorded.get("uses") or []
    lines.append(
        f"uses: {', '.join(uses) if uses else 'none of the extras (plain send and receive)'}"
    )
    lines.extend(f"problem: {problem}" for problem in recorded.get("problems") or [])
    return lines


def plan_features(
    src: Capabilities,
    dst: Capabilities,
    *,
    resume: bool = True,
    hold: bool = True,
    bookmark: bool = False,
    raw: bool = False,
    props: bool = False,
    child: bool = False,
) -> PairFeatures:
    """Which capabilities a pair uses, from its options (``PairOptions`` fields) and
    whether it is a recursive line's ``child``."""
    problems = []
    if props and not (src.send_props and dst.receive_exclude):
        side, caps, lacks = (
            ("source", src, "zfs send -p")
            if not src.send_props
            else ("destination", dst, "zfs receive -x")
        )
        problems.append(
            f"props=yes, but the {side} {caps.host} ({caps.zfs}) has no {lacks}: the "
            "source's properties are sent only where the receive can leave out the ones "
            f"that would mount the replica over this host's own paths ({', '.join(KEPT_LOCAL)}); "
            "remove props=yes, or replicate from and to hosts with OpenZFS"
        )
    if raw:
        for side, caps in (("source", src), ("destination", dst)):
            if not caps.raw:
                problems.append(
                    f"raw=yes, but the {side} {caps.host} ({caps.zfs}, pool {caps.pool}) "
                    "cannot handle raw streams: that needs OpenZFS 0.8 or later and the "
                    "pool feature encryption; remove raw=yes, or replicate from and to "
                    "hosts that have it"
                )
    if bookmark and not src.bookmarks:
        problems.append(
            f"bookmark=yes, but the source {src.host} ({src.zfs}, pool {src.pool}) has no "
            "bookmarks: that needs OpenZFS and the pool feature bookmarks; remove "
            "bookmark=yes (and keep other tools from pruning zettabee's snapshots)"
        )
    return PairFeatures(
        source=src,
        destination=dst,
        hold_source=hold and src.holds,
        hold_destination=hold and dst.holds,
        resume=resume and src.resumable and dst.resumable,
        estimate=src.estimates,
        raw=raw and src.raw and dst.raw,
        bookmark=bookmark and src.bookmarks,
        props=props and src.send_props and dst.receive_exclude,
        unmounted=child and dst.receive_unmounted,
        problems=tuple(problems),
    )
