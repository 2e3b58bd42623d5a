"""icinga-conf/ checked by the real servers: Icinga 2 validates and runs it, Nagios 4 validates it.

Every server runs with all of its paths (data, log, cache, spool, run dirs, state and
object files) in the test's temp dir, as root without dropping privileges, so the
system's configuration and state are never read or written. No daemon of the system is
stopped or started; the one Icinga 2 daemon these tests start is ended by its pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import executable
from zettabee.config import CHECKS, Settings, load_settings
from zettabee.pairfile import load_pairs

REPO = Path(__file__).resolve().parents[2]
ICINGA_CONF = REPO / "icinga-conf" / "icinga2"
NAGIOS_CONF = REPO / "icinga-conf" / "nagios"
SYSTEM_PLUGIN_DIR = "/usr/lib/nagios/plugins"

pytestmark = pytest.mark.integration


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the servers run as root with every path in a temp dir")


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package {package})")
    return path


# -- Icinga 2 ----------------------------------------------------------------------


class Icinga2Sandbox:
    """icinga2 with every path overridden (-D constants) into one directory.

    ``icinga2 daemon -C`` writes the object cache (ObjectsPath) that
    ``icinga2 object list`` reads, so both get the same overrides. RunAsUser and
    RunAsGroup are root: icinga2 then does not switch to the nagios user, which could
    not write the temp dirs.
    """

    def __init__(self, root: Path, plugin_dir: str = SYSTEM_PLUGIN_DIR) -> None:
        self.root = root
        self.etc = root / "etc"
        self.plugin_dir = plugin_dir
        for sub in ("etc", "data", "log", "cache", "spool", "run", "etc/zones.d"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.state_path = root / "data" / "icinga2.state"
        self.command_pipe = root / "run" / "icinga2.cmd"

    def defines(self) -> list[str]:
        r = self.root
        constants = {
            "ConfigDir": self.etc,
            "ZonesDir": self.etc / "zones.d",
            "DataDir": r / "data",
            "LogDir": r / "log",
            "CacheDir": r / "cache",
            "SpoolDir": r / "spool",
            "InitRunDir": r / "run",
            "PidPath": r / "run" / "icinga2.pid",
            "StatePath": self.state_path,
            "ObjectsPath": r / "cache" / "icinga2.debug",
            "VarsPath": r / "cache" / "icinga2.vars",
            "ModAttrPath": r / "data" / "modified-attributes.conf",
            "RunAsUser": "root",
            "RunAsGroup": "root",
        }
        return [f"-D{name}={value}" for name, value in constants.items()]

    def main_config(self, *body: str, node: str = "zb-master", zone: str = "master") -> Path:
        """icinga2.conf: the constants a packaged constants.conf defines, the ITL, ``body``."""
        head = [
            f'const PluginDir = "{self.plugin_dir}"',
            f'const PluginContribDir = "{self.plugin_dir}"',
            'const ManubulonPluginDir = "/usr/lib/nagios/plugins"',
            f'const NodeName = "{node}"',
            f'const ZoneName = "{zone}"',
            'const TicketSalt = ""',
            "include <itl>",
            "include <plugins>",
        ]
        path = self.etc / "icinga2.conf"
        path.write_text("\n".join(head + list(body)) + "\n")
        return path

    def validate(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["icinga2", "daemon", "-C", "-c", str(self.etc / "icinga2.conf"), *self.defines()],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def objects(self, type_name: str) -> dict[str, dict[str, Any]]:
        """``icinga2 object list --type T`` parsed: full name -> attributes."""
        proc = subprocess.run(
            ["icinga2", "object", "list", "--type", type_name, *self.defines()],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return parse_object_list(proc.stdout)

    def dumped_objects(self, type_name: str) -> dict[str, dict[str, Any]]:
        """The same objects read as JSON from the object cache (for multi-line values)."""
        records = read_netstrings(self.root / "cache" / "icinga2.debug")
        return {r["name"]: r["properties"] for r in records if r["type"] == type_name}

    def dumped_services(self) -> dict[str, dict[str, Any]]:
        """Services from the object cache by full name, ``host!service`` (the cache keys
        them by their short name, which many hosts share)."""
        records = read_netstrings(self.root / "cache" / "icinga2.debug")
        return {
            f"{r['properties']['host_name']}!{r['name']}": r["properties"]
            for r in records
            if r["type"] == "Service"
        }

    def start(self) -> subprocess.Popen[str]:
        log = (self.root / "log" / "daemon.out").open("w")
        return subprocess.Popen(
            ["icinga2", "daemon", "-c", str(self.etc / "icinga2.conf"), *self.defines()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def external_command(self, line: str) -> None:
        with self.command_pipe.open("w") as pipe:
            pipe.write(f"[{int(time.time())}] {line}\n")

    def saved_state(self) -> dict[str, dict[str, Any]]:
        """The state file icinga2 writes on shutdown: object name -> runtime attributes."""
        return {obj["name"]: obj["update"] for obj in read_netstrings(self.state_path)}


ATTR_LINE = re.compile(r"^(?P<indent> *)\* (?P<key>[^=]+?)(?: = (?P<value>.*))?$")


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_object_list(text: str) -> dict[str, dict[str, Any]]:
    """Parse the text of ``icinga2 object list``; nested dictionaries become dicts.

    Lines look like ``  * check_command = "passive"``; a key without ``= value`` opens a
    dictionary whose entries are indented by two more spaces; ``%`` lines say where a
    value was set and are skipped.
    """
    objects: dict[str, dict[str, Any]] = {}
    stack: list[tuple[int, dict[str, Any]]] = []
    for line in text.splitlines():
        header = re.match(r"^Object '(?P<name>.*)' of type '(?P<type>\w+)':$", line)
        if header:
            current: dict[str, Any] = {}
            objects[header["name"]] = current
            stack = [(0, current)]
            continue
        match = ATTR_LINE.match(line)
        if not match or not stack:
            continue
        depth = len(match["indent"]) // 2
        while len(stack) > depth:
            stack.pop()
        target = stack[-1][1]
        if match["value"] is None:
            child: dict[str, Any] = {}
            target[match["key"]] = child
            stack.append((depth, child))
        else:
            target[match["key"]] = parse_value(match["value"])
    return objects


def read_netstrings(path: Path) -> list[dict[str, Any]]:
    """icinga2's state and object files: netstrings (``<len>:<json>,``) of JSON objects."""
    data = path.read_bytes()
    records = []
    pos = 0
    while pos < len(data):
        colon = data.index(b":", pos)
        length = int(data[pos:colon])
        records.append(json.loads(data[colon + 1 : colon + 1 + length]))
        pos = colon + 1 + length + 1
    return records


def zettabee_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: attrs for name, attrs in services.items() if attrs["name"].startswith("zettabee ")
    }


def distributed_layout(sandbox: Icinga2Sandbox, extra_master: str = "") -> None:
    """The recommended layout: commands and templates in global-templates, the apply
    rules and hosts in the master zone, an agent zone for the destination host."""
    global_dir = sandbox.etc / "zones.d" / "global-templates"
    master_dir = sandbox.etc / "zones.d" / "master"
    global_dir.mkdir(parents=True, exist_ok=True)
    master_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ICINGA_CONF / "commands.conf", global_dir)
    shutil.copy(ICINGA_CONF / "templates.conf", global_dir)
    shutil.copy(ICINGA_CONF / "services.conf", master_dir)
    shutil.copy(ICINGA_CONF / "hosts.conf.example", master_dir / "hosts.conf")
    shutil.copy(ICINGA_CONF / "api-users.conf.example", sandbox.etc / "api-users.conf")
    (sandbox.etc / "zones.conf").write_text(
        'object Endpoint "zb-master" { }\n'
        'object Zone "master" { endpoints = [ "zb-master" ] }\n'
        'object Endpoint "backup2.example.com" { }\n'
        'object Zone "backup2.example.com" {\n'
        '  endpoints = [ "backup2.example.com" ]\n  parent = "master"\n}\n'
        'object Zone "global-templates" { global = true }\n'
    )
    (master_dir / "backup2.conf").write_text(
        # Active mode, checks on the agent of the destination host.
        'object Host "backup2.example.com" {\n'
        '  check_command = "dummy"\n'
        '  vars.zettabee_mode = "active"\n'
        '  vars.zettabee_endpoint = "backup2.example.com"\n'
        '  vars.zettabee_config = "/etc/zettabee/zettabee.cfg"\n'
        '  vars.zettabee_pairs["tank/vm"] = { lag_critical = 1d }\n'
        "}\n" + extra_master
    )
    sandbox.main_config('include "zones.conf"', 'include "api-users.conf"')


@pytest.fixture
def icinga2(tmp_path: Path) -> Icinga2Sandbox:
    require_root()
    require_binary("icinga2", "icinga2")
    if not Path("/usr/share/icinga2/include/itl").exists():
        pytest.skip("the Icinga Template Library is missing (Debian package icinga2-common)")
    return Icinga2Sandbox(tmp_path / "icinga2")


def test_icinga2_validates_and_applies_one_service_per_pair(icinga2: Icinga2Sandbox) -> None:
    distributed_layout(
        icinga2,
        'object Host "backup3.example.com" {\n'
        '  check_command = "dummy"\n'
        '  vars.zettabee_mode = "active"\n'
        "  vars.zettabee_sudo = true\n"
        '  vars.zettabee_pairs["tank/db"] = { }\n'
        "}\n",
    )
    proc = icinga2.validate()
    assert proc.returncode == 0, proc.stdout + proc.stderr

    services = zettabee_services(icinga2.objects("Service"))
    assert sorted(services) == [
        "backup1.example.com!zettabee lag backup/data",
        "backup1.example.com!zettabee lag backup/home",
        "backup1.example.com!zettabee runtime backup/data",
        "backup1.example.com!zettabee runtime backup/home",
        "backup2.example.com!zettabee lag tank/vm",
        "backup2.example.com!zettabee runtime tank/vm",
        "backup3.example.com!zettabee lag tank/db",
        "backup3.example.com!zettabee runtime tank/db",
    ]

    # backup/data: the example host's mode, passive, with freshness 15m + 10m.
    for kind in ("lag", "runtime"):
        passive = services[f"backup1.example.com!zettabee {kind} backup/data"]
        assert passive["check_command"] == "passive"
        assert passive["enable_active_checks"] is True
        assert passive["enable_passive_checks"] is True
        assert passive["check_interval"] == 25 * 60
        assert passive["max_check_attempts"] == 1
        assert passive["command_endpoint"] == ""
        assert passive["vars"]["dummy_state"] == 3
        assert "dummy_text" in passive["vars"]
        assert passive["vars"]["zettabee_destination"] == "backup/data"
        assert passive["vars"]["zettabee_mode"] == "passive"
        assert passive["zone"] == "master"

    # backup/home: active through the pair's own mode; no endpoint on that host.
    lag = services["backup1.example.com!zettabee lag backup/home"]
    assert lag["check_command"] == "zettabee_lag"
    assert lag["command_endpoint"] == ""
    assert lag["check_interval"] == 300
    assert lag["max_check_attempts"] == 3
    assert lag["vars"]["zettabee_lag_destination"] == "backup/home"
    assert "zettabee_lag_warning" not in lag["vars"]  # the plugin takes the pair file's
    runtime = services["backup1.example.com!zettabee runtime backup/home"]
    assert runtime["check_command"] == "zettabee_runtime"
    assert runtime["vars"]["zettabee_runtime_destination"] == "backup/home"

    # backup2: active host, checks run on its agent, host-wide plugin options passed on.
    lag = services["backup2.example.com!zettabee lag tank/vm"]
    assert lag["check_command"] == "zettabee_lag"
    assert lag["command_endpoint"] == "backup2.example.com"
    assert lag["vars"]["zettabee_lag_critical"] == 86400
    assert lag["vars"]["zettabee_lag_config"] == "/etc/zettabee/zettabee.cfg"
    runtime = services["backup2.example.com!zettabee runtime tank/vm"]
    assert runtime["command_endpoint"] == "backup2.example.com"
    assert runtime["vars"]["zettabee_runtime_config"] == "/etc/zettabee/zettabee.cfg"

    commands = icinga2.objects("CheckCommand")
    lag_command = commands["zettabee_lag"]
    assert lag_command["command"] == [f"{SYSTEM_PLUGIN_DIR}/check_zettabee_lag"]
    assert set(lag_command["arguments"]) == {
        "--config",
        "--settings",
        "-w",
        "-c",
        "-t",
        "-v",
        "--all",
        "destination",
    }
    assert lag_command["arguments"]["destination"]["skip_key"] is True
    assert lag_command["arguments"]["--all"]["set_if"] == "$zettabee_lag_all$"
    assert commands["zettabee_runtime"]["command"] == [
        f"{SYSTEM_PLUGIN_DIR}/check_zettabee_runtime"
    ]

    for kind in ("lag", "runtime"):
        sudo = commands[f"zettabee_{kind}_sudo"]
        plugin = f"{SYSTEM_PLUGIN_DIR}/check_zettabee_{kind}"
        assert sudo["command"] == ["/usr/bin/sudo", "-n", plugin]
        assert set(sudo["arguments"]) == set(commands[f"zettabee_{kind}"]["arguments"])
        # backup3: vars.zettabee_sudo picks them, with the same variables.
        service = services[f"backup3.example.com!zettabee {kind} tank/db"]
        assert service["check_command"] == f"zettabee_{kind}_sudo"
        assert service["vars"][f"zettabee_{kind}_destination"] == "tank/db"

    assert "zettabee" in icinga2.objects("ServiceGroup")
    api_user = icinga2.dumped_objects("ApiUser")["zettabee"]
    assert [p["permission"] for p in api_user["permissions"]] == ["actions/process-check-result"]


def test_icinga2_rejects_a_bad_mode(icinga2: Icinga2Sandbox) -> None:
    distributed_layout(
        icinga2,
        'object Host "backup3.example.com" {\n'
        '  check_command = "dummy"\n'
        '  vars.zettabee_mode = "activ"\n'
        '  vars.zettabee_pairs["tank/x"] = { }\n'
        "}\n",
    )
    proc = icinga2.validate()
    assert proc.returncode != 0
    message = "host 'backup3.example.com', pair 'tank/x': mode must be \"active\" or \"passive\""
    assert message in proc.stdout, proc.stdout


def test_icinga2_rejects_a_broken_command_file(icinga2: Icinga2Sandbox) -> None:
    distributed_layout(icinga2)
    broken = icinga2.etc / "zones.d" / "global-templates" / "commands.conf"
    broken.write_text(broken.read_text().replace("skip_key = true", "skip_key = tru", 1))
    proc = icinga2.validate()
    assert proc.returncode != 0
    assert "commands.conf" in proc.stdout


# -- the objects zettabee icinga-config / nagios-config print ---------------------------

# Valid names that are traps for a careless writer of either syntax (see test_monconf).
HOSTILE_TEMPLATE = "zb\\ {check} #{fs} {{x}} [y] é //"
HOSTILE_PAIRS = (
    "src.example.com:tank/a  localhost:backup/a:b..c  wlag=1h\n"
    "src.example.com:tank/b  localhost:backup/object/include\n"
)


class Generated:
    """A settings file and a pair file in a directory, and the objects zettabee prints."""

    def __init__(self, root: Path, host: str = "zb-gen") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.settings_path = root / "zettabee.ini"
        self.pairs_path = root / "pairs.cfg"
        self.settings_path.write_text(
            f"[paths]\npairs = {self.pairs_path}\nstate_dir = {root}/state\n"
            f"[monitoring]\nhost_name = {host}\nservice_template = {HOSTILE_TEMPLATE}\n",
            encoding="utf-8",
        )
        self.pairs_path.write_text(HOSTILE_PAIRS)

    def print(self, action: str, *args: str) -> str:
        """``zettabee ACTION ARGS`` as an admin runs it; its standard output."""
        argv = [*executable("zettabee"), "--settings", str(self.settings_path), action, *args]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def service_names(self) -> dict[str, list[str]]:
        """Destination file system -> the service names replicate submits for its pair."""
        settings: Settings = load_settings(str(self.settings_path))
        pairs = load_pairs(str(self.pairs_path), settings).pairs
        return {p.destination.fs: [settings.service_name(p, c) for c in CHECKS] for p in pairs}


def test_icinga2_accepts_the_generated_objects_with_the_shipped_ones(
    icinga2: Icinga2Sandbox, tmp_path: Path
) -> None:
    """Passive, active (on the destination host's agent) and both, next to the shipped
    files and their own example: every name arrives in Icinga as zettabee makes it."""
    distributed_layout(icinga2)
    gen = Generated(tmp_path / "zettabee")
    master = icinga2.etc / "zones.d" / "master"
    (master / "zettabee-passive.conf").write_text(
        gen.print("icinga-config", "--cron-period", "1h"), encoding="utf-8"
    )
    (master / "zettabee-active.conf").write_text(
        gen.print(
            "icinga-config",
            "--mode=active",
            "--host=zb-gen-active",
            "--address=192.0.2.20",
            "--endpoint=backup2.example.com",
        ),
        encoding="utf-8",
    )
    (master / "zettabee-both.conf").write_text(
        gen.print("icinga-config", "--mode=both", "--host=zb-gen", "--no-host").replace(
            'host_name = "zb-gen"', 'host_name = "zb-gen-both"'
        ),
        encoding="utf-8",
    )
    (master / "zb-gen-both.conf").write_text(
        'object Host "zb-gen-both" { check_command = "dummy" }\n'
    )
    proc = icinga2.validate()
    assert proc.returncode == 0, proc.stdout + proc.stderr

    services = icinga2.dumped_services()
    names = gen.service_names()
    for host in ("zb-gen", "zb-gen-active", "zb-gen-both"):
        found = sorted(name for name in services if name.startswith(f"{host}!"))
        assert found == sorted(f"{host}!{n}" for pair in names.values() for n in pair)
    assert icinga2.dumped_objects("Host")["zb-gen-active"]["address"] == "192.0.2.20"

    for fs, (lag, runtime) in names.items():
        passive = services[f"zb-gen!{lag}"]
        assert passive["check_command"] == "passive"
        assert passive["check_interval"] == 4200  # 1h of cron + the templates' 10m slack
        assert passive["max_check_attempts"] == 1
        assert passive["vars"]["zettabee_destination"] == fs
        assert passive["vars"]["dummy_state"] == 3

        active = services[f"zb-gen-active!{runtime}"]
        assert active["check_command"] == "zettabee_runtime"
        assert active["command_endpoint"] == "backup2.example.com"
        assert active["vars"]["zettabee_runtime_destination"] == fs
        assert active["vars"]["zettabee_runtime_settings"] == str(gen.settings_path)

        both = services[f"zb-gen-both!{lag}"]
        assert both["check_command"] == "zettabee_lag"
        assert both["enable_passive_checks"] is True
        assert both["enable_active_checks"] is True
        assert both["vars"]["zettabee_lag_destination"] == fs


FAKE_PLUGIN = """#!/bin/sh
# Records its command line (NUL-separated) and answers like the real plugin.
printf '%s\\0' "$0" "$@" > "{calls}/$(basename "$0")-$$"
echo "ZETTABEE OK - fake | lag=5s;3600;7200;0"
"""


def test_icinga2_runs_the_plugins_and_raises_the_stale_alarm(tmp_path: Path) -> None:
    """The single-node layout, run by a real daemon for a few seconds.

    Active services call the plugins with the arguments the apply rules set; a
    passive service without results turns UNKNOWN with zettabee's text once its
    freshness interval has passed; a passive result under the agreed service name
    is accepted as it is.
    """
    require_root()
    require_binary("icinga2", "icinga2")
    plugin_dir = tmp_path / "plugins"
    calls = tmp_path / "calls"
    plugin_dir.mkdir()
    calls.mkdir()
    for name in ("check_zettabee_lag", "check_zettabee_runtime"):
        plugin = plugin_dir / name
        plugin.write_text(FAKE_PLUGIN.replace("{calls}", str(calls)))
        plugin.chmod(0o755)

    sandbox = Icinga2Sandbox(tmp_path / "icinga2", plugin_dir=str(plugin_dir))
    conf = sandbox.etc / "conf.d"
    conf.mkdir()
    for name in ("commands.conf", "templates.conf", "services.conf"):
        shutil.copy(ICINGA_CONF / name, conf)
    (conf / "hosts.conf").write_text(
        'object Host "backup1" {\n'
        '  check_command = "dummy"\n'
        "  vars.zettabee_timeout = 20\n"
        "  vars.zettabee_cron_period = 2s\n"
        "  vars.zettabee_freshness_slack = 1s\n"
        '  vars.zettabee_pairs["backup/home"] = {\n'
        '    mode = "active"\n    lag_warning = 2h\n    lag_critical = 6h\n'
        "  }\n"
        '  vars.zettabee_pairs["backup/data"] = { }\n'
        "}\n"
        'object Host "backup2" {\n'
        '  check_command = "dummy"\n'
        '  vars.zettabee_pairs["tank/vm"] = { }\n'
        "}\n"
    )
    sandbox.main_config(
        'include "conf.d/*.conf"',
        'object CheckerComponent "checker" { }',
        f'object ExternalCommandListener "command" {{ command_path = "{sandbox.command_pipe}" }}',
        node="zb-single",
        zone="zb-single",
    )
    proc = sandbox.validate()
    assert proc.returncode == 0, proc.stdout

    daemon = sandbox.start()
    try:
        deadline = time.monotonic() + 30
        while not sandbox.command_pipe.exists():
            assert daemon.poll() is None, (sandbox.root / "log" / "daemon.out").read_text()
            assert time.monotonic() < deadline, "icinga2 did not open its command pipe"
            time.sleep(0.1)
        now = int(time.time())
        for service in ("zettabee lag backup/home", "zettabee runtime backup/home"):
            sandbox.external_command(f"SCHEDULE_FORCED_SVC_CHECK;backup1;{service};{now}")
        sandbox.external_command(
            "PROCESS_SERVICE_CHECK_RESULT;backup2;zettabee lag tank/vm;0;"
            "ZETTABEE_LAG OK - tank/vm lag 300s | lag=300s;3600;7200;0"
        )
        # Wait for both plugin calls, then past the 3 s freshness interval.
        while len(list(calls.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(5)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)

    argvs = sorted(call.read_bytes().split(b"\0")[:-1] for call in calls.iterdir())
    assert [[arg.decode() for arg in argv] for argv in argvs] == [
        [
            f"{plugin_dir}/check_zettabee_lag",
            "-c",
            "21600",
            "-t",
            "20",
            "-w",
            "7200",
            "backup/home",
        ],
        [f"{plugin_dir}/check_zettabee_runtime", "-t", "20", "backup/home"],
    ]

    state = sandbox.saved_state()
    lag = state["backup1!zettabee lag backup/home"]["last_check_result"]
    assert lag["state"] == 0
    assert lag["performance_data"] == ["lag=5s;3600;7200;0"]
    for kind in ("lag", "runtime"):
        stale = state[f"backup1!zettabee {kind} backup/data"]["last_check_result"]
        assert stale["state"] == 3
        assert stale["output"].startswith(
            "No result from zettabee's cron job (replicate) for backup/data in the last 3 s"
        )
    submitted = state["backup2!zettabee lag tank/vm"]["last_check_result"]
    assert submitted["state"] == 0
    assert submitted["output"].startswith("ZETTABEE_LAG OK - tank/vm lag 300s")
    assert submitted["command"] is None  # a passive result, not the stale check


# -- Nagios 4 ----------------------------------------------------------------------

NAGIOS_SITE = """
define timeperiod {
    timeperiod_name     24x7
    alias               always
    sunday              00:00-24:00
    monday              00:00-24:00
    tuesday             00:00-24:00
    wednesday           00:00-24:00
    thursday            00:00-24:00
    friday              00:00-24:00
    saturday            00:00-24:00
}

define command {
    command_name        check-host-alive
    command_line        $USER1$/check_ping -H $HOSTADDRESS$ -w 3000.0,80% -c 5000.0,100% -p 1
}

define command {
    command_name        notify-nobody
    command_line        /bin/true
}

define contact {
    contact_name                    nobody
    host_notification_period        24x7
    service_notification_period     24x7
    host_notification_options       n
    service_notification_options    n
    host_notification_commands      notify-nobody
    service_notification_commands   notify-nobody
}

define contactgroup {
    contactgroup_name   admins
    alias               admins
    members             nobody
}
"""


class NagiosSandbox:
    """nagios4 -v on a nagios.cfg whose every path is in one directory.

    nagios_user/nagios_group are root so that the pre-flight check can write the temp
    dirs (as the nagios user it reports "Unable to write to temp_path").
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "checkresults").mkdir(exist_ok=True)
        (root / "site.cfg").write_text(NAGIOS_SITE)
        (root / "resource.cfg").write_text(f"$USER1$={SYSTEM_PLUGIN_DIR}\n")

    def write_config(
        self, *object_files: Path, site: bool = True, object_dirs: Sequence[Path] = ()
    ) -> Path:
        """nagios.cfg reading ``object_dirs`` and ``object_files``, after the sandbox's own
        time period, commands and contacts (``site``) or without them (for Debian's)."""
        r = self.root
        lines = [f"cfg_file={r / 'site.cfg'}"] if site else []
        lines += [f"cfg_dir={path}" for path in object_dirs]
        lines += [f"cfg_file={path}" for path in object_files]
        lines += [
            f"resource_file={r / 'resource.cfg'}",
            f"log_file={r / 'nagios.log'}",
            f"object_cache_file={r / 'objects.cache'}",
            f"precached_object_file={r / 'objects.precache'}",
            f"status_file={r / 'status.dat'}",
            f"state_retention_file={r / 'retention.dat'}",
            f"command_file={r / 'nagios.cmd'}",
            f"lock_file={r / 'nagios.lock'}",
            f"temp_file={r / 'nagios.tmp'}",
            f"temp_path={r}",
            f"check_result_path={r / 'checkresults'}",
            f"log_archive_path={r}",
            "nagios_user=root",
            "nagios_group=root",
            "use_syslog=0",
            "check_for_updates=0",
            "accept_passive_service_checks=1",
            "check_service_freshness=1",
            "illegal_macro_output_chars=`~$&|'\"<>",
        ]
        path = r / "nagios.cfg"
        path.write_text("\n".join(lines) + "\n")
        return path

    def verify(self, precache: bool = False) -> subprocess.CompletedProcess[str]:
        argv = ["nagios4", "-v"] + (["-p"] if precache else []) + [str(self.root / "nagios.cfg")]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    def services(self) -> dict[tuple[str, str], dict[str, str]]:
        """The resolved services (templates applied) from the precached object file."""
        text = (self.root / "objects.precache").read_text()
        services = {}
        for block in re.findall(r"define service \{\n(.*?)\n\s*\}", text, re.S):
            attrs = dict(line.strip().split("\t", 1) for line in block.splitlines() if "\t" in line)
            services[(attrs["host_name"], attrs["service_description"])] = attrs
        return services


@pytest.fixture
def nagios(tmp_path: Path) -> NagiosSandbox:
    require_root()
    require_binary("nagios4", "nagios4")
    return NagiosSandbox(tmp_path / "nagios")


def nagios_files(sandbox: NagiosSandbox) -> list[Path]:
    example = sandbox.root / "hosts.cfg"
    shutil.copy(NAGIOS_CONF / "hosts.cfg.example", example)
    return [NAGIOS_CONF / "commands.cfg", NAGIOS_CONF / "templates.cfg", example]


def test_nagios_validates_the_definitions_and_example(nagios: NagiosSandbox) -> None:
    nagios.write_config(*nagios_files(nagios))
    proc = nagios.verify()
    assert proc.returncode == 0, proc.stdout
    assert "Total Errors:   0" in proc.stdout
    assert "Total Warnings: 0" in proc.stdout, proc.stdout

    proc = nagios.verify(precache=True)
    assert proc.returncode == 0, proc.stdout
    services = nagios.services()
    host = "backup1.example.com"
    assert sorted(desc for _, desc in services) == [
        "zettabee lag backup/data",
        "zettabee lag backup/home",
        "zettabee runtime backup/data",
        "zettabee runtime backup/home",
    ]
    for kind in ("lag", "runtime"):
        passive = services[(host, f"zettabee {kind} backup/data")]
        assert passive["active_checks_enabled"] == "0"
        assert passive["passive_checks_enabled"] == "1"
        assert passive["check_freshness"] == "1"
        assert passive["freshness_threshold"] == "1500"
        assert passive["max_check_attempts"] == "1"
        assert passive["check_command"] == "zettabee-no-result"
    active = services[(host, "zettabee lag backup/home")]
    assert active["active_checks_enabled"] == "1"
    assert active["check_command"] == "check_zettabee_lag!backup/home!-w 7200 -c 21600"
    assert services[(host, "zettabee runtime backup/home")]["check_command"] == (
        "check_zettabee_runtime!backup/home"
    )

    commands = (nagios.root / "objects.precache").read_text()
    assert "$USER1$/check_zettabee_lag $ARG2$ $ARG1$" in commands
    assert '$USER1$/check_dummy 3 "No result from zettabee' in commands


def test_nagios_rejects_a_service_without_its_command(nagios: NagiosSandbox) -> None:
    files = nagios_files(nagios)
    broken = nagios.root / "commands-broken.cfg"
    broken.write_text(
        (NAGIOS_CONF / "commands.cfg").read_text().replace("zettabee-no-result", "zettabee-gone")
    )
    nagios.write_config(broken, *files[1:])
    proc = nagios.verify()
    assert proc.returncode != 0
    assert "zettabee-no-result" in proc.stdout
    assert "Total Errors:   0" not in proc.stdout


RUN_HOST = """
define host {
    host_name               backup1
    address                 127.0.0.1
    check_command           check-host-alive
    check_period            24x7
    max_check_attempts      1
    active_checks_enabled   0
    notification_period     24x7
    contact_groups          admins
}

define service {
    use                     zettabee-passive-service
    host_name               backup1
    service_description     zettabee lag backup/data
    contact_groups          admins
    freshness_threshold     2
}

define service {
    use                     zettabee-passive-service
    host_name               backup1
    service_description     zettabee lag backup/home
    contact_groups          admins
}
"""


def test_nagios_raises_the_stale_alarm_and_takes_results(nagios: NagiosSandbox) -> None:
    """Nagios 4 run for a few seconds: a passive service without results goes UNKNOWN
    through the freshness check (active checks disabled); a submitted result under
    the agreed name is taken as it is."""
    hosts = nagios.root / "run-hosts.cfg"
    hosts.write_text(RUN_HOST)
    config = nagios.write_config(NAGIOS_CONF / "commands.cfg", NAGIOS_CONF / "templates.cfg", hosts)
    with config.open("a") as cfg:
        cfg.write(
            "service_freshness_check_interval=1\n"
            "additional_freshness_latency=0\n"
            "check_result_reaper_frequency=1\n"
            "retain_state_information=0\n"
            "log_passive_checks=1\n"
        )
    log = nagios.root / "nagios.log"
    pipe = nagios.root / "nagios.cmd"
    stale = "SERVICE ALERT: backup1;zettabee lag backup/data;UNKNOWN;HARD;1;UNKNOWN: No result"
    # Nagios 4.4 logs the output of a passive result as "(null)": the state must do.
    passive = "PASSIVE SERVICE CHECK: backup1;zettabee lag backup/home;0;"
    daemon = subprocess.Popen(
        ["nagios4", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not pipe.exists():
            assert daemon.poll() is None, log.read_text() if log.exists() else "nagios4 exited"
            assert time.monotonic() < deadline, "nagios4 did not open its command file"
            time.sleep(0.1)
        with pipe.open("w") as command:
            command.write(
                f"[{int(time.time())}] PROCESS_SERVICE_CHECK_RESULT;backup1;"
                "zettabee lag backup/home;0;ZETTABEE_LAG OK - backup/home lag 300s"
                " | lag=300s;3600;7200;0\n"
            )
        while time.monotonic() < deadline:
            text = log.read_text()
            if stale in text and passive in text:
                break
            time.sleep(0.2)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    text = log.read_text()
    assert stale in text, text
    assert "for 'zettabee lag backup/data' in time: the cron job stopped running" in text
    assert passive in text, text
    assert "SERVICE ALERT: backup1;zettabee lag backup/home" not in text


DEBIAN_NAGIOS_OBJECTS = Path("/etc/nagios4/objects")
DEBIAN_PLUGIN_COMMANDS = Path("/etc/nagios-plugins/config")  # check-host-alive lives here


def test_nagios_accepts_the_generated_services(nagios: NagiosSandbox, tmp_path: Path) -> None:
    """What Debian's nagios.cfg reads (its sample objects: linux-server, admins; the
    plugins' commands: check-host-alive), the shipped definitions and what nagios-config
    prints for each mode: no error, no warning, and the names as zettabee makes them."""
    stock = [
        DEBIAN_NAGIOS_OBJECTS / f"{name}.cfg"
        for name in ("commands", "timeperiods", "contacts", "templates")
    ]
    if not all(path.exists() for path in [*stock, DEBIAN_PLUGIN_COMMANDS]):
        pytest.skip(
            f"Debian's sample objects are missing in {DEBIAN_NAGIOS_OBJECTS} (nagios4-common)"
            f" or {DEBIAN_PLUGIN_COMMANDS} (monitoring-plugins-common)"
        )
    gen = Generated(tmp_path / "zettabee")
    files = []
    for mode, host in (("passive", "zb-gen"), ("active", "zb-gen-active"), ("both", "zb-gen-both")):
        path = nagios.root / f"zettabee-{mode}.cfg"
        extra = ["--cron-period", "1h"] if mode == "passive" else []
        path.write_text(
            gen.print("nagios-config", "--mode", mode, "--host", host, *extra), encoding="utf-8"
        )
        files.append(path)
    shipped = [NAGIOS_CONF / "commands.cfg", NAGIOS_CONF / "templates.cfg"]
    nagios.write_config(*stock, *shipped, *files, site=False, object_dirs=[DEBIAN_PLUGIN_COMMANDS])
    proc = nagios.verify()
    assert proc.returncode == 0, proc.stdout
    assert "Total Errors:   0" in proc.stdout
    assert "Total Warnings: 0" in proc.stdout, proc.stdout

    proc = nagios.verify(precache=True)
    assert proc.returncode == 0, proc.stdout
    services = nagios.services()
    names = gen.service_names()
    for host in ("zb-gen", "zb-gen-active", "zb-gen-both"):
        found = sorted(desc for h, desc in services if h == host)
        assert found == sorted(n for pair in names.values() for n in pair)

    settings = gen.settings_path
    for fs, (lag, runtime) in names.items():
        passive = services[("zb-gen", lag)]
        assert passive["active_checks_enabled"] == "0"
        assert passive["passive_checks_enabled"] == "1"
        assert passive["check_freshness"] == "1"
        assert passive["freshness_threshold"] == "4200"
        assert passive["check_command"] == "zettabee-no-result"

        active = services[("zb-gen-active", runtime)]
        assert active["active_checks_enabled"] == "1"
        assert active["passive_checks_enabled"] == "0"
        assert active["check_command"] == f"check_zettabee_runtime!{fs}!--settings {settings}"

        both = services[("zb-gen-both", lag)]
        assert both["active_checks_enabled"] == "1"
        assert both["passive_checks_enabled"] == "1"
        assert both["check_command"] == f"check_zettabee_lag!{fs}!--settings {settings}"
