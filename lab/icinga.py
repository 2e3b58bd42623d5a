"""A real Icinga 2 daemon for tests, demos and benchmarks.

``Icinga2Daemon`` runs Debian's ``icinga2 daemon`` with everything of its own in a
temporary directory: config, data, log, cache, spool and run directories (the path
constants ``ConfigDir``, ``DataDir``, ``LogDir``, ``CacheDir``, ``SpoolDir``,
``InitRunDir``, ``ZonesDir`` are overridden with ``-D``, which Icinga 2.13 honours), its
own CA and node certificate made with ``icinga2 pki new-ca`` / ``new-cert`` /
``sign-csr`` (``new-ca`` writes into ``DataDir/ca``, so the system's
``/var/lib/icinga2/ca`` is never touched), and the API listening on 127.0.0.1 at a free
port. The system's icinga2 service and ``/etc/icinga2`` are left alone.

It runs as root here (``RunAsUser``/``RunAsGroup`` set to the current user, which Icinga
accepts); pass ``user="nagios"`` to run it as Debian's icinga2 user instead, with the
directory handed over to that user. Plugins it runs inherit its environment: ours, or
``environment`` (e.g. ``SERVICE_ENVIRONMENT``, what systemd gives the packaged service),
so a test can show that a plugin needs nothing from the shell that started it.

The certificate is for CN ``localhost`` (``icinga2 pki`` puts the CN in the
subjectAltName as a DNS name), so clients verify TLS against ``url``
(``https://localhost:<port>``) with ``cafile``; ``https://127.0.0.1:<port>`` fails host
name verification, which makes a handy TLS-failure case.

Two API users exist by default: ``submitter`` with only ``actions/process-check-result``
(what a zettabee host needs) and ``reader`` with ``objects/query/*`` (what the tests use
to read results back); pass more in ``users``. Hosts and services come from ``objects``
(Icinga DSL); :func:`passive_service_config` writes the usual passive ones::

    objects = passive_service_config("backup1", ["zettabee tank/data"])
    with Icinga2Daemon(objects) as icinga:
        ...submit through Icinga2ApiBackend(icinga.url, user=icinga.submitter.name, ...)
        icinga.query_service("backup1", "zettabee tank/data")["output"]

No checker component by default: nothing but our submissions changes a service's state,
so a test never races a scheduled check.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.daemon import LabDaemon, terminate

ICINGA2_BINARY = "/usr/sbin/icinga2"
NODE_NAME = "localhost"

# The standard lab layout, shared by the tests and the demo (see lab_objects()).
LAB_HOST = "zb-backup1"
LAB_SERVICES = ("zettabee tank/data", "zettabee tank/home", "zettabee spool")
LAB_OTHER_HOST = "zb-other-host"
NO_PASSIVE_SERVICE = "passive disabled"

# What systemd hands Debian's icinga2.service: its default PATH and nothing else.
SERVICE_ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


@dataclass(frozen=True)
class ApiUser:
    """An Icinga ``ApiUser``: basic auth with ``password``, or a client cert with ``client_cn``."""

    name: str
    password: str | None
    permissions: tuple[str, ...]
    client_cn: str | None = None

    def __repr__(self) -> str:
        return f"ApiUser({self.name!r}, permissions={self.permissions!r})"


def quote(value: str) -> str:
    """An Icinga DSL string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def host_config(host: str, address: str = "127.0.0.1") -> str:
    """A host that is only ever told its state (no active checks)."""
    return (
        f"object Host {quote(host)} {{\n"
        f'  check_command = "dummy"\n'
        f"  address = {quote(address)}\n"
        f"  enable_active_checks = false\n"
        f"}}\n"
    )


def passive_service_config(
    host: str, services: Sequence[str], *, check_interval: str = "1h", with_host: bool = True
) -> str:
    """Passive services as the reference recommends for Icinga 2.

    ``check_command = "passive"`` (UNKNOWN "No Passive Check Result Received" when stale),
    active checks left enabled so that freshness works, ``max_check_attempts = 1`` so a
    single bad result is HARD.
    """
    parts = [host_config(host)] if with_host else []
    for service in services:
        parts.append(
            f"object Service {quote(service)} {{\n"
            f"  host_name = {quote(host)}\n"
            f'  check_command = "passive"\n'
            f"  check_interval = {check_interval}\n"
            f"  max_check_attempts = 1\n"
            f"}}\n"
        )
    return "".join(parts)


def lab_objects() -> str:
    """``LAB_HOST`` with the passive ``LAB_SERVICES``, a service that refuses passive
    results (``NO_PASSIVE_SERVICE``) and a second host, ``LAB_OTHER_HOST``."""
    return (
        passive_service_config(LAB_HOST, LAB_SERVICES)
        + f"object Service {quote(NO_PASSIVE_SERVICE)} {{\n"
        + f"  host_name = {quote(LAB_HOST)}\n"
        + '  check_command = "passive"\n'
        + "  enable_passive_checks = false\n}\n"
        + host_config(LAB_OTHER_HOST)
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Icinga2Daemon(LabDaemon):
    """A private icinga2 with the API on 127.0.0.1 and its own CA."""

    def __init__(
        self,
        objects: str = "",
        *,
        users: Sequence[ApiUser] = (),
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        user: str | None = None,
        checker: bool = False,
        binary: str = ICINGA2_BINARY,
        keep_workdir: bool = False,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.objects = objects
        self.environment = dict(environment) if environment is not None else None
        self.port = port or free_port()
        self.binary = binary
        self.checker = checker
        self.run_as = user or pwd.getpwuid(os.geteuid()).pw_name
        self.keep_workdir = keep_workdir or workdir is not None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="zb-icinga-"))
        self.submitter = ApiUser(
            "submitter", secrets.token_hex(12), ("actions/process-check-result",)
        )
        self.reader = ApiUser("reader", secrets.token_hex(12), ("objects/query/*",))
        self.users = [self.submitter, self.reader, *users]
        self._process: subprocess.Popen[bytes] | None = None
        self._pki_done = False

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"Icinga2Daemon({self.url}, {state})"

    # paths ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{NODE_NAME}:{self.port}"

    @property
    def cafile(self) -> Path:
        return self.workdir / "data" / "certs" / "ca.crt"

    @property
    def config_file(self) -> Path:
        return self.workdir / "etc" / "icinga2.conf"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def _dir(self, name: str) -> Path:
        return self.workdir / name

    def _defines(self) -> list[str]:
        constants = {
            "ConfigDir": self._dir("etc"),
            "ZonesDir": self._dir("etc") / "zones.d",
            "DataDir": self._dir("data"),
            "LogDir": self._dir("log"),
            "CacheDir": self._dir("cache"),
            "SpoolDir": self._dir("spool"),
            "InitRunDir": self._dir("run"),
            "RunAsUser": self.run_as,
            "RunAsGroup": self._group(),
            "NodeName": NODE_NAME,
        }
        return [f"-D{key}={value}" for key, value in constants.items()]

    def _group(self) -> str:
        return grp.getgrgid(pwd.getpwnam(self.run_as).pw_gid).gr_name

    def user(self, name: str) -> ApiUser:
        """The API user called ``name`` (``submitter``, ``reader`` or one passed in)."""
        for user in self.users:
            if user.name == name:
                return user
        raise KeyError(name)

    # life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Icinga2Daemon:
        if self.running:
            return self
        if not Path(self.binary).exists():
            raise FileNotFoundError(f"{self.binary} missing: apt-get install icinga2")
        for name in ("etc", "etc/zones.d", "data", "data/certs", "log", "cache", "spool", "run"):
            self._dir(name).mkdir(parents=True, exist_ok=True)
        self._hand_over()  # icinga2 pki already runs as RunAsUser
        self._make_pki()
        self._write_config()
        self._hand_over()
        self._run([self.binary, "daemon", "-C", "-c", str(self.config_file), *self._defines()])
        self.console_log.write_bytes(b"")
        with open(self.console_log, "ab") as out:
            # A session of its own: icinga2 forks workers; stop() signals the group we made.
            self._process = subprocess.Popen(  # noqa: S603 - argv list
                [self.binary, "daemon", "-c", str(self.config_file), *self._defines()],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env=self.environment,
            )
        deadline = time.monotonic() + timeout
        while "Activated all objects" not in self.console_log.read_text(errors="replace"):
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"icinga2 did not start:\n{tail}")
            time.sleep(0.05)
        self._wait_for_api(deadline)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """End the daemon we started: SIGTERM to its pid, then anything left in its group."""
        process, self._process = self._process, None
        if process is None:
            return
        terminate(process, timeout)
        # The worker may outlive the umbrella process by a moment while it saves its state;
        # anything still in the session we created (pgid == its pid) after that is killed.
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                os.killpg(process.pid, 0)
                time.sleep(0.05)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _hand_over(self) -> None:
        """Give the directory to ``user`` when icinga2 runs as someone else than us."""
        if self.run_as == pwd.getpwuid(os.geteuid()).pw_name:
            return
        for path in [self.workdir, *self.workdir.rglob("*")]:
            shutil.chown(path, self.run_as, self._group())

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # certificates --------------------------------------------------------------------------

    def _make_pki(self) -> None:
        if self._pki_done:
            return
        certs = self._dir("data") / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        if not (self._dir("data") / "ca" / "ca.crt").exists():
            self._run([self.binary, "pki", "new-ca", *self._defines()])
        self._sign(NODE_NAME, certs)
        shutil.copy(self._dir("data") / "ca" / "ca.crt", certs / "ca.crt")
        self._pki_done = True

    def _sign(self, cn: str, directory: Path) -> tuple[Path, Path]:
        key, csr, crt = (directory / f"{cn}.{ext}" for ext in ("key", "csr", "crt"))
        self._run(
            [self.binary, "pki", "new-cert", "--cn", cn, "--key", str(key), "--csr", str(csr)]
            + self._defines()
        )
        self._run(
            [self.binary, "pki", "sign-csr", "--csr", str(csr), "--cert", str(crt)]
            + self._defines()
        )
        return crt, key

    def make_client_cert(self, cn: str) -> tuple[Path, Path]:
        """A client certificate and key signed by this instance's CA (for ``client_cn`` users)."""
        self._dir("data").mkdir(parents=True, exist_ok=True)
        if not (self._dir("data") / "ca" / "ca.crt").exists():
            self._run([self.binary, "pki", "new-ca", *self._defines()])
        clients = self.workdir / "clients"
        clients.mkdir(exist_ok=True)
        self._hand_over()
        return self._sign(cn, clients)

    def _run(self, argv: list[str]) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
        if proc.returncode != 0:
            said = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise RuntimeError(
                f"{' '.join(argv[:3])} failed ({proc.returncode}):\n" + "\n".join(said)
            )

    # config --------------------------------------------------------------------------------

    def _write_config(self) -> None:
        parts = [
            "include <itl>\n",
            'object FileLogger "main" { path = LogDir + "/icinga2.log" }\n',
            "object Endpoint NodeName {}\n",
            'object Zone "lab" { endpoints = [ NodeName ] }\n',
            f'object ApiListener "api" {{\n  bind_host = "127.0.0.1"\n  bind_port = {self.port}\n}}\n',
        ]
        if self.checker:
            parts.append('object CheckerComponent "checker" {}\n')
        for user in self.users:
            attrs = [f"  permissions = [ {', '.join(quote(p) for p in user.permissions)} ]"]
            if user.password is not None:
                attrs.append(f"  password = {quote(user.password)}")
            if user.client_cn is not None:
                attrs.append(f"  client_cn = {quote(user.client_cn)}")
            parts.append(f"object ApiUser {quote(user.name)} {{\n" + "\n".join(attrs) + "\n}\n")
        parts.append(self.objects)
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(parts))

    # the API, for reading back -------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile))

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        user: ApiUser | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Call the API as ``user`` (default: reader); return status and JSON answer."""
        user = user or self.reader
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Accept": "application/json"},
        )
        token = base64.b64encode(f"{user.name}:{user.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw or b"{}")
            except ValueError:
                return exc.code, {"status": raw.decode(errors="replace")}

    def query_service(self, host: str, service: str) -> dict[str, Any]:
        """State, output and perfdata of a service's last check result."""
        name = urllib.parse.quote(f"{host}!{service}", safe="")
        return self._query(f"/v1/objects/services/{name}")

    def query_host(self, host: str) -> dict[str, Any]:
        return self._query(f"/v1/objects/hosts/{urllib.parse.quote(host, safe='')}")

    def _query(self, path: str) -> dict[str, Any]:
        status, answer = self.api("GET", path + "?attrs=state&attrs=last_check_result")
        if status != 200:
            raise LookupError(f"GET {path} answered {status}: {answer}")
        attrs = answer["results"][0]["attrs"]
        result = attrs.get("last_check_result") or {}
        return {
            "state": attrs.get("state"),
            "output": result.get("output"),
            "performance_data": result.get("performance_data") or [],
            "check_source": result.get("check_source"),
            "ttl": result.get("ttl"),
            "last_check_result": result,
        }

    def _wait_for_api(self, deadline: float) -> None:
        while True:
            try:
                status, _ = self.api("GET", "/v1/objects/zones")
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"icinga2 API at {self.url} never answered:\n{self.log_tail()}")
            time.sleep(0.1)
