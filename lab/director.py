"""A throw-away Icinga Director to restore zettabee's basket into.

Everything lives in one directory that the lab owns: a MariaDB server (its own datadir,
socket, pid file and a free loopback port, started with ``mariadbd --user=root``) and an
Icinga Web 2 configuration directory (``ICINGAWEB_CONFIGDIR``) whose only resource is
that database. The system's MariaDB, Icinga Web 2 config and Director database are never
touched. ``stop()`` ends only the server this lab started, by its pid.

Debian packages: mariadb-server, icingaweb2, icingaweb2-module-director, icingacli,
php-mysql.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

MODULES_DIR = Path("/usr/share/icingaweb2/modules")
DIRECTOR_MODULES = ("director", "incubator", "reactbundle")
BINARIES = ("mariadb-install-db", "mariadbd", "mariadb", "icingacli")

DB_NAME = "director"
DB_USER = "director"
DB_PASSWORD = "zettabee-lab"


class LabError(RuntimeError):
    """A lab step failed; the message carries the tool's own output."""


def missing_binaries() -> list[str]:
    """The tools this lab needs that are not installed (empty when it can run)."""
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if not (MODULES_DIR / "director" / "module.info").exists():
        missing.append("icingaweb2-module-director")
    return missing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def strip_uuids(value: Any) -> Any:
    """The basket without its "uuid" keys, for Director before 1.11.

    Director 1.11 matches basket objects by their UUID first; 1.10 (Debian 12) knows
    no basket UUIDs and fails on them, but matches by name, so a re-import stays
    idempotent there too.
    """
    if isinstance(value, dict):
        return {k: strip_uuids(v) for k, v in value.items() if k != "uuid"}
    if isinstance(value, list):
        return [strip_uuids(v) for v in value]
    return value


class DirectorLab:
    """MariaDB plus an Icinga Web 2 config dir with the Director module, under ``root``."""

    def __init__(self, root: Path | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="zettabee-director-"))
        self.datadir = self.root / "mariadb"
        self.socket = self.root / "mariadb.sock"
        self.configdir = self.root / "icingaweb2"
        self.port = 0
        self._server: subprocess.Popen[bytes] | None = None

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> DirectorLab:
        missing = missing_binaries()
        if missing:
            raise LabError(f"not installed: {', '.join(missing)}")
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_mariadb()
        self._create_database()
        self._write_icingaweb_config()
        self.icingacli("director", "migration", "run")
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DirectorLab:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- MariaDB ------------------------------------------------------------------

    def _start_mariadb(self) -> None:
        run(
            "mariadb-install-db",
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        )
        log = self.root / "mariadb.err"
        for _attempt in range(3):
            self.port = free_port()
            self._server = subprocess.Popen(
                [
                    "mariadbd",
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    f"--socket={self.socket}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    "--skip-name-resolve",
                    "--user=root",
                    f"--pid-file={self.root / 'mariadb.pid'}",
                    f"--log-error={log}",
                    "--innodb-buffer-pool-size=32M",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_for_server():
                return
            # Most likely somebody took the port between our probe and the bind.
            self._server.wait()
            self._server = None
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise LabError(f"mariadbd did not come up:\n{tail}")

    def _wait_for_server(self, timeout: float = 30.0) -> bool:
        assert self._server is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                return False
            if self.socket.exists():
                probe = subprocess.run(
                    self._client_argv() + ["-e", "SELECT 1"], capture_output=True, text=True
                )
                if probe.returncode == 0:
                    return True
            time.sleep(0.1)
        self._server.terminate()
        return False

    def _client_argv(self, database: str | None = None) -> list[str]:
        argv = ["mariadb", "--no-defaults", f"--socket={self.socket}", "--user=root"]
        return argv + ([database] if database else [])

    def _create_database(self) -> None:
        self.sql(
            f"CREATE DATABASE {DB_NAME} CHARACTER SET utf8mb4;"
            f" CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}';"
            f" GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1';",
            database=None,
        )

    def sql(self, statement: str, database: str | None = DB_NAME) -> list[list[str]]:
        """Run SQL as root over the socket; rows of tab-separated columns, no header."""
        proc = run(
            *self._client_argv(database), "--batch", "--raw", "--skip-column-names", "-e", statement
        )
        return [line.split("\t") for line in proc.stdout.splitlines()]

    # -- Icinga Web 2 and the Director ----------------------------------------------

    def _write_icingaweb_config(self) -> None:
        cfg = self.configdir
        (cfg / "modules" / "director").mkdir(parents=True, exist_ok=True)
        (cfg / "enabledModules").mkdir(exist_ok=True)
        (cfg / "config.ini").write_text(
            "[global]\n"
            f'module_path = "{MODULES_DIR}"\n'
            'config_backend = "ini"\n'
            "\n[logging]\n"
            'log = "none"\n'
        )
        (cfg / "resources.ini").write_text(
            "[director_db]\n"
            'type = "db"\n'
            'db = "mysql"\n'
            'host = "127.0.0.1"\n'
            f'port = "{self.port}"\n'
            f'dbname = "{DB_NAME}"\n'
            f'username = "{DB_USER}"\n'
            f'password = "{DB_PASSWORD}"\n'
            'charset = "utf8mb4"\n'
        )
        (cfg / "modules" / "director" / "config.ini").write_text('[db]\nresource = "director_db"\n')
        for module in DIRECTOR_MODULES:
            link = cfg / "enabledModules" / module
            if not link.exists():
                link.symlink_to(MODULES_DIR / module)

    def icingacli(self, *args: str, input: str | None = None) -> str:
        """Run icingacli against this lab's Icinga Web 2 config; stdout on success."""
        env = dict(os.environ, ICINGAWEB_CONFIGDIR=str(self.configdir))
        proc = subprocess.run(
            ["icingacli", *args], capture_output=True, text=True, input=input, env=env
        )
        # icingacli prints its errors ("ERROR: ...") on stdout as often as on stderr.
        if proc.returncode != 0 or proc.stdout.startswith("ERROR:"):
            raise LabError(
                f"icingacli {' '.join(args)}: exit {proc.returncode}:"
                f" {proc.stdout.strip()} {proc.stderr.strip()}".strip()
            )
        return proc.stdout

    def director_version(self) -> tuple[int, ...]:
        for line in (MODULES_DIR / "director" / "module.info").read_text().splitlines():
            if line.startswith("Version:"):
                return tuple(int(p) for p in line.split(":", 1)[1].strip().split("."))
        raise LabError("no Version in the Director's module.info")

    def knows_basket_uuids(self) -> bool:
        return self.director_version() >= (1, 11)

    def restore_basket(self, basket: dict[str, Any]) -> str:
        """``icingacli director basket restore`` with the basket on stdin."""
        if not self.knows_basket_uuids():
            basket = strip_uuids(basket)
        return self.icingacli("director", "basket", "restore", input=json.dumps(basket))

    def show_json(self, kind: str, name: str) -> dict[str, Any]:
        """One Director object as JSON, e.g. ``show_json("command", "zettabee_lag")``."""
        return json.loads(self.icingacli("director", kind, "show", name, "--json"))

    def render(self, kind: str, name: str) -> str:
        """One Director object rendered as Icinga 2 configuration."""
        return self.icingacli("director", kind, "show", name)

    def activity_count(self) -> int:
        return int(self.sql("SELECT COUNT(*) FROM director_activity_log")[0][0])

    def datafields(self) -> dict[str, str]:
        """varname -> datatype of every data field in the Director."""
        rows = self.sql("SELECT varname, datatype FROM director_datafield")
        return {varname: datatype for varname, datatype in rows}


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc
