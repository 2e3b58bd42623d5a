"""Security on the real lab: host keys, the restricted source key, file modes, secrets.

- a source whose host key changed is refused by every connection zettabee makes, and
  ``setup --accept-new-host-key`` still refuses it;
- with ``zettabee-source`` as the forced command of its key, a pull works over the lab's
  sshd (both transports, pruning, setup) and every attempt to do more is refused;
- lock, status, progress, spool and log files are not writable by others even under
  umask 000;
- passwords of the monitoring back ends appear in no log, no output, no state file, and
  no argv or environment of any process the runs start (every execve, traced).
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lab.icinga import Icinga2Daemon, passive_service_config
from lab.nscad import SEND_NSCA_BINARY, NscaDaemon
from tests.conftest import running_daemon
from tests.integration.faults.conftest import (
    INTACT,
    Faults,
    Replica,
    SecondServer,
    Sshd,
    cmdline,
    kill,
    snapshots,
    wait_until,
)
from zettabee import fastpath, zfs
from zettabee.host import SshTarget
from zettabee.pair import parse_snapshot_name, replica_id, snapshot_name, tag_of
from zettabee.pipeline import pipeline_script

pytestmark = pytest.mark.integration

SOURCE_COMMAND = str(Path(sys.executable).parent / "zettabee-source")


# -- host keys ------------------------------------------------------------------------


def test_unknown_host_key_is_refused(faults: Faults, sshd: Sshd) -> None:
    zb = faults.zb
    sshd.known_hosts.write_text("")  # never pinned
    sshd.start()
    zb.make_source("data", 1)
    zb.write_pairs(zb.pair_line("data", sshd.options()))
    row = faults.expect(
        "source host key unknown",
        "exit 1 'host key ... is unknown ... --accept-new-host-key'; nothing received",
    )
    outcome = faults.run("zettabee", "initialize", zb.dst_fs())
    created = snapshots(zb.dst_fs())
    row.observed = f"exit {outcome.code}; says: {faults.shown(outcome.stderr, Replica(zb, 'data'))}"
    row.data = INTACT if not created else "RECEIVED"
    assert outcome.code == 1, outcome.stderr
    assert re.search(
        r"host key of \S+ port 2222 is unknown .*--accept-new-host-key", outcome.stderr
    )
    assert not created
    assert sshd.known_hosts.read_text() == ""  # nothing pinned behind the operator's back


def test_changed_host_key_is_refused(faults: Faults, sshd: Sshd) -> None:
    sshd.start()
    replica = faults.replica(mb=1, options=sshd.options())
    sshd.stop()
    sshd.new_host_key()  # the "source" was reinstalled, or someone is in the middle
    sshd.start()
    replica.grow(1)
    faults.expect(
        "source host key changed",
        "exit 1 'host key ... has CHANGED, refusing'; runtime CRITICAL; ssh client refuses "
        "too; setup --accept-new-host-key refuses it",
    )
    faults.update_fails(
        replica, rf"host key of {sshd.address} port {sshd.port} has CHANGED .*refusing to connect"
    )
    lab = faults.lab
    target = SshTarget(sshd.address, sshd.port, "root", lab.source.key, str(sshd.known_hosts))
    client = subprocess.run(target.ssh_client_argv("true"), capture_output=True, text=True)
    assert client.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in client.stderr
    setup = faults.run("zettabee", "setup", "--accept-new-host-key", replica.fs)
    assert setup.code == 1 and "CHANGED" in setup.stdout + setup.stderr, setup
    assert faults.row is not None
    faults.row.observed += "; ssh client: exit 255; setup --accept-new-host-key: exit 1"


# -- the restricted source key ------------------------------------------------------


@pytest.fixture
def restricted(faults: Faults, sshd: Sshd) -> Sshd:
    """The lab's client key allowed only zettabee-source for the test's source file system."""
    key = (Path(faults.lab.source.key).parent / "client_ed25519.pub").read_text().strip()
    command = shlex.join([SOURCE_COMMAND, faults.zb.src_fs()])
    sshd.authorized_keys.write_text(f'restrict,command="{command}" {key}\n')
    sshd.start()
    return sshd


@pytest.mark.parametrize(
    ("transport", "host"),
    [("ssh", ""), ("mbuffer", ""), ("mbuffer", "localhost")],
    ids=["ssh", "mbuffer", "mbuffer-into-localhost"],
)
def test_a_pull_works_through_the_restricted_key(
    faults: Faults, restricted: Sshd, transport: str, host: str
) -> None:
    """Into ``localhost`` (the README's mbuffer line), the source's mbuffer connects back
    to the address of its SSH connection, the one zettabee-source lets it reach."""
    zb = faults.zb
    log = restricted.capture_auth_log()
    options = f"{restricted.options()},transport={transport}"
    replica = faults.replica(mb=2, options=options, host=host)
    row = faults.expect(
        f"pull through the restricted key (zettabee-source), {transport}"
        + (f" into {host}" if host else ""),
        "setup, initialize, updates and pruning work, the probe finds holds and the base "
        "is held on the source; exit 0; lag OK; runtime OK",
    )
    for _ in range(2):
        replica.grow(1)
        faults.recovers(replica)  # an update that must simply work
    setup = faults.run("zettabee", "setup", replica.fs)
    assert setup.code == 0, setup.stdout + setup.stderr
    assert "uses holds (source and destination)" in setup.stdout, setup.stdout
    assert snapshots(zb.src_fs()) == snapshots(replica.fs)  # the source was pruned, remotely
    assert len(snapshots(zb.src_fs())) == 1
    # The probe and the holds went through the forced command: the base is held on the
    # source by the pair's tag (zfs-fuse counts holds, it cannot list them).
    base = f"{zb.src_fs()}@{snapshots(zb.src_fs())[0]}"
    assert zb.srcside.zget(base, "userrefs") == "1"
    status = json.loads((zb.tmp / "state" / f"{replica.fingerprint}.json").read_text())
    assert "holds (source and destination)" in status["features"]["uses"], status["features"]
    tag = str(tag_of(base))
    released = zb.srcside.run("zfs", "release", tag, base, check=False)
    assert released.returncode == 0, released.stderr  # the tag was the pair's
    zb.srcside.run("zfs", "hold", tag, base)
    assert "refused" not in restricted.log()
    refusals = [text for _, text in log.read() if "refused" in text]
    row.observed = (
        "setup exit 0 (uses holds on both sides); initialize and 2 updates exit 0; source "
        "pruned, its base held by the pair's tag; lag OK; runtime OK; "
        f"{len(refusals)} refusals in the source's auth log"
    )
    row.data = replica.intact()
    assert not refusals, refusals
    assert row.data == INTACT


def test_a_key_bound_to_its_pairs_leaves_other_pairs_alone(faults: Faults, sshd: Sshd) -> None:
    """Two backup servers pull the same file system: B with a key of its own, A through
    zettabee-source bound to A's pair (``--pair FP``). A's key pulls as before, and can
    neither release B's hold nor destroy B's snapshots: B's chain stays whole."""
    zb, lab = faults.zb, faults.lab
    log_key = (Path(lab.source.key).parent / "client_ed25519.pub").read_text().strip()
    sshd.start()
    log = sshd.capture_auth_log()
    fs = zb.make_source("data", 1)
    dest_a = f"{zb.dst_fs()}-a"
    line_a = zb.pair_line("data", sshd.options()).replace(f":{zb.dst_fs()} ", f":{dest_a} ")
    zb.write_pairs(zb.pair_line("data"), line_a)
    fp_a, fp_b = (zb.run("fingerprint", dest).stdout.split()[-1] for dest in (dest_a, zb.dst_fs()))
    command = shlex.join([SOURCE_COMMAND, "--pair", fp_a, fs])
    sshd.authorized_keys.write_text(f'restrict,command="{command}" {log_key}\n')
    replica_b = Replica(zb, "data")
    assert zb.run("initialize", zb.dst_fs()).returncode == 0
    replica_b.remember()
    row = faults.expect(
        "one backup server's key (zettabee-source --pair A) against another's pair B on "
        "the same file system",
        "A pulls as before; releasing B's hold and destroying B's snapshot: exit 126, "
        "logged; B's next update incremental: refused, logged",
    )
    pulled = [faults.run("zettabee", "initialize", dest_a)]
    replica_b.grow(1)
    pulled.append(faults.run("zettabee", "update", dest_a))
    base_b = f"{fs}@{replica_b.snapshot}"
    named_b = parse_snapshot_name(replica_b.snapshot)
    assert named_b is not None and named_b.rid is not None, replica_b.snapshot
    rid_b = named_b.rid
    target = SshTarget(sshd.address, sshd.port, "root", lab.source.key, str(sshd.known_hosts))
    attacks = {
        "release": shlex.join(zfs.release(str(tag_of(base_b)), base_b)),
        "destroy": shlex.join(zfs.destroy(base_b)),
        "hold": shlex.join(zfs.hold(str(tag_of(base_b)), base_b)),
        "snapshot": shlex.join(zfs.snapshot(fs, snapshot_name(fp_b, rid_b, datetime.now(UTC)))),
    }
    answers = {name: _ask(target, command) for name, command in attacks.items()}
    refused = [n for n, (code, err, _) in answers.items() if code == 126 and fp_b in err]

    def logged() -> list[str]:
        return [t for p, t in log.read() if p == AUTH_WARNING and f"of pair {fp_b}" in t]

    wait_until("the refusals in the auth log", lambda: len(logged()) >= len(refused), 5)
    held = zb.srcside.zget(base_b, "userrefs")
    replica_b.grow(1)
    after = faults.run("zettabee", "update", zb.dst_fs())
    row.observed = (
        f"A: initialize exit {pulled[0].code}, update exit {pulled[1].code}; against B: "
        + ", ".join(f"{n} exit {c}" for n, (c, _, _) in answers.items())
        + f"; {len(logged())} auth-log lines of them; B's base "
        f"{'held' if held == '1' else 'NOT HELD'}; B's next update exit {after.code}"
        + (": refused, logged" if len(refused) == len(logged()) == len(attacks) else "")
    )
    replica_b.remember()
    row.data = replica_b.intact()
    assert [p.code for p in pulled] == [0, 0], [p.stderr for p in pulled]
    assert refused == list(attacks), answers
    assert len(logged()) == len(attacks), log.read()
    assert held == "1" and after.code == 0, after.stderr
    assert row.data == INTACT


def test_a_key_bound_to_its_replica_leaves_another_server_s_under_the_same_line_alone(
    faults: Faults, sshd: Sshd, second_server: SecondServer
) -> None:
    """Two backup servers pull one source under the same pair line: one fingerprint, two
    replica ids. Server A (the lab's destination) pulls through zettabee-source bound to
    its replica, ``--pair FP.RIDA``; server B (a second ZFS on this machine, a pool of the
    same name) pulls by the lab's own key. A ``--pair FP`` binding let A's key release
    B's hold and destroy B's base (the fingerprint is B's too): ``--pair FP.RID`` must
    refuse it, and both servers' updates stay incremental."""
    a, b, lab = faults.zb, second_server, faults.lab
    sshd.start()
    log = sshd.capture_auth_log()
    fs = a.make_source("data", 2)
    a.write_pairs(f"{sshd.address}:{fs}  localhost:{a.dst_fs()}  {sshd.options()}")
    b.write_pairs(f"{a.srcside.address}:{fs}  localhost:{b.dst_fs()}")
    fp = a.fingerprint()
    assert fp == b.fingerprint() and sshd.address == a.srcside.address
    rid_a, rid_b = a.replica_id(), replica_id(b.zfs.guid())
    assert rid_a != rid_b
    key = (Path(lab.source.key).parent / "client_ed25519.pub").read_text().strip()
    command = shlex.join([SOURCE_COMMAND, "--pair", f"{fp}.{rid_a}", fs])
    sshd.authorized_keys.write_text(f'restrict,command="{command}" {key}\n')
    servers = {"A": a, "B": b}
    replicas = {name: Replica(server, "data") for name, server in servers.items()}
    codes: dict[str, list[int]] = {name: [] for name in servers}

    def pull(name: str, action: str) -> None:
        out = servers[name].run(action, servers[name].dst_fs())
        codes[name].append(out.returncode)
        assert out.returncode == 0, f"{name} {action}: {out.stderr}"
        replicas[name].remember()

    for name in servers:
        pull(name, "initialize")
    replicas["A"].grow(1, "more0.bin")
    for name in servers:
        pull(name, "update")
    made = {name: s.dstside.zget(s.dst_fs(), "guid") for name, s in servers.items()}
    row = faults.expect(
        "server A's key (zettabee-source --pair FP.RIDA) against server B's replica of "
        "the same pair line (FP.RIDB) on the same source",
        "A pulls as before; releasing, holding, destroying B's base and taking and sending "
        "a snapshot under B's name: exit 126, logged; both servers' next updates "
        "incremental, each base held once; both intact",
    )
    base_b = f"{fs}@{replicas['B'].snapshot}"
    assert parse_snapshot_name(base_b) is not None
    assert str(parse_snapshot_name(base_b).rid) == rid_b  # type: ignore[union-attr]
    tag_b = str(tag_of(base_b))
    forged = snapshot_name(fp, rid_b, datetime.now(UTC))
    attacks = {
        "release": shlex.join(zfs.release(tag_b, base_b)),
        "destroy": shlex.join(zfs.destroy(base_b)),
        "hold": shlex.join(zfs.hold(tag_b, base_b)),
        "snapshot": shlex.join(zfs.snapshot(fs, forged)),
        "send": shlex.join(zfs.send(base_b)),
    }
    target = SshTarget(sshd.address, sshd.port, "root", lab.source.key, str(sshd.known_hosts))
    answers = {name: _ask(target, request) for name, request in attacks.items()}
    refused = [n for n, (code, err, _) in answers.items() if code == 126 and rid_b in err]

    def logged() -> list[str]:
        return [t for p, t in log.read() if p == AUTH_WARNING and f"replica {rid_b}" in t]

    wait_until("the refusals in the auth log", lambda: len(logged()) >= len(refused), 5)
    held_b = replicas["A"].source_holds().get(replicas["B"].snapshot)
    replicas["A"].grow(1, "more1.bin")
    for name in servers:
        pull(name, "update")
    remade = [n for n, s in servers.items() if s.dstside.zget(s.dst_fs(), "guid") != made[n]]
    after = replicas["A"].source_holds()
    mine = {r.snapshot: 1 for r in replicas.values()}
    verdicts = {name: replica.intact() for name, replica in replicas.items()}
    row.observed = (
        "; ".join(f"{name}: exit {', '.join(map(str, c))}" for name, c in codes.items())
        + "; against B: "
        + ", ".join(f"{n} exit {c}" for n, (c, _, _) in answers.items())
        + f"; {len(logged())} auth-log lines naming replica {rid_b}"
        + f"; B's base {'held' if held_b == 1 else 'NOT HELD'}"
        + (f"; made again: {', '.join(remade)}" if remade else "; no resend")
        + ("; each base held once" if after == mine else f"; the source holds {after}")
    )
    row.data = INTACT if set(verdicts.values()) == {INTACT} else str(verdicts)
    assert refused == list(attacks), answers
    assert len(logged()) == len(attacks), log.read()
    assert held_b == 1 and snapshots(fs).count(forged) == 0
    assert not remade and after == mine, (remade, after, mine)
    assert codes == {"A": [0, 0, 0], "B": [0, 0, 0]}
    assert row.data == INTACT


ESCAPES = [
    "id; touch {m}",
    "zfs list -H -o name {pool} && touch {m}",
    "zfs list -H -o name $(touch {m})",
    "touch {m}",
    "sh -c 'touch {m}'",
    "cat /etc/shadow",
    "zfs destroy {fs}@kept-by-hand",
    "zfs destroy -r {fs}",
    "zfs set readonly=on {other}",
    "zfs snapshot {other}@zettabee.0123456789abcdef0123456789abcdef.20240101T000000Z",
    "zfs send {other}@secret",
    "zfs get -Hp -o name,property,value all -- {other}",
    "zfs rollback -r {fs}@kept-by-hand",
    "zfs receive -F {fs}",
    "zfs hold keep {fs}@kept-by-hand",
    "zfs release zettabee.0123456789abcdef0123456789abcdef {other}@secret",
    "zfs bookmark {fs}@kept-by-hand {fs}#kept-by-hand",
    "sh -c 'zfs list; id' zettabee-probe {pool}",
    "zpool get all {dpool}",
    "zfs snapshot {fs}@zettabee.0123456789abcdef0123456789abcdef.20240101T000000Z\ntouch {m}",
    "",
]


def test_the_restricted_key_refuses_everything_else(
    faults: Faults, restricted: Sshd, tmp_path: Path
) -> None:
    zb = faults.zb
    fs = zb.make_source("data", 1)
    other = zb.make_source("other", 1)
    zb.src.run("zfs", "snapshot", f"{fs}@kept-by-hand")
    zb.src.run("zfs", "snapshot", f"{other}@secret")
    marker = tmp_path / "escaped"
    row = faults.expect(
        "escapes from the restricted key (; && $() other datasets, foreign snapshots, "
        "other commands, no command)",
        "each: exit 126 'zettabee-source: refused'; nothing run; source unchanged",
    )
    lab = faults.lab
    target = SshTarget(restricted.address, restricted.port, "root", lab.source.key,
                       str(restricted.known_hosts))  # fmt: skip
    before = (snapshots(fs), snapshots(other), _readonly(other))
    refused = []
    for template in ESCAPES:
        command = template.format(
            m=marker, pool=lab.source.pool, dpool=lab.dst_pool, fs=fs, other=other
        )
        argv = target.ssh_client_argv(command)
        if not command:
            argv = argv[:-1]  # a login without a command
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        ok = proc.returncode == 126 and "zettabee-source: refused" in proc.stderr
        refused.append(ok)
        assert ok, (command, proc.returncode, proc.stdout, proc.stderr)
        assert not marker.exists(), command
    after = (snapshots(fs), snapshots(other), _readonly(other))
    row.observed = (
        f"{sum(refused)}/{len(ESCAPES)} refused with exit 126; marker "
        f"{'PRESENT' if marker.exists() else 'absent'}; source snapshots and properties "
        f"{'unchanged' if after == before else 'CHANGED'}"
    )
    row.data = INTACT if after == before and not marker.exists() else "CHANGED"
    assert after == before


# -- the unencrypted mbuffer stream ------------------------------------------------------

# A plain TCP server that takes whatever comes and writes how many bytes it got.
IMPOSTOR = """
import socket, sys, threading
port, record = int(sys.argv[1]), sys.argv[2]
server = socket.socket()
server.bind(("0.0.0.0", port))
server.listen(8)
print("listening", flush=True)
got, lock = 0, threading.Lock()
def take(conn):
    global got
    with conn:
        while data := conn.recv(65536):
            with lock:
                got += len(data)
                with open(record, "w") as out:
                    out.write(str(got))
while True:
    conn, _ = server.accept()
    threading.Thread(target=take, args=(conn,), daemon=True).start()
"""


@contextlib.contextmanager
def impostor(port: int, record: Path, netns: str | None) -> Iterator[Callable[[], int]]:
    """Another program listening on ``port`` (in the namespace ``netns``); yields a
    function that says how many bytes it has received."""
    inside = ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []
    record.write_text("0")
    argv = [*inside, sys.executable, "-c", IMPOSTOR, str(port), str(record)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield lambda: int(record.read_text() or 0)
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("where", ["here", "remote"])
def test_another_program_on_the_mbuffer_port_gets_nothing(
    faults: Faults, tmp_path: Path, where: str
) -> None:
    """Issue 17, row 4: readiness was "something listens on the port", so the source's
    unencrypted stream went to whatever held the pair's port (the listening mbuffer, left
    without it, failed after). The source is told to connect only once the socket on the
    port is the listening mbuffer's own; here, the destination host (this one, or a
    remote one) has another program on the port, and the run fails naming it."""
    zb = faults.zb
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    remote = where == "remote"
    replica = faults.replica(
        mb=2, options=f"transport=mbuffer,port={port}", host=zb.srcside.address if remote else ""
    )
    replica.grow(2)
    row = faults.expect(
        "another program listens on the pair's mbuffer port= on the destination"
        + (" (a remote one)" if remote else " (this host)"),
        "the source is not told to connect, the program receives 0 bytes; exit 1 'port P "
        "on HOST is in use by another program'; runtime CRITICAL; recovers once it is gone",
    )
    with impostor(port, tmp_path / "impostor-got", faults.netns if remote else None) as got:
        outcome = faults.run("zettabee", "update", replica.fs)
        received = got()
    row.observed = f"the other program received {received} bytes; exit {outcome.code}"
    assert received == 0, f"the stream went to the other program: {outcome.stderr}"
    faults.failed(replica, outcome, rf"port {port} on \S+ is in use by another program")
    row.observed = "the other program received 0 bytes; " + row.observed
    faults.recovers(replica)


FP = "0123456789abcdef0123456789abcdef"  # a pair's fingerprint: requests need only its form
# What the source's auth log gets for a refusal: syslog facility auth, level warning.
AUTH_WARNING = 4 * 8 + 4


def _ask(target: SshTarget, command: str | bytes, limit: float = 60) -> tuple[int, str, float]:
    """A request over the restricted key (``bytes`` as they are: SSH carries bytes); its
    exit status, the client's stderr and the wall seconds it took."""
    raw = command if isinstance(command, bytes) else command.encode()
    argv: list[str | bytes] = [*target.ssh_client_argv("x")[:-1], raw]
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=limit, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # the client killed; what it started, by the caller
        return -1, f"no answer within {limit:.0f} s", time.monotonic() - started
    took = time.monotonic() - started
    return proc.returncode, proc.stderr.decode(errors="replace"), took


def test_malformed_requests_are_refused_and_logged(faults: Faults, restricted: Sshd) -> None:
    """Requests no zettabee sends, that once made zettabee-source crash with a Python
    traceback (exit 1, nothing in the auth log): each must be refused like any other."""
    zb, lab = faults.zb, faults.lab
    log = restricted.capture_auth_log()
    fs = zb.make_source("data", 1)
    before = snapshots(fs)
    snap = snapshot_name(FP, "0a1b2c3d", datetime.now(UTC))
    own = f"{fs}@{snap}"
    out = ["mbuffer", "-q", "-s", "128k", "-m", "16M", "-O", f"{lab.dest_address}:9090"]
    requests: dict[str, str | bytes] = {
        "an unbalanced quote": f"zfs list -H -o name '{fs}",
        "an unbalanced quote in the mbuffer pipeline": pipeline_script(
            [zfs.send(own), out]
        ).replace("zfs send", "zfs send '", 1),
        "an unbalanced quote in the update script": fastpath.script(
            fs, snap, zfs.send(own)
        ).replace("zfs snapshot", "zfs snapshot '", 1),
        "a zettabee snapshot name whose time is no time": shlex.join(
            zfs.snapshot(fs, f"zettabee.{FP}.20241399T000000Z")
        ),
        "bytes that are not UTF-8": f"zfs list -H -o name {fs}".encode() + b"\xff\xc3\x28",
        "100 KB": "zfs list -H -o name " + "a" * 100_000,
    }
    row = faults.expect(
        "malformed requests to zettabee-source (unbalanced quotes in a command, a pipeline, "
        "an update script; a snapshot time that is no time; bytes not UTF-8; 100 KB)",
        "each: exit 126 'zettabee-source: refused', no traceback, one auth-log line "
        "(auth.warning); source unchanged: refused, logged",
    )
    target = SshTarget(restricted.address, restricted.port, "root", lab.source.key,
                       str(restricted.known_hosts))  # fmt: skip
    answers = {name: _ask(target, command) for name, command in requests.items()}
    refused = [
        name
        for name, (code, err, _) in answers.items()
        if code == 126 and "zettabee-source: refused: " in err and "Traceback" not in err
    ]
    wait_until("the refusals in the auth log", lambda: len(log.read()) >= len(refused), 5)
    logged = [
        text
        for priority, text in log.read()
        if priority == AUTH_WARNING and f"refused from {lab.dest_address}: " in text
    ]
    after = snapshots(fs)
    crashed = {name: a[:2] for name, a in answers.items() if name not in refused}
    row.observed = (
        f"{len(refused)}/{len(requests)} refused with exit 126 and one line "
        f"({'; '.join(f'{n}: exit {c}' for n, (c, _) in crashed.items()) or 'no traceback'}"
        f"); {len(logged)} auth-log lines (auth.warning) 'zettabee-source[PID]: refused "
        f"from {lab.dest_address}: ...'; source {'unchanged' if after == before else 'CHANGED'}"
        f"{': refused, logged' if len(refused) == len(logged) == len(requests) else ''}"
    )
    row.data = INTACT if after == before else "CHANGED"
    assert not crashed, crashed
    assert len(logged) == len(requests), log.read()
    assert all(re.search(r" zettabee-source\[\d+\]: refused", text) for text in logged), logged
    assert all(len(text) < 1000 for text in logged), "the log line is shortened"
    assert after == before


def backtracker(size: int) -> str:
    """``size`` characters shaped like the snapshot-hold-send-mbuffer pipeline of an
    initialize, each separator between its stages many times over and no end: the first
    zettabee-source tried every place each of the four stages might end (16 s over 16 KB,
    minutes over 32 KB), before any check."""
    holes = [f"ZETTABEEHOLE{i}X" for i in range(4)]
    text = pipeline_script([[h] for h in holes[2:]], first=[[h] for h in holes[:2]])
    for hole in holes:
        text = text.replace(hole, "\0")
    pieces = text.split("\0")
    return (pieces[0] + "".join(pieces[1:-1]) * size)[: size - 1] + "x"


def test_requests_made_to_be_slow_are_refused_at_once(faults: Faults, restricted: Sshd) -> None:
    zb, lab = faults.zb, faults.lab
    log = restricted.capture_auth_log()
    fs = zb.make_source("data", 1)
    before = snapshots(fs)
    requests = {"32 KB": backtracker(32 * 1024), "15 KB": backtracker(15 * 1024)}
    row = faults.expect(
        "requests made to backtrack in zettabee-source's parser: 32 KB (over its limit) "
        "and 15 KB (under it)",
        "each: exit 126 'refused' within 5 s; one auth-log line each; source unchanged: "
        "refused, logged",
    )
    target = SshTarget(restricted.address, restricted.port, "root", lab.source.key,
                       str(restricted.known_hosts))  # fmt: skip
    answers = {}
    for name, command in requests.items():
        answers[name] = _ask(target, command, limit=5)
        # A zettabee-source still at it outlives the connection: found by its argument.
        kill([pid for pid in _pids() if fs in cmdline(pid)])
    refused = [n for n, (code, err, took) in answers.items() if code == 126 and took < 5]
    wait_until("the refusals in the auth log", lambda: len(log.read()) >= len(refused), 5)
    logged = [t for p, t in log.read() if p == AUTH_WARNING and "refused from" in t]
    after = snapshots(fs)
    row.observed = (
        "; ".join(
            f"{name}: {'exit ' + str(code) if code >= 0 else err} in {took:.1f} s"
            + (f" ({_why(err)})" if code == 126 else "")
            for name, (code, err, took) in answers.items()
        )
        + f"; {len(logged)} auth-log lines; source {'unchanged' if after == before else 'CHANGED'}"
        + (": refused, logged" if len(refused) == len(logged) == len(requests) else "")
    )
    row.data = INTACT if after == before else "CHANGED"
    assert refused == list(requests), answers
    assert len(logged) == len(requests), log.read()
    assert after == before


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _why(stderr: str) -> str:
    """The reason in a refusal's line, without the request it quotes."""
    return stderr.partition("refused: ")[2].split(": '", 1)[0].split(': "', 1)[0].strip()


def _readonly(fs: str) -> str:
    return subprocess.run(
        ["zfs", "get", "-H", "-o", "value", "readonly", fs], capture_output=True, text=True
    ).stdout.strip()


# -- file modes ---------------------------------------------------------------------


def test_state_files_are_not_writable_by_others_even_under_umask_000(
    faults: Faults, nscad: NscaDaemon
) -> None:
    zb = faults.zb
    zb.write_settings(
        f"[monitoring]\nhost_name = backup1\npassive = nsca\n\n[nsca]\nhost = {nscad.host}\n"
        f"port = {nscad.port}\npassword = {nscad.password}\ntimeout = 5\n"
    )
    nscad.stop()  # so that results are spooled
    zb.make_source("data", 1)
    zb.write_pairs(zb.pair_line("data"))
    row = faults.expect(
        "umask 000: lock, status, progress, spool, log files",
        "no file or directory writable by group or others; spool and its files private",
    )
    for args in (("zettabee", "initialize", zb.dst_fs()), ("replicate", zb.dst_fs())):
        out = faults.run(*args, umask=0)
        assert out.code == 0, out.stderr
    loose = []
    count = 0
    for top in ("state", "run", "log", "spool"):
        for path in [zb.tmp / top, *(zb.tmp / top).rglob("*")]:
            count += 1
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode & 0o022 or (top == "spool" and mode & 0o077):
                loose.append(f"{path.relative_to(zb.tmp)} {oct(mode)}")
    kinds = {p.suffix for p in zb.tmp.rglob("*") if p.is_file()}
    assert {".json", ".lock", ".log"} <= kinds, kinds
    row.observed = f"{count} files and directories; loose: {loose or 'none'}"
    row.data = INTACT
    assert not loose


# -- secrets ------------------------------------------------------------------------


@pytest.fixture
def icinga(faults: Faults) -> Iterator[Icinga2Daemon]:
    names = [f"zettabee {check} {faults.zb.dst_fs()}" for check in ("lag", "runtime")]
    daemon = Icinga2Daemon(passive_service_config("backup1", names))
    with running_daemon(daemon):
        yield daemon


def test_secrets_never_in_logs_outputs_files_or_process_arguments(
    faults: Faults, nscad: NscaDaemon, icinga: Icinga2Daemon
) -> None:
    if not Path(SEND_NSCA_BINARY).exists():
        pytest.skip("send_nsca is not installed (apt-get install nsca-client)")
    zb = faults.zb
    send_nsca_cfg = nscad.write_send_nsca_config(zb.tmp / "send_nsca.cfg")
    submitter = icinga.submitter
    assert nscad.password and submitter.password
    passwords = {"NSCA (and send_nsca)": nscad.password, "Icinga API": submitter.password}
    zb.write_settings(
        "[monitoring]\nhost_name = backup1\npassive = nsca, send_nsca, icinga2-api\n\n"
        f"[nsca]\nhost = {nscad.host}\nport = {nscad.port}\npassword = {nscad.password}\n"
        "encryption = xor\ntimeout = 5\n\n"
        f"[send_nsca]\nhost = {nscad.host}\nport = {nscad.port}\nconfig = {send_nsca_cfg}\n\n"
        f"[icinga2-api]\nurl = {icinga.url}\nuser = {submitter.name}\n"
        f"password = {submitter.password}\ncafile = {icinga.cafile}\n"
    )
    zb.make_source("data", 2)
    zb.write_pairs(zb.pair_line("data"))
    row = faults.expect(
        "secrets (NSCA and send_nsca passwords, Icinga API password) with --debug",
        "in no log, output, state or spool file, and in no argv or environment of any "
        "process started (strace -f execve)",
    )
    trace = zb.tmp / "execve.trace"
    outputs = []
    for args in (
        ("zettabee", "--debug", "initialize", "--nagios", zb.dst_fs()),
        ("replicate", "--debug", zb.dst_fs()),
    ):
        out = faults.run(*args, strace=trace)
        assert out.code == 0, out.stderr
        outputs.append(out.stdout + out.stderr)
        assert "DEBUG" in out.stderr or "run on" in out.stderr  # --debug really was on
    assert len(nscad.wait_for(4 + 4)) >= 8  # nsca and send_nsca both delivered, twice
    execs = trace.read_text(errors="replace")
    assert execs.count("execve(") > 10, "the trace saw the commands"
    places = {"stdout/stderr": "\n".join(outputs), "execve argv and environment": execs}
    for top in ("state", "run", "log", "spool"):
        for path in (zb.tmp / top).rglob("*"):
            if path.is_file():
                places[str(path.relative_to(zb.tmp))] = path.read_text(errors="replace")
    leaks = [
        f"{backend} password in {where}"
        for backend, password in passwords.items()
        for where, text in places.items()
        if password and password in text
    ]
    row.observed = (
        f"{execs.count('execve(')} execve traced, {len(places) - 2} files and both outputs "
        f"searched for both secrets: {'none found' if not leaks else '; '.join(leaks)}"
    )
    row.data = INTACT
    assert not leaks
    assert re.search(r"send_nsca.*\"-c\", \"\S+send_nsca\.cfg\"", execs), "send_nsca ran"
