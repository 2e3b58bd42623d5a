"""Least privilege on a real OpenZFS source: a non-root user, ``zfs allow``, zettabee-source.

zfs-fuse has no ``zfs allow``; the OpenZFS guest has. There an ordinary user ``zettabee``
gets exactly the permissions a pull uses on one file system, logs in with a key whose
forced command is ``zettabee-source``, and serves initialize, updates (with the pruning of
the source's old snapshots), and setup. What the forced command would let through but
the delegation does not cover, ZFS itself refuses to that user.

The destination is the lab's zfs-fuse pool, which cannot receive the streams of pools
with features past version 23 ("stream has unsupported feature"): the source file system
lives in a pool of that version, made in the guest for the test. Delegation is the same
OpenZFS code whatever the pool's version.

Needs the guest (``lab.guest``, its session fixture ``guest``); collected only where the
lab has it (see this directory's conftest).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.faults.conftest import INTACT, Faults, snapshots, zget
from zettabee.host import SshTarget

pytestmark = pytest.mark.integration

USER = "zettabee"
POOL = "gv23"  # see the module's docstring
PERMISSIONS = "send,snapshot,destroy,mount,hold,release"
PACKAGE = Path(__file__).resolve().parents[3] / "zettabee"

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


def install_source_command(guest: Any) -> None:
    """zettabee-source in the guest: the package's modules (stdlib only on this path)."""
    files = {p.name: p.read_text() for p in PACKAGE.glob("*.py")}
    guest.run("python3", "-c", INSTALL, input=json.dumps(files))


def test_non_root_source_with_zfs_allow_and_the_restricted_key(faults: Faults, guest: Any) -> None:
    g = guest  # lab.guest.Guest
    zb = faults.zb
    g.shell(
        f"zpool list {POOL} >/dev/null 2>&1 || {{ truncate -s 512M /var/tmp/{POOL}.img && "
        f"zpool create -o version=23 -O mountpoint=/{POOL} {POOL} /var/tmp/{POOL}.img; }}"
    )
    try:
        pull_as_delegated_user(faults, g, f"{POOL}/{zb.name}")
    finally:
        g.shell(f"zpool destroy -f {POOL}; rm -f /var/tmp/{POOL}.img", check=False)


def pull_as_delegated_user(faults: Faults, g: Any, fs: str) -> None:
    zb = faults.zb
    other = f"{fs}-other"
    for name in (fs, other):
        g.run("zfs", "destroy", "-r", name, check=False)
        g.run("zfs", "create", name)
    g.shell(f"head -c 4194304 /dev/urandom > /{fs}/random.bin && zfs snapshot {other}@s")
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
    options = f"user={USER},sshkey={g.key},knownhosts={g.known_hosts}"
    zb.write_pairs(f"{g.address}:{fs}  {faults.lab.dest_address}:{zb.dst_fs()}  {options}")
    row = faults.expect(
        "OpenZFS: non-root source user (zfs allow) behind zettabee-source",
        "setup, initialize, updates, pruning work as that user; escapes exit 126; ZFS "
        "denies it everything outside the delegation",
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
        steps.append(faults.run("zettabee", "update", zb.dst_fs()))
    setup = faults.run("zettabee", "setup", zb.dst_fs())
    assert [s.code for s in steps] == [0, 0, 0], [s.stderr for s in steps]
    assert setup.code == 0, setup.stdout + setup.stderr
    assert same_snapshot()
    left = g.run("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", fs).stdout.split()
    assert len(left) == 1, left  # the delegated destroy pruned the older snapshots

    target = SshTarget(g.address, g.port, USER, g.key, g.known_hosts)
    escapes = [
        f"zfs destroy -r {fs}",
        f"zfs destroy {fs}",
        f"zfs send {other}@s",
        "id",
        f"zfs allow {fs}",
    ]
    refused = 0
    for command in escapes:
        proc = subprocess.run(target.ssh_client_argv(command), capture_output=True, text=True)
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
        proc = g.run("su", "-s", "/bin/sh", USER, "-c", command, check=False)
        assert proc.returncode != 0 and "permission denied" in proc.stderr.lower(), (
            command,
            proc.stderr,
        )
        denied += 1
    row.observed = (
        f"setup, initialize, 2 updates: exit 0 as user {USER}; source pruned to 1 snapshot; "
        f"{refused}/{len(escapes)} escapes refused (126); {denied} commands outside the "
        "delegation denied by ZFS"
    )
    row.data = INTACT if same_snapshot() else "DIFFERENT"
    assert row.data == INTACT
