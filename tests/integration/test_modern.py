"""What modern ZFS adds, on both lab back ends: holds, resumable transfers, size estimates,
raw sends of encrypted data, bookmarks.

- ``openzfs``: the OpenZFS 2.1 guest; the source and the destination are both pools in
  it, so zettabee drives two remote ends over SSH (the receiving side has the resume
  token, the sending side the holds).
- ``zfs-fuse``: the two-host lab. zfs-fuse has holds (pool version 23) and nothing else:
  there the same tests assert that the rest is reported absent and that replication still
  works without it.

Faults come from the test side: a throttled link (``tc tbf``) so that a transfer is
still running when the test kills ``zettabee`` with SIGKILL, and an outside ``zfs
destroy`` as another tool or an admin would run it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.guest import Guest, GuestError
from lab.zfslab import LAYOUTS, ZfsLab
from lab.zfslab import test_lab_name as lab_name
from tests.conftest import executable, settle

pytestmark = pytest.mark.integration

BACKENDS = ("zfs-fuse", "openzfs")
PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    """The OpenZFS guest for the session: built unless cached, booted, torn down after."""
    if os.geteuid() != 0:
        pytest.skip("the OpenZFS guest needs root")
    vm = Guest(lab_name())
    try:
        vm.build()
        vm.up()
    except GuestError as exc:
        vm.down()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield vm
    finally:
        if not os.environ.get("ZETTABEE_KEEP_LAB"):
            vm.down()


@dataclass
class Side:
    """One end of a pair: its address in pair lines, its pool, and a shell there."""

    address: str
    pool: str
    argv: Callable[[str], list[str]]
    # where file systems are destroyed: zfs-fuse's source host mounts in a slave
    # namespace, and an unmount there would leave this namespace's mount pinning it
    admin: Callable[[str], list[str]] | None = None

    def sh(self, script: str, check: bool = True, input: str | None = None) -> str:
        """Its stdout; unchecked, stdout and stderr together (what the tool said)."""
        proc = subprocess.run(
            self.argv(script), capture_output=True, text=True, input=input, timeout=300
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{script}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout + proc.stderr if not check else proc.stdout

    def zget(self, target: str, prop: str) -> str:
        return self.sh(f"zfs get -Hp -o value {prop} {shlex.quote(target)}").strip()

    def snapshots(self, fs: str) -> list[str]:
        out = self.sh(f"zfs list -H -t snapshot -o name -s createtxg -r {shlex.quote(fs)}")
        return [n.split("@", 1)[1] for n in out.split() if n.startswith(f"{fs}@")]

    def holds(self, fs: str) -> dict[str, int]:
        """Hold count per snapshot (userrefs: zfs-fuse cannot list holds by tag)."""
        out = self.sh(f"zfs get -Hp -r -o name,value userrefs {shlex.quote(fs)}")
        counts = {}
        for line in out.splitlines():
            name, _, value = line.partition("\t")
            if "@" in name:
                counts[name.split("@", 1)[1]] = int(value)
        return counts

    def mountpoint(self, fs: str) -> str:
        return self.zget(fs, "mountpoint")

    def write_random(self, fs: str, name: str, mb: int) -> None:
        path = shlex.quote(f"{self.mountpoint(fs)}/{name}")
        self.sh(f"head -c {mb << 20} /dev/urandom >{path}")

    def checksums(self, fs: str) -> dict[str, str]:
        settle()
        top = shlex.quote(self.mountpoint(fs))
        out = self.sh(f"cd {top} && find . -type f -exec sha256sum {{}} +")
        return {line[66:].removeprefix("./"): line[:64] for line in out.splitlines()}

    def destroy_tree(self, fs: str) -> None:
        """Remove a test's file system, releasing the pairs' holds that would pin it."""
        quoted = shlex.quote(fs)
        admin = Side(self.address, self.pool, self.admin or self.argv)
        admin.sh(
            f"zfs list -H -o name {quoted} >/dev/null 2>&1 || exit 0; "
            f"for s in $(zfs list -H -t snapshot -o name -r {quoted}); do "
            't=$(echo "${s#*@}" | cut -d. -f1,2); zfs release "$t" "$s" 2>/dev/null; done; '
            f"zfs unmount {quoted} 2>/dev/null; "
            f"for i in $(seq 10); do zfs destroy -r {quoted} && exit 0; sleep 0.3; done; "
            "exit 1"
        )


class Env:
    """One test's pairs, settings and state on one back end; runs the real executables."""

    def __init__(self, backend: str, tmp: Path, name: str, src: Side, dst: Side,
                 key: str, known_hosts: str, veth: list[str]) -> None:  # fmt: skip
        self.backend = backend
        self.tmp = tmp
        self.name = name
        self.src, self.dst = src, dst
        self.veth = veth  # the command prefix of `tc` on the link the stream crosses
        self.settings = tmp / "zettabee.ini"
        self.pairfile = tmp / "pairs.cfg"
        self.settings.write_text(
            f"[paths]\npairs = {self.pairfile}\nstate_dir = {tmp}/state\n"
            f"log_dir = {tmp}/log\nlock_dir = {tmp}/run\nspool_dir = {tmp}/spool\n"
            f"known_hosts = {known_hosts}\n\n[defaults]\nsshkey = {key}\n"
        )

    @property
    def modern(self) -> bool:
        return self.backend == "openzfs"

    def src_fs(self, leaf: str = "data") -> str:
        return f"{self.src.pool}/{self.name}-{leaf}"

    def dst_fs(self, leaf: str = "data") -> str:
        return f"{self.dst.pool}/{self.name}-{leaf}"

    def make_source(self, leaf: str = "data", mb: int = 2, create: str = "") -> str:
        fs = self.src_fs(leaf)
        self.src.sh(f"zfs create {create} {shlex.quote(fs)}", input=f"{PASSPHRASE}\n")
        if mb:
            self.src.write_random(fs, "random.bin", mb)
        return fs

    def pair(self, leaf: str = "data", options: str = "") -> None:
        line = f"{self.src.address}:{self.src_fs(leaf)}  {self.dst.address}:{self.dst_fs(leaf)}"
        self.pairfile.write_text(f"{line}  {options}\n" if options else f"{line}\n")

    def env(self) -> dict[str, str]:
        return {**os.environ, "ZETTABEE_SETTINGS": str(self.settings)}

    def run(self, *args: str, name: str = "zettabee") -> subprocess.CompletedProcess[str]:
        settle()
        return subprocess.run(
            [*executable(name), *args], capture_output=True, text=True, env=self.env(), timeout=600
        )

    def ok(self, *args: str) -> str:
        out = self.run(*args)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr

    def popen(self, *args: str) -> subprocess.Popen[str]:
        settle()
        return subprocess.Popen(
            [*executable("zettabee"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=self.env(),
        )  # fmt: skip

    def fingerprint(self, leaf: str = "data") -> str:
        return self.ok("fingerprint", self.dst_fs(leaf)).split()[-1]

    def status_file(self, leaf: str = "data") -> dict[str, object]:
        return dict(json.loads((self.tmp / "state" / f"{self.fingerprint(leaf)}.json").read_text()))

    def assert_same_data(self, leaf: str = "data") -> None:
        src = self.src.checksums(self.src_fs(leaf))
        assert src, "the source is empty: nothing was compared"
        assert self.dst.checksums(self.dst_fs(leaf)) == src

    @contextlib.contextmanager
    def throttled(self, rate: str = "16mbit") -> Iterator[None]:
        """Slow the link the stream crosses, so that a transfer can be caught running."""
        tc = [*self.veth[:-1], "tc", "qdisc"]
        dev = ["dev", self.veth[-1], "root"]
        subprocess.run([*tc, "del", *dev], capture_output=True)
        subprocess.run(
            [*tc, "add", *dev, "tbf", "rate", rate, "burst", "64kb", "latency", "2s"], check=True
        )
        try:
            yield
        finally:
            subprocess.run([*tc, "del", *dev], capture_output=True)

    def cleanup(self) -> None:
        for side in (self.dst, self.src):
            for line in side.sh(f"zfs list -H -o name -r {side.pool}").split():
                if line.startswith(f"{side.pool}/{self.name}-") and line.count("/") == 1:
                    side.destroy_tree(line)


def _local(script: str) -> list[str]:
    return ["sh", "-c", script]


def _fuse_env(zlab: ZfsLab, tmp: Path, name: str) -> Env:
    source = zlab.source
    layout = LAYOUTS[zlab.layout.name]
    peer = layout.veth[:-1] + "1"  # the source's end, inside its namespace: the stream leaves by it
    return Env(
        "zfs-fuse", tmp, name,
        Side(source.address, source.pool, lambda script: source.ssh_argv(script), _local),
        Side(zlab.dest_address, zlab.dst_pool, _local),
        key=source.key, known_hosts=source.known_hosts,
        veth=["nsenter", f"--net=/run/netns/{layout.netns}", peer],
    )  # fmt: skip


def _guest_env(vm: Guest, tmp: Path, name: str) -> Env:
    src, dst = vm.source, vm.dest
    return Env(
        "openzfs", tmp, name,
        Side(src.address, src.pool, lambda script: src.ssh_argv(script)),
        Side(dst.address, dst.pool, lambda script: dst.ssh_argv(script)),
        key=vm.key, known_hosts=vm.known_hosts,
        veth=[f"{vm.netns}0"],  # towards the guest: the receiving leg of the relay
    )  # fmt: skip


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    words = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24]
    name = f"m-{words}-{hashlib.md5(request.node.nodeid.encode()).hexdigest()[:6]}"
    if request.param == "openzfs":
        made = _guest_env(request.getfixturevalue("guest"), tmp_path, name)
    else:
        made = _fuse_env(request.getfixturevalue("lab"), tmp_path, name)
    made.cleanup()
    try:
        yield made
    finally:
        made.cleanup()


# --------------------------------------------------------------------------------------


def test_setup_and_fullstatus_say_what_each_side_offers(env: Env) -> None:
    env.make_source()
    env.pair()
    setup = env.ok("setup")
    if env.modern:
        assert "OpenZFS 2.1" in setup and "lacks" not in setup
        assert "uses holds (source and destination), resumable receive, size estimates" in setup
    else:
        assert "zfs-fuse (pool" in setup
        assert "lacks bookmarks, resumable receive, size estimates, raw send" in setup
        assert "uses holds (source and destination)\n" in setup
    assert "not probed yet" in env.ok("status", "--fullstatus")
    env.ok("initialize", env.dst_fs())
    full = env.ok("status", "--fullstatus")
    assert "uses: holds (source and destination)" in full
    assert ("resumable receive" in full.split("uses:")[1]) is env.modern
    [data] = json.loads(env.ok("status", "--json"))
    assert data["features"]["source"]["resumable"] is env.modern
    assert data["features"]["destination"]["holds"] is True


def test_a_held_base_survives_an_outside_destroy(env: Env) -> None:
    env.make_source()
    env.pair()
    env.ok("initialize", env.dst_fs())
    [base] = env.src.snapshots(env.src_fs())
    for side, fs in ((env.src, env.src_fs()), (env.dst, env.dst_fs())):
        assert side.holds(fs) == {base: 1}
        said = side.sh(f"zfs destroy {fs}@{base}", check=False)
        assert "dataset is busy" in said
        assert side.snapshots(fs) == [base]
    env.src.write_random(env.src_fs(), "more.bin", 1)
    env.ok("update", env.dst_fs())
    env.assert_same_data()
    # the hold moved with the base: exactly one held snapshot per side, the new base
    [new] = env.src.snapshots(env.src_fs())
    assert new != base
    assert env.src.holds(env.src_fs()) == {new: 1}
    assert env.dst.holds(env.dst_fs()) == {new: 1}


def test_purge_releases_the_holds(env: Env) -> None:
    env.make_source()
    env.pair(options="keep=2")
    env.ok("initialize", env.dst_fs())
    env.src.write_random(env.src_fs(), "more.bin", 1)
    time.sleep(1.05)
    env.ok("update", env.dst_fs())
    [base] = env.src.snapshots(env.src_fs())
    assert list(env.dst.holds(env.dst_fs()).values()) == [0, 1]
    dry = env.ok("purge", "--dry-run", "--release", env.dst_fs())
    assert dry.count("would release hold zettabee.") == 2 and base in dry
    assert env.src.holds(env.src_fs()) == {base: 1}  # a dry run changes nothing
    env.ok("purge", "--release", env.dst_fs())
    assert set(env.src.holds(env.src_fs()).values()) == {0}
    assert set(env.dst.holds(env.dst_fs()).values()) == {0}
    # nothing of the pair pins a snapshot any more: the admin can destroy the base
    # (zfs-fuse says "busy" for a moment after a mount change: a few tries)
    target = f"{env.src_fs()}@{base}"
    env.src.sh(f"for i in 1 2 3 4 5; do zfs destroy {target} && exit 0; sleep 0.5; done; exit 1")


def _kill_mid_transfer(env: Env, action: str = "update") -> str:
    """Start ``action`` over a throttled link, read runstatus while it runs, SIGKILL it."""
    fp = env.fingerprint()
    progress = env.tmp / "state" / f"{fp}.progress"
    with env.throttled():
        proc = env.popen(action, env.dst_fs())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (
                progress.exists()
                and json.loads(progress.read_text() or "{}").get("bytes", 0) > 1 << 20
            ):
                break
            time.sleep(0.1)
        else:
            proc.kill()
            pytest.fail(f"the transfer never got going: {proc.communicate()}")
        try:
            subprocess.run(
                [*executable("zettabee"), "runstatus", env.dst_fs()],
                capture_output=True, text=True, env=env.env(), timeout=3,
            )  # fmt: skip
            pytest.fail("runstatus ended while the transfer was running")
        except subprocess.TimeoutExpired as exc:
            shown = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return shown


def test_a_killed_transfer_resumes_and_the_data_verifies(env: Env) -> None:
    env.make_source(mb=1)
    env.pair()
    env.ok("initialize", env.dst_fs())
    env.src.write_random(env.src_fs(), "big.bin", 16)
    shown = _kill_mid_transfer(env)
    # progress with a size where the source estimates it (send -nvP)
    assert re.search(r"\d+% of \d+\.\d MiB, ETA", shown) if env.modern else "%" not in shown
    assert "at" in shown and "/s" in shown
    token = env.dst.zget(env.dst_fs(), "receive_resume_token") if env.modern else "-"
    status = env.run("status", env.dst_fs()).stdout
    runtime = env.run(env.dst_fs(), name="check_zettabee_runtime")
    assert runtime.returncode == 2 and "interrupted" in runtime.stdout
    if env.modern:
        assert token.startswith("1-"), "a resumable receive keeps a token"
        assert "partial receive of zettabee." in status and "next update resumes it" in status
        assert "partial receive of zettabee." in runtime.stdout
    else:
        assert "partial receive" not in status and "partial receive" not in runtime.stdout
    out = env.run("--verbose", "update", env.dst_fs())
    assert out.returncode == 0, out.stderr
    assert ("resuming the interrupted receive" in out.stderr) is env.modern
    env.assert_same_data()
    if env.modern:
        assert env.dst.zget(env.dst_fs(), "receive_resume_token") == "-"
    assert "partial receive" not in env.ok("status", env.dst_fs())
    assert "resume" not in env.status_file()


def test_a_killed_initialize_goes_on_where_it_broke(env: Env) -> None:
    """The full stream is the long one: on OpenZFS a second `initialize` resumes it; on
    zfs-fuse the partial receive is gone and it starts over, as before."""
    env.make_source(mb=16)
    env.pair()
    _kill_mid_transfer(env, "initialize")
    if env.modern:
        assert env.dst.zget(env.dst_fs(), "receive_resume_token").startswith("1-")
        assert "partial receive of zettabee." in env.run("status", env.dst_fs()).stdout
    out = env.run("--verbose", "initialize", env.dst_fs())
    assert out.returncode == 0, out.stderr
    assert ("resuming the interrupted receive" in out.stderr) is env.modern
    env.assert_same_data()
    assert env.dst.zget(env.dst_fs(), "zettabee:fingerprint") == env.fingerprint()
    env.src.write_random(env.src_fs(), "more.bin", 1)
    env.ok("update", env.dst_fs())
    env.assert_same_data()


def test_a_stale_token_is_cleared_and_the_pair_falls_back(env: Env) -> None:
    env.make_source(mb=1)
    env.pair()
    env.ok("initialize", env.dst_fs())
    if not env.modern:
        full = env.ok("status", "--fullstatus", env.dst_fs())
        assert "lacks bookmarks, resumable receive" in full  # no tokens to go stale here
        return
    [base] = env.src.snapshots(env.src_fs())
    env.src.write_random(env.src_fs(), "big.bin", 16)
    _kill_mid_transfer(env)
    assert env.dst.zget(env.dst_fs(), "receive_resume_token").startswith("1-")
    # someone destroys the snapshot the interrupted stream was sending
    [in_flight] = [s for s in env.src.snapshots(env.src_fs()) if s != base]
    tag = f"zettabee.{env.fingerprint()}"
    env.src.sh(f"zfs release {tag} {env.src_fs()}@{in_flight}")
    env.src.sh(f"zfs destroy {env.src_fs()}@{in_flight}")
    out = env.run("--verbose", "update", env.dst_fs())
    assert out.returncode == 0, out.stderr
    assert "the resume token no longer applies" in out.stderr
    assert "discarding the partial receive" in out.stderr
    assert env.dst.zget(env.dst_fs(), "receive_resume_token") == "-"
    env.assert_same_data()
    assert "resume" not in env.status_file()


def test_an_encrypted_source_replicates_raw_and_the_replica_stays_locked(env: Env) -> None:
    encrypted = "-o encryption=on -o keyformat=passphrase -o keylocation=prompt"
    if not env.modern:
        env.make_source(mb=1)
        env.pair(options="raw=yes")
        out = env.run("initialize", env.dst_fs())
        assert out.returncode == 1
        assert "raw=yes" in out.stderr and "zfs-fuse" in out.stderr and "encryption" in out.stderr
        assert env.src.snapshots(env.src_fs()) == []  # refused before anything was done
        assert "does not exist" in env.dst.sh(f"zfs list {env.dst_fs()}", check=False)
        return
    env.make_source(mb=2, create=encrypted)
    env.pair(options="raw=yes")
    env.ok("initialize", env.dst_fs())
    env.src.write_random(env.src_fs(), "more.bin", 1)
    env.ok("update", env.dst_fs())
    fs = env.dst_fs()
    assert env.dst.zget(fs, "encryption") == "aes-256-gcm"
    assert env.dst.zget(fs, "keystatus") == "unavailable"  # the key never travelled
    assert env.dst.zget(fs, "mounted") == "no"
    assert "encryption key not loaded" in env.dst.sh(f"zfs mount {fs}", check=False)
    wrong = env.dst.sh(f"zfs load-key {fs}", check=False, input="not the passphrase\n")
    assert "Incorrect key" in wrong
    env.dst.sh(f"zfs load-key {fs} && zfs mount {fs}", input=f"{PASSPHRASE}\n")
    env.assert_same_data()  # the key opens exactly the source's data
    env.dst.sh(f"zfs unmount {fs} && zfs unload-key {fs}")


def test_a_bookmark_carries_the_pair_past_an_outside_prune(env: Env) -> None:
    env.make_source(mb=1)
    env.pair(options="bookmark=yes,hold=no")
    if not env.modern:
        out = env.run("initialize", env.dst_fs())
        assert out.returncode == 1 and "bookmark=yes" in out.stderr and "zfs-fuse" in out.stderr
        return
    env.ok("initialize", env.dst_fs())
    [base] = env.src.snapshots(env.src_fs())
    env.src.sh(f"zfs destroy {env.src_fs()}@{base}")  # another tool's retention
    env.src.write_random(env.src_fs(), "more.bin", 1)
    out = env.run("--verbose", "update", env.dst_fs())
    assert out.returncode == 0, out.stderr
    assert f"sending from its bookmark {env.src_fs()}#{base}" in out.stderr
    env.assert_same_data()
    marks = env.src.sh(f"zfs list -H -t bookmark -o name -r {env.src_fs()}").split()
    [new] = env.src.snapshots(env.src_fs())
    assert marks == [f"{env.src_fs()}#{new}"]  # the old bookmark went with the new base
