"""``zettabee-source`` as one self-contained file for a source host: a zipapp of this very
version of zettabee, which needs nothing on the source but ``python3``.

The archive is built in memory from the installed package, byte for byte the same every
time (sorted members, one fixed date), so its SHA-256 says whether the copy on a source
is this one: a second enroll with nothing changed writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import zettabee

# What the source's python3 must be: the package's own floor (setup.cfg python_requires).
MIN_PYTHON = (3, 11)
SHEBANG = b"#!/usr/bin/env python3\n"
_MAIN = b"import sys\n\nfrom zettabee.source import main\n\nsys.exit(main())\n"
_DATE = (2020, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class SourceApp:
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def build() -> SourceApp:
    """The zipapp: ``__main__.py`` and the package's modules (stdlib only on the source's
    path: zettabee-source never imports paramiko or nagiosplugin)."""
    package = Path(zettabee.__file__).resolve().parent
    buffer = io.BytesIO()
    buffer.write(SHEBANG)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        _add(archive, "__main__.py", _MAIN)
        for module in sorted(package.glob("*.py")):
            _add(archive, f"zettabee/{module.name}", module.read_bytes())
    return SourceApp(buffer.getvalue())


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)
