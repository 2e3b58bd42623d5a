"""The replicator's helpers for doing several things at once and timing them."""

from __future__ import annotations

import threading
import time

import pytest

from zettabee.replicator import Background, Stopwatch, wait_all


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
