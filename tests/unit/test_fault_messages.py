"""What a user reads when a transfer or a connection is broken from outside."""

from __future__ import annotations

import json
from pathlib import Path

from zettabee.errors import ZettabeeError, naming_pair
from zettabee.relay import Stage, describe_failure
from zettabee.state import StateStore


def stage(label: str, code: int, stderr: str = "", argv: list[str] | None = None) -> Stage:
    return Stage(label, "src", argv or [label.split()[0]], returncode=code, stderr=stderr)


def test_the_stage_killed_by_a_signal_is_named_not_its_broken_pipe_neighbour() -> None:
    stages = [
        stage("zfs send", 1, "warning: cannot send 'p/fs@s': Broken pipe"),
        stage("mbuffer -O", 137, ""),
        stage("mbuffer -I", 0),
        stage("zfs receive", 1, "cannot receive incremental stream: checksum mismatch"),
    ]
    text = str(describe_failure(stages, None))
    assert text.startswith("mbuffer -O on src failed (exit 137): killed by signal 9 (SIGKILL)")
    assert "Broken pipe" in text  # the others are still quoted after it


def test_the_receiver_that_refused_the_stream_is_named_not_the_sender_it_left_behind() -> None:
    """zfs-fuse's zfs send exits 1 without a word when its reader has gone; whether it
    fails at all depends on whether the stream outgrew the pipe before the receiver left."""
    refused = (
        "cannot receive incremental stream: destination p/fs has been modified\n"
        "since most recent snapshot\n"
    )
    text = str(describe_failure([stage("zfs send", 1), stage("zfs receive", 1, refused)], None))
    assert text == (
        "zfs receive on src failed (exit 1): cannot receive incremental stream: destination "
        "p/fs has been modified; since most recent snapshot"
    )
    # a receiver that failed on its own is quoted whole after the sender that said why
    both = [stage("zfs send", 1, "cannot send: I/O error"), stage("zfs receive", 1, refused)]
    assert str(describe_failure(both, None)).endswith(
        "then zfs receive on src: cannot receive incremental stream: destination p/fs has "
        "been modified; since most recent snapshot"
    )


def test_a_sender_ended_by_sigpipe_is_not_named_when_its_receiver_said_why() -> None:
    """OpenZFS's zfs send, from a remote shell, ends with 141 (SIGPIPE) once its receiver
    has left: the receiver's reason is the one to read (seen with a full pool on 2.1)."""
    full = "cannot receive incremental stream: out of space"
    stages = [stage("zfs send", 141), stage("zfs receive", 1, full)]
    assert str(describe_failure(stages, None)).startswith(
        f"zfs receive on src failed (exit 1): {full}"
    )


def test_a_local_stage_killed_by_a_signal() -> None:
    text = str(
        describe_failure([stage("zfs send", 1, "Broken pipe"), stage("mbuffer -I", -15)], None)
    )
    assert text.startswith("mbuffer -I on src failed (exit -15): killed by signal 15 (SIGTERM)")


def test_ssh_exit_255_is_not_a_signal_and_a_silent_one_is_explained() -> None:
    text = str(
        describe_failure([stage("ssh", 255, argv=["ssh"]), stage("zfs receive", 1, "x")], None)
    )
    assert text.startswith("ssh to src failed (exit 255): the connection ended without a message")


def test_every_failure_line_names_its_pair() -> None:
    pair = "backup1:tank/home"
    assert naming_pair(pair, ZettabeeError("cannot connect to src port 22: refused")) == (
        f"{pair}: cannot connect to src port 22: refused"
    )
    assert (
        naming_pair(pair, ZettabeeError(f"{pair}: not initialized")) == f"{pair}: not initialized"
    )


def test_a_status_file_with_wrong_types_reads_as_damaged(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state", tmp_path / "run", tmp_path / "log")
    store.state_dir.mkdir()
    path = store.status_path("f" * 32)
    for data, why in (
        ({"started": "yesterday"}, "started is 'yesterday', not a number"),
        ({"last_duration": True}, "last_duration is True, not a number"),
        ({"error": 42}, "error is 42, not text"),
        ({"bytes": None}, "bytes is None, not a number"),
    ):
        path.write_text(json.dumps(data))
        status = store.read_status("f" * 32)
        assert status.corrupt == f"status file {path} malformed: {why}"
        assert status.started is None and status.last_duration is None
    path.write_text(json.dumps({"started": 5, "pid": None, "seconds": 1.5, "future_key": [1]}))
    status = store.read_status("f" * 32)
    assert not status.corrupt and status.extra == {"future_key": [1]}
