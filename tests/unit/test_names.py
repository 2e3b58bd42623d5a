"""Unit tests for zettabee.names: hosts, file systems, users and endpoints."""

from __future__ import annotations

import pytest

from zettabee.names import (
    parse_endpoint,
    split_endpoint,
    validate_dataset,
    validate_host,
    validate_user,
)
from zettabee.pair import Endpoint

# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tank", "tank/data", "tank/a.b_c-d:e", "a1/b2/c3"])
def test_validate_dataset_accepts(name: str) -> None:
    assert validate_dataset(name) is None


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty file system name"),
        ("tank/da ta", "contains a space"),
        ("tank/a;b", "contains ';'"),
        ("tank/$(id)", "contains '$'"),
        ("tank/`id`", "contains '`'"),
        ("tank/a'b", 'contains "\'"'),
        ('tank/a"b', "contains '\"'"),
        ("tank/a|b", "contains '|'"),
        ("tank/a\nb", "contains a newline"),
        ("tank/a\tb", "contains a tab"),
        ("tank/\x1b[31m", "contains a control character (U+001B)"),
        ("tank/caf\u00e9", "(U+00E9)"),
        ("tank/-x", "component '-x' starts with '-'"),
        ("-tank", "component '-tank' starts with '-'"),
        ("1tank/x", "the pool name '1tank' must start with a letter"),
        ("tank//x", "empty component"),
        ("tank/", "empty component"),
        ("/tank", "empty component"),
        ("tank/..", "component '..' is not allowed"),
        ("tank@snap", "that names a snapshot"),
        ("tank#mark", "that names a bookmark"),
        ("tank/" + "a" * 300, "305 characters long; ZFS allows 255"),
    ],
)
def test_validate_dataset_rejects(name: str, fragment: str) -> None:
    message = validate_dataset(name)
    assert message is not None and fragment in message


@pytest.mark.parametrize(
    "name",
    [
        "src.example.com",
        "host-1",
        "localhost",
        "example.com.",
        "10.0.0.1",
        "[::1]",
        "[fe80::1]",
        "[fe80::1%eth0]",
        "[2001:db8::10]",
    ],
)
def test_validate_host_accepts(name: str) -> None:
    assert validate_host(name) is None


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty host name"),
        ("-oProxyCommand=sh", "starts with '-'"),
        ("a b", "contains a space"),
        ("a;b", "contains ';'"),
        ("$(id)", "contains '$'"),
        ("`id`", "contains '`'"),
        ("a'b", 'contains "\'"'),
        ('a"b', "contains '\"'"),
        ("a|b", "contains '|'"),
        ("a&b", "contains '&'"),
        ("a<b", "contains '<'"),
        ("a>b", "contains '>'"),
        ("a(b", "contains '('"),
        ("a)b", "contains ')'"),
        ("a\nb", "contains a newline"),
        ("a\x00b", "contains a control character (U+0000)"),
        ("fe80::1", "write an IPv6 address in brackets"),
        ("[fe80::1", "is not an IPv6 address in brackets"),
        ("[zz::1]", "is not an IPv6 address in brackets"),
        ("[12345::1]", "'12345::1' is not a valid IPv6 address"),
        ("[fe80::1;id]", "contains ';'"),
        ("[::1] ", "contains a space"),
        ("a..b", "empty label"),
        ("a.-b", "label '-b' starts with '-'"),
    ],
)
def test_validate_host_rejects(name: str, fragment: str) -> None:
    message = validate_host(name)
    assert message is not None and fragment in message


def test_validate_user() -> None:
    assert validate_user("root") is None
    assert validate_user("_zb-backup2") is None
    for bad in ("Root", "1user", "-x", "", "a" * 33):
        assert "is not a valid login name" in (validate_user(bad) or "")
    assert "(it contains ';')" in (validate_user("zb;id") or "")


@pytest.mark.parametrize(
    ("text", "host", "fs"),
    [
        ("host:tank/data", "host", "tank/data"),
        ("host:tank/a:b", "host", "tank/a:b"),
        ("[fe80::1]:tank/data", "[fe80::1]", "tank/data"),
        ("[::1]:tank", "[::1]", "tank"),
    ],
)
def test_split_endpoint(text: str, host: str, fs: str) -> None:
    assert split_endpoint(text) == (host, fs)
    assert parse_endpoint(text) == Endpoint(host, fs)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("tank/data", "is not host:pool/fs (no ':')"),
        ("[::1]tank", "no ':' after ']'"),
        ("[::1:tank", "without a closing ']'"),
        (":tank/data", "has an empty host"),
        ("host:", "empty file system name"),
    ],
)
def test_parse_endpoint_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_endpoint(text)


def test_parse_endpoint_reports_host_and_fs_together() -> None:
    with pytest.raises(ValueError) as info:
        parse_endpoint("a;b:tank/$x")
    assert "host 'a;b' contains ';'" in str(info.value)
    assert "file system 'tank/$x' contains '$'" in str(info.value)
