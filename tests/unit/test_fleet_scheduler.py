"""The fleet scheduler of ``replicate``: several pairs at once, never too many of one
source, one pair's failure kept to itself, every pair's result handed to monitoring."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from zettabee import replicate
from zettabee.errors import LockHeld, StateError, ZettabeeError
from zettabee.pair import Endpoint, Pair
from zettabee.state import StateStore


def pairs_from(source: str, count: int) -> list[Pair]:
    return [Pair(Endpoint(source, f"tank/{n}"), Endpoint("dst", f"backup/{source}-{n}"))
            for n in range(count)]  # fmt: skip


class Engine:
    """Updates that take a while and count how many of each source run at once.

    An update of a source named in ``crowd`` waits (up to 5 s) until that many of its
    source's updates run together, so the most that ran at once does not depend on how
    fast a loaded machine starts threads."""

    def __init__(
        self,
        tmp: Path,
        fail: dict[str, BaseException] | None = None,
        crowd: dict[str, int] | None = None,
    ) -> None:
        self.store = StateStore(tmp / "state", tmp / "run", tmp / "log")
        self.fail = fail or {}
        self.crowd = crowd or {}
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.updated: list[str] = []
        self.prefetched: list[list[Pair]] = []

    def update(self, pair: Pair) -> None:
        host = pair.source.host
        with self.lock:
            self.running[host] = self.running.get(host, 0) + 1
            self.most[host] = max(self.most.get(host, 0), self.running[host])
            self.arrived.notify_all()
            enough = self.crowd.get(host, 1)
            self.arrived.wait_for(lambda: self.running[host] >= enough, timeout=5)
        try:
            time.sleep(0.05)
            if pair.destination.fs in self.fail:
                raise self.fail[pair.destination.fs]
            with self.lock:
                self.updated.append(pair.destination.fs)
        finally:
            with self.lock:
                self.running[host] -= 1

    def prefetch_destinations(self, pairs: list[Pair]) -> None:
        self.prefetched.append(pairs)


def test_no_more_than_eight_pairs_of_one_source_run_at_once(tmp_path: Path) -> None:
    engine = Engine(tmp_path, crowd={"a": replicate.PER_SOURCE, "b": 3})
    pairs = pairs_from("a", 12) + pairs_from("b", 3)
    results = replicate.run_fleet(engine, pairs, jobs=15, debug=False)
    assert engine.most["a"] == replicate.PER_SOURCE
    assert engine.most["b"] == 3  # another source's pairs are not held up by a's
    assert results == {p.fingerprint: None for p in pairs}


def test_jobs_below_the_per_source_limit_bound_each_source(tmp_path: Path) -> None:
    engine = Engine(tmp_path, crowd={"a": 2})
    results = replicate.run_fleet(engine, pairs_from("a", 6), jobs=2, debug=False)
    assert engine.most["a"] == 2 and len(results) == 6
    assert len(engine.prefetched) == 1  # more pairs than jobs: the destinations listed ahead


def test_a_failing_pair_stops_no_other_and_every_pair_has_its_outcome(tmp_path: Path) -> None:
    pairs = pairs_from("a", 5)
    broken, buggy, busy = (p.destination.fs for p in pairs[:3])
    engine = Engine(
        tmp_path,
        fail={
            broken: StateError("not initialized"),
            buggy: KeyError("a bug"),
            busy: LockHeld("another run holds it"),
        },
    )
    results = replicate.run_fleet(engine, pairs, jobs=2, debug=False)
    assert sorted(engine.updated) == sorted(p.destination.fs for p in pairs[3:])
    assert list(results) == [p.fingerprint for p in pairs]
    assert isinstance(results[pairs[0].fingerprint], StateError)
    unexpected = results[pairs[1].fingerprint]
    assert isinstance(unexpected, ZettabeeError) and "unexpected error" in str(unexpected)
    assert pairs[1].name in str(unexpected)
    assert isinstance(results[pairs[2].fingerprint], LockHeld)
    assert results[pairs[3].fingerprint] is None and results[pairs[4].fingerprint] is None


def test_each_pairs_log_file_gets_only_its_own_lines(tmp_path: Path) -> None:
    pairs = pairs_from("a", 3)
    engine = Engine(tmp_path, fail={pairs[0].destination.fs: StateError("broken here")})
    replicate.run_fleet(engine, pairs, jobs=3, debug=False)
    first = Path(engine.store.log_path(pairs[0].fingerprint)).read_text()
    assert "broken here" in first
    for pair in pairs[1:]:
        path = Path(engine.store.log_path(pair.fingerprint))
        assert "broken here" not in (path.read_text() if path.exists() else "")


def test_every_pairs_result_is_submitted_and_a_failure_sets_the_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairfile = tmp_path / "pairs.cfg"
    pairfile.write_text("src:tank/a  dst:backup/a\nsrc:tank/b  dst:backup/b\n")
    settings = tmp_path / "zettabee.ini"
    settings.write_text(
        f"[paths]\npairs = {pairfile}\nstate_dir = {tmp_path}/state\nlog_dir = {tmp_path}/log\n"
        f"lock_dir = {tmp_path}/run\nspool_dir = {tmp_path}/spool\n\n"
        "[monitoring]\nhost_name = backup1\npassive = nsca\n\n[nsca]\nhost = 127.0.0.1\n"
    )
    failure = StateError("dst:backup/b: not initialized")

    def update_all(app: object, pairs: list[Pair], jobs: int, debug: bool) -> dict[str, object]:
        return {pairs[0].fingerprint: None, pairs[1].fingerprint: failure}

    submitted: list[tuple[list[str], dict[str, object]]] = []

    def submit_pair_results(
        settings: object, store: object, pairs: list[Pair], errors: dict[str, object], action: str
    ) -> list[object]:
        submitted.append(([p.destination.fs for p in pairs], dict(errors)))
        return []

    monkeypatch.setattr(replicate, "update_all", update_all)
    monkeypatch.setattr("zettabee.passive.submit_pair_results", submit_pair_results)
    code = replicate.main(["--all", "--settings", str(settings)])
    assert code == replicate.EXIT_FAILED
    [(names, errors)] = submitted
    assert names == ["backup/a", "backup/b"]
    assert list(errors.values()) == [None, failure]


class TreeEngine:
    """Records when each pair's run starts and ends, initializes as well as updates."""

    def __init__(self, tmp: Path, fail: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.store = StateStore(tmp / "state", tmp / "run", tmp / "log")
        self.fail = fail
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, str]] = []

    def _run(self, pair: Pair, action: str) -> None:
        with self.lock:
            self.events.append(("start", action, pair.destination.fs))
        time.sleep(0.05)
        with self.lock:
            self.events.append(("end", action, pair.destination.fs))
        if pair.relative in self.fail:
            raise StateError(f"{pair.name}: diverged")

    def update(self, pair: Pair) -> None:
        self._run(pair, "update")

    def initialize(self, pair: Pair) -> None:
        self._run(pair, "initialize")

    def prefetch_destinations(self, pairs: list[Pair]) -> None:
        pass


def test_a_tree_s_children_start_after_their_parent_and_fail_alone(tmp_path: Path) -> None:
    from zettabee import tree
    from zettabee.pair import PairOptions

    line = Pair(
        Endpoint("src", "tank/home"), Endpoint("dst", "bk/home"), PairOptions(recursive=True)
    )
    source = {r: "-" for r in ("", "a", "a/b", "a/b/c", "d", "e")}
    dest = {"": line.fingerprint, "a": tree.child(line, "a").fingerprint, "d": "x"}
    planned = tree.plan(line, source, dest)
    pairs, new, errors = replicate.fleet_plan([planned])
    assert errors == {} and [p.relative for p in pairs] == ["", "a", "a/b", "a/b/c", "d", "e"]
    assert new == {tree.child(line, r).fingerprint for r in ("a/b", "a/b/c", "e")}
    engine = TreeEngine(tmp_path, fail={"a"})  # an update: its replica is there
    results = replicate.run_fleet(engine, pairs, jobs=4, debug=False, initialize=new)
    failed = {p.relative for p in pairs if results[p.fingerprint] is not None}
    assert failed == {"a"}  # its children still ran
    order = [(kind, fs) for kind, _, fs in engine.events]
    for parent, kid in (("bk/home", "bk/home/a"), ("bk/home/a", "bk/home/a/b"),
                        ("bk/home/a/b", "bk/home/a/b/c"), ("bk/home", "bk/home/e")):  # fmt: skip
        assert order.index(("end", parent)) < order.index(("start", kid))
    actions = {fs: action for kind, action, fs in engine.events if kind == "start"}
    assert actions["bk/home/e"] == "initialize" and actions["bk/home/d"] == "update"


def test_a_line_not_initialized_holds_its_children_back() -> None:
    from zettabee import tree
    from zettabee.pair import PairOptions

    line = Pair(
        Endpoint("src", "tank/home"), Endpoint("dst", "bk/home"), PairOptions(recursive=True)
    )
    planned = tree.plan(line, {"": "-", "a": "-"}, {})
    pairs, new, _ = replicate.fleet_plan([planned])
    assert pairs == [line] and new == frozenset()


def test_a_new_child_of_a_child_whose_initialize_failed_waits(tmp_path: Path) -> None:
    """Its parent's replica does not exist: the next run initializes both; one error
    (the parent's) says why, not one per child below it."""
    from zettabee import tree
    from zettabee.pair import PairOptions

    line = Pair(
        Endpoint("src", "tank/home"), Endpoint("dst", "bk/home"), PairOptions(recursive=True)
    )
    source = {r: "-" for r in ("", "a", "a/b", "d")}
    planned = tree.plan(line, source, {"": line.fingerprint})
    pairs, new, _ = replicate.fleet_plan([planned])
    engine = TreeEngine(tmp_path, fail={"a"})
    results = replicate.run_fleet(engine, pairs, jobs=2, debug=False, initialize=new)
    ran = {fs for kind, _, fs in engine.events if kind == "start"}
    assert ran == {"bk/home", "bk/home/a", "bk/home/d"}
    assert [p.relative for p in pairs if results[p.fingerprint] is not None] == ["a"]
