"""Unit tests of the SSH side of the runners: the client's argv and what its failures
mean, from what OpenSSH really prints."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from zettabee.errors import TransportError
from zettabee.host import SshHost, SshTarget, is_local_host, ssh_failure

TARGET = SshTarget("backup1", 22, "root", "/etc/zettabee/id", "/etc/zettabee/known_hosts")

CHANGED = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
The fingerprint for the ED25519 key sent by the remote host is
SHA256:o1ddAG3f/7v0l82VP5wJEw5u9RJl7DnQouheIjsIAz4.
Host key for backup1 has changed and you have requested strict checking.
Host key verification failed.
"""
UNKNOWN = """\
No ED25519 host key is known for backup1 and you have requested strict checking.
Host key verification failed.
"""


def test_a_changed_host_key_is_refused_for_good_and_names_the_new_key() -> None:
    err = ssh_failure(TARGET, 255, CHANGED)
    assert not err.transient
    assert "CHANGED" in str(err) and "SHA256:o1ddAG3f/7v0l82VP5wJEw5u9RJl7DnQouheIjsIAz4" in str(
        err
    )
    assert "/etc/zettabee/known_hosts" in str(err)


def test_an_unknown_host_key_says_how_to_pin_it() -> None:
    err = ssh_failure(TARGET, 255, UNKNOWN)
    assert not err.transient
    assert "unknown" in str(err) and "setup --accept-new-host-key" in str(err)


def test_a_refused_connection_may_heal_a_refused_key_not() -> None:
    refused = ssh_failure(TARGET, 255, "ssh: connect to host backup1 port 22: Connection refused\n")
    assert refused.transient
    assert str(refused) == "cannot connect to backup1 port 22: Connection refused"
    hung = ssh_failure(
        TARGET,
        255,
        "Connection timed out during banner exchange\nConnection to backup1 port 22 timed out\n",
    )
    assert (
        str(hung)
        == "cannot connect to backup1 port 22: Connection timed out during banner exchange"
    )
    denied = ssh_failure(TARGET, 255, "root@backup1: Permission denied (publickey).\n")
    assert not denied.transient and "/etc/zettabee/id" in str(denied)


def test_client_argv_pins_new_keys_only_when_asked() -> None:
    strict = TARGET.ssh_client_argv("true")
    assert "StrictHostKeyChecking=yes" in strict and "accept-new" not in " ".join(strict)
    pinning = TARGET.ssh_client_argv(None, control_path="/run/m", master=True,
                                     accept_new_host_key=True)  # fmt: skip
    assert "StrictHostKeyChecking=accept-new" in pinning and "HashKnownHosts=no" in pinning
    assert "StrictHostKeyChecking=yes" not in pinning
    assert pinning[-3:] == ["-N", "--", "backup1"] and "ControlMaster=yes" in pinning


def test_a_missing_known_hosts_file_fails_before_any_connection(tmp_path: Path) -> None:
    host = SshHost(SshTarget("backup1", known_hosts=str(tmp_path / "absent")))
    with pytest.raises(TransportError, match="does not exist.*--accept-new-host-key") as exc:
        host.connect()
    assert not exc.value.transient and host.connections == 0
    host.close()


def test_an_address_is_judged_without_the_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination given as an address is this host when it can be bound here; asking
    the resolver for this host's names first would make a check wait on a slow DNS."""

    def no_resolver(*_: object, **__: object) -> str:
        raise AssertionError("the resolver was asked")

    for name in ("getfqdn", "gethostname", "getaddrinfo", "gethostbyaddr"):
        monkeypatch.setattr(socket, name, no_resolver)
    assert is_local_host("127.0.0.2") and is_local_host("[::1]") and is_local_host("::1")
    assert not is_local_host("192.0.2.1")  # TEST-NET-1: nobody's address here


def test_a_command_that_outlives_sigkill_after_its_timeout_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zfs command on a suspended pool times out, is sent SIGKILL and sleeps on in the
    kernel: it was waited for without limit after the SIGKILL (subprocess.run does);
    now for a grace, then the run fails saying where it is stuck."""
    import os
    import signal
    import subprocess
    from typing import Any

    from zettabee import host
    from zettabee.errors import CommandError
    from zettabee.host import LocalHost

    class InTheKernel(subprocess.Popen):  # type: ignore[type-arg]
        """No signal ends it; a wait without limit fails the test instead of hanging."""

        def send_signal(self, sig: int) -> None:
            pass

        def wait(self, timeout: float | None = None) -> int:
            assert timeout is not None, "waited without limit for a process SIGKILL cannot end"
            return super().wait(timeout)

    started: list[InTheKernel] = []

    def popen(*args: Any, **kw: Any) -> InTheKernel:
        started.append(InTheKernel(*args, **kw))
        return started[-1]

    monkeypatch.setattr(host, "KILL_GRACE", 0.2)
    monkeypatch.setattr(host.subprocess, "Popen", popen)
    try:
        with pytest.raises(CommandError) as caught:
            LocalHost("backup1").run(["sleep", "60"], timeout=0.5)
    finally:
        for proc in started:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=5)
    message = str(caught.value)
    assert "did not exit after SIGKILL: stuck in the kernel" in message, message
    assert "zpool status" in message, message
