"""The replicator's helpers for doing several things at once and timing them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.unit.test_engine import FakeHost
from zettabee.pair import Endpoint, Pair
from zettabee.run import Stopwatch
from zettabee.state import StateStore, Status
from zettabee.threads import Background, wait_all
from zettabee.views import Prefetch, views_by_fs


def test_wait_all_lets_every_call_finish_then_raises_the_first_failure() -> None:
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.set()

    def broken() -> None:
        raise ValueError("first")

    with pytest.raises(ValueError, match="first"):
        wait_all([Background(broken), Background(slow), Background(lambda: 1 / 0)])
    assert finished.is_set()


def test_a_helper_thread_carries_its_parents_name() -> None:
    seen: list[str] = []
    threading.current_thread().name, old = "replicate_7", threading.current_thread().name
    try:
        wait_all([Background(lambda: seen.append(threading.current_thread().name))])
    finally:
        threading.current_thread().name = old
    assert seen == ["replicate_7"]


def test_stopwatch_adds_up_a_part_met_twice() -> None:
    parts: dict[str, float] = {}
    clock = Stopwatch(parts)
    clock.add({"listing": 0.25})
    with clock("listing"):
        pass
    clock.add({"send": 1.0})
    assert list(parts) == ["listing", "send"] and parts["listing"] >= 0.25
    assert str(clock).startswith("listing=0.2") and str(clock).endswith("send=1.000s")


class LocalHosts:
    """The destinations are on this host, their listing is ``listing``."""

    def __init__(self, listing: str) -> None:
        self.host = FakeHost(listing)
        self.prober = self

    def get(self, endpoint: Endpoint, pair: Pair) -> FakeHost:
        return self.host

    def of(self, host: FakeHost, pool: str) -> None:
        return None

    def forget_probes(self, pair: Pair) -> None:
        pass


def listed(*names: str) -> str:
    rows = []
    for name in names:
        rows += [f"{name}\tguid\t1", f"{name}\tcreation\t2", f"{name}@a\tguid\t3",
                 f"{name}@a\tcreation\t4", f"{name}@a\tcreatetxg\t5"]  # fmt: skip
    return "\n".join(rows) + "\n"


def test_destinations_listed_ahead_serve_only_runs_that_nothing_came_between(
    tmp_path: Path,
) -> None:
    pairs = [Pair(Endpoint("s", f"t/{n}"), Endpoint("localhost", f"b/{n}")) for n in "xyz"]
    store = StateStore(tmp_path / "state", tmp_path / "run", tmp_path / "log")
    ended_before, ended_after = Status(pairs[0].fingerprint), Status(pairs[1].fingerprint)
    ended_before.ended = time.time() - 60
    store.write_status(ended_before)
    hosts = LocalHosts(listed("b/x", "b/y"))  # b/z is not there (not initialized)
    prefetch = Prefetch(hosts)  # type: ignore[arg-type]
    prefetch.list(pairs)
    (argv,) = hosts.host.calls  # one zfs get for the three
    assert argv[argv.index("--") + 1 :] == ["b/x", "b/y", "b/z"]
    ended_after.ended = time.time() + 1  # a run of the pair ended after the listing began
    store.write_status(ended_after)

    def view(pair: Pair) -> object:
        # what a run reads under the pair's lock: when its last run ended
        with store.lock(pair.fingerprint, pair.name, "update"):
            return prefetch.take(pair, store.read_status(pair.fingerprint).ended)

    got = view(pairs[0])
    assert got is not None and [s.name for s in got[1]] == ["a"]
    assert view(pairs[0]) is None  # used once
    assert view(pairs[1]) is None  # stale: listed again by its update
    assert view(pairs[2]) is None  # absent from the listing


def test_one_listing_of_many_file_systems_splits_by_file_system() -> None:
    views = views_by_fs(["b/x", "b/y"], listed("b/x", "b/x/child", "b/y"))
    assert sorted(views) == ["b/x", "b/y"]
    assert views["b/x"][0] == {"guid": "1", "creation": "2"}
    assert [s.full for s in views["b/y"][1]] == ["b/y@a"]
