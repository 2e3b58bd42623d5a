"""Lab hosts: a ZFS pool server (zfs-fuse on sparse files) and a source host in a netns.

Everything the lab creates is recorded in a JSON file under its root, so that a later
process (``python -m lab down``) removes exactly that, by pid and by name.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zettabee.state import pid_alive

ZFS_FUSE_PIDFILE = Path("/run/zettabee-lab-zfs-fuse.pid")
ZFS_FUSE_LOG = Path("/var/tmp/zettabee-lab-zfs-fuse.log")


def sh(
    *argv: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a lab command without a shell; failures carry the tool's own message."""
    proc = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def stop_pid(pid: int | None, wait: float = 10.0) -> None:
    """TERM, wait, then KILL: the process is gone when this returns."""
    if not pid_alive(pid):
        return
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.05)


def start_sshd(netns: str, passwd: Path, config: Path, log_path: Path, listen: str) -> int:
    """Start sshd with ``config`` in the network namespace ``netns`` and a mount namespace
    of its own, where /etc/passwd is ``passwd`` (the lab's root logs in to a plain shell);
    wait until it listens on ``listen`` (ADDRESS:PORT). Its pid."""
    Path("/run/sshd").mkdir(exist_ok=True)
    script = (
        f"mount --bind {shlex.quote(str(passwd))} /etc/passwd && "
        f"exec /usr/sbin/sshd -D -e -f {shlex.quote(str(config))}"
    )
    log = open(log_path, "ab")  # noqa: SIM115 - kept by the child
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netns}", "--",
         "unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    log.close()

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"lab: sshd exited: {log_path.read_text()[-800:]}")
        out = sh("nsenter", f"--net=/run/netns/{netns}", "ss", "-Hltn", check=False)
        return f"{listen} " in out.stdout

    try:
        wait_for(f"sshd to listen on {listen}", listening)
    except BaseException:
        stop_pid(proc.pid)
        raise
    return proc.pid


def wait_for(what: str, ready: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"lab: timed out after {timeout:.0f}s waiting for {what}")


class ZfsServer:
    """The machine's one zfs-fuse daemon; the lab starts it only if it is not running."""

    @staticmethod
    def running() -> bool:
        return sh("zpool", "list", "-H", "-o", "name", check=False).returncode == 0

    @classmethod
    def ensure(cls) -> int | None:
        """Start zfs-fuse when needed; return its pid if the lab started it."""
        if cls.running():
            return None
        if not shutil.which("zfs-fuse"):
            raise RuntimeError("lab: zfs-fuse is not installed (apt-get install zfs-fuse)")
        # Kept in the foreground under our own pid: the lab stops exactly what it started
        # (the daemonised form has refused to start again after a kill, silently).
        log = open(ZFS_FUSE_LOG, "ab")  # noqa: SIM115 - kept by the child
        proc = subprocess.Popen(
            ["zfs-fuse", "--no-daemon", "--pidfile", str(ZFS_FUSE_PIDFILE)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        wait_for("zfs-fuse to answer", cls.running)
        return proc.pid

    @staticmethod
    def pools() -> list[str]:
        proc = sh("zpool", "list", "-H", "-o", "name", check=False)
        return proc.stdout.split() if proc.returncode == 0 else []

    @staticmethod
    def create_pool(name: str, image: Path, mountpoint: Path, size: str) -> None:
        if name in ZfsServer.pools():
            ZfsServer.destroy_pool(name)
        image.parent.mkdir(parents=True, exist_ok=True)
        image.unlink(missing_ok=True)
        sh("truncate", "-s", size, str(image))
        sh("zpool", "create", "-f", "-m", str(mountpoint), name, str(image))

    @staticmethod
    def destroy_pool(name: str, mount_root: Path | None = None) -> None:
        if mount_root is not None:
            release_foreign_mounts(mount_root)
        for _ in range(50):
            proc = sh("zpool", "destroy", "-f", name, check=False)
            if proc.returncode == 0 or name not in ZfsServer.pools():
                return
            if "not connected" in proc.stderr:
                detach_stale_mounts(name)
            time.sleep(0.2)
        raise RuntimeError(f"lab: cannot destroy pool {name}: {proc.stderr.strip()}")


# zfs-fuse's fixed paths: its socket, its lock and its pool cache. A second daemon gets
# empty ones of its own, in a mount namespace of its own (SecondZfsServer).
ZFS_FUSE_PATHS = ("/run/zfs", "/run/lock/zfs", "/var/lib/zfs")


class SecondZfsServer:
    """A second ZFS on this machine: a zfs-fuse daemon of its own in a mount namespace of
    its own, with a pool of the name the machine's own daemon already serves.

    zfs-fuse keeps its socket, lock and pool cache at fixed paths; the namespace mounts
    empty ones over them before the daemon starts (and refuses to start if any is not
    empty: it never takes over the machine's daemon's socket), so every ``zfs`` and
    ``zpool`` run in the namespace (:meth:`argv`) talks to this daemon only, and sees its
    pools only. The namespace is a slave of this one: what is mounted here (the other
    daemon's file systems) reaches it, what it mounts stays there. What two backup
    servers with pools of one name need, on one machine."""

    def __init__(self, root: Path, pool: str, size: str = "256M") -> None:
        self.root = root
        self.pool = pool
        self.size = size
        self.mountpoint = root / "mnt" / pool
        self.image = root / f"{pool}.img"
        self.log = root / "zfs-fuse.log"
        self.pid: int | None = None

    @property
    def namespace(self) -> str:
        return f"/proc/{self.pid}/ns/mnt"

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run in the namespace, where this daemon is the ZFS (never here, where
        it would reach the machine's own daemon and its pool of the same name)."""
        if not self._daemon_in_namespace():
            raise RuntimeError(f"lab: the second zfs-fuse (pid {self.pid}) is not running")
        return ["nsenter", f"--mount={self.namespace}", "--", *argv]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(*argv), check=check)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        own = "; ".join(
            f'mkdir -p {d} && mount -t tmpfs -o mode=0700 zettabee-second {d} && [ -z "$(ls -A {d})" ]'
            for d in ZFS_FUSE_PATHS
        )
        script = f"set -e; {own}; exec zfs-fuse --no-daemon --no-kstat-mount"
        log = open(self.log, "ab")  # noqa: SIM115 - kept by the child
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.pid = proc.pid  # unshare and sh exec: this is the daemon's pid

        def answers() -> bool:
            """Once the daemon runs in the namespace: until unshare has made it, the
            child's namespace is this one, and its zpool would ask the machine's daemon."""
            if proc.poll() is not None:
                raise RuntimeError(
                    f"lab: the second zfs-fuse exited: {self.log.read_text()[-800:]}"
                )
            if not self._daemon_in_namespace():
                return False
            return self.run("zpool", "list", "-H", "-o", "name", check=False).returncode == 0

        try:
            wait_for("the second zfs-fuse to answer", answers)
            sh("truncate", "-s", self.size, str(self.image))
            self.run("zpool", "create", "-f", "-m", "none", self.pool, str(self.image))
            self.mountpoint.mkdir(parents=True, exist_ok=True)
            self.run("zfs", "set", f"mountpoint={self.mountpoint}", self.pool)
        except BaseException:
            self.stop()
            raise

    def _daemon_in_namespace(self) -> bool:
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
            theirs, ours = os.stat(self.namespace).st_ino, os.stat("/proc/self/ns/mnt").st_ino
        except OSError:
            return False
        return exe.endswith("/zfs-fuse") and theirs != ours

    def guid(self) -> str:
        """The pool's guid, as ``zpool get`` prints it (zfs-fuse's has no ``-H``)."""
        table = self.run("zpool", "get", "guid", self.pool).stdout.splitlines()
        return table[-1].split()[2]

    def stop(self) -> None:
        """The pool destroyed and the daemon stopped; its namespace, and every mount in it,
        goes with its last process."""
        if self._daemon_in_namespace():
            for _ in range(50):
                done = self.run("zpool", "destroy", "-f", self.pool, check=False)
                if done.returncode == 0 or "no such pool" in done.stderr:
                    break
                time.sleep(0.2)
        stop_pid(self.pid, wait=20)
        self.image.unlink(missing_ok=True)


def detach_stale_mounts(pool: str) -> None:
    """Lazily unmount the pool's file systems whose FUSE connection is gone ("Transport
    endpoint is not connected", left by a zfs-fuse that stopped under them): zpool
    destroy cannot unmount those itself."""
    for line in Path("/proc/mounts").read_text().splitlines():
        source, point, fstype, *_ = line.split()
        if fstype == "fuse.zfs" and (source == pool or source.startswith(f"{pool}/")):
            try:
                os.stat(point)
            except OSError:  # ENOTCONN: nobody serves it any more
                sh("umount", "-l", point, check=False)


def release_foreign_mounts(root: Path) -> None:
    """Detach ``root`` and the mounts below it from other mount namespaces that copied them.

    A process that unshares a private mount namespace while the lab is up (a guest image
    build, say) takes a copy of the lab's pool mounts; zfs-fuse then calls the pool busy
    until that process ends. Only the copies of this lab's own mounts are detached, lazily;
    nothing else in that namespace changes.
    """
    own = os.readlink("/proc/self/ns/mnt")
    prefix = str(root).rstrip("/") + "/"
    pinned: dict[str, tuple[int, set[str]]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            namespace = os.readlink(proc / "ns" / "mnt")
            if namespace == own or namespace in pinned:
                continue
            points = {
                point
                for point in (
                    line.split()[4] for line in (proc / "mountinfo").read_text().splitlines()
                )
                if point.startswith(prefix) or point == prefix[:-1]
            }
        except (OSError, IndexError):
            continue
        if points:
            pinned[namespace] = (int(proc.name), points)
    for pid, points in pinned.values():
        for point in sorted(points, key=len, reverse=True):
            sh("nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", "umount", "-l", point, check=False)


@dataclass
class SourceHost:
    """A remote host as zettabee sees it: an address, an SSH port, a key, a pool."""

    name: str
    address: str
    port: int
    user: str
    key: str
    known_hosts: str
    pool: str
    mountpoint: str
    control_path: str | None = None

    def ssh_argv(self, *command: str) -> list[str]:
        """OpenSSH client argv that runs ``command`` on the host (used by tests for set-up).

        With ``control_path`` the commands share one master connection: a handshake with
        the emulated guest costs a second or more. Should the host die under it, the
        master gives up after a minute without an answer to its keepalives, and the
        command on it fails, instead of waiting out TCP's retries (a quarter of an hour)."""
        mux = []
        if self.control_path:
            mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}",
                   "-o", "ControlPersist=300",
                   "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=6"]  # fmt: skip
        return [
            "ssh", "-i", self.key, "-p", str(self.port), *mux,
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            f"{self.user}@{self.address}", "--", *command,
        ]  # fmt: skip

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command on the host over real SSH; the remote shell sees it quoted once."""
        import shlex

        return sh(*self.ssh_argv(shlex.join(command)), check=check)


@dataclass
class NetnsSshHost:
    """A network namespace joined by a veth pair, running its own sshd."""

    netns: str
    veth: str
    local_address: str
    remote_address: str
    root: Path
    sshd_pid: int | None = None

    @property
    def peer(self) -> str:
        return self.veth[:-1] + "1"

    def up(self) -> None:
        self.up_network()
        self._keys()
        self._start_sshd()

    def up_network(self) -> None:
        """The namespace and its veth link only (the OpenZFS guest brings its own sshd)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.down_network()
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", self.peer)
        sh("ip", "link", "set", self.peer, "netns", self.netns)
        sh("ip", "addr", "add", f"{self.local_address}/30", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        ns = ["ip", "-n", self.netns]
        sh(*ns, "addr", "add", f"{self.remote_address}/30", "dev", self.peer)
        sh(*ns, "link", "set", self.peer, "up")
        sh(*ns, "link", "set", "lo", "up")

    def _keys(self) -> None:
        for name in ("host_ed25519", "client_ed25519"):
            key = self.root / name
            if not key.exists():
                sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"zettabee-lab-{name}",
                   "-f", str(key))  # fmt: skip
        os.chmod(self.root, 0o700)
        (self.root / "authorized_keys").write_text((self.root / "client_ed25519.pub").read_text())
        host_pub = (self.root / "host_ed25519.pub").read_text().split()
        (self.root / "known_hosts").write_text(
            f"{self.remote_address} {host_pub[0]} {host_pub[1]}\n"
        )
        # The lab host's root gets /bin/sh as login shell: a developer's heavy .bashrc
        # would otherwise run before every remote command (0.3 s each, measured).
        passwd = Path("/etc/passwd").read_text().splitlines()
        lines = [
            ":".join(f.split(":")[:6] + ["/bin/sh"]) if f.startswith("root:") else f for f in passwd
        ]
        (self.root / "passwd").write_text("\n".join(lines) + "\n")
        (self.root / "sshd_config").write_text(
            "\n".join(
                [
                    f"ListenAddress {self.remote_address}",
                    "Port 22",
                    f"HostKey {self.root / 'host_ed25519'}",
                    f"PidFile {self.root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PrintMotd no",
                    "AcceptEnv none",
                    "MaxSessions 100",
                    "MaxStartups 100:30:200",
                    "ClientAliveInterval 15",
                    "Subsystem sftp internal-sftp",
                    "LogLevel INFO",
                    "",
                ]
            )
        )

    def _start_sshd(self) -> None:
        self.sshd_pid = start_sshd(
            self.netns,
            self.root / "passwd",
            self.root / "sshd_config",
            self.root / "sshd.log",
            f"{self.remote_address}:22",
        )

    def down_network(self) -> None:
        if sh("ip", "link", "show", self.veth, check=False).returncode == 0:
            sh("ip", "link", "del", self.veth, check=False)
        if Path(f"/run/netns/{self.netns}").exists():
            sh("ip", "netns", "del", self.netns, check=False)

    def down(self) -> None:
        stop_pid(self.sshd_pid)
        self.sshd_pid = None
        self.down_network()


@dataclass
class LabRecord:
    """What a lab created, as saved on disk for the teardown."""

    name: str
    root: str
    zfs_fuse_pid: int | None = None
    sshd_pid: int | None = None
    netns: str = ""
    veth: str = ""
    pools: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> LabRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
