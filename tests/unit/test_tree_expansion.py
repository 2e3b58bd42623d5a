"""Recursive pairs: the tree's expansion, exclusions, gone replicas and fingerprints."""

from __future__ import annotations

from pathlib import Path

from zettabee import tree
from zettabee.host import Result
from zettabee.pair import Endpoint, Pair, PairOptions, child_fingerprint, fingerprint

LINE = Pair(
    Endpoint("src", "tank/home"),
    Endpoint("backup", "bk/home"),
    PairOptions(recursive=True, exclude=("tmp", "*/cache")),
    path="/etc/zettabee/zettabee.cfg",
    line=3,
)


def rows(*names: str, excluded: tuple[str, ...] = ()) -> dict[str, str]:
    return {n: ("on" if n in excluded else "-") for n in names}


def test_child_fingerprint_comes_from_the_line_and_the_relative_name() -> None:
    a = tree.child(LINE, "alice")
    assert a.source == Endpoint("src", "tank/home/alice")
    assert a.destination == Endpoint("backup", "bk/home/alice")
    assert LINE.fingerprint == fingerprint(LINE.source, LINE.destination)  # the line's own
    assert a.fingerprint == child_fingerprint(LINE.fingerprint, "alice")
    assert a.line_fingerprint == LINE.fingerprint
    # not the seed's fingerprint of the child's two names: a line of its own for it
    assert a.fingerprint != fingerprint(a.source, a.destination)
    assert len({a.fingerprint, tree.child(LINE, "bob").fingerprint, LINE.fingerprint}) == 3
    assert tree.child(LINE, "alice/docs").fingerprint != a.fingerprint


def test_children_come_parents_first_with_exclusions_and_subtrees() -> None:
    source = rows(
        "", "alice", "alice/docs", "alice/docs/old", "alice/cache", "tmp", "tmp/x",
        "bob", "bob/big", "bob/big/deep", "vol",
        excluded=("bob/big", "bob/big/deep"),
    )  # fmt: skip
    planned = tree.plan(LINE, source, {"": LINE.fingerprint})
    assert [p.relative for p in planned.pairs] == [
        "", "alice", "alice/docs", "alice/docs/old", "bob", "vol",
    ]  # fmt: skip
    assert planned.excluded == ["alice/cache", "bob/big", "bob/big/deep", "tmp", "tmp/x"]
    assert planned.pairs[0] is LINE
    assert planned.new == {p.fingerprint for p in planned.children}  # none received yet


def test_everything_below_an_excluded_file_system_is_left_out() -> None:
    """Set on a file system and overridden below: the child's replica would need its
    parent's, so it stays out."""
    source = {"": "-", "a": "on", "a/b": "off"}
    planned = tree.plan(LINE, source, {})
    assert [p.relative for p in planned.pairs] == [""]
    assert planned.excluded == ["a", "a/b"]


def test_a_replica_whose_source_is_gone_is_kept_and_reported() -> None:
    gone = tree.child(LINE, "carol")
    dest = {"": LINE.fingerprint, "alice": tree.child(LINE, "alice").fingerprint,
            "carol": gone.fingerprint, "manual": "-"}  # fmt: skip
    planned = tree.plan(LINE, rows("", "alice"), dest)
    assert [p.relative for p in planned.gone] == ["carol"]  # not 'manual': not ours
    assert planned.new == set()
    assert "zfs destroy -r bk/home/carol" in tree.gone_note(gone)


def test_a_child_that_has_a_line_of_its_own_is_left_to_it() -> None:
    planned = tree.plan(LINE, rows("", "alice", "alice/x", "bob"), {}, frozenset({"bk/home/alice"}))
    assert [p.relative for p in planned.pairs] == ["", "bob"]


def test_a_fixed_mbuffer_port_stays_the_line_s() -> None:
    line = Pair(LINE.source, LINE.destination, PairOptions(transport="mbuffer", port=9090))
    assert tree.child(line, "a").options.port is None


def test_parse_listing_keeps_the_root_and_its_descendants_only() -> None:
    text = "tank/home\t-\ntank/home/a\ton\ntank/homework\t-\ntank/home/a/b\ton\n"
    assert tree.parse_listing(text, "tank/home") == {"": "-", "a": "on", "a/b": "on"}


class FakeHost:
    name = "fake"
    is_local = True

    def __init__(self, outputs: dict[str, Result]) -> None:
        self.outputs = outputs
        self.ran: list[list[str]] = []

    def run(self, argv: list[str], *, check: bool = True, **_: object) -> Result:
        self.ran.append(list(argv))
        result = self.outputs[argv[-1]]
        if check and not result.ok:
            from zettabee.host import error_for

            raise error_for(argv, self.name, result.returncode, result.stderr)
        return result


def test_expand_lists_once_records_and_falls_back_to_the_record(tmp_path: Path) -> None:
    src_out = "tank/home\t-\ntank/home/a\t-\ntank/home/a/b\t-\n"
    host = FakeHost(
        {
            "tank/home": Result([], "src", 0, src_out, ""),
            "bk/home": Result([], "dst", 1, "", "cannot open 'bk/home': dataset does not exist"),
        }
    )
    (planned,) = tree.expand([LINE], lambda e, p: host, tmp_path)  # type: ignore[arg-type,return-value]
    assert [p.relative for p in planned.pairs] == ["", "a", "a/b"]
    assert planned.new == {p.fingerprint for p in planned.pairs}
    assert len(host.ran) == 2 and host.ran[0][:4] == ["zfs", "list", "-H", "-r"]
    record = tree.recorded(tmp_path, LINE)
    assert [p.relative for p in record.children] == ["a", "a/b"]
    host.outputs["tank/home"] = Result([], "src", 255, "", "ssh: connect: Connection refused")
    (fallback,) = tree.expand([LINE], lambda e, p: host, tmp_path)  # type: ignore[arg-type,return-value]
    assert fallback.error is not None and [p.relative for p in fallback.children] == ["a", "a/b"]


def test_a_child_is_found_by_its_name_before_any_run(tmp_path: Path) -> None:
    found = tree.find_in_trees([LINE], tmp_path, "bk/home/alice/docs")
    assert found is not None and found.relative == "alice/docs"
    assert tree.find_in_trees([LINE], tmp_path, "bk/other") is None
    assert tree.find_in_trees([LINE], tmp_path, "bk/home/../x") is None


def test_untracked_children_are_named_for_a_line_without_recursive() -> None:
    plain = Pair(LINE.source, LINE.destination)
    host = FakeHost({"tank/home": Result([], "src", 0, "tank/home\t-\ntank/home/a\t-\n", "")})
    names = tree.untracked_children(plain, host)  # type: ignore[arg-type]
    assert names == ["a"]
    assert "recursive=yes" in tree.untracked_note(plain, names)
    assert tree.untracked_children(LINE, host) == []  # type: ignore[arg-type]
