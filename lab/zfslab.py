"""The two-host ZFS lab: a source host reached over SSH, a destination on this machine.

One ``ZfsLab`` per name: the demo uses ``demo`` (pools ``srcpool`` and ``dstpool``), the
tests ``test`` (pools ``tsrcpool`` and ``tdstpool``), so both can be up at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lab.hosts import LabRecord, NetnsSshHost, SourceHost, ZfsServer, sh, stop_pid

LAB_ROOT = Path(os.environ.get("ZETTABEE_LAB_ROOT", "/var/tmp/zettabee-lab"))


@dataclass(frozen=True)
class LabLayout:
    name: str
    src_pool: str
    dst_pool: str
    netns: str
    veth: str
    subnet: int  # third octet of 10.77.X.0/30

    @property
    def dest_address(self) -> str:
        return f"10.77.{self.subnet}.1"

    @property
    def source_address(self) -> str:
        return f"10.77.{self.subnet}.2"


LAYOUTS = {
    "demo": LabLayout("demo", "srcpool", "dstpool", "zbdemo", "zbdemo0", 1),
    "test": LabLayout("test", "tsrcpool", "tdstpool", "zbtest", "zbtest0", 2),
}
# Spare labs, so that several working trees can run their suites at once
# (ZETTABEE_LAB=w1 make test); every lab shares the one zfs-fuse daemon.
for _n in range(1, 7):
    LAYOUTS[f"w{_n}"] = LabLayout(
        f"w{_n}", f"w{_n}src", f"w{_n}dst", f"zbw{_n}", f"zbw{_n}v", 10 + _n
    )


def test_lab_name() -> str:
    """The lab the test suite and the benchmarks use: ``test`` unless ZETTABEE_LAB names
    another one."""
    name = os.environ.get("ZETTABEE_LAB", "test")
    if name not in LAYOUTS:
        raise RuntimeError(f"ZETTABEE_LAB={name!r}: not a lab name ({', '.join(sorted(LAYOUTS))})")
    return name


@contextlib.contextmanager
def hold(lock: Path, waiting: str) -> Iterator[None]:
    """An flock on ``lock`` for as long as the block runs; the kernel drops it if the holder
    dies. A second user prints ``waiting`` (so a stalled run says why) and waits its turn."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class ZfsLab:
    """Bring up and tear down one lab; safe to call ``up`` over a half-dead earlier lab."""

    def __init__(self, name: str = "demo", pool_size: str = "2G") -> None:
        self.layout = LAYOUTS[name]
        self.root = LAB_ROOT / name
        self.pool_size = pool_size
        self.record_path = self.root / "lab.json"

    @property
    def source(self) -> SourceHost:
        ssh = self.root / "ssh"
        return SourceHost(
            name=f"{self.layout.name}-source",
            address=self.layout.source_address,
            port=22,
            user="root",
            key=str(ssh / "client_ed25519"),
            known_hosts=str(ssh / "known_hosts"),
            pool=self.layout.src_pool,
            mountpoint=str(self.root / "mnt" / self.layout.src_pool),
        )

    @property
    def dest_address(self) -> str:
        return self.layout.dest_address

    @property
    def dst_pool(self) -> str:
        return self.layout.dst_pool

    @property
    def dst_mountpoint(self) -> Path:
        return self.root / "mnt" / self.layout.dst_pool

    def _host(self, record: LabRecord | None = None) -> NetnsSshHost:
        return NetnsSshHost(
            netns=self.layout.netns,
            veth=self.layout.veth,
            local_address=self.layout.dest_address,
            remote_address=self.layout.source_address,
            root=self.root / "ssh",
            sshd_pid=record.sshd_pid if record else None,
        )

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lab for a whole test session or benchmark: a second user waits here
        instead of tearing the lab down under the first one's feet."""
        name = self.layout.name
        with hold(LAB_ROOT / f"{name}.lock", f"lab {name}: in use by another run, waiting"):
            yield

    def is_up(self) -> bool:
        record = LabRecord.load(self.record_path)
        if record is None:
            return False
        from zettabee.state import pid_alive

        pools = ZfsServer.pools()
        return pid_alive(record.sshd_pid) and all(p in pools for p in record.pools)

    def up(self) -> None:
        self.down()
        for tool in ("zfs-fuse", "sshd", "ssh", "mbuffer", "nsenter", "ip"):
            if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
                raise RuntimeError(f"lab: {tool} is missing; run `make deps` first")
        self.root.mkdir(parents=True, exist_ok=True)
        record = LabRecord(name=self.layout.name, root=str(self.root))
        record.zfs_fuse_pid = ZfsServer.ensure()
        record.save(self.record_path)
        self._shared_mount_root()
        for pool in (self.layout.src_pool, self.layout.dst_pool):
            ZfsServer.create_pool(
                pool, self.root / "pools" / f"{pool}.img", self.root / "mnt" / pool, self.pool_size
            )
            record.pools.append(pool)
            record.save(self.record_path)
        host = self._host()
        record.netns, record.veth = host.netns, host.veth
        record.save(self.record_path)
        host.up()
        record.sshd_pid = host.sshd_pid
        record.save(self.record_path)
        # Prove the path works before anyone relies on it.
        self.source.run("zpool", "list", "-H", "-o", "name", self.layout.src_pool)

    def down(self) -> None:
        """Remove exactly what this lab created; leave zfs-fuse up if others still use it."""
        record = LabRecord.load(self.record_path)
        host = self._host(record)
        host.down()
        pools = ZfsServer.pools()
        for pool in (self.layout.src_pool, self.layout.dst_pool):
            if pool in pools:
                ZfsServer.destroy_pool(pool, self.root / "mnt")
        if record and record.zfs_fuse_pid:
            if not ZfsServer.pools():
                stop_pid(record.zfs_fuse_pid, wait=20)
            else:
                self._hand_over_zfs_fuse(record.zfs_fuse_pid)
        mnt = self.root / "mnt"
        while sh("mountpoint", "-q", str(mnt), check=False).returncode == 0:
            sh("umount", "-l", str(mnt), check=False)
        for leftover in ("pools", "mnt"):
            shutil.rmtree(self.root / leftover, ignore_errors=True)
        self.record_path.unlink(missing_ok=True)

    def _shared_mount_root(self) -> None:
        """The pools mount below a shared bind mount, so that mounts zfs-fuse makes later
        reach the source host's sshd (its mount namespace is a slave of this one) and
        unmounts leave nothing pinned there."""
        mnt = self.root / "mnt"
        mnt.mkdir(parents=True, exist_ok=True)
        if sh("mountpoint", "-q", str(mnt), check=False).returncode != 0:
            sh("mount", "--bind", str(mnt), str(mnt))
        sh("mount", "--make-shared", str(mnt))

    def _hand_over_zfs_fuse(self, pid: int) -> None:
        """Another lab still has pools: the last one down stops the daemon."""
        for other in LAYOUTS:
            path = LAB_ROOT / other / "lab.json"
            rec = LabRecord.load(path)
            if rec and other != self.layout.name:
                rec.zfs_fuse_pid = pid
                rec.save(path)
                return

    @staticmethod
    def checksum_tree(top: Path) -> dict[str, str]:
        """SHA-256 of every regular file below ``top``, by relative path."""
        import hashlib

        sums: dict[str, str] = {}
        for dirpath, _dirs, files in os.walk(top):
            for fname in files:
                path = Path(dirpath) / fname
                if path.is_symlink() or not path.is_file():
                    continue
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        digest.update(chunk)
                sums[str(path.relative_to(top))] = digest.hexdigest()
        return sums


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lab", description="zettabee's test lab")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--name", default="demo", choices=sorted(LAYOUTS))
    args = parser.parse_args(argv)
    lab = ZfsLab(args.name)
    if args.action == "up":
        lab.up()
        print(f"lab {args.name} up: source {lab.source.address} pool {lab.source.pool}")
    elif args.action == "down":
        lab.down()
        print(f"lab {args.name} down")
    else:
        print("up" if lab.is_up() else "down")
        print(sh("zpool", "list", check=False).stdout, end="")
    return 0
