"""The check plugins on the real lab, run as Icinga's CheckCommand runs them, on the
backup host of every back end (here on zfs-fuse; on OpenZFS 2.1 and 2.3 the ones the
Debian package installed in the guest).

The plugin file is executed directly (its ``#!/usr/bin/env python3`` finds the Python on
PATH, as the nagios user's would), with the arguments as separate argv items, no shell,
and a bare environment: the settings file is passed with ``--settings``, as the
CheckCommand's ``zettabee_lag_settings`` variable does.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BACKENDS, Zb, backend_zb

pytestmark = pytest.mark.integration


@pytest.fixture(params=BACKENDS)
def zb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Zb]:
    yield from backend_zb(request, tmp_path)


def check(zb: Zb, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return zb.plugin(name, *args)


def state_of(proc: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    assert proc.stderr == "", "Nagios does not show stderr: nothing may go there"
    return proc.returncode, proc.stdout


def wait_for_code(zb: Zb, code: int, *args: str, timeout: float = 20) -> str:
    """Run the lag check until it exits ``code``; every other exit must be OK or lower."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        got, out = state_of(check(zb, "check_zettabee_lag", *args))
        seen.append((got, out.strip()))
        if got == code:
            return out
        assert got < code, f"expected to reach {code} from below, saw {seen}"
        time.sleep(0.3)
    raise AssertionError(f"the lag check never exited {code}: {seen[-3:]}")


@pytest.mark.one_openzfs
def test_ok_after_an_update(zb: Zb) -> None:
    zb.make_source("data", 4)
    zb.write_pairs(zb.pair_line("data"))
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    assert zb.run("update", zb.dst_fs()).returncode == 0
    fs = zb.dst_fs()

    clock, seconds = zb.moments()
    code, out = state_of(check(zb, "check_zettabee_lag", fs))
    assert code == 0
    assert re.fullmatch(
        rf"ZETTABEE_LAG OK - {fs} lag {clock} \| lag={seconds}s;7200;21600;0\n", out
    ), out

    code, out = state_of(check(zb, "check_zettabee_runtime", fs))
    assert code == 0
    assert re.fullmatch(
        rf"ZETTABEE_RUNTIME OK - {fs} last update took {clock} \| runtime={seconds}s;3600;14400;0\n",
        out,
    ), out

    # Any name find_pair accepts works, and -w/-c override the pair's thresholds.
    code, out = state_of(check(zb, "check_zettabee_lag", "-w", "0", "-c", "1h", zb.dst_fs()))
    assert code in (0, 1) and "lag=" in out and ";0;3600;0" in out


@pytest.mark.one_openzfs
def test_warning_then_critical_as_the_lag_grows(zb: Zb) -> None:
    zb.make_source("data", 1)
    zb.write_pairs(zb.pair_line("data", "wlag=2,clag=4"))
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    fs = zb.dst_fs()
    if zb.backend.host is None:
        warning = wait_for_code(zb, 1, fs)
        assert re.fullmatch(
            rf"ZETTABEE_LAG WARNING - {fs} lag 0:00:0[34] \(over 0:00:02\) \| lag=[34]s;2;4;0\n",
            warning,
        ), warning
        w, c = 2, 4
    else:  # emulated: the lag is tens of seconds once initialize ends, a check takes seconds
        now = int(re.findall(r"lag=(\d+)s", check(zb, "check_zettabee_lag", fs).stdout)[0])
        w, c = now + 10, now + 25
        zb.write_pairs(zb.pair_line("data", f"wlag={w},clag={c}"))
        warning = wait_for_code(zb, 1, fs, timeout=60)
        assert re.fullmatch(
            rf"ZETTABEE_LAG WARNING - {fs} lag 0:0\d:\d\d \(over 0:0{w // 60}:{w % 60:02d}\) "
            rf"\| lag=\d+s;{w};{c};0\n",
            warning,
        ), warning
    critical = wait_for_code(zb, 2, fs, timeout=60)
    assert re.fullmatch(
        rf"ZETTABEE_LAG CRITICAL - {fs} lag 0:0\d:\d\d \(over 0:0{c // 60}:{c % 60:02d}\) "
        rf"\| lag=\d+s;{w};{c};0\n",
        critical,
    ), critical
    # The admin's ranges win over the pair file's.
    code, out = state_of(check(zb, "check_zettabee_lag", "-w", "1h", "-c", "2h", fs))
    assert code == 0 and out.endswith(";3600;7200;0\n")
    # An update brings it back to OK.
    assert zb.run("update", fs).returncode == 0
    assert state_of(check(zb, "check_zettabee_lag", fs))[0] == 0


@pytest.mark.zfs_independent
def test_unknown_for_an_uninitialized_pair_and_an_unknown_one(zb: Zb) -> None:
    zb.make_source("data", 1)
    zb.write_pairs(zb.pair_line("data"))
    fs = zb.dst_fs()
    for name in ("check_zettabee_lag", "check_zettabee_runtime"):
        code, out = state_of(check(zb, name, fs))
        assert code == 3, out
        assert out.startswith(("ZETTABEE_LAG UNKNOWN - ", "ZETTABEE_RUNTIME UNKNOWN - "))
        assert fs in out and "|" not in out, "no perfdata for what cannot be measured"
    code, out = state_of(check(zb, "check_zettabee_lag", "nosuch/pair"))
    assert code == 3
    assert out.startswith("ZETTABEE_LAG UNKNOWN - no pair 'nosuch/pair' in ")
    code, out = state_of(check(zb, "check_zettabee_runtime", "nosuch"))
    assert code == 3 and "no pair 'nosuch'" in out


@pytest.mark.zfs_independent
def test_all_pairs_in_one_check(zb: Zb) -> None:
    for leaf in ("one", "two", "new"):
        zb.make_source(leaf, 1)
    zb.write_pairs(*(zb.pair_line(leaf) for leaf in ("one", "two", "new")))
    for leaf in ("one", "two"):
        assert zb.run("initialize", zb.dst_fs(leaf)).returncode == 0
    code, out = state_of(check(zb, "check_zettabee_lag", "--all"))
    assert code == 3, "a pair that is not initialized yet is UNKNOWN"
    first, perfdata = out.rstrip("\n").split(" | ")
    assert first.startswith(f"ZETTABEE_LAG UNKNOWN - {zb.dst_fs('new')}")
    labels = sorted(item.split("=")[0] for item in perfdata.split(" "))
    assert labels == sorted(f"'{zb.dst_fs(leaf)}'" for leaf in ("one", "two"))
    # Past the thresholds, the late pairs outrank the unknown one.
    code, out = state_of(check(zb, "check_zettabee_lag", "--all", "-w", "~:-1", "-c", "~:-1"))
    assert code == 2 and "(+2 more)" in out


@pytest.mark.one_openzfs
def test_killed_run_is_critical_with_the_unlock_fix(zb: Zb) -> None:
    # A stream of 5 s at least: the first progress report (after 1 s) comes mid-stream,
    # before anything is recorded, however fast the lab is that day.
    zb.make_source("big", 50)
    zb.write_pairs(zb.pair_line("big", zb.mbuffer("bwlimit=10M")))
    fs = zb.dst_fs("big")
    progress = zb.tmp / "state" / f"{zb.fingerprint('big')}.progress"
    run = zb.popen("zettabee", "initialize", fs)
    deadline = time.monotonic() + 60
    while not progress.exists():
        assert run.poll() is None, f"initialize ended before it was killed: {run.communicate()}"
        assert time.monotonic() < deadline, "no progress in 60 s"
        time.sleep(0.02)
    zb.kill(run, signal.SIGKILL)
    run.communicate()
    # (ssh says 255 for a remote command killed by a signal)
    assert run.returncode == (-signal.SIGKILL if zb.backend.host is None else 255)

    code, out = state_of(check(zb, "check_zettabee_runtime", fs))
    assert code == 2, out
    assert out.startswith(f"ZETTABEE_RUNTIME CRITICAL - {fs} initialize was interrupted (pid ")
    assert f"run `zettabee unlock {fs}`" in out
    assert state_of(check(zb, "check_zettabee_lag", fs))[0] == 3

    # The fix the message gives works, and the state after it is said plainly.
    unlock = zb.run("unlock", fs)
    assert unlock.returncode == 0, unlock.stderr
    code, out = state_of(check(zb, "check_zettabee_runtime", fs))
    assert code == 2 and "unlocked by operator" in out and "interrupted" not in out.split(":")[0]
    _wait_for_receive_to_end(zb, fs)


def _wait_for_receive_to_end(zb: Zb, fs: str) -> None:
    """A killed run's `zfs receive` dies with its pipe; cleanup must not race it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        procs = zb.dstside.sh("ps -eo args").stdout
        if fs not in procs:
            return
        time.sleep(0.2)


@pytest.mark.zfs_independent
def test_usage_errors_exit_unknown(zb: Zb) -> None:
    for name, args in (
        ("check_zettabee_lag", ["--warning"]),
        ("check_zettabee_lag", ["-x", "a"]),
        ("check_zettabee_runtime", []),
    ):
        code, out = state_of(check(zb, name, *args))
        assert code == 3, (name, args, out)
        assert " UNKNOWN - " in out.splitlines()[0]
