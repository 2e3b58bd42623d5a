"""``zettabee enroll HOST``: a source host set up for least privilege, in one command.

First contact with a source is the one place where zettabee speaks SSH through paramiko
(cron runs use OpenSSH, see :mod:`zettabee.host`): an administrator's password (from the
terminal or a file descriptor, never argv or the environment), agent or key; the host
key's fingerprint shown through paramiko's API and pinned only when it equals
``--host-key-fingerprint`` or the operator says yes on a terminal, never by a policy that
adds whatever a host offers; SFTP to place files atomically.

What it does on the source, in this order, after every check has passed (so that a wrong
password, an unknown key, a dead host, no zfs, no python3 or a file it may not write
leaves nothing half-done):

1. ``zettabee-source`` of exactly this version: the one found in place, else this
   version's zipapp (:mod:`zettabee.sourceapp`) written under a temporary name, its
   SHA-256 checked on the source, renamed into place;
2. the restricted line (:mod:`zettabee.authkeys`) in the key user's ``authorized_keys``,
   written to a temporary file with the old file's owner and mode and renamed over it;
   nothing is written when the line is there already;
3. the host key pinned in the pair's known_hosts file, a pull's command run through the
   restricted key with OpenSSH, as cron will, and each pair's features probed that way
   and printed as ``setup`` prints them.

Only this module and its rooms (:mod:`zettabee.contact`, :mod:`zettabee.enrollsource`,
:mod:`zettabee.enrollplan`) import paramiko; the check plugins, ``replicate`` and ``update`` never
load it (it costs 0.15-0.2 s and 40 MB).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zettabee import __version__, authkeys, sourceapp
from zettabee.contact import (
    Remote,
    ask_yes,
    connect,
    pin_host_key,
    sha256_fingerprint,
)
from zettabee.enrollplan import DEFAULT_SOURCE_PATHS, EnrollError, Plan, Request, plan_for
from zettabee.enrollsource import (
    Account,
    KeysFile,
    Placement,
    account,
    check_datasets,
    check_delegation,
    check_writable,
    create_user,
    delegate,
    from_patterns,
    generate_key,
    install_source,
    keys_path,
    permissions,
    place_source,
    public_key,
    read_keys,
    sftp_reason,
    write_keys,
)
from zettabee.errors import ZettabeeError
from zettabee.pair import replica_id

if TYPE_CHECKING:
    import paramiko

# What the cli takes from here; the steps live in the modules imported above.
__all__ = ["EnrollError", "Plan", "Request", "enroll", "plan_for"]

log = logging.getLogger("zettabee.enroll")


def enroll(request: Request, plan: Plan, confirm: Callable[[str], bool] = ask_yes) -> None:
    """Check everything, then install, write the line, pin the key and prove it."""
    remote, offered, to_pin = connect(request, plan.target, confirm)
    try:
        if request.remove:
            _remove(remote, request, plan)
        else:
            _enroll(remote, request, plan, offered, to_pin)
    finally:
        remote.close()


@dataclass(frozen=True)
class Checked:
    """What the checks found on the source, before anything was written."""

    owner: Account
    keys: KeysFile
    placement: Placement
    grant: authkeys.Grant


def _enroll(
    remote: Remote, request: Request, plan: Plan, offered: paramiko.PKey, to_pin: bool
) -> None:
    host, user, dry = request.host, plan.target.user, request.dry_run
    new_user = False
    if request.delegate:  # root's checks first: the user may not exist yet
        check_datasets(remote, plan)
        new_user = check_delegation(remote, request, plan)
    placement = place_source(remote, request)
    if new_user:
        print(f"{host}: {_would(dry)}create the user {user} (no password, not locked)")
        if dry:
            print(f"{host}: (the rest is checked once {user} exists)")
            _print_delegation(host, _would(dry), user, plan)
            return
        create_user(remote, user)
    checked = _check(remote, request, plan, placement)
    if request.delegate:
        _print_delegation(host, _would(dry), user, plan)
        if not dry:
            delegate(remote, user, plan)
    _apply(remote, request, plan, checked)
    if to_pin:
        print(f"{host}: {_would(dry)}pin {offered.get_name()} {sha256_fingerprint(offered)} "
              f"in {plan.target.known_hosts}")  # fmt: skip
        if not dry:
            pin_host_key(plan.target.known_hosts or "", plan.target, offered)
    if not dry:
        prove(plan)
        show_features(plan)


def _would(dry: bool) -> str:
    return "would " if dry else ""


def _check(remote: Remote, request: Request, plan: Plan, placement: Placement) -> Checked:
    """The key user's file may be written, zfs has the file systems, the line can be made."""
    owner = account(remote, plan.target.user)
    path = keys_path(request.authorized_keys, owner)
    check_writable(remote, path)
    if not request.delegate:
        check_datasets(remote, plan)
    if placement.install:
        check_writable(remote, placement.path)
    grant = authkeys.Grant(
        source_command=placement.path,
        datasets=plan.datasets,
        pairs=replica_bindings(plan, request.host),
        mbuffer_hosts=plan.mbuffer_hosts,
        from_patterns=from_patterns(remote, request),
        trees=plan.trees,
    )
    if grant.problems():
        raise EnrollError(f"{request.host}: {'; '.join(grant.problems())}")
    return Checked(owner, read_keys(remote, path), placement, grant)


def replica_bindings(plan: Plan, host: str) -> tuple[str, ...]:
    """Each pair's ``--pair FP.RID``: its fingerprint and the replica id of its
    destination pool (:func:`zettabee.pair.replica_id`), whose guid the destination's
    capability probe reads, as every run reads it. Bound so, the key cannot touch the
    snapshots and holds of another backup server that pulls the same source under the
    same pair line (the same fingerprint, another pool). A pool whose guid cannot be
    read (not created yet) binds the pair alone (``--pair FP``), and says so."""
    from zettabee.hosts import Hosts

    hosts = Hosts(plan.target.known_hosts or "")
    words = []
    try:
        for pair in plan.pairs:
            pool = pair.destination.pool
            try:
                caps = hosts.prober.of(hosts.get(pair.destination, pair), pool)
                guid, said = caps.pool_guid, caps.note
            except ZettabeeError as exc:
                guid, said = "", str(exc)
            if guid:
                words.append(f"{pair.fingerprint}.{replica_id(guid)}")
                continue
            print(
                f"{host}: {pair.name}: cannot read the guid of pool {pool} on "
                f"{pair.destination.host} ({said or 'zpool get all printed none'}): its key "
                f"is bound to the pair (--pair {pair.fingerprint}), not to this server's "
                f"replica of it; run `zettabee enroll {host}` again once the pool exists"
            )
            words.append(pair.fingerprint)
    finally:
        hosts.close()
    return tuple(words)


def _apply(remote: Remote, request: Request, plan: Plan, checked: Checked) -> None:
    """The pairs' key (generated if missing), zettabee-source, the key line."""
    host, dry, would = request.host, request.dry_run, _would(request.dry_run)
    key = public_key(plan.key_path)
    if key is None:
        print(f"{host}: {would}generate an ed25519 key at {plan.key_path} (the pairs' sshkey)")
        placeholder = authkeys.PublicKey("ssh-ed25519", "NEWKEY", "(generated)")
        key = placeholder if dry else generate_key(plan.key_path)
    placement = checked.placement
    if placement.install:
        had = f" (found: {placement.found})" if placement.found else ""
        print(f"{host}: {would}install zettabee-source {__version__} at {placement.path}{had}")
        if not dry:
            install_source(remote, placement.path)
    else:
        print(f"{host}: zettabee-source {__version__} at {placement.path}")
    keys, owner = checked.keys, checked.owner
    line = authkeys.build_line(checked.grant, key)
    text = authkeys.merge(keys.text, line)
    if text == keys.text:
        print(f"{host}: {keys.path} of {owner.user}: zettabee's line is in place, unchanged")
        return
    verb = (
        "replace zettabee's line in"
        if authkeys.lines_of(keys.text, key)
        else "add zettabee's line to"
    )
    print(f"{host}: {would}{verb} {keys.path} of {owner.user}:\n  {line}")
    if not dry:
        write_keys(remote, keys, text, owner)


def _print_delegation(host: str, would: str, user: str, plan: Plan) -> None:
    for fs, names in permissions(plan).items():
        print(f"{host}: {would}zfs allow -u {user} {names} {fs}")


def prove(plan: Plan) -> None:
    """A pull's first command through the restricted key, with OpenSSH as cron runs it."""
    fs = plan.datasets[0]
    argv = plan.target.ssh_client_argv(shlex.join(["zfs", "list", "-H", "-o", "name", fs]))
    log.debug("prove: %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise EnrollError(
            f"{plan.target.host}: the check through the restricted key did not answer in 60 s"
        ) from None
    if proc.returncode != 0 or proc.stdout.strip() != fs:
        said = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise EnrollError(
            f"{plan.target.host}: enrolled, but a pull's command through the restricted key failed: {said}"
        )
    print(
        f"{plan.target.host}: a pull's command through the restricted key works ({len(plan.pairs)} pairs, {len(plan.datasets)} file systems)"
    )


def show_features(plan: Plan) -> None:
    """Each pair's features as ``setup`` prints them, the source probed through the
    restricted key as a cron run probes it; a pair that cannot work as its options ask
    (raw=yes where a side has no raw send) fails the enrollment's proof."""
    from zettabee.hosts import Hosts
    from zettabee.preflight import print_features

    hosts = Hosts(plan.target.known_hosts or "")
    try:
        failed = []
        for pair in plan.pairs:
            print(f"{pair}:")
            src, dst = hosts.get(pair.source, pair), hosts.get(pair.destination, pair)
            if not print_features(hosts, pair, src, dst):
                failed.append(pair.name)
    finally:
        hosts.close()
    if failed:
        raise EnrollError(
            f"{plan.target.host}: enrolled, but {', '.join(failed)} cannot work as "
            "configured (the FAIL lines above): fix the pair file, then `zettabee setup` "
            "checks it again"
        )


def _remove(remote: Remote, request: Request, plan: Plan) -> None:
    """Take zettabee's line away, and the zipapp enroll placed when no line uses it."""
    host, dry = request.host, request.dry_run
    would = "would " if dry else ""
    owner = account(remote, plan.target.user)
    keys = read_keys(remote, keys_path(request.authorized_keys, owner))
    key = public_key(plan.key_path)
    text = authkeys.remove(keys.text, key) if key is not None else keys.text
    if text == keys.text:
        print(f"{host}: {keys.path} of {owner.user} has no line of {plan.key_path}")
    else:
        print(f"{host}: {would}remove zettabee's line from {keys.path} of {owner.user}")
        if not dry:
            write_keys(remote, keys, text, owner)
    if request.delegate:
        check_delegation(remote, request, plan)
        for fs, names in permissions(plan).items():
            print(f"{host}: {would}zfs unallow -u {owner.user} {names} {fs}")
        if not dry:
            delegate(remote, owner.user, plan, allow=False)
        if request.remove_user:
            print(f"{host}: {would}remove the user {owner.user} and its home (userdel -r)")
            code, _, err = (0, "", "") if dry else remote.run(["userdel", "-r", owner.user])
            if code != 0:
                raise EnrollError(
                    f"{host}: userdel -r {owner.user} failed (exit {code}): {err.strip()}"
                )
    path = request.source_path or DEFAULT_SOURCE_PATHS[-1]
    if _is_our_zipapp(remote, path) and not authkeys.mentions(text, [path]):
        print(f"{host}: {would}remove the zettabee-source zipapp {path}")
        if not dry:
            try:
                remote.sftp.remove(path)
            except OSError as exc:
                raise EnrollError(f"{host}: cannot remove {path}: {sftp_reason(exc)}") from None


def _is_our_zipapp(remote: Remote, path: str) -> bool:
    try:
        with remote.sftp.open(path, "rb") as handle:
            return handle.read(len(sourceapp.SHEBANG) + 2) == sourceapp.SHEBANG + b"PK"
    except OSError:
        return False
