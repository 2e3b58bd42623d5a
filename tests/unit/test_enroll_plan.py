"""enroll's decisions without a host: the pairs it serves, the password on a descriptor,
the host key it trusts, the authorized_keys path."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from zettabee import contact, enroll, enrollplan, enrollsource
from zettabee.config import Settings
from zettabee.errors import UsageError
from zettabee.host import SshTarget
from zettabee.pairfile import parse_pairs

PAIRS = """
SRC.example.com.:tank/home  localhost:backup/home  sshkey=/k/id,user=zb
src.example.com:tank/pg     localhost:backup/pg    sshkey=/k/id,user=zb,transport=mbuffer,mbufferhost=dst.lan
other.example.com:tank/www  localhost:backup/www
"""


def pairs(text: str = PAIRS) -> list[enroll.Pair]:
    return list(parse_pairs(text, "pairs.cfg", Settings()).pairs)


def test_the_plan_serves_every_pair_of_the_host_whatever_its_spelling() -> None:
    plan = enrollplan.plan_for("src.example.com", pairs(), "/etc/zettabee/known_hosts")
    assert plan.datasets == ("tank/home", "tank/pg")
    assert [p.destination.fs for p in plan.pairs] == ["backup/home", "backup/pg"]
    assert plan.mbuffer_hosts == ("dst.lan",)
    assert (plan.target.user, plan.target.key, plan.key_path) == ("zb", "/k/id", "/k/id")
    assert plan.target.known_hosts == "/etc/zettabee/known_hosts"


def test_the_plan_refuses_a_host_without_pairs_and_pairs_that_need_two_lines() -> None:
    with pytest.raises(UsageError, match="no pair of the pair file has its source on"):
        enrollplan.plan_for("nowhere.example.com", pairs(), "/kh")
    mixed = PAIRS.replace("user=zb,transport", "user=other,transport")
    with pytest.raises(UsageError, match="reach it in 2 ways"):
        enrollplan.plan_for("src.example.com", pairs(mixed), "/kh")


def _feed(write: int, pieces: list[bytes], delay: float) -> threading.Thread:
    def run() -> None:
        for piece in pieces:
            time.sleep(delay)
            os.write(write, piece)
        os.close(write)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_password_is_read_whole_when_it_comes_in_pieces() -> None:
    read, write = os.pipe()
    feeder = _feed(write, [b"correct ", b"horse", b"\nnext line\n"], 0.05)
    assert contact.read_password_fd(read) == "correct horse"
    feeder.join()


def test_a_password_without_a_newline_ends_with_the_input() -> None:
    read, write = os.pipe()
    feeder = _feed(write, [b"s3cret\r"], 0.0)
    assert contact.read_password_fd(read) == "s3cret"
    feeder.join()


def test_an_empty_or_unreadable_descriptor_is_a_usage_error() -> None:
    read, write = os.pipe()
    os.close(write)
    with pytest.raises(UsageError, match="no password on it"):
        contact.read_password_fd(read)
    with pytest.raises(UsageError, match="--password-fd 987: cannot read it"):
        contact.read_password_fd(987)


def test_keys_path_takes_sshds_tokens() -> None:
    who = enrollsource.Account("zb", 1000, 1000, "/home/zb")
    assert enrollsource.keys_path("%h/.ssh/authorized_keys", who) == "/home/zb/.ssh/authorized_keys"
    assert enrollsource.keys_path("/etc/ssh/keys/%u", who) == "/etc/ssh/keys/zb"
    assert enrollsource.keys_path(".ssh/keys2", who) == "/home/zb/.ssh/keys2"
    assert enrollsource.keys_path("/k/100%%-%u", who) == "/k/100%-zb"


def test_the_fingerprint_is_the_one_ssh_keygen_prints(tmp_path: Path) -> None:
    path = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    printed = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True)
    key = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert contact.sha256_fingerprint(key) == printed.stdout.split()[1]


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_an_admin_key_that_ssh_keygen_wrote_is_loaded(tmp_path: Path, kind: str) -> None:
    """--admin-key of each type, as OpenSSH writes it, and with a passphrase told apart."""
    path = tmp_path / kind
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    printed = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True)
    assert contact.sha256_fingerprint(contact._load_key(str(path))) == printed.stdout.split()[1]
    locked = tmp_path / f"{kind}-locked"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "secret", "-f", str(locked)], check=True)
    with pytest.raises(enrollplan.EnrollError, match="has a passphrase: load it into ssh-agent"):
        contact._load_key(str(locked))


TARGET = SshTarget("src.example.com", 22, "root", "/k/id", "/etc/zettabee/known_hosts")


def check(
    offered: paramiko.PKey,
    pinned: dict[str, paramiko.PKey],
    fingerprint: str | None = None,
    answer: bool | None = None,
) -> bool:
    request = enrollplan.Request("src.example.com", host_key_fingerprint=fingerprint)
    return contact.check_host_key(offered, pinned, request, TARGET, lambda _q: bool(answer))


@pytest.fixture
def keys() -> tuple[paramiko.PKey, paramiko.PKey]:
    return paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()


def test_a_pinned_key_is_trusted_and_a_changed_one_refused_whatever_the_options(
    keys: tuple[paramiko.PKey, paramiko.PKey],
) -> None:
    ours, theirs = keys
    assert check(ours, {ours.get_name(): ours}) is False
    fp = contact.sha256_fingerprint(theirs)
    with pytest.raises(enrollplan.EnrollError, match="ssh-keygen -R 'src.example.com'"):
        check(theirs, {ours.get_name(): ours}, fingerprint=fp)


def test_an_unpinned_key_needs_its_fingerprint_or_a_yes(
    keys: tuple[paramiko.PKey, paramiko.PKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = keys
    fp = contact.sha256_fingerprint(ours)
    assert check(ours, {}, fingerprint=fp) is True
    assert check(ours, {}, fingerprint=fp.removeprefix("SHA256:") + "=") is True
    with pytest.raises(enrollplan.EnrollError, match="not the SHA256:.* given with --host-key"):
        check(ours, {}, fingerprint=contact.sha256_fingerprint(theirs))
    with pytest.raises(enrollplan.EnrollError, match=re.escape(f"--host-key-fingerprint {fp}")):
        check(ours, {})  # no terminal under pytest
    monkeypatch.setattr(contact, "_on_terminal", lambda: True)
    assert check(ours, {}, answer=True) is True
    with pytest.raises(enrollplan.EnrollError, match="not confirmed"):
        check(ours, {}, answer=False)


def test_pin_host_key_keeps_the_other_lines(
    tmp_path: Path, keys: tuple[paramiko.PKey, paramiko.PKey]
) -> None:
    ours, _ = keys
    known = tmp_path / "known_hosts"
    known.write_text("other.example.com ssh-ed25519 AAAA")
    target = SshTarget("src.example.com", 2222, known_hosts=str(known))
    contact.pin_host_key(str(known), target, ours)
    lines = known.read_text().splitlines()
    assert lines[0] == "other.example.com ssh-ed25519 AAAA"
    assert lines[1] == f"[src.example.com]:2222 {ours.get_name()} {ours.get_base64()}"
    assert list(contact.pinned_keys(str(known), target).values())[0].asbytes() == ours.asbytes()


def test_the_delegation_is_exactly_what_the_pairs_pulls_use() -> None:
    text = PAIRS.replace("user=zb,transport", "user=zb,bookmark=yes,transport")
    plan = enrollplan.plan_for("src.example.com", pairs(text), "/kh")
    assert enrollsource.permissions(plan) == {
        "tank/home": "send,snapshot,destroy,mount,hold,release",
        "tank/pg": "send,snapshot,destroy,mount,hold,release,bookmark",
    }
