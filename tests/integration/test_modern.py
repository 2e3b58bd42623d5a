"""What modern ZFS adds, on both lab back ends: holds, resumable transfers, size estimates,
raw sends of encrypted data, bookmarks.

- ``openzfs-2.1`` and ``openzfs-2.3``: the OpenZFS guests in the main topology, zettabee
  and the destination pool on the guest's backup host, the source host in a network
  namespace of the guest (the receiving side has the resume token, the sending side the
  holds).
- ``zfs-fuse``: the two-host lab. zfs-fuse has holds (pool version 23) and nothing else:
  there the same tests assert that the rest is reported absent and that replication still
  works without it.

Faults come from the test side: a throttled link (``tc tbf``) so that a transfer is
still running when the test kills ``zettabee`` with SIGKILL, and an outside ``zfs
destroy`` as another tool or an admin would run it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from lab.guest import SOURCE_NETNS
from lab.zfslab import LAYOUTS
from lab.zfslab import test_lab_name as lab_name
from tests.conftest import BACKENDS, Side, Zb, backend_zb
from zettabee.pair import tag_of

pytestmark = pytest.mark.integration

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(params=BACKENDS)
def zb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Zb]:
    yield from backend_zb(request, tmp_path)


def modern(zb: Zb) -> bool:
    return zb.backend.modern


def said(side: Side, script: str) -> str:
    """What a command that is expected to fail said (stdout and stderr)."""
    proc = side.sh(script, check=False)
    return proc.stdout + proc.stderr


def holds(side: Side, fs: str) -> dict[str, int]:
    """Hold count per snapshot (userrefs: zfs-fuse cannot list holds by tag)."""
    out = side.run("zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", fs).stdout
    counts = {}
    for line in out.splitlines():
        name, _, value = line.partition("\t")
        if "@" in name:
            counts[name.split("@", 1)[1]] = int(value)
    return counts


def ok(zb: Zb, *args: str) -> str:
    out = zb.run(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def status_file(zb: Zb) -> dict[str, object]:
    return dict(json.loads((zb.tmp / "state" / f"{zb.fingerprint()}.json").read_text()))


@contextlib.contextmanager
def throttled(zb: Zb, rate: str = "16mbit") -> Iterator[None]:
    """Slow the link the stream crosses (``tc tbf``), so that a transfer can be caught
    running: the source's end of its veth, inside its namespace (the stream leaves by
    it), here on zfs-fuse, in the guest on OpenZFS."""
    if zb.backend.host is not None:
        guest = zb.backend.host
        tc = f"nsenter --net=/run/netns/{SOURCE_NETNS} -- tc qdisc"
        dev = f"{SOURCE_NETNS}1"
        guest.shell(f"{tc} del dev {dev} root 2>/dev/null; {tc} add dev {dev} root tbf "
                    f"rate {rate} burst 64kb latency 2s")  # fmt: skip
        try:
            yield
        finally:
            guest.shell(f"{tc} del dev {dev} root", check=False)
        return
    layout = LAYOUTS[lab_name()]
    prefix, dev = ["nsenter", f"--net=/run/netns/{layout.netns}"], layout.veth[:-1] + "1"
    tc = [*prefix, "tc", "qdisc"]
    subprocess.run([*tc, "del", "dev", dev, "root"], capture_output=True)
    subprocess.run(
        [*tc, "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "2s"],
        check=True,
    )
    try:
        yield
    finally:
        subprocess.run([*tc, "del", "dev", dev, "root"], capture_output=True)


# --------------------------------------------------------------------------------------


def test_setup_and_fullstatus_say_what_each_side_offers(zb: Zb) -> None:
    zb.make_source()
    zb.write_pairs(zb.pair_line())
    setup = ok(zb, "setup")
    if modern(zb):
        assert f"OpenZFS {zb.backend.name.split('-')[1]}" in setup and "lacks" not in setup
        assert "uses holds (source and destination), resumable receive, size estimates" in setup
    else:
        assert "zfs-fuse (pool" in setup
        assert "lacks bookmarks, resumable receive, size estimates, raw send" in setup
        assert "uses holds (source and destination)\n" in setup
    fp, rid = zb.fingerprint(), zb.replica_id()
    assert (
        f"  replica id {rid} (pool {zb.dstside.pool} on {zb.dstside.address}): snapshots "
        f"zettabee.{fp}.{rid}.<time>, hold zettabee.{fp}.{rid}; the source's key binds it "
        f"with --pair {fp}.{rid}\n"
    ) in setup, setup
    assert "not probed yet" in ok(zb, "status", "--fullstatus")
    ok(zb, "initialize", zb.dst_fs())
    full = ok(zb, "status", "--fullstatus")
    assert f"  {fp}  {rid}  ssh" in full.splitlines()[0], full
    assert "uses: holds (source and destination)" in full
    assert ("resumable receive" in full.split("uses:")[1]) is modern(zb)
    [data] = json.loads(ok(zb, "status", "--json"))
    assert data["features"]["source"]["resumable"] is modern(zb)
    assert data["features"]["destination"]["holds"] is True
    assert data["replica"] == rid


def test_a_held_base_survives_an_outside_destroy(zb: Zb) -> None:
    zb.make_source()
    zb.write_pairs(zb.pair_line())
    ok(zb, "initialize", zb.dst_fs())
    [base] = zb.srcside.snapshots(zb.src_fs())
    for side, fs in ((zb.srcside, zb.src_fs()), (zb.dstside, zb.dst_fs())):
        assert holds(side, fs) == {base: 1}
        # OpenZFS 2.1 and zfs-fuse say "dataset is busy"; 2.3 names the holds ("... to see
        # holders")
        assert re.search(r"dataset is busy|see holders", said(side, f"zfs destroy {fs}@{base}"))
        assert side.snapshots(fs) == [base]
    zb.srcside.write_random(zb.src_dir() / "more.bin", 1)
    ok(zb, "update", zb.dst_fs())
    zb.assert_same_data()
    # the hold moved with the base: exactly one held snapshot per side, the new base
    [new] = zb.srcside.snapshots(zb.src_fs())
    assert new != base
    assert holds(zb.srcside, zb.src_fs()) == {new: 1}
    assert holds(zb.dstside, zb.dst_fs()) == {new: 1}


def test_purge_releases_the_holds(zb: Zb) -> None:
    zb.make_source()
    zb.write_pairs(zb.pair_line(options="keep=2"))
    ok(zb, "initialize", zb.dst_fs())
    zb.srcside.write_random(zb.src_dir() / "more.bin", 1)
    time.sleep(1.05)
    ok(zb, "update", zb.dst_fs())
    [base] = zb.srcside.snapshots(zb.src_fs())
    assert list(holds(zb.dstside, zb.dst_fs()).values()) == [0, 1]
    dry = ok(zb, "purge", "--dry-run", "--release", zb.dst_fs())
    assert dry.count("would release hold zettabee.") == 2 and base in dry
    assert holds(zb.srcside, zb.src_fs()) == {base: 1}  # a dry run changes nothing
    ok(zb, "purge", "--release", zb.dst_fs())
    assert set(holds(zb.srcside, zb.src_fs()).values()) == {0}
    assert set(holds(zb.dstside, zb.dst_fs()).values()) == {0}
    # nothing of the pair pins a snapshot any more: the admin can destroy the base
    # (zfs-fuse says "busy" for a moment after a mount change: a few tries)
    target = shlex.quote(f"{zb.src_fs()}@{base}")
    zb.srcside.sh(f"for i in 1 2 3 4 5; do zfs destroy {target} && exit 0; sleep 0.5; done; exit 1")


def _kill_mid_transfer(zb: Zb, action: str = "update") -> tuple[str, str]:
    """Start ``action`` with ``--debug`` over a throttled link, read runstatus while it
    runs, SIGKILL it. What runstatus showed, and what the killed run had said."""
    progress = zb.tmp / "state" / f"{zb.fingerprint()}.progress"
    # In the guest, reading runstatus takes seconds: a slower link keeps the stream going.
    with throttled(zb, "16mbit" if zb.backend.host is None else "4mbit"):
        proc = zb.popen("zettabee", "--debug", action, zb.dst_fs())
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
                zb.argv("zettabee", "runstatus", zb.dst_fs()),
                capture_output=True, text=True, env=zb.env(), timeout=3 if zb.backend.host is None else 10,
            )  # fmt: skip
            pytest.fail("runstatus ended while the transfer was running")
        except subprocess.TimeoutExpired as exc:
            shown = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        zb.kill(proc, signal.SIGKILL)
        _out, told = proc.communicate()
    return shown, told


def test_a_killed_transfer_resumes_and_the_data_verifies(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line())
    ok(zb, "initialize", zb.dst_fs())
    zb.srcside.write_random(zb.src_dir() / "big.bin", 16)
    shown, told = _kill_mid_transfer(zb)
    # the routine update goes in one round trip, the estimate and resume folded in
    folded = "a size estimate, a resumable receive" if modern(zb) else "the source's hold"
    assert f"update in one round trip, with {folded}" in told, told
    # progress with a size where the source estimates it (send -nvP)
    assert re.search(r"\d+% of \d+\.\d MiB, ETA", shown) if modern(zb) else "%" not in shown
    assert " at " in shown and "/s" in shown
    status = zb.run("status", zb.dst_fs()).stdout
    runtime = zb.exe("check_zettabee_runtime", zb.dst_fs())
    assert runtime.returncode == 2 and "interrupted" in runtime.stdout
    if modern(zb):
        token = zb.dstside.zget(zb.dst_fs(), "receive_resume_token")
        assert token.startswith("1-"), "a resumable receive keeps a token"
        assert "partial receive of zettabee." in status and "next update resumes it" in status
        assert "partial receive of zettabee." in runtime.stdout
    else:
        assert "partial receive" not in status and "partial receive" not in runtime.stdout
    out = zb.run("--verbose", "update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert ("resuming the interrupted receive" in out.stderr) is modern(zb)
    zb.assert_same_data()
    if modern(zb):
        assert zb.dstside.zget(zb.dst_fs(), "receive_resume_token") == "-"
    assert "partial receive" not in ok(zb, "status", zb.dst_fs())
    assert "resume" not in status_file(zb)


def test_a_killed_initialize_goes_on_where_it_broke(zb: Zb) -> None:
    """The full stream is the long one: on OpenZFS a second `initialize` resumes it; on
    zfs-fuse the partial receive is gone and it starts over, as before."""
    zb.make_source(mb=16)
    zb.write_pairs(zb.pair_line())
    _shown, told = _kill_mid_transfer(zb, "initialize")
    assert "initialize step by step" not in told, told  # the script takes the snapshot
    if modern(zb):
        assert zb.dstside.zget(zb.dst_fs(), "receive_resume_token").startswith("1-")
        assert "partial receive of zettabee." in zb.run("status", zb.dst_fs()).stdout
    out = zb.run("--verbose", "initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert ("resuming the interrupted receive" in out.stderr) is modern(zb)
    zb.assert_same_data()
    assert zb.dstside.zget(zb.dst_fs(), "zettabee:fingerprint") == zb.fingerprint()
    zb.srcside.write_random(zb.src_dir() / "more.bin", 1)
    ok(zb, "update", zb.dst_fs())
    zb.assert_same_data()


def test_a_stale_token_is_cleared_and_the_pair_falls_back(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line())
    ok(zb, "initialize", zb.dst_fs())
    if not modern(zb):
        full = ok(zb, "status", "--fullstatus", zb.dst_fs())
        assert "lacks bookmarks, resumable receive" in full  # no tokens to go stale here
        return
    [base] = zb.srcside.snapshots(zb.src_fs())
    zb.srcside.write_random(zb.src_dir() / "big.bin", 16)
    _kill_mid_transfer(zb)
    assert zb.dstside.zget(zb.dst_fs(), "receive_resume_token").startswith("1-")
    # someone destroys the snapshot the interrupted stream was sending
    [in_flight] = [s for s in zb.srcside.snapshots(zb.src_fs()) if s != base]
    zb.srcside.run("zfs", "release", str(tag_of(in_flight)), f"{zb.src_fs()}@{in_flight}")
    zb.srcside.run("zfs", "destroy", f"{zb.src_fs()}@{in_flight}")
    out = zb.run("--verbose", "update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert "the resume token no longer applies" in out.stderr
    assert "discarding the partial receive" in out.stderr
    assert zb.dstside.zget(zb.dst_fs(), "receive_resume_token") == "-"
    zb.assert_same_data()
    assert "resume" not in status_file(zb)


def test_an_encrypted_source_replicates_raw_and_the_replica_stays_locked(zb: Zb) -> None:
    zb.write_pairs(zb.pair_line(options="raw=yes"))
    if not modern(zb):
        zb.make_source(mb=1)
        out = zb.run("initialize", zb.dst_fs())
        assert out.returncode == 1
        assert "raw=yes" in out.stderr and "zfs-fuse" in out.stderr and "encryption" in out.stderr
        assert zb.srcside.snapshots(zb.src_fs()) == []  # refused before anything was done
        assert "does not exist" in said(zb.dstside, f"zfs list {zb.dst_fs()}")
        return
    secret = shlex.quote(PASSPHRASE)
    zb.srcside.sh(
        f"printf '%s\\n' {secret} | zfs create -o encryption=on -o keyformat=passphrase "
        f"-o keylocation=prompt {zb.src_fs()}"
    )
    zb.srcside.run("zfs", "set", "org.example:tier=gold", zb.src_fs())
    zb.srcside.write_random(zb.src_dir() / "random.bin", 2)
    zb.write_pairs(zb.pair_line(options="raw=yes,props=yes"))
    ok(zb, "initialize", zb.dst_fs())
    zb.srcside.write_random(zb.src_dir() / "more.bin", 1)
    ok(zb, "update", zb.dst_fs())
    fs, dst = zb.dst_fs(), zb.dstside
    assert dst.zget(fs, "encryption") == "aes-256-gcm"
    assert dst.zget(fs, "keystatus") == "unavailable"  # the key never travelled
    # its own encryption root, so its key loads alone: with the source's passphrase
    assert dst.zget(fs, "encryptionroot") == fs
    assert dst.zget(fs, "org.example:tier") == "gold"  # props=yes beside raw=yes
    assert dst.zget(fs, "mountpoint") == str(zb.dst_dir())
    assert dst.zget(fs, "mounted") == "no"
    assert "encryption key not loaded" in said(dst, f"zfs mount {fs}")
    assert "Incorrect key" in said(dst, f"echo not-the-passphrase | zfs load-key {fs}")
    dst.sh(f"printf '%s\\n' {secret} | zfs load-key {fs} && zfs mount {fs}")
    zb.assert_same_data()  # the key opens exactly the source's data
    dst.sh(f"zfs unmount {fs} && zfs unload-key {fs}")


def test_a_bookmark_carries_the_pair_past_an_outside_prune(zb: Zb) -> None:
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line(options="bookmark=yes,hold=no"))
    if not modern(zb):
        out = zb.run("initialize", zb.dst_fs())
        assert out.returncode == 1 and "bookmark=yes" in out.stderr and "zfs-fuse" in out.stderr
        return
    ok(zb, "initialize", zb.dst_fs())
    [base] = zb.srcside.snapshots(zb.src_fs())
    zb.srcside.run("zfs", "destroy", f"{zb.src_fs()}@{base}")  # another tool's retention
    zb.srcside.write_random(zb.src_dir() / "more.bin", 1)
    out = zb.run("--verbose", "update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    assert f"sending from its bookmark {zb.src_fs()}#{base}" in out.stderr
    zb.assert_same_data()
    marks = zb.srcside.run("zfs", "list", "-H", "-t", "bookmark", "-o", "name", "-r", zb.src_fs())
    [new] = zb.srcside.snapshots(zb.src_fs())
    assert marks.stdout.split() == [f"{zb.src_fs()}#{new}"]  # the old one went with the old base


def test_a_source_mountpoint_never_covers_the_backup_hosts_own_paths(zb: Zb) -> None:
    """props=yes sends the source's properties (``zfs send -p``), but the receive leaves
    out where the source's host mounts and shares the file system: received, the source's
    mountpoint would mount the replica over that path on the backup host (here the same
    kernel as the source's namespace: over the source's own mount). A volume receives
    without ``-x`` (OpenZFS 2.1 refuses ``-x mountpoint`` on one) and replicates too."""
    zb.make_source(mb=1)
    line = zb.pair_line(options="props=yes")
    if not modern(zb):
        zb.write_pairs(line)
        out = zb.run("initialize", zb.dst_fs())
        assert out.returncode == 1, out.stderr
        assert "props=yes" in out.stderr and "zfs receive -x" in out.stderr
        assert "mountpoint" in out.stderr and "remove props=yes" in out.stderr
        assert zb.srcside.snapshots(zb.src_fs()) == []  # refused before anything was done
        return
    src, dst, fs = zb.srcside, zb.dstside, zb.dst_fs()
    own = PurePosixPath(f"/srv/{zb.name}-own-path")
    src.run("zfs", "set", f"mountpoint={own}", zb.src_fs())
    src.run("zfs", "set", "org.example:tier=gold", zb.src_fs())
    volume = zb.src_fs("vol")
    src.run("zfs", "create", "-V", "16M", volume)
    src.run("zfs", "set", "org.example:tier=silver", volume)
    zb.write_pairs(line, zb.pair_line("vol", "props=yes"))
    for action in ("initialize", "update"):
        ok(zb, action, fs)
        ok(zb, action, zb.dst_fs("vol"))
        src.write_random(own / f"{action}.bin", 1)
    assert dst.zget(fs, "org.example:tier") == "gold"  # the properties travelled
    mount = dst.run("zfs", "get", "-H", "-o", "value,source", "mountpoint", fs).stdout.split()
    assert mount[0] == str(zb.dst_dir()) and mount[1] not in ("received", "local"), mount
    assert dst.zget(fs, "mounted") == "yes"
    ok(zb, "update", fs)
    assert dst.checksums(zb.dst_dir()) == src.checksums(own)  # each in its own place
    assert dst.zget(zb.dst_fs("vol"), "type") == "volume"
    assert dst.zget(zb.dst_fs("vol"), "org.example:tier") == "silver"
    last = dst.zget(zb.dst_fs("vol"), "zettabee:lastsnap")
    assert dst.zget(f"{zb.dst_fs('vol')}@{last}", "guid") == src.zget(f"{volume}@{last}", "guid")
