"""zettabee's own files damaged or gone, and the clock stepping back.

ZFS holds the truth (the replica, its last snapshot); the status file only holds what ZFS
cannot. A damaged status file must never hide the lag nor stop the next update, and a lag
made negative by the clock must never read as OK.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import executable
from tests.integration.faults.conftest import (
    INTACT,
    STATES,
    Faults,
    Outcome,
    descendants,
    wait_until,
)

pytestmark = pytest.mark.integration

RECORDED_PROBES = Path(__file__).parents[2] / "unit" / "recorded"

DAMAGE = {
    "garbage": "{not json at all",
    "truncated": None,  # the first half of the real file
    "empty": "",
    "not an object": "[1, 2, 3]\n",
    "wrong types": json.dumps(
        {
            "state": 7,
            "pid": "me",
            "started": "yesterday",
            "ended": [],
            "last_duration": "long",
            "bytes": "many",
            "seconds": {},
            "last_success": "never",
            "error": 42,
        }
    ),
    "binary": "\x00\xff\xfe garbage \x00",
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_status_file_damaged(faults: Faults, kind: str) -> None:
    replica = faults.replica(mb=1)
    status = faults.zb.tmp / "state" / f"{replica.fingerprint}.json"
    text = DAMAGE[kind]
    if text is None:
        whole = status.read_text()
        text = whole[: len(whole) // 2]
    status.write_text(text)
    row = faults.expect(
        f"status file {kind}",
        "lag OK (ZFS is the truth); runtime UNKNOWN naming the file and the fix; "
        "the next update rewrites it",
    )
    lag_code, lag_text = faults.plugin("check_zettabee_lag", replica.fs)
    run_code, run_text = faults.plugin("check_zettabee_runtime", replica.fs)
    shown = faults.run("zettabee", "status", replica.fs)
    row.observed = (
        f"lag {STATES[lag_code]}; runtime {STATES[run_code]}: "
        f"{faults.shown(run_text, replica)}; status exit {shown.code}"
    )
    row.data = replica.intact()
    assert lag_code == 0, lag_text
    assert run_code == 3, run_text
    assert str(status) in run_text and "zettabee unlock" in run_text, run_text
    assert shown.code == 0 and str(status) in shown.stdout, shown
    assert row.data == INTACT
    replica.grow(1)
    faults.recovers(replica)
    assert json.loads(status.read_text())["result"] == "ok"


def test_state_directories_missing(faults: Faults) -> None:
    replica = faults.replica(mb=1)
    for name in ("state", "run", "log"):
        shutil.rmtree(faults.zb.tmp / name)
    row = faults.expect(
        "state, lock and log directories missing",
        "lag OK; runtime UNKNOWN 'no completed run recorded'; update recreates them",
    )
    lag_code, lag_text = faults.plugin("check_zettabee_lag", replica.fs)
    run_code, run_text = faults.plugin("check_zettabee_runtime", replica.fs)
    row.observed = (
        f"lag {STATES[lag_code]}; runtime {STATES[run_code]}: {faults.shown(run_text, replica)}"
    )
    row.data = replica.intact()
    assert lag_code == 0, lag_text
    assert run_code == 3 and "no completed run recorded" in run_text, run_text
    assert row.data == INTACT
    replica.grow(1)
    faults.recovers(replica)
    for name in ("state", "run", "log"):
        assert (faults.zb.tmp / name).is_dir()


@contextlib.contextmanager
def full_tmpfs(directory: Path) -> Iterator[None]:
    """``directory`` on a tmpfs of its own, its files kept, then filled to the last byte
    (what a full disk under the state directory looks like to a run)."""
    kept = {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0750", "zb-full", str(directory)],
                   check=True)  # fmt: skip
    try:
        for name, data in kept.items():
            (directory / name).write_bytes(data)
        with contextlib.suppress(OSError), open(directory / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)
        for name, data in kept.items():
            (directory / name).write_bytes(data)


def test_state_directory_full(faults: Faults) -> None:
    replica = faults.replica(mb=1)
    state = faults.zb.tmp / "state"
    replica.grow(1)
    row = faults.expect(
        "state directory full (its own tmpfs, filled)",
        "update and replicate refuse before sending, naming the status file's directory, "
        "the cause and the fix; runtime CRITICAL saying so; replica intact",
    )
    with full_tmpfs(state):
        update = faults.run("zettabee", "update", replica.fs)
        fleet = faults.run("replicate", "--no-passive", replica.fs)
        run_code, run_text = faults.plugin("check_zettabee_runtime", replica.fs)
        row.observed = (
            f"update exit {update.code}: {faults.shown(update.stderr, replica, 150)}; "
            f"replicate exit {fleet.code}; runtime {STATES[run_code]}: "
            f"{faults.shown(run_text, replica, 110)}"
        )
        row.data = replica.intact()
    assert run_code == 2 and str(state) in run_text and "is full" in run_text, run_text
    for outcome in (update, fleet):
        assert outcome.code == 1, outcome.stderr
        assert str(state) in outcome.stderr and "No space left on device" in outcome.stderr
        assert "free space" in outcome.stderr and "state_dir" in outcome.stderr
        assert "Traceback" not in outcome.stderr and "unexpected error" not in outcome.stderr
    assert row.data == INTACT
    faults.recovers(replica)


def test_clock_stepped_back(faults: Faults) -> None:
    replica = faults.replica(mb=1)
    row = faults.expect(
        "clock stepped back 1h",
        "lag WARNING 'negative: clock behind', never OK; status shows the minus sign; an "
        "update under the stepped clock works",
    )
    lag_code, lag_text = faults.plugin("check_zettabee_lag", replica.fs, faketime="-1h")
    run_code, run_text = faults.plugin("check_zettabee_runtime", replica.fs, faketime="-1h")
    status = faults.zb.exe("zettabee", "status", replica.fs)
    row.observed = (
        f"lag {STATES[lag_code]}: {faults.shown(lag_text, replica)}; runtime {STATES[run_code]}"
    )
    assert lag_code == 1, lag_text
    assert "is negative" in lag_text and "clock" in lag_text, lag_text
    assert run_code == 0, run_text  # the last run's duration does not depend on the clock
    assert status.returncode == 0
    stepped = faults.run_faketime("-1h", "zettabee", "status", replica.fs)
    assert " -0:59:" in stepped.stdout or " -1:00:" in stepped.stdout, stepped.stdout
    replica.grow(1)
    update = faults.run_faketime("-1h", "zettabee", "update", replica.fs)
    assert (update.code, update.stderr) == (0, ""), update.stderr
    replica.remember()
    row.data = replica.intact()
    assert faults.plugin("check_zettabee_lag", replica.fs)[0] == 0
    assert faults.plugin("check_zettabee_runtime", replica.fs)[0] == 0
    row.observed += "; update under the stepped clock: exit 0, then lag OK"
    assert row.data == INTACT


def test_source_clock_ahead_of_this_host(faults: Faults) -> None:
    """The source's ZFS stamps ``creation`` with its own clock; zettabee names each
    snapshot with this host's. Lag reads one clock, the one that named the snapshot, so
    a source a few seconds ahead does not make the lag negative right after a run."""
    replica = faults.replica(mb=1)
    row = faults.expect(
        "source clock 5 s ahead of this host",
        "update exit 0; lag OK right after the run (not a negative lag); replica intact",
    )
    replica.grow(1)
    update = faults.run_faketime("-5s", "zettabee", "update", replica.fs)
    assert (update.code, update.stderr) == (0, ""), update.stderr
    replica.remember()
    lag_code, lag_text = faults.plugin("check_zettabee_lag", replica.fs, faketime="-5s")
    row.observed = f"update exit 0; lag {STATES[lag_code]}: {faults.shown(lag_text, replica)}"
    row.data = replica.intact()
    assert lag_code == 0, lag_text
    assert row.data == INTACT


def test_a_cached_probe_that_no_longer_holds(faults: Faults) -> None:
    """A source host's answer to the probe is believed for an hour. Here the host behind
    the name changed within it: the cache says OpenZFS 2.1 with bookmarks, the host is
    zfs-fuse, and the pair has just been set to bookmark=yes."""
    zb = faults.zb
    replica = faults.replica(mb=1)
    [cached] = (zb.tmp / "state").glob("probe-*.txt")
    recorded = RECORDED_PROBES / "openzfs-2.1-probe.txt"
    cached.write_text(re.sub(r"(?m)^gsrc ", f"{zb.srcside.pool} ", recorded.read_text()))
    zb.write_pairs(zb.pair_line(replica.leaf, "bookmark=yes"))
    replica.grow(1)
    row = faults.expect(
        "cached probe outdated: bookmark=yes on a source that lost bookmarks",
        "exit 1 quoting zfs's complaint; the answer forgotten; the next run asks the host "
        "and refuses, naming the cause and the fix",
    )
    first = faults.run("zettabee", "update", replica.fs)
    faults.failed(replica, first, r"zfs get on \S+ failed \(exit 2\): invalid option 't' \(then")
    assert not list((zb.tmp / "state").glob("probe-*.txt")), "a failed run forgets the answer"
    seen_first = row.observed
    second = faults.run("zettabee", "update", replica.fs)
    faults.failed(replica, second, r"bookmark=yes, but the source \S+ \(zfs-fuse, pool .*remove")
    row.observed = f"{seen_first}; next run: {row.observed}"
    zb.write_pairs(zb.pair_line(replica.leaf))
    faults.recovers(replica)


UNLINK_SYSCALLS = {"87", "263"}  # unlink, unlinkat (x86-64), as /proc/PID/syscall names them


def test_unlock_never_lets_two_runs_of_a_pair_overlap(faults: Faults) -> None:
    """``zettabee unlock`` clears what a killed run left, just as the next cron run
    starts. strace holds unlock for 5 s in each unlink of the pair's lock or progress
    file (a slow disk, a busy machine), a run starts then, and another run after unlock
    is done, while the first still works (held at the end of its receive)."""
    zb = faults.zb
    replica = faults.replica(mb=1)
    fp = replica.fingerprint
    lock, progress = zb.tmp / "run" / f"{fp}.lock", zb.tmp / "state" / f"{fp}.progress"
    status_path = zb.tmp / "state" / f"{fp}.json"
    # What a run killed mid-stream leaves: 'running' by a pid now gone, its lock record
    # and its progress.
    dead = _pid_of_a_process_gone()
    status = json.loads(status_path.read_text())
    status.update(state="running", action="update", pid=dead, started=time.time() - 60)
    status_path.write_text(json.dumps(status))
    lock.write_text(json.dumps({"pid": dead, "started": time.time() - 60, "action": "update"}))
    progress.write_text(json.dumps({"bytes": 1 << 20}))
    replica.grow(1)
    gate = faults.gate("dest-gate", "zettabee:lastsnap=")
    gate.arm()
    row = faults.expect(
        "unlock while the next run starts (strace holds unlock 5 s in each unlink of the "
        "pair's files; a run starts then, a second one after)",
        "never two runs of the pair at once: the second refused 'in progress' while the "
        "first works, or the first refused while unlock holds the pair; replica intact",
    )
    delay = "inject=unlink,unlinkat:delay_enter=5000000"
    trace = ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(lock), "-P", str(progress),
             "-e", "trace=unlink,unlinkat", "-e", delay]  # fmt: skip
    unlock = subprocess.Popen(
        [*trace, *executable("zettabee"), "unlock", replica.fs],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=faults.env(),
    )  # fmt: skip

    def held_in_unlink() -> bool:
        if unlock.poll() is not None:
            return True
        for pid in descendants(unlock.pid):
            with contextlib.suppress(OSError, IndexError):
                if Path(f"/proc/{pid}/syscall").read_text().split()[0] in UNLINK_SYSCALLS:
                    return True
        return False

    wait_until("unlock to remove a file of the pair", held_in_unlink, timeout=30)
    first = faults.popen("zettabee", "update", replica.fs, path_first=gate.dir)
    reached = gate.dir / "reached"
    wait_until("the first run to hold the pair, or to be refused",
               lambda: reached.exists() or first.poll() is not None)  # fmt: skip
    first_held = reached.exists()
    unlocked = faults.finish(unlock)
    second = faults.run("zettabee", "update", replica.fs)
    gate.release()
    first_done = faults.finish(first)
    overlap = first_held and second.code != 3

    def said(outcome: Outcome) -> str:
        return faults.shown(outcome.stderr, replica, 90) if outcome.stderr.strip() else "silent"

    row.observed = (
        f"unlock exit {unlocked.code}; first run: "
        + ("held the pair" if first_held else f"exit {first_done.code}, {said(first_done)}")
        + f"; second run, {'while the first worked' if first_held else 'after'}: exit "
        f"{second.code}{', ' + said(second) if second.code else ''}"
        + (f"; first run then: exit {first_done.code}" if first_held else "")
        + ("; TWO RUNS AT ONCE" if overlap else "")
    )
    faults.recovers(replica)
    row.data = replica.intact()
    assert not overlap, (unlocked, second, first_done)
    if first_held:
        assert "in progress" in second.stderr and first_done.code == 0, (second, first_done)
    else:
        assert first_done.code == 3 and "unlock is in progress" in first_done.stderr, first_done
        assert second.code == 0, second.stderr
    assert unlocked.code == 0 and "cleared state running" in unlocked.stdout, unlocked
    assert row.data == INTACT


def _pid_of_a_process_gone() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
