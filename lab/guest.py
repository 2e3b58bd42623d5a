"""The OpenZFS lab guest: Debian 12 with OpenZFS 2.1 under QEMU, a remote host for zettabee.

zfs-fuse, the lab's other back end, is real ZFS but pool version 23; users run OpenZFS
2.x, whose holds, bookmarks, resumable receives and size estimates only this guest has.

From Python::

    guest = Guest()            # the lab named by ZETTABEE_LAB (default "test")
    guest.build()              # cached in /var/tmp/zettabee-lab/guest/<recipe hash>/
    guest.up()                 # boots, waits for SSH, creates the pools gsrc and gdst
    guest.run("zfs", "list")   # argv over SSH, quoted once; a CompletedProcess
    guest.shell("zfs list | wc -l")
    guest.address, guest.port, guest.user, guest.key, guest.known_hosts
    guest.src_pool, guest.dst_pool; guest.source / guest.dest (SourceHost views)
    guest.down()
    with guest.held(): ...     # one test session at a time per lab

The main topology, as users run zettabee: the guest's root namespace is the backup host,
with zettabee installed from its Debian package and the destination pool ``gdst`` local;
a network namespace ``zbsrc`` inside the guest, joined by a veth pair (``10.78.0.1`` on
the backup host's side, ``10.78.0.2`` on the source's), runs an sshd of its own with its
own host key and is the source host, with the pool ``gsrc``::

    guest = Guest(zfs="2.3", share=Path("/tmp/pytest-of-root"))  # 9p, at the same path
    guest.up()
    guest.start_source_host()
    guest.install_package(Path("dist/zettabee_0.1.0_all.deb"))
    guest.netns_source         # the source host as zettabee in the guest reaches it

From the shell: ``python -m lab.guest build|up|down|status|clean|ssh [COMMAND...]``
(``--name`` picks the lab, as ZETTABEE_LAB does).

Where it lives: QEMU runs inside a network namespace of its own, joined to this machine by
a veth pair like the zfs-fuse lab's source host. The guest's network card is a tap device
in that namespace (QEMU's own: it goes with QEMU), and the namespace's kernel forwards
only the guest's SSH port (nftables DNAT from ``10.77.<100+n>.2:22``); the guest starts
no connection of its own. zettabee treats every address of this machine (127.0.0.1
included) as local, so a forward on the loopback could not stand for a remote host; an
address behind the veth can, just like a real one. QEMU's user-mode network is not used:
the libslirp of Debian 12 (4.7.0) aborted QEMU ("soread: Assertion `buf_len != 0'
failed") during a throttled transfer into the guest, taking the guest down mid-run.

The image is built by ``lab/guest-build.sh`` from Debian's registries alone and cached
under a hash of that script: editing the recipe is what triggers a rebuild (about eight
minutes on two cores, most of it the zfs-dkms compile). The root disk is attached with
``snapshot=on``, so a run never changes the cached image; the two pool disks are fresh
sparse files on every ``up``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import lzma
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lab.hosts import NetnsSshHost, SourceHost, sh, stop_pid
from lab.nscad import NscaDaemon
from lab.zfslab import LAB_ROOT, LAYOUTS, hold, test_lab_name
from zettabee.state import pid_alive

GUEST_CACHE = Path(os.environ.get("ZETTABEE_GUEST_CACHE", "/var/tmp/zettabee-lab/guest"))
BUILD_SCRIPT = Path(__file__).resolve().with_name("guest-build.sh")
BOOT_TIMEOUT = 600.0
# panic=-1: a kernel that panics restarts at once, and -no-reboot makes QEMU exit then,
# so that a boot that panicked is seen (and booted again) instead of waited for.
KERNEL_CMDLINE = "console=ttyS0 root=/dev/vda rw quiet net.ifnames=0 mitigations=off panic=-1"
BOOT_ATTEMPTS = 3
# The address lab/guest-build.sh gives the guest, and its gateway: the namespace's end of
# the tap device QEMU attaches the guest's network card to.
GUEST_ADDRESS = "10.0.2.15"
GUEST_GATEWAY = "10.0.2.2"
TAP = "zbtap0"
# The main topology inside the guest: the source host's network namespace and the
# addresses of the veth pair that joins it to the backup host (the guest's own namespace).
SOURCE_NETNS = "zbsrc"
BACKUP_ADDRESS = "10.78.0.1"
SOURCE_ADDRESS = "10.78.0.2"
SOURCE_KEYS = "/root/zbsrc"  # the source host's sshd files and the backup host's client key
SHARE_TAG = "zbshare"


class GuestError(RuntimeError):
    """The guest could not be built, booted or reached; the message says where to look."""


# The OpenZFS versions the lab offers, each the one a Debian release ships in contrib.
SUITES = {"2.1": "bookworm", "2.3": "trixie"}


def recipe_key(zfs: str = "2.1") -> str:
    """The cache key: a hash of the build recipe and the Debian suite it builds."""
    recipe = BUILD_SCRIPT.read_bytes() + SUITES[zfs].encode()
    return f"{SUITES[zfs]}-{hashlib.sha256(recipe).hexdigest()[:16]}"


def image_dir(zfs: str = "2.1") -> Path:
    return GUEST_CACHE / recipe_key(zfs)


@dataclass
class GuestRecord:
    """What ``up`` started, saved so that a later process can stop exactly that."""

    lab: str
    qemu_pid: int | None = None
    boot_seconds: float | None = None
    image: str = ""


class Guest:
    src_pool = "gsrc"
    dst_pool = "gdst"
    user = "root"
    port = 22

    def __init__(
        self,
        lab: str | None = None,
        memory_mb: int = 2048,
        pool_size: str = "3G",
        zfs: str = "2.1",
        scratch: bool = False,
        share: Path | None = None,
    ) -> None:
        """``scratch``: a second guest of this version, apart from the lab's shared one
        (a namespace, subnet, runtime directory and lock of its own), for a test that
        changes what the guest has installed; it boots beside the shared guest a test
        session may hold."""
        self.lab = lab or test_lab_name()
        self.zfs = zfs
        self.suffix = "-scratch" if scratch else ""
        self.share = share  # a directory of this machine the guest sees at the same path
        layout = LAYOUTS[self.lab]
        # one namespace and subnet per guest, so that every guest can be up at once
        second = list(SUITES).index(zfs)
        self.subnet = (200 + 25 * second if scratch else 100 + 50 * second) + layout.subnet
        self.netns = f"{layout.netns}{('pq' if scratch else 'gh')[second]}"
        self.memory_mb = memory_mb
        self.pool_size = pool_size
        self.image = image_dir(zfs)
        name = "guest" if zfs == "2.1" else f"guest-{zfs}"
        self.runtime = LAB_ROOT / self.lab / f"{name}{self.suffix}"
        self.record_path = self.runtime / "guest.json"

    # where and how to reach it ----------------------------------------------------------
    @property
    def address(self) -> str:
        return f"10.77.{self.subnet}.2"

    @property
    def key(self) -> str:
        return str(self.image / "client_ed25519")

    @property
    def known_hosts(self) -> str:
        return str(self.runtime / "known_hosts")

    @property
    def control_path(self) -> str:
        return str(self.runtime / "ssh-mux")

    def host(self, pool: str) -> SourceHost:
        return SourceHost(
            name=f"{self.lab}-guest",
            address=self.address,
            port=self.port,
            user=self.user,
            key=self.key,
            known_hosts=self.known_hosts,
            pool=pool,
            mountpoint=f"/{pool}",
            control_path=self.control_path,
        )

    @property
    def source(self) -> SourceHost:
        return self.host(self.src_pool)

    @property
    def netns_source(self) -> GuestNetnsSource:
        """The source host of the main topology, as zettabee in the guest reaches it (its
        address, the client key and known_hosts file in the guest); commands a test runs
        there go through the guest's SSH (one kernel: the pools are the same)."""
        return GuestNetnsSource(
            name=f"{self.lab}-guest-source",
            address=SOURCE_ADDRESS,
            port=22,
            user="root",
            key=f"{SOURCE_KEYS}/client_ed25519",
            known_hosts=f"{SOURCE_KEYS}/known_hosts",
            pool=self.src_pool,
            mountpoint=f"/{self.src_pool}",
            via=self.source,
        )

    @property
    def dest(self) -> SourceHost:
        return self.host(self.dst_pool)

    def run(
        self, *argv: str, check: bool = True, input: str | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the guest as root; the remote shell sees it quoted once."""
        return self.shell(shlex.join(argv), check=check, input=input, timeout=timeout)

    def shell(
        self, script: str, check: bool = True, input: str | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command line in the guest (the caller quotes it)."""
        argv = self.source.ssh_argv(script)
        proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            gone = self.gone() if proc.returncode == 255 else ""
            raise GuestError(
                f"guest: {script}: exit {proc.returncode}: {proc.stderr.strip()}"
                + (f"\n{gone}" if gone else "")
            )
        return proc

    def meta(self) -> dict[str, object]:
        """What the build recorded: kernel, zfs version, build seconds."""
        return dict(json.loads((self.image / "meta.json").read_text()))

    # build ------------------------------------------------------------------------------
    def built(self) -> bool:
        return (self.image / "meta.json").exists()

    def build(self, quiet: bool = False) -> Path:
        """Build the image unless the cache has it for this recipe; return its directory.

        Builds are serialised machine-wide: a second lab waits for the first build and
        then uses its result."""
        if self.built():
            return self.image
        if os.geteuid() != 0:
            raise GuestError("guest: building the image needs root (debootstrap, chroot)")
        for tool in ("debootstrap", "qemu-system-x86_64", "mkfs.ext4", "unshare", "chroot"):
            if not shutil.which(tool):
                raise GuestError(f"guest: {tool} is missing; run `make deps` first")
        waiting = "guest: another process is building the image, waiting"
        with hold(GUEST_CACHE / "build.lock", waiting):
            if self.built():
                return self.image
            return self._build_locked(quiet)

    def _build_locked(self, quiet: bool) -> Path:
        partial = self.image.with_name(self.image.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        log_path = self.image.with_name(self.image.name + ".build.log")
        if not quiet:
            print(
                f"guest: building the OpenZFS {self.zfs} image (about 8 minutes; log {log_path})",
                file=sys.stderr,
                flush=True,
            )
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.run(
                [str(BUILD_SCRIPT), str(partial), SUITES[self.zfs]], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise GuestError(
                f"guest: build failed (exit {proc.returncode}); the end of {log_path}:\n"
                + "\n".join(tail)
            )
        meta = json.loads((partial / "meta.json").read_text())
        meta["kernel_file"] = "vmlinuz"
        if extract_vmlinux(partial / "vmlinuz", partial / "vmlinux"):
            meta["kernel_file"] = "vmlinux"
        meta["build_seconds"] = round(time.monotonic() - started, 1)
        meta["recipe"] = self.image.name
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        partial.rename(self.image)
        shutil.move(str(log_path), str(self.image / "build.log"))
        if not quiet:
            print(f"guest: built in {meta['build_seconds']:.0f} s", file=sys.stderr, flush=True)
        return self.image

    # run --------------------------------------------------------------------------------
    def _net(self) -> NetnsSshHost:
        return NetnsSshHost(
            netns=self.netns,
            veth=f"{self.netns}0",
            local_address=f"10.77.{self.subnet}.1",
            remote_address=self.address,
            root=self.runtime,
        )

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold this lab's guest for a whole test session: a second session waits here
        instead of rebooting the guest under the first one."""
        lock = LAB_ROOT / f"{self.lab}.guest-{self.zfs}{self.suffix}.lock"
        with hold(lock, f"guest {self.lab}: in use by another run, waiting"):
            yield

    def gone(self) -> str:
        """Why SSH cannot reach the guest when its QEMU has exited (the end of its console
        says how), or "" while QEMU runs: a test that lost the guest says so."""
        record = self._record()
        if record is None or pid_alive(record.qemu_pid):
            return ""
        console = self.runtime / "console.log"
        return f"guest: QEMU (pid {record.qemu_pid}) has exited; the end of {console}:\n{_tail(console)}"

    def is_up(self) -> bool:
        record = self._record()
        return record is not None and pid_alive(record.qemu_pid)

    def _record(self) -> GuestRecord | None:
        try:
            return GuestRecord(**json.loads(self.record_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _save(self, record: GuestRecord) -> None:
        self.record_path.write_text(json.dumps(asdict(record), indent=2) + "\n")

    def up(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Boot the guest with two empty pools; return the seconds from start to SSH.

        Under emulation the 6.12 kernel of Debian 13 panicked early in a boot now and then
        ("Oops: int3" in sched_clock_cpu, a text-patching race of multi-threaded TCG): a
        boot that panics is tried again, up to BOOT_ATTEMPTS in all."""
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                return self._up(timeout)
            except GuestError as exc:
                console = self.runtime / "console.log"
                if attempt == BOOT_ATTEMPTS or "Kernel panic" not in _tail(console, 200):
                    raise
                print(f"guest: the kernel panicked while booting, booting again: {exc}",
                      file=sys.stderr, flush=True)  # fmt: skip
                shutil.copy(console, self.runtime / f"console-panic-{attempt}.log")
        raise AssertionError("unreachable")

    def _up(self, timeout: float) -> float:
        self.build()
        self.down()
        self.runtime.mkdir(parents=True, exist_ok=True)
        os.chmod(self.runtime, 0o700)
        record = GuestRecord(lab=self.lab, image=str(self.image))
        self._save(record)
        self._net().up_network()
        self._forward_ssh()
        host_key = (self.image / "host_ed25519.pub").read_text().split()
        Path(self.known_hosts).write_text(f"{self.address} {host_key[0]} {host_key[1]}\n")
        disks = []
        for pool in (self.src_pool, self.dst_pool):
            disk = self.runtime / f"{pool}.img"
            disk.unlink(missing_ok=True)
            sh("truncate", "-s", self.pool_size, str(disk))
            disks.append((pool, disk))
        console = self.runtime / "console.log"
        started = time.monotonic()
        with open(console, "wb") as out:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", "--", *self.qemu_argv(disks)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        record.qemu_pid = proc.pid
        self._save(record)
        self._gateway_on_tap(proc, console)
        self._wait_for_ssh(proc, console, started, timeout)
        record.boot_seconds = round(time.monotonic() - started, 1)
        self._save(record)
        self.shell("udevadm settle")
        for pool, _disk in disks:
            self.run("zpool", "create", "-f", "-o", "cachefile=none", "-O", f"mountpoint=/{pool}",
                     pool, f"/dev/disk/by-id/virtio-{pool}")  # fmt: skip
        if self.share is not None:
            where = shlex.quote(str(self.share))
            self.shell(f"mkdir -p {where} && mount -t 9p -o trans=virtio,version=9p2000.L,"
                       f"msize=524288 {SHARE_TAG} {where}")  # fmt: skip
        return record.boot_seconds

    def start_source_host(self) -> None:
        """The main topology's source host: the namespace ``zbsrc`` in the guest, its veth
        pair, its own sshd with its own host key; the backup host's client key and
        known_hosts in SOURCE_KEYS. Entered with nsenter --net (one mount namespace: a
        dataset the source's sshd sees is never pinned by a private copy of the mounts)."""
        self.shell(_SOURCE_HOST_SCRIPT.format(
            netns=SOURCE_NETNS, backup=BACKUP_ADDRESS, source=SOURCE_ADDRESS, keys=SOURCE_KEYS,
        ))  # fmt: skip

    def install_package(self, deb: Path) -> str:
        """Install zettabee's Debian package in the guest as an admin does (``dpkg -i``;
        its dependencies are in the image); the version installed."""
        argv = self.source.ssh_argv("cat >/tmp/zettabee.deb && dpkg -i /tmp/zettabee.deb "
                                    ">/tmp/zettabee-dpkg.log 2>&1 || { cat /tmp/zettabee-dpkg.log"
                                    " >&2; exit 1; }")  # fmt: skip
        proc = subprocess.run(argv, input=deb.read_bytes(), capture_output=True, timeout=600)
        if proc.returncode != 0:
            raise GuestError(
                f"guest: dpkg -i {deb.name}: exit {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()[-2000:]}"
            )
        return self.run("dpkg-query", "-W", "-f", "${Version}", "zettabee").stdout

    def _forward_ssh(self) -> None:
        """The namespace forwards the SSH port to the address the image gives the guest,
        and nothing else: the guest starts no connection."""
        inside = ["ip", "netns", "exec", self.netns]
        sh(*inside, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        rules = f"""
table ip zettabee_guest {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {self.address} tcp dport {self.port} dnat to {GUEST_ADDRESS}:22
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct status dnat accept
    }}
}}
"""
        sh(*inside, "nft", "-f", "-", input=rules)

    def _gateway_on_tap(self, proc: subprocess.Popen[bytes], console: Path) -> None:
        """The guest's gateway on the tap device QEMU made. QEMU makes it, not this lab, so
        that it goes when QEMU goes: a guest lost mid-run then answers "network is
        unreachable" at once, where a tap left behind would let each connection wait for
        its timeout."""
        ns = ["ip", "-n", self.netns]
        deadline = time.monotonic() + 60
        while sh(*ns, "link", "show", TAP, check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise GuestError(
                    f"guest: QEMU made no {TAP} in {self.netns}; the end of {console}:\n"
                    f"{_tail(console)}"
                )
            time.sleep(0.05)
        sh(*ns, "addr", "add", f"{GUEST_GATEWAY}/24", "dev", TAP)
        sh(*ns, "link", "set", TAP, "up")

    def qemu_argv(self, disks: list[tuple[str, Path]]) -> list[str]:
        meta = self.meta()
        kernel = self.image / str(meta.get("kernel_file", "vmlinuz"))
        argv = [
            "qemu-system-x86_64", "-name", f"zettabee-guest-{self.lab}-{self.zfs}{self.suffix}",
            "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-smp", "2", "-m", str(self.memory_mb),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-monitor", "none",
            "-kernel", str(kernel), "-initrd", str(self.image / "initrd.img"),
            "-append", KERNEL_CMDLINE,
            "-drive", f"file={self.image / 'rootfs.img'},format=raw,if=none,id=root,snapshot=on",
            "-device", "virtio-blk-pci,drive=root",
        ]  # fmt: skip
        for pool, disk in disks:
            argv += [
                "-drive", f"file={disk},format=raw,if=none,id={pool},cache=unsafe,discard=unmap",
                "-device", f"virtio-blk-pci,drive={pool},serial={pool}",
            ]  # fmt: skip
        if self.share is not None:
            argv += ["-virtfs", f"local,path={self.share},mount_tag={SHARE_TAG},"
                     "security_model=passthrough,id=share"]  # fmt: skip
        argv += [
            "-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        return argv

    def _wait_for_ssh(
        self, proc: subprocess.Popen[bytes], console: Path, started: float, timeout: float
    ) -> None:
        while True:
            if proc.poll() is not None:
                raise GuestError(
                    f"guest: qemu exited ({proc.returncode}) before SSH answered; "
                    f"the end of {console}:\n{_tail(console)}"
                )
            probe = subprocess.run(self.source.ssh_argv("true"), capture_output=True, timeout=60)
            if probe.returncode == 0:
                return
            if time.monotonic() - started > timeout:
                raise GuestError(
                    f"guest: no SSH after {timeout:.0f} s; the end of {console}:\n{_tail(console)}"
                )
            time.sleep(1)

    def down(self) -> None:
        """Stop exactly the QEMU this lab started and remove its network and disks."""
        record = self._record()
        if Path(self.control_path).exists():
            sh("ssh", "-o", f"ControlPath={self.control_path}", "-O", "exit", self.address,
               check=False)  # fmt: skip
        if record is not None:
            stop_pid(record.qemu_pid, wait=10)
        self._net().down_network()
        if self.runtime.exists():
            for leftover in self.runtime.iterdir():
                if not leftover.name.startswith("console"):
                    leftover.unlink(missing_ok=True)


@dataclass
class GuestNetnsSource(SourceHost):
    """The source host in the guest's namespace ``zbsrc``: what zettabee there is told
    (address, key, known_hosts), and ``via``, the guest's own SSH, for the test's set-up."""

    via: SourceHost | None = None

    def ssh_argv(self, *command: str) -> list[str]:
        assert self.via is not None
        return self.via.ssh_argv(*command)


_SOURCE_HOST_SCRIPT = """set -e
ip netns add {netns}
ip link add {netns}0 type veth peer name {netns}1
ip link set {netns}1 netns {netns}
ip addr add {backup}/30 dev {netns}0
ip link set {netns}0 up
ip -n {netns} addr add {source}/30 dev {netns}1
ip -n {netns} link set {netns}1 up
ip -n {netns} link set lo up
mkdir -p -m 700 {keys}
ssh-keygen -q -t ed25519 -N '' -C zbsrc -f {keys}/host_ed25519
ssh-keygen -q -t ed25519 -N '' -C zettabee -f {keys}/client_ed25519
cp {keys}/client_ed25519.pub {keys}/authorized_keys
echo "{source} $(cut -d' ' -f1,2 {keys}/host_ed25519.pub)" >{keys}/known_hosts
cat >{keys}/sshd_config <<EOF
ListenAddress {source}
Port 22
HostKey {keys}/host_ed25519
PidFile {keys}/sshd.pid
AuthorizedKeysFile {keys}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PermitUserEnvironment no
MaxSessions 100
MaxStartups 100:30:200
ClientAliveInterval 15
LogLevel INFO
EOF
nsenter --net=/run/netns/{netns} -- /usr/sbin/sshd -f {keys}/sshd_config -E {keys}/sshd.log
n=0
until nsenter --net=/run/netns/{netns} -- ss -Hltn | grep -q '{source}:22 '; do
    n=$((n+1))
    if [ $n -ge 200 ]; then
        echo "the source host's sshd never listened:" >&2; cat {keys}/sshd.log >&2; exit 1
    fi
    sleep 0.1
done
"""


class GuestNscaDaemon(NscaDaemon):
    """Debian's nsca daemon started in the guest by the test (the image masks its unit),
    on the guest's loopback: the backup host's ``replicate`` submits to it. Its files are
    in ``workdir``, a directory of the share, so the test reads the command file here."""

    def __init__(self, guest: Guest, workdir: Path, **options: Any) -> None:
        super().__init__(workdir=workdir, capture_syslog=False, port=5667, **options)
        self.guest = guest
        self.guest_pid: int | None = None

    @property
    def running(self) -> bool:
        return self.guest_pid is not None

    def start(self, timeout: float = 30.0) -> GuestNscaDaemon:
        if self.running:
            return self
        self._write_config()
        self.command_file.touch(mode=0o600, exist_ok=True)
        argv = shlex.join([self.binary, "-f", "-c", str(self.config_file), "--single"])
        stderr = shlex.quote(str(self.stderr_file))
        started = self.guest.shell(f"setsid {argv} </dev/null >>{stderr} 2>&1 & echo $!")
        self.guest_pid = int(started.stdout)
        listen = f"{self.host}:{self.port} "
        deadline = time.monotonic() + timeout
        while listen not in self.guest.run("ss", "-Hltn").stdout:
            alive = self.guest.run("kill", "-0", str(self.guest_pid), check=False)
            if alive.returncode != 0 or time.monotonic() > deadline:
                self.stop()
                raise GuestError(
                    f"guest: nsca did not listen on {listen.strip()}: "
                    f"{self.stderr_file.read_text(errors='replace').strip()}"
                )
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate exactly the nsca this started, and wait until it has gone."""
        pid, self.guest_pid = self.guest_pid, None
        if pid is not None:
            self.guest.shell(
                f"kill {pid} 2>/dev/null; n=0; while kill -0 {pid} 2>/dev/null && "
                f"[ $n -lt {int(timeout * 10)} ]; do sleep 0.1; n=$((n+1)); done; "
                f"kill -9 {pid} 2>/dev/null; true"
            )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console output)"


def extract_vmlinux(bzimage: Path, out: Path) -> bool:
    """Write the uncompressed kernel inside ``bzimage`` to ``out`` when QEMU can boot it.

    QEMU boots an ELF kernel directly only through its PVH entry note; without that note,
    or with a compression this cannot undo, nothing is written and the bzImage is used."""
    data = bzimage.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return False
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start : start + length]
    try:
        if payload.startswith(b"\x1f\x8b"):
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        elif payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor().decompress(payload)
        elif payload.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
            # The kernel appends the uncompressed size after the frame: zstd wants it gone.
            elf = subprocess.run(
                ["zstd", "-dc"], input=payload[:-4], capture_output=True, check=True
            ).stdout
        else:
            return False
    except (OSError, lzma.LZMAError, zlib.error, subprocess.CalledProcessError):
        return False
    if not has_pvh_note(elf):
        return False
    out.write_bytes(elf)
    return True


def has_pvh_note(elf: bytes) -> bool:
    """Does this ELF64 kernel carry the Xen PVH entry note (type 18) QEMU boots through?"""
    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)  # fmt: skip
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def clean_cache() -> list[str]:
    """Remove cached images of other recipes (and half-built ones); keep the current."""
    removed = []
    current = {recipe_key(zfs) for zfs in SUITES}
    if GUEST_CACHE.exists():
        for entry in GUEST_CACHE.iterdir():
            if entry.is_dir() and entry.name not in current:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.guest", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["build", "up", "down", "status", "clean", "ssh"])
    parser.add_argument("command", nargs="*", help="for ssh: the command to run in the guest")
    parser.add_argument("--name", choices=sorted(LAYOUTS), help="lab name (default ZETTABEE_LAB)")
    parser.add_argument(
        "--zfs", choices=[*SUITES, "all"], default="2.1", help="the OpenZFS version (build: all)"
    )
    args = parser.parse_args(argv)
    if args.action == "build" and args.zfs == "all":
        try:
            for zfs in SUITES:
                print(Guest(args.name, zfs=zfs).build())
        except GuestError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    guest = Guest(args.name, zfs="2.1" if args.zfs == "all" else args.zfs)
    try:
        if args.action == "build":
            print(guest.build())
        elif args.action == "up":
            seconds = guest.up()
            meta = guest.meta()
            print(
                f"guest {guest.lab} up in {seconds:.0f} s: root@{guest.address} (key {guest.key}, "
                f"known_hosts {guest.known_hosts}); OpenZFS {meta['zfs']}, kernel {meta['kernel']}; "
                f"pools {guest.src_pool} {guest.dst_pool}"
            )
        elif args.action == "down":
            guest.down()
            print(f"guest {guest.lab} down")
        elif args.action == "status":
            print(f"image {guest.image}: {'built' if guest.built() else 'not built'}")
            print(f"guest {guest.lab}: {'up at ' + guest.address if guest.is_up() else 'down'}")
        elif args.action == "clean":
            for path in clean_cache():
                print(f"removed {path}")
        else:
            ssh = guest.source.ssh_argv(" ".join(args.command))  # as ssh joins them
            if not args.command:  # an interactive shell
                ssh = [ssh[0], "-t", *ssh[1:-2]]
            os.execvp("ssh", ssh)
    except GuestError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
