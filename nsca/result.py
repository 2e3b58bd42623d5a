"""One passive check result, as every back end understands it.

A result is validated when it is made, not when a back end chokes on it at 3 a.m.: the
names go verbatim into NSCA's fixed fields, into ``send_nsca``'s tab-separated stdin and
into the ``;``-separated external-command line that NSCA writes for Nagios or Icinga, so
any character that would split or end one of those records is refused here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")

# Control characters (tab, newline, ETB ...) split send_nsca's records and the command
# file's lines; ';' separates the fields of PROCESS_SERVICE_CHECK_RESULT.
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f;]")
# NUL ends a C string (NSCA would silently cut the output there); ETB (0x17) separates
# results on send_nsca's stdin.
_BAD_OUTPUT = re.compile(r"[\x00\x17]")
_BAD_PERFDATA = re.compile(r"[\x00-\x1f\x7f|]")


def compose_plugin_output(output: str, perfdata: Sequence[str]) -> str:
    """Join text and performance data the way a Nagios plugin prints them.

    The plugin-output grammar is ``first line | perfdata`` followed by the long-output
    lines, so perfdata goes after the first line, not after the last one: put at the end
    of a multi-line output, Nagios would take it for long-output text.
    """
    if not perfdata:
        return output
    first, newline, rest = output.partition("\n")
    return f"{first} | {' '.join(perfdata)}{newline}{rest}"


@dataclass(frozen=True)
class PassiveResult:
    """A check result for a host (``service`` is ``None``) or a service.

    ``code`` is a plugin exit code (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN) for hosts too:
    back ends that speak host states use :meth:`host_state`. ``measured_at`` (Unix time)
    is when the state was measured: a result delivered late, from the spool, still says
    when it was true, to the back ends whose protocol carries it.
    """

    host: str
    service: str | None
    code: int
    output: str
    perfdata: list[str] = field(default_factory=list)
    measured_at: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.host, str) or not self.host:
            problems.append("host name is empty")
        elif _BAD_NAME.search(self.host):
            problems.append(f"host name {self.host!r} contains a control character or ';'")
        if self.service is not None:
            if not isinstance(self.service, str) or not self.service:
                problems.append("service name is empty (use None for a host check)")
            elif _BAD_NAME.search(self.service):
                problems.append(
                    f"service name {self.service!r} contains a control character or ';'"
                )
        if isinstance(self.code, bool) or not isinstance(self.code, int):
            problems.append(f"code {self.code!r} is not an integer")
        elif not OK <= self.code <= UNKNOWN:
            problems.append(f"code {self.code} is not a plugin state (0..3)")
        if not isinstance(self.output, str) or not self.output.strip():
            # send_nsca strips trailing tabs: an empty output would shift the fields and
            # turn a service result into a host result.
            problems.append("output is empty")
        elif _BAD_OUTPUT.search(self.output):
            problems.append("output contains NUL or ETB (0x17)")
        # A frozen dataclass still holds whatever sequence it was given; keep a private
        # list so that the caller's list cannot change the result afterwards.
        perfdata = list(self.perfdata)
        for item in perfdata:
            if not isinstance(item, str) or not item.strip() or _BAD_PERFDATA.search(item):
                problems.append(f"perfdata item {item!r} is empty or contains '|' or a newline")
        if self.measured_at is not None and (
            isinstance(self.measured_at, bool)
            or not isinstance(self.measured_at, int | float)
            or not math.isfinite(self.measured_at)
            or self.measured_at <= 0
        ):
            problems.append(f"measured_at {self.measured_at!r} is not a Unix time")
        if problems:
            raise ValueError("invalid passive result: " + "; ".join(problems))
        object.__setattr__(self, "perfdata", perfdata)

    def __hash__(self) -> int:
        return hash(
            (
                self.host,
                self.service,
                self.code,
                self.output,
                tuple(self.perfdata),
                self.measured_at,
            )
        )

    @property
    def is_host_check(self) -> bool:
        return self.service is None

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.code]

    @property
    def object_name(self) -> str:
        """``host`` or ``host!service``: Icinga's name for the object, handy in messages."""
        return self.host if self.service is None else f"{self.host}!{self.service}"

    def plugin_output(self) -> str:
        """The text a Nagios plugin would have printed: ``output | perf1 perf2``."""
        return compose_plugin_output(self.output, self.perfdata)

    def host_state(self) -> int:
        """The host state (0 UP, 1 DOWN) for this plugin code.

        OK and WARNING mean UP, CRITICAL and UNKNOWN mean DOWN: the mapping Icinga 2 applies
        to host check plugins. Icinga 2 refuses any other host state from the API and from
        the command file, so sending the plugin code unchanged would lose the result.
        """
        return 0 if self.code in (OK, WARNING) else 1

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "host": self.host,
            "service": self.service,
            "code": self.code,
            "output": self.output,
            "perfdata": list(self.perfdata),
        }
        if self.measured_at is not None:
            data["measured_at"] = self.measured_at
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PassiveResult:
        perfdata = data.get("perfdata") or []
        if not isinstance(perfdata, list):
            raise ValueError(f"perfdata {perfdata!r} is not a list")
        service = data.get("service")
        measured_at = data.get("measured_at")
        return cls(
            host=str(data["host"]),
            service=None if service is None else str(service),
            code=int(str(data["code"])),
            output=str(data["output"]),
            perfdata=[str(p) for p in perfdata],
            measured_at=None if measured_at is None else float(str(measured_at)),
        )
