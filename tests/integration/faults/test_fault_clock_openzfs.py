"""A source whose clock is stepped back between two runs, on OpenZFS.

ZFS stamps a snapshot's ``creation`` with the clock of the host that takes it, so after a
step back the newer snapshot looks older than the one before it. Only ``createtxg``, the
pool's own transaction counter, still says which came last. zfs-fuse cannot show this
(its one daemon stamps every pool of the lab with this machine's clock); the OpenZFS
guest's kernel clock is the source's, and can be stepped without touching this machine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.guest import Guest
from tests.conftest import Zb, _zb, openzfs_backend
from tests.integration.faults.conftest import INTACT, ROWS, Row

pytestmark = pytest.mark.integration


@pytest.fixture
def zb(guest: Guest, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Zb]:
    yield from _zb(openzfs_backend(guest), tmp_path, request)


@pytest.fixture
def stepped_back(guest: Guest) -> Iterator[None]:
    """The guest's clock an hour behind, for the test; set right again afterwards."""
    guest.shell("date -s @$(( $(date +%s) - 3600 )) >/dev/null")
    try:
        yield
    finally:
        guest.run("date", "-s", f"@{int(time.time())}")


def test_source_clock_stepped_back_between_runs(zb: Zb, request: pytest.FixtureRequest) -> None:
    row = Row(
        "source clock stepped back 1h between runs (OpenZFS)",
        "update exit 0; status Synchronized, not 'Inconsistent!'; lag from this host's "
        "clock; replica intact",
    )
    ROWS.append(row)
    zb.make_source(mb=1)
    zb.write_pairs(zb.pair_line(options="keep=3"))  # the older snapshot stays beside the new
    init = zb.run("initialize", zb.dst_fs())
    assert init.returncode == 0, init.stderr
    [first] = zb.dstside.snapshots(zb.dst_fs())
    request.getfixturevalue("stepped_back")
    zb.srcside.write_random(zb.src_dir() / "more.bin", 1)
    update = zb.run("update", zb.dst_fs())
    assert (update.returncode, update.stderr) == (0, ""), update.stderr
    status = zb.run("status", zb.dst_fs())
    row.observed = f"update exit 0; status: {' '.join(status.stdout.split()[2:5])}"
    newest = zb.dstside.zget(zb.dst_fs(), "zettabee:lastsnap")
    created = {s: int(zb.dstside.zget(f"{zb.dst_fs()}@{s}", "creation")) for s in (first, newest)}
    assert created[newest] < created[first], ("the step back did not show", created)
    zb.assert_same_data()
    row.data = INTACT
    assert status.returncode == 0 and "Synchronized" in status.stdout, status.stdout
    lag = status.stdout.split()[3]
    assert not lag.startswith("-") and lag.startswith("0:0"), status.stdout
    # Without the status file (a state directory lost or new) every snapshot is read.
    for path in (zb.tmp / "state").glob(f"{zb.fingerprint()}.json"):
        path.unlink()
    unhinted = zb.run("status", zb.dst_fs())
    row.observed += f"; without the status file: {' '.join(unhinted.stdout.split()[2:4])}"
    assert "Synchronized" in unhinted.stdout, unhinted.stdout
