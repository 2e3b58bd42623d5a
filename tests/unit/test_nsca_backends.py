"""PassiveResult, back-end construction from config strings, and each back end's wire form."""

from __future__ import annotations

import pytest

from nsca.backends import BackendConfigError, NscaBackend, make_backend
from nsca.client import Encryption
from nsca.errors import SubmitError
from nsca.icinga2api import Icinga2ApiBackend, request_body
from nsca.result import PassiveResult
from nsca.sendnsca import SendNscaBackend, format_record, format_stdin

# PassiveResult -----------------------------------------------------------------------------


def test_plugin_output_joins_perfdata_after_the_first_line() -> None:
    r = PassiveResult("h", "s", 0, "OK - fine", ["a=1", "b=2s;3;4"])
    assert r.plugin_output() == "OK - fine | a=1 b=2s;3;4"
    multi = PassiveResult("h", "s", 2, "CRITICAL - x\ndetail 1\ndetail 2", ["a=1"])
    assert multi.plugin_output() == "CRITICAL - x | a=1\ndetail 1\ndetail 2"
    assert PassiveResult("h", None, 0, "up").plugin_output() == "up"


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"code": 4}, "not a plugin state"),
        ({"code": -1}, "not a plugin state"),
        ({"code": True}, "not an integer"),
        ({"host": ""}, "host name is empty"),
        ({"host": "a\tb"}, "control character"),
        ({"host": "a\nb"}, "control character"),
        ({"service": "x;y"}, "control character or ';'"),
        ({"service": ""}, "use None for a host check"),
        ({"output": "  "}, "output is empty"),
        ({"output": "a\x17b"}, "NUL or ETB"),
        ({"perfdata": ["a=1|b"]}, "perfdata item"),
        ({"perfdata": ["a=1\n"]}, "perfdata item"),
    ],
)
def test_invalid_results_are_refused(fields: dict[str, object], complaint: str) -> None:
    base: dict[str, object] = {"host": "h", "service": "s", "code": 0, "output": "OK"}
    base.update(fields)
    with pytest.raises(ValueError, match=complaint):
        PassiveResult(**base)  # type: ignore[arg-type]


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as info:
        PassiveResult("a\tb", "c\nd", 9, "")
    text = str(info.value)
    assert "host name" in text and "service name" in text and "code 9" in text
    assert "output is empty" in text


def test_result_is_frozen_hashable_and_owns_its_perfdata() -> None:
    perf = ["a=1"]
    r = PassiveResult("h", "s", 0, "OK", perf)
    perf.append("b=2")
    assert r.perfdata == ["a=1"]
    assert hash(r) == hash(PassiveResult("h", "s", 0, "OK", ["a=1"]))
    with pytest.raises(AttributeError):
        r.code = 2  # type: ignore[misc]
    assert PassiveResult.from_dict(r.to_dict()) == r


def test_host_state_mapping() -> None:
    assert [PassiveResult("h", None, c, "x").host_state() for c in range(4)] == [0, 0, 1, 1]


# make_backend ------------------------------------------------------------------------------


def test_nsca_defaults() -> None:
    backend = make_backend("nsca", {"host": "mon1", "password": "pw"})
    assert isinstance(backend, NscaBackend)
    client = backend.client
    assert (client.host, client.port, client.encryption, client.legacy, client.timeout) == (
        "mon1",
        5667,
        Encryption.XOR,
        False,
        10.0,
    )


def test_nsca_options_parsed() -> None:
    backend = make_backend(
        "nsca",
        {"host": "mon1", "port": "5700", "encryption": "none", "legacy": "yes", "timeout": "3"},
    )
    assert isinstance(backend, NscaBackend)
    assert backend.client.port == 5700
    assert backend.client.encryption is Encryption.NONE
    assert backend.client.legacy is True
    assert backend.client.timeout == 3.0


def test_every_bad_key_is_listed_and_secrets_never_shown() -> None:
    with pytest.raises(BackendConfigError) as info:
        make_backend(
            "nsca",
            {
                "port": "99999",
                "encryption": "3des",
                "legacy": "maybe",
                "colour": "red",
                "timeout": "0",
            },
        )
    problems = info.value.problems
    text = str(info.value)
    assert len(problems) == 6, problems
    for word in (
        "'colour'",
        "'host' is required",
        "'port'",
        "'encryption'",
        "'legacy'",
        "'timeout'",
    ):
        assert word in text


def test_secret_values_do_not_leak_from_errors_or_repr() -> None:
    with pytest.raises(BackendConfigError) as info:
        make_backend("icinga2-api", {"url": "http://x", "password": "hunter2"})
    assert "hunter2" not in str(info.value)
    assert "must start with https://" in str(info.value)
    assert "'user' and 'password' go together" in str(info.value)
    backend = make_backend("nsca", {"host": "mon1", "password": "hunter2"})
    assert "hunter2" not in repr(backend)
    api = make_backend(
        "icinga2-api", {"url": "https://mon1:5665", "user": "zb", "password": "hunter2"}
    )
    assert isinstance(api, Icinga2ApiBackend)
    assert "hunter2" not in repr(api) and "hunter2" not in str(vars(api).get("url"))


def test_icinga_needs_credentials() -> None:
    with pytest.raises(BackendConfigError, match="no credentials"):
        make_backend("icinga2-api", {"url": "https://mon1:5665"})


def test_icinga_options_parsed() -> None:
    api = make_backend(
        "icinga2-api",
        {
            "url": "https://mon1:5665/",
            "user": "zb",
            "password": "pw",
            "ttl": "7200",
            "check_source": "backup1",
            "timeout": "5",
        },
    )
    assert isinstance(api, Icinga2ApiBackend)
    assert api.url == "https://mon1:5665"
    assert (api.ttl, api.check_source, api.timeout) == (7200, "backup1", 5.0)


def test_icinga_unreadable_cafile_is_a_config_error() -> None:
    with pytest.raises(BackendConfigError, match="cannot load the TLS files"):
        make_backend(
            "icinga2-api",
            {"url": "https://mon1:5665", "user": "u", "password": "p", "cafile": "/nonexistent"},
        )


def test_send_nsca_defaults_and_argv_carries_no_secret() -> None:
    backend = make_backend("send_nsca", {"host": "mon1"})
    assert isinstance(backend, SendNscaBackend)
    assert backend.argv() == [
        "/usr/sbin/send_nsca",
        "-H",
        "mon1",
        "-p",
        "5667",
        "-to",
        "10",
        "-c",
        "/etc/send_nsca.cfg",
    ]
    with pytest.raises(BackendConfigError, match="unknown option 'password'"):
        make_backend("send_nsca", {"host": "mon1", "password": "x"})


def test_unknown_kind() -> None:
    with pytest.raises(BackendConfigError, match="unknown back end"):
        make_backend("carrier-pigeon", {})


# wire forms --------------------------------------------------------------------------------


def test_send_nsca_records() -> None:
    service = PassiveResult("h1", "svc", 2, "CRIT\nline 2", ["a=1"])
    host = PassiveResult("h1", None, 2, "down")
    assert format_record(service) == "h1\tsvc\t2\tCRIT | a=1\nline 2"
    assert format_record(host) == "h1\t1\tdown"
    assert format_stdin([service, host]) == b"h1\tsvc\t2\tCRIT | a=1\nline 2\x17h1\t1\tdown\n"


def test_send_nsca_output_is_cut_to_what_send_nsca_keeps() -> None:
    record = format_record(PassiveResult("h", "s", 0, "x" * 9000, ["a=1"]))
    output = record.split("\t", 3)[3]
    assert len(output.encode()) == 4095 and output.endswith("[truncated] | a=1")


def test_send_nsca_refuses_percent_in_config_path() -> None:
    with pytest.raises(ValueError, match="'%'"):
        SendNscaBackend("mon1", config="/etc/%s.cfg")


def test_icinga_body_for_a_service() -> None:
    r = PassiveResult("backup1", "zettabee tank/data", 1, "WARNING - lag", ["lag=1s"])
    assert request_body(r, ttl=3600, check_source="backup1") == {
        "type": "Service",
        "service": "backup1!zettabee tank/data",
        "exit_status": 1,
        "plugin_output": "WARNING - lag",
        "performance_data": ["lag=1s"],
        "check_source": "backup1",
        "ttl": 3600,
    }


def test_icinga_body_carries_the_time_the_result_was_measured() -> None:
    r = PassiveResult("backup1", "zettabee tank/data", 0, "OK - lag", measured_at=1796190000.5)
    body = request_body(r)
    assert (body["execution_start"], body["execution_end"]) == (1796190000.5, 1796190000.5)
    assert "execution_end" not in request_body(PassiveResult("backup1", "s", 0, "OK"))


@pytest.mark.parametrize("when", [0, -5.0, float("nan"), float("inf"), "noon", True])
def test_a_measurement_time_that_is_no_unix_time_is_refused(when: object) -> None:
    with pytest.raises(ValueError, match="is not a Unix time"):
        PassiveResult("backup1", "s", 0, "OK", measured_at=when)  # type: ignore[arg-type]


def test_icinga_body_for_a_host_uses_host_states() -> None:
    body = request_body(PassiveResult("backup1", None, 2, "down"))
    assert body == {"type": "Host", "host": "backup1", "exit_status": 1, "plugin_output": "down"}


@pytest.mark.parametrize(("host", "service"), [("h!x", "s"), ("h", "odd!name"), ("h!x", None)])
def test_icinga_names_with_a_bang_are_refused(host: str, service: str | None) -> None:
    # Icinga: "Object names may not contain '!'"; such an object cannot exist.
    with pytest.raises(ValueError, match="may not contain '!'"):
        request_body(PassiveResult(host, service, 0, "ok"))


def test_submit_error_names_the_back_end() -> None:
    error = SubmitError("nsca", "went wrong", transient=True)
    assert str(error) == "nsca: went wrong" and error.transient
