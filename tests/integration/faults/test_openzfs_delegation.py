"""Least privilege on a real OpenZFS source: a non-root user, ``zfs allow``, zettabee-source.

zfs-fuse has no ``zfs allow``; the OpenZFS guest has. There an ordinary user ``zettabee``
gets exactly the permissions a pull uses on one file system, logs in with a key whose
forced command is ``zettabee-source``, and serves everything OpenZFS adds to a pull: the
capability probe, holds, size estimates (``send -nvP``), bookmarks, and the resume of an
interrupted receive (``send -nvP -t``, ``send -t``). What the forced command would let
through but the delegation does not cover, ZFS itself refuses to that user; what the
delegation allows but no pull sends (a resume token of a snapshot that is not
zettabee's), the forced command refuses.

Two pulls:

- ``zettabee`` as cron runs it (setup, initialize, updates, pruning) into the lab's
  zfs-fuse pool. zfs-fuse cannot receive the streams of pools with features past version
  23 ("stream has unsupported feature"), so that source file system lives in a pool of
  that version, made in the guest for the test; delegation is the same OpenZFS code
  whatever the pool's version, and holds and estimates are there;
- the engine itself into the guest's own pool ``gdst`` as root, from a user on ``gsrc``
  that ``zettabee enroll --user`` made, delegated to and gave its key's line: both ends
  OpenZFS, so bookmarks and resumable receive are used too, and pruning on both; on 2.1
  and on 2.3, whose ``zfs allow`` each enroll writes for. A
  pair file gives both ends of a pair the same user and key; the test hands the engine a
  host for each end instead.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lab.guest import Guest
from lab.hosts import sh
from tests.integration.faults.conftest import INTACT, Faults, snapshots, zget
from tests.tokens import encode
from zettabee import zfs
from zettabee.host import Host, SshHost, SshTarget
from zettabee.hosts import Hosts
from zettabee.pair import (
    Endpoint,
    Pair,
    PairOptions,
    is_pair_snapshot,
    parse_snapshot_name,
    snapshot_name,
    tag_of,
)
from zettabee.replicator import Replicator
from zettabee.state import StateStore

pytestmark = pytest.mark.integration

USER = "zettabee"
POOL = "gv23"  # see the module's docstring
PERMISSIONS = "send,snapshot,destroy,mount,hold,release,bookmark"
PACKAGE = Path(__file__).resolve().parents[3] / "zettabee"
ANY_FP = "0123456789abcdef0123456789abcdef"  # the form of a pair's: no pair is run with it
ANY_RID = "0a1b2c3d"  # and of a replica id

INSTALL = r"""
import json, os, sys
files = json.load(sys.stdin)
for name, text in files.items():
    path = os.path.join("/opt/zettabee/zettabee", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
with open("/usr/local/bin/zettabee-source", "w") as handle:
    handle.write('#!/bin/sh\nPYTHONPATH=/opt/zettabee exec python3 -m zettabee.source "$@"\n')
os.chmod("/usr/local/bin/zettabee-source", 0o755)
"""


def install_source_command(g: Guest) -> None:
    """zettabee-source in the guest: the package's modules (stdlib only on this path)."""
    files = {p.name: p.read_text() for p in PACKAGE.glob("*.py")}
    g.run("python3", "-c", INSTALL, input=json.dumps(files))


def delegate(g: Guest, fs: str) -> SshTarget:
    """The user, its delegation on ``fs`` alone, and its key restricted to zettabee-source
    for ``fs``; returns how to reach the guest as that user."""
    # useradd leaves the password locked ('!'), and sshd refuses a locked account even
    # for a key; '*' is "no password" without the lock.
    g.shell(
        f"id {USER} >/dev/null 2>&1 || useradd --system --create-home --shell /bin/sh {USER}; "
        f"usermod -p '*' {USER}"
    )
    g.run("zfs", "allow", "-u", USER, PERMISSIONS, fs)
    install_source_command(g)
    key = Path(f"{g.key}.pub").read_text().strip()
    line = f'restrict,command="/usr/local/bin/zettabee-source {fs}" {key}'
    g.shell(
        f"install -d -m 700 -o {USER} ~{USER}/.ssh && "
        f"printf '%s\\n' {shlex.quote(line)} > ~{USER}/.ssh/authorized_keys && "
        f"chown {USER} ~{USER}/.ssh/authorized_keys && chmod 600 ~{USER}/.ssh/authorized_keys"
    )
    return SshTarget(g.address, g.port, USER, g.key, g.known_hosts)


def as_user(g: Guest, command: str, user: str = USER) -> subprocess.CompletedProcess[str]:
    """``command`` run by the delegated user in a shell of the guest, past the forced
    command: only the delegation limits it there."""
    return g.run("su", "-s", "/bin/sh", user, "-c", command, check=False)


def restricted(target: SshTarget, command: str) -> subprocess.CompletedProcess[str]:
    """``command`` over the restricted key, as a client would send it."""
    return subprocess.run(
        target.ssh_client_argv(command), capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def userrefs(g: Guest, snap: str) -> int:
    out = g.run("zfs", "get", "-Hp", "-o", "value", "userrefs", snap, check=False).stdout
    return int(out.strip()) if out.strip().isdigit() else -1


def guest_snapshots(g: Guest, fs: str, kind: str = "snapshot") -> list[str]:
    """Names (after ``@`` or ``#``) of ``fs``'s snapshots or bookmarks, oldest first."""
    out = g.run("zfs", "list", "-H", "-t", kind, "-s", "createtxg", "-o", "name", "-d", "1", fs)
    return [n.split("#" if kind == "bookmark" else "@", 1)[1] for n in out.stdout.split()]


def test_non_root_source_with_zfs_allow_and_the_restricted_key(
    faults: Faults, guest: Guest
) -> None:
    g = guest
    zb = faults.zb
    g.shell(
        f"zpool list {POOL} >/dev/null 2>&1 || {{ truncate -s 512M /var/tmp/{POOL}.img && "
        f"zpool create -o version=23 -O mountpoint=/{POOL} {POOL} /var/tmp/{POOL}.img; }}"
    )
    try:
        pull_as_delegated_user(faults, g, f"{POOL}/{zb.name}")
    finally:
        g.shell(f"zpool destroy -f {POOL}; rm -f /var/tmp/{POOL}.img", check=False)


def pull_as_delegated_user(faults: Faults, g: Guest, fs: str) -> None:
    zb = faults.zb
    other = f"{fs}-other"
    for name in (fs, other):
        g.run("zfs", "destroy", "-r", name, check=False)
        g.run("zfs", "create", name)
    g.shell(f"head -c 4194304 /dev/urandom > /{fs}/random.bin && zfs snapshot {other}@s")
    target = delegate(g, fs)
    options = f"user={USER},sshkey={g.key},knownhosts={g.known_hosts}"
    zb.write_pairs(f"{g.address}:{fs}  {zb.dstside.address}:{zb.dst_fs()}  {options}")
    row = faults.expect(
        "OpenZFS: non-root source user (zfs allow) behind zettabee-source",
        "setup, initialize, updates, pruning work as that user, with the probe, holds and "
        "estimates; escapes exit 126; ZFS denies it everything outside the delegation",
    )

    def same_snapshot() -> bool:
        """The destination's newest snapshot is the source's (by guid). zfs-fuse receives
        these streams but cannot read the files back (EIO), so the files are not compared:
        a receive that ends well has verified every record's checksum."""
        name = snapshots(zb.dst_fs())[-1]
        guid = zget(f"{zb.dst_fs()}@{name}", "guid")
        there = g.run("zfs", "get", "-Hp", "-o", "value", "guid", f"{fs}@{name}").stdout.strip()
        return guid == there

    steps = [faults.run("zettabee", "initialize", zb.dst_fs())]
    for n in range(2):
        g.shell(f"head -c 1048576 /dev/urandom > /{fs}/more{n}.bin")
        steps.append(faults.run("zettabee", "--debug", "update", zb.dst_fs()))
    setup = faults.run("zettabee", "setup", zb.dst_fs())
    assert [s.code for s in steps] == [0, 0, 0], [s.stderr for s in steps]
    assert setup.code == 0, setup.stdout + setup.stderr
    assert "holds" in setup.stdout and "size estimates" in setup.stdout, setup.stdout
    assert same_snapshot()
    left = g.run("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", fs).stdout.split()
    assert len(left) == 1, left  # the delegated destroy pruned the older snapshots
    # The probe went through the forced command: the source's holds and estimates are used.
    status = json.loads((zb.tmp / "state" / f"{zb.fingerprint()}.json").read_text())
    uses = status["features"]["uses"]
    assert "holds (source and destination)" in uses and "size estimates" in uses, uses
    assert userrefs(g, left[0]) == 1  # the base, held by the delegated user
    assert "estimated stream size" in steps[-1].stderr, steps[-1].stderr  # send -nvP

    escapes = [
        f"zfs destroy -r {fs}",
        f"zfs destroy {fs}",
        f"zfs send {other}@s",
        "id",
        f"zfs allow {fs}",
        shlex.join(zfs.release("keep", left[0])),
        shlex.join(zfs.hold(str(tag_of(left[0])), f"{other}@s")),
    ]
    refused = 0
    for command in escapes:
        proc = restricted(target, command)
        assert proc.returncode == 126 and "refused" in proc.stderr, (command, proc.stderr)
        refused += 1
    # Beyond the forced command, the delegation is the limit: the same user, in a shell.
    denied = 0
    for command in (
        f"zfs snapshot {other}@x",
        f"zfs destroy {other}@s",
        f"zfs send {other}@s > /dev/null",
        f"zfs set readonly=on {fs}",
    ):
        proc = as_user(g, command)
        assert proc.returncode != 0 and "permission denied" in proc.stderr.lower(), (
            command,
            proc.stderr,
        )
        denied += 1
    row.observed = (
        f"setup, initialize, 2 updates: exit 0 as user {USER}, using {', '.join(uses)}; "
        f"source pruned to 1 snapshot, held; {refused}/{len(escapes)} escapes refused (126); "
        f"{denied} commands outside the delegation denied by ZFS"
    )
    row.data = INTACT if same_snapshot() else "DIFFERENT"
    assert row.data == INTACT


# -- OpenZFS on both ends: bookmarks and resume behind a user enroll made ------------------

ENROLLED = "zbenrollpull"  # made by `zettabee enroll --user`, unlike USER


class EndHosts(Hosts):
    """The engine's hosts, with its own credentials for each end of one pair."""

    def __init__(self, source: SshTarget, destination: SshTarget) -> None:
        super().__init__(str(destination.known_hosts))
        self.ends = {"source": SshHost(source), "destination": SshHost(destination)}

    def get(self, endpoint: Endpoint, pair: Pair) -> Host:
        return self.ends["source" if endpoint == pair.source else "destination"]

    def close(self) -> None:
        for host in self.ends.values():
            host.close()


@pytest.fixture(params=["openzfs-2.1", "openzfs-2.3"])
def each_guest(request: pytest.FixtureRequest) -> Guest:
    """The 2.1 guest, then the 2.3 one: what `enroll --user` delegates, and what a pull
    behind it may do, is each version's own `zfs allow`."""
    name = "guest" if request.param == "openzfs-2.1" else "guest_23"
    found: Guest = request.getfixturevalue(name)
    return found


def test_resume_bookmarks_and_holds_through_the_restricted_key(
    faults: Faults, each_guest: Guest
) -> None:
    g = each_guest
    name = faults.zb.name
    fs, dst = f"{g.src_pool}/{name}", f"{g.dst_pool}/{name}"
    for each in (dst, fs):
        g.run("zfs", "destroy", "-r", each, check=False)
    g.run("zfs", "create", fs)
    try:
        resume_as_delegated_user(faults, g, fs, dst)
    finally:
        for each in (dst, f"{dst}-stolen", fs):
            g.shell(f"zfs receive -A {each} 2>/dev/null; zfs destroy -r {each}", check=False)
        g.shell(f"userdel -r {ENROLLED} 2>/dev/null", check=False)


def enroll_user(faults: Faults, g: Guest, pair: Pair) -> SshTarget:
    """``zettabee enroll --user`` for the pair, as an admin runs it (root's key): it makes
    the user, delegates a pull's permissions (bookmark with them: bookmark=yes) and
    writes the key's line; how the source is reached as that user."""
    key, known = faults.tmp / "pairkey" / "id_ed25519", faults.tmp / "pair_known_hosts"
    options = f"sshport={g.port},user={ENROLLED},sshkey={key},knownhosts={known},bookmark=yes"
    faults.zb.write_pairs(f"{pair.source}  {pair.destination}  {options}")
    fingerprint = sh("ssh-keygen", "-l", "-f", g.known_hosts).stdout.split()[1]
    done = faults.zb.run(
        "enroll", g.address, "--admin-key", g.key, "--user", ENROLLED,
        "--host-key-fingerprint", fingerprint, "--timeout", "60",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"create the user {ENROLLED}" in done.stdout, done.stdout
    fs = pair.source.fs
    assert f"zfs allow -u {ENROLLED} {PERMISSIONS} {fs}" in done.stdout, done.stdout
    assert f"  ok   source zfs on {g.address}: OpenZFS " in done.stdout, done.stdout
    line = g.run("cat", f"/home/{ENROLLED}/.ssh/authorized_keys").stdout
    assert f'--pair {pair.fingerprint} {fs}" ' in line, line
    return SshTarget(g.address, g.port, ENROLLED, str(key), str(known))


def resume_as_delegated_user(faults: Faults, g: Guest, fs: str, dst: str) -> None:
    root = SshTarget(g.address, g.port, g.user, g.key, g.known_hosts)
    pair = Pair(Endpoint(g.address, fs), Endpoint(g.address, dst), PairOptions(bookmark=True))
    fp = pair.fingerprint
    target = enroll_user(faults, g, pair)
    store = StateStore(faults.tmp / "engine-state", faults.tmp / "engine-run", faults.tmp / "log")
    store.ensure_dirs()
    hosts = EndHosts(target, root)
    row = faults.expect(
        "OpenZFS both ends: a source user made by zettabee enroll --user, behind "
        "zettabee-source, resume",
        "enrolled; initialize, an interrupted update resumed (send -nvP -t, send -t), "
        "update: pruned on both sides by the delegated destroy, holds both sides, bookmark "
        "of the base; a token of another snapshot refused (126)",
    )
    try:
        g.shell(f"head -c 4194304 /dev/urandom > /{fs}/random.bin")
        first = Replicator(store, hosts).initialize(pair)
        # An update whose stream breaks after 1 MB, as a lost link leaves it: the
        # destination keeps a resume token naming the pair's new snapshot.
        replica = parse_snapshot_name(first.snapshot)
        assert replica is not None and replica.rid is not None, first.snapshot
        interrupted = snapshot_name(fp, replica.rid, datetime.now(UTC))
        g.shell(
            f"head -c 8388608 /dev/urandom > /{fs}/more.bin && zfs snapshot {fs}@{interrupted} "
            f"&& zfs send -i @{first.snapshot} {fs}@{interrupted} | head -c 1048576 "
            f"| zfs receive -s {dst}",
            check=False,
        )
        token = g.run("zfs", "get", "-H", "-o", "value", "receive_resume_token", dst).stdout
        assert token.strip().startswith("1-"), token
        resumed = Replicator(store, hosts).update(pair)
        assert resumed.resumed == interrupted, resumed
        g.shell(f"head -c 1048576 /dev/urandom > /{fs}/last.bin")
        last = Replicator(store, hosts).update(pair)
    finally:
        hosts.close()
    uses = store.read_status(fp).extra["features"]["uses"]
    for feature in ("holds (source and destination)", "resumable receive", "size estimates"):
        assert feature in uses, uses
    assert "bookmarks" in uses, uses
    src_snaps, dst_snaps = guest_snapshots(g, fs), guest_snapshots(g, dst)
    assert src_snaps == [last.snapshot], src_snaps  # pruned by the delegated destroy
    assert dst_snaps == [last.snapshot], dst_snaps  # keep=1: the resumed one pruned too
    marks = [m for m in guest_snapshots(g, fs, "bookmark") if is_pair_snapshot(m, fp)]
    assert marks == [last.snapshot], marks  # the base bookmarked, the older one destroyed
    assert userrefs(g, f"{fs}@{last.snapshot}") == 1 and userrefs(g, f"{dst}@{last.snapshot}") == 1

    # A token of a snapshot that is not zettabee's: the delegation lets the user send it,
    # the forced command does not.
    g.shell(
        f"zfs snapshot {fs}@by-hand && zfs send {fs}@by-hand | head -c 1048576 "
        f"| zfs receive -s {dst}-stolen",
        check=False,
    )
    stolen = g.run("zfs", "get", "-H", "-o", "value", "receive_resume_token", f"{dst}-stolen")
    stolen_token = stolen.stdout.strip()
    assert stolen_token.startswith("1-"), stolen.stdout
    delegated = as_user(g, shlex.join(zfs.send_resume(stolen_token, estimate=True)), ENROLLED)
    assert delegated.returncode == 0, delegated.stderr
    refused = restricted(target, shlex.join(zfs.send_resume(stolen_token, estimate=True)))
    assert refused.returncode == 126 and "by-hand" in refused.stderr, refused.stderr
    same = g.run(
        "zfs",
        "get",
        "-Hp",
        "-o",
        "value",
        "guid",
        f"{fs}@{last.snapshot}",
        f"{dst}@{last.snapshot}",
    )
    guids = same.stdout.split()
    row.observed = (
        f"enrolled; initialize, resumed update ({resumed.resumed.rsplit('.', 1)[1]}), update: "
        f"as user {ENROLLED}, using {', '.join(uses)}; pruned to the base on both sides, "
        f"held there and bookmarked; token "
        f"of {fs}@by-hand: allowed by the delegation, refused by zettabee-source (126)"
    )
    row.data = INTACT if len(guids) == 2 and guids[0] == guids[1] else "DIFFERENT"
    assert row.data == INTACT


# -- a resume token is checked against what it names ----------------------------------------


def stream_begin(stream: bytes) -> tuple[str, int]:
    """The snapshot a send stream carries, from its first record (``DRR_BEGIN``: the
    record's type and payload length, then magic, version, creation time, type, flags,
    ``toguid`` at byte 40 and ``toname`` at 56): its name and guid."""
    assert len(stream) >= 312 and int.from_bytes(stream[:4], "little") == 0, stream[:16]
    toguid = int.from_bytes(stream[40:48], "little")
    return stream[56:312].split(b"\0", 1)[0].decode(), toguid


def test_a_resume_token_sends_only_the_snapshot_it_names(faults: Faults, guest: Guest) -> None:
    """A key behind zettabee-source (root's, as where ZFS cannot delegate, or a user's
    delegated on a parent) crafts a token: its own snapshot's name with another file
    system's guid. ``zfs send -t`` finds the snapshot by the guid, searching up the tree."""
    g = guest
    name = faults.zb.name
    fs, secret = f"{g.src_pool}/{name}", f"{g.src_pool}/{name}-secret"
    partial = f"{g.dst_pool}/{name}-partial"
    key = faults.tmp / "root_key"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "zettabee@backup1", "-f", str(key))
    line = f'restrict,command="/usr/local/bin/zettabee-source {fs}" {key.with_suffix(".pub").read_text().strip()}'
    try:
        _crafted_token(faults, g, fs, secret, partial, key, line)
    finally:
        g.shell(
            f"grep -vxF {shlex.quote(line)} /root/.ssh/authorized_keys > /root/.ssh/ak.new; "
            "mv /root/.ssh/ak.new /root/.ssh/authorized_keys",
            check=False,
        )
        for each in (partial, fs, secret):
            g.shell(f"zfs receive -A {each} 2>/dev/null; zfs destroy -r {each}", check=False)


def _crafted_token(
    faults: Faults, g: Guest, fs: str, secret: str, partial: str, key: Path, line: str
) -> None:
    for each in (partial, fs, secret):
        g.shell(f"zfs receive -A {each} 2>/dev/null; zfs destroy -r {each}", check=False)
    g.run("zfs", "create", fs)
    g.run("zfs", "create", secret)
    own = f"{fs}@{snapshot_name(ANY_FP, ANY_RID, datetime.now(UTC))}"
    g.shell(
        f"head -c 4194304 /dev/urandom > /{fs}/mine.bin && zfs snapshot {own} && "
        f"echo 'the payroll' > /{secret}/secret.txt && zfs snapshot {secret}@s"
    )
    secret_guid = int(g.run("zfs", "get", "-Hp", "-o", "value", "guid", f"{secret}@s").stdout)
    # A real token of the key's own snapshot: a receive cut after 1 MB.
    g.shell(f"zfs send {own} | head -c 1048576 | zfs receive -s {partial}", check=False)
    real = g.run("zfs", "get", "-H", "-o", "value", "receive_resume_token", partial).stdout.strip()
    fields = zfs.decode_resume_token(real)
    assert fields["toname"] == own, fields
    crafted = encode({**fields, "toguid": secret_guid})
    said = g.run("zfs", "send", "-nv", "-t", crafted, check=False)
    assert f"toguid = {secret_guid:#x}" in said.stdout, said  # zfs reads it as its own
    install_source_command(g)
    g.shell(f"printf '%s\\n' {shlex.quote(line)} >> /root/.ssh/authorized_keys")
    target = SshTarget(g.address, g.port, "root", str(key), g.known_hosts)
    row = faults.expect(
        "OpenZFS: a resume token of the key's own snapshot with another file system's guid "
        "(zfs send -t finds snapshots by guid)",
        "exit 126 'refused'; not a byte of the other file system sent; the real token still "
        "resumes: refused, logged",
    )
    started = g.run("date", "+%s").stdout.strip()
    sent = subprocess.run(
        target.ssh_client_argv(shlex.join(zfs.send_resume(crafted))),
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    err = sent.stderr.decode(errors="replace")
    carried = stream_begin(sent.stdout) if len(sent.stdout) >= 312 else None
    logged = g.shell(
        f"journalctl -q -o cat --since @{started} -t zettabee-source 2>/dev/null "
        "|| grep zettabee-source /var/log/auth.log",
        check=False,
    ).stdout.strip()
    # The key's real token still goes on with the key's own snapshot.
    resumed = subprocess.run(
        target.ssh_client_argv(shlex.join(zfs.send_resume(real))),
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    own_stream = stream_begin(resumed.stdout) if len(resumed.stdout) >= 312 else None
    row.observed = (
        f"crafted token: exit {sent.returncode}, "
        + (
            f"SENT {len(sent.stdout)} bytes of {carried[0]}"
            if carried
            else f"{len(sent.stdout)} bytes sent; says {err.strip()[:90]!r}"
        )
        + f"; auth log: {'a line' if 'refused' in logged else 'NOTHING'}"
        + f"; real token: exit {resumed.returncode}, {len(resumed.stdout)} bytes of "
        + (own_stream[0].rpartition("/")[2] if own_stream else "nothing")
        + (": refused, logged" if sent.returncode == 126 and "refused" in logged else "")
    )
    row.data = INTACT if carried is None else "OTHER FILE SYSTEM SENT"
    assert carried is None, f"the restricted key sent {carried}"
    assert sent.returncode == 126 and "zettabee-source: refused" in err, err
    assert "refused" in logged, logged
    assert resumed.returncode == 0 and own_stream == (own, fields["toguid"]), resumed.stderr
