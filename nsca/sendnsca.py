"""A back end that pipes results to the system's classic ``send_nsca`` (NSCA 2.9+).

For sites that already run ``send_nsca`` with a tuned ``send_nsca.cfg`` (a libmcrypt
cipher this package cannot speak, say). The password and encryption method stay in that
file, readable by root only; nothing secret goes on the command line, where ``ps`` would
show it to every user.

Stdin format (``send_nsca`` 2.9+, checked against the Debian 2.10.2 binary): fields
separated by a tab, ``host<TAB>service<TAB>code<TAB>output`` for a service and
``host<TAB>code<TAB>output`` for a host; results separated by ETB (0x17), which is what
lets an output span several lines. The output field runs to the end of the record, so it
may hold tabs and ``|`` perfdata. ``send_nsca`` cuts the output at 4095 bytes without a
word; we cut first, keeping perfdata whole and marking the cut.

Not for NSCA-ng's ``send_nsca`` (another protocol on port 5668 and another config syntax):
its timeout option differs.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence

from nsca.client import DEFAULT_PORT, OUTPUT_FIELD, fit_output, names_error, oversized_names
from nsca.errors import SubmitError
from nsca.result import PassiveResult

log = logging.getLogger(__name__)

FIELD_SEPARATOR = "\t"
RECORD_SEPARATOR = "\x17"  # ETB

# What send_nsca prints (on stdout or stderr) when the server is unreachable or slow:
# worth a retry later. Anything else (a bad config file, a missing binary) is not.
_TRANSIENT_HINTS = (
    "could not connect",
    "connection refused",
    "timeout",
    "timed out",
    "server closed connection",
    "init packet",
    "could not send data",
    "sent only",
)


def format_record(result: PassiveResult) -> str:
    """One result in send_nsca's tab-separated form (without the record separator)."""
    code = result.host_state() if result.is_host_check else result.code
    text = fit_output(result, OUTPUT_FIELD)
    fields = [result.host, str(code), text]
    if result.service is not None:
        fields.insert(1, result.service)
    return FIELD_SEPARATOR.join(fields)


def format_stdin(results: Sequence[PassiveResult]) -> bytes:
    """Every result for one send_nsca run: ETB between records, a newline at the end."""
    return (RECORD_SEPARATOR.join(format_record(r) for r in results) + "\n").encode()


class SendNscaBackend:
    """Submits results by running ``send_nsca -H host -p port -to timeout -c config``."""

    name = "send_nsca"

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        binary: str = "/usr/sbin/send_nsca",
        config: str = "/etc/send_nsca.cfg",
        timeout: float = 10.0,
    ) -> None:
        if "%" in config:
            # send_nsca hands the -c argument to snprintf as the format string.
            raise ValueError(f"send_nsca cannot use a config path containing '%': {config!r}")
        self.host = host
        self.port = port
        self.binary = binary
        self.config = config
        self.timeout = timeout

    def __repr__(self) -> str:
        return (
            f"SendNscaBackend(host={self.host!r}, port={self.port}, binary={self.binary!r}, "
            f"config={self.config!r})"
        )

    def argv(self) -> list[str]:
        # The delimiters are left at their defaults (tab, ETB): spelling them out with
        # -d/-ds would break on send_nsca versions that lack -ds.
        return [
            self.binary,
            "-H",
            self.host,
            "-p",
            str(self.port),
            "-to",
            str(max(1, round(self.timeout))),
            "-c",
            self.config,
        ]

    def submit(self, results: Sequence[PassiveResult]) -> None:
        refused = oversized_names(results)
        pending = [r for r in results if r not in refused]
        if pending:
            self._run(pending)
        if refused:
            raise SubmitError(
                self.name, names_error(refused), undelivered=refused, rejected=refused
            )

    def _run(self, results: Sequence[PassiveResult]) -> None:
        argv = self.argv()
        log.debug("running %s with %d result(s)", shlex.join(argv), len(results))
        try:
            proc = subprocess.run(  # noqa: S603 - argv list, no shell
                argv,
                input=format_stdin(results),
                capture_output=True,
                timeout=self.timeout + 5,
                check=False,
            )
        except FileNotFoundError as exc:
            raise SubmitError(
                self.name,
                f"{self.binary} not found: install the nsca-client package or set binary=",
            ) from exc
        except PermissionError as exc:
            raise SubmitError(self.name, f"{self.binary} is not executable: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise SubmitError(
                self.name,
                f"{shlex.join(argv)} did not finish within {self.timeout + 5:g} s",
                transient=True,
            ) from exc
        said = " ".join(
            line.strip()
            for line in (proc.stderr + proc.stdout).decode(errors="replace").splitlines()
            if line.strip()
        )
        if proc.returncode != 0:
            transient = any(hint in said.lower() for hint in _TRANSIENT_HINTS)
            raise SubmitError(
                self.name,
                f"{shlex.join(argv)} exited {proc.returncode}: {said or 'no output'}",
                transient=transient,
            )
        log.debug("send_nsca: %s", said)
