"""The Debian package, built by ``make deb`` in a copy of the tree and judged as a whole.

The package is never installed on this machine. Its files are unpacked with ``dpkg-deb
-x`` into a throwaway root and run from there (the modules through ``PYTHONPATH``); the
maintainer scripts run in a mount namespace whose /run and /var directories are empty
tmpfs, against ``$DPKG_ROOT``; ``systemd-analyze verify`` and ``icinga2 daemon -C`` read
the unpacked root as they would read /.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_icinga_conf import Icinga2Sandbox
from zettabee import __version__

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = "usr/lib/nagios/plugins"
DIST_PACKAGES = "usr/lib/python3/dist-packages"
UNITS = "lib/systemd/system"
CONTRIB = "usr/share/icinga2/include/plugins-contrib.d/zettabee.conf"

pytestmark = pytest.mark.integration

# Where each executable is installed, and its man page: /usr/sbin for what needs root
# (receives, mounts, the state directories), /usr/bin for the source's forced command
# (an unprivileged user with delegated zfs permissions may run it), the plugins where
# Icinga's PluginDir and Nagios' $USER1$ point.
EXECUTABLES = {
    "zettabee": ("usr/sbin/zettabee", "usr/share/man/man8/zettabee.8.gz"),
    "replicate": ("usr/sbin/replicate", "usr/share/man/man8/replicate.8.gz"),
    "zettabee-source": ("usr/bin/zettabee-source", "usr/share/man/man1/zettabee-source.1.gz"),
    "check_zettabee_lag": (
        f"{PLUGIN_DIR}/check_zettabee_lag",
        "usr/share/man/man1/check_zettabee_lag.1.gz",
    ),
    "check_zettabee_runtime": (
        f"{PLUGIN_DIR}/check_zettabee_runtime",
        "usr/share/man/man1/check_zettabee_runtime.1.gz",
    ),
}

# path in the package -> mode (every file root:root)
FILES = {
    **{path: 0o755 for path, _ in EXECUTABLES.values()},
    **{page: 0o644 for _, page in EXECUTABLES.values()},
    "etc/zettabee/zettabee.ini": 0o600,
    "etc/zettabee/zettabee.cfg": 0o644,
    "etc/cron.d/zettabee": 0o644,
    "etc/logrotate.d/zettabee": 0o644,
    f"{UNITS}/zettabee-replicate.service": 0o644,
    f"{UNITS}/zettabee-replicate.timer": 0o644,
    "usr/lib/tmpfiles.d/zettabee.conf": 0o644,
    CONTRIB: 0o644,
    "usr/share/zettabee/icinga-conf/icinga2/templates.conf": 0o644,
    "usr/share/zettabee/icinga-conf/icinga2/services.conf": 0o644,
    "usr/share/zettabee/icinga-conf/nagios/commands.cfg": 0o644,
    "usr/share/zettabee/icinga-conf/nagios/templates.cfg": 0o644,
    "usr/share/zettabee/icinga-conf/director/zettabee-basket.json": 0o644,
    "usr/share/doc/zettabee/README.md.gz": 0o644,
    "usr/share/doc/zettabee/README.icinga-conf.md.gz": 0o644,
    "usr/share/doc/zettabee/copyright": 0o644,
    f"{DIST_PACKAGES}/zettabee/__init__.py": 0o644,
    f"{DIST_PACKAGES}/nsca/__init__.py": 0o644,
}

CONFFILES = {
    "/etc/zettabee/zettabee.ini",
    "/etc/zettabee/zettabee.cfg",
    "/etc/cron.d/zettabee",
    "/etc/logrotate.d/zettabee",
}


@dataclass(frozen=True)
class Built:
    deb: Path
    root: Path  # the package unpacked (dpkg-deb -x)
    control: Path  # its control files (dpkg-deb -e)
    seconds: float

    def run(self, name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """An installed executable, as its shebang starts it, with the unpacked modules."""
        path = self.root / EXECUTABLES[name][0]
        environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
        environ["PYTHONPATH"] = str(self.root / DIST_PACKAGES)
        return subprocess.run(
            [str(path), *args], env={**environ, **env}, capture_output=True, text=True, timeout=60
        )


def _copy_tree(target: Path) -> None:
    """The work tree as git knows it (tracked files and new ones not ignored)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listing.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def deb_tools_missing() -> str | None:
    """Why ``make deb`` cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "make deb installs its build tools with apt-get: needs root"
    for tool in ("dpkg-buildpackage", "dh", "lintian", "git"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make deps installs the build tools)"
    return None


def make_deb(top: Path) -> tuple[Path, float]:
    """``make deb`` in a copy of the work tree under ``top``: the package and the seconds
    it took."""
    tree = top / "tree"
    _copy_tree(tree)
    start = time.monotonic()
    proc = subprocess.run(
        ["make", "deb"],
        cwd=tree,
        # The unit tests the build runs are make test's own; here the package is judged.
        env={**os.environ, "DEB_BUILD_OPTIONS": "nocheck"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 0, f"make deb failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    debs = list((tree / "dist").glob("*.deb"))
    assert [d.name for d in debs] == [f"zettabee_{__version__}_all.deb"]
    return debs[0], seconds


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    missing = deb_tools_missing()
    if missing:
        pytest.skip(missing)
    # Readable by everyone (the plugins run as nagios below): not under pytest's 0700 tmp.
    top = Path(tempfile.mkdtemp(prefix="zettabee-deb-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        deb, seconds = make_deb(top)
        root, control = top / "root", top / "control"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
        root.chmod(0o755)
        yield Built(deb, root, control, seconds)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def field(built: Built, name: str) -> str:
    proc = subprocess.run(
        ["dpkg-deb", "-f", str(built.deb), name], capture_output=True, text=True, check=True
    )
    return " ".join(proc.stdout.split())


def test_the_control_fields_name_debians_own_packages(built: Built) -> None:
    assert field(built, "Package") == "zettabee"
    assert field(built, "Version") == __version__
    assert field(built, "Architecture") == "all"
    depends = {d.strip() for d in field(built, "Depends").split(",")}
    assert {
        "python3 (>= 3.11)",
        "python3-nagiosplugin",
        "python3-paramiko",
        "openssh-client",
    } <= depends
    assert field(built, "Recommends") == "mbuffer, zfsutils-linux | zfs-fuse"
    assert field(built, "Suggests") == "nsca-client, icinga2"


def listing(built: Built) -> dict[str, tuple[str, str]]:
    """path -> (ls-style mode, owner/group), from dpkg-deb -c."""
    proc = subprocess.run(
        ["dpkg-deb", "-c", str(built.deb)], capture_output=True, text=True, check=True
    )
    files = {}
    for line in proc.stdout.splitlines():
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        files[path.removeprefix("./").split(" -> ")[0].rstrip("/")] = (mode, owner)
    return files


def test_every_file_is_where_admins_look_with_its_mode(built: Built) -> None:
    files = listing(built)
    wrong = {}
    for path, mode in FILES.items():
        want = stat.filemode(stat.S_IFREG | mode)
        got = files.get(path)
        if got != (want, "root/root"):
            wrong[path] = got
    assert not wrong, f"missing or with other modes (expected {FILES}): {wrong}"
    # Nothing lands in the Python-only place pip would use, and the timer is not enabled.
    assert not [p for p in files if p.startswith("usr/bin/") and p != "usr/bin/zettabee-source"]
    assert not [p for p in files if p.startswith("etc/systemd")]
    assert not [p for p in files if "/tests/" in p or p.startswith(f"{DIST_PACKAGES}/lab")]


def test_the_settings_the_pair_file_cron_and_logrotate_are_conffiles(built: Built) -> None:
    conffiles = set((built.control / "conffiles").read_text().split())
    assert conffiles == CONFFILES


def test_lintian_reports_no_error_and_no_warning(built: Built) -> None:
    proc = subprocess.run(
        ["lintian", "--tag-display-limit", "0", str(built.deb)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert not tags, proc.stdout


def test_every_executable_runs_with_debians_python_and_the_unpacked_modules(built: Built) -> None:
    for name, (path, _page) in EXECUTABLES.items():
        first = (built.root / path).read_text().split("\n", 1)[0]
        assert first == "#!/usr/bin/python3", f"{name}: {first}"

    version = built.run("zettabee", "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"zettabee {__version__}")
    usage = built.run("zettabee", "--help")
    assert usage.returncode == 0 and "initialize" in usage.stdout, usage
    assert built.run("replicate", "--help").returncode == 0

    # A plugin's every exit is UNKNOWN, --help included (zettabee.checks.PluginParser).
    lag = built.run("check_zettabee_lag", "--help")
    assert lag.returncode == 3, lag
    assert lag.stdout.startswith("usage: check_zettabee_lag")

    refused = built.run("zettabee-source", "tank/home", SSH_ORIGINAL_COMMAND="rm -rf /")
    assert refused.returncode == 126, refused
    assert refused.stderr.startswith("zettabee-source: refused: ")


def test_the_plugins_run_as_the_monitoring_user(built: Built) -> None:
    if subprocess.run(["id", "nagios"], capture_output=True).returncode != 0:
        pytest.skip("no nagios user (Debian's nagios4 or icinga2 packages make it)")
    for name in ("check_zettabee_lag", "check_zettabee_runtime"):
        plugin = built.root / EXECUTABLES[name][0]
        proc = subprocess.run(
            ["runuser", "-u", "nagios", "--", "env", f"PYTHONPATH={built.root / DIST_PACKAGES}",
             str(plugin), "--version"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (proc.returncode, proc.stdout.strip()) == (3, f"{name} (zettabee {__version__})")


def test_the_shipped_settings_and_pair_file_load_and_replicate_nothing(
    built: Built, tmp_path: Path
) -> None:
    etc = built.root / "etc/zettabee"
    check = built.run(
        "zettabee", "--settings", str(etc / "zettabee.ini"), "-c", str(etc / "zettabee.cfg"),
        "check-config",
    )  # fmt: skip
    assert (check.returncode, check.stdout.strip()) == (0, "0 pairs, no problems"), check

    # What the timer runs, on the pair file as shipped: nothing to do, nothing said.
    settings = tmp_path / "zettabee.ini"
    settings.write_text(
        "[paths]\n"
        + "".join(f"{key} = {tmp_path / key}\n" for key in ("state_dir", "log_dir", "lock_dir", "spool_dir"))
    )  # fmt: skip
    run = built.run(
        "replicate", "--all", "--settings", str(settings), "-c", str(etc / "zettabee.cfg")
    )
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")

    cron = (built.root / "etc/cron.d/zettabee").read_text().splitlines()
    assert [line for line in cron if line.strip() and not line.startswith("#")] == []
    assert any("/usr/sbin/replicate --all" in line for line in cron)


def _options_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", text))


def test_every_man_page_renders_and_names_every_option_of_help(built: Built) -> None:
    for name, (_path, page) in EXECUTABLES.items():
        man = subprocess.run(
            ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", str(built.root / page)],
            capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MANWIDTH": "200"},
        )  # fmt: skip
        assert man.returncode == 0 and not man.stderr, f"{page}: {man.stderr}"
        text = re.sub(r".\x08", "", man.stdout).replace("\u2010", "-")
        assert name.upper() in text.split("\n", 1)[0]
        helps = [built.run(name, "--help").stdout]
        if name == "zettabee":
            helps += [built.run(name, action, "--help").stdout for action in _actions(helps[0])]
        missing = set().union(*map(_options_in, helps)) - _options_in(text) - {"-h", "--help"}
        assert not missing, f"{page} lacks what --help shows: {sorted(missing)}"


def _actions(help_text: str) -> list[str]:
    """The actions listed under ACTION in zettabee's --help."""
    actions = re.findall(r"^    ([a-z][a-z-]+)(?:  |$)", help_text, re.M)
    assert len(actions) > 5, help_text
    return actions


def unit(built: Built, name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False)
    parser.read_string((built.root / UNITS / name).read_text())
    return parser


def test_the_timer_runs_replicate_every_15_minutes_and_systemd_accepts_both_units(
    built: Built, tmp_path: Path
) -> None:
    service, timer = (unit(built, f"zettabee-replicate.{kind}") for kind in ("service", "timer"))
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"] == "/usr/sbin/replicate --all"
    assert {"network-online.target", "zfs.target"} <= set(service["Unit"]["After"].split())
    assert timer["Timer"]["OnCalendar"] == "*:0/15"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"] == "1min"
    assert timer["Install"]["WantedBy"] == "timers.target"

    # verify reads the units, the targets they name and the executable they start from
    # --root: the unpacked package with this machine's own units beside it.
    shutil.copytree(
        "/usr/lib/systemd/system", built.root / UNITS, symlinks=True, dirs_exist_ok=True
    )
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={built.root}",
         f"/{UNITS}/zettabee-replicate.service", f"/{UNITS}/zettabee-replicate.timer"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr


def test_icinga_finds_the_commands_through_include_plugins_contrib(
    built: Built, tmp_path: Path
) -> None:
    if shutil.which("icinga2") is None:
        pytest.skip("icinga2 not installed (Debian package icinga2)")
    # Icinga's include directory as this machine has it, with the package's file added.
    include = tmp_path / "include"
    include.mkdir()
    system = Path("/usr/share/icinga2/include")
    for entry in system.iterdir():
        if entry.name != "plugins-contrib.d":
            (include / entry.name).symlink_to(entry)
    (include / "plugins-contrib.d").mkdir()
    for entry in (system / "plugins-contrib.d").iterdir():
        (include / "plugins-contrib.d" / entry.name).symlink_to(entry)
    (include / "plugins-contrib.d/zettabee.conf").symlink_to(built.root / CONTRIB)

    sandbox = Icinga2Sandbox(tmp_path / "icinga2")
    sandbox.main_config(
        "include <plugins-contrib>",
        'object Host "backup1" { check_command = "dummy" }',
        *(
            f'object Service "{cmd}" {{ host_name = "backup1"; check_command = "{cmd}"; '
            f'vars.{cmd.removesuffix("_sudo")}_destination = "backup/data" }}'
            for cmd in ("zettabee_lag", "zettabee_runtime", "zettabee_lag_sudo", "zettabee_runtime_sudo")
        ),
    )  # fmt: skip
    proc = subprocess.run(
        ["icinga2", "daemon", "-C", "-c", str(sandbox.etc / "icinga2.conf"),
         *sandbox.defines(), f"-DIncludeConfDir={include}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Instantiated 4 Services" in proc.stdout


def test_the_maintainer_scripts_make_the_directories_and_purge_removes_them(
    built: Built, tmp_path: Path
) -> None:
    """postinst configure, then postrm purge, against $DPKG_ROOT (the package unpacked);
    /run and the /var directories a helper might write to on this machine are private
    tmpfs in a mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed (Debian package util-linux)")
    # The root as dpkg leaves it before postinst: the package's files unpacked.
    target = tmp_path / "target"
    subprocess.run(["dpkg-deb", "-x", str(built.deb), str(target)], check=True)
    (target / "etc/zettabee/known_hosts").write_text("pinned by setup\n")
    (target / "etc/zettabee/mine.cfg").write_text("an admin's own file\n")
    control = built.control
    # dh_python3's byte-compilation asks dpkg for the package's files, which this machine
    # does not have installed: a stand-in says it was called.
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "py3compile").write_text('#!/bin/sh\necho "py3compile $*" >&2\n')
    (shims / "py3compile").chmod(0o755)
    script = f"""
set -e
export PATH={shims}:/usr/sbin:/usr/bin:/sbin:/bin
for dir in /run /var/lib /var/log /var/spool /var/cache; do mount -t tmpfs zettabee-test "$dir"; done
export DPKG_ROOT={target} DPKG_MAINTSCRIPT_PACKAGE=zettabee DPKG_MAINTSCRIPT_NAME=postinst
{control}/postinst configure
stat -c '%a %U:%G %n' {target}/var/lib/zettabee {target}/var/log/zettabee \
    {target}/var/spool/zettabee {target}/run/zettabee
# the timer is known to deb-systemd-helper (purge cleans it up), and not enabled
cat {target}/var/lib/systemd/deb-systemd-helper-enabled/zettabee-replicate.timer.dsh-also
test ! -e {target}/etc/systemd/system/timers.target.wants/zettabee-replicate.timer
echo '{{}}' > {target}/var/lib/zettabee/status.json
chmod 2750 {target}/var/lib/zettabee
{control}/postinst configure 0.0.9
stat -c 'again %a %n' {target}/var/lib/zettabee
DPKG_MAINTSCRIPT_NAME=postrm {control}/postrm remove
test -d {target}/var/lib/zettabee
# purge: dpkg removes the conffiles, then runs postrm
rm {" ".join(str(target) + path for path in sorted(CONFFILES))}
DPKG_MAINTSCRIPT_NAME=postrm {control}/postrm purge
for path in var/lib/zettabee var/log/zettabee var/spool/zettabee run/zettabee \
        etc/zettabee/known_hosts \
        var/lib/systemd/deb-systemd-helper-enabled/zettabee-replicate.timer.dsh-also \
        etc/zettabee/mine.cfg; do
    if [ -e "{target}/$path" ]; then echo "kept $path"; else echo "gone $path"; fi
done
rm {target}/etc/zettabee/mine.cfg
DPKG_MAINTSCRIPT_NAME=postrm {control}/postrm purge
test -e {target}/etc/zettabee && echo "kept etc/zettabee" || echo "gone etc/zettabee"
"""
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "py3compile -p zettabee" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == [
        f"750 root:root {target}/var/lib/zettabee",
        f"750 root:root {target}/var/log/zettabee",
        f"700 root:root {target}/var/spool/zettabee",
        f"750 root:root {target}/run/zettabee",
    ]
    # What enabling would link; the test after the cat says it is not linked.
    assert lines[4] == "/etc/systemd/system/timers.target.wants/zettabee-replicate.timer"
    # An upgrade keeps what the admin gave the state directory (the monitoring group's bit).
    assert lines[5] == f"again 2750 {target}/var/lib/zettabee"
    # After purge: what zettabee wrote is gone, an admin's own file in /etc/zettabee stays.
    assert lines[6:] == [
        "gone var/lib/zettabee",
        "gone var/log/zettabee",
        "gone var/spool/zettabee",
        "gone run/zettabee",
        "gone etc/zettabee/known_hosts",
        "gone var/lib/systemd/deb-systemd-helper-enabled/zettabee-replicate.timer.dsh-also",
        "kept etc/zettabee/mine.cfg",
        # without a file of the admin's, /etc/zettabee goes too
        "gone etc/zettabee",
    ], proc.stdout
