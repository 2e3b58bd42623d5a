"""Where a check's pairs come from: the settings and the pair file loaded inside the
check (under its timeout), and a recursive line's children as its last run listed them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zettabee.config import load_settings
from zettabee.errors import ZettabeeError
from zettabee.health import Health, read_health
from zettabee.pair import Pair
from zettabee.pairfile import find_pair, load_pairs
from zettabee.records import Record, field
from zettabee.state import StateStore


class Survey(Record):
    """What a check looks at: the pairs' health, and pair-file lines that did not load."""

    healths: list[Health]
    broken: list[str] = field(default_factory=list)
    gone: frozenset[str] = frozenset()  # fingerprints of replicas whose source is gone


HealthSource = Callable[[], Survey]


def configured(
    settings_path: str | None, pairs_path: str | None, destination: str | None
) -> HealthSource:
    """Load settings and pairs and read one pair's health (every pair's when ``None``).

    Returned as a function so that it runs inside the check, under its timeout: a hung
    ``zfs get`` (a suspended pool) must end as UNKNOWN, not as a plugin killed by Nagios.
    """

    def survey() -> Survey:
        settings = load_settings(settings_path)
        pairfile = load_pairs(pairs_path or settings.pairs, settings)
        store = StateStore(settings.state_dir, settings.lock_dir, settings.log_dir)
        broken = [str(problem) for problem in pairfile.problems]
        if destination is None:
            return tree_survey(pairfile.pairs, store, settings.state_dir, broken)
        try:
            pair = find_pair(pairfile.pairs, destination, pairfile.path)
        except ZettabeeError as exc:
            from zettabee.tree import find_in_trees  # a recursive line's child

            child = find_in_trees(pairfile.pairs, settings.state_dir, destination)
            if child is not None:
                return Survey(read_health([child], store))
            if not broken:
                raise
            raise ZettabeeError(
                f"{exc}; {len(broken)} line(s) of the pair file are broken and may hold it: "
                f"{broken[0]}"
            ) from exc
        return tree_survey([pair], store, settings.state_dir)

    return survey


def tree_pairs(line: Pair, state_dir: str) -> tuple[list[Pair], list[Pair]]:
    """A recursive line's pairs as its last run listed them (the line first), and its
    replicas whose source is gone; any other pair alone."""
    if not line.options.recursive or line.is_child:
        return [line], []
    from zettabee.tree import recorded  # only a pair file with recursive lines loads it

    tree = recorded(state_dir, line)
    return tree.pairs, tree.gone


def tree_survey(
    lines: Sequence[Pair], store: StateStore, state_dir: str, broken: Sequence[str] = ()
) -> Survey:
    """The health of ``lines`` and of their trees' children (one ``zfs get`` for all)."""
    pairs: list[Pair] = []
    gone: set[str] = set()
    for line in lines:
        members, lost = tree_pairs(line, state_dir)
        pairs += [*members, *lost]
        gone.update(p.fingerprint for p in lost)
    return Survey(read_health(pairs, store), list(broken), frozenset(gone))
