"""``setup``: check each pair end to end and say what is missing and how to fix it."""

from __future__ import annotations

from collections.abc import Sequence

from nsca.client import HOST_FIELD, SERVICE_FIELD
from zettabee import zfs
from zettabee.config import CHECKS, Settings
from zettabee.errors import ZettabeeError
from zettabee.host import Host
from zettabee.hosts import Hosts
from zettabee.pair import Pair, Replica, replica_id


def _check(label: str, host: Host, argv: list[str], fix: str) -> tuple[bool, str]:
    try:
        result = host.run(argv, check=False, timeout=30)
    except ZettabeeError as exc:
        return False, f"  FAIL {label}: {exc}\n       fix: {fix}"
    if result.returncode != 0:
        said = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        return (
            False,
            f"  FAIL {label} on {host.name}: {said or 'exit ' + str(result.returncode)}\n       fix: {fix}",
        )
    return True, f"  ok   {label} on {host.name}"


def nsca_name_problems(settings: Settings, pair: Pair) -> list[str]:
    """The pair's monitoring names that an NSCA back end cannot carry: NSCA's packet has
    room for a host name of 63 bytes and a service name of 127, and the results of such a
    pair would be refused at every run."""
    if not {"nsca", "send_nsca"} & set(settings.passive):
        return []
    problems = []
    host = settings.monitoring_host()
    if len(host.encode()) >= HOST_FIELD:
        problems.append(
            f"NSCA host name {host!r} is {len(host.encode())} bytes; NSCA carries at most "
            f"{HOST_FIELD - 1}\n       fix: set a shorter host_name in [monitoring]"
        )
    for check in CHECKS:
        service = settings.service_name(pair, check)
        if len(service.encode()) >= SERVICE_FIELD:
            problems.append(
                f"NSCA service name {service!r} is {len(service.encode())} bytes; NSCA "
                f"carries at most {SERVICE_FIELD - 1}\n       fix: shorten service_template "
                "in [monitoring], e.g. 'zettabee {check} {fingerprint}'"
            )
    return problems


def check_pairs(settings: Settings, pairs: Sequence[Pair], accept_new_host_key: bool) -> bool:
    hosts = Hosts(settings.known_hosts, accept_new_host_key=accept_new_host_key)
    all_ok = True
    try:
        for pair in pairs:
            print(f"{pair}:")
            for problem in nsca_name_problems(settings, pair):
                print(f"  FAIL {problem}")
                all_ok = False
            src = hosts.get(pair.source, pair)
            dst = hosts.get(pair.destination, pair)
            checks = [
                ("zfs", src, ["zfs", "list", "-H", "-o", "name", pair.source.pool],
                 f"install ZFS on {pair.source.host} and import pool {pair.source.pool}"),
                ("source dataset", src, zfs.get([pair.source.fs], ["type"]),
                 f"create {pair.source.fs} on {pair.source.host} or fix the pair file"),
                ("zfs", dst, ["zfs", "list", "-H", "-o", "name", pair.destination.pool],
                 f"import pool {pair.destination.pool} on {pair.destination.host}"),
            ]  # fmt: skip
            parent = pair.destination.fs.rsplit("/", 1)[0]
            if parent != pair.destination.fs:
                checks.append(("destination parent", dst, zfs.get([parent], ["type"]),
                               f"zfs create -p {parent}"))  # fmt: skip
            if pair.options.transport == "mbuffer":
                for host in (src, dst) if src is not dst else (src,):
                    checks.append(("mbuffer", host, ["mbuffer", "-V"],
                                   f"apt-get install mbuffer on {host.name}"))  # fmt: skip
            if pair.options.transport == "local" and not (
                src is dst or (src.is_local and dst.is_local)
            ):
                print(
                    f"  FAIL transport=local: the source is on {src.name}, the destination on "
                    f"{dst.name}\n       fix: use transport=ssh (or mbuffer) for two hosts"
                )
                all_ok = False
            zfs_ok = True
            for label, host, argv, fix in checks:
                ok, line = _check(label, host, argv, fix)
                print(line)
                all_ok &= ok
                zfs_ok &= ok or label != "zfs"
                if not ok and label == "zfs" and host is src:
                    break
            if zfs_ok:
                all_ok &= print_features(hosts, pair, src, dst)
    finally:
        hosts.close()
    return all_ok


def print_features(hosts: Hosts, pair: Pair, src: Host, dst: Host) -> bool:
    """What each side's ZFS offers and what the pair will use; a demanded option that a
    side cannot honour (raw, bookmark) fails the check. ``enroll`` ends with these lines."""
    try:
        feats = hosts.features(pair, src, dst)
    except ZettabeeError as exc:
        print(f"  FAIL zfs features: {exc}")
        return False
    for side, caps in (("source", feats.source), ("destination", feats.destination)):
        print(f"  ok   {side} zfs on {caps.host}: {caps.describe()}")
    print(f"  uses {feats.describe()}")
    if feats.destination.pool_guid:
        replica = Replica(pair.fingerprint, replica_id(feats.destination.pool_guid))
        print(
            f"  replica id {replica.rid} (pool {pair.destination.pool} on "
            f"{feats.destination.host}): snapshots {replica.tag}.<time>, hold {replica.tag}; "
            f"the source's key binds it with --pair {pair.line_fingerprint}.{replica.rid}"
        )
    for problem in feats.problems:
        print(f"  FAIL {problem}")
    return not feats.problems
