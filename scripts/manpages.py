#!/usr/bin/env python3
"""Write a man page for every executable zettabee installs, from its own argparse parser.

Each executable is started as it starts when installed (a console script's function, a
script of plugins/ run as __main__) with ``--help``, and its parser is taken at the
moment it would parse: whatever module builds it, the page shows the options, usage,
description and epilog that ``--help`` shows, so the two cannot drift apart. The
executables are read from setup.cfg; one missing from PAGES below stops the build.

    python3 scripts/manpages.py OUTDIR     # OUTDIR/zettabee.8, OUTDIR/replicate.8, ...
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import importlib
import os
import re
import runpy
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Page:
    section: str  # 8: run by root (in /usr/sbin), 1: by anyone
    summary: str  # the NAME line, what whatis and apropos show
    files: tuple[str, ...] = ()
    see_also: tuple[str, ...] = ()


SETTINGS = "/etc/zettabee/zettabee.ini"
PAIRS = "/etc/zettabee/zettabee.cfg"
STATE = ("/var/lib/zettabee", "/var/log/zettabee", "/run/zettabee")

PAGES = {
    "zettabee": Page(
        "8",
        "ZFS replication over SSH or mbuffer, watched by Nagios and Icinga",
        (SETTINGS, PAIRS, *STATE),
        ("replicate(8)", "check_zettabee_lag(1)", "check_zettabee_runtime(1)", "zfs(8)"),
    ),
    "replicate": Page(
        "8",
        "update zettabee pairs and submit their passive check results",
        (SETTINGS, PAIRS, *STATE, "/var/spool/zettabee"),
        ("zettabee(8)", "systemd.timer(5)", "cron(8)"),
    ),
    "zettabee-source": Page(
        "1",
        "forced command that lets zettabee's SSH key run only a pull's commands",
        (),
        ("zettabee(8)", "sshd(8)", "authorized_keys(5)"),
    ),
    "check_zettabee_lag": Page(
        "1",
        "Nagios/Icinga plugin: how far a zettabee replica is behind its source",
        (SETTINGS, PAIRS, "/var/lib/zettabee"),
        ("check_zettabee_runtime(1)", "zettabee(8)"),
    ),
    "check_zettabee_runtime": Page(
        "1",
        "Nagios/Icinga plugin: how long a zettabee pair's run takes",
        (SETTINGS, PAIRS, "/var/lib/zettabee", "/run/zettabee"),
        ("check_zettabee_lag(1)", "zettabee(8)"),
    ),
}


class _Found(BaseException):
    """Raised from parse_args with the parser (BaseException: nagiosplugin's guard and
    the executables' own handlers catch Exception, and must let it through)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _intercept(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
    raise _Found(self)


def executables(setup_cfg: Path = REPO / "setup.cfg") -> dict[str, Callable[[], object]]:
    """name -> how to start it, for every executable setup.cfg installs."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    found: dict[str, Callable[[], object]] = {}
    for script in cfg.get("options", "scripts", fallback="").split():
        path = str(REPO / script)
        found[Path(script).name] = lambda path=path: runpy.run_path(path, run_name="__main__")
    for line in cfg.get("options.entry_points", "console_scripts", fallback="").splitlines():
        if not line.strip():
            continue
        name, target = (part.strip() for part in line.split("=", 1))
        module, function = target.split(":")
        found[name] = lambda m=module, f=function: getattr(importlib.import_module(m), f)()
    return found


def parser_of(name: str, start: Callable[[], object]) -> argparse.ArgumentParser:
    """The parser ``name`` builds, taken when it parses its command line."""
    saved_argv, saved_parse = sys.argv, argparse.ArgumentParser.parse_known_args
    sys.argv = [name, "--help"]
    argparse.ArgumentParser.parse_known_args = _intercept  # type: ignore[assignment]
    try:
        start()
    except _Found as found:
        return found.parser
    except SystemExit as exc:
        raise SystemExit(
            f"manpages: {name} exited ({exc.code}) before parsing its command line"
        ) from None
    finally:
        sys.argv, argparse.ArgumentParser.parse_known_args = saved_argv, saved_parse  # type: ignore[method-assign]
    raise SystemExit(f"manpages: {name} returned without parsing a command line")


# -- roff --------------------------------------------------------------------------


def roff(text: str) -> str:
    """Plain text as roff: backslashes and minus signs escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def paragraphs(text: str, raw: bool) -> list[tuple[str, str]]:
    """A description or epilog as (its text, roff): reflowed (roff fills the lines), but
    under a raw formatter a block with indented lines (examples) keeps its lines."""
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if raw and any(line[:1].isspace() for line in block.split("\n")):
            blocks.append((block, ".nf\n" + roff(block) + "\n.fi"))
        else:
            blocks.append((block, roff(" ".join(block.split()))))
    return blocks


def _paras(text: str, raw: bool) -> list[str]:
    return "\n.PP\n".join(r for _, r in paragraphs(text, raw)).split("\n")


def _raw(parser: argparse.ArgumentParser) -> bool:
    return issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)


def _usage(parser: argparse.ArgumentParser) -> str:
    text = parser.format_usage().strip()
    return " ".join(text.removeprefix("usage:").split())


def _options(
    parser: argparse.ArgumentParser, shown: set[argparse.Action]
) -> Iterator[tuple[str | None, list[str]]]:
    """(group title, its .TP entries) for the actions not yet in ``shown``."""
    formatter = parser._get_formatter()
    for group in parser._action_groups:
        entries = []
        for action in group._group_actions:
            if action.help == argparse.SUPPRESS or action in shown:
                continue
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            shown.add(action)
            invocation = formatter._format_action_invocation(action)
            text = formatter._expand_help(action) if action.help else ""
            entries.append(f".TP\n.B {roff(invocation)}\n{roff(' '.join(text.split()))}")
        if entries:
            yield group.title, entries


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def manpage(name: str, parser: argparse.ArgumentParser, page: Page, version: str, date: str) -> str:
    out = [
        f'.TH {roff(name.upper())} {page.section} "{date}" "zettabee {version}" "zettabee"',
        ".nh",  # option names and paths are not to be hyphenated
        ".SH NAME",
        f"{roff(name)} \\- {roff(page.summary)}",
        ".SH SYNOPSIS",
        roff(_usage(parser)),
    ]
    if parser.description:
        out += [".SH DESCRIPTION", *_paras(parser.description, _raw(parser))]
    shown: set[argparse.Action] = set()
    options = list(_options(parser, shown))
    if options:
        out.append(".SH OPTIONS")
        for title, entries in options:
            if title not in ("options", "optional arguments", "positional arguments"):
                out.append(f".SS {roff(title or '')}")
            out += entries
    commands = _subcommands(parser)
    if commands:
        out.append(".SH ACTIONS")
        for action, sub in commands.items():
            out += [f".SS {roff(action)}", roff(_usage(sub))]
            if sub.description:
                out += [".PP", *_paras(sub.description, _raw(sub))]
            for _title, entries in _options(sub, set(shown)):
                out += entries
    if parser.epilog:
        notes: list[str] = []
        status: list[str] = []
        for text, block in paragraphs(parser.epilog, _raw(parser)):
            (status if text.startswith("Exit status") else notes).append(block)
        if status:
            out += [".SH EXIT STATUS", *"\n.PP\n".join(status).split("\n")]
        if notes:
            out += [".SH NOTES", *"\n.PP\n".join(notes).split("\n")]
    if page.files:
        out.append(".SH FILES")
        out.append("\n.br\n".join(roff(path) for path in page.files))
    see_also = [*page.see_also, "/usr/share/doc/zettabee/README.md.gz"]
    out += [".SH SEE ALSO", ".ad l", ", ".join(roff(s) for s in see_also)]
    return "\n".join(out) + "\n"


def _version() -> str:
    text = (REPO / "zettabee" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not match:
        raise SystemExit("manpages: no __version__ in zettabee/__init__.py")
    return match[1]


def _date() -> str:
    """The build's date (SOURCE_DATE_EPOCH, set by dpkg from debian/changelog), so the
    same source makes the same pages."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
    when = (
        datetime.datetime.fromtimestamp(epoch, datetime.UTC)
        if epoch
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%d")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    found = executables()
    missing = sorted(set(found) - set(PAGES))
    if missing:
        raise SystemExit(f"manpages: no page entry for {', '.join(missing)} (add it to PAGES)")
    args.outdir.mkdir(parents=True, exist_ok=True)
    version, date = _version(), _date()
    for name, start in sorted(found.items()):
        page = PAGES[name]
        text = manpage(name, parser_of(name, start), page, version, date)
        (args.outdir / f"{name}.{page.section}").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
