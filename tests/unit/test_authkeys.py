"""The restricted line of the source's authorized_keys, and how enroll merges it."""

from __future__ import annotations

import pytest

from zettabee.authkeys import Grant, PublicKey, build_line, lines_of, merge, parse_line, remove
from zettabee.source import build_parser, policy_from

KEY = PublicKey("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIOurKey", "zettabee@backup1")
OTHER = PublicKey("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIOtherKey", "alice@laptop")
FP = "8bd061c649112ba486a9346567e7d25f"
FP2 = "0123456789abcdef0123456789abcdef"


def grant(**changes: object) -> Grant:
    fields: dict[str, object] = {
        "source_command": "/usr/bin/zettabee-source",
        "datasets": ("tank/pg", "tank/home"),
        "pairs": (FP2, FP),
    }
    fields.update(changes)
    return Grant(**fields)  # type: ignore[arg-type]


def test_the_line_is_the_readmes_restricted_line_sorted() -> None:
    line = build_line(grant(), KEY)
    assert line == (
        'restrict,command="/usr/bin/zettabee-source --pair 0123456789abcdef0123456789abcdef '
        '--pair 8bd061c649112ba486a9346567e7d25f tank/home tank/pg" '
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurKey zettabee@backup1"
    )


def test_from_and_mbuffer_hosts_go_into_the_line() -> None:
    line = build_line(grant(from_patterns=("10.0.0.5",), mbuffer_hosts=("dst.lan",)), KEY)
    assert line.startswith('restrict,from="10.0.0.5",command="/usr/bin/zettabee-source ')
    assert "--mbuffer-host dst.lan tank/home" in line


def test_the_forced_command_is_one_zettabee_source_accepts() -> None:
    line = build_line(grant(mbuffer_hosts=("dst.lan",)), KEY)
    command = line.split('command="', 1)[1].split('"', 1)[0]
    args = build_parser().parse_args(command.split()[1:])
    policy = policy_from(args, {})
    assert policy.datasets == {"tank/home", "tank/pg"}
    assert policy.pairs == {FP, FP2}
    assert policy.mbuffer_hosts == {"dst.lan"}


@pytest.mark.parametrize(
    "changes",
    [
        {"datasets": ('tank/a"b',)},
        {"datasets": ("tank/a b",)},
        {"source_command": "/usr/bin/zettabee-source;id"},
        {"from_patterns": ('10.0.0.1"',)},
        {"datasets": ()},
    ],
)
def test_a_word_that_would_need_quoting_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_line(grant(**changes), KEY)


def test_parse_reads_options_with_quoted_blanks() -> None:
    parsed = parse_line('from="a, b",command="x \\"y z\\"" ssh-ed25519 AAAA c d')
    assert parsed is not None
    assert parsed.options == 'from="a, b",command="x \\"y z\\""'
    assert parsed.key == PublicKey("ssh-ed25519", "AAAA", "c d")
    assert parse_line("ssh-rsa AAAAB3 me") == parse_line("  ssh-rsa AAAAB3 me ")
    for line in ("", "# ssh-ed25519 AAAA", "garbage", 'command="unterminated ssh-ed25519 AAAA'):
        assert parse_line(line) is None


FILE = (
    "# keys of this host\n"
    f"{OTHER}\n"
    "\n"
    'command="/old/zettabee-source tank/home" ' + f"{KEY.kind} {KEY.blob} old-comment\n"
    'from="10.1.1.1" ssh-rsa AAAAB3NzaC1yc2E bob\n'
)


def test_merge_replaces_our_line_in_place_and_keeps_the_rest_byte_for_byte() -> None:
    line = build_line(grant(), KEY)
    merged = merge(FILE, line)
    lines = merged.splitlines()
    assert lines[3] == line
    assert lines[:3] + lines[4:] == FILE.splitlines()[:3] + FILE.splitlines()[4:]


def test_merge_is_idempotent_and_unchanged_text_comes_back_identical() -> None:
    line = build_line(grant(), KEY)
    once = merge(FILE, line)
    assert merge(once, line) == once
    assert merge(once, line) is not None and lines_of(once, KEY) == [line]


def test_merge_appends_to_a_file_without_our_key_even_one_without_a_final_newline() -> None:
    line = build_line(grant(), KEY)
    assert merge("", line) == line + "\n"
    assert merge(f"{OTHER}", line) == f"{OTHER}\n{line}\n"


def test_merge_drops_duplicate_lines_of_our_key() -> None:
    line = build_line(grant(), KEY)
    twice = f"{KEY}\n{OTHER}\n{KEY}\n"
    assert merge(twice, line) == f"{line}\n{OTHER}\n"


def test_remove_takes_only_our_key_away() -> None:
    line = build_line(grant(), KEY)
    assert remove(merge(FILE, line), KEY) == FILE.replace(FILE.splitlines()[3] + "\n", "")
    assert remove(FILE.replace(FILE.splitlines()[3] + "\n", ""), KEY) == FILE.replace(
        FILE.splitlines()[3] + "\n", ""
    )


def test_public_key_parse() -> None:
    assert PublicKey.parse("ssh-ed25519 AAAA zettabee@b 1\n") == PublicKey(
        "ssh-ed25519", "AAAA", "zettabee@b 1"
    )
    with pytest.raises(ValueError):
        PublicKey.parse("-----BEGIN OPENSSH PRIVATE KEY-----")
