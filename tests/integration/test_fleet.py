"""Many pairs in one run, on the real lab: ``replicate --all --jobs N`` with a source that
hangs and one that is down, and ``status`` and ``check_zettabee_lag --all`` over many
pairs from one ``zfs get``.

A hung source is a TCP listener in the source host's namespace that accepts and never
answers (an sshd stuck on a dead disk looks the same from here); a down source is a port
nobody listens on.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lab.nscad import NscaDaemon
from lab.zfslab import ZfsLab
from tests.conftest import Zb, write_random
from tests.integration.test_replicate import by_service, initialized, nsca_settings, services

pytestmark = pytest.mark.integration

HUNG_PORT, DOWN_PORT = 2222, 2223

LISTENER = """
import socket, sys, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(16)
print("listening", flush=True)
held = []
while True:
    held.append(server.accept())
"""


@contextmanager
def hung_sshd(lab: ZfsLab, port: int) -> Iterator[None]:
    """A listener on the source host that takes connections and never says a word."""
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab.layout.netns}", sys.executable, "-c", LISTENER,
         lab.source.address, str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield
    finally:
        proc.kill()
        proc.wait()


def status_file(zb: Zb, leaf: str) -> dict[str, object]:
    fp = zb.fingerprint(leaf)
    data = json.loads((zb.tmp / "state" / f"{fp}.json").read_text())
    assert isinstance(data, dict)
    return data


def test_a_hung_and_a_dead_source_hold_up_and_break_no_other_pair(
    zb: Zb, lab: ZfsLab, nscad: NscaDaemon
) -> None:
    zb.write_settings(nsca_settings(nscad))
    initialized(zb, "a", "b", "c", "hung", "down")
    for leaf in "abc":
        write_random(zb.src_dir(leaf) / "more.bin", 1)
    # The same pairs (the port is not part of a pair's identity), now behind bad ports.
    zb.write_pairs(
        zb.pair_line("hung", f"sshport={HUNG_PORT}"),
        zb.pair_line("down", f"sshport={DOWN_PORT}"),
        *(zb.pair_line(leaf) for leaf in "abc"),
    )
    with hung_sshd(lab, HUNG_PORT):
        run = zb.exe("replicate", "--all", "--jobs", "2", timeout=300)

    assert run.returncode == 1
    assert run.stdout == ""
    errors = run.stderr.splitlines()
    assert len(errors) == 2, run.stderr
    hung = next((line for line in errors if zb.dst_fs("hung") in line), run.stderr)
    assert re.search(rf"port {HUNG_PORT}.*(timed out|Connection timed out)", hung), hung
    down = next((line for line in errors if zb.dst_fs("down") in line), run.stderr)
    assert f"cannot connect to {zb.src.address} port {DOWN_PORT}" in down
    assert "Connection refused" in down
    for leaf in "abc":
        zb.assert_same_data(leaf)
    # The good pairs were done while the hung one still waited: nobody queued behind it.
    hung_ended = status_file(zb, "hung")["ended"]
    assert isinstance(hung_ended, float)
    for leaf in "abc":
        good = status_file(zb, leaf)
        assert good["result"] == "ok"
        assert isinstance(good["ended"], float) and good["ended"] < hung_ended

    got = by_service(nscad.wait_for(10))
    for leaf in "abc":
        lag, runtime = (got[name] for name in services(zb, leaf))
        assert (lag.code, runtime.code) == (0, 0)
    for leaf, said in (("hung", "timed out"), ("down", "Connection refused")):
        lag, runtime = (got[name] for name in services(zb, leaf))
        assert runtime.code == 2, runtime.output
        assert runtime.output.startswith(
            f"ZETTABEE_RUNTIME CRITICAL - {zb.dst_fs(leaf)} last update failed:"
        )
        assert said in runtime.output


def test_many_pairs_are_read_with_one_zfs_call(zb: Zb) -> None:
    leaves = [f"p{i}" for i in range(6)]
    initialized(zb, *leaves)

    out = zb.run("--debug", "status")
    assert out.returncode == 0
    rows = out.stdout.splitlines()
    assert len(rows) == 6 and all("Synchronized" in row for row in rows)
    commands = [line for line in out.stderr.splitlines() if ": run on " in line]
    assert len(commands) == 1 and " zfs get " in commands[0], commands
    assert all(f"{zb.dst_fs(leaf)}@zettabee." in commands[0] for leaf in leaves)

    # A pair this host has never run is looked at whole, in one more call for all such.
    zb.make_source("new", 0)
    zb.make_source("newer", 0)
    zb.write_pairs(*(zb.pair_line(leaf) for leaf in [*leaves, "new", "newer"]))
    check = zb.exe("check_zettabee_lag", "-vvv", "--all")
    assert check.returncode == 3, check.stdout  # the new pairs are not initialized yet
    assert check.stdout.startswith("ZETTABEE_LAG UNKNOWN")
    calls = [line for line in check.stdout.splitlines() if "run on " in line]
    assert len(calls) == 2 and all("zfs get" in call for call in calls), calls
    assert zb.dst_fs("p0") not in calls[1] and calls[1].endswith(
        f"-- {zb.dst_fs('new')} {zb.dst_fs('newer')}"
    )
    assert "ssh" not in check.stdout


def test_a_replicate_run_lists_the_destinations_here_in_one_call(zb: Zb) -> None:
    leaves = [f"q{i}" for i in range(6)]
    initialized(zb, *leaves)
    for leaf in leaves:
        write_random(zb.src_dir(leaf) / "more.bin", 1)

    run = zb.exe("replicate", "--all", "--jobs", "2", "--debug", timeout=300)
    assert run.returncode == 0, run.stderr
    for leaf in leaves:
        zb.assert_same_data(leaf)
    listings = [line for line in run.stderr.splitlines()
                if ": run on " in line and " zfs get " in line and "zettabee:lastsnap" in line]  # fmt: skip
    batched = [line for line in listings if all(zb.dst_fs(leaf) in line for leaf in leaves)]
    assert len(batched) == 1, listings
    # The first pairs start beside that listing and may list their own; no others do.
    assert len(listings) - 1 <= 2, listings
    status = zb.run("status")
    assert status.stdout.count("Synchronized") == len(leaves), status.stdout
