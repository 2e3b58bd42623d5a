"""The engine's front door for its callers (``zettabee``, ``replicate``, the benchmarks):
initialize, update and purge of one pair, each inside its run (:mod:`zettabee.run`).

Each action lives in a room of its own: :mod:`zettabee.initialize`,
:mod:`zettabee.update`, :mod:`zettabee.purge`.
"""

from __future__ import annotations

from zettabee import initialize as initialize_
from zettabee import purge as purge_
from zettabee import update as update_
from zettabee.hosts import Hosts
from zettabee.pair import Pair
from zettabee.purge import PurgeStep
from zettabee.run import Engine, RunReport, Stopwatch, Streamer, pair_run, pair_stream
from zettabee.snapshots import HeldElsewhere, destroy, destroy_all, plan_prune
from zettabee.state import StateStore
from zettabee.threads import Background, wait_all
from zettabee.views import Prefetch

__all__ = [
    "Background",
    "HeldElsewhere",
    "Hosts",
    "PurgeStep",
    "Replicator",
    "RunReport",
    "Stopwatch",
    "destroy",
    "destroy_all",
    "plan_prune",
    "wait_all",
]


class Replicator:
    """Runs the actions of pairs on one registry of hosts; safe to share between the
    threads of a fleet run (each run's facts are its own :class:`zettabee.run.PairRun`).

    ``prefetch``: the destinations listed ahead (:meth:`prefetch_destinations`), owned
    by the fleet run that shares this replicator;
    ``streamer``: how a stream is carried (the pair's transport; a test's stand-in)."""

    def __init__(
        self,
        store: StateStore,
        hosts: Hosts,
        prefetch: Prefetch | None = None,
        streamer: Streamer = pair_stream,
    ) -> None:
        self.store = store
        self.hosts = hosts
        self.engine = Engine(store, hosts, prefetch or Prefetch(hosts), streamer)

    def initialize(self, pair: Pair, force: bool = False) -> RunReport:
        with pair_run(self.engine, pair, "initialize") as run:
            return initialize_.initialize(run, force)

    def update(self, pair: Pair) -> RunReport:
        with pair_run(self.engine, pair, "update") as run:
            return update_.update(run)

    def purge(self, pair: Pair, dry_run: bool = False, release: bool = False) -> list[PurgeStep]:
        """Destroy obsolete zettabee snapshots and bookmarks on both sides, never the
        newest common snapshot, and release the pair's holds that no longer protect a
        base. ``release`` also lets go of the base itself (a pair being retired)."""
        if dry_run:  # no run: nothing changes
            src = self.hosts.get(pair.source, pair)
            dst = self.hosts.get(pair.destination, pair)
            feats = self.hosts.features(pair, src, dst)
            return purge_.purge(pair, src, dst, feats, dry_run=True, release=release)
        with pair_run(self.engine, pair, "purge", listing=False) as run:
            return purge_.purge(run.pair, run.src, run.dst, run.feats, False, release)

    def prefetch_destinations(self, pairs: list[Pair]) -> None:
        """List the destinations of ``pairs`` on this host ahead, one call per pool, for
        the updates of a fleet run (see :class:`zettabee.views.Prefetch`)."""
        self.engine.prefetch.list(pairs)
