"""Choose a passive back end by name, from the strings of a config file.

``make_backend("nsca", {"host": "mon1", "password": "..."})`` and friends. The options
come straight from configparser, so they are all strings; every problem with them is
reported at once (unknown keys, missing ones, bad values) so that an admin fixes the
config section in one go. Values of secret options never appear in an error or a repr.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from nsca.client import DEFAULT_PORT, Encryption, NscaClient
from nsca.errors import BackendConfigError, NscaError, SubmitError
from nsca.icinga2api import Icinga2ApiBackend
from nsca.result import PassiveResult
from nsca.sendnsca import SendNscaBackend

# The errors are re-exported: callers import what they catch from where they get back ends.
__all__ = [
    "KINDS",
    "Backend",
    "BackendConfigError",
    "NscaBackend",
    "NscaError",
    "SubmitError",
    "make_backend",
]


@runtime_checkable
class Backend(Protocol):
    """Something that hands passive results to the monitoring system.

    ``submit`` returns when every result was handed over and raises :class:`SubmitError`
    otherwise; ``name`` says which back end it is in logs and spool directories.
    """

    name: str

    def submit(self, results: Sequence[PassiveResult]) -> None: ...


class NscaBackend:
    """The built-in NSCA client as a back end (no acknowledgement: see ``nsca.client``)."""

    name = "nsca"

    def __init__(self, client: NscaClient) -> None:
        self.client = client

    def __repr__(self) -> str:
        return f"NscaBackend({self.client!r})"

    def submit(self, results: Sequence[PassiveResult]) -> None:
        self.client.send(results)


# Option parsing ------------------------------------------------------------------------


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError("not a TCP port (1..65535)")
    return port


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 < seconds <= 3600:
        raise ValueError("not a number of seconds in (0, 3600]")
    return seconds


def _bool(value: str) -> bool:
    word = value.strip().lower()
    if word in ("yes", "true", "on", "1"):
        return True
    if word in ("no", "false", "off", "0"):
        return False
    raise ValueError("not yes or no")


def _encryption(value: str) -> Encryption:
    word = value.strip().lower()
    if word in ("none", "0"):
        return Encryption.NONE
    if word in ("xor", "1"):
        return Encryption.XOR
    raise ValueError("not none or xor (other NSCA ciphers need the send_nsca back end)")


def _ttl(value: str) -> int:
    ttl = int(value)
    if ttl <= 0:
        raise ValueError("not a positive number of seconds")
    return ttl


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("empty")
    return value.strip()


@dataclass(frozen=True)
class _Option:
    parse: Callable[[str], Any]
    default: str | None = None  # None: no default
    required: bool = False
    secret: bool = False


_SPECS: dict[str, dict[str, _Option]] = {
    "nsca": {
        "host": _Option(_text, required=True),
        "port": _Option(_port, str(DEFAULT_PORT)),
        "password": _Option(str, "", secret=True),
        "encryption": _Option(_encryption, "xor"),
        "legacy": _Option(_bool, "no"),
        "timeout": _Option(_seconds, "10"),
    },
    "send_nsca": {
        "binary": _Option(_text, "/usr/sbin/send_nsca"),
        "host": _Option(_text, required=True),
        "port": _Option(_port, str(DEFAULT_PORT)),
        "config": _Option(_text, "/etc/send_nsca.cfg"),
        "timeout": _Option(_seconds, "10"),
    },
    "icinga2-api": {
        "url": _Option(_text, required=True),
        "user": _Option(_text),
        "password": _Option(str, secret=True),
        "cafile": _Option(_text),
        "certfile": _Option(_text),
        "keyfile": _Option(_text),
        "timeout": _Option(_seconds, "10"),
        "ttl": _Option(_ttl),
        "check_source": _Option(_text),
    },
}

KINDS = tuple(_SPECS)


def _parse_options(kind: str, options: Mapping[str, str]) -> dict[str, Any]:
    spec = _SPECS[kind]
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key in sorted(set(options) - set(spec)):
        problems.append(f"unknown option {key!r} (known: {', '.join(spec)})")
    for key, option in spec.items():
        raw = options.get(key, option.default)
        if raw is None:
            if option.required:
                problems.append(f"option {key!r} is required")
            continue
        try:
            values[key] = option.parse(raw)
        except ValueError as exc:
            shown = "<secret>" if option.secret else repr(raw)
            reason = str(exc) if not option.secret else "invalid"
            problems.append(f"option {key!r} = {shown}: {reason}")
    if kind == "icinga2-api":
        problems += _icinga_problems(options, values)
    if problems:
        raise BackendConfigError(kind, problems)
    return values


def _icinga_problems(options: Mapping[str, str], values: Mapping[str, Any]) -> list[str]:
    problems = []
    url = str(values.get("url", ""))
    if url and not url.startswith("https://"):
        problems.append(f"option 'url' = {url!r}: must start with https:// (the API is TLS only)")
    if ("user" in options) != ("password" in options):
        problems.append("options 'user' and 'password' go together (HTTP basic auth)")
    if "keyfile" in options and "certfile" not in options:
        problems.append("option 'keyfile' needs 'certfile' (client certificate)")
    if "user" not in options and "certfile" not in options:
        problems.append("no credentials: give 'user' and 'password', or 'certfile'")
    return problems


def make_backend(kind: str, options: Mapping[str, str]) -> Backend:
    """Build the back end ``kind`` from string options (as read from a config file)."""
    if kind not in _SPECS:
        raise BackendConfigError(kind, [f"unknown back end (known: {', '.join(KINDS)})"])
    v = _parse_options(kind, options)
    try:
        if kind == "nsca":
            return NscaBackend(
                NscaClient(
                    v["host"],
                    v["port"],
                    password=v["password"],
                    encryption=v["encryption"],
                    legacy=v["legacy"],
                    timeout=v["timeout"],
                )
            )
        if kind == "send_nsca":
            return SendNscaBackend(
                v["host"],
                v["port"],
                binary=v["binary"],
                config=v["config"],
                timeout=v["timeout"],
            )
        return Icinga2ApiBackend(
            v["url"],
            user=v.get("user"),
            password=v.get("password"),
            cafile=v.get("cafile"),
            certfile=v.get("certfile"),
            keyfile=v.get("keyfile"),
            timeout=v["timeout"],
            ttl=v.get("ttl"),
            check_source=v.get("check_source"),
        )
    except ValueError as exc:
        # Raised by the constructors (TLS files, password too long ...): never echo secrets,
        # and the constructors' messages contain none.
        raise BackendConfigError(kind, [str(exc)]) from None
