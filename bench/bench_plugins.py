#!/usr/bin/env python3
"""Wall time and peak memory of the check plugins, run as Nagios runs them, on a lab pair.

Each plugin file is executed directly (shebang, bare environment, ``--settings``) 50 times
after two warm-up runs; wall time is measured around fork-exec-wait. The peak RSS is GNU
time's (``/usr/bin/time -f %M``, 5 more runs): a child's ``ru_maxrss`` from ``wait4``
would start at the RSS of the process that forked it, this benchmark's own (22 MiB with
the lab's modules), whatever the plugin used. For scale, the same is measured for a bare
``python3 -c pass`` and for importing ``zettabee.checks`` alone.

Appends one JSON line to bench/results/plugins.jsonl and prints a table.
Targets: each plugin's median at most 2.5x the bare interpreter's in the same run (issue
18; issue 4's was 80 ms), peak RSS <= 25 MB per plugin run.

``--instructions`` also counts each case's instructions once (valgrind's callgrind, the
child alone): a figure the load of other work on the machine does not move, for
comparing two trees when wall times are too noisy to.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_update import destroy, destroy_on  # noqa: E402
from bench.record import append, compile_package, lab_held, load, machine  # noqa: E402
from lab.zfslab import ZfsLab  # noqa: E402

TARGET_RATIO = 2.5  # issue 18: a plugin's median over the bare interpreter's, same run
TARGET_MB = 25.0
BARE = "python3 -c pass"
TIME = "/usr/bin/time"  # GNU time, for the peak RSS (Debian: time)


def measure(argv: list[str], env: dict[str, str], runs: int, warmup: int = 2) -> dict[str, Any]:
    """Median/p90 wall milliseconds of ``argv`` over ``runs`` runs, and its peak RSS."""
    walls: list[float] = []
    codes: dict[str, int] = {}
    for i in range(warmup + runs):
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, _usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if i < warmup:
            continue
        walls.append(elapsed * 1000)
        codes[str(proc.returncode)] = codes.get(str(proc.returncode), 0) + 1
    walls.sort()
    rss = peak_rss(argv, env)
    return {
        "runs": runs,
        "median_ms": round(statistics.median(walls), 1),
        "p90_ms": round(walls[int(len(walls) * 0.9) - 1], 1),
        "min_ms": round(walls[0], 1),
        "peak_rss_mib": round(max(rss), 1),
        "median_rss_mib": round(statistics.median(rss), 1),
        "exit_codes": codes,
    }


def peak_rss(argv: list[str], env: dict[str, str], runs: int = 5) -> list[float]:
    """The maximum resident set (MiB) of each of ``runs`` runs of ``argv``, as GNU time
    reports it: its fork starts from time's few MiB, not from this benchmark's RSS."""
    out: list[float] = []
    with tempfile.NamedTemporaryFile("r") as report:
        for _ in range(runs):
            subprocess.run(
                [TIME, "-f", "%M", "-o", report.name, *argv],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            report.seek(0)
            out.append(int(report.read().split()[-1]) / 1024)  # KiB
    return out


def instructions(argv: list[str], env: dict[str, str]) -> int:
    """The instructions one run of ``argv`` executes (callgrind's total, the child alone;
    whatever its exit status: ``--help`` is UNKNOWN, 3, as the plugin guidelines ask)."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        env=dict(env, PYTHONHASHSEED="0"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"valgrind printed no total: {proc.stderr[-500:]}")
    return int(match[1])


def set_up_pair(lab: ZfsLab, tmp: Path) -> tuple[Path, str]:
    src, name = lab.source, "bench-plugins"
    ssh = Path(src.key).parent
    settings = tmp / "zettabee.ini"
    settings.write_text(
        f"[paths]\npairs = {tmp}/pairs.cfg\nstate_dir = {tmp}/state\nlog_dir = {tmp}/log\n"
        f"lock_dir = {tmp}/run\nspool_dir = {tmp}/spool\nknown_hosts = {ssh}/known_hosts\n"
        f"[defaults]\nsshkey = {ssh}/client_ed25519\n"
    )
    dst = f"{lab.dst_pool}/{name}"
    (tmp / "pairs.cfg").write_text(f"{src.address}:{src.pool}/{name} {lab.dest_address}:{dst}\n")
    tear_down_pair(lab, dst, f"{src.pool}/{name}")
    src.run("zfs", "create", f"{src.pool}/{name}")
    env = dict(os.environ, ZETTABEE_SETTINGS=str(settings), PYTHONPATH=str(REPO))
    for action in ("initialize", "update"):
        subprocess.run(
            [sys.executable, "-m", "zettabee.cli", action, dst], env=env, check=True, cwd=REPO
        )
    return settings, dst


def tear_down_pair(lab: ZfsLab, dst: str, src: str) -> None:
    """Both file systems gone, the pair's holds released first: a held snapshot is busy
    for good, and a second run could not create the source again."""
    destroy(dst)
    destroy_on(lab, src)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "plugins.jsonl"))
    parser.add_argument("--instructions", action="store_true",
                        help="also count each case's instructions (valgrind)")  # fmt: skip
    args = parser.parse_args()
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind (apt-get install valgrind)")
    if not os.access(TIME, os.X_OK):
        parser.error(f"the peak RSS needs GNU time as {TIME} (apt-get install time)")
    compile_package()
    load_before = load()

    with lab_held() as lab:
        tmp = Path(tempfile.mkdtemp(prefix="zb-bench-plugins-"))
        dst = ""
        try:
            settings, dst = set_up_pair(lab, tmp)
            python_bin = str(Path(sys.executable).parent)
            # What the nagios user has: a PATH, nothing else (PYTHONPATH stands in for an install).
            env = {"PATH": f"{python_bin}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)}
            plugins = REPO / "plugins"
            lag = str(plugins / "check_zettabee_lag")
            cases = {
                BARE: [sys.executable, "-c", "pass"],
                "import zettabee.checks": [sys.executable, "-c", "import zettabee.checks"],
                "check_zettabee_lag --help": [lag, "--help"],
                "check_zettabee_lag": [lag, "--settings", str(settings), dst],
                "check_zettabee_runtime": [str(plugins / "check_zettabee_runtime"), "--settings", str(settings), dst],
                "check_zettabee_lag --all": [lag, "--settings", str(settings), "--all"],
            }  # fmt: skip
            results = {label: measure(argv, env, args.runs) for label, argv in cases.items()}
            if args.instructions:  # the interpreter itself, as the shebang finds it
                for label, argv in cases.items():
                    argv = argv if argv[0] == sys.executable else [sys.executable, *argv]
                    results[label]["instructions"] = instructions(argv, env)
        finally:
            if dst:
                tear_down_pair(lab, dst, f"{lab.source.pool}/bench-plugins")
    load_after = load()

    bare = results[BARE]
    for row in results.values():
        row["over_bare"] = round(row["median_ms"] / bare["median_ms"], 2)
        if "instructions" in row:
            row["instructions_over_bare"] = round(row["instructions"] / bare["instructions"], 2)
    print(f"{'case':<27}{'median ms':>10}{'p90 ms':>8}{'x bare':>8}{'peak MiB':>10}  exit codes")
    for label, row in results.items():
        print(
            f"{label:<27}{row['median_ms']:>10}{row['p90_ms']:>8}{row['over_bare']:>8}"
            f"{row['peak_rss_mib']:>10}  {row['exit_codes']}"
            + (
                f"  {row['instructions_over_bare']}x in instructions"
                if "instructions" in row
                else ""
            )
        )
    plugin_rows = {label: row for label, row in results.items() if label.startswith("check_")}
    verdicts = {
        label: f"{row['over_bare']}x the bare interpreter (target <= {TARGET_RATIO}), "
        f"{row['peak_rss_mib']} MiB (target <= {TARGET_MB}): "
        + ("met" if row["over_bare"] <= TARGET_RATIO and row["peak_rss_mib"] <= TARGET_MB
           else "NOT met")
        for label, row in plugin_rows.items()
    }  # fmt: skip
    for label, text in verdicts.items():
        print(f"  {label}: {text}")
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_after,
        "targets": {"over_bare": TARGET_RATIO, "peak_rss_mib": TARGET_MB},
        "results": results,
        "verdicts": verdicts,
    }
    append(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
