"""The ``zettabee`` command: the seed's actions, quiet on success, exit codes for cron.

Exit codes: 0 success; 1 a pair failed (the message says why); 2 usage or configuration
error; 3 the pair is busy (another run holds its lock).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from zettabee import logs
from zettabee.cliparser import EXIT_BUSY, EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser
from zettabee.config import Settings, load_settings
from zettabee.errors import ConfigError, LockHeld, UsageError, ZettabeeError, naming_pair
from zettabee.logs import PairLog
from zettabee.pair import Pair
from zettabee.pairfile import find_pair, load_pairs
from zettabee.units import format_bytes, format_duration

if TYPE_CHECKING:  # not imported before an update has started its connection
    from zettabee.health import Health
    from zettabee.hosts import Hosts
    from zettabee.replicator import Replicator
    from zettabee.state import StateStore
    from zettabee.tree import Tree


log = logging.getLogger("zettabee")


class App:
    """Loaded settings and pairs, and the state store, for one invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings: Settings = load_settings(getattr(args, "settings", None))
        path = getattr(args, "config", None) or self.settings.pairs
        self.pairfile = load_pairs(path, self.settings)

    @functools.cached_property
    def store(self) -> StateStore:
        from zettabee.state import StateStore

        return StateStore(self.settings.state_dir, self.settings.lock_dir, self.settings.log_dir)

    def report_problems(self) -> None:
        for problem in self.pairfile.problems:
            print(f"zettabee: {problem}", file=sys.stderr)

    def select(self, names: Sequence[str], all_when_empty: bool) -> list[Pair]:
        if not names:
            if all_when_empty:
                return list(self.pairfile.pairs)
            raise UsageError("name a destination (or --all)")
        return [self.find(name) for name in names]

    def find(self, name: str) -> Pair:
        """The pair ``name`` names: a line, or a child of a recursive line (``dest/child``)."""
        try:
            return find_pair(self.pairfile.pairs, name)
        except UsageError:
            from zettabee.tree import find_in_trees

            found = find_in_trees(self.pairfile.pairs, self.settings.state_dir, name)
            if found is None:
                raise
            return found


def run_actions(app: App, pairs: list[Pair], action: str) -> int:
    from zettabee.hosts import Hosts

    args = app.args
    hosts = Hosts(app.settings.known_hosts, probe_cache=app.settings.state_dir)
    if pairs:  # the handshakes go on while the rest of zettabee is imported
        hosts.get(pairs[0].source, pairs[0]).start()
        hosts.get(pairs[0].destination, pairs[0]).start()

    from zettabee.replicator import Replicator

    replicator = Replicator(app.store, hosts)
    code = EXIT_OK
    try:
        steps = _tree_steps(app, hosts, pairs, action)
        pairs = [pair for pair, _ in steps]
        lost: set[str] = set()  # destinations whose initialize failed in this run
        for index, (pair, step) in enumerate(steps):
            # Connect to this pair's hosts and the next one's while the work goes on.
            for ahead in pairs[index : index + 2]:
                hosts.get(ahead.source, ahead).start()
                hosts.get(ahead.destination, ahead).start()
            if step is None:
                code = EXIT_FAILED
                continue
            parent = pair.destination.fs.rpartition("/")[0] if pair.is_child else ""
            if step == "initialize" and parent in lost:
                log.info("%s: not initialized: its parent's initialize failed", pair.name)
                lost.add(pair.destination.fs)
                continue
            with PairLog(app.store, pair, getattr(args, "debug", False), False):
                try:
                    _act(app, replicator, pair, step)
                    _submit(app, pair, action, None)
                except LockHeld as exc:
                    log.error("%s", exc)
                    _submit(app, pair, action, exc)
                    code = max(code, EXIT_BUSY) if code != EXIT_FAILED else code
                except ZettabeeError as exc:
                    log.error("%s", naming_pair(pair.name, exc))
                    _submit(app, pair, action, exc)
                    code = EXIT_FAILED
                    if step == "initialize":
                        lost.add(pair.destination.fs)  # its children cannot be received
    finally:
        hosts.close()
    return code


def _tree_steps(
    app: App, hosts: Hosts, lines: list[Pair], action: str
) -> list[tuple[Pair, str | None]]:
    """Each pair to act on and what to do with it: a recursive line's tree, listed now,
    is its own pair and then each child (one the destination lacks is initialized by
    the run that finds it, once its line's replica exists); None: a line whose tree
    could not be listed (said on stderr), whose own pair still runs."""
    if action not in ("update", "initialize"):
        return [(pair, action) for pair in lines]
    from zettabee import tree

    force = action == "initialize" and getattr(app.args, "force", False)
    steps: list[tuple[Pair, str | None]] = []
    for line_tree in tree.expand(lines, hosts.get, app.settings.state_dir, app.pairfile.pairs):
        line = line_tree.line
        if line_tree.error is not None:
            steps.append((line, None))
            steps.append((line, action))
            continue
        line_missing = line.fingerprint in line_tree.new
        for pair in line_tree.pairs:
            if not pair.is_child:
                steps.append((pair, action))
            elif action == "update" and line_missing:
                continue  # the line's own update says it is not initialized
            elif force or pair.fingerprint in line_tree.new:
                steps.append((pair, "initialize"))
            elif action == "update":
                steps.append((pair, "update"))
        for gone in line_tree.gone:
            log.warning("%s", tree.gone_note(gone))
    return steps


def _act(app: App, replicator: Replicator, pair: Pair, action: str) -> None:
    """One pair's initialize, update or purge, said at info level (``--verbose``)."""
    args = app.args
    if action == "initialize":
        force = getattr(args, "force", False) and not pair.is_child  # update: a new child
        report = replicator.initialize(pair, force=force)
        log.info("%s: initialized: %s", pair.name, _summary(report.bytes, report.seconds))
        if not pair.options.recursive:
            _say_untracked(replicator, pair)
    elif action == "update":
        report = replicator.update(pair)
        log.info("%s: updated: %s", pair.name, _summary(report.bytes, report.seconds))
    elif action == "purge":
        steps = replicator.purge(pair, dry_run=args.dry_run, release=args.release)
        if args.dry_run:  # a real purge logs each step as it takes it
            for step in steps:
                print(step.describe(done=False))
        if args.dry_run and not steps:
            print(f"{pair.name}: nothing to purge")


def _say_untracked(replicator: Replicator, pair: Pair) -> None:
    """A line without recursive=yes whose source has children: say they are left out."""
    from zettabee import tree

    names = tree.untracked_children(pair, replicator.hosts.get(pair.source, pair))
    if names:
        log.warning("%s", tree.untracked_note(pair, names))


def _summary(count: int, seconds: float) -> str:
    rate = count / seconds if seconds > 0 else 0.0
    return f"{format_bytes(count)} in {seconds:.1f}s ({format_bytes(int(rate))}/s)"


def _submit(app: App, pair: Pair, action: str, error: ZettabeeError | None) -> None:
    """``--nagios``: hand the pair's result to the passive back ends."""
    if not getattr(app.args, "nagios", False):
        return
    try:
        from zettabee.passive import submit_pair_results
    except ImportError:  # pragma: no cover - the monitoring suite ships with the core
        log.error("--nagios: passive submission is not available in this installation")
        return
    submit_pair_results(app.settings, app.store, [pair], {pair.fingerprint: error}, action)


def status_lines(healths: list[Health], full: bool) -> list[str]:
    rows = []
    for h in healths:
        opts = h.pair.options
        flag = " "
        if h.lag is not None:
            if h.lag >= opts.clag:
                flag = "!"
            elif h.lag >= opts.wlag:
                flag = "+"
        if h.running:
            flag = "L"
        lag = format_duration(h.lag) + flag if h.lag is not None else "-"
        port = str(opts.port) if opts.port else "-"
        snap = f"{h.lastsnap or '-'}:{port}"
        run = h.run_state.capitalize()
        if h.running and h.status and h.status.action == "initialize":
            run = "Initializing"
        runtime = format_duration(h.runtime) if h.runtime is not None else "-"
        row = [
            str(h.pair.source),
            str(h.pair.destination),
            h.state,
            lag,
            snap,
            f"{run} ({runtime})",
        ]
        if full:
            row += [h.pair.fingerprint, h.replica or "-", h.pair.options.transport]
        rows.append(row)
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _recorded_tree(app: App, pair: Pair) -> Tree:
    """A recursive line with its children as the last run listed them; any other pair
    (a child named on its own too) alone."""
    from zettabee import tree

    if pair.options.recursive and not pair.is_child:
        return tree.recorded(app.settings.state_dir, pair)
    return tree.Tree(pair, [pair])


def health_json(h: Health, gone: bool = False) -> dict[str, object]:
    st = h.status
    return {
        "source": str(h.pair.source),
        "destination": str(h.pair.destination),
        "fingerprint": h.pair.fingerprint,
        "line": h.pair.line_fingerprint,
        "replica": h.replica,
        "child": h.pair.relative,
        "source_gone": gone,
        "state": h.state,
        "reason": h.reason,
        "lag": h.lag,
        "lastsnap": h.lastsnap,
        "run_state": h.run_state,
        "runtime": h.runtime,
        "transport": h.pair.options.transport,
        "port": h.pair.options.port,
        "last_result": st.result if st else "",
        "last_error": st.error if st else "",
        "last_bytes": st.bytes if st else 0,
        "resume": h.resume,
        "features": h.features,
    }


def do_status(app: App) -> int:
    args = app.args
    from zettabee import tree
    from zettabee.capabilities import feature_lines
    from zettabee.health import read_health
    from zettabee.hosts import Hosts

    trees = [_recorded_tree(app, p) for p in app.select(args.destination, all_when_empty=True)]
    pairs = [p for t in trees for p in (*t.pairs, *t.gone)]
    gone = {p.fingerprint for t in trees for p in t.gone}

    hosts = Hosts(app.settings.known_hosts)
    try:  # one zfs get per destination host, over SSH for the remote ones
        healths = read_health(pairs, app.store, hosts=lambda p: hosts.get(p.destination, p))
    finally:
        hosts.close()
    if args.json:
        import json

        print(json.dumps([health_json(h, h.pair.fingerprint in gone) for h in healths], indent=1))
    else:
        for line in status_lines(healths, args.fullstatus):
            print(line)
        for t in trees:
            if t.line.options.recursive and not t.line.is_child:
                print(f"  {tree.tree_note(t)}")
            for pair in t.gone:
                print(f"  {tree.gone_note(pair)}")
        for h in healths:
            if h.reason and h.state != "Uninitialized":
                print(f"  {h.pair.name}: {h.reason}")
            if h.last_error:
                print(f"  {h.pair.name}: last run {h.run_state}: {h.last_error}")
            if h.resume_note:
                print(f"  {h.pair.name}: {h.resume_note}")
            if args.fullstatus:
                for line in feature_lines(h.features):
                    print(f"  {h.pair.name}: {line}")
    return EXIT_OK


def do_runstatus(app: App, pair: Pair) -> int:
    fp = pair.fingerprint
    if app.store.lock_holder(fp) is None:
        print(f"{pair.name}: no transfer running")
        return EXIT_OK
    try:
        while app.store.lock_holder(fp) is not None:
            prog = app.store.read_progress(fp) or {}
            done = int(prog.get("bytes", 0))
            rate = float(prog.get("rate", 0.0))
            total = prog.get("total")
            line = f"{pair.name}: {format_bytes(done)} at {format_bytes(int(rate))}/s"
            if total:
                pct = 100.0 * done / float(total)
                eta = (float(total) - done) / rate if rate > 0 else 0
                line += (
                    f", {pct:.0f}% of {format_bytes(int(total))}, ETA {format_duration(int(eta))}"
                )
            print(f"\r{line}\033[K", end="", flush=True)
            time.sleep(1)
        print(f"\n{pair.name}: transfer finished")
    except KeyboardInterrupt:
        print()
    return EXIT_OK


def do_setup(app: App) -> int:
    from zettabee.preflight import check_pairs

    app.store.ensure_dirs()
    pairs = app.select(app.args.destination, all_when_empty=True)
    ok = check_pairs(app.settings, pairs, accept_new_host_key=app.args.accept_new_host_key)
    if ok:
        _say_untracked_all(app, pairs)
    return EXIT_OK if ok and not app.pairfile.problems else EXIT_FAILED


def _say_untracked_all(app: App, pairs: list[Pair]) -> None:
    """setup: each line without recursive=yes whose source has children says so."""
    from zettabee import tree
    from zettabee.hosts import Hosts

    hosts = Hosts(app.settings.known_hosts)
    try:
        for pair in pairs:
            try:
                names = tree.untracked_children(pair, hosts.get(pair.source, pair))
            except ZettabeeError:
                continue  # check_pairs said what is wrong with the source
            if names:
                print(f"zettabee: note: {tree.untracked_note(pair, names)}", file=sys.stderr)
    finally:
        hosts.close()


def do_enroll(app: App) -> int:
    from zettabee import enroll

    args = app.args
    plan = enroll.plan_for(args.host, app.pairfile.pairs, app.settings.known_hosts)
    defaults = enroll.Request(args.host)
    request = enroll.Request(
        host=args.host,
        admin=args.admin,
        admin_key=args.admin_key,
        password_fd=args.password_fd,
        host_key_fingerprint=args.host_key_fingerprint,
        authorized_keys=args.authorized_keys or defaults.authorized_keys,
        source_path=args.source_path,
        from_patterns=args.from_patterns,
        dry_run=args.dry_run,
        remove=args.remove,
        timeout=args.timeout or defaults.timeout,
        delegate=args.delegate,
        remove_user=args.remove_user,
    )
    if args.remove_user and not (args.remove and args.delegate):
        raise UsageError("--remove-user goes with --remove and --user NAME")
    enroll.enroll(request, plan)
    return EXIT_OK


def do_monitoring_config(app: App) -> int:
    from zettabee import monconf

    args = app.args
    pairs = app.select(args.destination, all_when_empty=True)
    if args.per_child:
        if args.mode != monconf.ACTIVE:
            raise UsageError(
                "--per-child goes with --mode active: replicate submits one result per "
                "pair line, so a child's passive service would never receive one"
            )
        pairs = monconf.with_children(pairs, app.settings.state_dir)
    settings_file, pair_file = monconf.plugin_files(app.settings, app.pairfile.path)
    request = monconf.Request(
        host=args.host or app.settings.monitoring_host(),
        mode=args.mode,
        address=args.address,
        host_object=not args.no_host,
        host_template=args.host_template,
        endpoint=getattr(args, "endpoint", None),
        freshness=monconf.freshness(args.cron_period, args.slack),
        sudo=args.sudo,
        settings_file=settings_file,
        pair_file=pair_file,
    )
    kind = "icinga" if args.action == "icinga-config" else "nagios"
    text = monconf.render(kind, app.settings, pairs, request)
    warning = monconf.host_mismatch(app.settings, request)
    if warning:
        print(f"zettabee: warning: {warning}", file=sys.stderr)
    print(text, end="")
    # Broken lines have no services: say so in the exit status, not only on stderr.
    return EXIT_FAILED if app.pairfile.problems else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup("zettabee", getattr(args, "verbose", False), getattr(args, "debug", False))
    try:
        app = App(args)
    except ConfigError as exc:
        print(f"zettabee: {exc}", file=sys.stderr)
        return EXIT_USAGE
    action = args.action
    try:
        if action == "check-config":
            app.report_problems()
            if app.pairfile.problems:
                return EXIT_USAGE
            print(f"{len(app.pairfile.pairs)} pairs, no problems")
            return EXIT_OK
        app.report_problems()
        if action == "fingerprint":
            for pair in app.select(args.destination, all_when_empty=True):
                print(f"{pair.source}  {pair.destination}  {pair.fingerprint}")
            return EXIT_OK
        if action == "status":
            return do_status(app)
        if action in ("icinga-config", "nagios-config"):
            return do_monitoring_config(app)
        if action == "setup":
            return do_setup(app)
        if action == "enroll":
            return do_enroll(app)
        if action == "update":
            if args.all and args.destination:
                raise UsageError("give destinations or --all, not both")
            pairs = app.select(args.destination, all_when_empty=args.all)
            code = run_actions(app, pairs, action)
            return EXIT_FAILED if app.pairfile.problems and code == EXIT_OK else code
        pair = app.find(args.destination)
        if action == "logfile":
            print(app.store.log_path(pair.fingerprint))
            return EXIT_OK
        if action == "unlock":
            print(app.store.unlock(pair.fingerprint, pair.name))
            return EXIT_OK
        if action == "runstatus":
            return do_runstatus(app, pair)
        return run_actions(app, [pair], action)
    except LockHeld as exc:
        print(f"zettabee: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (UsageError, ConfigError) as exc:
        print(f"zettabee: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ZettabeeError as exc:
        print(f"zettabee: {exc}", file=sys.stderr)
        return EXIT_FAILED


def run() -> NoReturn:
    """The ``zettabee`` command: :func:`main`, then out without tearing the interpreter
    down. The work is done and written out by then; the teardown (modules, threads'
    bookkeeping) would add 15-20 ms to every cron run."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a reader that went away (a closed pipe) is no reason to fail
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
