"""The spool: atomic private files, oldest first, bounded, partial failures, one flusher."""

from __future__ import annotations

import multiprocessing
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from nsca.errors import SubmitError
from nsca.result import PassiveResult
from nsca.spool import Spool


def results(n: int, prefix: str = "r") -> list[PassiveResult]:
    return [PassiveResult("h", f"{prefix}{i}", i % 4, f"output {i}", [f"n={i}"]) for i in range(n)]


class Recorder:
    """A back end that accepts everything and remembers the order."""

    name = "fake"

    def __init__(self) -> None:
        self.got: list[PassiveResult] = []
        self.calls = 0

    def submit(self, batch: Sequence[PassiveResult]) -> None:
        self.calls += 1
        self.got.extend(batch)


class Down:
    name = "fake"

    def submit(self, batch: Sequence[PassiveResult]) -> None:
        raise SubmitError("fake", "connection refused", transient=True)


class FailsAfter:
    """Delivers ``ok`` results, then the connection drops."""

    name = "fake"

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.got: list[PassiveResult] = []

    def submit(self, batch: Sequence[PassiveResult]) -> None:
        room = self.ok - len(self.got)
        self.got.extend(batch[:room])
        if len(batch) > room:
            raise SubmitError("fake", "dropped", transient=True, undelivered=batch[room:])


class RejectsOdd:
    """Refuses results for services with an odd number (an unknown object, say)."""

    name = "fake"

    def __init__(self) -> None:
        self.got: list[PassiveResult] = []

    def submit(self, batch: Sequence[PassiveResult]) -> None:
        bad = [r for r in batch if int((r.service or "r0")[1:]) % 2]
        self.got.extend(r for r in batch if r not in bad)
        if bad:
            raise SubmitError("fake", "no such service", undelivered=bad, rejected=bad)


def test_put_writes_private_atomic_json_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.put("nsca", results(3)) == 0
    directory = tmp_path / "spool" / "nsca"
    assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    files = sorted(p for p in directory.iterdir() if p.suffix == ".json")
    assert len(files) == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp")]


def test_pending_is_oldest_first_across_puts(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first, second = results(5, "a"), results(5, "b")
    spool.put("nsca", first)
    spool.put("nsca", second)
    assert spool.pending("nsca") == first + second
    assert spool.count("nsca") == 10
    assert spool.pending("other") == []


def test_a_spooled_result_keeps_the_time_it_was_measured(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    measured = PassiveResult("h", "s", 2, "CRITICAL - lag", ["lag=9s"], measured_at=1796190000.25)
    spool.put("icinga2-api", [measured, PassiveResult("h", "s", 0, "OK")])
    assert spool.pending("icinga2-api") == [measured, PassiveResult("h", "s", 0, "OK")]
    assert spool.pending("icinga2-api")[0].measured_at == 1796190000.25


def test_flush_delivers_oldest_first_and_empties(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    queued = results(250)
    spool.put("nsca", queued)
    backend = Recorder()
    report = spool.flush("nsca", backend, batch_size=100)
    assert backend.got == queued
    assert backend.calls == 3
    assert (report.delivered, report.remaining, report.complete) == (250, 0, True)
    assert spool.pending("nsca") == []


def test_flush_keeps_everything_when_the_backend_is_down(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put("nsca", results(5))
    report = spool.flush("nsca", Down())
    assert report.delivered == 0 and report.remaining == 5
    assert report.error is not None and report.error.transient
    assert spool.pending("nsca") == results(5)


def test_flush_keeps_the_undelivered_tail(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put("nsca", results(10))
    backend = FailsAfter(4)
    report = spool.flush("nsca", backend)
    assert backend.got == results(10)[:4]
    assert (report.delivered, report.remaining) == (4, 6)
    assert spool.pending("nsca") == results(10)[4:]
    again = Recorder()
    spool.flush("nsca", again)
    assert again.got == results(10)[4:]


def test_rejected_results_are_dropped_not_retried_forever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    spool.put("api", results(6))
    backend = RejectsOdd()
    report = spool.flush("api", backend, batch_size=4)
    assert [r.service for r in backend.got] == ["r0", "r2", "r4"]
    assert (report.delivered, report.rejected, report.remaining) == (3, 3, 0)
    assert "no such service" in caplog.text and "dropping spooled result" in caplog.text


def test_a_full_spool_drops_the_oldest_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, max_items=10)
    spool.put("nsca", results(8, "old"))
    dropped = spool.put("nsca", results(5, "new"))
    assert dropped == 3
    assert "dropped the 3 oldest" in caplog.text
    kept = spool.pending("nsca")
    assert kept == results(8, "old")[3:] + results(5, "new")


def test_a_batch_bigger_than_the_bound_keeps_the_newest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_items=3)
    assert spool.put("nsca", results(5)) == 2
    assert spool.pending("nsca") == results(5)[2:]


def test_unreadable_files_are_set_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put("nsca", results(2))
    victim = sorted((tmp_path / "nsca").glob("*.json"))[0]
    victim.write_text("{not json")
    assert spool.pending("nsca") == results(2)[1:]
    assert victim.with_suffix(".bad").exists()


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", ""])
def test_backend_names_must_be_plain(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        Spool(tmp_path).put(name, results(1))


def _flush_in_child(
    path: str, ready: multiprocessing.synchronize.Event, out: multiprocessing.Queue
) -> None:
    class Slow:
        name = "fake"

        def submit(self, batch: Sequence[PassiveResult]) -> None:
            ready.set()
            import time

            time.sleep(1.0)
            out.put([r.service for r in batch])

    report = Spool(path).flush("nsca", Slow())
    out.put(("report", report.delivered, report.busy))


def test_a_second_flusher_backs_off_instead_of_sending_twice(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put("nsca", results(5))
    ctx = multiprocessing.get_context("fork")
    ready, out = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_flush_in_child, args=(str(tmp_path), ready, out))
    child.start()
    try:
        assert ready.wait(10)
        mine = Recorder()
        report = spool.flush("nsca", mine)
        assert report.busy and mine.got == [] and report.delivered == 0
    finally:
        child.join(20)
    sent = out.get(timeout=5)
    assert sent == [f"r{i}" for i in range(5)]
    assert out.get(timeout=5) == ("report", 5, False)
    assert spool.pending("nsca") == []


def test_flush_of_an_empty_or_missing_queue(tmp_path: Path) -> None:
    report = Spool(tmp_path).flush("nsca", Recorder())
    assert report.complete and report.delivered == 0
