"""The Debian package installed with apt in a fresh Debian 12 and Debian 13 guest.

Each guest (the OpenZFS lab image: OpenZFS 2.1 on Debian 12, 2.3 on Debian 13) is booted
for this module alone, beside any guest the session shares (``Guest(scratch=True)``), and
its disk is thrown away afterwards. The guest has no route out; its apt reaches Debian's
archive, and only it, through ``lab.aptproxy``, which listens on the guest's gateway and
records every URL it fetched. The image comes with Debian's nagiosplugin and paramiko
(the lab runs zettabee there): they are purged first, with what only they needed, so
that ``apt install ./zettabee_*.deb`` must fetch them.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.aptproxy import AptProxy
from lab.guest import GUEST_GATEWAY, SUITES, Guest, GuestError
from lab.zfslab import test_lab_name as lab_name
from tests.conftest import guest_missing
from tests.integration.test_debian_package import EXECUTABLES, deb_tools_missing, make_deb
from zettabee import __version__

pytestmark = pytest.mark.integration

# Pre-installed in the lab's image; the package must bring them back from Debian.
DEPENDENCIES = ("python3-nagiosplugin", "python3-paramiko")
NONINTERACTIVE = "DEBIAN_FRONTEND=noninteractive"
TIMER = "zettabee-replicate.timer"
SERVICE = "zettabee-replicate.service"


@dataclass
class Installed:
    guest: Guest
    proxy: AptProxy
    deb: str  # its path in the guest
    apt_output: str  # what `apt install ./zettabee_*.deb` printed
    fetched_by_install: list[str]  # the URLs the proxy fetched for it


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    missing = deb_tools_missing()
    if missing:
        pytest.skip(missing)
    top = Path(tempfile.mkdtemp(prefix="zettabee-deb-guest-", dir="/var/tmp"))
    try:
        yield make_deb(top)[0]
    finally:
        shutil.rmtree(top, ignore_errors=True)


# "openzfs-2.1" and "openzfs-2.3": the names tests/conftest.py orders the guests' tests by.
@pytest.fixture(scope="module", params=[f"openzfs-{zfs}" for zfs in SUITES])
def fresh_guest(request: pytest.FixtureRequest) -> Iterator[tuple[Guest, AptProxy]]:
    """A guest of its own for one OpenZFS version, with its apt proxy."""
    missing = guest_missing()
    if missing:
        pytest.skip(missing)
    vm = Guest(lab_name(), zfs=request.param.removeprefix("openzfs-"), scratch=True)
    with vm.held():
        try:
            try:
                vm.build()
                vm.up()
            except GuestError as exc:
                pytest.fail(str(exc), pytrace=False)
            with AptProxy(vm.netns, GUEST_GATEWAY) as proxy:
                yield vm, proxy
        finally:
            vm.down()


def guest_sh(vm: Guest, script: str, timeout: float = 900) -> str:
    """Run ``script`` in the guest; its stdout, or the failure with both outputs."""
    proc = vm.shell(script, check=False, timeout=timeout)
    assert proc.returncode == 0, (
        f"guest: {script}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def copy_into(vm: Guest, local: Path, remote: str) -> None:
    with open(local, "rb") as data:
        proc = subprocess.run(
            vm.source.ssh_argv(f"cat > {shlex.quote(remote)}"),
            stdin=data,
            capture_output=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr


def package_status(vm: Guest, *packages: str) -> dict[str, str]:
    """dpkg's status of each package ('install ok installed', ...; '' when unknown)."""
    out = vm.run("dpkg-query", "-W", "-f", "${Package} ${Status}\\n", *packages, check=False).stdout
    status = dict.fromkeys(packages, "")
    for line in out.splitlines():
        name, _, state = line.partition(" ")
        status[name] = state
    return status


@pytest.fixture(scope="module")
def installed(fresh_guest: tuple[Guest, AptProxy], deb: Path) -> Installed:
    """What an admin does: apt pointed at the archive (here through the proxy), the
    dependencies gone as on a fresh host, then ``apt install ./zettabee_VERSION_all.deb``."""
    vm, proxy = fresh_guest
    remote = f"/root/{deb.name}"
    copy_into(vm, deb, remote)
    vm.shell(
        "cat > /etc/apt/apt.conf.d/80zettabee-lab-proxy",
        input=f'Acquire::http::Proxy "{proxy.url}";\n',
    )
    guest_sh(vm, "apt-get -q update")
    # man itself is not the package's to bring (Debian's own hosts have it).
    guest_sh(vm, f"{NONINTERACTIVE} apt-get -y -q install --no-install-recommends man-db")
    guest_sh(vm, f"{NONINTERACTIVE} apt-get -y -q purge --autoremove {' '.join(DEPENDENCIES)}")
    left = package_status(vm, *DEPENDENCIES)
    assert "install ok installed" not in left.values(), left
    before = len(proxy.fetched())
    output = guest_sh(vm, f"cd /root && {NONINTERACTIVE} apt install -y ./{deb.name}")
    return Installed(vm, proxy, remote, output, proxy.fetched()[before:])


def test_apt_install_pulls_the_dependencies_from_debian_and_every_command_and_page_works(
    installed: Installed,
) -> None:
    vm = installed.guest
    suite = SUITES[vm.zfs]
    for name in DEPENDENCIES:
        # apt says where it got each one, and the proxy fetched exactly that package
        assert re.search(rf"^Get:\d+ http://deb\.debian\.org/\S+ {suite}\S* .*\b{name} ",
                         installed.apt_output, re.M), installed.apt_output  # fmt: skip
        assert any(f"/{name}_" in url and url.endswith(".deb")
                   for url in installed.fetched_by_install), installed.fetched_by_install  # fmt: skip
    assert installed.proxy.refused() == []
    assert set(package_status(vm, "zettabee", *DEPENDENCIES).values()) == {"install ok installed"}

    version = vm.run("zettabee", "--version", check=False)
    assert (version.returncode, version.stdout.strip()) == (0, f"zettabee {__version__}")
    # A plugin's every exit is UNKNOWN, --help included.
    lag = vm.run("/usr/lib/nagios/plugins/check_zettabee_lag", "--help", check=False)
    assert lag.returncode == 3 and lag.stdout.startswith("usage: check_zettabee_lag"), lag

    for name, (_path, page) in EXECUTABLES.items():
        man = vm.shell(
            f"MANWIDTH=100 MANPAGER=cat man --warnings -l /{page}", check=False, timeout=120
        )
        assert man.returncode == 0 and not man.stderr, f"{page}: {man.stderr}"
        assert name.upper() in man.stdout.split("\n", 1)[0], man.stdout[:300]


def wait_for_the_service_run(vm: Guest, timeout: float = 300) -> dict[str, str]:
    """systemd's record of the service's run, once its process has exited."""
    deadline = time.monotonic() + timeout
    while True:
        out = vm.run(
            "systemctl", "show", SERVICE,
            "-p", "ActiveState,Result,ExecMainStatus,ExecMainExitTimestampMonotonic",
        ).stdout  # fmt: skip
        shown = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if shown.get("ExecMainExitTimestampMonotonic", "0") != "0" and shown["ActiveState"] in (
            "inactive",
            "failed",
        ):
            return shown
        assert time.monotonic() < deadline, f"{SERVICE} did not run within {timeout:.0f} s: {shown}"
        time.sleep(2)


def test_the_timer_replicates_a_pair_and_remove_keeps_etc_zettabee_purge_removes_it(
    installed: Installed,
) -> None:
    vm = installed.guest
    src, dst = f"{vm.src_pool}/home", f"{vm.dst_pool}/home"
    # An admin's pair, written into the shipped pair file; setup and the full transfer.
    guest_sh(vm, f"zfs create {src} && head -c 4M /dev/urandom > /{src}/first.bin")
    guest_sh(vm, f"echo 'localhost:{src}  localhost:{dst}  transport=local' "
                 ">> /etc/zettabee/zettabee.cfg")  # fmt: skip
    guest_sh(vm, f"zettabee setup && zettabee initialize {dst}")
    guest_sh(vm, f"head -c 2M /dev/urandom > /{src}/second.bin")

    # Enabled as the README says; an admin's drop-in makes it fire 2 s after it starts
    # instead of at the next quarter hour.
    guest_sh(vm, f"mkdir -p /etc/systemd/system/{TIMER}.d && printf '[Timer]\\nOnActiveSec=2s\\n"
                 f"RandomizedDelaySec=0\\n' > /etc/systemd/system/{TIMER}.d/soon.conf && "
                 "systemctl daemon-reload")  # fmt: skip
    guest_sh(vm, f"systemctl enable --now {TIMER}")
    shown = wait_for_the_service_run(vm)
    assert (shown["Result"], shown["ExecMainStatus"]) == ("success", "0"), shown
    timer = vm.run("systemctl", "show", TIMER, "-p", "LastTriggerUSecMonotonic").stdout
    assert timer.strip() != "LastTriggerUSecMonotonic=0", timer
    journal = guest_sh(vm, f"journalctl --no-pager -o cat -u {SERVICE}")
    for said in (f"Starting {SERVICE}", f"Finished {SERVICE}"):
        assert re.search(rf"^{re.escape(said)}\b", journal, re.M), journal

    # The timer's run sent what was written after the full transfer.
    sums = guest_sh(vm, f"cd /{src} && sha256sum *.bin")
    assert guest_sh(vm, f"cd /{dst} && sha256sum *.bin") == sums
    assert "second.bin" in sums

    # remove: the commands go, the settings and the admin's pair stay
    guest_sh(vm, f"{NONINTERACTIVE} apt remove -y zettabee")
    assert package_status(vm, "zettabee")["zettabee"] == "deinstall ok config-files"
    kept = guest_sh(vm, "ls /etc/zettabee; grep -c transport=local /etc/zettabee/zettabee.cfg")
    assert kept.split() == ["zettabee.cfg", "zettabee.ini", "1"], kept
    assert vm.run("test", "-e", "/usr/sbin/zettabee", check=False).returncode == 1

    # purge: /etc/zettabee and the state go; the replica stays in ZFS
    guest_sh(vm, f"{NONINTERACTIVE} apt purge -y zettabee")
    assert package_status(vm, "zettabee")["zettabee"] in ("", "unknown ok not-installed")
    gone = guest_sh(vm, "for d in /etc/zettabee /var/lib/zettabee /var/log/zettabee; do "
                        'test -e $d && echo "kept $d" || echo "gone $d"; done')  # fmt: skip
    assert gone.split("\n")[:3] == ["gone /etc/zettabee", "gone /var/lib/zettabee",
                                    "gone /var/log/zettabee"], gone  # fmt: skip
    assert guest_sh(vm, f"zfs list -H -o name {dst}").strip() == dst
