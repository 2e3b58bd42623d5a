"""Unit tests for zettabee.config: the settings file."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from zettabee import config
from zettabee.config import Settings, load_settings, parse_settings
from zettabee.errors import ConfigError
from zettabee.pair import Endpoint, Pair, PairOptions


def write(tmp_path: Path, text: str, name: str = "zettabee.cfg") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def settings_error(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text, "zettabee.ini")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return [str(p) for p in info.value.problems]


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ZETTABEE_SETTINGS, and the default location pointed at an empty directory."""
    monkeypatch.delenv(config.SETTINGS_ENV, raising=False)
    default = tmp_path / "etc" / "zettabee.ini"
    monkeypatch.setattr(config, "DEFAULT_SETTINGS_PATH", str(default))
    return default


def test_missing_default_settings_means_all_defaults(no_env: Path) -> None:
    settings = load_settings()
    assert settings == Settings()
    assert settings.path is None
    assert settings.pairs == "/etc/zettabee/zettabee.cfg"
    assert settings.state_dir == "/var/lib/zettabee"
    assert settings.log_dir == "/var/log/zettabee"
    assert settings.lock_dir == "/run/zettabee"
    assert settings.spool_dir == "/var/spool/zettabee"
    assert settings.known_hosts == "/etc/zettabee/known_hosts"
    assert settings.defaults == PairOptions()
    assert settings.host_name is None
    assert settings.service_template == "zettabee {check} {fs}"
    assert settings.passive == ()
    assert settings.backends == {}


def test_default_settings_location_is_read_when_present(no_env: Path) -> None:
    no_env.parent.mkdir()
    no_env.write_text("[paths]\nstate_dir = /srv/zb\n")
    settings = load_settings()
    assert (settings.state_dir, settings.path) == ("/srv/zb", str(no_env))


def test_explicit_missing_settings_is_an_error(no_env: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "gone.ini")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: settings file not found"


def test_env_var_overrides_default(
    no_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[paths]\nlog_dir = /srv/log\n", "env.ini")
    monkeypatch.setenv(config.SETTINGS_ENV, path)
    assert load_settings().log_dir == "/srv/log"
    # An explicit path still beats the environment.
    other = write(tmp_path, "[paths]\nlog_dir = /srv/other\n", "other.ini")
    assert load_settings(other).log_dir == "/srv/other"


def test_env_var_naming_a_missing_file_is_an_error(
    no_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "gone.ini")
    monkeypatch.setenv(config.SETTINGS_ENV, path)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == f"{path}: settings file not found (named by ZETTABEE_SETTINGS)"


FULL_SETTINGS = """\
# zettabee settings
[paths]
pairs = /srv/zb/pairs.cfg
state_dir = /srv/zb/state
log_dir = /srv/zb/log
lock_dir = /srv/zb/lock
spool_dir = /srv/zb/spool
known_hosts = /srv/zb/known_hosts

[defaults]
transport = mbuffer
wlag = 30m
clag = 2h
keep = 3
rollback = yes
compression = lz4

[monitoring]
host_name = backup01.example.com
service_template = zb {check} {destination} {source} {fingerprint}
passive = nsca, icinga2-api

[nsca]
host = nagios.example.com
password = se#cret;x

[icinga2-api]
url = https://icinga.example.com:5665
"""


@pytest.mark.parametrize("first", ["# saved by a Windows editor\n", ""])
def test_a_byte_order_mark_at_the_start_of_the_settings_is_ignored(
    tmp_path: Path, first: str
) -> None:
    path = write(tmp_path, f"\ufeff{first}[paths]\nstate_dir = /srv/zb\n", "zettabee.ini")
    assert load_settings(path).state_dir == "/srv/zb"
    assert parse_settings(f"\ufeff{first}[paths]\nstate_dir = /srv/zb\n").state_dir == "/srv/zb"


def test_full_settings_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_SETTINGS, "zettabee.ini")
    settings = load_settings(path)
    assert settings.path == path
    assert (settings.pairs, settings.state_dir, settings.log_dir) == (
        "/srv/zb/pairs.cfg",
        "/srv/zb/state",
        "/srv/zb/log",
    )
    assert (settings.lock_dir, settings.spool_dir, settings.known_hosts) == (
        "/srv/zb/lock",
        "/srv/zb/spool",
        "/srv/zb/known_hosts",
    )
    assert settings.defaults == PairOptions(
        transport="mbuffer", wlag=1800, clag=7200, keep=3, rollback=True, compression="lz4"
    )
    assert settings.host_name == "backup01.example.com"
    assert settings.monitoring_host() == "backup01.example.com"
    assert settings.passive == ("nsca", "icinga2-api")
    # Passwords keep their '#' and ';': no inline comments in the settings file.
    assert settings.backends == {
        "nsca": {"host": "nagios.example.com", "password": "se#cret;x"},
        "icinga2-api": {"url": "https://icinga.example.com:5665"},
    }


def test_service_name() -> None:
    pair = Pair(Endpoint("src", "tank/data"), Endpoint("dst", "backup/data"))
    assert Settings().service_name(pair, "lag") == "zettabee lag backup/data"
    assert Settings().service_name(pair, "runtime") == "zettabee runtime backup/data"
    custom = parse_settings("[monitoring]\nservice_template = zb {check} {destination} {source}\n")
    assert custom.service_name(pair, "lag") == "zb lag dst:backup/data src:tank/data"
    by_fp = parse_settings("[monitoring]\nservice_template = zb-{check}-{fingerprint}\n")
    assert by_fp.service_name(pair, "lag") == f"zb-lag-{pair.fingerprint}"
    with pytest.raises(ValueError, match="unknown check 'size'; known: lag, runtime"):
        Settings().service_name(pair, "size")


def test_monitoring_host_defaults_to_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "zb.example.net")
    config._fqdn.cache_clear()
    try:
        assert Settings().monitoring_host() == "zb.example.net"
        assert parse_settings("[monitoring]\nhost_name =\n").monitoring_host() == "zb.example.net"
    finally:
        config._fqdn.cache_clear()


SETTINGS_ERRORS = [
    ("[paths]\nstate_dir = /a\nbogus = 1\n", 3, "unknown key 'bogus' in [paths]; known: pairs,"),
    ("[paths]\nlog_dir = var/log\n", 2, "log_dir: path 'var/log' is not absolute"),
    ("[path]\npairs = /x\n", 1, "unknown section [path] (did you mean 'paths'?); known: paths,"),
    ("[DEFAULT]\nwlag = 1h\n", 1, "unknown section [DEFAULT] (did you mean 'defaults'?)"),
    (
        "[defaults]\nkeep = 2\ntransport = rsync\n",
        3,
        "option transport: must be one of ssh, mbuffer, local, not 'rsync'",
    ),
    ("[defaults]\nwlg = 1h\n", 2, "unknown option 'wlg' (did you mean 'wlag'?)"),
    ("[defaults]\nwlag = 30m # half an hour\n", 2, "option wlag: '30m # half an hour' is not"),
    ("[defaults]\nclag = 1h\n", 2, "wlag 2h (default) is greater than clag 1h: the warning"),
    ("[defaults]\nport = 9090\n", 2, "port cannot have a default: each mbuffer pair needs"),
    (
        "[monitoring]\nservice_template = zb {check} {fs} {host}\n",
        2,
        "service_template 'zb {check} {fs} {host}': unknown field {host}; allowed: {check}, "
        "{fs}, {destination}, {source}, {fingerprint}",
    ),
    ("[monitoring]\nservice_template = zb {fs!r} {check}\n", 2, "unknown field {fs!r}"),
    ("[monitoring]\nservice_template = zb {fs:>9} {check}\n", 2, "unknown field {fs:>9}"),
    ("[monitoring]\nservice_template = zb {fs}\n", 2, "lacks {check}: lag and runtime would"),
    ("[monitoring]\nservice_template = zb {check} {source}\n", 2, "names no pair: use {fs}"),
    ("[monitoring]\nservice_template = zb {check {fs}\n", 2, "service_template 'zb {check {fs}':"),
    ("[monitoring]\nservice_template = zb! {check} {fs}\n", 2, "contains '!', which Nagios"),
    ("[monitoring]\nhost_name = mon$x\n", 2, "host_name 'mon$x' contains '$', which Nagios"),
    ("[monitoring]\nhostname = x\n", 2, "unknown key 'hostname' in [monitoring] (did you mean"),
    (
        "[monitoring]\npassive = nsca, carrier\n[nsca]\nhost = x\n",
        2,
        "passive: unknown back end 'carrier'; known: nsca, send_nsca, icinga2-api",
    ),
    (
        "[send_nsca]\n[monitoring]\npassive = send_nsca,send_nsca\n",
        3,
        "'send_nsca' is listed twice",
    ),
    (
        "[monitoring]\n\npassive = icinga2-api\n",
        3,
        "passive back end 'icinga2-api' is listed but has no [icinga2-api] section",
    ),
    ("[paths]\nstate_dir = /a\nstate_dir = /b\n", 3, "key 'state_dir' given twice in [paths]"),
    ("[paths]\n[paths]\n", 2, "section [paths] given twice"),
    ("pairs = /x\n[paths]\n", 1, "a key outside any section"),
    ("[paths]\nthis is not a key\n", 2, "cannot parse 'this is not a key': expected 'key = value'"),
]


@pytest.mark.parametrize(("text", "line", "expected"), SETTINGS_ERRORS)
def test_settings_errors_have_file_and_line(
    tmp_path: Path, text: str, line: int, expected: str
) -> None:
    found = settings_error(tmp_path, text)
    path = str(tmp_path / "zettabee.ini")
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{line}: "), found[0]
    assert expected in found[0]


def test_settings_report_every_problem_at_once_in_line_order(tmp_path: Path) -> None:
    found = settings_error(
        tmp_path,
        "[monitoring]\n"
        "passive = nsca\n"
        "[paths]\n"
        "State_Dir = relative\n"  # keys are case-insensitive; the line is still found
        "  continued value line\n"
        "bogus = 1\n"
        "[defaults]\n"
        "keep = 0\n",
    )
    path = str(tmp_path / "zettabee.ini")
    assert [f.split(": ", 1)[0] for f in found] == [f"{path}:{n}" for n in (2, 4, 6, 8)]
    assert "no [nsca] section" in found[0]
    assert "state_dir: path 'relative\\ncontinued value line' contains a newline" in found[1]
    assert "unknown key 'bogus'" in found[2]
    assert "option keep: must be a whole number of at least 1" in found[3]


def test_settings_key_line_is_found_within_its_own_section(tmp_path: Path) -> None:
    found = settings_error(tmp_path, "[nsca]\nhost = a\n\n[monitoring]\nhost = b\n")
    path = str(tmp_path / "zettabee.ini")
    assert found == [
        f"{path}:5: unknown key 'host' in [monitoring] (did you mean 'host_name'?); known: "
        "host_name, service_template, passive"
    ]
