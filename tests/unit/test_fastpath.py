"""The one-round-trip update script, run by a real sh against a fake zfs that replays
recorded output and records what it was asked to do."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from zettabee import fastpath, relay, zfs

FS = "tank/home"
BASE = zfs.Snapshot(FS, "zettabee.0123456789abcdef0123456789abcdef.20260101T000000Z", 42, 1000)
SNAP = "zettabee.0123456789abcdef0123456789abcdef.20260101T001500Z"
LISTING = (
    f"{FS}\tguid\t7\n{FS}\tcreation\t900\n{FS}\tcreatetxg\t1\n"
    f"{FS}@manual\tguid\t41\n{FS}@manual\tcreation\t950\n{FS}@manual\tcreatetxg\t5\n"
    f"{FS}@{BASE.name}\tguid\t42\n{FS}@{BASE.name}\tcreation\t1000\n"
    f"{FS}@{BASE.name}\tcreatetxg\t9\n"
)

FAKE_ZFS = """#!/bin/sh
echo "$*" >> "$FAKE/calls"
case "$1" in
  get) if [ "$3" = -d ]; then cat "$FAKE/listing"
       else for last; do :; done; grep "^$last	guid	" "$FAKE/listing" || exit 1; fi ;;
  snapshot) [ -e "$FAKE/snapshot-fails" ] && { echo "cannot create snapshot: out of space" >&2; exit 1; }; exit 0 ;;
  destroy) [ -e "$FAKE/destroy-hangs" ] && { echo $$ >"$FAKE/pid"; kill -STOP $$; }; exit 0 ;;
  hold) [ -e "$FAKE/hold-fails" ] && { echo "cannot hold snapshot: pool is full" >&2; exit 1; }; exit 0 ;;
  send) if [ "$2" = -nvP ]; then
         [ -e "$FAKE/estimate-fails" ] && { echo "cannot estimate: busy" >&2; exit 1; }
         printf 'incremental\tbase\tnew\t12345\nsize\t12345\n'; exit 0
       fi
       printf 'STREAM'; [ -e "$FAKE/send-fails" ] && { echo "send broke" >&2; exit 2; }; exit 0 ;;
esac
"""


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    (tmp_path / "zfs").write_text(FAKE_ZFS)
    (tmp_path / "zfs").chmod(0o755)
    (tmp_path / "listing").write_text(LISTING)
    return tmp_path


def run(
    fake: Path,
    clock: bool = False,
    base: zfs.Snapshot | None = None,
    hold: str | None = None,
    then: list[tuple[str, list[str]]] | None = None,
    answer: bytes = b"",
    listing: bool = True,
    estimate: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    send = zfs.send(f"{FS}@{SNAP}", base=f"{FS}@{BASE.name}")
    dry_run = zfs.send(f"{FS}@{SNAP}", base=f"{FS}@{BASE.name}", estimate=True)
    script = fastpath.script(
        FS, SNAP, send, clock=clock, base=base, hold=hold, holds=bool(hold), then=then or (),
        listing=listing, estimate=dry_run if estimate else None,
    )  # fmt: skip
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", FAKE=str(fake))
    return subprocess.run(["sh", "-c", script], capture_output=True, env=env, input=answer)


TAG = "zettabee.0123456789abcdef0123456789abcdef"
LET_GO = [
    ("hold", zfs.hold(TAG, f"{FS}@{SNAP}")),
    ("release", zfs.release(TAG, f"{FS}@{BASE.name}")),
    ("destroy", zfs.destroy(f"{FS}@{BASE.name}")),
]


def calls(fake: Path) -> list[str]:
    path = fake / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_snapshots_sends_then_lists_with_only_the_stream_on_stdout(fake: Path) -> None:
    proc = run(fake)
    assert proc.returncode == 0
    assert proc.stdout == b"STREAM"
    assert calls(fake) == [
        f"snapshot {FS}@{SNAP}",
        f"send -i {FS}@{BASE.name} {FS}@{SNAP}",
        f"get -Hp -d 1 -o name,property,value guid,creation,createtxg -- {FS}",
    ]
    report = fastpath.parse(proc.stderr.decode())
    assert list(report.steps) == list(fastpath.STEPS)
    assert all(step.status == 0 for step in report.steps.values())
    snaps = zfs.parse_snapshots(FS, report.steps["listed"].said)
    assert [s.name for s in snaps] == ["manual", BASE.name]


def test_a_checked_base_goes_on_when_its_guid_is_the_same(fake: Path) -> None:
    proc = run(fake, base=BASE)
    assert proc.returncode == 0 and proc.stdout == b"STREAM"
    assert [c.split()[0] for c in calls(fake)] == ["get", "snapshot", "send", "get"]
    assert "base" not in fastpath.parse(proc.stderr.decode()).steps


@pytest.mark.parametrize("guid", [4242, 4])  # another snapshot; a guid that 42 ends with
def test_a_checked_base_with_another_guid_stops_before_any_snapshot(fake: Path, guid: int) -> None:
    proc = run(fake, base=zfs.Snapshot(FS, BASE.name, guid, 1000))
    assert proc.returncode == 3 and proc.stdout == b""
    assert [c.split()[0] for c in calls(fake)] == ["get"]
    report = fastpath.parse(proc.stderr.decode())
    assert report.steps["base"].status == 1 and not report.ok("snapshot")


def test_a_checked_base_that_is_gone_stops_before_any_snapshot(fake: Path) -> None:
    proc = run(fake, base=zfs.Snapshot(FS, "gone", 42, 1000))
    assert proc.returncode == 3 and [c.split()[0] for c in calls(fake)] == ["get"]


def test_a_held_update_holds_the_new_snapshot_before_sending_it(fake: Path) -> None:
    proc = run(fake, hold="zettabee.0123456789abcdef")
    assert proc.returncode == 0 and proc.stdout == b"STREAM"
    assert calls(fake)[:3] == [
        f"snapshot {FS}@{SNAP}",
        f"hold zettabee.0123456789abcdef {FS}@{SNAP}",
        f"send -i {FS}@{BASE.name} {FS}@{SNAP}",
    ]
    assert "userrefs" in calls(fake)[3]  # the listing says which snapshots are held
    assert fastpath.parse(proc.stderr.decode()).ok("hold")


def test_a_failing_hold_stops_before_the_send_and_says_why(fake: Path) -> None:
    (fake / "hold-fails").touch()
    proc = run(fake, hold="zettabee.0123456789abcdef")
    assert proc.returncode == 1 and proc.stdout == b""
    assert [c.split()[0] for c in calls(fake)] == ["snapshot", "hold"]
    report = fastpath.parse(proc.stderr.decode())
    assert report.ok("snapshot") and report.steps["hold"].status == 1
    assert report.steps["hold"].said == "cannot hold snapshot: pool is full"
    assert "send" not in report.steps


def test_a_failing_snapshot_stops_before_the_send_and_says_why(fake: Path) -> None:
    (fake / "snapshot-fails").touch()
    proc = run(fake)
    assert proc.returncode == 1 and proc.stdout == b""
    assert [c.split()[0] for c in calls(fake)] == ["snapshot"]
    report = fastpath.parse(proc.stderr.decode())
    assert report.steps["snapshot"].status == 1
    assert report.steps["snapshot"].said == "cannot create snapshot: out of space"
    assert "send" not in report.steps


def test_a_failing_send_is_reported_with_its_own_words_and_the_listing_still_comes(
    fake: Path,
) -> None:
    (fake / "send-fails").touch()
    proc = run(fake)
    assert proc.returncode == 2
    report = fastpath.parse(proc.stderr.decode())
    assert report.ok("snapshot") and report.steps["send"].status == 2
    assert report.steps["send"].said == "send broke"
    assert BASE.name in report.steps["listed"].said  # to tell a gone base from a broken send


def test_the_size_estimate_runs_before_the_send_and_reports_on_stderr_only(fake: Path) -> None:
    proc = run(fake, estimate=True, then=LET_GO, answer=b"received\n")
    assert proc.returncode == 0
    assert proc.stdout == b"STREAM"  # the dry run's report never enters the stream
    assert calls(fake)[:3] == [
        f"snapshot {FS}@{SNAP}",
        f"send -nvP -i {FS}@{BASE.name} {FS}@{SNAP}",
        f"send -i {FS}@{BASE.name} {FS}@{SNAP}",
    ]
    report = fastpath.parse(proc.stderr.decode())
    assert list(report.steps)[:4] == ["start", "snapshot", "estimate", "send"]
    assert zfs.parse_estimate(report.steps["estimate"].said) == 12345
    assert report.steps["send"].said == ""  # the estimate's words are its own step's
    assert report.ok("destroy")


def test_a_failing_size_estimate_never_stops_the_send(fake: Path) -> None:
    (fake / "estimate-fails").touch()
    proc = run(fake, estimate=True)
    assert proc.returncode == 0 and proc.stdout == b"STREAM"
    report = fastpath.parse(proc.stderr.decode())
    assert report.steps["estimate"].status == 1
    assert report.steps["estimate"].said == "cannot estimate: busy"
    assert report.ok("send") and report.ok("listing")


def _stage_that_said(text: str) -> relay.Stage:
    stage = relay.Stage("zfs send (over ssh)", "src", ["true"])
    stage.errfile = tempfile.TemporaryFile()
    stage.errfile.write(text.encode())
    stage.errfile.flush()
    return stage


def test_progress_has_the_streams_size_once_the_script_estimated_it(fake: Path) -> None:
    made: list[int | None] = []
    seen: list[tuple[int | None, int]] = []

    def progress_for(total: int | None) -> relay.ProgressFn:
        made.append(total)
        return lambda count, elapsed: seen.append((total, count))

    stderr = run(fake, estimate=True).stderr.decode()
    before_estimate = stderr.partition(f"{fastpath.STEP_MARK} estimate")[0]
    stage = _stage_that_said(before_estimate)
    report = fastpath._progress(stage, progress_for, estimated=True)
    report(10, 1.0)  # the script has not said its estimate yet: no total
    assert stage.errfile is not None
    stage.errfile.write(stderr[len(before_estimate) :].encode())
    stage.errfile.flush()
    report(20, 2.0)
    report(30, 3.0)
    assert seen == [(None, 10), (12345, 20), (12345, 30)]
    assert made == [None, 12345]  # the file is read until the step, not after


def test_progress_without_an_estimate_has_no_size(fake: Path) -> None:
    (fake / "estimate-fails").touch()
    seen: list[int | None] = []
    stage = _stage_that_said(run(fake, estimate=True).stderr.decode())
    report = fastpath._progress(stage, lambda total: lambda c, e: seen.append(total), True)
    report(1, 1.0)
    report(2, 2.0)
    assert seen == [None, None]


def test_clock_times_each_step_on_the_source(fake: Path) -> None:
    stderr = run(fake, clock=True).stderr.decode()
    report = fastpath.parse(stderr.strip())  # as a stage keeps it
    assert list(report.steps) == list(fastpath.STEPS)
    assert all(step.at is not None for step in report.steps.values())
    assert report.duration("snapshot", "send") is not None
    assert fastpath.parse(run(fake).stderr.decode()).duration("snapshot", "send") is None


def test_debug_times_each_step_from_the_one_before_it(fake: Path) -> None:
    proc = run(fake, clock=True, then=LET_GO, answer=b"received\n")
    spans = fastpath.parse(proc.stderr.decode()).durations()
    assert list(spans) == ["snapshot", "send", "hold", "release", "destroy", "listing"]
    assert fastpath.parse(run(fake).stderr.decode()).durations() == {}  # no clock, no times


def test_parse_keeps_what_ssh_said_after_the_last_step() -> None:
    text = (
        "\n@@zettabee-step start 0\nboom\n@@zettabee-step listing 1\nclient_loop: send disconnect\n"
    )
    report = fastpath.parse(text)
    assert report.steps["listing"].said == "boom"
    assert report.trailer == "client_loop: send disconnect"


def test_the_source_clock_is_read_only_when_a_debug_line_will_be_written() -> None:
    import logging

    parent = logging.getLogger("zbtest")
    child = logging.getLogger("zbtest.fastpath")
    parent.setLevel(logging.DEBUG)
    parent.propagate = False  # as the command's own logger tree: pytest's stay out
    handler = logging.NullHandler()
    handler.setLevel(logging.WARNING)
    parent.addHandler(handler)
    try:
        assert not fastpath.debug_wanted(child)
        handler.setLevel(logging.DEBUG)
        assert fastpath.debug_wanted(child)
    finally:
        parent.removeHandler(handler)
        parent.propagate = True


def test_the_base_goes_once_the_destination_says_it_received_the_stream(fake: Path) -> None:
    """The new snapshot is held only once it is the common one, then the old base goes."""
    proc = run(fake, then=LET_GO, answer=f"{fastpath.RECEIVED}\n".encode())
    assert proc.returncode == 0 and proc.stdout == b"STREAM"
    assert calls(fake)[:5] == [
        f"snapshot {FS}@{SNAP}",
        f"send -i {FS}@{BASE.name} {FS}@{SNAP}",
        f"hold {TAG} {FS}@{SNAP}",
        f"release {TAG} {FS}@{BASE.name}",
        f"destroy {FS}@{BASE.name}",
    ]
    report = fastpath.parse(proc.stderr.decode())
    assert all(report.ok(step) for step in ("hold", "release", "destroy", "listed"))


@pytest.mark.parametrize("listing", [True, False])
def test_a_base_not_this_replica_s_only_has_the_new_snapshot_held(
    fake: Path, listing: bool
) -> None:
    """A base taken by hand (or another replica's) is neither released nor destroyed: the
    script's only step after the receive is the hold, which gates nothing (an empty
    ``if`` is a syntax error in sh: seen as 'sh: 12: Syntax error: "fi" unexpected')."""
    proc = run(fake, then=LET_GO[:1], answer=b"received\n", listing=listing)
    assert proc.returncode == 0, proc.stderr
    assert calls(fake)[2] == f"hold {TAG} {FS}@{SNAP}"
    assert fastpath.parse(proc.stderr.decode()).ok("hold")


def test_the_old_base_stays_held_when_the_new_snapshot_cannot_be_held(fake: Path) -> None:
    (fake / "hold-fails").touch()
    proc = run(fake, then=LET_GO, answer=f"{fastpath.RECEIVED}\n".encode())
    assert [c.split()[0] for c in calls(fake)] == ["snapshot", "send", "hold", "get"]
    report = fastpath.parse(proc.stderr.decode())
    assert report.steps["hold"].status == 1 and report.steps["hold"].said == (
        "cannot hold snapshot: pool is full"
    )


@pytest.mark.parametrize("answer", [b"", b"received?\n", b"no\n"])
def test_the_base_stays_without_word_from_the_destination(fake: Path, answer: bytes) -> None:
    """A run killed before the receive ended closes the connection: the end of the input."""
    proc = run(fake, then=LET_GO, answer=answer)
    assert proc.returncode == 0
    assert [c.split()[0] for c in calls(fake)] == ["snapshot", "send", "get"]
    report = fastpath.parse(proc.stderr.decode())
    assert "release" not in report.steps and "destroy" not in report.steps


def test_the_base_stays_after_a_failed_send(fake: Path) -> None:
    (fake / "send-fails").touch()
    proc = run(fake, then=LET_GO, answer=f"{fastpath.RECEIVED}\n".encode())
    assert proc.returncode == 2
    assert [c.split()[0] for c in calls(fake)] == ["snapshot", "send", "get"]


def test_a_tidy_source_is_not_listed_once_the_stream_was_received(fake: Path) -> None:
    proc = run(fake, then=LET_GO, answer=b"received\n", listing=False)
    assert proc.returncode == 0 and proc.stdout == b"STREAM"
    assert [c.split()[0] for c in calls(fake)] == ["snapshot", "send", "hold", "release", "destroy"]
    assert "listing" not in fastpath.parse(proc.stderr.decode()).steps


@pytest.mark.parametrize("fails", ["send", "receive"])
def test_a_tidy_source_is_still_listed_when_the_update_fails(fake: Path, fails: str) -> None:
    """The listing tells a base gone from the source from a broken stream."""
    if fails == "send":
        (fake / "send-fails").touch()
    answer = b"" if fails == "receive" else b"received\n"
    proc = run(fake, then=LET_GO, answer=answer, listing=False)
    assert [c.split()[0] for c in calls(fake)] == ["snapshot", "send", "get"]
    assert BASE.name in fastpath.parse(proc.stderr.decode()).steps["listed"].said


def test_a_send_the_refusing_receive_broke_is_not_named_for_its_failure(fake: Path) -> None:
    """The destination pool fills mid-receive: zfs receive says why and leaves, and the
    script's zfs send dies of the broken pipe (its step says 141). The run names the
    receive and its words, whichever process the shell saw end first."""
    from zettabee.errors import CommandError
    from zettabee.host import SshHost, SshTarget

    (fake / "send-fails").touch()
    said = (
        run(fake)
        .stderr.decode()
        .replace(f"{fastpath.STEP_MARK} send 2", f"{fastpath.STEP_MARK} send 141")
    )
    src = SshHost(SshTarget("src.example.com"))
    sender = relay.Stage("zfs send (over ssh)", src.name, ["ssh", "src.example.com", "sh"])
    sender.returncode, sender.stderr = 141, said
    receiver = relay.Stage("zfs receive", "backup1", ["zfs", "receive", "backup/home"])
    receiver.returncode = 1
    receiver.stderr = "cannot receive incremental stream: out of space"
    piped = relay.Relay(None, None, 300, None)  # type: ignore[arg-type]
    send = zfs.send(f"{FS}@{SNAP}", base=f"{FS}@{BASE.name}")
    plan = fastpath.Plan(FS, BASE, SNAP, send, ["zfs", "receive", "backup/home"])
    with pytest.raises(CommandError) as caught:
        fastpath._judge(src, plan, sender, receiver, piped)
    message = str(caught.value)
    assert message.startswith("zfs receive on backup1 failed"), message
    assert "out of space" in message


def test_a_step_after_the_stream_that_never_ends_fails_within_its_own_limit(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zfs destroy of the old base stuck on the source (a busy or suspended pool)
    once the stream is in: the script never ended, and the update was waited for
    without limit. It gets the limit of the steps after a stream, is stopped, and the
    run names the step, its host and that limit, not the stall limit."""
    import signal
    import threading

    from zettabee.errors import ZettabeeError
    from zettabee.host import LocalHost

    monkeypatch.setattr(relay, "LINGER_LIMIT", 2.0)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE", str(fake))
    (fake / "destroy-hangs").touch()
    send = zfs.send(f"{FS}@{SNAP}", base=f"{FS}@{BASE.name}")
    # a receive that leaves on the stream's last record, as zfs receive does
    plan = fastpath.Plan(FS, BASE, SNAP, send, ["head", "-c", "6"], then=LET_GO)
    recorded: list[bool] = []
    outcome: list[BaseException | None] = []

    def update() -> None:
        try:
            src, dst = LocalHost("source1"), LocalHost("backup1")
            fastpath.update(src, dst, plan, 30, on_received=lambda: recorded.append(True))
            outcome.append(None)
        except BaseException as exc:  # the outcome is judged by the test
            outcome.append(exc)

    worker = threading.Thread(target=update, daemon=True)
    worker.start()
    try:
        worker.join(60)
    finally:
        if (fake / "pid").exists():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(int((fake / "pid").read_text()), sig)
                except ProcessLookupError:
                    break
    assert outcome, "the update still waits for the stuck zfs destroy after 60 s"
    assert isinstance(outcome[0], ZettabeeError), outcome
    message = str(outcome[0])
    assert message.startswith("zfs destroy on source1 "), message
    assert "did not end within 2 s" in message, message  # the limit's, named
    assert "stall" not in message, message  # not the stall limit's (30)
    assert "ps -o pid,stat,cmd -C zfs" in message, message
    assert recorded == [True]  # the destination had its part first
