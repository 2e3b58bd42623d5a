"""The remote pipeline's report when a command runs before it (the snapshot to send)."""

from __future__ import annotations

import subprocess

from zettabee import pipeline


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True)


def test_first_runs_before_the_pipeline_and_is_stage_zero() -> None:
    proc = run(pipeline.pipeline_script([["echo", "data"], ["cat"]], first=[["true"]]))
    assert (proc.returncode, proc.stdout) == (0, "data\n")
    codes, errs, _ = pipeline.parse_pipeline_stderr(proc.stderr, 3)
    assert codes == [0, 0, 0] and errs == ["", "", ""]


def test_a_failing_first_keeps_the_pipeline_from_running() -> None:
    first = [["sh", "-c", "echo 'cannot create snapshot: dataset already exists' >&2; exit 1"]]
    proc = run(pipeline.pipeline_script([["echo", "data"], ["cat"]], first=first))
    assert proc.returncode != 0 and proc.stdout == ""
    codes, errs, _ = pipeline.parse_pipeline_stderr(proc.stderr, 3)
    assert codes[0] == 1 and errs[0] == "cannot create snapshot: dataset already exists"
    assert codes[1:] == [255, 255]


def test_commands_before_the_pipeline_run_in_order_each_after_the_last_succeeded() -> None:
    first = [
        ["echo", "snapshot taken"],
        ["sh", "-c", "echo 'cannot hold: pool is full' >&2; exit 1"],
    ]
    proc = run(pipeline.pipeline_script([["echo", "data"], ["cat"]], first=first))
    assert proc.returncode != 0 and proc.stdout == ""  # the stream is the pipeline's alone
    codes, errs, _ = pipeline.parse_pipeline_stderr(proc.stderr, 4)
    assert codes == [0, 1, 255, 255]
    assert errs == ["snapshot taken", "cannot hold: pool is full", "", ""]


def test_the_listening_mbuffer_of_an_ipv4_source_listens_on_ipv4() -> None:
    """mbuffer R20241007 (Debian 13) listens on IPv6 and rejects an IPv4 peer it sees as
    ::ffff:A.B.C.D unless told -4; an IPv6 or unresolvable peer is left as it was."""
    from zettabee.mbuffer import listen_for as mbuffer_listen_for

    assert mbuffer_listen_for("10.78.0.2", 9090) == ["-4", "-I", "10.78.0.2:9090"]
    assert mbuffer_listen_for("[fd00::2]", 9090) == ["-I", "[fd00::2]:9090"]
    assert mbuffer_listen_for("no-such-host.invalid", 9090) == ["-I", "no-such-host.invalid:9090"]
