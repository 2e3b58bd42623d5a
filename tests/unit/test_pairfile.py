"""Unit tests for zettabee.pairfile and the pair options: good files, errors with their lines, clashes, find_pair."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from zettabee import host, records
from zettabee.config import Settings, load_settings, parse_settings
from zettabee.errors import ConfigError, UsageError
from zettabee.options import OPTION_NAMES
from zettabee.pair import Endpoint, Pair, PairOptions
from zettabee.pairfile import PairFile, find_pair, load_pairs

GOOD = "src.example.com:tank/data dst.example.com:backup/data"


def write(tmp_path: Path, text: str, name: str = "zettabee.cfg") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(tmp_path: Path, text: str, settings: Settings | None = None) -> PairFile:
    return load_pairs(write(tmp_path, text), settings or Settings())


def messages(pair_file: PairFile) -> list[str]:
    return [str(p) for p in pair_file.problems]


# --------------------------------------------------------------------------------------
# The pair file: good files
# --------------------------------------------------------------------------------------


def test_good_file_with_comments_blank_lines_and_options(tmp_path: Path) -> None:
    pair_file = load(
        tmp_path,
        "# zettabee pairs\n"
        "\n"
        f"{GOOD}   transport=mbuffer,port=9090,wlag=30m   # the main one\n"
        "   # an indented comment\n"
        "src:tank/web\tdst:backup/web\n"
        "src:tank dst:backup\n",
    )
    assert pair_file.problems == []
    assert [str(p) for p in pair_file.pairs] == [
        "src.example.com:tank/data -> dst.example.com:backup/data",
        "src:tank/web -> dst:backup/web",
        "src:tank -> dst:backup",
    ]
    first = pair_file.pairs[0]
    assert (first.options.transport, first.options.port, first.options.wlag) == (
        "mbuffer",
        9090,
        1800,
    )
    assert first.options.clag == PairOptions().clag
    assert (first.path, first.line) == (str(tmp_path / "zettabee.cfg"), 3)
    assert pair_file.pairs[1].options == PairOptions()
    assert pair_file.pairs[2].destination.pool == "backup"


SAMPLES: dict[str, tuple[str, object]] = {
    "transport": ("local", "local"),
    "port": ("9090", 9090),
    "sshport": ("2222", 2222),
    "sshkey": ("/root/.ssh/zb_ed25519", "/root/.ssh/zb_ed25519"),
    "user": ("zbackup", "zbackup"),
    "knownhosts": ("/etc/zb/known", "/etc/zb/known"),
    "wlag": ("1h", 3600),
    "clag": ("1d", 86400),
    "wrun": ("90", 90),
    "crun": ("1h30m", 5400),
    "intermediate": ("yes", True),
    "rollback": ("ON", True),
    "keep": ("3", 3),
    "bwlimit": ("10M", "10M"),
    "stall": ("2m", 120),
    "mbufferhost": ("[fd00::2]", "[fd00::2]"),
    "compression": ("gzip-9", "gzip-9"),
    "resume": ("no", False),
    "hold": ("off", False),
    "bookmark": ("yes", True),
    "raw": ("true", True),
    "props": ("yes", True),
    "recursive": ("yes", True),
    "exclude": ("tmp|*/cache,recursive=yes", ("tmp", "*/cache")),  # needs recursive
}


def test_samples_cover_every_pair_option() -> None:
    assert set(SAMPLES) == set(records.fields(PairOptions)) == set(OPTION_NAMES)


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_each_option_is_parsed_to_its_type(tmp_path: Path, key: str) -> None:
    text, value = SAMPLES[key]
    pair_file = load(tmp_path, f"{GOOD} {key}={text}\n")
    assert messages(pair_file) == []
    assert getattr(pair_file.pairs[0].options, key) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("no", False), ("false", False), ("off", False), ("0", False), ("true", True), ("1", True)],
)
def test_boolean_spellings(tmp_path: Path, text: str, value: bool) -> None:
    pair_file = load(tmp_path, f"{GOOD} rollback={text}\n")
    assert pair_file.pairs[0].options.rollback is value


def test_crlf_file_loads(tmp_path: Path) -> None:
    pair_file = load(tmp_path, f"{GOOD} keep=2\r\nsrc:tank/b dst:backup/b\r\n")
    assert messages(pair_file) == []
    assert [p.options.keep for p in pair_file.pairs] == [2, 1]


@pytest.mark.parametrize("first", ["# saved by a Windows editor", GOOD])
def test_a_byte_order_mark_at_the_start_is_not_part_of_the_first_line(
    tmp_path: Path, first: str
) -> None:
    pair_file = load(tmp_path, f"\ufeff{first}\nsrc:tank/b dst:backup/b\n")
    assert messages(pair_file) == []
    assert [p.line for p in pair_file.pairs] == ([1, 2] if first == GOOD else [2])
    without = load(tmp_path, f"{first}\nsrc:tank/b dst:backup/b\n")
    assert [p.fingerprint for p in pair_file.pairs] == [p.fingerprint for p in without.pairs]


def test_a_byte_order_mark_inside_the_file_is_still_named(tmp_path: Path) -> None:
    pair_file = load(tmp_path, f"{GOOD}\n\ufeffsrc:tank/b dst:backup/b\n")
    path = str(tmp_path / "zettabee.cfg")
    assert [m.split(": ", 1)[0] for m in messages(pair_file)] == [f"{path}:2"]
    assert "a control character (U+FEFF)" in messages(pair_file)[0]


def test_ipv6_endpoints(tmp_path: Path) -> None:
    pair_file = load(tmp_path, "[fe80::1%eth0]:tank/data [::1]:backup/data mbufferhost=[::1]\n")
    assert messages(pair_file) == []
    pair = pair_file.pairs[0]
    assert pair.source == Endpoint("[fe80::1%eth0]", "tank/data")
    assert pair.destination == Endpoint("[::1]", "backup/data")
    assert pair.name == "[::1]:backup/data"


def test_fingerprint_of_a_known_pair(tmp_path: Path) -> None:
    expected = hashlib.md5(
        b"src.example.com:tank/data::dst.example.com:backup/data", usedforsecurity=False
    ).hexdigest()
    pair_file = load(tmp_path, GOOD + "\n")
    assert pair_file.pairs[0].fingerprint == expected


def test_settings_defaults_apply_and_pair_options_override(tmp_path: Path) -> None:
    settings = parse_settings("[defaults]\ntransport = mbuffer\nwlag = 1h\nclag = 3h\n")
    pair_file = load(tmp_path, f"{GOOD}\nsrc:tank/b dst:backup/b transport=ssh,clag=1d\n", settings)
    assert messages(pair_file) == []
    first, second = pair_file.pairs
    assert (first.options.transport, first.options.wlag, first.options.clag) == (
        "mbuffer",
        3600,
        10800,
    )
    assert (second.options.transport, second.options.wlag, second.options.clag) == (
        "ssh",
        3600,
        86400,
    )


# --------------------------------------------------------------------------------------
# The pair file: errors, each with its file and line
# --------------------------------------------------------------------------------------

LINE_ERRORS = [
    ("src:tank/b", "missing destination: a pair line is 'source destination [options]'"),
    (
        "src:tank/b dst:backup/b transport=ssh, port=1",
        "too many columns (4): a pair line is 'source destination [options]', options are "
        "key=value separated by commas, without spaces",
    ),
    ("src/tank/b dst:backup/b", "source: endpoint 'src/tank/b' is not host:pool/fs (no ':')"),
    ("src:tank/b :backup/b", "destination: endpoint ':backup/b' has an empty host"),
    ("src:tank/b dst:", "destination: empty file system name"),
    ("src:tank/b dst:backup/b", None),
    (
        "src:tank/b dst:backup/b transprot=ssh",
        "unknown option 'transprot' (did you mean 'transport'?); known: transport, port,",
    ),
    (
        "src:tank/b dst:backup/b transport=rsync",
        "option transport: must be one of ssh, mbuffer, local, not 'rsync'",
    ),
    ("src:tank/b dst:backup/b port=0", "option port: must be a port number from 1 to 65535"),
    ("src:tank/b dst:backup/b port=70000", "not '70000'"),
    ("src:tank/b dst:backup/b sshport=ssh", "option sshport: must be a port number"),
    ("src:tank/b dst:backup/b port=", "option 'port' has no value"),
    (
        "src:tank/b dst:backup/b sshkey=id_rsa",
        "option sshkey: must be an absolute path: path 'id_rsa' is not absolute",
    ),
    ("src:tank/b dst:backup/b knownhosts=kh", "option knownhosts: must be an absolute path"),
    ("src:tank/b dst:backup/b user=Admin", "option user: user 'Admin' is not a valid login name"),
    ("src:tank/b dst:backup/b wlag=soon", "option wlag: 'soon' is not a duration"),
    ("src:tank/b dst:backup/b stall=0", "option stall: must be a positive duration, not '0'"),
    (
        "src:tank/b dst:backup/b intermediate=maybe",
        "option intermediate: must be yes/no, true/false, on/off or 1/0, not 'maybe'",
    ),
    ("src:tank/b dst:backup/b keep=0", "option keep: must be a whole number of at least 1"),
    ("src:tank/b dst:backup/b bwlimit=10MB", "option bwlimit: must be a positive rate"),
    ("src:tank/b dst:backup/b bwlimit=0", "not '0'"),
    ("src:tank/b dst:backup/b compression=lz5", "'lz5' is not a ZFS compression value"),
    ("src:tank/b dst:backup/b mbufferhost=a;b", "option mbufferhost: host 'a;b' contains ';'"),
    ("src:tank/b dst:backup/b port=1,port=2", "option 'port' given twice"),
    ("src:tank/b dst:backup/b keep", "option 'keep' is not key=value"),
    ("src:tank/b dst:backup/b =3", "option '=3' has no name before '='"),
    ("src:tank/b dst:backup/b keep=2,", "empty option (a doubled or trailing ',')"),
    (
        "src:tank/b dst:backup/b wlag=8h",
        "wlag 8h is greater than clag 6h (default): the warning threshold must not exceed "
        "the critical one",
    ),
    ("src:tank/b dst:backup/b wrun=2h,crun=1h30m", "wrun 2h is greater than crun 1h30m:"),
    ("src:tank/b src:tank/b", "source and destination are both src:tank/b"),
    ("src:tank/b#x dst:backup/b", "contains '#': that names a bookmark"),
]


@pytest.mark.parametrize(("line", "expected"), LINE_ERRORS)
def test_each_error_is_reported_with_file_and_line(
    tmp_path: Path, line: str, expected: str | None
) -> None:
    pair_file = load(tmp_path, f"{GOOD}\n{line}\nsrc:tank/c dst:backup/c\n")
    path = str(tmp_path / "zettabee.cfg")
    if expected is None:  # the control row: the same line, well-formed, loads
        assert messages(pair_file) == []
        assert len(pair_file.pairs) == 3
        return
    assert len(pair_file.problems) == 1, messages(pair_file)
    assert messages(pair_file)[0].startswith(f"{path}:2: "), messages(pair_file)
    assert expected in messages(pair_file)[0]
    # The broken line never prevents the good ones around it from loading.
    assert [p.line for p in pair_file.pairs] == [1, 3]


def test_every_problem_on_a_line_is_reported(tmp_path: Path) -> None:
    pair_file = load(tmp_path, "a;b:tank/x dst:$y foo=1,port=0,port=9,wlag=x\n")
    path = str(tmp_path / "zettabee.cfg")
    assert messages(pair_file) == [
        f"{path}:1: source: host 'a;b' contains ';'; host names may only contain letters, "
        "digits, '.' and '-'",
        f"{path}:1: destination: file system '$y' contains '$'; file system names may only "
        "contain letters, digits, '_', '.', ':', '-' and '/'",
        f"{path}:1: unknown option 'foo'; known: " + ", ".join(OPTION_NAMES),
        f"{path}:1: option port: must be a port number from 1 to 65535, not '0'",
        f"{path}:1: option 'port' given twice",
        f"{path}:1: option wlag: 'x' is not a duration; use seconds (90) or numbers with "
        "d, h, m, s largest first (30m, 2h, 1d, 1h30m)",
    ]
    assert pair_file.pairs == []


def test_errors_on_many_lines_are_all_reported_in_order(tmp_path: Path) -> None:
    pair_file = load(
        tmp_path,
        "src:tank/a dst:backup/a\n"
        "src:tank/b\n"
        "# fine\n"
        "src:tank/c dst:backup/c keep=0\n"
        "src:tank/d dst:backup/d\n"
        "src:tank/e dst:backup/e a b\n"
        "src:tank/f dst:backup/f\n",
    )
    assert [p.line for p in pair_file.problems] == [2, 4, 6]
    assert [p.line for p in pair_file.pairs] == [1, 5, 7]
    with pytest.raises(ConfigError) as info:
        pair_file.raise_for_problems()
    text = str(info.value)
    path = str(tmp_path / "zettabee.cfg")
    assert f"{path}:2: missing destination" in text
    assert f"{path}:4: option keep:" in text
    assert f"{path}:6: too many columns (4)" in text


def test_raise_for_problems_is_silent_for_a_clean_file(tmp_path: Path) -> None:
    pair_file = load(tmp_path, GOOD + "\n")
    pair_file.raise_for_problems()
    assert len(pair_file.pairs) == 1


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("src:tank/$(reboot) dst:backup/x", "source: file system 'tank/$(reboot)' contains '$'"),
        ("src:tank/`reboot` dst:backup/x", "source: file system 'tank/`reboot`' contains '`'"),
        ("src:tank/x dst:backup/x;reboot", "destination: file system 'backup/x;reboot' contains"),
        ("src:tank/'x' dst:backup/x", 'contains "\'"'),
        ('src:tank/"x" dst:backup/x', "contains '\"'"),
        ("-oProxyCommand=sh:tank/x dst:backup/x", "source: host '-oProxyCommand=sh' starts"),
        ("src:-x dst:backup/x", "component '-x' starts with '-'"),
        ("src:tank/x dst:backup/x\x07", "contains a control character (U+0007)"),
        ("src:tank/x dst:backup/x\x0cy", "contains a control character (U+000C)"),
        ("src:tank/x dst:backup/x sshkey=/k\x1b[2J", "contains a control character (U+001B)"),
        ("src|dst:tank/x dst:backup/x", "host 'src|dst' contains '|'"),
        ("src&:tank/x dst:backup/x", "contains '&'"),
        ("src:tank/x<y dst:backup/x", "contains '<'"),
        ("src:tank/x dst:backup/x>y", "contains '>'"),
        ("src:tank/x dst:backup/(x)", "contains '('"),
    ],
)
def test_hostile_names_are_refused_and_named(tmp_path: Path, line: str, fragment: str) -> None:
    # Hostile line in the middle: the line numbers after it must not shift (a form feed
    # or escape is not a line break for the operator's editor).
    pair_file = load(tmp_path, f"{GOOD}\n{line}\nsrc:tank/c dst:backup/c keep=0\n")
    path = str(tmp_path / "zettabee.cfg")
    assert messages(pair_file)[0].startswith(f"{path}:2: ")
    assert fragment in messages(pair_file)[0]
    assert [p.line for p in pair_file.problems] == [2, 3]
    assert [p.line for p in pair_file.pairs] == [1]


def test_newline_in_a_name_cannot_smuggle_a_second_pair(tmp_path: Path) -> None:
    # A newline simply ends the line: the tail becomes its own (broken) line 2.
    pair_file = load(tmp_path, "src:tank/x dst:backup/x\n;reboot\n")
    path = str(tmp_path / "zettabee.cfg")
    assert messages(pair_file) == [
        f"{path}:2: missing destination: a pair line is 'source destination [options]'"
    ]


# --------------------------------------------------------------------------------------
# The pair file: clashes between lines
# --------------------------------------------------------------------------------------


def test_duplicate_destination_invalidates_the_later_line_only(tmp_path: Path) -> None:
    pair_file = load(
        tmp_path,
        "src:tank/a dst:backup/a\n"
        "other:tank/b dst:backup/a\n"
        "src:tank/a elsewhere:backup/a\n",  # same file system on another host: fine
    )
    path = str(tmp_path / "zettabee.cfg")
    assert messages(pair_file) == [
        f"{path}:2: destination dst:backup/a is already used on line 1; a file system can "
        "receive from one pair only"
    ]
    assert [str(p.source) for p in pair_file.pairs] == ["src:tank/a", "src:tank/a"]
    assert [p.line for p in pair_file.pairs] == [1, 3]


def test_a_broken_earlier_line_does_not_block_a_later_duplicate(tmp_path: Path) -> None:
    pair_file = load(tmp_path, "src:tank/a dst:backup/a keep=zero\nsrc:tank/a dst:backup/a\n")
    assert [p.line for p in pair_file.problems] == [1]
    assert [p.line for p in pair_file.pairs] == [2]


def test_duplicate_fingerprint(tmp_path: Path) -> None:
    # ':' is legal inside a file system name, so two different pairs can spell the same
    # "shost:sfs::dhost:dfs" text: "a:p::b:q::c:r" both ways.
    pair_file = load(tmp_path, "a:p::b:q c:r\na:p b:q::c:r\n")
    path = str(tmp_path / "zettabee.cfg")
    fp = hashlib.md5(b"a:p::b:q::c:r", usedforsecurity=False).hexdigest()
    assert messages(pair_file) == [f"{path}:2: fingerprint {fp} is already used on line 1"]
    assert [p.line for p in pair_file.pairs] == [1]


def test_duplicate_mbuffer_port(tmp_path: Path) -> None:
    pair_file = load(
        tmp_path,
        "src:tank/a dst:backup/a transport=mbuffer,port=9090\n"
        "src:tank/b dst:backup/b transport=ssh,port=9090\n"  # ssh ignores port: no clash
        "src:tank/c dst:backup/c transport=mbuffer,port=9090\n"
        "src:tank/d dst:backup/d transport=mbuffer,port=9091\n"
        "src:tank/e dst:backup/e transport=mbuffer\n"
        "src:tank/f dst:backup/f transport=mbuffer\n"  # both pick a free port at run time
        "src:tank/g dst2:backup/g transport=mbuffer,port=9090\n",  # listens on another host
    )
    path = str(tmp_path / "zettabee.cfg")
    assert messages(pair_file) == [
        f"{path}:3: mbuffer port 9090 on dst is already used on line 1; give each mbuffer "
        "pair its own port, or none to pick a free one"
    ]
    assert [p.line for p in pair_file.pairs] == [1, 2, 4, 5, 6, 7]


def test_one_destination_under_two_spellings_of_its_host(tmp_path: Path) -> None:
    pair_file = load(
        tmp_path,
        "src:tank/a LOCALHOST:backup/x\n"
        "src:tank/b localhost:backup/x\n"
        "src:tank/c Dst.Example.com:backup/y\n"
        "src:tank/d dst.example.com.:backup/y\n"
        "src:tank/e dst.example.com:backup/Y\n",  # ZFS names keep their case
    )
    path = str(tmp_path / "zettabee.cfg")
    why = "(host names compare without case or a final '.')"
    assert messages(pair_file) == [
        f"{path}:2: destination localhost:backup/x is LOCALHOST:backup/x of {path}:1 under "
        f"another name {why}; a file system can receive from one pair only",
        f"{path}:4: destination dst.example.com.:backup/y is Dst.Example.com:backup/y of "
        f"{path}:3 under another name {why}; a file system can receive from one pair only",
    ]
    assert [p.line for p in pair_file.pairs] == [1, 3, 5]


@pytest.mark.parametrize("other", ["127.0.0.1", "[::1]", socket.gethostname()])
def test_every_name_of_this_machine_is_one_destination_host(tmp_path: Path, other: str) -> None:
    pair_file = load(tmp_path, f"src:tank/a localhost:backup/x\nsrc:tank/b {other}:backup/x\n")
    path = str(tmp_path / "zettabee.cfg")
    assert messages(pair_file) == [
        f"{path}:2: destination {other}:backup/x is localhost:backup/x of {path}:1 under "
        f"another name (localhost and {other} both name this machine); a file system can "
        "receive from one pair only"
    ]
    assert [p.line for p in pair_file.pairs] == [1]


def test_other_hosts_may_hold_file_systems_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def remote(name: str) -> bool:
        asked.append(name)
        return False

    monkeypatch.setattr(host, "is_local_host", remote)
    pair_file = load(
        tmp_path,
        "src:tank/a b1.example.com:backup/x\n"
        "src:tank/b b2.example.com:backup/x\n"
        "src:tank/c b1.example.com:backup/y\n",
    )
    assert messages(pair_file) == []
    assert [p.line for p in pair_file.pairs] == [1, 2, 3]
    # Only a file system name that recurs asks the resolver: a plugin loading thousands
    # of distinct destinations must not wait on DNS.
    assert asked and set(asked) <= {"b1.example.com", "b2.example.com"}


def test_mbuffer_port_on_one_host_under_two_spellings(tmp_path: Path) -> None:
    pair_file = load(
        tmp_path,
        "src:tank/a localhost:backup/a transport=mbuffer,port=9090\n"
        "src:tank/b LOCALHOST:backup/b transport=mbuffer,port=9090\n",
    )
    path = str(tmp_path / "zettabee.cfg")
    assert messages(pair_file) == [
        f"{path}:2: mbuffer port 9090 on LOCALHOST is already used on line 1; give each "
        "mbuffer pair its own port, or none to pick a free one"
    ]


# --------------------------------------------------------------------------------------
# The pair file: unreadable
# --------------------------------------------------------------------------------------


def test_missing_pair_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.cfg")
    with pytest.raises(ConfigError) as info:
        load_pairs(path, Settings())
    assert str(info.value) == (
        f"{path}: cannot read the pair file: No such file or directory; name another with --config FILE"
    )


def test_pair_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the pair file: Is a directory"):
        load_pairs(str(tmp_path), Settings())


def test_bad_default_is_reported_like_a_bad_pair_option(tmp_path: Path) -> None:
    ini = write(tmp_path, "[defaults]\nbwlimit = fast\n", "zettabee.ini")
    with pytest.raises(ConfigError) as ini_info:
        load_settings(ini)
    pair_file = load(tmp_path, f"{GOOD} bwlimit=fast\n")
    ini_message = str(ini_info.value.problems[0]).split(": ", 1)[1]
    pair_message = messages(pair_file)[0].split(": ", 1)[1]
    assert ini_message == pair_message
    assert ini_message.startswith("option bwlimit: must be a positive rate")


# --------------------------------------------------------------------------------------
# find_pair
# --------------------------------------------------------------------------------------


@pytest.fixture
def pairs(tmp_path: Path) -> list[Pair]:
    pair_file = load(
        tmp_path,
        "src:tank/data dst:backup/data\n"
        "src:tank/web dst:backup/web\n"
        "src2:tank/data dst:archive/data\n"
        "src:tank/logs other:backup/data\n",
    )
    assert pair_file.problems == []
    return pair_file.pairs


@pytest.mark.parametrize(
    ("arg", "line"),
    [
        ("dst:backup/data", 1),
        ("other:backup/data", 4),
        ("dst:backup/web", 2),
        ("backup/web", 2),
        ("web", 2),
        ("archive/data", 3),
    ],
)
def test_find_pair(pairs: list[Pair], arg: str, line: int) -> None:
    assert find_pair(pairs, arg).line == line


def test_find_pair_by_fingerprint(pairs: list[Pair]) -> None:
    fp = hashlib.md5(b"src2:tank/data::dst:archive/data", usedforsecurity=False).hexdigest()
    assert find_pair(pairs, fp).line == 3
    assert find_pair(pairs, fp.upper()).line == 3


def test_find_pair_ambiguous_names_the_candidates(pairs: list[Pair]) -> None:
    with pytest.raises(UsageError) as info:
        find_pair(pairs, "backup/data")
    assert str(info.value) == (
        "'backup/data' matches 2 pairs: dst:backup/data, other:backup/data; name one of them"
    )
    with pytest.raises(UsageError, match="'data' matches 3 pairs: dst:backup/data, dst:archive"):
        find_pair(pairs, "data")


def test_find_pair_absent(pairs: list[Pair], tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        find_pair(pairs, "nope")
    path = tmp_path / "zettabee.cfg"
    assert str(info.value) == f"no pair 'nope' in {path}; `zettabee fingerprint` lists them"
    with pytest.raises(UsageError, match="no pair 'x' in /etc/zb.cfg; `zettabee fingerprint`"):
        find_pair([], "x", "/etc/zb.cfg")


def test_find_pair_exact_file_system_beats_last_component(tmp_path: Path) -> None:
    pair_file = load(tmp_path, "src:tank/a dst:data\nsrc:tank/b dst:backup/data\n")
    assert find_pair(pair_file.pairs, "data").line == 1
    assert find_pair(pair_file.pairs, "backup/data").line == 2
