"""Fixtures for the real monitoring daemons: Debian's nsca and a private icinga2.

- ``nscad``: a fresh nsca per test, XOR encryption (method 1) with a random password;
- ``nscad_plain``: the same without encryption (method 0);
- ``icinga2_lab``: one icinga2 for the session with the API on 127.0.0.1, the objects of
  ``lab.icinga.lab_objects()`` (``LAB_HOST`` with the passive ``LAB_SERVICES`` ...), and
  the API users ``submitter`` (only ``actions/process-check-result``), ``reader``
  (``objects/query/*``), ``no-permission`` (query only, cannot submit) and ``cert-user``
  (client certificate with CN ``zb-client``); get them with ``icinga2_lab.user(name)``.

Each skips, with the reason, when not root or when the daemon is not installed; with
CI=true the top-level conftest turns those skips into failures.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.icinga import ICINGA2_BINARY, ApiUser, Icinga2Daemon, lab_objects
from lab.nscad import NSCA_BINARY, SEND_NSCA_BINARY, NscaDaemon


def missing(binary: str, package: str) -> str | None:
    if os.geteuid() != 0:
        return "the monitoring lab needs root"
    if not Path(binary).exists() and not shutil.which(Path(binary).name):
        return f"{binary} is not installed (apt-get install {package})"
    return None


def require(binary: str, package: str) -> None:
    reason = missing(binary, package)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def nscad() -> Iterator[NscaDaemon]:
    require(NSCA_BINARY, "nsca")
    with NscaDaemon(password=secrets.token_hex(8), decryption=1) as daemon:
        yield daemon


@pytest.fixture
def nscad_plain() -> Iterator[NscaDaemon]:
    require(NSCA_BINARY, "nsca")
    with NscaDaemon(decryption=0) as daemon:
        yield daemon


@pytest.fixture
def send_nsca_binary() -> str:
    require(SEND_NSCA_BINARY, "nsca-client")
    return SEND_NSCA_BINARY


@pytest.fixture(scope="session")
def icinga2_lab() -> Iterator[Icinga2Daemon]:
    require(ICINGA2_BINARY, "icinga2")
    users = [
        ApiUser("no-permission", secrets.token_hex(8), ("objects/query/*",)),
        ApiUser("cert-user", None, ("actions/process-check-result",), client_cn="zb-client"),
    ]
    daemon = Icinga2Daemon(lab_objects(), users=users)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        daemon.cleanup()
