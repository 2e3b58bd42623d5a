"""The monitoring server down or refusing while cron replicates.

A monitoring outage must cost no replication and no result: the run succeeds (exit 0),
says once on stderr that results wait, keeps them in the spool (readable by root only),
and the first run after the outage delivers them, oldest first.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab.icinga import Icinga2Daemon, free_port, passive_service_config
from lab.nscad import NscaDaemon
from nsca.backends import make_backend
from nsca.spool import Spool
from tests.conftest import running_daemon
from tests.integration.faults.conftest import INTACT, Faults, Replica

pytestmark = pytest.mark.integration

HOST = "backup1"


def services(replica: Replica) -> list[str]:
    return [f"zettabee lag {replica.fs}", f"zettabee runtime {replica.fs}"]


def assert_private(spool: Spool) -> None:
    """Spooled results name hosts and file systems: nobody but root reads them."""
    entries = list(spool.path.rglob("*"))
    assert any(p.is_file() for p in entries), "nothing was spooled"
    for path in [spool.path, *entries]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def test_nsca_down_during_the_run(faults: Faults, nscad: NscaDaemon) -> None:
    zb = faults.zb
    replica = faults.replica(mb=1)
    zb.write_settings(
        f"[monitoring]\nhost_name = {HOST}\npassive = nsca\n\n[nsca]\nhost = {nscad.host}\n"
        f"port = {nscad.port}\npassword = {nscad.password}\nencryption = xor\ntimeout = 5\n"
    )
    nscad.stop()
    replica.grow(1)
    faults.expect(
        "NSCA server down (replicate)",
        "exit 0, data replicated; stderr: results spooled; lag OK; runtime OK; the next "
        "run delivers old then new",
    )
    outcome = faults.run("replicate", replica.fs)
    faults.check(replica, outcome, code=0, lag=0, runtime=0, says=r"refused.*spooled", updated=True)
    spool = Spool(zb.tmp / "spool")
    assert [r.service for r in spool.pending("nsca")] == services(replica)
    assert_private(spool)
    nagios = faults.run("zettabee", "update", "--nagios", replica.fs)
    assert (nagios.code, nagios.stdout) == (0, ""), nagios.stderr
    assert "spooled" in nagios.stderr
    nscad.start()
    back = faults.run("replicate", replica.fs)
    assert (back.code, back.stderr) == (0, "")
    lines = nscad.wait_for(6)
    assert [line.service for line in lines] == services(replica) * 3
    assert spool.pending("nsca") == []
    assert faults.row is not None
    faults.row.observed += "; server back: 6 results delivered in order, spool empty"


@pytest.fixture
def icinga(faults: Faults) -> Iterator[Icinga2Daemon]:
    daemon = Icinga2Daemon(
        passive_service_config(
            HOST, [f"zettabee {c} {faults.zb.dst_fs()}" for c in ("lag", "runtime")]
        )
    )
    with running_daemon(daemon):
        yield daemon


def api_settings(url: str, user: str, password: str, cafile: str) -> str:
    return (
        f"[monitoring]\nhost_name = {HOST}\npassive = icinga2-api\n\n[icinga2-api]\nurl = {url}\n"
        f"user = {user}\npassword = {password}\ncafile = {cafile}\ntimeout = 5\n"
    )


def replica_with_the_api_down(faults: Faults, icinga: Icinga2Daemon) -> Replica:
    """An initialized pair, grown, whose settings point at an Icinga API nobody serves."""
    replica = faults.replica(mb=1)
    user = icinga.submitter
    nobody = f"https://127.0.0.1:{free_port()}"
    faults.zb.write_settings(
        api_settings(nobody, user.name, str(user.password), str(icinga.cafile))
    )
    replica.grow(1)
    return replica


def lag_result(icinga: Icinga2Daemon, replica: Replica) -> dict[str, Any]:
    """The lag service as Icinga has it, once a result has arrived (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        lag = icinga.query_service(HOST, services(replica)[0])
        if lag["output"] or time.monotonic() > deadline:
            return lag
        time.sleep(0.1)


def test_icinga_api_down_then_refusing_then_back(faults: Faults, icinga: Icinga2Daemon) -> None:
    zb = faults.zb
    user = icinga.submitter
    replica = replica_with_the_api_down(faults, icinga)
    faults.expect(
        "Icinga 2 API down (replicate)",
        "exit 0, data replicated; stderr: refused, spooled; lag OK; runtime OK",
    )
    down = faults.run("replicate", replica.fs)
    faults.check(replica, down, code=0, lag=0, runtime=0, says=r"refused.*spooled", updated=True)

    zb.write_settings(api_settings(icinga.url, user.name, "not-the-password", str(icinga.cafile)))
    replica.grow(1)
    row = faults.expect(
        "Icinga 2 API refusing the credentials (401)",
        "exit 0, data replicated; stderr names the 401 and user=/password=; spooled",
    )
    refused = faults.run("replicate", replica.fs)
    faults.check(
        replica,
        refused,
        code=0,
        lag=0,
        runtime=0,
        says=r"refused the credentials of ApiUser 'submitter' \(401\): check user= and password=",
        updated=True,
    )
    spool = Spool(zb.tmp / "spool")
    assert len(spool.pending("icinga2-api")) == 4
    assert_private(spool)

    zb.write_settings(api_settings(icinga.url, user.name, str(user.password), str(icinga.cafile)))
    back = faults.run("replicate", replica.fs)
    assert (back.code, back.stderr) == (0, "")
    assert spool.pending("icinga2-api") == []
    lag = lag_result(icinga, replica)
    assert lag["state"] == 0 and lag["output"].startswith(f"ZETTABEE_LAG OK - {replica.fs} lag")
    row.observed += "; right password: spool delivered, Icinga shows lag OK"
    assert row.data == INTACT


def test_spooled_results_reach_icinga_with_the_time_they_were_measured(
    faults: Faults, icinga: Icinga2Daemon
) -> None:
    """After an outage the spool's results arrive late: Icinga must see when each one was
    measured (execution_start/end), not take the arrival for the present state."""
    zb = faults.zb
    user = icinga.submitter
    replica = replica_with_the_api_down(faults, icinga)
    row = faults.expect(
        "results spooled in an Icinga API outage, delivered later",
        "Icinga shows each late result at the time the run measured it",
    )
    measured = time.time()
    down = faults.run("replicate", replica.fs)
    faults.check(replica, down, code=0, lag=0, runtime=0, says=r"refused.*spooled", updated=True)
    spool = Spool(zb.tmp / "spool")
    assert len(spool.pending("icinga2-api")) == 2
    time.sleep(3)  # the outage: the results wait
    backend = make_backend(
        "icinga2-api",
        {"url": icinga.url, "user": user.name, "password": str(user.password),
         "cafile": str(icinga.cafile)},
    )  # fmt: skip
    flushed = spool.flush("icinga2-api", backend)
    delivered_at = time.time()
    assert (flushed.delivered, flushed.remaining) == (2, 0), flushed
    lag = lag_result(icinga, replica)
    ended = float(lag["last_check_result"].get("execution_end") or 0)
    row.observed = (
        f"result measured {delivered_at - measured:.1f} s before delivery; Icinga's "
        f"execution_end is {delivered_at - ended:.1f} s before delivery"
    )
    assert measured - 1 <= ended <= measured + 30 and ended < delivered_at - 2, row.observed
    row.data = replica.intact()
    assert row.data == INTACT
