"""Resume tokens as the kernel writes them, built by the tests.

A token is ``1-<checksum>-<packed size>-<hex>``: the hex is the zlib-compressed nvlist,
packed in the native encoding (:func:`zettabee.zfs.decode_resume_token` reads it), and
the checksum is the first word of the compressed bytes' fletcher-4 (the sum of their
32-bit words), which ``zfs send -t`` checks. A test that changes one field of a real
token builds it again here, and ZFS takes it as its own.
"""

from __future__ import annotations

import struct
import zlib

# nvpair data types (sys/nvpair.h)
BOOLEAN, UINT64, STRING, UINT64_ARRAY = 1, 8, 9, 16


def _pad8(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


def nvpair(name: str, value: int | str | bool | list[int], kind: int | None = None) -> bytes:
    """One natively packed (little-endian) nvpair: uint64, string, boolean flag, or an
    array of uint64."""
    if isinstance(value, bool):
        kind, count, raw = kind or BOOLEAN, 0, b""
    elif isinstance(value, int):
        kind, count, raw = kind or UINT64, 1, struct.pack("<Q", value)
    elif isinstance(value, list):
        kind, count, raw = kind or UINT64_ARRAY, len(value), struct.pack(f"<{len(value)}Q", *value)
    else:
        kind, count, raw = kind or STRING, 1, value.encode() + b"\0"
    head = _pad8(struct.pack("<ihhii", 0, len(name) + 1, 0, count, kind) + name.encode() + b"\0")
    body = head + _pad8(raw)
    return struct.pack("<i", len(body)) + body[4:]


def token(*pairs: bytes, tail: bytes = b"", size_delta: int = 0) -> str:
    """The token of an nvlist of ``pairs`` (``tail`` and ``size_delta`` spoil it)."""
    packed = b"\0\1\0\0" + struct.pack("<ii", 0, 1) + b"".join(pairs) + struct.pack("<i", 0)
    packed += tail
    squeezed = zlib.compress(packed)
    words = struct.unpack(f"<{len(squeezed) // 4}I", squeezed[: len(squeezed) // 4 * 4])
    return f"1-{sum(words):x}-{len(packed) + size_delta:x}-{squeezed.hex()}"


def encode(fields: dict[str, int | str | bool | list[int]]) -> str:
    """The token of ``fields`` in their order, as :func:`decode_resume_token` gives them."""
    return token(*(nvpair(name, value) for name, value in fields.items()))
