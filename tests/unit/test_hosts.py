"""Unit tests for zettabee.hosts: one host object per end for the whole run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from zettabee import hosts as hosts_module
from zettabee.hosts import Hosts
from zettabee.pair import Endpoint, Pair, PairOptions


def slow_local(name: str) -> bool:
    time.sleep(0.05)  # a resolver that takes its time: the window two workers race into
    return True


def test_pairs_from_one_host_share_its_host_object(tmp_path: Path) -> None:
    hosts = Hosts(str(tmp_path / "known_hosts"))
    a = Pair(Endpoint("localhost", "tank/a"), Endpoint("localhost", "backup/a"))
    b = Pair(Endpoint("localhost", "tank/b"), Endpoint("localhost", "backup/b"))
    other_user = Pair(a.source, a.destination, PairOptions(user="zb"))
    assert hosts.get(a.source, a) is hosts.get(b.source, b) is hosts.get(b.destination, b)
    assert hosts.get(a.source, other_user) is not hosts.get(a.source, a)


def test_worker_threads_asking_at_once_get_one_host_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hosts_module, "is_local_host", slow_local)
    hosts = Hosts(str(tmp_path / "known_hosts"))
    pair = Pair(Endpoint("src.example.com", "tank/a"), Endpoint("dst.example.com", "backup/a"))
    got: list[object] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        got.append(hosts.get(pair.source, pair))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8 and len({id(host) for host in got}) == 1
