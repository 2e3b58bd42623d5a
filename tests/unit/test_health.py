"""Reading many pairs' health: one ``zfs get`` of one object per pair in the steady
state, and a closer look only at the pairs that need it. Against a fake ZFS that answers
``zfs get`` as ZFS does (snapshots inherit their file system's user properties)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from zettabee import zfs
from zettabee.health import INCONSISTENT, SYNCHRONIZED, UNINITIALIZED, _View, read_health
from zettabee.host import Result
from zettabee.pair import Endpoint, Pair, snapshot_name
from zettabee.state import IDLE, RUNNING, StateStore, Status


class FakeZfs:
    """File systems and snapshots with their properties; records every call."""

    name = "localhost"
    is_local = True

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, str]] = {}
        self.calls: list[list[str]] = []

    def add(self, pair: Pair, *snaps: tuple[str, int], lastsnap: str = "") -> None:
        fs = pair.destination.fs
        self.objects[fs] = {
            "creation": "1",
            zfs.PROP_FINGERPRINT: pair.fingerprint,
            zfs.PROP_LASTSNAP: lastsnap or snaps[-1][0],
        }
        for snap, creation in snaps:
            self.objects[f"{fs}@{snap}"] = {"creation": str(creation), "createtxg": str(creation)}

    def props(self, name: str) -> dict[str, str]:
        fs = name.partition("@")[0]
        inherited = {k: v for k, v in self.objects[fs].items() if k != "creation"}
        return {**inherited, **self.objects[name]}

    def run(self, argv: list[str], **_: object) -> Result:
        self.calls.append(list(argv))
        targets = argv[argv.index("--") + 1 :]
        depth = "-d" in argv
        props = argv[argv.index("--") - 1].split(",")
        out, err = [], []
        for target in targets:
            if target not in self.objects:
                err.append(f"cannot open '{target}': dataset does not exist")
                continue
            names = [target]
            if depth and "@" not in target:
                names += [n for n in self.objects if n.startswith(f"{target}@")]
            for name in names:
                values = self.props(name)
                out += [f"{name}\t{p}\t{values.get(p, '-')}" for p in props]
        code = 1 if err else 0
        return Result(list(argv), self.name, code, "\n".join(out) + "\n", "\n".join(err))

    def close(self) -> None:
        pass


def pair(name: str) -> Pair:
    return Pair(Endpoint("src", f"tank/{name}"), Endpoint("localhost", f"backup/{name}"))


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: int) -> float:
    """A moment ``seconds`` after the lab's epoch, T0."""
    return (T0 + timedelta(seconds=seconds)).timestamp()


def snap(p: Pair, n: int) -> str:
    """The pair's ``n``th snapshot, named at(900 + 100 n), as the fakes' creation says."""
    return snapshot_name(p.fingerprint, "0a1b2c3d", T0 + timedelta(seconds=900 + 100 * n))


def ran(store: StateStore, p: Pair, snapshot: str, state: str = IDLE, result: str = "ok") -> None:
    status = Status(p.fingerprint, state=state, result=result, snapshot=snapshot)
    status.pid = 999999 if state == RUNNING else None  # a pid that is gone: interrupted
    status.last_duration = 1.0
    store.write_status(status)


def test_steady_state_asks_for_one_snapshot_per_pair_and_nothing_else(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state", tmp_path / "run", tmp_path / "log")
    zfs_ = FakeZfs()
    pairs = [pair(f"p{i}") for i in range(3)]
    for p in pairs:
        zfs_.add(p, (snap(p, 1), 1000), (snap(p, 2), 1100))
        ran(store, p, snap(p, 2))
    healths = read_health(pairs, store, host=zfs_, now=at(1400))  # type: ignore[arg-type]
    assert [h.state for h in healths] == [SYNCHRONIZED] * 3
    assert [h.lag for h in healths] == [300] * 3
    assert len(zfs_.calls) == 1
    assert "-d" not in zfs_.calls[0]
    assert zfs_.calls[0][-3:] == sorted(f"{p.destination.fs}@{snap(p, 2)}" for p in pairs)


def test_pairs_the_hint_cannot_answer_are_read_whole_in_one_more_call(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state", tmp_path / "run", tmp_path / "log")
    zfs_ = FakeZfs()
    steady, stale, never, killed, gone = pairs = [pair(n) for n in ("a", "b", "c", "d", "e")]
    zfs_.add(steady, (snap(steady, 1), 1000))
    ran(store, steady, snap(steady, 1))
    # Another tool (or an older run) moved the pair on: the status file lags behind.
    zfs_.add(stale, (snap(stale, 1), 1000), (snap(stale, 3), 1200))
    ran(store, stale, snap(stale, 1))
    # Never run from this host: no status file.
    zfs_.add(never, (snap(never, 1), 1000))
    # Killed after its receive, before recording it.
    zfs_.add(killed, (snap(killed, 1), 1000), (snap(killed, 2), 1100), lastsnap=snap(killed, 1))
    ran(store, killed, snap(killed, 1), state=RUNNING, result="")
    # Its destination was destroyed.
    ran(store, gone, snap(gone, 1))

    healths = read_health(pairs, store, host=zfs_, now=at(1500))  # type: ignore[arg-type]
    assert len(zfs_.calls) == 2
    assert "-d" in zfs_.calls[1]
    assert zfs_.calls[1][-4:] == sorted(p.destination.fs for p in (stale, never, killed, gone))
    by = {h.pair: h for h in healths}
    assert (by[steady].state, by[steady].lag) == (SYNCHRONIZED, 500)
    assert (by[stale].state, by[stale].lag, by[stale].lastsnap) == (
        SYNCHRONIZED, 300, snap(stale, 3),
    )  # fmt: skip
    assert (by[never].state, by[never].lag) == (SYNCHRONIZED, 500)
    assert by[killed].state == INCONSISTENT and "not the recorded one" in by[killed].reason
    assert by[gone].state == UNINITIALIZED and "does not exist" in by[gone].reason


def test_five_hundred_pairs_take_one_call(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state", tmp_path / "run", tmp_path / "log")
    zfs_ = FakeZfs()
    pairs = [pair(f"p{i:03d}") for i in range(500)]
    for p in pairs:
        zfs_.add(p, (snap(p, 1), 1000))
        ran(store, p, snap(p, 1))
    healths = read_health(pairs, store, host=zfs_, now=at(1060))  # type: ignore[arg-type]
    assert len(zfs_.calls) == 1 and all(h.lag == 60 for h in healths)
    assert len(zfs_.calls[0]) == len(zfs.get([], _View.PROPS)) + 500


def test_a_source_clock_stepped_back_between_two_runs_is_not_inconsistent(
    tmp_path: Path,
) -> None:
    """The newer snapshot has the older ``creation`` (the source's clock went back an
    hour in between); ZFS's own order, ``createtxg``, still says which came last."""
    store = StateStore(tmp_path / "state", tmp_path / "run", tmp_path / "log")
    zfs_ = FakeZfs()
    p = pair("stepped")
    zfs_.add(p, (snap(p, 1), 1000), (snap(p, 2), 1100))
    zfs_.objects[f"{p.destination.fs}@{snap(p, 2)}"]["creation"] = str(1100 - 3600)
    ran(store, p, snap(p, 1), state=RUNNING, result="")  # read whole, every snapshot
    [health] = read_health([p], store, host=zfs_, now=at(1400))  # type: ignore[arg-type]
    assert (health.state, health.lastsnap, health.lag) == (SYNCHRONIZED, snap(p, 2), 300)


def test_the_replica_id_is_the_destination_pool_s_the_last_run_probed() -> None:
    """status --fullstatus and --json show it: which server's snapshots are which."""
    from zettabee.health import Health
    from zettabee.pair import replica_id

    pair = Pair(Endpoint("src", "tank/home"), Endpoint("localhost", "backup/home"))
    named = snapshot_name(pair.fingerprint, "0a1b2c3d", datetime(2024, 1, 1, tzinfo=UTC))
    probed = Status(pair.fingerprint, extra={"features": {"destination": {"pool_guid": "42"}}})
    assert Health(pair, "Synchronized", status=probed, lastsnap=named).replica == replica_id("42")
    assert Health(pair, "Synchronized", lastsnap=named).replica == "0a1b2c3d"
    before = f"zettabee.{pair.fingerprint}.20240101T000000Z"  # named before the replica id
    assert Health(pair, "Synchronized", lastsnap=before).replica == ""
    assert Health(pair, "Uninitialized").replica == ""
