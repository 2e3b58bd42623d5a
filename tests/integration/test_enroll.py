"""``zettabee enroll`` against a real sshd in the lab's source namespace, then pulls
through the key it placed.

The sshd is the test's own, on its own port, with passwd and shadow files of its own in
its mount namespace: there (and only there) root and an unprivileged admin ``zbadmin``
log in with a password, and keys are read from ``AuthorizedKeysFile <tmp>/keys/%u``, the
file enroll must find through ``--authorized-keys``. The machine's accounts, the lab's
sshd and its key-only root login are untouched.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.guest import Guest
from lab.hosts import sh, stop_pid, wait_for
from lab.zfslab import ZfsLab
from tests.conftest import Zb, executable, settle

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
ADMIN = "zbadmin"


class PasswordSshd:
    """sshd in the source's namespace that takes passwords, on ``port``."""

    def __init__(self, lab: ZfsLab, root: Path, port: int, path: str | None = None) -> None:
        self.lab, self.root, self.port = lab, root, port
        self.address = lab.source.address
        self.pid: int | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.keys = root / "keys"  # AuthorizedKeysFile <keys>/%u: root's, 0755
        self.keys.mkdir(mode=0o755, exist_ok=True)
        self.host_key = root / "host_ed25519"
        if not self.host_key.exists():
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key))
        self.fingerprint = sh("ssh-keygen", "-l", "-f", f"{self.host_key}.pub").stdout.split()[1]
        self.admin_home = root / "home"
        self.admin_home.mkdir(exist_ok=True)
        os.chown(self.admin_home, 4242, 4242)
        self._accounts()
        lines = [
            f"ListenAddress {self.address}",
            f"Port {port}",
            f"HostKey {self.host_key}",
            f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.keys}/%u",
            "PermitRootLogin yes",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
        ]
        if path is not None:
            lines.append(f"SetEnv PATH={path}")
        (root / "sshd_config").write_text("\n".join(lines) + "\n")

    def _accounts(self) -> None:
        digest = sh("openssl", "passwd", "-6", "-stdin", input=PASSWORD).stdout.strip()
        passwd = (Path(self.lab.source.key).parent / "passwd").read_text()
        passwd += f"{ADMIN}:x:4242:4242::{self.admin_home}:/bin/sh\n"
        (self.root / "passwd").write_text(passwd)
        shadow = []
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == "root":
                fields[1] = digest
            shadow.append(":".join(fields))
        shadow.append(f"{ADMIN}:{digest}:19000:0:99999:7:::")
        (self.root / "shadow").write_text("\n".join(shadow) + "\n")
        os.chmod(self.root / "shadow", 0o600)

    def start(self) -> None:
        files = {self.root / "passwd": "/etc/passwd", self.root / "shadow": "/etc/shadow"}
        script = " && ".join(f"mount --bind {shlex.quote(str(a))} {b}" for a, b in files.items())
        script += f" && exec /usr/sbin/sshd -D -e -f {shlex.quote(str(self.root / 'sshd_config'))}"
        Path("/run/sshd").mkdir(exist_ok=True)
        with open(self.root / "sshd.log", "ab") as log:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.lab.layout.netns}", "--",
                 "unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        self.pid = proc.pid
        netns = f"--net=/run/netns/{self.lab.layout.netns}"

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log()[-800:]}")
            out = sh("nsenter", netns, "ss", "-Hltn", check=False).stdout
            return f"{self.address}:{self.port} " in out

        wait_for(f"sshd on port {self.port}", listening)

    def stop(self) -> None:
        stop_pid(self.pid)
        self.pid = None

    def log(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")


@pytest.fixture
def sshd(lab: ZfsLab, tmp_path: Path) -> Iterator[PasswordSshd]:
    server = PasswordSshd(lab, tmp_path / "sshd", 2223)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Enroll:
    """A pair whose source is reached through ``sshd``, and ``zettabee enroll`` for it."""

    def __init__(self, zb: Zb, sshd: PasswordSshd, tmp: Path) -> None:
        self.zb, self.sshd = zb, sshd
        self.key = tmp / "pairkey" / "id_ed25519"  # missing: enroll generates it
        self.known_hosts = tmp / "pair_known_hosts"
        self.source_path = tmp / "bin" / "zettabee-source"
        self.source_path.parent.mkdir()
        self.fs = zb.make_source()
        self.options = f"sshport={sshd.port},sshkey={self.key},knownhosts={self.known_hosts}"
        zb.write_pairs(zb.pair_line(options=self.options))
        self.root_keys = sshd.keys / "root"

    def args(self, *extra: str) -> list[str]:
        return [
            "enroll", self.sshd.address,
            "--authorized-keys", f"{self.sshd.keys}/%u",
            "--source-path", str(self.source_path),
            "--timeout", "10",
            *extra,
        ]  # fmt: skip

    def run(
        self, *extra: str, password: str | None = PASSWORD, pieces: int = 1, delay: float = 0.0
    ) -> subprocess.CompletedProcess[str]:
        """``zettabee enroll`` with the password written into a pipe it reads as
        ``--password-fd``, in ``pieces`` writes ``delay`` seconds apart, after it started."""
        settle()
        argv = [*executable("zettabee"), *self.args(*extra)]
        if password is None:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=self.zb.env(),
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
        read, write = os.pipe()
        argv += ["--password-fd", str(read)]
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.zb.env(), pass_fds=(read,), stdin=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(read)
        data = (password + "\n").encode()
        size = -(-len(data) // pieces)

        def feed() -> None:
            for start in range(0, len(data), size):
                time.sleep(delay)
                try:
                    os.write(write, data[start : start + size])
                except BrokenPipeError:
                    break
            os.close(write)

        feeder = threading.Thread(target=feed)
        feeder.start()
        out, err = proc.communicate(timeout=120)
        feeder.join()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def ssh(self, command: str) -> subprocess.CompletedProcess[str]:
        """The pair's key, with OpenSSH, as cron uses it."""
        return subprocess.run(
            ["ssh", "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-p", str(self.sshd.port),
             "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
             "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
             f"root@{self.sshd.address}", command],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip


@pytest.fixture
def enrolling(zb: Zb, sshd: PasswordSshd, tmp_path: Path) -> Enroll:
    return Enroll(zb, sshd, tmp_path)


def assert_clean_failure(proc: subprocess.CompletedProcess[str], said: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert said in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def assert_nothing_written(e: Enroll) -> None:
    assert not e.root_keys.exists()
    assert not e.known_hosts.exists()
    assert not e.source_path.exists()
    assert not list(e.sshd.keys.iterdir())


def test_enroll_then_pull_through_the_restricted_key(enrolling: Enroll) -> None:
    e, zb = enrolling, enrolling.zb
    first = e.run("--host-key-fingerprint", e.sshd.fingerprint)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"host key ssh-ed25519 {e.sshd.fingerprint}" in first.stdout
    assert "a pull's command through the restricted key works" in first.stdout
    lines = e.root_keys.read_text().splitlines()
    assert len(lines) == 1
    fp, rid = zb.fingerprint(), zb.replica_id()
    assert lines[0].startswith(
        f'restrict,from="{zb.dstside.address}",command="{e.source_path} --pair {fp}.{rid} {e.fs}" '
        "ssh-ed25519 "
    )
    assert oct(e.root_keys.stat().st_mode & 0o777) == "0o600"
    assert e.known_hosts.read_text().startswith(f"[{e.sshd.address}]:{e.sshd.port} ssh-ed25519 ")
    assert e.key.exists() and Path(f"{e.key}.pub").exists()
    # the proof ends with the pair's features, probed through the key as setup prints them
    setup = zb.run("setup", zb.dst_fs())
    assert setup.returncode == 0, setup.stdout + setup.stderr
    features = [
        line
        for line in setup.stdout.splitlines()
        if line.startswith(("  ok   source zfs on ", "  ok   destination zfs on ", "  uses "))
    ]
    assert len(features) == 3, setup.stdout
    pair = setup.stdout.splitlines()[0]  # the pair, as setup names it
    shown = first.stdout.splitlines()
    assert pair in shown, first.stdout
    assert [pair, *features] == shown[shown.index(pair) :][:4], (setup.stdout, first.stdout)

    # cron's way in: the pair initializes and updates through the restricted key
    init = zb.run("initialize", zb.dst_fs())
    assert init.returncode == 0, init.stderr
    zb.srcside.write_random(zb.src_dir() / "more.bin", 1)
    update = zb.run("update", zb.dst_fs())
    assert update.returncode == 0, update.stderr
    zb.assert_same_data()
    zb.srcside.write_random(zb.src_dir() / "again.bin", 1)
    replicated = zb.exe("replicate", zb.dst_fs())
    assert replicated.returncode == 0, replicated.stdout + replicated.stderr
    zb.assert_same_data()
    refused = e.ssh("id")
    assert refused.returncode == 126 and "zettabee-source: refused" in refused.stderr

    # again, nothing changed: the file byte for byte as it was, not even rewritten
    before = e.root_keys.read_bytes(), e.root_keys.stat().st_ino, e.root_keys.stat().st_mtime_ns
    again = e.run()
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout and "install" not in again.stdout
    st = e.root_keys.stat()
    assert (e.root_keys.read_bytes(), st.st_ino, st.st_mtime_ns) == before

    removed = e.run("--remove")
    assert removed.returncode == 0, removed.stderr
    assert e.root_keys.read_text() == ""
    assert not e.source_path.exists()
    assert e.ssh("true").returncode == 255


def test_other_lines_owner_and_mode_kept(enrolling: Enroll) -> None:
    e = enrolling
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyOfSomeone alice@laptop\n"
    e.root_keys.write_text(f"# admins\n{other}")
    os.chmod(e.root_keys, 0o640)
    done = e.run("--host-key-fingerprint", e.sshd.fingerprint)
    assert done.returncode == 0, done.stderr
    text = e.root_keys.read_text()
    assert text.startswith(f"# admins\n{other}restrict,")
    assert oct(e.root_keys.stat().st_mode & 0o777) == "0o640"
    assert not [p for p in e.sshd.keys.iterdir() if p.name.startswith(".")]


def test_a_pair_its_zfs_cannot_serve_fails_the_proof(enrolling: Enroll) -> None:
    """raw=yes on zfs-fuse: enrolled, then the features say why the pair cannot work."""
    e, zb = enrolling, enrolling.zb
    zb.write_pairs(zb.pair_line(options=f"{e.options},raw=yes"))
    proc = e.run("--host-key-fingerprint", e.sshd.fingerprint)
    assert_clean_failure(proc, "cannot work as configured (the FAIL lines above)")
    assert "  FAIL raw=yes, but the source" in proc.stdout, proc.stdout
    assert e.root_keys.read_text().startswith("restrict,")  # enrolled all the same


def test_dry_run_changes_nothing(enrolling: Enroll) -> None:
    e = enrolling
    dry = e.run("--host-key-fingerprint", e.sshd.fingerprint, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would generate an ed25519 key" in dry.stdout
    assert "would install zettabee-source" in dry.stdout
    assert "would add zettabee's line" in dry.stdout
    assert "would pin ssh-ed25519" in dry.stdout
    assert_nothing_written(e)
    assert not e.key.exists()


@pytest.mark.parametrize("pieces,delay", [(1, 0.0), (3, 0.3)])
def test_password_from_a_descriptor_written_in_pieces(
    enrolling: Enroll, pieces: int, delay: float
) -> None:
    """The password may arrive in several writes after enroll started reading it."""
    e = enrolling
    done = e.run("--host-key-fingerprint", e.sshd.fingerprint, pieces=pieces, delay=delay)
    assert done.returncode == 0, done.stdout + done.stderr


def test_wrong_password(enrolling: Enroll) -> None:
    e = enrolling
    proc = e.run("--host-key-fingerprint", e.sshd.fingerprint, password="wrong")
    assert_clean_failure(proc, "refused the login of root@")
    assert_nothing_written(e)


def test_host_key_fingerprint_that_does_not_match(enrolling: Enroll) -> None:
    e = enrolling
    wrong = "SHA256:" + "A" * 43
    proc = e.run("--host-key-fingerprint", wrong)
    assert_clean_failure(proc, f"not the {wrong} given with --host-key-fingerprint")
    assert_nothing_written(e)


def test_no_fingerprint_and_no_terminal(enrolling: Enroll) -> None:
    e = enrolling
    proc = e.run()
    assert_clean_failure(proc, f"--host-key-fingerprint {e.sshd.fingerprint}")
    assert_nothing_written(e)


def test_a_changed_host_key_is_refused(enrolling: Enroll, tmp_path: Path) -> None:
    e = enrolling
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "old_host"))
    kind, blob = (tmp_path / "old_host.pub").read_text().split()[:2]
    pinned = f"[{e.sshd.address}]:{e.sshd.port} {kind} {blob}\n"
    e.known_hosts.write_text(pinned)
    proc = e.run("--host-key-fingerprint", e.sshd.fingerprint)
    assert_clean_failure(proc, "pins ssh-ed25519")
    assert "ssh-keygen -R" in proc.stderr
    assert e.known_hosts.read_text() == pinned
    assert not e.root_keys.exists()


def test_a_dead_host(enrolling: Enroll) -> None:
    e = enrolling
    e.sshd.stop()
    proc = e.run("--host-key-fingerprint", e.sshd.fingerprint)
    assert_clean_failure(proc, f"cannot reach {e.sshd.address}")
    assert_nothing_written(e)


def test_a_source_file_system_that_does_not_exist(enrolling: Enroll) -> None:
    e, zb = enrolling, enrolling.zb
    zb.write_pairs(zb.pair_line(options=e.options), zb.pair_line("gone", options=e.options))
    proc = e.run("--host-key-fingerprint", e.sshd.fingerprint)
    assert_clean_failure(proc, f"source file system {zb.src_fs('gone')}")
    assert_nothing_written(e)


def test_a_non_root_admin_may_not_write_roots_keys(lab: ZfsLab, zb: Zb, tmp_path: Path) -> None:
    """zbadmin logs in, reaches root's keys directory (0755), and may not write there."""
    root = Path(tempfile.mkdtemp(prefix="zettabee-enroll-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    server = PasswordSshd(lab, root / "sshd", 2224)
    os.chmod(server.root, 0o755)
    server.start()
    try:
        e = Enroll(zb, server, tmp_path)
        proc = e.run("--host-key-fingerprint", server.fingerprint, "--admin", ADMIN)
        assert_clean_failure(proc, f"{ADMIN} may not write in {server.keys}, for {e.root_keys}")
        assert_nothing_written(e)
    finally:
        server.stop()
        shutil.rmtree(root)


def _path_without(tmp: Path, missing: str) -> str:
    """A PATH of one directory with the tools a source has, but ``missing``."""
    directory = tmp / f"path-without-{missing}"
    directory.mkdir()
    for tool in ("getent", "printenv", "test", "zfs", "python3", "sh", "cat", "mbuffer"):
        found = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")  # the host's own
        if tool != missing and found:
            (directory / tool).symlink_to(found)
    return str(directory)


@pytest.mark.parametrize(
    "missing,said",
    [("zfs", "no zfs command on the PATH"), ("python3", "python3 not found")],
)
def test_a_source_without_zfs_or_python3(
    lab: ZfsLab, zb: Zb, tmp_path: Path, missing: str, said: str
) -> None:
    server = PasswordSshd(lab, tmp_path / "sshd", 2224, path=_path_without(tmp_path, missing))
    server.start()
    try:
        e = Enroll(zb, server, tmp_path)
        proc = e.run("--host-key-fingerprint", server.fingerprint)
        assert_clean_failure(proc, said)
        assert_nothing_written(e)
    finally:
        server.stop()


DELEGATED = "zbenrolled"
V23_POOL = "gv23enroll"  # zfs-fuse receives streams of pool version 23 only


def test_enroll_a_delegated_user_on_openzfs_then_pull(guest: Guest, zb: Zb, tmp_path: Path) -> None:
    """On the OpenZFS guest: the admin logs in by key (--admin-key), enroll creates the
    pairs' user, delegates exactly a pull's permissions, and cron pulls behind it."""
    g = guest
    g.shell(
        f"zpool list {V23_POOL} >/dev/null 2>&1 || {{ truncate -s 256M /var/tmp/{V23_POOL}.img && "
        f"zpool create -o version=23 -O mountpoint=/{V23_POOL} {V23_POOL} /var/tmp/{V23_POOL}.img; }}"
    )
    fs = f"{V23_POOL}/{zb.name}"
    try:
        g.run("zfs", "create", fs)
        g.shell(f"head -c 2097152 /dev/urandom >/{fs}/random.bin")
        key, known = tmp_path / "pairkey" / "id_ed25519", tmp_path / "known_hosts"
        options = f"sshport={g.port},sshkey={key},knownhosts={known},user={DELEGATED}"
        zb.write_pairs(f"{g.address}:{fs}  {zb.dstside.address}:{zb.dst_fs()}  {options}")
        fingerprint = sh("ssh-keygen", "-l", "-f", g.known_hosts).stdout.split()[1]
        enroll = ["enroll", g.address, "--admin-key", g.key, "--user", DELEGATED,
                  "--host-key-fingerprint", fingerprint, "--timeout", "60"]  # fmt: skip
        done = zb.run(*enroll)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"create the user {DELEGATED}" in done.stdout
        assert (
            f"zfs allow -u {DELEGATED} send,snapshot,destroy,mount,hold,release {fs}" in done.stdout
        )
        allowed = g.run("zfs", "allow", fs).stdout
        assert DELEGATED in allowed and "bookmark" not in allowed
        line = g.run("cat", f"/home/{DELEGATED}/.ssh/authorized_keys").stdout
        assert (
            line.startswith('restrict,from="')
            and f'--pair {zb.fingerprint()}.{zb.replica_id()} {fs}" ' in line
        )

        init = zb.run("initialize", zb.dst_fs())
        assert init.returncode == 0, init.stderr
        update = zb.run("update", zb.dst_fs())
        assert update.returncode == 0, update.stderr
        assert zb.dstside.zget(f"{zb.dst_fs()}", "type") == "filesystem"

        again = zb.run(*enroll)
        assert again.returncode == 0 and "unchanged" in again.stdout, again.stderr

        removed = zb.run(*enroll, "--remove", "--remove-user")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert DELEGATED not in g.run("zfs", "allow", fs).stdout
        assert g.run("getent", "passwd", DELEGATED, check=False).returncode == 2
    finally:
        g.shell(f"userdel -r {DELEGATED} 2>/dev/null; zpool destroy -f {V23_POOL}; "
                f"rm -f /var/tmp/{V23_POOL}.img", check=False)  # fmt: skip


def test_enroll_with_user_on_zfs_fuse_says_it_has_no_zfs_allow(enrolling: Enroll) -> None:
    e, zb = enrolling, enrolling.zb
    zb.write_pairs(zb.pair_line(options=f"{e.options},user={DELEGATED}"))
    proc = e.run("--host-key-fingerprint", e.sshd.fingerprint, "--user", DELEGATED)
    assert_clean_failure(proc, "no zfs allow there")
    assert_nothing_written(e)
    mismatch = e.run("--host-key-fingerprint", e.sshd.fingerprint, "--user", "someone")
    assert mismatch.returncode == 2 and "give them user=someone" in mismatch.stderr


def test_the_admin_by_the_agent_and_without_a_way_in(enrolling: Enroll, tmp_path: Path) -> None:
    """The agent's key logs the admin in; with no agent, no key, no descriptor and no
    terminal, enroll says how to give it one."""
    e = enrolling
    alone = e.run("--host-key-fingerprint", e.sshd.fingerprint, password=None)
    assert_clean_failure(alone, "no terminal to ask for a password on")
    assert_nothing_written(e)

    admin_key = tmp_path / "admin_ed25519"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(admin_key))
    e.root_keys.write_text(Path(f"{admin_key}.pub").read_text())
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        wait_for("ssh-agent", socket_path.exists)
        env = {**e.zb.env(), "SSH_AUTH_SOCK": str(socket_path)}
        sh("env", f"SSH_AUTH_SOCK={socket_path}", "ssh-add", "-q", str(admin_key))
        argv = [*executable("zettabee"), *e.args("--host-key-fingerprint", e.sshd.fingerprint)]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120,
                              stdin=subprocess.DEVNULL)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        lines = e.root_keys.read_text().splitlines()
        assert lines[0] == Path(f"{admin_key}.pub").read_text().strip()  # the admin's stays
        assert lines[1].startswith("restrict,")
    finally:
        agent.terminate()
        agent.wait()
