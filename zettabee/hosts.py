"""The run's hosts: one Host object per (host, port, user, key, known_hosts), probed once.

Pairs from the same host share one control connection, whichever end of a pair it is, and
each host's ZFS is probed once per run; what a pair can use follows from both probes. A
run's worker threads share one registry, so it takes its own lock. It lives apart from
the replicator so that a run can start its connections before it imports the rest.
"""

from __future__ import annotations

import threading

from zettabee.capabilities import PairFeatures, Prober, plan_features
from zettabee.host import Host, LocalHost, SshHost, SshTarget, is_local_host
from zettabee.pair import Endpoint, Pair


class Hosts:
    """The registry of the run's hosts; safe to share between threads."""

    def __init__(
        self, known_hosts: str, accept_new_host_key: bool = False, probe_cache: str | None = None
    ) -> None:
        self.known_hosts = known_hosts
        self.accept_new_host_key = accept_new_host_key
        self._hosts: dict[tuple[str, int, str, str | None, str], Host] = {}
        self._registry_lock = threading.Lock()
        self.prober = Prober(probe_cache)

    def get(self, endpoint: Endpoint, pair: Pair) -> Host:
        opts = pair.options
        known = opts.knownhosts or self.known_hosts
        key = (endpoint.host, opts.sshport, opts.user, opts.sshkey, known)
        with self._registry_lock:
            if key not in self._hosts:
                if is_local_host(endpoint.host):
                    self._hosts[key] = LocalHost(endpoint.host)
                else:
                    target = SshTarget(endpoint.host, opts.sshport, opts.user, opts.sshkey, known)
                    self._hosts[key] = SshHost(target, self.accept_new_host_key)
            return self._hosts[key]

    def features(self, pair: Pair, src: Host, dst: Host) -> PairFeatures:
        """What the pair can use: each host is probed once per run."""
        opts = pair.options
        src_caps, dst_caps = self.prober.of_both(src, pair.source.pool, dst, pair.destination.pool)
        return plan_features(
            src_caps,
            dst_caps,
            resume=opts.resume,
            hold=opts.hold,
            bookmark=opts.bookmark,
            raw=opts.raw,
            props=opts.props,
            child=pair.is_child,
        )

    def forget_probes(self, pair: Pair) -> None:
        """After a failed run: its hosts are probed afresh next time."""
        self.prober.forget(self.get(pair.source, pair), pair.source.pool)
        self.prober.forget(self.get(pair.destination, pair), pair.destination.pool)

    def close(self) -> None:
        with self._registry_lock:
            hosts = list(self._hosts.values())
        for host in hosts:
            host.close()
