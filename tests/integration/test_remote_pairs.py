"""Pairs whose two ends are both remote: zettabee on a third host reads from one host and
receives on another, or on the same remote host.

One remote host: on the zfs-fuse lab the source host, reached over SSH, also serves the
destination pool (the one zfs-fuse daemon serves every pool to every namespace), so
``10.77.N.2:src/x 10.77.N.2:dst/x`` is a pair with two remote ends; every zfs command of
the destination goes through that host's sshd. (On the OpenZFS guest every pair of
``test_replication.py`` is of this kind.) Two different remote hosts: the zfs-fuse lab's
source host into the OpenZFS guest, the stream relayed through this machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.guest import Guest
from lab.zfslab import ZfsLab
from tests.conftest import Backend, Side, Zb, _local_argv, _zb, openzfs_backend

pytestmark = pytest.mark.integration


@pytest.fixture
def rzb(lab: ZfsLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Zb]:
    """Both ends on the zfs-fuse lab's source host (the tests look at the pools here)."""
    src = lab.source
    backend = Backend(
        name="zfs-fuse, both ends remote",
        src_host=src,
        src=Side(src.address, src.pool, src.mountpoint, _local_argv, local_files=True),
        dst=Side(
            src.address, lab.dst_pool, str(lab.dst_mountpoint), _local_argv, local_files=True
        ),  # fmt: skip
    )
    yield from _zb(backend, tmp_path, request)


@pytest.mark.parametrize("transport", ["ssh", "mbuffer", "local"])
def test_both_ends_on_one_remote_host(rzb: Zb, transport: str) -> None:
    zb = rzb
    zb.make_source(mb=20)
    zb.write_pairs(zb.pair_line(options=f"transport={transport}"))
    zb.initialize_then_update()

    # zettabee status reads the destination over SSH ...
    [row] = json.loads(zb.run("status", "--json").stdout)
    assert row["destination"] == f"{zb.src.address}:{zb.dst_fs()}"
    assert row["state"] == "Synchronized" and 0 <= row["lag"] < 300
    assert row["last_bytes"] > 0
    # ... the check plugin, which never opens SSH, from what the run recorded
    check = zb.exe("check_zettabee_lag", zb.dst_fs())
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("ZETTABEE_LAG OK") and "lag=" in check.stdout


def test_prune_and_rollback_happen_on_the_remote_destination(rzb: Zb) -> None:
    zb = rzb
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line(options="keep=1"))
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    time.sleep(1.05)  # snapshot names have one-second resolution
    assert zb.run("update", zb.dst_fs()).returncode == 0
    assert zb.dstside.snapshots(zb.dst_fs()) == zb.srcside.snapshots(zb.src_fs())
    assert len(zb.dstside.snapshots(zb.dst_fs())) == 1

    zb.dstside.run("zfs", "snapshot", f"{zb.dst_fs()}@extra")
    refused = zb.run("update", zb.dst_fs())
    assert (
        refused.returncode == 1 and "extra" in refused.stderr and "rollback=yes" in refused.stderr
    )
    assert "extra" in zb.dstside.snapshots(zb.dst_fs())
    zb.dstside.run("zfs", "destroy", f"{zb.dst_fs()}@extra")

    # a change made on the destination is refused, then rolled back there when allowed
    zb.dstside.run("zfs", "set", "readonly=off", zb.dst_fs())
    zb.dstside.write_text(zb.dst_dir() / "local-change", "oops")
    zb.srcside.write_text(zb.src_dir() / "x", "x")
    refused = zb.run("update", zb.dst_fs())
    assert refused.returncode == 1 and "modified" in refused.stderr
    assert "local-change" in zb.dstside.checksums(zb.dst_dir())
    zb.write_pairs(zb.pair_line(options="keep=1,rollback=yes"))
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()  # local-change is gone, x arrived


def test_local_transport_between_two_hosts_is_refused(rzb: Zb) -> None:
    zb = rzb
    zb.make_source(mb=1)
    line = f"{zb.src.address}:{zb.src_fs()}  localhost:{zb.dst_fs()}  transport=local"
    zb.write_pairs(line)
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 1
    assert "transport=local runs zfs send | zfs receive on one host" in out.stderr
    assert "transport=ssh" in out.stderr
    setup = zb.run("setup", zb.dst_fs())
    assert setup.returncode == 1 and "FAIL transport=local" in setup.stdout


@pytest.fixture
def xzb(lab: ZfsLab, guest: Guest, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Zb]:
    """Source on the zfs-fuse lab's host, destination in the OpenZFS guest: two remote
    hosts. The guest takes the lab's client key too, as an operator would install
    zettabee's one key on every host it reaches."""
    key = Path(lab.source.key).with_suffix(".pub").read_text().strip()
    guest.shell(
        f"grep -qxF '{key}' /root/.ssh/authorized_keys || echo '{key}' >>/root/.ssh/authorized_keys"
    )
    src = lab.source
    backend = Backend(
        name="zfs-fuse into openzfs",
        src_host=src,
        src=Side(src.address, src.pool, src.mountpoint, _local_argv, local_files=True),
        dst=openzfs_backend(guest).dst,
    )
    yield from _zb(backend, tmp_path, request)


def test_two_remote_hosts_setup_pins_both_and_the_stream_is_relayed(xzb: Zb) -> None:
    zb = xzb
    zb.make_source(mb=8)
    known = zb.tmp / "known_hosts"
    known.write_text("")
    zb.write_pairs(zb.pair_line(options=f"knownhosts={known}"))
    refused = zb.run("initialize", zb.dst_fs())
    assert refused.returncode == 1 and "--accept-new-host-key" in refused.stderr
    setup = zb.run("setup", "--accept-new-host-key", zb.dst_fs())
    assert setup.returncode == 0, setup.stdout + setup.stderr
    pinned = known.read_text()
    assert zb.srcside.address in pinned and zb.dstside.address in pinned
    assert f"ok   zfs on {zb.dstside.address}" in setup.stdout

    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    zb.srcside.write_text(zb.src_dir() / "note.txt", "from zfs-fuse to OpenZFS\n")
    out = zb.run("update", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    zb.assert_same_data()
    assert zb.dstside.zget(zb.dst_fs(), "zettabee:fingerprint") == zb.fingerprint()
