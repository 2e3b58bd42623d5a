"""scripts/manpages.py: the man pages come from the parsers the executables build."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_manpages() -> ModuleType:
    spec = importlib.util.spec_from_file_location("manpages", REPO / "scripts" / "manpages.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["manpages"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


manpages = load_manpages()


def test_every_executable_setup_cfg_installs_has_a_page() -> None:
    assert set(manpages.executables()) == set(manpages.PAGES)


def test_a_page_shows_the_options_usage_and_epilog_of_the_executables_parser() -> None:
    found = manpages.executables()
    parser = manpages.parser_of("zettabee-source", found["zettabee-source"])
    page = manpages.manpage(
        "zettabee-source", parser, manpages.PAGES["zettabee-source"], "9.9", "2026-01-01"
    )
    assert page.startswith('.TH ZETTABEE\\-SOURCE 1 "2026-01-01" "zettabee 9.9" "zettabee"\n')
    assert "\\-\\-mbuffer\\-host" in page
    usage = " ".join(parser.format_usage().split()[1:])
    assert f".SH SYNOPSIS\n{manpages.roff(usage)}\n" in page
    assert "authorized_keys: restrict" in page


def test_the_parser_is_taken_from_a_script_run_as_main(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_text(
        "import argparse\n"
        "if __name__ == '__main__':\n"
        "    p = argparse.ArgumentParser(prog='tool', description='A tool.')\n"
        "    p.add_argument('--flag', help='a flag')\n"
        "    p.parse_args()\n"
        "    raise SystemExit('the tool ran on')\n"
    )
    parser = manpages.parser_of(
        "tool", lambda: manpages.runpy.run_path(str(script), run_name="__main__")
    )
    assert [a.dest for a in parser._actions] == ["help", "flag"]


def test_an_executable_that_exits_before_parsing_stops_the_build() -> None:
    with pytest.raises(SystemExit, match="tool exited \\(3\\) before parsing"):
        manpages.parser_of("tool", lambda: sys.exit(3))


def test_text_cannot_become_a_roff_request() -> None:
    assert manpages.roff(".SH oops\n'also\\no") == "\\&.SH oops\n\\&'also\\eno"
    assert manpages.roff("--all") == "\\-\\-all"
