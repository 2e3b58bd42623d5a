"""What ``zettabee enroll HOST`` was asked and what the pairs of that host need there
(the request, the plan, the error every step raises)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from zettabee.errors import UsageError, ZettabeeError
from zettabee.host import SshTarget
from zettabee.pair import Pair

if TYPE_CHECKING:
    pass


log = logging.getLogger("zettabee.enroll")

DEFAULT_SOURCE_PATHS = ("/usr/bin/zettabee-source", "/usr/local/bin/zettabee-source")
DEFAULT_AUTHORIZED_KEYS = "%h/.ssh/authorized_keys"
TIMEOUT = 15.0
# paramiko's names of the host key algorithms of each key type a known_hosts line holds.
_HOST_KEY_ALGORITHMS = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
    "ssh-ed25519": ("ssh-ed25519",),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
}


class EnrollError(ZettabeeError):
    """Enrollment stopped; the message says why and what to do."""


@dataclass(frozen=True)
class Request:
    """What the operator asked for on the command line."""

    host: str
    admin: str = "root"
    admin_key: str | None = None
    password_fd: int | None = None
    host_key_fingerprint: str | None = None
    authorized_keys: str = DEFAULT_AUTHORIZED_KEYS
    source_path: str | None = None
    from_patterns: tuple[str, ...] | None = None  # None: the address the source sees
    dry_run: bool = False
    remove: bool = False
    timeout: float = TIMEOUT
    delegate: str | None = None  # --user: the pairs' non-root user, made and given zfs allow
    remove_user: bool = False


@dataclass(frozen=True)
class Plan:
    """The pairs with their source on the host, and what their key needs there."""

    target: SshTarget  # the host as cron reaches it: port, key user, key, known_hosts
    key_path: str
    pairs: tuple[Pair, ...]
    datasets: tuple[str, ...]
    mbuffer_hosts: tuple[str, ...] = field(default=())
    trees: tuple[str, ...] = field(default=())  # the sources of recursive lines


# -- the pairs --------------------------------------------------------------------------


def _same_host(a: str, b: str) -> bool:
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def plan_for(host: str, pairs: Sequence[Pair], known_hosts: str) -> Plan:
    """What the pairs whose source is ``host`` need on it. They must reach it as one
    user with one key: one line of one ``authorized_keys``."""
    mine = tuple(p for p in pairs if _same_host(p.source.host, host))
    if not mine:
        raise UsageError(f"no pair of the pair file has its source on {host!r}")
    ways = {
        (p.options.sshport, p.options.user, p.options.sshkey, p.options.knownhosts) for p in mine
    }
    if len(ways) > 1:
        raise UsageError(
            f"the pairs with their source on {host} reach it in {len(ways)} ways (sshport, "
            "user, sshkey, knownhosts differ): give them the same, one key line serves them all"
        )
    opts = mine[0].options
    key = opts.sshkey or str(Path("~/.ssh/id_ed25519").expanduser())
    target = SshTarget(
        mine[0].source.host, opts.sshport, opts.user, key, opts.knownhosts or known_hosts
    )
    mbuffer = {p.options.mbufferhost for p in mine if p.options.transport == "mbuffer"}
    return Plan(
        target=target,
        key_path=key,
        pairs=mine,
        datasets=tuple(sorted({p.source.fs for p in mine})),
        mbuffer_hosts=tuple(sorted(h for h in mbuffer if h)),
        trees=tuple(sorted({p.source.fs for p in mine if p.options.recursive})),
    )
