"""The source's ``authorized_keys``: zettabee's restricted line, built and merged as text.

``zettabee enroll`` writes one line per key into the source user's file: the forced
command ``zettabee-source`` with the pairs and file systems the key serves, under
``restrict`` (no forwarding, no pty) and ``from=`` (only where the backup server connects
from). Everything here is pure: text in, text out, so that a second enroll with nothing
changed can be proven to leave the file byte for byte as it was.

zettabee's own line is the one that carries zettabee's key (the same key type and
blob), whatever its options: a new enroll replaces it where it stands and keeps every
other line, comments and blank lines included.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

# OpenSSH's key types as they start a key (after the options, if any).
_KEY_TYPE = re.compile(
    r"(?:ssh-(?:ed25519|rsa|dss)|ecdsa-sha2-nistp(?:256|384|521)"
    r"|sk-(?:ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)(?:-cert-v01@openssh\.com)?"
)
_BLOB = re.compile(r"[A-Za-z0-9+/]+={0,3}")
# What the command option may hold without quoting trouble: zettabee's validated names,
# fingerprints, host names and the path of zettabee-source.
_COMMAND_WORD = re.compile(r"[A-Za-z0-9_.:/@%+,=-]+")
_FROM_PATTERN = re.compile(r"!?[A-Za-z0-9_.:*?/\[\]-]+")


@dataclass(frozen=True)
class PublicKey:
    """An OpenSSH public key: its type, its base64 blob, its comment."""

    kind: str
    blob: str
    comment: str = ""

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """The key of a ``.pub`` file's line; ValueError names what is wrong."""
        words = text.strip().split(None, 2)
        if len(words) < 2 or not _KEY_TYPE.fullmatch(words[0]) or not _BLOB.fullmatch(words[1]):
            raise ValueError("not an OpenSSH public key ('TYPE BASE64 [COMMENT]')")
        return cls(words[0], words[1], words[2].strip() if len(words) > 2 else "")

    def same_key(self, other: PublicKey) -> bool:
        return (self.kind, self.blob) == (other.kind, other.blob)

    def __str__(self) -> str:
        return f"{self.kind} {self.blob} {self.comment}".rstrip()


@dataclass(frozen=True)
class KeyLine:
    """One line of ``authorized_keys`` that holds a key: its options as written, the key."""

    options: str
    key: PublicKey


def parse_line(line: str) -> KeyLine | None:
    """The options and key of an ``authorized_keys`` line; None for a comment, a blank
    line or anything this parser does not read as a key (kept as it is)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    options, rest = "", text
    if not _KEY_TYPE.fullmatch(text.split(None, 1)[0]):
        end = _options_end(text)
        if end is None:
            return None
        options, rest = text[:end], text[end:].lstrip()
    try:
        return KeyLine(options, PublicKey.parse(rest))
    except ValueError:
        return None


def _options_end(text: str) -> int | None:
    """Where the options field ends: the first blank outside double quotes (a quote
    inside them escaped with a backslash, as sshd reads it)."""
    quoted = False
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and quoted and index + 1 < len(text):
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char in " \t" and not quoted:
            return index
        index += 1
    return None


@dataclass(frozen=True)
class Grant:
    """What one key may do on the source: the forced command's pairs, file systems and
    mbuffer hosts, and where it may log in from."""

    source_command: str  # path of zettabee-source on the source
    datasets: tuple[str, ...]
    pairs: tuple[str, ...] = ()  # FP.RID (a pair's replica), or FP (any replica of it)
    mbuffer_hosts: tuple[str, ...] = ()
    from_patterns: tuple[str, ...] = ()
    trees: tuple[str, ...] = ()  # recursive lines' sources: served with all below them

    def command_words(self) -> list[str]:
        words = [self.source_command]
        for fp in sorted(set(self.pairs)):
            words += ["--pair", fp]
        for fs in sorted(set(self.trees)):
            words += ["--tree", fs]
        for host in sorted(set(self.mbuffer_hosts)):
            words += ["--mbuffer-host", host]
        return words + sorted(set(self.datasets))

    def problems(self) -> list[str]:
        bad = [w for w in self.command_words() if not _COMMAND_WORD.fullmatch(w)]
        found = [f"{w!r} cannot go into the key's forced command" for w in bad]
        found += [
            f"{p!r} is not a from= pattern"
            for p in self.from_patterns
            if not _FROM_PATTERN.fullmatch(p)
        ]
        if not self.datasets:
            found.append("no file system to serve")
        return found


def build_line(grant: Grant, key: PublicKey) -> str:
    """``restrict,from="...",command="zettabee-source --pair FP.RID ... FS..." KEY``.

    The command's words are names zettabee validated (no quote, no blank, no shell
    character), so joining them quotes nothing; anything else is refused first."""
    problems = grant.problems()
    if problems:
        raise ValueError("; ".join(problems))
    options = ["restrict"]
    if grant.from_patterns:
        options.append(f'from="{",".join(grant.from_patterns)}"')
    options.append(f'command="{shlex.join(grant.command_words())}"')
    return f"{','.join(options)} {key}"


def merge(text: str, line: str) -> str:
    """``text`` with ``line`` in it: in place of the earlier line of the same key (other
    lines of that key dropped), else at the end; every other line kept as written.
    When ``line`` is there already, exactly once, ``text`` comes back unchanged."""
    wanted = parse_line(line)
    if wanted is None:
        raise ValueError("not an authorized_keys line")
    out: list[str] = []
    placed = False
    for old in text.splitlines(keepends=True):
        parsed = parse_line(old)
        if parsed is not None and parsed.key.same_key(wanted.key):
            if not placed:
                out.append(line + "\n")
                placed = True
            continue
        out.append(old)
    if not placed:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(line + "\n")
    return "".join(out)


def remove(text: str, key: PublicKey) -> str:
    """``text`` without the lines of ``key``; unchanged when it has none."""
    kept = []
    for old in text.splitlines(keepends=True):
        parsed = parse_line(old)
        if parsed is None or not parsed.key.same_key(key):
            kept.append(old)
    return "".join(kept)


def lines_of(text: str, key: PublicKey) -> list[str]:
    """The lines of ``text`` that hold ``key``."""
    found = []
    for old in text.splitlines():
        parsed = parse_line(old)
        if parsed is not None and parsed.key.same_key(key):
            found.append(old)
    return found


def mentions(text: str, words: Sequence[str]) -> bool:
    """Whether some key line's options name every one of ``words`` (a path of
    zettabee-source that another line still uses, say)."""
    for old in text.splitlines():
        parsed = parse_line(old)
        if parsed is not None and all(w in parsed.options for w in words):
            return True
    return False
