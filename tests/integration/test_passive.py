"""Passive submission against the real daemons: nsca 2.10, send_nsca, the Icinga 2 API."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from lab.icinga import LAB_HOST, LAB_OTHER_HOST, LAB_SERVICES, NO_PASSIVE_SERVICE, Icinga2Daemon
from lab.nscad import CommandLine, NscaDaemon, free_port
from nsca.backends import make_backend
from nsca.client import TRUNCATION_MARKER, Encryption, NscaClient
from nsca.errors import NscaError, SubmitError
from nsca.icinga2api import Icinga2ApiBackend, Icinga2ApiError
from nsca.result import PassiveResult
from nsca.sendnsca import SendNscaBackend
from nsca.spool import Spool

pytestmark = pytest.mark.integration

LAG = PassiveResult(
    "backup1",
    "zettabee tank/data",
    1,
    "WARNING - tank/data lag 2h 0m",
    ["lag=7200s;3600;7200;0", "'last run'=42s"],
)


def client_for(daemon: NscaDaemon, **changes: object) -> NscaClient:
    options: dict[str, object] = {
        "password": daemon.password,
        "encryption": Encryption(daemon.decryption),
        "timeout": 5.0,
    }
    options.update(changes)
    return NscaClient(daemon.host, daemon.port, **options)  # type: ignore[arg-type]


def assert_arrived(line: CommandLine, result: PassiveResult) -> None:
    assert (line.host, line.service, line.code) == (result.host, result.service, result.code)
    # nsca >= 2.10.1 escapes newlines in the command file; Nagios and Icinga unescape them.
    assert line.output == result.plugin_output().replace("\\", "\\\\").replace("\n", "\\n")


# nsca, our client --------------------------------------------------------------------------


def test_xor_with_password_arrives_intact(nscad: NscaDaemon) -> None:
    assert nscad.decryption == 1 and nscad.password
    client_for(nscad).send([LAG])
    [line] = nscad.wait_for(1)
    assert_arrived(line, LAG)
    assert line.raw.endswith(
        "PROCESS_SERVICE_CHECK_RESULT;backup1;zettabee tank/data;1;"
        "WARNING - tank/data lag 2h 0m | lag=7200s;3600;7200;0 'last run'=42s"
    )
    assert abs(line.timestamp - time.time()) < 60


def test_no_encryption_arrives_intact(nscad_plain: NscaDaemon) -> None:
    client_for(nscad_plain).send([LAG])
    [line] = nscad_plain.wait_for(1)
    assert_arrived(line, LAG)


def test_multiline_output_and_host_check(nscad: NscaDaemon) -> None:
    long_output = PassiveResult("backup1", "zettabee tank/home", 2, "CRITICAL - x\nstderr: boom")
    host = PassiveResult("backup1", None, 2, "DOWN - unreachable")
    client_for(nscad).send([long_output, host])
    first, second = nscad.wait_for(2)
    assert_arrived(first, long_output)
    assert first.output == "CRITICAL - x\\nstderr: boom"
    assert (second.host, second.service, second.code) == ("backup1", None, 1)  # DOWN
    assert "PROCESS_HOST_CHECK_RESULT;backup1;1;DOWN - unreachable" in second.raw


def test_a_batch_of_150_travels_on_one_connection(nscad: NscaDaemon) -> None:
    batch = [
        PassiveResult(f"host{i % 7}", f"zettabee pool/fs{i}", i % 4, f"result {i}", [f"lag={i}s"])
        for i in range(150)
    ]
    assert client_for(nscad).send(batch) == 150
    lines = nscad.wait_for(150)
    assert len(lines) == 150
    for line, result in zip(lines, batch, strict=True):
        assert_arrived(line, result)
    if nscad.syslog_captured:
        connections = [m for m in nscad.syslog() if "Connection from 127.0.0.1" in m]
        assert len(connections) == 1


def test_long_output_is_truncated_with_a_marker_and_perfdata_kept(nscad: NscaDaemon) -> None:
    big = PassiveResult("backup1", "zettabee tank/data", 0, "OK " + "x" * 6000, ["lag=1s;2;3"])
    client_for(nscad).send([big])
    [line] = nscad.wait_for(1)
    assert TRUNCATION_MARKER + " | lag=1s;2;3" in line.output
    assert len(line.output.encode()) == 4095


def test_legacy_720_byte_packets_are_accepted(nscad: NscaDaemon) -> None:
    results = [PassiveResult("backup1", f"legacy {i}", 0, f"old server {i}") for i in range(3)]
    client_for(nscad, legacy=True).send(results)
    lines = nscad.wait_for(3)
    assert [(line.service, line.output) for line in lines] == [
        (f"legacy {i}", f"old server {i}") for i in range(3)
    ]


def test_wrong_password_is_silent_for_the_sender_and_nothing_arrives(nscad: NscaDaemon) -> None:
    """NSCA never acknowledges: the only trace is in the server's syslog.

    The client returns normally (there is nothing it could detect), no command line is
    written, and nsca logs the "wrong password or crypto algorithm?" message. This is the
    documented limit of NSCA (see nsca.client); the Icinga 2 API back end reports a 401.
    """
    sent = client_for(nscad, password="not-the-password").send([LAG])
    assert sent == 1  # no exception, "success"
    message = nscad.wait_for_syslog("wrong password", timeout=5)
    time.sleep(0.5)
    assert nscad.lines() == []
    if nscad.syslog_captured:
        assert message is not None
        assert "Received invalid packet type/version from client" in message
    # A correct client afterwards still gets through: the daemon only dropped that packet.
    client_for(nscad).send([LAG])
    assert len(nscad.wait_for(1)) == 1


def test_encryption_mismatch_is_just_as_silent(nscad_plain: NscaDaemon) -> None:
    client_for(nscad_plain, encryption=Encryption.XOR, password="x").send([LAG])
    if nscad_plain.syslog_captured:
        assert nscad_plain.wait_for_syslog("wrong password", timeout=5)
    else:
        time.sleep(1)
    assert nscad_plain.lines() == []


def test_refused_connection_is_a_transient_submit_error(nscad: NscaDaemon) -> None:
    nscad.stop()
    backend = make_backend(
        "nsca", {"host": nscad.host, "port": str(nscad.port), "password": nscad.password}
    )
    with pytest.raises(SubmitError) as info:
        backend.submit([LAG])
    assert isinstance(info.value, NscaError)
    assert info.value.transient
    assert f"{nscad.host}:{nscad.port} refused" in str(info.value)
    assert "is nsca running" in str(info.value)
    assert nscad.password not in str(info.value) + repr(info.value) + repr(backend)


def test_make_backend_nsca_end_to_end(nscad: NscaDaemon) -> None:
    backend = make_backend(
        "nsca",
        {"host": nscad.host, "port": str(nscad.port), "password": nscad.password, "timeout": "5"},
    )
    backend.submit([LAG])
    assert_arrived(nscad.wait_for(1)[0], LAG)


# send_nsca ---------------------------------------------------------------------------------


def send_nsca_backend(
    daemon: NscaDaemon, binary: str, tmp_path: Path, **kw: str
) -> SendNscaBackend:
    config = daemon.write_send_nsca_config(tmp_path / "send_nsca.cfg", **kw)
    return SendNscaBackend(daemon.host, daemon.port, binary=binary, config=str(config), timeout=5)


def test_send_nsca_backend_delivers_etb_separated_results(
    nscad: NscaDaemon, send_nsca_binary: str, tmp_path: Path
) -> None:
    backend = send_nsca_backend(nscad, send_nsca_binary, tmp_path)
    assert nscad.password not in " ".join(backend.argv())
    batch = [
        LAG,
        PassiveResult("backup1", "zettabee tank/home", 2, "CRITICAL - failed\nzfs: no space"),
        PassiveResult("backup1", None, 0, "UP"),
        PassiveResult("backup1", "zettabee tabs", 0, "tab\tinside | not perfdata"),
    ]
    backend.submit(batch)
    lines = nscad.wait_for(4)
    assert len(lines) == 4
    assert_arrived(lines[0], batch[0])
    assert_arrived(lines[1], batch[1])
    assert (lines[2].host, lines[2].service, lines[2].code) == ("backup1", None, 0)
    assert lines[3].output == "tab\tinside | not perfdata"


def test_send_nsca_and_our_client_write_the_same_lines(
    nscad: NscaDaemon, send_nsca_binary: str, tmp_path: Path
) -> None:
    batch = [LAG, PassiveResult("h2", "s2", 3, "UNKNOWN - what\nmore", ["a=1"])]
    send_nsca_backend(nscad, send_nsca_binary, tmp_path).submit(batch)
    theirs = [line.raw.split("] ", 1)[1] for line in nscad.wait_for(2)]
    nscad.clear()
    client_for(nscad).send(batch)
    ours = [line.raw.split("] ", 1)[1] for line in nscad.wait_for(2)]
    assert ours == theirs


def test_send_nsca_wrong_password_also_claims_success(
    nscad: NscaDaemon, send_nsca_binary: str, tmp_path: Path
) -> None:
    backend = send_nsca_backend(nscad, send_nsca_binary, tmp_path, password="wrong")
    backend.submit([LAG])  # exit 0, "1 data packet(s) sent to host successfully."
    if nscad.syslog_captured:
        assert nscad.wait_for_syslog("wrong password", timeout=5)
    else:
        time.sleep(1)
    assert nscad.lines() == []


def test_send_nsca_refused_is_transient_with_its_own_words(
    send_nsca_binary: str, tmp_path: Path
) -> None:
    config = tmp_path / "send_nsca.cfg"
    config.write_text("encryption_method=0\n")
    backend = SendNscaBackend("127.0.0.1", free_port(), binary=send_nsca_binary, config=str(config))
    with pytest.raises(SubmitError) as info:
        backend.submit([LAG])
    assert info.value.transient
    assert "exited 2" in str(info.value)
    assert "Could not connect to host 127.0.0.1" in str(info.value)


def test_send_nsca_bad_config_is_permanent(nscad: NscaDaemon, send_nsca_binary: str) -> None:
    backend = SendNscaBackend(
        nscad.host, nscad.port, binary=send_nsca_binary, config="/nonexistent/send_nsca.cfg"
    )
    with pytest.raises(SubmitError) as info:
        backend.submit([LAG])
    assert not info.value.transient
    assert "Could not open config file '/nonexistent/send_nsca.cfg'" in str(info.value)


def test_send_nsca_missing_binary(tmp_path: Path) -> None:
    backend = SendNscaBackend("127.0.0.1", 5667, binary=str(tmp_path / "send_nsca"))
    with pytest.raises(SubmitError, match="not found: install the nsca-client package"):
        backend.submit([LAG])


# Icinga 2 API ------------------------------------------------------------------------------


def api_backend(icinga: Icinga2Daemon, **changes: object) -> Icinga2ApiBackend:
    options: dict[str, object] = {
        "user": icinga.submitter.name,
        "password": icinga.submitter.password,
        "cafile": str(icinga.cafile),
        "timeout": 10.0,
    }
    options.update(changes)
    url = str(options.pop("url", icinga.url))
    return Icinga2ApiBackend(url, **options)  # type: ignore[arg-type]


def test_icinga_api_result_reads_back(icinga2_lab: Icinga2Daemon) -> None:
    result = PassiveResult(
        LAB_HOST, LAB_SERVICES[0], 1, "WARNING - lag 2h\nlast run 03:00", ["lag=7200s;3600;7200;0"]
    )
    backend = make_backend(
        "icinga2-api",
        {
            "url": icinga2_lab.url,
            "user": icinga2_lab.submitter.name,
            "password": str(icinga2_lab.submitter.password),
            "cafile": str(icinga2_lab.cafile),
            "ttl": "7200",
            "check_source": "backup1.example",
        },
    )
    backend.submit([result])
    state = icinga2_lab.query_service(LAB_HOST, LAB_SERVICES[0])
    assert state["state"] == 1
    assert state["output"] == "WARNING - lag 2h\nlast run 03:00"
    assert state["performance_data"] == ["lag=7200s;3600;7200;0"]
    assert state["check_source"] == "backup1.example"
    assert state["ttl"] == 7200

    api_backend(icinga2_lab).submit([PassiveResult(LAB_HOST, LAB_SERVICES[0], 0, "OK - lag 5m")])
    state = icinga2_lab.query_service(LAB_HOST, LAB_SERVICES[0])
    assert (state["state"], state["output"], state["performance_data"]) == (0, "OK - lag 5m", [])


def test_icinga_api_batch_uses_one_kept_alive_connection(icinga2_lab: Icinga2Daemon) -> None:
    batch = [
        PassiveResult(LAB_HOST, LAB_SERVICES[i % 3], i % 4, f"batch {i}", [f"i={i}"])
        for i in range(300)
    ]
    log_before = len(icinga2_lab.console_log.read_text())
    api_backend(icinga2_lab).submit(batch)
    deadline = time.monotonic() + 30  # icinga2 writes its log a little after it answers
    while True:
        log = icinga2_lab.console_log.read_text()[log_before:]
        done = log.count("agent: zettabee-passive/1, status: OK") >= 300
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert log.count("New client connection from [127.0.0.1]") == 1
    assert log.count("agent: zettabee-passive/1, status: OK") == 300
    for service in LAB_SERVICES:
        last = next(r for r in reversed(batch) if r.service == service)
        state = icinga2_lab.query_service(LAB_HOST, service)
        assert (state["state"], state["output"]) == (last.code, last.output)


def test_icinga_api_host_result(icinga2_lab: Icinga2Daemon) -> None:
    api_backend(icinga2_lab).submit([PassiveResult(LAB_OTHER_HOST, None, 2, "DOWN - gone")])
    state = icinga2_lab.query_host(LAB_OTHER_HOST)
    assert (state["state"], state["output"]) == (1, "DOWN - gone")


def test_icinga_api_unknown_service_is_named_and_rejected(icinga2_lab: Icinga2Daemon) -> None:
    good = PassiveResult(LAB_HOST, LAB_SERVICES[1], 2, "CRITICAL - first")
    unknown = PassiveResult(LAB_HOST, "zettabee no/such", 0, "OK")
    with pytest.raises(Icinga2ApiError) as info:
        api_backend(icinga2_lab).submit([unknown, good])
    error = info.value
    assert error.status == 404 and not error.transient
    assert f"no Service object '{LAB_HOST}!zettabee no/such'" in str(error)
    assert error.rejected == (unknown,) and error.undelivered == (unknown,)
    # The known service behind it was still delivered.
    assert icinga2_lab.query_service(LAB_HOST, LAB_SERVICES[1])["output"] == "CRITICAL - first"


def test_icinga_api_missing_permission(icinga2_lab: Icinga2Daemon) -> None:
    """Icinga 2.14+ answers 403; 2.13 (Debian 12) answers 404 "No objects found." whose
    diagnostic says "Missing permission". Both give the same message."""
    user = icinga2_lab.user("no-permission")
    backend = api_backend(icinga2_lab, user=user.name, password=user.password)
    with pytest.raises(Icinga2ApiError) as info:
        backend.submit([PassiveResult(LAB_HOST, LAB_SERVICES[2], 0, "OK")])
    error = info.value
    assert error.status in (403, 404)
    assert "ApiUser 'no-permission' lacks the permission actions/process-check-result" in str(error)
    assert not error.transient and not error.rejected


def test_icinga_api_passive_checks_disabled(icinga2_lab: Icinga2Daemon) -> None:
    with pytest.raises(Icinga2ApiError) as info:
        api_backend(icinga2_lab).submit([PassiveResult(LAB_HOST, NO_PASSIVE_SERVICE, 0, "OK")])
    assert info.value.status == 403
    assert "passive checks are disabled" in str(info.value)
    assert info.value.rejected


def test_icinga_api_wrong_password_is_401(icinga2_lab: Icinga2Daemon) -> None:
    backend = api_backend(icinga2_lab, password="not-it")
    with pytest.raises(Icinga2ApiError) as info:
        backend.submit([PassiveResult(LAB_HOST, LAB_SERVICES[2], 0, "OK")])
    assert info.value.status == 401
    assert "refused the credentials of ApiUser 'submitter'" in str(info.value)
    assert "not-it" not in str(info.value)


def test_icinga_api_client_certificate(icinga2_lab: Icinga2Daemon) -> None:
    client_cn = icinga2_lab.user("cert-user").client_cn
    assert client_cn
    cert, key = icinga2_lab.make_client_cert(client_cn)
    backend = api_backend(
        icinga2_lab, user=None, password=None, certfile=str(cert), keyfile=str(key)
    )
    backend.submit([PassiveResult(LAB_HOST, LAB_SERVICES[2], 3, "UNKNOWN - by cert")])
    assert icinga2_lab.query_service(LAB_HOST, LAB_SERVICES[2])["output"] == "UNKNOWN - by cert"


def test_icinga_api_tls_verification_failures(icinga2_lab: Icinga2Daemon) -> None:
    result = PassiveResult(LAB_HOST, LAB_SERVICES[2], 0, "OK")
    by_ip = api_backend(icinga2_lab, url=icinga2_lab.url.replace("localhost", "127.0.0.1"))
    with pytest.raises(Icinga2ApiError, match="TLS verification of https://127.0.0.1:.* failed"):
        by_ip.submit([result])
    no_ca = api_backend(icinga2_lab, cafile=None)
    with pytest.raises(Icinga2ApiError) as info:
        no_ca.submit([result])
    assert "self-signed certificate in certificate chain" in str(info.value)
    assert "system CA store" in str(info.value)
    assert not info.value.transient


def test_icinga_api_refused_is_transient() -> None:
    backend = Icinga2ApiBackend(f"https://localhost:{free_port()}", user="u", password="p")
    with pytest.raises(SubmitError) as info:
        backend.submit([LAG])
    assert info.value.transient
    assert "refused: is icinga2 running" in str(info.value)


# the spool against the real daemons --------------------------------------------------------


def test_daemon_down_spools_and_daemon_up_flushes_oldest_first(
    nscad: NscaDaemon, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    backend = make_backend(
        "nsca", {"host": nscad.host, "port": str(nscad.port), "password": nscad.password}
    )
    nscad.stop()
    for run in range(3):  # three cron runs while the daemon is down
        batch = [PassiveResult("backup1", f"pair{i}", run % 4, f"run {run}") for i in range(2)]
        with pytest.raises(SubmitError) as info:
            backend.submit(batch)
        assert info.value.transient
        spool.put(backend.name, batch)
    report = spool.flush(backend.name, backend)
    assert report.delivered == 0 and report.remaining == 6 and report.error is not None

    nscad.start()
    report = spool.flush(backend.name, backend)
    assert (report.delivered, report.remaining, report.complete) == (6, 0, True)
    lines = nscad.wait_for(6)
    assert [(line.service, line.output) for line in lines] == [
        (f"pair{i}", f"run {run}") for run in range(3) for i in range(2)
    ]


def _flush_child(spool_dir: str, host: str, port: int, password: str) -> None:
    backend = make_backend("nsca", {"host": host, "port": str(port), "password": password})
    Spool(spool_dir).flush(backend.name, backend, batch_size=5)


def test_two_processes_flushing_at_once_deliver_each_result_once(
    nscad: NscaDaemon, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.put("nsca", [PassiveResult("backup1", f"s{i}", 0, f"n{i}") for i in range(200)])
    ctx = multiprocessing.get_context("fork")
    args = (str(tmp_path / "spool"), nscad.host, nscad.port, nscad.password)
    children = [ctx.Process(target=_flush_child, args=args) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    # Whoever lost the lock backed off; whatever is left (nothing, normally) goes now.
    backend = make_backend(
        "nsca", {"host": nscad.host, "port": str(nscad.port), "password": nscad.password}
    )
    spool.flush("nsca", backend)
    lines = nscad.wait_for(200)
    assert sorted(line.service or "" for line in lines) == sorted(f"s{i}" for i in range(200))
    assert spool.count("nsca") == 0


def test_icinga_spool_drops_rejected_and_delivers_the_rest(
    icinga2_lab: Icinga2Daemon, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    backend = api_backend(icinga2_lab)
    spool.put(
        backend.name,
        [
            PassiveResult(LAB_HOST, "zettabee gone", 0, "OK"),
            PassiveResult(LAB_HOST, LAB_SERVICES[1], 1, "WARNING - from the spool"),
        ],
    )
    report = spool.flush(backend.name, backend)
    assert (report.delivered, report.rejected, report.remaining) == (1, 1, 0)
    assert icinga2_lab.query_service(LAB_HOST, LAB_SERVICES[1])["output"] == (
        "WARNING - from the spool"
    )


def test_icinga_down_keeps_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    backend = Icinga2ApiBackend(f"https://localhost:{free_port()}", user="u", password="p")
    spool.put(backend.name, [LAG])
    report = spool.flush(backend.name, backend)
    assert report.remaining == 1 and report.error is not None and report.error.transient


def test_lab_daemons_stop_exactly_what_they_started(nscad: NscaDaemon) -> None:
    pid = nscad.pid
    assert pid is not None
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "nsca"  # the daemon itself
    nscad.stop()
    assert not Path(f"/proc/{pid}").exists()  # signalled, waited for, reaped
