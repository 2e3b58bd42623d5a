"""Records behave as the dataclasses they replaced on the check plugins' path: pairs and
settings are compared, hashed and copied by value, and a frozen one cannot change."""

from __future__ import annotations

import pytest

from zettabee import records
from zettabee.config import Settings
from zettabee.pair import Endpoint, Pair, PairOptions
from zettabee.state import Status


def pair(**options: object) -> Pair:
    return Pair(Endpoint("src", "tank/a"), Endpoint("dst", "backup/a"), PairOptions(**options))  # type: ignore[arg-type]


def test_equal_by_value_and_hashable_when_frozen() -> None:
    assert pair() == pair() and pair() != pair(keep=2)
    assert len({pair(), pair(), pair(keep=2)}) == 2
    assert Endpoint("a", "b") != Status("a", "b")  # another class is never equal
    assert hash(Settings()) == hash(Settings(backends={"nsca": {}}))  # backends: hash=False
    with pytest.raises(TypeError):
        hash(Status("fp"))  # mutable: unhashable, as a dataclass


def test_frozen_records_refuse_changes_mutable_ones_take_them() -> None:
    with pytest.raises(AttributeError, match="frozen Pair"):
        pair().line = 3  # type: ignore[misc]
    status = Status("fp")
    status.error = "boom"
    assert status.error == "boom"


def test_defaults_and_factories() -> None:
    one, two = Status("fp"), Status("fp")
    one.extra["resume"] = {}
    assert two.extra == {}  # a factory's default is each record's own
    assert pair().options == PairOptions() and PairOptions().wlag == 7200
    assert repr(Endpoint("h", "p/f")) == "Endpoint(host='h', fs='p/f')"


def test_wrong_arguments_are_type_errors() -> None:
    with pytest.raises(TypeError, match="missing argument 'fs'"):
        Endpoint("h")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected argument 'port'"):
        Endpoint("h", "p/f", port=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="two values for 'host'"):
        Endpoint("h", "p/f", host="x")  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field 'nope'"):
        records.replace(PairOptions(), nope=1)


def test_replace_asdict_fields() -> None:
    changed = records.replace(pair(), line=7)
    assert changed.line == 7 and changed.source == pair().source
    assert records.fields(Endpoint) == ("host", "fs")
    assert records.asdict(Endpoint("h", "p/f")) == {"host": "h", "fs": "p/f"}


def test_a_record_cannot_inherit_fields() -> None:
    """A subclass would see only its own annotations and drop its base's fields in
    silence: refused where it is written."""
    with pytest.raises(TypeError, match="Wider.*Endpoint"):

        class Wider(Endpoint):
            port: int = 22
