"""Bad input: broken pair-file lines, hostile names, absurd option values.

Config checks happen when the file loads, with file and line; a broken line must not stop
the good pairs, and nothing in a name may ever run as a command. Names are also sent
through every runner directly (past the config's checks): local commands, commands on the
SSH master connection, the OpenSSH client's stream, the mbuffer pipeline. The proof is a marker file that a command in a name
would create: it must not exist afterwards, on either host (they share this file system).
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.zfslab import ZfsLab
from tests.integration.faults.conftest import INTACT, STATES, Faults, snapshots, zget
from zettabee import mbuffer, transport, zfs
from zettabee.errors import ZettabeeError
from zettabee.host import LocalHost, SshHost, SshTarget

pytestmark = pytest.mark.integration


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), f"a name was run as a command: {path} exists"


def hostile(marker: Path) -> list[str]:
    """Names a shell would run: each creates ``marker`` if anything executes it."""
    m = str(marker)
    return [
        f"$(touch {m})",
        f"`touch {m}`",
        f"x;touch {m}",
        f"x&&touch {m}",
        f"x|touch {m}",
        f"x'$(touch {m})'",
        f'x"$(touch {m})"',
        f"x\ntouch {m}",
        f"-oProxyCommand=touch {m}",
        "x y",
        "-x",
    ]


def lines_and_reasons(zb_src: str, src: str, good_dst: str, m: str) -> list[tuple[str, str, str]]:
    """(kind, pair line, what the message must say) for every kind of broken line."""
    d = "10.77.0.1:pool/fs"
    return [
        ("malformed", "onlyonecolumn", "missing destination"),
        ("malformed", f"{src} {d} transport=ssh extra", "too many columns"),
        ("malformed", f"tank/x {d}", "no ':'"),
        ("malformed", f"{src} {src}", "source and destination are both"),
        ("malformed", f"{zb_src}x {good_dst}", "is already used on line"),
        ("malformed", f"{src} {d} transport=", "has no value"),
        ("malformed", f"{src} {d} wlag=1h,,clag=2h", "empty option"),
        ("malformed", f"{src} {d} wlag", "is not key=value"),
        ("malformed", f"{src} {d} =1", "has no name"),
        ("malformed", f"{src} {d} rollbak=yes", "did you mean 'rollback'"),
        ("malformed", f"[::1:tank/x {d}", "without a closing"),
        ("malformed", f"h:tank/x@snap {d}", "names a snapshot"),
        ("malformed", f"h:tank//x {d}", "empty component"),
        ("malformed", f"h:tank/x\x07 {d}", "a control character (U+0007)"),
        ("malformed", f"h:tank/\u00e9t\u00e9 {d}", "U+00E9"),
        ("hostile", f"h;touch${{IFS}}{m}:tank/x {d}", "contains ';'"),
        ("hostile", f"h:tank/$(touch${{IFS}}{m}) {d}", "contains '$'"),
        ("hostile", f"h:tank/`touch${{IFS}}{m}` {d}", "contains '`'"),
        ("hostile", f"h:tank/x'y {d}", 'contains "\'"'),
        ("hostile", f'h:tank/x"y {d}', "contains '\"'"),
        ("hostile", f"h:tank/x|y {d}", "contains '|'"),
        ("hostile", f"h:tank/x&y {d}", "contains '&'"),
        ("hostile", f"h:tank/x>y {d}", "contains '>'"),
        ("hostile", f"-oProxyCommand=touch${{IFS}}{m}:tank/x {d}", "starts with '-'"),
        ("hostile", f"h:-tank/x {d}", "starts with '-'"),
        ("hostile", f"h:tank/-x {d}", "starts with '-'"),
        ("hostile", f"h.-x:tank/x {d}", "starts with '-'"),
        ("hostile", f"{src} {d} user=root;touch", "not a valid login name"),
        ("hostile", f"{src} {d} mbufferhost=$(touch)", "contains '$'"),
        ("hostile", f"{src} {d} sshkey=relative/key", "not absolute"),
        ("hostile", f"{src} {d} compression=lz4;touch", "not a ZFS compression value"),
        ("hostile", f"{src} {d} bwlimit=1M;touch", "positive rate"),
        ("absurd", f"{src} {d} port=0", "port number from 1 to 65535"),
        ("absurd", f"{src} {d} sshport=70000", "port number from 1 to 65535"),
        ("absurd", f"{src} {d} port=99999999999999999999", "port number from 1 to 65535"),
        ("absurd", f"{src} {d} wlag=-5", "not a duration"),
        ("absurd", f"{src} {d} clag=0", "positive duration"),
        ("absurd", f"{src} {d} stall=99999999999999", "more than ten years"),
        ("absurd", f"{src} {d} crun=999999d", "more than ten years"),
        ("absurd", f"{src} {d} keep=0", "at least 1"),
        ("absurd", f"{src} {d} keep=-3", "at least 1"),
        ("absurd", f"{src} {d} bwlimit=0", "positive rate"),
        ("absurd", f"{src} {d} transport=pigeon", "must be one of ssh, mbuffer, local"),
        ("absurd", f"{src} {d} rollback=maybe", "yes/no"),
        ("absurd", f"{src} {d} wlag=2M", "not a duration"),
    ]


def test_bad_pair_file_lines_of_every_kind(faults: Faults, marker: Path) -> None:
    zb = faults.zb
    replica = faults.replica(mb=1)
    good = zb.pair_line()
    src_endpoint, good_dst = good.split()[:2]
    cases = lines_and_reasons(
        src_endpoint, f"{zb.src.address}:{zb.src_fs('other')}", good_dst, str(marker)
    )
    # Extreme but legal values: accepted, and the pair replicates.
    extreme = zb.pair_line(
        "extreme", "keep=999999999,wlag=3650d,clag=3650d,stall=3650d,bwlimit=999G"
    )
    zb.make_source("extreme", 1)
    zb.write_pairs(good, *(line for _, line, _ in cases), extreme)
    rows = {
        kind: faults.expect(
            f"pair file: {kind} lines ({sum(1 for k, _, _ in cases if k == kind)})",
            "check-config exit 2, each line named with file:line and why; update --all and "
            "replicate exit 1 but the good pairs replicate; nothing executed",
        )
        for kind in ("malformed", "hostile", "absurd")
    }
    check = faults.run("zettabee", "check-config")
    problems = check.stderr.splitlines()
    failures = []
    for number, (kind, line, why) in enumerate(cases, start=2):
        found = [p for p in problems if p.startswith(f"zettabee: {zb.pairfile}:{number}: ")]
        if not found or not any(why in p for p in found):
            failures.append((kind, number, line, why, found))
    extreme_line = len(cases) + 2
    assert not [p for p in problems if f":{extreme_line}: " in p], "a legal line was refused"

    assert zb.run("initialize", zb.dst_fs("extreme")).returncode == 0
    replica.grow(1)
    update = faults.run("zettabee", "update", "--all")
    replicate = faults.run("replicate", "--all", "--no-passive")
    lag_all = faults.plugin("check_zettabee_lag", "--all")
    lag_code, _ = faults.plugin("check_zettabee_lag", replica.fs)
    run_code, _ = faults.plugin("check_zettabee_runtime", replica.fs)
    replica.remember()
    for kind, row in rows.items():
        missed = [f for f in failures if f[0] == kind]
        row.observed = (
            f"check-config exit {check.code}, {'every line named' if not missed else f'MISSED {missed}'}; "
            f"update --all exit {update.code}; replicate exit {replicate.code}; good pair: lag "
            f"{STATES[lag_code]}, runtime {STATES[run_code]}; lag --all {STATES[lag_all[0]]} "
            "(lines not checked)"
        )
        row.data = replica.intact() if not marker.exists() else "a name was EXECUTED"
    assert check.code == 2
    assert not failures, "\n".join(map(str, failures))
    assert update.code == 1 and replicate.code == 1, (update.stderr, replicate.stderr)
    assert (lag_code, run_code) == (0, 0)
    assert lag_all[0] == 3 and "pair not checked" in lag_all[1], lag_all
    extreme_snaps = snapshots(zb.dst_fs("extreme"))
    assert len(extreme_snaps) == 3  # keep=999999999: nothing pruned on the destination
    assert all(row.data == INTACT for row in rows.values())


def test_one_destination_under_two_names(faults: Faults) -> None:
    """Every name of this machine, in any case, is one destination host: a second line
    receiving into the same file system is refused, and the first pair alone runs."""
    zb = faults.zb
    replica = faults.replica(mb=1)
    good = zb.pair_line()
    fs = good.split()[1].split(":", 1)[1]  # on the lab's destination address, this machine
    zb.make_source("other", 1)
    other = f"{zb.srcside.address}:{zb.src_fs('other')}"
    aliases = ["localhost", "LOCALHOST", "127.0.0.1", socket.gethostname()]
    zb.write_pairs(good, *(f"{other}  {alias}:{fs}" for alias in aliases))
    row = faults.expect(
        f"one destination under {len(aliases) + 1} names (address, localhost, LOCALHOST, "
        "127.0.0.1, hostname)",
        "check-config exit 2, each later line named with both lines' file:line; the later "
        "lines never run; update --all and replicate exit 1, the first pair replicates",
    )
    check = faults.run("zettabee", "check-config")
    first = f"{zb.pairfile}:1"
    named = [
        number
        for number in range(2, len(aliases) + 2)
        if any(
            line.startswith(f"zettabee: {zb.pairfile}:{number}: destination ")
            and f" of {first} under another name" in line
            for line in check.stderr.splitlines()
        )
    ]
    initialize = faults.run("zettabee", "initialize", f"localhost:{fs}")
    replica.grow(1)
    update = faults.run("zettabee", "update", "--all")
    replica.same_as_source()
    replica.grow(1, "yet-more.bin")
    replicate = faults.run("replicate", "--all", "--no-passive")
    replica.remember()
    row.observed = (
        f"check-config exit {check.code}, lines {named} of 2-{len(aliases) + 1} each name "
        f"{zb.pairfile.name}:1; initialize localhost:... exit {initialize.code}; update --all exit "
        f"{update.code}; replicate exit {replicate.code}; the first pair replicated"
    )
    row.data = replica.intact()
    assert check.code == 2 and named == list(range(2, len(aliases) + 2)), check.stderr
    assert initialize.code == 2 and "no pair" in initialize.stderr, initialize.stderr
    assert update.code == 1 and replicate.code == 1, (update.stderr, replicate.stderr)
    assert zget(fs, "zettabee:fingerprint") == replica.fingerprint
    assert row.data == INTACT


def test_files_saved_with_a_byte_order_mark(faults: Faults) -> None:
    """Some Windows editors start a UTF-8 file with U+FEFF: the pair file and the
    settings still load, and the pair replicates."""
    zb = faults.zb
    replica = faults.replica(mb=1)
    bom = "\ufeff".encode()
    zb.write_pairs("# pairs, saved by a Windows editor", zb.pair_line())
    for path in (zb.pairfile, zb.settings):
        path.write_bytes(bom + path.read_bytes())
    row = faults.expect(
        "pair file and settings saved with a UTF-8 byte-order mark",
        "check-config exit 0; update --all and replicate exit 0; lag OK",
    )
    check = faults.run("zettabee", "check-config")
    replica.grow(1)
    update = faults.run("zettabee", "update", "--all")
    lag, _ = faults.plugin("check_zettabee_lag", replica.fs)
    replica.grow(1, "yet-more.bin")
    replicate = faults.run("replicate", "--all", "--no-passive")
    row.observed = (
        f"check-config exit {check.code} ({faults.shown(check.stdout + check.stderr, replica)}); "
        f"update --all exit {update.code}; lag {STATES[lag]}; replicate exit {replicate.code}"
    )
    assert check.code == 0, check.stderr
    assert update.code == 0 and replicate.code == 0, (update.stderr, replicate.stderr)
    assert lag == 0
    replica.remember()  # the files of both runs arrived
    row.data = replica.intact()
    assert row.data == INTACT


# -- names through every runner, past the config's checks --------------------------------


def assert_refused(call: object, marker: Path) -> str:
    """Run ``call``; it must fail with zettabee's typed error, and run nothing."""
    assert callable(call)
    with pytest.raises(ZettabeeError) as info:
        call()
    assert not marker.exists(), f"{marker} was created"
    return str(info.value)


def test_hostile_names_through_every_runner(faults: Faults, lab: ZfsLab, marker: Path) -> None:
    src = lab.source
    remote = SshHost(SshTarget(src.address, src.port, src.user, src.key, src.known_hosts))
    local = LocalHost()
    row = faults.expect(
        "hostile names through every runner (local, ssh master, ssh client, mbuffer pipeline)",
        "each refused by zfs or ssh with its own message; nothing executed, nothing created",
    )
    seen = 0
    try:
        for name in hostile(marker):
            src_fs, dst_fs = f"{src.pool}/{name}", f"{lab.dst_pool}/{name}"
            if name.startswith("-"):  # an option in the place of the whole name
                src_fs, dst_fs = f"{name}{src.pool}/x", f"{name}{lab.dst_pool}/x"
            result = local.run(zfs.list_snapshots(dst_fs), check=False)
            assert result.returncode != 0 and not marker.exists(), result
            result = remote.run(zfs.list_snapshots(src_fs), check=False)
            assert result.returncode != 0 and not marker.exists(), result
            remote.run(zfs.snapshot(src_fs, "x"), check=False)
            send, recv = zfs.send(f"{src_fs}@x"), zfs.recv(dst_fs)
            said = assert_refused(
                lambda s=send, r=recv: transport.stream_via_processes(remote, local, s, r, 10),
                marker,
            )
            assert "zfs" in said or "ssh" in said
            assert_refused(
                lambda s=send, r=recv: mbuffer.stream_via_mbuffer(
                    remote, local, s, r, 10, None, lab.dest_address
                ),
                marker,
            )
            seen += 1
        # A hostile host: for the master and the OpenSSH client alike never an option
        # (-oProxyCommand=...), at most a name that does not resolve.
        for host in hostile(marker):
            target = SshTarget(host, src.port, src.user, src.key, src.known_hosts)
            assert_refused(lambda t=target: SshHost(t).run(["true"]), marker)
            proc = subprocess.run(
                target.ssh_client_argv("true"), capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 255 and not marker.exists(), proc
            seen += 1
    finally:
        remote.close()
    created = [
        n
        for n in subprocess.run(
            ["zfs", "list", "-H", "-o", "name", "-t", "all"], capture_output=True, text=True
        ).stdout.split("\n")
        if re.search(r"touch|\$|`|;|\||'|\"| |^-|/-", n)
    ]
    row.observed = (
        f"{seen} hostile names and hosts: every one refused by zfs or ssh; "
        f"marker file {'PRESENT' if marker.exists() else 'absent'}; datasets created: "
        f"{created or 'none'}"
    )
    row.data = INTACT if not created and not marker.exists() else "CREATED"
    assert not created


def test_hostile_arguments_to_the_commands(faults: Faults, marker: Path) -> None:
    replica = faults.replica(mb=1)
    row = faults.expect(
        "hostile destination arguments (zettabee, replicate, plugins)",
        "zettabee/replicate exit 2 'no pair'; plugins UNKNOWN; nothing executed",
    )
    for name in hostile(marker):
        for program, args in (
            ("zettabee", ("update", "--", name)),
            ("zettabee", ("status", "--", name)),
            ("replicate", ("--no-passive", "--", name)),
        ):
            out = faults.run(program, *args)
            assert out.code == 2 and "no pair" in out.stderr, (program, name, out)
        for plugin in ("check_zettabee_lag", "check_zettabee_runtime"):
            code, text = faults.plugin(plugin, name)
            assert code == 3 and " UNKNOWN - " in text, (plugin, name, text)
    row.observed = "every one: exit 2 'no pair ... in the pair file', plugins UNKNOWN; no marker"
    row.data = replica.intact()
    assert row.data == INTACT
