"""``setup`` warns before the first run of a pair whose monitoring names NSCA cannot
carry: its passive results would otherwise be refused at every run."""

from __future__ import annotations

from zettabee.config import Settings, parse_settings
from zettabee.pair import Pair
from zettabee.pairfile import parse_pairs
from zettabee.preflight import nsca_name_problems

LONG_FS = "backup/" + "/".join(["a-rather-long-dataset-name"] * 5)


def settings(monitoring: str = "", passive: str = "nsca", host: str = "backup1") -> Settings:
    text = (
        "[paths]\npairs = /etc/zettabee/zettabee.cfg\n"
        f"[monitoring]\nhost_name = {host}\npassive = {passive}\n{monitoring}"
        "[nsca]\nhost = mon1\n[send_nsca]\nhost = mon1\n[icinga2-api]\nurl = https://mon1:5665\nuser = u\npassword = p\n"
    )
    return parse_settings(text, "/etc/zettabee/zettabee.ini")


def pair(cfg: Settings, destination: str = LONG_FS) -> Pair:
    loaded = parse_pairs(f"src1:tank/data backup1:{destination}\n", "/x.cfg", cfg)
    assert loaded.problems == []
    return loaded.pairs[0]


def test_a_service_name_over_nscas_127_bytes_fails_with_the_fix() -> None:
    cfg = settings()
    problems = nsca_name_problems(cfg, pair(cfg))
    assert len(problems) == 2  # lag and runtime
    assert all("NSCA carries at most 127" in p and "service_template" in p for p in problems)
    assert LONG_FS in problems[0]


def test_short_names_and_other_back_ends_pass() -> None:
    cfg = settings()
    assert nsca_name_problems(cfg, pair(cfg, "backup/data")) == []
    fingerprinted = settings("service_template = zettabee {check} {fingerprint}\n")
    assert nsca_name_problems(fingerprinted, pair(fingerprinted)) == []
    api = settings(passive="icinga2-api")  # the Icinga 2 API takes names of any length
    assert nsca_name_problems(api, pair(api)) == []


def test_a_host_name_over_63_bytes_fails() -> None:
    cfg = settings(passive="send_nsca", host="b" * 64)
    (problem,) = nsca_name_problems(cfg, pair(cfg, "backup/data"))
    assert "NSCA host name" in problem and "64 bytes" in problem
