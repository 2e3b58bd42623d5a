"""A standard-library NSCA 2.x client.

Why our own: the Python NSCA senders on PyPI are Python 2 only or need the dead pycrypto,
and the ``send_nsca`` binary costs a process per call and hides its errors in prose.
This client speaks the protocol of NSCA 2.9 and later, which one connection can carry many
results on, and the 720-byte packet of NSCA 2.7 for old servers.

The conversation (``include/common.h`` of NSCA):

1. the server sends a 132-byte init packet: a 128-byte IV and a 4-byte timestamp;
2. the client sends, per result, a 4304-byte packet (720 in 2.7 legacy mode): version 3,
   a CRC-32 of the whole packet computed with the CRC field zeroed, the server's timestamp
   echoed back, the return code, and the host, service and output as NUL-terminated
   strings in fixed fields; unused bytes are filled with random characters, as
   ``send_nsca`` does, and the CRC covers them;
3. the packet is "encrypted" (method 1: XOR with the IV, then with the password; method 0:
   not at all) and sent. The server never answers.

That last point matters: NSCA has no acknowledgement. **A wrong password or encryption
method cannot be detected by the sender.** The server decrypts garbage, finds a bad
packet version, writes "Received invalid packet type/version from client - possibly due
to client using wrong password or crypto algorithm?" to its syslog, drops the
connection and the result, and the client has already reported success (``send_nsca``
too: it prints "1 data packet(s) sent to host successfully."). Only the server's syslog,
or a result that never shows up in the monitoring system, tells. The Icinga 2 API back end
does answer, which is one reason to prefer it.

Only methods 0 and 1 are implemented; the others need libmcrypt ciphers in one-byte CFB
mode, which the standard library lacks. Method 1 is obfuscation, not security: keep NSCA
on a trusted network or use the Icinga 2 API over TLS.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from nsca.errors import NscaError
from nsca.result import PassiveResult, compose_plugin_output

log = logging.getLogger(__name__)

DEFAULT_PORT = 5667
PACKET_VERSION = 3

INIT_PACKET = struct.Struct("!128sI")
IV_SIZE = 128
# Natural C alignment of struct data_packet: 2 pad bytes after packet_version, 2 at the end.
PACKET = struct.Struct("!hxxIIh64s128s4096sxx")
LEGACY_PACKET = struct.Struct("!hxxIIh64s128s512sxx")
HOST_FIELD = 64
SERVICE_FIELD = 128
OUTPUT_FIELD = 4096
LEGACY_OUTPUT_FIELD = 512
_CRC_OFFSET = 4
_STRINGS_OFFSET = 14

TRUNCATION_MARKER = " [truncated]"

# send_nsca fills packets with '0' + rand() % 72 before copying the fields in; the same
# alphabet here, mapped from os.urandom bytes in one C-speed translate().
_PAD_TABLE = bytes(0x30 + (i % 72) for i in range(256))

Padding = Callable[[int], bytes]


def random_padding(size: int) -> bytes:
    """``size`` random bytes from NSCA's padding alphabet ('0' .. 'w')."""
    return os.urandom(size).translate(_PAD_TABLE)


class Encryption(IntEnum):
    """The NSCA methods a standard-library client can speak."""

    NONE = 0
    XOR = 1


@dataclass(frozen=True)
class InitPacket:
    iv: bytes
    timestamp: int


def parse_init_packet(data: bytes) -> InitPacket:
    if len(data) != INIT_PACKET.size:
        raise ValueError(f"init packet is {len(data)} bytes, expected {INIT_PACKET.size}")
    iv, timestamp = INIT_PACKET.unpack(data)
    return InitPacket(iv=iv, timestamp=timestamp)


def _truncate_utf8(text: str, limit: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits in ``limit`` bytes."""
    return text.encode()[: max(limit, 0)].decode("utf-8", errors="ignore")


def fit_output(result: PassiveResult, capacity: int) -> str:
    """The plugin output of ``result``, cut to fit a C string field of ``capacity`` bytes.

    NSCA silently cuts the output at the field size, which can chop performance data in
    half and leaves no trace that anything is missing. Here the text is cut instead, the
    perfdata is kept whole (or dropped whole when it alone would not fit in half the
    field), and a marker says that the output was truncated.
    """
    limit = capacity - 1  # room for the terminating NUL
    full = result.plugin_output()
    if len(full.encode()) <= limit:
        return full
    perfdata = list(result.perfdata)
    perf_cost = len(compose_plugin_output("x", perfdata).encode()) - 1
    if perf_cost > limit // 2:
        log.warning(
            "%s: performance data (%d bytes) does not fit the %d-byte NSCA field; dropped",
            result.object_name,
            perf_cost,
            capacity,
        )
        perfdata, perf_cost = [], 0
    budget = limit - perf_cost - len(TRUNCATION_MARKER.encode())
    output = _truncate_utf8(result.output, budget).rstrip("\n") + TRUNCATION_MARKER
    log.info("%s: output truncated to fit the %d-byte NSCA field", result.object_name, capacity)
    return compose_plugin_output(output, perfdata)


def _c_field(name: str, value: bytes, size: int, padding: Padding) -> bytes:
    """``value`` NUL-terminated and padded to ``size`` bytes with random filler."""
    if len(value) >= size:
        raise ValueError(f"{name} is {len(value)} bytes, NSCA carries at most {size - 1}")
    return value + b"\0" + padding(size - len(value) - 1)


def build_packet(
    result: PassiveResult,
    timestamp: int,
    *,
    legacy: bool = False,
    padding: Padding = random_padding,
) -> bytes:
    """The plain (unencrypted) data packet for ``result``, CRC included.

    ``timestamp`` must be the one from the server's init packet: the server compares the
    packet time with its own clock (``max_packet_age``) and a sender clock that drifts
    would otherwise lose results.
    """
    layout = LEGACY_PACKET if legacy else PACKET
    output_size = LEGACY_OUTPUT_FIELD if legacy else OUTPUT_FIELD
    code = result.host_state() if result.is_host_check else result.code
    host = _c_field("host name", result.host.encode(), HOST_FIELD, padding)
    service = _c_field("service name", (result.service or "").encode(), SERVICE_FIELD, padding)
    if legacy:
        # NSCA 2.7 servers write the output verbatim into the command file: a raw newline
        # there would start a new external command. Escape as NSCA >= 2.10.1 does itself.
        escaped = result.output.replace("\\", "\\\\").replace("\n", "\\n")
        result = PassiveResult(result.host, result.service, result.code, escaped, result.perfdata)
    text = fit_output(result, output_size)
    output = _c_field("output", text.encode(), output_size, padding)
    packet = bytearray(layout.pack(PACKET_VERSION, 0, timestamp, code, host, service, output))
    # Struct padding bytes get filler too: send_nsca randomises the whole buffer first.
    packet[2:4] = padding(2)
    packet[-2:] = padding(2)
    struct.pack_into("!I", packet, _CRC_OFFSET, zlib.crc32(packet) & 0xFFFFFFFF)
    return bytes(packet)


def xor_crypt(data: bytes, iv: bytes, password: bytes) -> bytes:
    """NSCA method 1: XOR with the IV repeated, then with the password repeated.

    Its own inverse, so the same function decrypts. An empty password leaves the IV pass
    alone, exactly as NSCA does.
    """
    return _xor(data, _keystream(len(data), iv, password))


def _keystream(size: int, iv: bytes, password: bytes) -> bytes:
    stream = _repeat(iv, size)
    if password:
        stream = _xor(stream, _repeat(password, size))
    return stream


def _repeat(key: bytes, size: int) -> bytes:
    return (key * (size // len(key) + 1))[:size]


def _xor(a: bytes, b: bytes) -> bytes:
    # One big-integer XOR: C speed, no per-byte Python loop.
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


@dataclass(frozen=True)
class DecodedPacket:
    """A data packet read back: for tests and for debugging a capture."""

    version: int
    crc_ok: bool
    timestamp: int
    code: int
    host: str
    service: str
    output: str


def decode_packet(data: bytes) -> DecodedPacket:
    """Parse a plain data packet (4304 or 720 bytes) the way the server does."""
    if len(data) == PACKET.size:
        layout = PACKET
    elif len(data) == LEGACY_PACKET.size:
        layout = LEGACY_PACKET
    else:
        raise ValueError(f"packet is {len(data)} bytes, expected {PACKET.size} or 720")
    version, crc, timestamp, code, host, service, output = layout.unpack(data)
    zeroed = data[:_CRC_OFFSET] + b"\0\0\0\0" + data[_CRC_OFFSET + 4 :]
    return DecodedPacket(
        version=version,
        crc_ok=crc == zlib.crc32(zeroed) & 0xFFFFFFFF,
        timestamp=timestamp,
        code=code,
        host=host.split(b"\0", 1)[0].decode(errors="replace"),
        service=service.split(b"\0", 1)[0].decode(errors="replace"),
        output=output.split(b"\0", 1)[0].decode(errors="replace"),
    )


def oversized_names(results: Sequence[PassiveResult]) -> list[PassiveResult]:
    """The results whose host or service name does not fit NSCA's fields.

    NSCA (and send_nsca) would cut such a name silently, and a cut host name lands on the
    wrong object or on none, so these are refused instead.
    """
    return [
        r
        for r in results
        if len(r.host.encode()) >= HOST_FIELD or len((r.service or "").encode()) >= SERVICE_FIELD
    ]


def names_error(results: Sequence[PassiveResult]) -> str:
    names = ", ".join(repr(r.object_name) for r in results[:5])
    return (
        f"{len(results)} result(s) have a host name over {HOST_FIELD - 1} bytes or a service "
        f"name over {SERVICE_FIELD - 1} bytes, which NSCA cannot carry: {names}"
    )


class NscaClient:
    """Sends passive results to an NSCA daemon.

    One :meth:`send` opens one connection and sends every result on it (NSCA >= 2.9).
    In legacy mode (NSCA 2.7 servers) each result needs its own connection: those servers
    accept a 720-byte packet only when the connection closes right after it.
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        password: str = "",
        encryption: Encryption | int = Encryption.XOR,
        legacy: bool = False,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.encryption = Encryption(encryption)
        self.legacy = legacy
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        secret = password.encode()
        if b"\0" in secret:
            raise ValueError("an NSCA password cannot contain NUL (the server stops there)")
        if len(secret) > 512:
            raise ValueError("an NSCA password is at most 512 bytes")
        self.__password = secret

    def __repr__(self) -> str:
        return (
            f"NscaClient(host={self.host!r}, port={self.port}, encryption={self.encryption.name}, "
            f"legacy={self.legacy}, password={'<set>' if self.__password else '<empty>'})"
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def send(self, results: Iterable[PassiveResult]) -> int:
        """Send every result; return how many packets went out.

        Success means the bytes reached the server's socket, not that the server accepted
        them: see the module documentation about wrong passwords. Results whose names NSCA
        cannot carry are not sent; the others are, and then an error names the refused.
        """
        pending = list(results)
        refused = oversized_names(pending)
        if refused:
            pending = [r for r in pending if r not in refused]
        if pending and not self.legacy:
            self._send_on_one_connection(pending, pending)
        elif pending:
            for index, result in enumerate(pending):
                self._send_on_one_connection([result], pending[index:])
        if refused:
            raise NscaError(
                names_error(refused), transient=False, undelivered=refused, rejected=refused
            )
        return len(pending)

    def _send_on_one_connection(
        self, results: Sequence[PassiveResult], undelivered_on_failure: Sequence[PassiveResult]
    ) -> int:
        sock = self._connect(undelivered_on_failure)
        try:
            init = self._read_init_packet(sock, undelivered_on_failure)
            keystream = self._keystream(init)
            for sent, result in enumerate(results):
                packet = build_packet(result, init.timestamp, legacy=self.legacy)
                if keystream:
                    packet = _xor(packet, keystream)
                try:
                    sock.sendall(packet)
                except TimeoutError as exc:
                    raise NscaError(
                        f"timed out after {self.timeout:g} s sending to {self.address} "
                        f"({sent} of {len(results)} results sent)",
                        undelivered=list(results[sent:]),
                    ) from exc
                except OSError as exc:
                    raise NscaError(
                        f"{self.address} closed the connection after {sent} of {len(results)} "
                        f"results ({exc.strerror or exc}); nsca drops the connection when a "
                        "packet does not decrypt (wrong password or encryption method?): "
                        "see its syslog",
                        undelivered=list(results[sent:]),
                    ) from exc
            log.debug("sent %d result(s) to nsca at %s", len(results), self.address)
            return len(results)
        finally:
            sock.close()

    def _keystream(self, init: InitPacket) -> bytes:
        if self.encryption is Encryption.NONE:
            return b""
        size = LEGACY_PACKET.size if self.legacy else PACKET.size
        return _keystream(size, init.iv, self.__password)

    def _connect(self, undelivered: Sequence[PassiveResult]) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except ConnectionRefusedError as exc:
            raise NscaError(
                f"connection to {self.address} refused: is nsca running and listening there?",
                undelivered=undelivered,
            ) from exc
        except TimeoutError as exc:
            raise NscaError(
                f"timed out after {self.connect_timeout:g} s connecting to {self.address}",
                undelivered=undelivered,
            ) from exc
        except OSError as exc:
            raise NscaError(
                f"cannot connect to {self.address}: {exc.strerror or exc}",
                undelivered=undelivered,
            ) from exc
        sock.settimeout(self.timeout)
        return sock

    def _read_init_packet(
        self, sock: socket.socket, undelivered: Sequence[PassiveResult]
    ) -> InitPacket:
        data = b""
        try:
            while len(data) < INIT_PACKET.size:
                chunk = sock.recv(INIT_PACKET.size - len(data))
                if not chunk:
                    break
                data += chunk
        except TimeoutError as exc:
            raise NscaError(
                f"{self.address} sent no init packet within {self.timeout:g} s "
                f"({len(data)} of {INIT_PACKET.size} bytes): is it really nsca?",
                undelivered=undelivered,
            ) from exc
        except OSError as exc:
            raise NscaError(
                f"reading the init packet from {self.address} failed: {exc.strerror or exc}",
                undelivered=undelivered,
            ) from exc
        if not data:
            raise NscaError(
                f"{self.address} closed the connection before sending its init packet "
                "(nsca refusing this client: allowed hosts, tcp wrappers, too many connections?)",
                undelivered=undelivered,
            )
        if len(data) < INIT_PACKET.size:
            raise NscaError(
                f"short init packet from {self.address}: {len(data)} of {INIT_PACKET.size} "
                "bytes, then the connection closed: is it really nsca?",
                undelivered=undelivered,
            )
        return parse_init_packet(data)
