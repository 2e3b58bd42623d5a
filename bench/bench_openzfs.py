#!/usr/bin/env python3
"""zettabee update beside the raw pipeline on OpenZFS, in the main topology.

The lab guest of ``--zfs`` (2.1: Debian 12's OpenZFS, 2.3: Debian 13's) with the package
built from this tree installed: zettabee and the destination pool on the backup host,
the source host in the guest's network namespace with its own sshd, reached over SSH
as a user's source is.

Every command is timed inside the guest (``date +%s%N`` around it), so the harness's
own SSH into the guest costs neither side. Raw and zettabee runs alternate, so both see
the same load; figures are medians.

- raw: ``ssh SRC zfs send -i A B | zfs receive -F RAW`` with the key and known_hosts
  zettabee uses, its snapshot made beforehand (not timed);
- zettabee: ``zettabee update`` as cron runs it (start-up, connection, probe, listing,
  snapshot, estimate, stream, record, prune).

Cases: an update with no change and with +N MB (targets of issue 18: at most 1.5x and
1.1x the raw pipeline's wall time), and one no-change update's ``--debug`` timings.
Appends one JSON line to bench/results/update.jsonl (``machine.zfs``: "openzfs X").
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_update import alternate, verdicts  # noqa: E402
from bench.record import append, load, machine  # noqa: E402
from lab.guest import Guest  # noqa: E402
from lab.zfslab import test_lab_name  # noqa: E402

# The tests' own harness builds the package and reaches the guest's two hosts (loaded by
# name: the tests are not type-checked with the package).
harness = importlib.import_module("tests.conftest")
INSTALLED, Zb = harness.INSTALLED, harness.Zb


class GuestBench:
    """One source file system, zettabee's replica of it and the raw pipeline's, in the
    guest's main topology."""

    def __init__(self, zb: Any) -> None:
        self.zb = zb
        self.sfs = zb.src_fs("bench")
        self.dfs = zb.dst_fs("bench")
        self.rawfs = zb.dst_fs("raw")
        self.n = 0
        ssh = [
            "ssh", "-i", zb.src.key, "-o", f"UserKnownHostsFile={zb.src.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-l", "root",
            "--", zb.srcside.address,
        ]  # fmt: skip
        self.ssh = shlex.join(ssh)
        self.zettabee = (
            f"env ZETTABEE_SETTINGS={shlex.quote(str(zb.settings))} {INSTALLED['zettabee']}"
        )

    def timed(self, command: str) -> float:
        """Seconds ``command`` took on the backup host, measured there."""
        script = (
            f"sync; t0=$(date +%s%N); {command} >/dev/null 2>&1 || exit 9; "
            't1=$(date +%s%N); echo "$((t1 - t0))"'
        )
        proc = self.zb.dstside.sh(script)
        return int(proc.stdout.split()[-1]) / 1e9

    def raw_snapshot(self) -> str:
        self.n += 1
        snap = f"raw{self.n}"
        self.zb.srcside.run("zfs", "snapshot", f"{self.sfs}@{snap}")
        return snap

    def raw(self, snap: str, base: str | None) -> float:
        since = f"-i {self.sfs}@{base} " if base else ""
        send = shlex.quote(f"zfs send {since}{self.sfs}@{snap}")
        return self.timed(f"{self.ssh} {send} | zfs receive -F {self.rawfs}")

    def update(self) -> float:
        return self.timed(f"{self.zettabee} update {self.dfs}")

    def incremental(self, add_mb: int, repeats: int) -> dict[str, dict[str, object]]:
        src_dir = self.zb.src_dir("bench")
        return alternate(
            add_mb,
            repeats,
            self.raw_snapshot,
            self.raw,
            self.update,
            lambda name: self.zb.srcside.write_random(src_dir / name, add_mb),
        )

    def breakdown(self) -> tuple[dict[str, float], str]:
        """One no-change update with --debug: what each part cost, and the path taken."""
        time.sleep(1.0)
        proc = self.zb.dstside.sh(f"{self.zettabee} --debug update {self.dfs} 2>&1")
        line = next(x for x in proc.stdout.splitlines() if ": timings " in x)
        path = next((x for x in proc.stdout.splitlines() if "step by step (" in x), "")
        parts = {part: float(sec) for part, sec in re.findall(r"(\w+)=([0-9.]+)s", line)}
        why = path.partition("update step by step (")[2].rstrip(")")
        return parts, f"step by step: {why}" if why else "one round trip"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zfs", choices=("2.1", "2.3"), default="2.1")
    parser.add_argument("--add-mb", type=int, default=20)
    parser.add_argument("--source-mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7, help="incremental runs of each kind")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "update.jsonl"))
    args = parser.parse_args()
    share = Path(tempfile.mkdtemp(prefix="zb-bench-openzfs-"))
    share.chmod(0o755)
    deb = harness.build_package(share / "deb")
    vm = Guest(test_lab_name(), zfs=args.zfs, share=share)
    load_before = load()
    with vm.held():
        vm.build()
        vm.up()
        try:
            vm.start_source_host()
            vm.install_package(deb)
            (share / "zb").mkdir()
            zb = Zb(harness.main_topology_backend(vm), share / "zb", "bench")
            bench = GuestBench(zb)
            zb.make_source("bench", args.source_mb)
            zb.write_pairs(zb.pair_line("bench"))
            init = zb.run("initialize", bench.dfs, timeout=1800)
            if init.returncode != 0:
                raise RuntimeError(f"initialize failed: {init.stderr.strip()}")
            result = bench.incremental(args.add_mb, args.repeats)
            parts, path = bench.breakdown()
            version = zb.dstside.sh("zfs version | head -1").stdout.strip()
        finally:
            vm.down()
    load_after = load()
    print(f"{'case':<14}{'raw s':>9}{'zettabee s':>12}{'ratio':>8}")
    for label, cols in result.items():
        print(f"{label:<14}{cols['raw']:>9.3f}{cols['zettabee']:>12.3f}{cols['ratio']:>8.2f}")
    said = verdicts(result)
    for label, text in said.items():
        print(f"  {label}: {text}")
    print(f"no-change update ({path}), --debug timings: "
          + " ".join(f"{k}={v:.3f}s" for k, v in parts.items()))  # fmt: skip
    host = machine()
    host["zfs"] = "openzfs " + version.removeprefix("zfs-")
    host["topology"] = "guest (TCG emulation): backup host local pool, source in a netns over ssh"
    append(args.out, {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": host,
        "load_before": load_before,
        "load_after": load_after,
        "source_mb": args.source_mb,
        "add_mb": args.add_mb,
        "options": "",
        "results": result,
        "verdicts": said,
        "no_change_path": path,
        "no_change_timings": parts,
        "raw_median_spread": {
            label: round(statistics.pstdev(cols["raw_all"]), 3)  # type: ignore[arg-type]
            for label, cols in result.items()
        },
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
