"""The POSIX sh pipeline that a remote host runs as one command, and its report: each
stage's exit status and stderr, so that the destination can say which stage failed and
quote it. The source's restricted command (:mod:`zettabee.source`) builds the same
script again to check a request against it, character for character."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

STAGE_MARK = "@@zettabee-stage"


def pipeline_script(
    stages: Sequence[Sequence[str]],
    live: int | None = None,
    first: Sequence[Sequence[str]] = (),
) -> str:
    """A POSIX sh pipeline that reports every stage's exit status and stderr.

    Each command is quoted once here. After the pipeline, the script prints for each
    stage a line ``@@zettabee-stage <i> <status>`` followed by that stage's stderr, on
    stderr, so the caller can say which stage failed and quote it. The stage numbered
    ``live`` keeps its stderr on the script's own, as it is written (a status line read
    while the stream runs), and reports an empty one. The commands ``first`` run one
    after the other before the pipeline, each only if the one before succeeded, and the
    pipeline only if all did; they are reported as the first stages (what they print
    too: only the pipeline writes the stream), and the pipeline's stages follow
    (``live`` counts from the pipeline's first stage). A stage that did not run reports
    255 and nothing said.
    """
    parts = []
    offset = len(first)
    for i, argv in enumerate(stages, start=offset):
        if live is not None and i == live + offset:
            parts.append(f'{{ {shlex.join(argv)}; echo $? >"$d/s{i}"; : >"$d/e{i}"; }}')
            continue
        parts.append(f'{{ {shlex.join(argv)} 2>"$d/e{i}"; echo $? >"$d/s{i}"; }}')
    pipeline = " | ".join(parts)
    for i, argv in reversed(list(enumerate(first))):
        pipeline = (
            f'{shlex.join(argv)} 2>"$d/e{i}" >&2; s=$?; echo $s >"$d/s{i}"; '
            f"if [ $s = 0 ]; then {pipeline}; fi"
        )
    report = " ".join(str(i) for i in range(len(stages) + offset))
    return (
        "d=$(mktemp -d) || exit 125; "
        + pipeline
        + f"; for i in {report}; do "
        + f'printf "\\n{STAGE_MARK} %s %s\\n" "$i" "$(cat "$d/s$i" 2>/dev/null || echo 255)" >&2; '
        + 'cat "$d/e$i" >&2 2>/dev/null; done; '
        + "rc=0; for i in "
        + report
        + '; do s=$(cat "$d/s$i" 2>/dev/null || echo 255); [ "$s" = 0 ] || rc=$s; done; '
        + 'rm -rf "$d"; exit $rc'
    )


def parse_pipeline_stderr(text: str, count: int) -> tuple[list[int], list[str], str]:
    """Exit statuses and stderr per stage from :func:`pipeline_script`'s report."""
    codes = [255] * count
    errs = [""] * count
    head, *blocks = text.split(f"\n{STAGE_MARK} ")
    for block in blocks:
        first, _, rest = block.partition("\n")
        try:
            index, code = (int(x) for x in first.split())
        except ValueError:
            continue
        if 0 <= index < count:
            codes[index] = code
            errs[index] = rest.strip()
    return codes, errs, head.strip()
