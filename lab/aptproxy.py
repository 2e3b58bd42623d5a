"""A forward HTTP proxy for the lab guest's apt: Debian's archive, and nothing else.

The OpenZFS guest has no route out (``lab/guest.py``: its namespace forwards only SSH in,
and drops every connection the guest starts). To prove that the Debian package pulls its
dependencies from Debian's registry, the guest's apt needs that registry, and only it.

The proxy listens inside the guest's network namespace, on the address the guest knows as
its gateway: a socket keeps the namespace it was made in, so one short-lived thread enters
the namespace (``setns``; Python 3.11 has no ``os.setns``), makes the listening socket and
ends. Every other thread runs in this machine's namespace, so the requests apt sends to
the proxy are fetched from here. Only plain HTTP GET and HEAD to Debian's archive hosts
on port 80 are fetched (apt checks every file against the signed Release files); any
other request is answered 403 and recorded, as is everything fetched::

    with AptProxy(guest.netns, GUEST_GATEWAY) as proxy:
        guest.shell(f"apt-get -o Acquire::http::Proxy={proxy.url} update")
        proxy.fetched()   # the URLs apt got, in order
"""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

# The hosts Debian's sources.list names (the lab's images use deb.debian.org for the
# release, its updates and its security suite).
ARCHIVE_HOSTS = frozenset({"deb.debian.org", "security.debian.org"})
PORT = 3142  # apt-cacher-ng's, the port an admin expects an apt proxy on
CLONE_NEWNET = 0x40000000
UPSTREAM_TIMEOUT = 60.0
CHUNK = 1 << 16
# Hop-by-hop headers (RFC 9110 section 7.6.1): one connection's, never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
     "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade"}
)  # fmt: skip


class ProxyError(RuntimeError):
    """The proxy could not listen where it was asked to; the message says why."""


@dataclass(frozen=True)
class Request:
    """One request the proxy answered: what was asked, and the status it got."""

    method: str
    url: str
    status: int
    size: int = 0  # body bytes passed on


def listening_socket(netns: str | None, address: str, port: int) -> socket.socket:
    """A TCP socket listening on ``address:port`` in the network namespace ``netns``
    (``ip netns``'s name; None: this process's own)."""
    if netns is None:
        return _listen(address, port)
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def in_namespace() -> None:
        try:
            _enter(netns)
            made.append(_listen(address, port))
        except (OSError, ProxyError) as exc:
            failed.append(exc)

    # The thread ends with the namespace it entered; the socket keeps it.
    thread = threading.Thread(target=in_namespace, name=f"aptproxy-{netns}")
    thread.start()
    thread.join()
    if failed:
        raise ProxyError(f"aptproxy: cannot listen on {address}:{port} in {netns}: {failed[0]}")
    return made[0]


def _enter(netns: str) -> None:
    """Move the calling thread (only it) into the network namespace ``netns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    except FileNotFoundError:
        raise ProxyError(f"no network namespace {netns} (ip netns list)") from None
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns: {os.strerror(errno)}")
    finally:
        os.close(fd)


def _listen(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


def refusal(method: str, url: str, allowed: frozenset[str]) -> str | None:
    """Why the proxy will not fetch ``method url`` (None: it will)."""
    if method not in ("GET", "HEAD"):
        return f"{method} is not fetched (only GET and HEAD)"
    parts = urlsplit(url)
    if parts.scheme != "http":
        return f"{url}: only http:// URLs are fetched (apt checks them against Release)"
    try:
        port = parts.port or 80
    except ValueError:
        return f"{url}: not a valid port"
    if parts.hostname not in allowed or port != 80:
        return f"{parts.netloc}: not one of Debian's archive hosts ({', '.join(sorted(allowed))})"
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, allowed: frozenset[str]) -> None:
        super().__init__(sock.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.allowed = allowed
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def record(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # one upstream connection per host for as long as apt keeps this one open
        self.upstream: dict[str, http.client.HTTPConnection] = {}

    def finish(self) -> None:
        for conn in self.upstream.values():
            conn.close()
        super().finish()

    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    # CONNECT (a tunnel to anywhere), POST and the rest: refused by name, not with 501.
    do_CONNECT = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _forward(self) -> None:
        why = refusal(self.command, self.path, self.server.allowed)
        if why is not None:
            self._answer(403, why)
            return
        parts = urlsplit(self.path)
        host = parts.hostname or ""
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            response = self._fetch(host, target, headers)
        except (OSError, http.client.HTTPException) as exc:
            self.upstream.pop(host, None)
            self._answer(502, f"{host}: {exc}")
            return
        size = self._relay(response)
        if response.will_close:
            self.upstream.pop(host).close()
        self.server.record(Request(self.command, self.path, response.status, size))

    def _fetch(self, host: str, target: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """The upstream response; a kept connection the server closed meanwhile is
        opened again, once."""
        for attempt in (1, 2):
            conn = self.upstream.get(host)
            if conn is None:
                conn = http.client.HTTPConnection(host, 80, timeout=UPSTREAM_TIMEOUT)
                self.upstream[host] = conn
            try:
                conn.request(self.command, target, headers=headers)
                return conn.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                conn.close()
                del self.upstream[host]
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _relay(self, response: http.client.HTTPResponse) -> int:
        """Pass the response on: with its length when it has one, chunked when not."""
        bodiless = self.command == "HEAD" or response.status in (204, 304)
        self.send_response(response.status, response.reason)
        length = response.getheader("Content-Length")
        chunked = not bodiless and (length is None or response.chunked)
        for key, value in response.getheaders():
            if key.lower() in HOP_BY_HOP or (chunked and key.lower() == "content-length"):
                continue
            self.send_header(key, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if bodiless:
            response.read()
            return 0
        size = 0
        for block in iter(lambda: response.read(CHUNK), b""):
            size += len(block)
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            else:
                self.wfile.write(block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        return size

    def _answer(self, status: int, why: str) -> None:
        self.server.record(Request(self.command, self.path, status))
        self.close_connection = True  # a refused request's body is not read
        body = f"aptproxy: {why}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: every request is recorded in ``AptProxy.requests`` instead."""


class AptProxy:
    """The proxy, serving from ``with`` to its end (see the module's docstring)."""

    def __init__(
        self,
        netns: str | None,
        address: str,
        port: int = PORT,
        allowed: frozenset[str] = ARCHIVE_HOSTS,
    ) -> None:
        self.netns = netns
        self.address = address
        self.port = port
        self.allowed = allowed
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def requests(self) -> list[Request]:
        if self._server is None:
            return []
        with self._server.lock:
            return list(self._server.requests)

    def fetched(self) -> list[str]:
        """The URLs fetched from the archive (status 200), in order."""
        return [r.url for r in self.requests if r.status == 200]

    def refused(self) -> list[Request]:
        return [r for r in self.requests if r.status == 403]

    def __enter__(self) -> AptProxy:
        sock = listening_socket(self.netns, self.address, self.port)
        self.port = sock.getsockname()[1]
        self._server = _Server(sock, self.allowed)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="aptproxy", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
