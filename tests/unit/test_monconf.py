"""``zettabee icinga-config`` and ``nagios-config``: the exact objects they print.

The real servers read this output in tests/integration/test_icinga_conf.py and
test_icinga_e2e.py; here every line is pinned, names that look dangerous in either syntax
included.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zettabee import cli, monconf, tree
from zettabee.config import Settings, load_settings, parse_settings
from zettabee.errors import ConfigError, UsageError
from zettabee.monconf import ACTIVE, BOTH, Request, render
from zettabee.pairfile import parse_pairs

PAIRS = """\
src1.example.com:tank/data  backup1.example.com:backup/data  wlag=1h
src1.example.com:tank/home  backup1.example.com:backup/home
"""


def settings(text: str = "", path: str = "/etc/zettabee/zettabee.ini") -> Settings:
    head = "[paths]\npairs = /etc/zettabee/zettabee.cfg\n[monitoring]\nhost_name = backup1\n"
    return parse_settings(head + text, path)


def pairs(text: str = PAIRS, cfg: Settings | None = None) -> list:
    loaded = parse_pairs(text, "/etc/zettabee/zettabee.cfg", cfg or settings())
    assert loaded.problems == []
    return loaded.pairs


def blocks(text: str) -> list[str]:
    """The objects of a generated file, each ending in its newline."""
    return [block.rstrip("\n") + "\n" for block in text.split("\n\n")]


ICINGA_HEAD = """\
/*
 * zettabee: replication services from `zettabee icinga-config --mode {mode}`.
 * Needs commands.conf and templates.conf from zettabee's icinga-conf/icinga2.
 * The service names are those replicate submits its passive results for: to
 * rename them, change service_template in zettabee's settings and generate
 * this file anew.
 */
"""

NAGIOS_HEAD = """\
###############################################################################
# zettabee: replication services from `zettabee nagios-config --mode {mode}`.
# Needs commands.cfg and templates.cfg from zettabee's icinga-conf/nagios.
# The service descriptions are those replicate submits its passive results
# for: to rename them, change service_template in zettabee's settings and
# generate this file anew.
###############################################################################
"""


def test_icinga_passive_is_a_host_and_two_services_per_pair() -> None:
    text = render("icinga", settings(), pairs(), Request("backup1"))
    assert text == ICINGA_HEAD.format(mode="passive") + (
        "\n"
        'object Host "backup1" {\n'
        '\tcheck_command = "hostalive"\n'
        '\taddress = "backup1"\n'
        "}\n"
        "\n"
        'object Service "zettabee lag backup/data" {\n'
        '\thost_name = "backup1"\n'
        '\timport "zettabee-passive-service"\n'
        '\tvars.zettabee_destination = "backup/data"\n'
        '\tvars.zettabee_mode = "passive"\n'
        "}\n"
        "\n"
        'object Service "zettabee runtime backup/data" {\n'
        '\thost_name = "backup1"\n'
        '\timport "zettabee-passive-service"\n'
        '\tvars.zettabee_destination = "backup/data"\n'
        '\tvars.zettabee_mode = "passive"\n'
        "}\n"
        "\n"
        'object Service "zettabee lag backup/home" {\n'
        '\thost_name = "backup1"\n'
        '\timport "zettabee-passive-service"\n'
        '\tvars.zettabee_destination = "backup/home"\n'
        '\tvars.zettabee_mode = "passive"\n'
        "}\n"
        "\n"
        'object Service "zettabee runtime backup/home" {\n'
        '\thost_name = "backup1"\n'
        '\timport "zettabee-passive-service"\n'
        '\tvars.zettabee_destination = "backup/home"\n'
        '\tvars.zettabee_mode = "passive"\n'
        "}\n"
    )


def test_icinga_active_passes_the_files_the_plugins_must_read() -> None:
    request = Request(
        "backup1",
        mode=ACTIVE,
        address="192.0.2.10",
        host_template="generic-host",
        endpoint="backup1.example.com",
        settings_file="/srv/zb/zettabee.ini",
        pair_file="/srv/zb/pairs.cfg",
    )
    text = render("icinga", settings(), pairs()[:1], request)
    assert text == ICINGA_HEAD.format(mode="active") + (
        "\n"
        'object Host "backup1" {\n'
        '\timport "generic-host"\n'
        '\taddress = "192.0.2.10"\n'
        "}\n"
        "\n"
        'object Service "zettabee lag backup/data" {\n'
        '\thost_name = "backup1"\n'
        '\timport "zettabee-active-service"\n'
        '\tcheck_command = "zettabee_lag"\n'
        '\tcommand_endpoint = "backup1.example.com"\n'
        '\tvars.zettabee_lag_destination = "backup/data"\n'
        '\tvars.zettabee_lag_settings = "/srv/zb/zettabee.ini"\n'
        '\tvars.zettabee_lag_config = "/srv/zb/pairs.cfg"\n'
        '\tvars.zettabee_destination = "backup/data"\n'
        '\tvars.zettabee_mode = "active"\n'
        "}\n"
        "\n"
        'object Service "zettabee runtime backup/data" {\n'
        '\thost_name = "backup1"\n'
        '\timport "zettabee-active-service"\n'
        '\tcheck_command = "zettabee_runtime"\n'
        '\tcommand_endpoint = "backup1.example.com"\n'
        '\tvars.zettabee_runtime_destination = "backup/data"\n'
        '\tvars.zettabee_runtime_settings = "/srv/zb/zettabee.ini"\n'
        '\tvars.zettabee_runtime_config = "/srv/zb/pairs.cfg"\n'
        '\tvars.zettabee_destination = "backup/data"\n'
        '\tvars.zettabee_mode = "active"\n'
        "}\n"
    )


def test_icinga_both_and_services_only() -> None:
    request = Request("backup1", mode=BOTH, host_object=False)
    text = render("icinga", settings(), pairs()[1:], request)
    assert text == ICINGA_HEAD.format(mode="both") + (
        "\n"
        'object Service "zettabee lag backup/home" {\n'
        '\thost_name = "backup1"\n'
        '\timport "zettabee-active-service"\n'
        '\tcheck_command = "zettabee_lag"\n'
        "\tenable_passive_checks = true\n"
        '\tvars.zettabee_lag_destination = "backup/home"\n'
        '\tvars.zettabee_destination = "backup/home"\n'
        '\tvars.zettabee_mode = "both"\n'
        "}\n"
        "\n"
        'object Service "zettabee runtime backup/home" {\n'
        '\thost_name = "backup1"\n'
        '\timport "zettabee-active-service"\n'
        '\tcheck_command = "zettabee_runtime"\n'
        "\tenable_passive_checks = true\n"
        '\tvars.zettabee_runtime_destination = "backup/home"\n'
        '\tvars.zettabee_destination = "backup/home"\n'
        '\tvars.zettabee_mode = "both"\n'
        "}\n"
    )


def test_icinga_freshness_for_another_cron_period() -> None:
    request = Request("backup1", host_object=False, freshness=monconf.freshness(3600, None))
    text = render("icinga", settings(), pairs()[:1], request)
    assert blocks(text)[1] == (
        'object Service "zettabee lag backup/data" {\n'
        '\thost_name = "backup1"\n'
        '\timport "zettabee-passive-service"\n'
        "\tcheck_interval = 70m\n"
        "\tretry_interval = 70m\n"
        '\tvars.zettabee_destination = "backup/data"\n'
        '\tvars.zettabee_mode = "passive"\n'
        "}\n"
    )


def test_nagios_passive_and_active() -> None:
    text = render("nagios", settings(), pairs()[:1], Request("backup1"))
    assert text == NAGIOS_HEAD.format(mode="passive") + (
        "\n"
        "define host {\n"
        "    use                             linux-server\n"
        "    host_name                       backup1\n"
        "    address                         backup1\n"
        "}\n"
        "\n"
        "define service {\n"
        "    use                             zettabee-passive-service\n"
        "    host_name                       backup1\n"
        "    service_description             zettabee lag backup/data\n"
        "}\n"
        "\n"
        "define service {\n"
        "    use                             zettabee-passive-service\n"
        "    host_name                       backup1\n"
        "    service_description             zettabee runtime backup/data\n"
        "}\n"
    )
    request = Request(
        "backup1",
        mode=ACTIVE,
        host_object=False,
        settings_file="/srv/zb/zettabee.ini",
        pair_file="/srv/zb/pairs.cfg",
    )
    text = render("nagios", settings(), pairs()[1:], request)
    assert text == NAGIOS_HEAD.format(mode="active") + (
        "\n"
        "define service {\n"
        "    use                             zettabee-active-service\n"
        "    host_name                       backup1\n"
        "    service_description             zettabee lag backup/home\n"
        "    check_command                   check_zettabee_lag!backup/home!"
        "--settings /srv/zb/zettabee.ini --config /srv/zb/pairs.cfg\n"
        "}\n"
        "\n"
        "define service {\n"
        "    use                             zettabee-active-service\n"
        "    host_name                       backup1\n"
        "    service_description             zettabee runtime backup/home\n"
        "    check_command                   check_zettabee_runtime!backup/home!"
        "--settings /srv/zb/zettabee.ini --config /srv/zb/pairs.cfg\n"
        "}\n"
    )


def test_nagios_both_and_freshness() -> None:
    both = render("nagios", settings(), pairs()[:1], Request("b1", mode=BOTH, host_object=False))
    assert blocks(both)[1] == (
        "define service {\n"
        "    use                             zettabee-active-service\n"
        "    host_name                       b1\n"
        "    service_description             zettabee lag backup/data\n"
        "    check_command                   check_zettabee_lag!backup/data\n"
        "    passive_checks_enabled          1\n"
        "}\n"
    )
    fresh = Request("b1", host_object=False, freshness=monconf.freshness(3600, 1800))
    stale = render("nagios", settings(), pairs()[:1], fresh)
    assert "    freshness_threshold             5400\n" in blocks(stale)[1]


# -- names ---------------------------------------------------------------------------

# Valid for zettabee, and each a trap for one of the two syntaxes: a backslash and a
# double quote for Icinga strings, '#', braces and brackets for either parser, a
# comment opener, a non-ASCII letter, names that read like keywords or host:fs.
HOSTILE_TEMPLATE = "zb\\ {check} #{fs} {{x}} [y] é //"
HOSTILE_PAIRS = """\
src:tank/a  localhost:backup/a:b..c
src:tank/b  localhost:backup/object/include
src:tank/c  localhost:backup/x-_y.z
"""


def hostile() -> tuple[Settings, list]:
    cfg = settings(f"service_template = {HOSTILE_TEMPLATE}\n")
    return cfg, pairs(HOSTILE_PAIRS, cfg)


def test_hostile_names_are_quoted_for_icinga() -> None:
    cfg, loaded = hostile()
    text = render("icinga", cfg, loaded, Request("host one \\ two"))
    assert 'object Host "host one \\\\ two" {\n' in text
    assert [line for line in text.splitlines() if line.startswith("object Service")] == [
        'object Service "zb\\\\ lag #backup/a:b..c {x} [y] é //" {',
        'object Service "zb\\\\ runtime #backup/a:b..c {x} [y] é //" {',
        'object Service "zb\\\\ lag #backup/object/include {x} [y] é //" {',
        'object Service "zb\\\\ runtime #backup/object/include {x} [y] é //" {',
        'object Service "zb\\\\ lag #backup/x-_y.z {x} [y] é //" {',
        'object Service "zb\\\\ runtime #backup/x-_y.z {x} [y] é //" {',
    ]
    assert '\tvars.zettabee_destination = "backup/a:b..c"\n' in text


def test_hostile_names_stand_as_they_are_for_nagios() -> None:
    # Nagios keeps a value as written up to a ';' (refused, below): nothing to escape.
    cfg, loaded = hostile()
    text = render("nagios", cfg, loaded, Request("host one \\ two", mode=BOTH))
    assert "    host_name                       host one \\ two\n" in text
    assert [line.split(None, 1)[1] for line in text.splitlines() if "service_desc" in line] == [
        "zb\\ lag #backup/a:b..c {x} [y] é //",
        "zb\\ runtime #backup/a:b..c {x} [y] é //",
        "zb\\ lag #backup/object/include {x} [y] é //",
        "zb\\ runtime #backup/object/include {x} [y] é //",
        "zb\\ lag #backup/x-_y.z {x} [y] é //",
        "zb\\ runtime #backup/x-_y.z {x} [y] é //",
    ]
    assert "check_zettabee_lag!backup/a:b..c\n" in text


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("a;b", "contains ';'"),
        ("a!b", "contains '!'"),
        (" a", "begins or ends with a blank"),
        ("a\tb", "contains a tab"),
        ("", "is empty"),
    ],
)
def test_a_host_name_neither_server_can_carry_is_refused(host: str, reason: str) -> None:
    with pytest.raises(UsageError, match=reason):
        render("icinga", settings(), pairs(), Request(host))


def test_a_template_that_puts_a_semicolon_into_names_is_refused() -> None:
    # replicate could never submit a result to such a service (';' splits the command).
    cfg = settings("service_template = zettabee {check};{fs}\n", path="/srv/zb.ini")
    with pytest.raises(ConfigError) as info:
        render("nagios", cfg, pairs(cfg=cfg), Request("backup1"))
    assert str(info.value.problems[0]) == (
        "/srv/zb.ini: service name 'zettabee lag;backup/data' (service_template) "
        "contains ';', which Nagios or Icinga refuse in names"
    )


def test_services_that_would_share_a_name_are_refused_with_both_lines() -> None:
    text = "src:tank/a  localhost:backup/data\nsrc:tank/b  otherhost:backup/data\n"
    with pytest.raises(ConfigError) as info:
        render("icinga", settings(), pairs(text), Request("backup1"))
    assert [str(p) for p in info.value.problems] == [
        "/etc/zettabee/zettabee.cfg:2: otherhost:backup/data: its lag service "
        "'zettabee lag backup/data' is also that of localhost:backup/data (line 1); "
        "service_template must tell them apart, e.g. with {destination}",
        "/etc/zettabee/zettabee.cfg:2: otherhost:backup/data: its runtime service "
        "'zettabee runtime backup/data' is also that of localhost:backup/data (line 1); "
        "service_template must tell them apart, e.g. with {destination}",
    ]


def test_two_pairs_on_one_file_system_are_named_by_fingerprint_for_the_plugins() -> None:
    cfg = settings("service_template = zettabee {check} {destination}\n")
    loaded = pairs("src:tank/a  localhost:backup/data\nsrc:tank/b  otherhost:backup/data\n", cfg)
    found = monconf.services(cfg, loaded)
    assert [(s.name, s.argument) for s in found] == [
        ("zettabee lag localhost:backup/data", loaded[0].fingerprint),
        ("zettabee runtime localhost:backup/data", loaded[0].fingerprint),
        ("zettabee lag otherhost:backup/data", loaded[1].fingerprint),
        ("zettabee runtime otherhost:backup/data", loaded[1].fingerprint),
    ]


# -- paths, options --------------------------------------------------------------------


def test_the_plugins_get_the_files_only_when_not_the_defaults(tmp_path: Path) -> None:
    default = settings(path="/etc/zettabee/zettabee.ini")
    assert monconf.plugin_files(default, "/etc/zettabee/zettabee.cfg") == (None, None)
    assert monconf.plugin_files(Settings(), "/etc/zettabee/zettabee.cfg") == (None, None)
    moved = settings(path=str(tmp_path / "zb.ini"))
    assert monconf.plugin_files(moved, str(tmp_path / "p.cfg")) == (
        str(tmp_path / "zb.ini"),
        str(tmp_path / "p.cfg"),
    )


def test_paths_a_command_line_cannot_carry_are_refused() -> None:
    spaced = Request("b1", mode=ACTIVE, settings_file="/srv/my zb/zettabee.ini")
    with pytest.raises(UsageError, match="cannot go on a Nagios command line"):
        render("nagios", settings(), pairs(), spaced)
    assert "my zb" in render("icinga", settings(), pairs(), spaced)  # an argv element there
    macro = Request("b1", mode=BOTH, pair_file="/srv/$zb.cfg")
    with pytest.raises(UsageError, match="Icinga reads '\\$' as a macro"):
        render("icinga", settings(), pairs(), macro)
    # Passive services run no plugin: the paths do not matter.
    assert render("nagios", settings(), pairs(), Request("b1", settings_file="/a b"))


def test_sudo_picks_the_shipped_sudo_commands() -> None:
    request = Request("b1", mode=BOTH, host_object=False, sudo=True)
    icinga = render("icinga", settings(), pairs()[:1], request)
    assert '\tcheck_command = "zettabee_lag_sudo"\n' in icinga
    assert '\tcheck_command = "zettabee_runtime_sudo"\n' in icinga
    assert '\tvars.zettabee_lag_destination = "backup/data"\n' in icinga  # same variables
    nagios = render("nagios", settings(), pairs()[:1], request)
    assert "check_zettabee_lag_sudo!backup/data\n" in nagios
    assert "check_zettabee_runtime_sudo!backup/data\n" in nagios
    with pytest.raises(UsageError, match="--mode passive runs none"):
        render("icinga", settings(), pairs(), Request("b1", sudo=True))


def test_options_that_do_not_fit_the_mode_or_the_server_are_refused() -> None:
    with pytest.raises(UsageError, match="Nagios has no agents"):
        render("nagios", settings(), pairs(), Request("b1", mode=ACTIVE, endpoint="agent"))
    with pytest.raises(UsageError, match="in --mode active the server checks"):
        render("icinga", settings(), pairs(), Request("b1", mode=ACTIVE, freshness=3600))
    with pytest.raises(UsageError, match="one host name or IP address"):
        render("icinga", settings(), pairs(), Request("b1", address="a b"))
    assert monconf.freshness(None, None) is None
    assert monconf.freshness(900, 600) is None  # the templates' own
    assert monconf.freshness(None, 0) == 900


def test_a_host_that_replicate_does_not_submit_for_is_warned_about() -> None:
    assert monconf.host_mismatch(settings(), Request("backup1")) is None
    assert monconf.host_mismatch(settings(), Request("elsewhere", mode=ACTIVE)) is None
    warning = monconf.host_mismatch(settings(), Request("elsewhere", mode=BOTH))
    assert warning is not None and "submits its results for host 'backup1'" in warning


# -- the command -------------------------------------------------------------------------


def test_the_command_prints_the_objects_and_says_when_lines_are_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pair_file = tmp_path / "pairs.cfg"
    pair_file.write_text(PAIRS + "src:tank/x localhost:backup/x transport=carrier-pigeon\n")
    ini = tmp_path / "zettabee.ini"
    ini.write_text(f"[paths]\npairs = {pair_file}\n[monitoring]\nhost_name = backup1\n")

    code = cli.main(["--settings", str(ini), "nagios-config", "--mode", "active", "data"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED
    assert "transport" in err and "carrier-pigeon" in err
    cfg = load_settings(str(ini))
    expected = Request("backup1", mode=ACTIVE, settings_file=str(ini))
    assert out == render("nagios", cfg, pairs(PAIRS, cfg)[:1], expected)

    code = cli.main(["--settings", str(ini), "icinga-config", "--host", "other"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED
    assert "submits its results for host 'backup1'" in err
    assert 'object Host "other" {' in out
    assert out.count("object Service") == 4


def test_the_command_refuses_a_mode_it_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["icinga-config", "--mode", "sometimes"])
    assert info.value.code == cli.EXIT_USAGE
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


def test_per_child_adds_the_services_of_a_recursive_lines_children(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pair_file = tmp_path / "pairs.cfg"
    pair_file.write_text("src:tank/home localhost:backup/home recursive=yes\n")
    ini = tmp_path / "zettabee.ini"
    ini.write_text(
        f"[paths]\npairs = {pair_file}\nstate_dir = {tmp_path}\n[monitoring]\nhost_name = backup1\n"
    )
    (line,) = pairs(pair_file.read_text(), load_settings(str(ini)))
    tree.save(tmp_path, tree.Tree(line, [line, tree.child(line, "alice"), tree.child(line, "bob")]))

    argv = ["--settings", str(ini), "icinga-config", "--mode", "active"]
    assert cli.main(argv) == cli.EXIT_OK
    assert capsys.readouterr().out.count("object Service") == 2  # the line's own two

    assert cli.main([*argv, "--per-child"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.count("object Service") == 6
    for fs in ("backup/home", "backup/home/alice", "backup/home/bob"):
        assert f'\tvars.zettabee_lag_destination = "{fs}"' in out
        assert f'\tvars.zettabee_runtime_destination = "{fs}"' in out

    code = cli.main(["--settings", str(ini), "icinga-config", "--per-child"])
    assert code == cli.EXIT_USAGE
    assert "--per-child goes with --mode active" in capsys.readouterr().err
