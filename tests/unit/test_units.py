"""Unit tests for zettabee.units: durations as written and as shown."""

from __future__ import annotations

import pytest

from zettabee.units import format_duration, parse_duration

# --------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("90", 90),
        ("45s", 45),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30M", "1.5h", "-5", "m", "30m1h", "1h 30m", "h30", "2w"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration; use seconds"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0:00:00"),
        (59, "0:00:59"),
        (3661, "1:01:01"),
        (86399, "23:59:59"),
        (86400, "1d 00:00:00"),
        (90061, "1d 01:01:01"),
        (3 * 86400 + 5, "3d 00:00:05"),
        (-5, "-0:00:05"),
        (-90061, "-1d 01:01:01"),
        (12.9, "0:00:12"),
    ],
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown
