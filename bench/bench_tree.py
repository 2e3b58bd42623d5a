#!/usr/bin/env python3
"""A recursive pair line of CHILDREN children against as many pair lines of their own:
what the tree's expansion (one ``zfs list -r`` of the source and of the destination, the
record, the parent-first order) costs ``replicate --all --jobs J``.

Set-up (not timed): ``src/tree`` with CHILDREN children (no data; mounted, so that the
parent holds its children's mount directories, as a tree in use does), pulled
twice: by the one line ``src/tree -> dst/tree recursive=yes``, and by CHILDREN + 1 lines
``src/tree[/cNN] -> dst/flat[/cNN]`` (the same file systems, so both runs move the same:
nothing, as in a routine cron run). Then in rounds, alternating so both see the same
load: ``replicate --all --jobs J`` of each pair file, with no change.

Target (the recursive pairs' issue): the tree within 1.2x the time of the separate lines.
Appends one JSON line to bench/results/tree.jsonl and prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_update import destroy, destroy_on  # noqa: E402
from bench.record import (  # noqa: E402
    append,
    compile_package,
    lab_held,
    load,
    machine,
    torn_down_after,
)
from lab.zfslab import ZfsLab  # noqa: E402

TARGET = 1.2


class Trees:
    def __init__(self, lab: ZfsLab, children: int) -> None:
        self.lab = lab
        self.children = children
        self.src = lab.source
        self.tmp = Path(tempfile.mkdtemp(prefix="zb-tree-"))
        self.sroot = f"{self.src.pool}/tree"
        self.dtree, self.dflat = f"{lab.dst_pool}/tree", f"{lab.dst_pool}/flat"
        ssh = Path(self.src.key).parent
        self.settings = self.tmp / "z.ini"
        self.settings.write_text(
            f"[paths]\npairs = {self.tmp}/tree.cfg\nstate_dir = {self.tmp}/state\n"
            f"log_dir = {self.tmp}/log\nlock_dir = {self.tmp}/run\nspool_dir = {self.tmp}/spool\n"
            f"known_hosts = {ssh}/known_hosts\n[defaults]\nsshkey = {ssh}/client_ed25519\n"
        )
        src, dst = self.src.address, lab.dest_address
        self.tree_file = self.tmp / "tree.cfg"
        self.tree_file.write_text(f"{src}:{self.sroot} {dst}:{self.dtree} recursive=yes\n")
        names = ["", *(f"/c{i:03d}" for i in range(children))]
        self.flat_file = self.tmp / "flat.cfg"
        self.flat_file.write_text(
            "".join(f"{src}:{self.sroot}{n} {dst}:{self.dflat}{n}\n" for n in names)
        )
        self.env = dict(os.environ, ZETTABEE_SETTINGS=str(self.settings))
        bindir = Path(sys.executable).parent
        self.bin = {name: shutil.which(name, path=str(bindir)) or name
                    for name in ("zettabee", "replicate")}  # fmt: skip

    def set_up(self) -> float:
        started = time.monotonic()
        self.tear_down()
        self.src.run("sh", "-c", f"zfs create {self.sroot} && "
                     f"for i in $(seq -f %03g 0 {self.children - 1}); do zfs create {self.sroot}/c$i "
                     "|| exit 1; done")  # fmt: skip
        self.timed(self.bin["zettabee"], "initialize", "-c", str(self.tree_file), self.dtree)
        for line in self.flat_file.read_text().splitlines():
            dest = line.split()[1].partition(":")[2]
            self.timed(self.bin["zettabee"], "initialize", "-c", str(self.flat_file), dest)
        return time.monotonic() - started

    def tear_down(self) -> None:
        for fs in (self.dtree, self.dflat):
            destroy(fs, tries=100, pause=0.3)
        destroy_on(self.lab, self.sroot)

    def timed(self, *argv: str) -> float:
        start = time.monotonic()
        proc = subprocess.run(list(argv), env=self.env, capture_output=True, text=True)
        elapsed = time.monotonic() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="leave the trees on the lab")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tree.jsonl"))
    args = parser.parse_args()
    compile_package()
    load_before = load()
    times: dict[str, list[float]] = {"tree": [], "lines": []}
    with lab_held(keep=args.keep) as lab:
        trees = Trees(lab, args.children)
        with torn_down_after(trees.tear_down, args.keep):
            setup_s = trees.set_up()
            for _ in range(args.rounds):
                for case, path in (("tree", trees.tree_file), ("lines", trees.flat_file)):
                    time.sleep(1.0)  # zettabee names snapshots by the second
                    argv = ["--all", "--jobs", str(args.jobs), "-c", str(path), "--no-passive"]
                    times[case].append(trees.timed(trees.bin["replicate"], *argv))
    load_after = load()
    med = {case: statistics.median(values) for case, values in times.items()}
    ratio = round(med["tree"] / med["lines"], 2)
    verdict = f"{ratio:.2f}x the separate lines (target <= {TARGET}): " + (
        "met" if ratio <= TARGET else "NOT met"
    )
    print(f"{'case':<30}{'median s':>10}")
    print(f"{'1 line, ' + str(args.children) + ' children':<30}{med['tree']:>10.3f}")
    print(f"{str(args.children + 1) + ' lines':<30}{med['lines']:>10.3f}")
    print(f"  replicate --all --jobs {args.jobs}: {verdict}")
    append(
        args.out,
        {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "load_before": load_before,
            "load_after": load_after,
            "children": args.children,
            "jobs": args.jobs,
            "rounds": args.rounds,
            "setup_s": round(setup_s, 1),
            "median_s": {case: round(value, 3) for case, value in med.items()},
            "all_s": {case: [round(v, 3) for v in values] for case, values in times.items()},
            "tree_over_lines": ratio,
            "verdict": verdict,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
