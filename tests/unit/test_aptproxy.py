"""The lab's apt proxy fetches from Debian's archive hosts and refuses everything else
before any connection is made (these tests need no network)."""

from __future__ import annotations

import http.client

import pytest

from lab.aptproxy import ARCHIVE_HOSTS, AptProxy, refusal


@pytest.mark.parametrize(
    "url",
    [
        "http://deb.debian.org/debian/dists/bookworm/InRelease",
        "http://deb.debian.org:80/debian-security/pool/main/p/paramiko/x.deb",
        "http://security.debian.org/debian-security/dists/trixie-security/InRelease",
    ],
)
def test_debians_archive_is_fetched(url: str) -> None:
    assert refusal("GET", url, ARCHIVE_HOSTS) is None
    assert refusal("HEAD", url, ARCHIVE_HOSTS) is None


@pytest.mark.parametrize(
    ("method", "url", "said"),
    [
        ("GET", "http://example.org/", "example.org: not one of Debian's archive hosts"),
        ("GET", "http://deb.debian.org:8080/debian/", "deb.debian.org:8080: not one of"),
        ("GET", "http://deb.debian.org.example.org/", "not one of Debian's archive hosts"),
        ("GET", "https://deb.debian.org/debian/", "only http:// URLs are fetched"),
        ("GET", "/debian/dists/bookworm/InRelease", "only http:// URLs are fetched"),
        ("CONNECT", "deb.debian.org:443", "CONNECT is not fetched"),
        ("POST", "http://deb.debian.org/", "POST is not fetched"),
    ],
)
def test_anything_else_is_refused_with_the_reason(method: str, url: str, said: str) -> None:
    why = refusal(method, url, ARCHIVE_HOSTS)
    assert why is not None and said in why


def test_a_refused_request_is_answered_403_and_recorded() -> None:
    with AptProxy(None, "127.0.0.1", 0) as proxy:
        for method, url in (("GET", "http://example.org/x"), ("CONNECT", "example.org:443")):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request(method, url)
            response = conn.getresponse()
            assert response.status == 403
            assert response.read().startswith(b"aptproxy: ")
            conn.close()
        assert [(r.method, r.url, r.status) for r in proxy.requests] == [
            ("GET", "http://example.org/x", 403),
            ("CONNECT", "example.org:443", 403),
        ]
        assert proxy.fetched() == []
