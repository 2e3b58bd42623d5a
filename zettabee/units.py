"""Units as people write and read them: durations (``1h30m``, ``H:MM:SS``) and sizes."""

from __future__ import annotations

import re

# As text, not compiled: re compiles (and caches) it when a duration is read, not in every check.
_DURATION = r"(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?"
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> int:
    """Seconds from ``90``, ``30m``, ``2h``, ``1d`` or ``1h30m`` (units largest first).

    Thresholds in the seed were bare seconds; the suffixes are for humans reading
    ``clag=21600`` at 3 a.m. Upper-case ``M`` is refused rather than guessed (months?).
    """
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    match = re.fullmatch(_DURATION, text)
    if not text or not match:
        raise ValueError(
            f"{text!r} is not a duration; use seconds (90) or numbers with d, h, m, s "
            "largest first (30m, 2h, 1d, 1h30m)"
        )
    return sum(int(match[unit]) * secs for unit, secs in _UNIT_SECONDS.items() if match[unit])


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, or ``Nd HH:MM:SS`` from one day, as status lines and plugins show lag.

    Negative values (a clock that jumped) keep their sign rather than look healthy.
    """
    total = int(abs(seconds))
    sign = "-" if seconds < 0 and total else ""
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{sign}{hours}:{minutes:02d}:{secs:02d}"


def format_bytes(count: float) -> str:
    """``512 B``, ``1.5 MiB``: sizes as status lines, runstatus and the checks show them."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def short_duration(seconds: int) -> str:
    """The inverse of parse_duration (``1h30m``), to quote thresholds back in messages."""
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
