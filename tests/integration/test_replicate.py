"""``replicate``, the cron job, on the real lab with the real monitoring daemons.

What nsca writes to its command file is what Nagios or Icinga would read; the Icinga 2
API is read back for the state it took. The monitoring server going down must cost no
replication and no result.

The nsca rows run on every back end's backup host: on OpenZFS 2.1 and 2.3 the package's
``replicate`` in the guest submits to an nsca daemon the test starts in the guest (the
image masks nsca's own unit); the Icinga 2 API row runs on zfs-fuse, where icinga2 is.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lab.guest import GuestNscaDaemon
from lab.icinga import Icinga2Daemon, passive_service_config
from lab.nscad import NSCA_BINARY, CommandLine, NscaDaemon
from nsca.spool import Spool
from tests.conftest import BACKENDS, Zb, backend_zb, running_daemon
from tests.integration.conftest import require

pytestmark = pytest.mark.integration

HOST = "backup1"


@pytest.fixture
def zb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Zb]:
    yield from backend_zb(request, tmp_path)


@pytest.fixture
def nscad(zb: Zb, tmp_path: Path) -> Iterator[NscaDaemon]:
    """A fresh nsca on the backup host's loopback, XOR encryption, a random password."""
    if zb.backend.host is None:
        require(NSCA_BINARY, "nsca")
        daemon = NscaDaemon(password=secrets.token_hex(8), decryption=1)
    else:
        daemon = GuestNscaDaemon(
            zb.backend.host, tmp_path / "nscad", password=secrets.token_hex(8), decryption=1
        )
    with daemon:
        yield daemon


every_backend = pytest.mark.parametrize("zb", BACKENDS, indirect=True)


def nsca_settings(nscad: NscaDaemon) -> str:
    return (
        f"[monitoring]\nhost_name = {HOST}\npassive = nsca\n\n"
        f"[nsca]\nhost = {nscad.host}\nport = {nscad.port}\npassword = {nscad.password}\n"
        "encryption = xor\ntimeout = 5\n"
    )


def replicate(zb: Zb, *args: str) -> subprocess.CompletedProcess[str]:
    return zb.exe("replicate", *args, timeout=300)


def services(zb: Zb, leaf: str) -> tuple[str, str]:
    fs = zb.dst_fs(leaf)
    return f"zettabee lag {fs}", f"zettabee runtime {fs}"


def by_service(lines: Sequence[CommandLine]) -> dict[str | None, CommandLine]:
    found = {line.service: line for line in lines}
    assert len(found) == len(lines), f"a service was reported twice: {lines}"
    return found


def initialized(zb: Zb, *leaves: str, options: str = "") -> None:
    for leaf in leaves:
        zb.make_source(leaf, 2)
    zb.write_pairs(*(zb.pair_line(leaf, options) for leaf in leaves))
    for leaf in leaves:
        out = zb.run("initialize", zb.dst_fs(leaf))
        assert out.returncode == 0, out.stderr


@pytest.mark.one_openzfs
@every_backend
def test_results_reach_nsca_as_the_plugins_print_them(zb: Zb, nscad: NscaDaemon) -> None:
    zb.write_settings(nsca_settings(nscad))
    initialized(zb, "one", "two")
    run = replicate(zb, "--all")
    assert (run.returncode, run.stdout, run.stderr) == (0, "", ""), "quiet on success"

    got = by_service(nscad.wait_for(4))
    assert len(got) == 4
    clock, seconds = zb.moments()
    for leaf in ("one", "two"):
        fs = zb.dst_fs(leaf)
        lag, runtime = (got[name] for name in services(zb, leaf))
        assert (lag.host, lag.code, runtime.host, runtime.code) == (HOST, 0, HOST, 0)
        assert re.fullmatch(
            rf"ZETTABEE_LAG OK - {fs} lag {clock} \| lag={seconds}s;7200;21600;0", lag.output
        ), lag.output
        # An idle pair's runtime does not move: the passive text is the active text.
        active = zb.exe("check_zettabee_runtime", fs)
        assert active.returncode == 0
        assert runtime.output == active.stdout.rstrip("\n")
        assert "last update took" in runtime.output
        assert runtime.output.endswith(";3600;14400;0")


def test_zettabee_nagios_reports_through_the_same_path(zb: Zb, nscad: NscaDaemon) -> None:
    zb.write_settings(nsca_settings(nscad))
    initialized(zb, "data")
    out = zb.run("update", "--nagios", zb.dst_fs("data"))
    assert out.returncode == 0, out.stderr
    got = by_service(nscad.wait_for(2))
    lag, runtime = (got[name] for name in services(zb, "data"))
    assert lag.code == 0 and lag.output.startswith(f"ZETTABEE_LAG OK - {zb.dst_fs('data')} lag")
    assert runtime.code == 0


@pytest.mark.one_openzfs
@every_backend
def test_one_failing_pair_stops_no_other_and_says_why(zb: Zb, nscad: NscaDaemon) -> None:
    zb.write_settings(nsca_settings(nscad))
    initialized(zb, "good")
    zb.make_source("bad", 1)  # never initialized: its update must fail
    zb.write_pairs(zb.pair_line("bad"), zb.pair_line("good"))
    zb.srcside.write_random(zb.src_dir("good") / "more.bin", 3)

    run = replicate(zb, "--all", "--jobs", "2")
    assert run.returncode == 1
    assert run.stdout == ""
    assert f"{zb.dst_fs('bad')}" in run.stderr and "not initialized" in run.stderr
    assert zb.dst_fs("good") not in run.stderr
    zb.assert_same_data("good")

    got = by_service(nscad.wait_for(4))
    bad_lag, bad_runtime = (got[name] for name in services(zb, "bad"))
    assert bad_runtime.code == 2
    assert bad_runtime.output.startswith(
        f"ZETTABEE_RUNTIME CRITICAL - {zb.dst_fs('bad')} last update failed: not initialized"
    )
    assert "zettabee initialize" in bad_runtime.output
    assert bad_lag.code == 3
    good_lag, good_runtime = (got[name] for name in services(zb, "good"))
    assert (good_lag.code, good_runtime.code) == (0, 0)


@pytest.mark.zfs_independent
@every_backend
def test_parallel_pairs_share_one_control_connection(zb: Zb) -> None:
    initialized(zb, "a", "b", "c", "d")
    run = replicate(zb, "--all", "--jobs", "4", "--debug", "--no-passive")
    assert run.returncode == 0, run.stderr
    connects = re.findall(r"ssh to \S+ in [0-9.]+s", run.stderr)
    assert len(connects) == 1, connects
    for leaf in "abcd":
        zb.assert_same_data(leaf)


@pytest.mark.zfs_independent
@every_backend
def test_monitoring_down_loses_nothing(zb: Zb, nscad: NscaDaemon) -> None:
    zb.write_settings(nsca_settings(nscad))
    initialized(zb, "data")
    spool = Spool(zb.tmp / "spool")
    nscad.stop()

    zb.srcside.write_random(zb.src_dir("data") / "while-down.bin", 2)
    down = replicate(zb, zb.dst_fs("data"))
    assert down.returncode == 0, "a monitoring server that is down never fails replication"
    assert down.stdout == ""
    assert "spooled" in down.stderr and "refused" in down.stderr
    zb.assert_same_data("data")
    waiting = spool.pending("nsca")
    assert [r.service for r in waiting] == list(services(zb, "data"))
    assert waiting[0].perfdata[0].endswith(";7200;21600;0")
    assert waiting[1].perfdata[0].endswith(";3600;14400;0")

    # The next run, with other thresholds so that old and new results differ.
    zb.write_pairs(zb.pair_line("data", "wlag=3000,clag=9000,wrun=600,crun=1200"))
    nscad.start()
    back = replicate(zb, zb.dst_fs("data"))
    assert (back.returncode, back.stderr) == (0, "")
    lines = nscad.wait_for(4)
    assert len(lines) == 4
    assert [line.service for line in lines] == list(services(zb, "data")) * 2
    old, new = lines[:2], lines[2:]
    assert all(";7200;21600;0" in line.output or ";3600;14400;0" in line.output for line in old)
    assert all(";3000;9000;0" in line.output or ";600;1200;0" in line.output for line in new)
    assert spool.pending("nsca") == []


@pytest.fixture
def icinga(zb: Zb) -> Iterator[Icinga2Daemon]:
    names = [name for leaf in ("ok", "bad") for name in services(zb, leaf)]
    daemon = Icinga2Daemon(passive_service_config(HOST, names))
    with running_daemon(daemon):
        yield daemon


def test_results_reach_the_icinga2_api(zb: Zb, icinga: Icinga2Daemon) -> None:
    zb.write_settings(
        f"[monitoring]\nhost_name = {HOST}\npassive = icinga2-api\n\n"
        f"[icinga2-api]\nurl = {icinga.url}\nuser = {icinga.submitter.name}\n"
        f"password = {icinga.submitter.password}\ncafile = {icinga.cafile}\n"
    )
    initialized(zb, "ok")
    zb.make_source("bad", 1)
    zb.write_pairs(zb.pair_line("ok"), zb.pair_line("bad"))
    run = replicate(zb, "--all")
    assert run.returncode == 1 and "not initialized" in run.stderr

    lag_name, runtime_name = services(zb, "ok")
    lag = _settled(icinga, lag_name)
    assert lag["state"] == 0
    assert re.fullmatch(rf"ZETTABEE_LAG OK - {zb.dst_fs('ok')} lag 0:00:0\d", lag["output"])
    assert len(lag["performance_data"]) == 1
    assert re.fullmatch(r"lag=\ds;7200;21600;0", lag["performance_data"][0])
    assert _settled(icinga, runtime_name)["state"] == 0

    bad = _settled(icinga, services(zb, "bad")[1])
    assert bad["state"] == 2
    assert bad["output"].startswith(
        f"ZETTABEE_RUNTIME CRITICAL - {zb.dst_fs('bad')} last update failed: not initialized"
    )
    assert _settled(icinga, services(zb, "bad")[0])["state"] == 3


def _settled(icinga: Icinga2Daemon, service: str) -> dict[str, object]:
    """The service once a result arrived (the API applies results asynchronously)."""
    deadline = time.monotonic() + 10
    while True:
        found = icinga.query_service(HOST, service)
        if found["output"] or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
