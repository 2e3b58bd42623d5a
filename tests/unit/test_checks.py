"""The check compositions on fake healths: states, thresholds, texts, perfdata, exit codes.

Also the plugins' command lines (usage errors are UNKNOWN), that the plugins never load
the replication engine, and that passive results carry exactly what the active checks print.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import nagiosplugin
import pytest

from nsca.errors import SubmitError
from nsca.result import PassiveResult
from nsca.spool import Spool
from zettabee import checks, passive, records
from zettabee.checks import evaluate, lag_check, runtime_check, threshold
from zettabee.config import Settings
from zettabee.errors import LockHeld, StateError
from zettabee.health import INCONSISTENT, SYNCHRONIZED, UNINITIALIZED, UNREADABLE, Health
from zettabee.pair import Endpoint, Pair, PairOptions, fingerprint
from zettabee.state import FAILED, IDLE, INTERRUPTED, RUNNING, StateStore, Status

REPO = Path(__file__).resolve().parents[2]
OPTIONS = PairOptions(wlag=7200, clag=21600, wrun=3600, crun=14400)


def make_pair(fs: str = "backup/data", host: str = "dst", **options: int) -> Pair:
    return Pair(
        Endpoint("src.example.com", "tank/" + fs.rsplit("/", 1)[-1]),
        Endpoint(host, fs),
        records.replace(OPTIONS, **options),
    )


def healthy(fs: str = "backup/data", lag: int | None = 312, **changes: object) -> Health:
    pair = make_pair(fs)
    status = Status(pair.fingerprint, action="update", state=IDLE, last_duration=42.0)
    fields: dict[str, object] = {
        "pair": pair,
        "state": SYNCHRONIZED,
        "lastsnap": "zettabee.x",
        "lag": lag,
        "status": status,
        "run_state": IDLE,
        "runtime": 42,
    }
    fields.update(changes)
    return Health(**fields)  # type: ignore[arg-type]


def lag_of(*healths: Health, **kwargs: object) -> checks.Evaluation:
    return evaluate(lag_check(list(healths), **kwargs))  # type: ignore[arg-type]


def runtime_of(health: Health, **kwargs: object) -> checks.Evaluation:
    return evaluate(runtime_check([health], **kwargs))  # type: ignore[arg-type]


# -- thresholds --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "rendered", "inside", "outside"),
    [
        ("7200", "7200", [0, 7200], [-1, 7201]),
        ("2h", "7200", [7200], [7201]),
        ("1h30m", "5400", [5400], [5401]),
        ("~:10", "~:10", [-999, 10], [11]),
        ("10:", "10:", [10, 10**9], [9]),
        ("1h:2h", "3600:7200", [3600, 7200], [3599, 7201]),
        ("@10:20", "@10:20", [9, 21], [10, 20]),
    ],
)
def test_threshold_ranges(spec: str, rendered: str, inside: list[int], outside: list[int]) -> None:
    limit = threshold(spec)
    assert str(limit) == rendered
    assert all(limit.match(v) for v in inside)
    assert not any(limit.match(v) for v in outside)


@pytest.mark.parametrize("spec", ["", "abc", "2x", "20:10", "1:2:3"])
def test_bad_thresholds_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        threshold(spec)


# -- lag ---------------------------------------------------------------------------------


def test_lag_ok_line_and_perfdata() -> None:
    result = lag_of(healthy())
    assert result.code == 0
    assert result.text == "ZETTABEE_LAG OK - backup/data lag 0:05:12 | lag=312s;7200;21600;0"
    assert result.output == "ZETTABEE_LAG OK - backup/data lag 0:05:12"
    assert result.perfdata == ("lag=312s;7200;21600;0",)


@pytest.mark.parametrize(
    ("lag", "code", "words"),
    [
        (0, 0, "lag 0:00:00"),
        (7200, 0, "lag 2:00:00"),  # ranges are inclusive
        (7201, 1, "lag 2:00:01 (over 2:00:00)"),
        (21600, 1, "lag 6:00:00 (over 2:00:00)"),
        (21601, 2, "lag 6:00:01 (over 6:00:00)"),
        (90061, 2, "lag 1d 01:01:01 (over 6:00:00)"),
    ],
)
def test_lag_thresholds_come_from_the_pair(lag: int, code: int, words: str) -> None:
    result = lag_of(healthy(lag=lag))
    assert result.code == code
    state = ["OK", "WARNING", "CRITICAL"][code]
    assert result.output == f"ZETTABEE_LAG {state} - backup/data {words}"
    assert result.perfdata == (f"lag={lag}s;7200;21600;0",)


def test_each_pair_has_its_own_thresholds() -> None:
    pair = make_pair(wlag=2, clag=4)
    result = lag_of(healthy(lag=3, pair=pair))
    assert result.code == 1
    assert result.perfdata == ("lag=3s;2;4;0",)


def test_ranges_override_the_pair() -> None:
    result = lag_of(healthy(lag=312), warning=threshold("60"), critical=threshold("5m"))
    assert result.code == 2
    assert result.text == (
        "ZETTABEE_LAG CRITICAL - backup/data lag 0:05:12 (over 0:05:00) | lag=312s;60;300;0"
    )
    assert lag_of(healthy(lag=312), warning=threshold("1h")).code == 0
    inverted = lag_of(healthy(lag=312), critical=threshold("@300:400"))
    assert inverted.code == 2 and "(inside 300:400)" in inverted.output
    low = lag_of(healthy(lag=312), warning=threshold("400:"))
    assert low.code == 1 and "(under 0:06:40)" in low.output


@pytest.mark.parametrize("ranges", [{}, {"warning": threshold("~:"), "critical": threshold("~:")}])
def test_negative_lag_is_never_ok(ranges: dict[str, nagiosplugin.Range]) -> None:
    result = lag_of(healthy(lag=-5), **ranges)
    assert result.code == 1, "a clock that stepped back must not read OK, nor page as CRITICAL"
    assert "clock" in result.output
    assert result.output.startswith("ZETTABEE_LAG WARNING - backup/data lag -0:00:05 is negative")
    assert result.perfdata[0].startswith("lag=-5s;")


def test_inconsistent_is_critical_with_the_reason() -> None:
    health = healthy(state=INCONSISTENT, reason="backup/data carries fingerprint abc, not def")
    result = lag_of(health)
    assert result.code == 2
    assert result.output == (
        "ZETTABEE_LAG CRITICAL - backup/data inconsistent: backup/data carries fingerprint "
        "abc, not def"
    )
    assert result.perfdata == ("lag=312s;7200;21600;0",)
    no_lag = lag_of(records.replace(health, lag=None))
    assert no_lag.code == 2 and no_lag.perfdata == ()


def test_uninitialized_and_unreadable_are_unknown_with_the_reason() -> None:
    new = healthy(state=UNINITIALIZED, lag=None, reason="backup/data does not exist: run init")
    result = lag_of(new)
    assert (result.code, result.text) == (
        3,
        "ZETTABEE_LAG UNKNOWN - backup/data does not exist: run init",
    )
    busy = records.replace(new, run_state=RUNNING, runtime=75)
    busy.status = Status(busy.pair.fingerprint, action="initialize", state=RUNNING)
    assert lag_of(busy).output.endswith("; initialize running for 0:01:15")
    broken = lag_of(healthy(state=UNREADABLE, lag=None, reason="cannot read ZFS: pool suspended"))
    assert broken.text == "ZETTABEE_LAG UNKNOWN - backup/data: cannot read ZFS: pool suspended"


def test_every_pair_worst_state_one_label_each() -> None:
    result = lag_of(
        healthy("backup/a", lag=10),
        healthy("backup/b", lag=8000),
        healthy("backup/c", state=UNINITIALIZED, lag=None, reason="backup/c does not exist"),
        every=True,
    )
    assert result.code == 1, "WARNING outranks UNKNOWN in a check over many pairs"
    assert result.output == "ZETTABEE_LAG WARNING - backup/b lag 2:13:20 (over 2:00:00) (+1 more)"
    assert result.perfdata == (
        "'backup/a'=10s;7200;21600;0",
        "'backup/b'=8000s;7200;21600;0",
    )
    worst = lag_of(
        healthy("backup/a", state=UNREADABLE, lag=None, reason="x"),
        healthy("backup/b", state=INCONSISTENT, reason="y"),
        every=True,
    )
    assert worst.code == 2, "CRITICAL outranks UNKNOWN, whatever nagiosplugin's exit codes say"
    assert worst.output.startswith("ZETTABEE_LAG CRITICAL - backup/b inconsistent: y")


def test_every_pair_ok_summary() -> None:
    result = lag_of(healthy("backup/a", lag=10), healthy("backup/b", lag=99), every=True)
    assert result.text == (
        "ZETTABEE_LAG OK - 2 pairs synchronized, highest lag 0:01:39 (backup/b) | "
        "'backup/a'=10s;7200;21600;0 'backup/b'=99s;7200;21600;0"
    )


def test_every_pair_labels_stay_apart() -> None:
    one = healthy("backup/a", lag=1)
    other = records.replace(one, pair=make_pair("backup/a", host="dst2"))
    result = lag_of(one, other, every=True)
    assert result.perfdata == ("'dst2:backup/a'=1s;7200;21600;0", "'dst:backup/a'=1s;7200;21600;0")


def test_broken_pair_file_lines_are_unknown_but_hide_nothing() -> None:
    source = lambda: checks.Survey([healthy(lag=8000)], ["pairs.cfg:3: missing destination"])  # noqa: E731
    result = evaluate(lag_check(source, every=True))
    assert result.code == 1
    assert result.output.endswith("(+1 more)")
    only_broken = lambda: checks.Survey([healthy()], ["pairs.cfg:3: missing destination"])  # noqa: E731
    result = evaluate(lag_check(only_broken, every=True))
    assert result.code == 3
    assert "pair not checked: pairs.cfg:3: missing destination" in result.output


# -- run time ----------------------------------------------------------------------------


def test_runtime_idle_running_and_thresholds() -> None:
    assert runtime_of(healthy()).text == (
        "ZETTABEE_RUNTIME OK - backup/data last update took 0:00:42 | runtime=42s;3600;14400;0"
    )
    running = healthy(run_state=RUNNING, runtime=3700, lock_pid=4242)
    result = runtime_of(running)
    assert result.code == 1
    assert result.output == (
        "ZETTABEE_RUNTIME WARNING - backup/data update running for 1:01:40, pid 4242 (over 1:00:00)"
    )
    assert runtime_of(running, warning=threshold("2h")).code == 0
    assert runtime_of(healthy(runtime=20000)).code == 2


def test_failed_run_is_critical_with_its_error() -> None:
    pair = make_pair()
    status = Status(
        pair.fingerprint,
        action="update",
        state=FAILED,
        error=f"{pair.name}: zfs receive on dst failed (exit 1): cannot receive: out of space",
        last_duration=42.0,
    )
    result = runtime_of(healthy(status=status, run_state=FAILED))
    assert result.code == 2
    assert result.output == (
        "ZETTABEE_RUNTIME CRITICAL - backup/data last update failed: zfs receive on dst "
        "failed (exit 1): cannot receive: out of space"
    )
    assert result.perfdata == ("runtime=42s;3600;14400;0",)


def test_interrupted_run_is_critical_with_the_fix() -> None:
    pair = make_pair()
    status = Status(pair.fingerprint, action="initialize", state=RUNNING, pid=999999)
    result = runtime_of(healthy(status=status, run_state=INTERRUPTED, runtime=None))
    assert result.code == 2
    assert result.text == (
        "ZETTABEE_RUNTIME CRITICAL - backup/data initialize was interrupted (pid 999999 is "
        "gone) and left its lock behind: run `zettabee unlock backup/data`, then update"
    )


def test_runtime_unknown_without_a_run_or_with_a_corrupt_status() -> None:
    pair = make_pair()
    never = healthy(state=UNINITIALIZED, lag=None, status=Status(pair.fingerprint), runtime=None)
    result = runtime_of(never)
    assert result.code == 3
    assert "no completed run recorded" in result.output and "zettabee initialize" in result.output
    corrupt = Status(pair.fingerprint, corrupt="status file /x.json unreadable: bad JSON")
    result = runtime_of(healthy(status=corrupt, runtime=None))
    assert result.code == 3
    assert "`zettabee unlock backup/data` resets it" in result.output


# -- where the pairs come from -------------------------------------------------------------


def write_config(tmp_path: Path, pairs: str) -> tuple[str, str]:
    settings = tmp_path / "zettabee.ini"
    pairfile = tmp_path / "pairs.cfg"
    settings.write_text(
        f"[paths]\npairs = {pairfile}\nstate_dir = {tmp_path}/state\n"
        f"lock_dir = {tmp_path}/run\nlog_dir = {tmp_path}/log\n"
    )
    pairfile.write_text(pairs)
    return str(settings), str(pairfile)


def test_unknown_pair_and_bad_config_are_unknown(tmp_path: Path) -> None:
    settings, _ = write_config(tmp_path, "src:tank/a localhost:backup/a\n")
    result = evaluate(lag_check(checks.configured(settings, None, "nosuch")))
    assert result.code == 3
    assert result.output.startswith("ZETTABEE_LAG UNKNOWN - no pair 'nosuch' in ")
    result = evaluate(runtime_check(checks.configured(str(tmp_path / "missing.ini"), None, "a")))
    assert result.code == 3 and "settings file not found" in result.output
    result = evaluate(lag_check(checks.configured(settings, str(tmp_path / "none.cfg"), "a")))
    assert result.code == 3 and "--config FILE" in result.output and "-c FILE" not in result.output


def test_unknown_pair_mentions_broken_lines(tmp_path: Path) -> None:
    settings, _ = write_config(tmp_path, "src:tank/a localhost:backup/a\nsrc:tank/b\n")
    result = evaluate(lag_check(checks.configured(settings, None, "b")))
    assert result.code == 3
    assert "1 line(s) of the pair file are broken" in result.output
    assert "missing destination" in result.output


def test_permission_problems_point_to_help() -> None:
    def survey() -> checks.Survey:
        raise PermissionError(13, "Permission denied", "/run/zettabee/x.lock")

    result = evaluate(runtime_check(survey))
    assert result.code == 3
    assert "Permission denied" in result.output and "see --help" in result.output


# -- the active path prints what evaluate() returns ----------------------------------------


@pytest.fixture
def runtime() -> Iterator[nagiosplugin.Runtime]:
    """nagiosplugin's own test idiom: a fresh singleton that neither prints nor exits."""
    nagiosplugin.Runtime.instance = None
    rt = nagiosplugin.Runtime()
    rt.sysexit = lambda: None
    rt.stdout = io.StringIO()
    yield rt
    nagiosplugin.Runtime.instance = None


@pytest.mark.parametrize(
    "health",
    [
        healthy(),
        healthy(lag=8000),
        healthy(lag=-3),
        healthy(state=INCONSISTENT, reason="gone | missing"),
        healthy(state=UNINITIALIZED, lag=None, reason="no such fs"),
    ],
)
def test_main_prints_what_evaluate_returns(runtime: nagiosplugin.Runtime, health: Health) -> None:
    expected = evaluate(lag_check([health]))
    lag_check([health]).main(verbose=0, timeout=0)
    assert runtime.stdout.getvalue() == expected.text + "\n"
    assert runtime.exitcode == expected.code


def test_evaluate_leaves_the_runtime_alone() -> None:
    nagiosplugin.Runtime.instance = None
    evaluate(lag_check([healthy()]))
    evaluate(runtime_check([healthy()]))
    assert nagiosplugin.Runtime.instance is None


# -- the plugins' command lines ------------------------------------------------------------


def plugin(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "plugins" / name), *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "args", "words"),
    [
        ("check_zettabee_lag", [], "one of the arguments DESTINATION --all is required"),
        ("check_zettabee_lag", ["--all", "backup/data"], "not allowed with argument"),
        ("check_zettabee_lag", ["-w", "soon", "x"], "'soon' is not a range"),
        ("check_zettabee_lag", ["--bogus", "x"], "unrecognized arguments: --bogus"),
        ("check_zettabee_runtime", [], "the following arguments are required: DESTINATION"),
        ("check_zettabee_runtime", ["-t", "later", "x"], "argument -t/--timeout"),
    ],
)
def test_usage_errors_are_unknown_on_stdout(name: str, args: list[str], words: str) -> None:
    proc = plugin(name, *args)
    assert proc.returncode == 3
    first = proc.stdout.splitlines()[0]
    assert first.startswith(("ZETTABEE_LAG UNKNOWN - ", "ZETTABEE_RUNTIME UNKNOWN - "))
    assert words in first
    assert "usage:" in proc.stdout


def test_help_and_version_are_unknown_and_document_permissions() -> None:
    for name in ("check_zettabee_lag", "check_zettabee_runtime"):
        helped = plugin(name, "--help")
        assert helped.returncode == 3
        assert "Permissions:" in helped.stdout and "zfs get" in helped.stdout
        assert "state directory" in helped.stdout
        version = plugin(name, "--version")
        assert version.returncode == 3 and "zettabee" in version.stdout
    lag_usage = plugin("check_zettabee_lag", "--help").stdout.splitlines()[0]
    assert lag_usage == (
        "usage: check_zettabee_lag [--config PAIRFILE] [--settings INIFILE] [-w RANGE] "
        "[-c RANGE] [-t SECONDS] [-v] (DESTINATION | --all)"
    )


# What a check plugin must not load: the replication engine and its streams (a plugin
# reads local state and this host's ZFS only, and Nagios starts it thousands of times).
ENGINE = tuple(
    f"zettabee.{room}"
    for room in ("replicator", "run", "initialize", "update", "purge", "resume", "divergence",
                 "snapshots", "views", "transport", "relay", "mbuffer", "fastpath", "replicate")
) + ("paramiko",)  # fmt: skip


# Nor what costs every start and that a check does not need (issue 18, measured with
# callgrind: dataclasses with its inspect and the 15 classes it made, 110 M instructions
# of a check's 348 M; typing 12 M).
HEAVY = ("dataclasses", "inspect", "typing")


def test_plugins_never_import_the_engine() -> None:
    code = "import sys, zettabee.checks, zettabee.plugin; "
    code += f"print([m for m in {ENGINE + HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr
    for name in ("check_zettabee_lag", "check_zettabee_runtime"):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", str(REPO / "plugins" / name), "--help"],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(REPO)},
        )
        assert " zettabee.plugin\n" in proc.stderr, "the import trace is missing"
        assert not [m for m in ENGINE + HEAVY if f" {m}\n" in proc.stderr], proc.stderr


# -- passive results share the checks -------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state", tmp_path / "run", tmp_path / "log")


def settings_for(tmp_path: Path, **changes: object) -> Settings:
    values: dict[str, object] = {
        "host_name": "backup1",
        "spool_dir": str(tmp_path / "spool"),
        "passive": ("nsca",),
        "backends": {"nsca": {"host": "127.0.0.1", "port": "9"}},
    }
    values.update(changes)
    return Settings(**values)  # type: ignore[arg-type]


def fake_health(monkeypatch: pytest.MonkeyPatch, healths: Sequence[Health]) -> None:
    monkeypatch.setattr(passive, "read_health", lambda pairs, store: list(healths))


def test_passive_results_equal_the_active_output(
    tmp_path: Path, store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    health = healthy(lag=8000)
    fake_health(monkeypatch, [health])
    lag, run = passive.pair_results(settings_for(tmp_path), store, [health.pair])
    assert (lag.host, lag.service, run.service) == (
        "backup1",
        "zettabee lag backup/data",
        "zettabee runtime backup/data",
    )
    assert (lag.code, lag.plugin_output()) == (1, evaluate(lag_check([health])).text)
    assert (run.code, run.plugin_output()) == (0, evaluate(runtime_check([health])).text)


def test_passive_runtime_carries_a_failure_the_status_file_missed(
    tmp_path: Path, store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    health = healthy()
    fake_health(monkeypatch, [health])
    error = StateError(f"{health.pair.name}: the source does not exist")
    errors = {health.pair.fingerprint: error}
    _, run = passive.pair_results(settings_for(tmp_path), store, [health.pair], errors)
    assert run.code == 2
    assert run.output == (
        "ZETTABEE_RUNTIME CRITICAL - backup/data last update failed: the source does not exist"
    )
    busy = {health.pair.fingerprint: LockHeld("another update is in progress", pid=7)}
    _, run = passive.pair_results(settings_for(tmp_path), store, [health.pair], busy)
    assert run.code == 0, "a pair skipped for a run in progress is not a failure"


class Recorder:
    name = "nsca"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.got: list[PassiveResult] = []

    def submit(self, results: Sequence[PassiveResult]) -> None:
        if self.fail:
            raise SubmitError("nsca", "connection refused", transient=True)
        self.got.extend(results)


def test_deliver_spools_when_down_and_sends_the_backlog_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    old = [PassiveResult("h", "s", 2, "old")]
    new = [PassiveResult("h", "s", 0, "new")]
    down = Recorder(fail=True)
    monkeypatch.setattr(passive, "make_backend", lambda name, options: down)
    first = passive.deliver("nsca", {}, old, spool)
    assert (first.delivered, first.spooled, first.lost) == (0, 1, 0)
    assert spool.pending("nsca") == old
    up = Recorder()
    monkeypatch.setattr(passive, "make_backend", lambda name, options: up)
    second = passive.deliver("nsca", {}, new, spool)
    assert (second.resent, second.delivered, second.spooled) == (1, 1, 0)
    assert [r.output for r in up.got] == ["old", "new"]
    assert spool.pending("nsca") == []


def test_deliver_spools_behind_a_backlog_that_still_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.put("nsca", [PassiveResult("h", "s", 2, "old")])
    monkeypatch.setattr(passive, "make_backend", lambda name, options: Recorder(fail=True))
    delivery = passive.deliver("nsca", {}, [PassiveResult("h", "s", 0, "new")], spool)
    assert delivery.spooled == 1 and "connection refused" in delivery.error
    assert [r.output for r in spool.pending("nsca")] == ["old", "new"]


def test_bad_backend_settings_spool_instead_of_failing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    delivery = passive.deliver("nsca", {"port": "nope"}, [PassiveResult("h", "s", 0, "x")], spool)
    assert delivery.spooled == 1 and "required" in delivery.error
    assert len(spool.pending("nsca")) == 1


def test_no_backend_configured_is_a_warning_not_an_error(
    tmp_path: Path, store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path, passive=())
    assert passive.submit_pair_results(settings, store, [make_pair()], {}, "update") == []
    assert "names no back end" in caplog.text


# -- the whole plugin against a stand-in zfs -----------------------------------------------


def fake_zfs(tmp_path: Path, body: str) -> dict[str, str]:
    """PATH with a ``zfs`` that runs ``body`` (sh), for plugin runs without a pool."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "zfs"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return {"PYTHONPATH": str(REPO), "PATH": f"{bindir}:/usr/bin:/bin"}


def run_plugin(
    name: str, env: dict[str, str], *args: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "plugins" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return proc, time.monotonic() - started


def replica_90s_behind(tmp_path: Path) -> dict[str, str]:
    """The environment of a stand-in zfs that shows backup/a, the replica of src:tank/a,
    whose last snapshot is 90 s old. The lag is read from the snapshot's name: the
    stand-in names it 90 s before it is asked, however long the plugin took to start."""
    fp = fingerprint(Endpoint("src", "tank/a"), Endpoint("localhost", "backup/a"))
    return fake_zfs(
        tmp_path,
        f'snap=zettabee.{fp}.$(date -u -d "@$(($(date +%s) - 90))" +%Y%m%dT%H%M%SZ)\n'
        f'printf "backup/a\\tcreatetxg\\t1\\n"\n'
        f'printf "backup/a\\tzettabee:fingerprint\\t{fp}\\n"\n'
        f'printf "backup/a\\tzettabee:lastsnap\\t%s\\n" "$snap"\n'
        f'printf "backup/a@%s\\tcreatetxg\\t5\\n" "$snap"\n',
    )


def test_plugin_end_to_end_with_a_stand_in_zfs(tmp_path: Path) -> None:
    settings, _ = write_config(tmp_path, "src:tank/a localhost:backup/a wlag=60,clag=120\n")
    env = replica_90s_behind(tmp_path)
    proc, _ = run_plugin("check_zettabee_lag", env, "--settings", settings, "backup/a")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.fullmatch(
        r"ZETTABEE_LAG WARNING - backup/a lag 0:01:3\d \(over 0:01:00\) \| lag=9\ds;60;120;0\n",
        proc.stdout,
    ), proc.stdout
    assert proc.stderr == ""
    proc, _ = run_plugin("check_zettabee_lag", env, "--settings", settings, "-vvv", "a")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ZETTABEE_LAG WARNING - backup/a lag")
    assert any(line.startswith("run on localhost: zfs get -Hp") for line in lines), lines
    assert lines[-1].startswith("| lag=")


# What a check never uses, and every start of every check would pay for: the feature
# probe (a check shows no feature record: `zettabee status --fullstatus` does),
# strptime's module (a snapshot name's stamp is ISO 8601, which datetime reads itself),
# typing (for the annotations only) and the recursive lines' trees (none in this file).
NOT_FOR_CHECKS = ("zettabee.capabilities", "_strptime", "typing", "zettabee.tree")


def test_a_check_loads_nothing_it_does_not_use(tmp_path: Path) -> None:
    settings, _ = write_config(tmp_path, "src:tank/a localhost:backup/a\n")
    env = dict(replica_90s_behind(tmp_path), PYTHONPROFILEIMPORTTIME="1")
    proc, _ = run_plugin("check_zettabee_lag", env, "--settings", settings, "backup/a")
    assert proc.stdout.startswith("ZETTABEE_LAG OK - backup/a lag 0:01:"), proc.stdout
    loaded = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines()}
    assert "zettabee.health" in loaded, "the import trace is missing"
    assert [m for m in NOT_FOR_CHECKS if m in loaded] == []


def test_a_hung_zfs_ends_in_unknown_at_the_timeout(tmp_path: Path) -> None:
    settings, _ = write_config(tmp_path, "src:tank/a localhost:backup/a\n")
    env = fake_zfs(tmp_path, "sleep 30")
    proc, took = run_plugin("check_zettabee_lag", env, "--settings", settings, "-t", "1", "a")
    assert proc.returncode == 3
    assert proc.stdout == "ZETTABEE_LAG UNKNOWN: Timeout: check execution aborted after 1s\n"
    assert took < 10


def test_a_failing_zfs_is_unknown_with_its_message(tmp_path: Path) -> None:
    settings, _ = write_config(tmp_path, "src:tank/a localhost:backup/a\n")
    env = fake_zfs(tmp_path, 'echo "internal error: failed to initialize ZFS library" >&2; exit 1')
    proc, _ = run_plugin("check_zettabee_lag", env, "--settings", settings, "a")
    assert proc.returncode == 3
    assert proc.stdout == (
        "ZETTABEE_LAG UNKNOWN - backup/a: cannot read ZFS: internal error: failed to "
        "initialize ZFS library\n"
    )
