"""The NSCA packet, byte for byte, and the client's failure modes against fake servers."""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import pytest

from nsca.client import (
    INIT_PACKET,
    LEGACY_PACKET,
    PACKET,
    TRUNCATION_MARKER,
    Encryption,
    NscaClient,
    build_packet,
    decode_packet,
    fit_output,
    parse_init_packet,
    random_padding,
    xor_crypt,
)
from nsca.errors import NscaError, SubmitError
from nsca.result import PassiveResult

IV = bytes(range(128))
TS = 0x5F5E1234


def zeros(size: int) -> bytes:
    return b"\0" * size


def result(**changes: object) -> PassiveResult:
    fields: dict[str, object] = {
        "host": "backup1",
        "service": "zettabee tank/data",
        "code": 1,
        "output": "WARNING - lag 2h",
        "perfdata": ["lag=7200s;3600;7200;0"],
    }
    fields.update(changes)
    return PassiveResult(**fields)  # type: ignore[arg-type]


# layout ------------------------------------------------------------------------------------


def test_struct_sizes_match_the_c_structs() -> None:
    assert INIT_PACKET.size == 132
    assert PACKET.size == 4304
    assert LEGACY_PACKET.size == 720


def test_field_offsets() -> None:
    packet = build_packet(result(), TS, padding=zeros)
    assert len(packet) == 4304
    assert struct.unpack_from("!h", packet, 0)[0] == 3  # packet_version
    assert struct.unpack_from("!I", packet, 8)[0] == TS  # timestamp echoed
    assert struct.unpack_from("!h", packet, 12)[0] == 1  # return_code
    assert packet[14 : 14 + 8] == b"backup1\0"  # host_name[64]
    assert packet[78 : 78 + 19] == b"zettabee tank/data\0"  # svc_description[128]
    text = b"WARNING - lag 2h | lag=7200s;3600;7200;0\0"
    assert packet[206 : 206 + len(text)] == text  # plugin_output[4096]


def test_unused_bytes_are_random_filler_from_the_send_nsca_alphabet() -> None:
    a = build_packet(result(), TS)
    b = build_packet(result(), TS)
    assert a != b  # different filler each time, so different CRCs
    filler = a[14 + 8 : 78]  # after "backup1\0" up to the service field
    assert len(set(filler)) > 10
    assert all(0x30 <= c < 0x30 + 72 for c in filler)
    assert all(0x30 <= c < 0x30 + 72 for c in a[2:4] + a[-2:])  # struct padding too
    assert decode_packet(a).host == "backup1"


def test_random_padding_alphabet() -> None:
    data = random_padding(5000)
    assert len(data) == 5000
    assert set(data) <= set(range(0x30, 0x30 + 72))


def test_host_check_has_empty_service_and_host_state() -> None:
    for code, state in ((0, 0), (1, 0), (2, 1), (3, 1)):
        packet = decode_packet(build_packet(result(service=None, code=code), TS))
        assert packet.service == ""
        assert packet.code == state


# CRC ---------------------------------------------------------------------------------------


def nsca_crc32(data: bytes) -> int:
    """NSCA's utils.c calculate_crc32, transcribed: table 0xEDB88320, init and xorout ~0."""
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
        table.append(crc)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = ((crc >> 8) & 0x00FFFFFF) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


def test_crc_is_nscas_crc_over_the_packet_with_the_crc_field_zeroed() -> None:
    packet = build_packet(result(), TS)
    stored = struct.unpack_from("!I", packet, 4)[0]
    zeroed = packet[:4] + b"\0\0\0\0" + packet[8:]
    assert stored == nsca_crc32(zeroed) == zlib.crc32(zeroed)
    assert decode_packet(packet).crc_ok


def test_crc_detects_a_flipped_byte() -> None:
    packet = bytearray(build_packet(result(), TS))
    packet[300] ^= 0x01
    assert not decode_packet(bytes(packet)).crc_ok


# XOR ---------------------------------------------------------------------------------------


def test_xor_round_trip() -> None:
    packet = build_packet(result(), TS)
    sealed = xor_crypt(packet, IV, b"s3cret")
    assert sealed != packet
    assert xor_crypt(sealed, IV, b"s3cret") == packet
    assert decode_packet(xor_crypt(sealed, IV, b"s3cret")).output.startswith("WARNING")


def test_xor_is_iv_then_password_byte_by_byte() -> None:
    data = bytes(range(200, 256)) * 5
    password = b"pw!"
    expected = bytes(b ^ IV[i % len(IV)] ^ password[i % len(password)] for i, b in enumerate(data))
    assert xor_crypt(data, IV, password) == expected


def test_xor_with_empty_password_is_the_iv_pass_only() -> None:
    data = b"A" * 300
    assert xor_crypt(data, IV, b"") == bytes(b ^ IV[i % 128] for i, b in enumerate(data))


def test_wrong_password_garbles_the_version_the_server_checks() -> None:
    sealed = xor_crypt(build_packet(result(), TS), IV, b"right")
    opened = decode_packet(xor_crypt(sealed, IV, b"wrong"))
    assert opened.version != 3 or not opened.crc_ok


# truncation --------------------------------------------------------------------------------


def test_output_that_fits_is_untouched() -> None:
    assert fit_output(result(), 4096) == "WARNING - lag 2h | lag=7200s;3600;7200;0"


def test_long_output_is_cut_with_a_marker_and_whole_perfdata() -> None:
    long = result(output="x" * 10000)
    text = fit_output(long, 4096)
    assert len(text.encode()) == 4095
    assert text.endswith(" | lag=7200s;3600;7200;0")
    assert TRUNCATION_MARKER in text
    decoded = decode_packet(build_packet(long, TS))
    assert decoded.output == text


def test_perfdata_goes_after_the_first_line_when_cut() -> None:
    long = result(output="first line\n" + "y" * 5000)
    text = fit_output(long, 4096)
    assert text.startswith("first line | lag=7200s;3600;7200;0\nyyy")
    assert text.endswith(TRUNCATION_MARKER)


def test_truncation_respects_utf8_boundaries() -> None:
    long = result(output="é" * 3000, perfdata=[])
    text = fit_output(long, 4096)
    assert len(text.encode()) <= 4095
    text.encode().decode("utf-8")  # no broken sequence
    assert text.endswith(TRUNCATION_MARKER)


def test_oversized_perfdata_is_dropped_whole() -> None:
    perf = [f"m{i}={i}" for i in range(1000)]
    text = fit_output(result(perfdata=perf), 512)
    assert "|" not in text
    assert len(text.encode()) <= 511


def test_legacy_packet_is_720_bytes_with_512_byte_output() -> None:
    long = result(output="z" * 2000)
    packet = build_packet(long, TS, legacy=True)
    assert len(packet) == 720
    decoded = decode_packet(packet)
    assert decoded.crc_ok and decoded.version == 3
    assert len(decoded.output.encode()) == 511
    assert decoded.output.endswith("| lag=7200s;3600;7200;0")


def test_legacy_escapes_newlines_for_27_servers() -> None:
    decoded = decode_packet(build_packet(result(output="a\\b\nc", perfdata=[]), TS, legacy=True))
    assert decoded.output == "a\\\\b\\nc"


def test_modern_packet_keeps_newlines_for_the_server_to_escape() -> None:
    decoded = decode_packet(build_packet(result(output="a\nb", perfdata=[]), TS))
    assert decoded.output == "a\nb"


def test_names_too_long_for_nsca_are_refused_not_cut() -> None:
    client = NscaClient("127.0.0.1", 1)
    too_long = result(host="h" * 64)
    with pytest.raises(NscaError) as info:
        client.send([too_long])
    assert not info.value.transient
    assert info.value.rejected == (too_long,)
    assert "63 bytes" in str(info.value)


# init packet -------------------------------------------------------------------------------


def test_parse_init_packet() -> None:
    init = parse_init_packet(IV + struct.pack("!I", TS))
    assert init.iv == IV and init.timestamp == TS
    with pytest.raises(ValueError):
        parse_init_packet(IV)


# the client against fake servers -----------------------------------------------------------


class FakeServer:
    """A loopback listener running ``behaviour(conn)`` for each connection."""

    def __init__(self, behaviour: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.behaviour = behaviour
        self.received: list[bytes] = []
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self.behaviour(conn)

    def close(self) -> None:
        self.sock.close()


def nsca_like(server_list: list[bytes]) -> Callable[[socket.socket], None]:
    def behaviour(conn: socket.socket) -> None:
        conn.sendall(IV + struct.pack("!I", TS))
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        server_list.append(data)

    return behaviour


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(behaviour: Callable[[socket.socket], None]) -> FakeServer:
        servers.append(FakeServer(behaviour))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_many_results_on_one_connection_decrypt_server_side(serve: Callable) -> None:
    got: list[bytes] = []
    server = serve(nsca_like(got))
    results = [result(service=f"svc{i}", code=i % 4) for i in range(120)]
    client = NscaClient("127.0.0.1", server.port, password="s3cret")
    assert client.send(results) == 120
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connections == 1
    stream = got[0]
    assert len(stream) == 120 * 4304
    for i in range(120):
        packet = decode_packet(xor_crypt(stream[i * 4304 : (i + 1) * 4304], IV, b"s3cret"))
        assert packet.crc_ok and packet.version == 3 and packet.timestamp == TS
        assert packet.service == f"svc{i}" and packet.code == i % 4


def test_encryption_none_sends_plain_packets(serve: Callable) -> None:
    got: list[bytes] = []
    server = serve(nsca_like(got))
    NscaClient("127.0.0.1", server.port, encryption=Encryption.NONE).send([result()])
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert decode_packet(got[0]).crc_ok


def test_legacy_uses_one_connection_per_result(serve: Callable) -> None:
    got: list[bytes] = []
    server = serve(nsca_like(got))
    NscaClient("127.0.0.1", server.port, legacy=True, password="x").send([result(), result()])
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connections == 2
    assert [len(g) for g in got] == [720, 720]


def test_a_name_too_long_does_not_hold_back_the_others(serve: Callable) -> None:
    got: list[bytes] = []
    server = serve(nsca_like(got))
    good, bad = result(), result(service="s" * 200)
    with pytest.raises(NscaError) as info:
        NscaClient("127.0.0.1", server.port, encryption=0).send([bad, good])
    assert info.value.rejected == (bad,) and not info.value.transient
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(got[0]) == 4304 and decode_packet(got[0]).service == good.service


def test_refused_connection_names_the_address_and_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(NscaError) as info:
        NscaClient("127.0.0.1", port).send([result()])
    assert f"127.0.0.1:{port} refused" in str(info.value)
    assert "is nsca running" in str(info.value)
    assert info.value.transient
    assert isinstance(info.value, SubmitError)


def test_silent_server_times_out(serve: Callable) -> None:
    server = serve(lambda conn: time.sleep(1.5))
    started = time.monotonic()
    with pytest.raises(NscaError) as info:
        NscaClient("127.0.0.1", server.port, timeout=0.3).send([result()])
    assert time.monotonic() - started < 1.4
    assert "no init packet within 0.3 s" in str(info.value)
    assert info.value.transient


def test_short_init_packet(serve: Callable) -> None:
    server = serve(lambda conn: conn.sendall(IV[:50]))
    with pytest.raises(NscaError, match=r"short init packet .* 50 of 132 bytes"):
        NscaClient("127.0.0.1", server.port).send([result()])


def test_connection_closed_before_init_packet(serve: Callable) -> None:
    server = serve(lambda conn: None)
    with pytest.raises(NscaError, match="closed the connection before sending its init packet"):
        NscaClient("127.0.0.1", server.port).send([result()])


def test_connection_closed_midway_reports_what_was_not_sent(serve: Callable) -> None:
    def drop_after_init(conn: socket.socket) -> None:
        conn.sendall(IV + struct.pack("!I", TS))
        conn.recv(4304)
        # RST instead of FIN, as nsca's close with unread data does
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server = serve(drop_after_init)
    results = [result(service=f"s{i}") for i in range(400)]
    with pytest.raises(NscaError) as info:
        NscaClient("127.0.0.1", server.port).send(results)
    assert "closed the connection after" in str(info.value)
    assert info.value.undelivered and len(info.value.undelivered) < 400
    assert info.value.undelivered[-1] == results[-1]


def test_repr_hides_the_password() -> None:
    client = NscaClient("mon1", password="hunter2")
    assert "hunter2" not in repr(client)
    assert "<set>" in repr(client)


def test_password_with_nul_is_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        NscaClient("mon1", password="a\0b")


def test_empty_batch_opens_no_connection() -> None:
    assert NscaClient("127.0.0.1", 1).send([]) == 0
