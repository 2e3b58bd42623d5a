"""Names that reach command lines: hosts, pools, file systems, users, paths, endpoints.

Each is validated once, when the configuration loads, so that the runners can trust what
they are given: no leading ``-``, no control characters, no shell metacharacters. The
checks are stricter than ZFS and DNS themselves, since a name that needs quoting is a name
that will one day be quoted wrongly.
"""

from __future__ import annotations

import ipaddress
import re
import string

from zettabee.pair import Endpoint

_DATASET_CHARS = frozenset(string.ascii_letters + string.digits + "_.:-/")
_HOST_CHARS = frozenset(string.ascii_letters + string.digits + ".-")
# As text, not compiled: re compiles (and caches) it when a name needs it, not in every check.
_IPV6_LITERAL = r"\[(?P<addr>[0-9A-Fa-f:.]+)(?:%(?P<zone>[A-Za-z0-9_.-]+))?\]"
_USER = r"[a-z_][a-z0-9_-]*"
MAX_DATASET_LENGTH = 255


def describe_char(char: str) -> str:
    """Name a character so that a message shows it even when it is invisible.

    Echoing a newline or an escape sequence back to the terminal would hide the very
    thing the operator must find.
    """
    named = {" ": "a space", "\t": "a tab", "\n": "a newline", "\r": "a carriage return"}
    if char in named:
        return named[char]
    if not char.isprintable():
        return f"a control character (U+{ord(char):04X})"
    if ord(char) > 127:
        return f"{char!r} (U+{ord(char):04X})"
    return repr(char)


def validate_dataset(name: str) -> str | None:
    """Why ``name`` cannot be a ZFS file system name for zettabee, or None if it can.

    Stricter than ZFS itself (no spaces, no ``%``): these names end up in argv lists on
    two hosts and in one remote command string, and a name that needs quoting is a name
    that will one day be quoted wrongly.
    """
    if not name:
        return "empty file system name"
    for char in name:
        if char == "@":
            return f"file system {name!r} contains '@': that names a snapshot, not a file system"
        if char == "#":
            return f"file system {name!r} contains '#': that names a bookmark, not a file system"
        if char not in _DATASET_CHARS:
            return (
                f"file system {name!r} contains {describe_char(char)}; file system names may "
                "only contain letters, digits, '_', '.', ':', '-' and '/'"
            )
    if len(name) > MAX_DATASET_LENGTH:
        return f"file system name is {len(name)} characters long; ZFS allows {MAX_DATASET_LENGTH}"
    components = name.split("/")
    if "" in components:
        return f"file system {name!r} has an empty component (a leading, trailing or doubled '/')"
    for component in components:
        if component.startswith("-"):
            return f"file system {name!r}: component {component!r} starts with '-'"
        if component in (".", ".."):
            return f"file system {name!r}: component {component!r} is not allowed"
    if not components[0][0].isalpha():
        return f"file system {name!r}: the pool name {components[0]!r} must start with a letter"
    return None


def validate_host(name: str) -> str | None:
    """Why ``name`` cannot be a host for zettabee, or None if it can.

    A DNS name or IPv4 address, or an IPv6 address in brackets (``[fe80::1]``) so that
    ``host:pool/fs`` stays unambiguous. A leading ``-`` would be read by ssh as an option.
    """
    if not name:
        return "empty host name"
    if name.startswith("-"):
        return f"host {name!r} starts with '-'"
    if name.startswith("["):
        return _validate_ipv6_literal(name)
    for char in name:
        if char not in _HOST_CHARS:
            hint = "; write an IPv6 address in brackets, like [fe80::1]" if char == ":" else ""
            return (
                f"host {name!r} contains {describe_char(char)}; host names may only contain "
                f"letters, digits, '.' and '-'{hint}"
            )
    if len(name) > 253:
        return f"host name is {len(name)} characters long; DNS allows 253"
    labels = (name[:-1] if name.endswith(".") else name).split(".")
    for label in labels:
        if not label:
            return f"host {name!r} has an empty label (a leading or doubled '.')"
        if label.startswith("-"):
            return f"host {name!r}: label {label!r} starts with '-'"
        if len(label) > 63:
            return f"host {name!r}: label {label[:20]!r}... is longer than 63 characters"
    return None


def _validate_ipv6_literal(name: str) -> str | None:
    allowed = frozenset(string.hexdigits + ":.%[]_-" + string.ascii_letters)
    for char in name:
        if char not in allowed:
            return f"host {name!r} contains {describe_char(char)}"
    match = re.fullmatch(_IPV6_LITERAL, name)
    if not match:
        return f"host {name!r} is not an IPv6 address in brackets, like [fe80::1]"
    try:
        ipaddress.IPv6Address(match["addr"])
    except ValueError:
        return f"host {name!r}: {match['addr']!r} is not a valid IPv6 address"
    return None


def validate_user(name: str) -> str | None:
    """Why ``name`` cannot be a remote login name, or None: the portable POSIX subset."""
    if not re.fullmatch(_USER, name) or len(name) > 32:
        bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "_-"))), None)
        what = f" (it contains {describe_char(bad)})" if bad else ""
        return (
            f"user {name!r} is not a valid login name{what}; use lower-case letters, "
            "digits, '_' and '-', starting with a letter or '_', at most 32 characters"
        )
    return None


def validate_path(path: str) -> str | None:
    """Why ``path`` cannot be a file zettabee uses, or None.

    Relative paths are refused because cron and Nagios run us from directories nobody
    chose; control characters because they hide in every message that shows the path.
    """
    if not path:
        return "empty path"
    for char in path:
        if not char.isprintable() and char != " ":
            return f"path {path!r} contains {describe_char(char)}"
    if not path.startswith("/"):
        return f"path {path!r} is not absolute"
    return None


def split_endpoint(text: str) -> tuple[str, str]:
    """``host:pool/fs`` into host and file system, on the first ``:`` outside brackets.

    File system names may themselves contain ``:``, and IPv6 hosts always do, so the
    host's own colons must be fenced off by brackets.
    """
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise ValueError(f"endpoint {text!r} opens '[' without a closing ']'")
        if text[close + 1 : close + 2] != ":":
            raise ValueError(f"endpoint {text!r} is not host:pool/fs (no ':' after ']')")
        return text[: close + 1], text[close + 2 :]
    host, colon, fs = text.partition(":")
    if not colon:
        raise ValueError(f"endpoint {text!r} is not host:pool/fs (no ':')")
    return host, fs


def parse_endpoint(text: str) -> Endpoint:
    """A validated Endpoint from ``host:pool/fs``; ValueError says every reason it is not."""
    host, fs = split_endpoint(text)
    if not host:
        messages = [f"endpoint {text!r} has an empty host"]
    else:
        messages = [m for m in (validate_host(host),) if m]
    fs_message = validate_dataset(fs)
    if fs_message:
        messages.append(fs_message)
    if messages:
        raise ValueError("; ".join(messages))
    return Endpoint(host, fs)
