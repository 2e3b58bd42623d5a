"""Icinga 2 end to end on the lab: the real plugins through the shipped CheckCommands, and
replicate's passive results, for the services that ``zettabee icinga-config`` printed.

The daemon runs the plugins the way a packaged one does: from its plugin directory
(``PluginDir``, where the README has them linked), with the environment systemd gives
it and nothing from the test's shell, so the generated objects must tell the plugins
which settings to read. Every state is read back through the API.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.icinga import ICINGA2_BINARY, SERVICE_ENVIRONMENT, ApiUser, Icinga2Daemon
from lab.zfslab import test_lab_name as lab_name
from tests.conftest import Zb, executable

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ICINGA_CONF = REPO / "icinga-conf" / "icinga2"
PLUGINS = ("check_zettabee_lag", "check_zettabee_runtime")
HOST = "zb-e2e"
CHECK_SOURCE = "replicate on the lab"
OPERATOR = ApiUser("operator", "operator-secret", ("actions/reschedule-check",))

# Services of the admin's own, from the shipped template and command, with thresholds
# that an hour-old lab pair cannot meet.
TINY_THRESHOLDS = """
object Service "lag over a tiny warning" {{
	host_name = "{host}"
	import "zettabee-active-service"
	check_command = "zettabee_lag"
	vars.zettabee_lag_destination = "{fs}"
	vars.zettabee_lag_settings = "{settings}"
	vars.zettabee_lag_warning = 1
	vars.zettabee_lag_critical = 1h
}}

object Service "lag over a tiny critical" {{
	host_name = "{host}"
	import "zettabee-active-service"
	check_command = "zettabee_lag"
	vars.zettabee_lag_destination = "{fs}"
	vars.zettabee_lag_settings = "{settings}"
	vars.zettabee_lag_critical = "1"
}}
"""


def plugin_dir(root: Path) -> Path:
    """The plugins linked into a plugin directory, as icinga-conf/README.md installs them."""
    directory = root / "plugins"
    directory.mkdir(mode=0o755)
    for name in PLUGINS:
        installed = executable(name)
        if len(installed) != 1:
            pytest.skip(f"{name} is not installed as a command (make deps)")
        (directory / name).symlink_to(installed[0])
    return directory


def icinga_objects(zb: Zb, plugins: Path, generated: str) -> str:
    fs = zb.dst_fs()
    return "\n".join(
        [
            f'const PluginDir = "{plugins}"',
            (ICINGA_CONF / "commands.conf").read_text(),
            (ICINGA_CONF / "templates.conf").read_text(),
            'template Host "lab-host" {\n\tcheck_command = "dummy"\n}\n',
            generated,
            TINY_THRESHOLDS.format(host=HOST, fs=fs, settings=zb.settings),
        ]
    )


def api_settings(icinga: Icinga2Daemon) -> str:
    return (
        f"[monitoring]\nhost_name = {HOST}\npassive = icinga2-api\n\n"
        f"[icinga2-api]\nurl = {icinga.url}\nuser = {icinga.submitter.name}\n"
        f"password = {icinga.submitter.password}\ncafile = {icinga.cafile}\n"
        f"check_source = {CHECK_SOURCE}\n"
    )


@pytest.fixture
def pair(zb: Zb) -> Iterator[Zb]:
    zb.write_settings(f"[monitoring]\nhost_name = {HOST}\n")
    zb.make_source("data", 2)
    zb.write_pairs(zb.pair_line("data", "wlag=1h,clag=2h,wrun=1h,crun=2h"))
    out = zb.run("initialize", zb.dst_fs())
    assert out.returncode == 0, out.stderr
    yield zb


def wait_for_lag(zb: Zb, seconds: int) -> None:
    """Until the pair's lag is at least ``seconds``: the tiny thresholds must be exceeded."""
    deadline = time.monotonic() + 30
    while True:
        status = zb.run("status", "--json", zb.dst_fs())
        assert status.returncode == 0, status.stderr
        lag = json.loads(status.stdout)[0]["lag"]
        if lag is not None and lag >= seconds:
            return
        assert time.monotonic() < deadline, f"lag stuck at {lag}"
        time.sleep(0.5)


def checked(icinga: Icinga2Daemon, service: str, since: float) -> dict[str, Any]:
    """The service's first active check result after ``since``, forced now."""
    status, answer = icinga.api(
        "POST",
        "/v1/actions/reschedule-check",
        {"type": "Service", "service": f"{HOST}!{service}", "force": True},
        user=OPERATOR,
    )
    assert status == 200, answer
    return result_after(icinga, service, since, active=True)


def result_after(icinga: Icinga2Daemon, service: str, since: float, active: bool) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        found = icinga.query_service(HOST, service)
        result = found["last_check_result"]
        if result and result.get("execution_end", 0) >= since:
            if (result.get("command") is not None) == active:
                return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {'active' if active else 'passive'} result: {found}")
        time.sleep(0.2)


def test_icinga2_runs_the_plugins_and_takes_replicates_results(pair: Zb, tmp_path: Path) -> None:
    if not Path(ICINGA2_BINARY).exists():
        pytest.skip(f"{ICINGA2_BINARY} missing (apt-get install icinga2)")
    zb = pair
    fs = zb.dst_fs()
    generated = zb.run(
        "icinga-config", "--mode=both", "--host-template=lab-host", "--address=127.0.0.1"
    )
    assert generated.returncode == 0, generated.stderr
    lag_service, runtime_service = f"zettabee lag {fs}", f"zettabee runtime {fs}"
    assert f'object Service "{lag_service}"' in generated.stdout

    plugins = plugin_dir(tmp_path)
    icinga = Icinga2Daemon(
        icinga_objects(zb, plugins, generated.stdout),
        users=[OPERATOR],
        checker=True,
        environment=SERVICE_ENVIRONMENT,
    )
    zb.write_settings(api_settings(icinga))
    with icinga:
        wait_for_lag(zb, 2)
        since = time.time()

        # Active: Icinga runs the real plugins with the arguments of the shipped commands.
        lag = checked(icinga, lag_service, since)
        assert lag["state"] == 0, lag
        assert lag["output"].startswith(f"ZETTABEE_LAG OK - {fs} lag 0:00:"), lag["output"]
        assert lag["performance_data"][0].endswith("s;3600;7200;0")
        assert lag["last_check_result"]["command"] == [
            str(plugins / "check_zettabee_lag"),
            "--settings",
            str(zb.settings),
            fs,
        ]
        runtime = checked(icinga, runtime_service, since)
        assert runtime["state"] == 0, runtime
        assert runtime["output"].startswith(f"ZETTABEE_RUNTIME OK - {fs} last initialize took")

        warning = checked(icinga, "lag over a tiny warning", since)
        assert warning["state"] == 1, warning
        assert warning["output"].startswith(f"ZETTABEE_LAG WARNING - {fs} lag 0:00:")
        assert warning["output"].rstrip().endswith("(over 0:00:01)")
        assert warning["last_check_result"]["command"][1:] == [
            "--settings",
            str(zb.settings),
            "-c",
            "3600",
            "-w",
            "1",
            fs,
        ]
        critical = checked(icinga, "lag over a tiny critical", since)
        assert critical["state"] == 2, critical
        assert critical["output"].startswith(f"ZETTABEE_LAG CRITICAL - {fs} lag 0:00:")

        # Passive: the cron job updates the pair and submits to the same two services.
        # After its forced check an OK service is not checked again for 5 minutes, so
        # the result read back is replicate's.
        before = time.time()
        run = zb.exe("replicate", fs, timeout=300)
        assert (run.returncode, run.stderr) == (0, "")
        for service, name in ((lag_service, "LAG"), (runtime_service, "RUNTIME")):
            passive = result_after(icinga, service, before, active=False)
            result = passive["last_check_result"]
            assert result["check_source"] == CHECK_SOURCE
            assert passive["state"] == 0, passive
            assert passive["output"].startswith(f"ZETTABEE_{name} OK - {fs}")
        lag = icinga.query_service(HOST, lag_service)
        assert lag["output"].startswith(f"ZETTABEE_LAG OK - {fs} lag 0:00:0")
        runtime = icinga.query_service(HOST, runtime_service)
        assert runtime["output"].startswith(f"ZETTABEE_RUNTIME OK - {fs} last update took")


def sudoers_rule(plugins: Path) -> str:
    """The README's rule: the monitoring user may run the two plugins as root, no more."""
    commands = ", ".join(str(plugins / name) for name in PLUGINS)
    return f"nagios ALL=(root) NOPASSWD: {commands}\n"


@contextlib.contextmanager
def sudoers_dropin(name: str, rule: str) -> Iterator[None]:
    """``rule`` in /etc/sudoers.d/NAME while the block runs, checked by visudo first
    (a broken file there would lock sudo out for everyone)."""
    path = Path("/etc/sudoers.d") / name
    candidate = path.with_name(f".{name}.new")  # sudo skips names with a dot
    candidate.write_text(rule)
    candidate.chmod(0o440)
    try:
        check = subprocess.run(["visudo", "-cf", str(candidate)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        candidate.replace(path)
        yield
    finally:
        candidate.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def test_icinga2_as_nagios_runs_the_plugins_through_sudo(pair: Zb, tmp_path: Path) -> None:
    """Icinga as Debian runs it, as the user nagios, which cannot read zfs-fuse's pools:
    the --sudo objects run the plugins through sudo -n, and the sudoers rule of
    icinga-conf/README.md is all they need (without it the check says why it failed)."""
    if not Path(ICINGA2_BINARY).exists():
        pytest.skip(f"{ICINGA2_BINARY} missing (apt-get install icinga2)")
    for tool, package in (("sudo", "sudo"), ("visudo", "sudo")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (apt-get install {package})")
    try:
        pwd.getpwnam("nagios")
    except KeyError:
        pytest.skip("no user nagios (the icinga2 package creates it)")
    zb = pair
    fs = zb.dst_fs()
    plugins = plugin_dir(tmp_path)
    generated = zb.run(
        "icinga-config", "--mode=active", "--sudo", "--host-template=lab-host", "--no-host"
    )
    assert generated.returncode == 0, generated.stderr
    objects = icinga_objects(zb, plugins, generated.stdout)
    objects += 'object Host "zb-e2e" {\n\timport "lab-host"\n}\n'
    lag_service = f"zettabee lag {fs}"
    with Icinga2Daemon(
        objects, users=[OPERATOR], checker=True, user="nagios", environment=SERVICE_ENVIRONMENT
    ) as icinga:
        refused = checked(icinga, lag_service, time.time())
        assert refused["last_check_result"]["command"][:3] == [
            "/usr/bin/sudo",
            "-n",
            str(plugins / "check_zettabee_lag"),
        ]
        assert refused["state"] == 1  # sudo -n exits 1: WARNING
        assert "password is required" in refused["output"], refused

        with sudoers_dropin(f"zettabee-test-{lab_name()}", sudoers_rule(plugins)):
            lag = checked(icinga, lag_service, time.time())
            runtime = checked(icinga, f"zettabee runtime {fs}", time.time())
        assert lag["state"] == 0, lag
        assert lag["output"].startswith(f"ZETTABEE_LAG OK - {fs} lag 0:00:"), lag["output"]
        assert runtime["state"] == 0, runtime
        assert runtime["output"].startswith(f"ZETTABEE_RUNTIME OK - {fs} last initialize took")
