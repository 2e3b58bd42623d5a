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

- full sends (``--full-mb``): ``zettabee initialize`` over ``ssh`` and over ``mbuffer``
  beside ``ssh SRC zfs send B | zfs receive -F RAW`` and ``mbuffer -I SRC:PORT | zfs
  receive -F RAW`` with ``ssh SRC 'zfs send B | mbuffer -O BACKUP:PORT'`` (zettabee's
  block size and buffer), each replica destroyed before its run.

Cases: an update with no change and with +N MB (targets of issue 18: at most 1.5x and
1.1x the raw pipeline's wall time), full sends (at least 0.95x its throughput), and one
no-change update's ``--debug`` timings. Appends one JSON line to
bench/results/update.jsonl (``machine.zfs``: "openzfs X").
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_update import MBUFFER_PORT, alternate, full_rows, verdicts  # noqa: E402
from bench.record import append, guest_installed, load, machine  # noqa: E402
from lab.zfslab import test_lab_name  # noqa: E402
from zettabee import zfs  # noqa: E402
from zettabee.mbuffer import MBUFFER_BLOCK, MBUFFER_MEMORY  # noqa: E402

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
            f"sync; t0=$(date +%s%N); {command} >/dev/null 2>/tmp/zb-bench.err || "
            '{ tail -c 2000 /tmp/zb-bench.err; exit 9; }; t1=$(date +%s%N); echo "$((t1 - t0))"'
        )
        proc = self.zb.dstside.sh(script, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{command}: exit {proc.returncode}: {proc.stdout.strip()}")
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

    def full(self, full_mb: int, repeats: int) -> dict[str, dict[str, object]]:
        """Full sends of one ``full_mb`` file system: zettabee's ``initialize`` over ssh
        and over mbuffer, each beside the raw pipeline of the same transport."""
        zb = self.zb
        sfs = zb.make_source("full", full_mb)
        zb.srcside.run("zfs", "snapshot", f"{sfs}@rawfull")
        dests = {"ssh": zb.dst_fs("full"), "mbuffer": zb.dst_fs("fullm")}
        lines = [
            f"{zb.srcside.address}:{sfs}  {zb.dstside.address}:{dests['ssh']}",
            f"{zb.srcside.address}:{sfs}  {zb.dstside.address}:{dests['mbuffer']}  " + zb.mbuffer(),
        ]
        zb.write_pairs(zb.pair_line("bench"), *lines)
        rows: dict[str, dict[str, list[float]]] = {
            f"full {kind}": {"raw": [], "zettabee": [], "stream": []} for kind in dests
        }
        size = 0
        for _ in range(repeats):
            for kind, dfs in dests.items():
                cols = rows[f"full {kind}"]
                self.destroy(self.rawfs)
                cols["raw"].append(self.raw_full(f"{sfs}@rawfull", kind))
                self.destroy(dfs)
                time.sleep(1.0)
                cols["zettabee"].append(self.timed(f"{self.zettabee} initialize {dfs}"))
                status = self.status(dfs)
                size = int(status["bytes"])
                cols["stream"].append(float(status["seconds"]))
        return full_rows(rows, size, repeats)

    def raw_full(self, snap: str, kind: str) -> float:
        send = f"zfs send {snap}"
        if kind == "ssh":
            return self.timed(f"{self.ssh} {shlex.quote(send)} | zfs receive -F {self.rawfs}")
        opts = f"-q -s {MBUFFER_BLOCK} -m {MBUFFER_MEMORY}"
        address = self.zb.srcside.address
        remote = f"{send} | mbuffer {opts} -O {self.zb.dstside.address}:{MBUFFER_PORT}"
        # the listener first, as zettabee starts it; the clock runs from its start
        return self.timed(
            f"{{ mbuffer {opts} -4 -I {address}:{MBUFFER_PORT} | zfs receive -F {self.rawfs} "
            f"& }}; until ss -Hltn 'sport = :{MBUFFER_PORT}' | grep -q .; do sleep 0.02; "
            f"done; {self.ssh} {shlex.quote(remote)} && wait $!"
        )

    def destroy(self, fs: str) -> None:
        """``fs`` gone, if it was there: zettabee's holds released first (a held
        snapshot survives ``destroy -r``)."""
        self.zb.dstside.sh(
            f"zfs list -H -o name -t snapshot -r {fs} 2>/dev/null | while read -r snap; do "
            'zfs holds -H "$snap" | while read -r _ tag _; do zfs release "$tag" "$snap"; '
            f"done; done; zfs destroy -r {fs} 2>/dev/null; ! zfs list {fs} >/dev/null 2>&1"
        )

    def status(self, dfs: str) -> dict[str, Any]:
        proc = self.zb.dstside.sh(f"{self.zettabee} fingerprint {dfs}")
        fp = proc.stdout.split()[-1]
        data = json.loads((self.zb.tmp / "state" / f"{fp}.json").read_text())
        assert isinstance(data, dict)
        return data

    def breakdown(self) -> tuple[dict[str, float], str]:
        """One no-change update with --debug: what each part cost, and the path taken."""
        time.sleep(1.0)
        proc = self.zb.dstside.sh(f"{self.zettabee} --debug update {self.dfs} 2>&1")
        line = next(x for x in proc.stdout.splitlines() if ": timings " in x)
        lines = proc.stdout.splitlines()
        path = next((x for x in lines if "step by step (" in x or "in one round trip" in x), "")
        parts = {part: float(sec) for part, sec in re.findall(r"(\w+)=([0-9.]+)s", line)}
        why = path.partition("update step by step (")[2].rstrip(")")
        if why:
            return parts, f"step by step: {why}"
        return parts, path.partition(": update ")[2] or "one round trip"


# The source's listing as zettabee asks for it (zfs.list_snapshots with holds), and the
# same in the JSON that OpenZFS 2.3 added: what issue 18 asks to decide by measurement.
LISTING_PROPS = "guid,creation,createtxg,userrefs"


def listing_formats(bench: GuestBench, snapshots: int = 100, repeats: int = 15) -> dict[str, Any]:
    """``zfs get -Hp`` against ``zfs get -j`` (and ``zfs list -j``) over one file system
    with ``snapshots`` snapshots, alternated on the source host, each timed there; and
    what parsing each output costs here. Empty where the source has no ``-j``."""
    zb = bench.zb
    fs = zb.src_fs("listing")
    zb.srcside.run("zfs", "create", "-p", fs)
    if zb.srcside.sh(f"zfs get -j guid {fs}", check=False).returncode != 0:
        return {}  # before OpenZFS 2.3: no -j
    # one file system's snapshots one by one: zfs snapshot takes one per file system
    zb.srcside.sh(f"for i in $(seq -w 1 {snapshots}); do zfs snapshot {fs}@s$i || exit 1; done")
    commands = {
        "get -Hp": f"zfs get -Hp -d 1 -o name,property,value {LISTING_PROPS} -- {fs}",
        "get -j": f"zfs get -j --json-int -d 1 -o name,property,value {LISTING_PROPS} {fs}",
        "list -j": f"zfs list -j --json-int -d 1 -t all -o name,{LISTING_PROPS} {fs}",
    }
    seconds: dict[str, list[float]] = {label: [] for label in commands}
    outputs = {label: zb.srcside.sh(command).stdout for label, command in commands.items()}
    for _ in range(repeats):
        for label, command in commands.items():
            script = (
                f"t0=$(date +%s%N); {command} >/dev/null || exit 9; "
                't1=$(date +%s%N); echo "$((t1 - t0))"'
            )
            seconds[label].append(int(zb.srcside.sh(script).stdout.split()[-1]) / 1e9)
    parsers = {
        "get -Hp": lambda text: zfs.parse_snapshots(fs, text),
        "get -j": lambda text: json.loads(text),
        "list -j": lambda text: json.loads(text),
    }
    parse_ms = {}
    for label, text in outputs.items():
        started = time.perf_counter()
        for _ in range(100):
            parsers[label](text)
        parse_ms[label] = round((time.perf_counter() - started) * 10, 3)  # per parse, ms
    return {
        "snapshots": snapshots,
        "median_s": {label: round(statistics.median(v), 4) for label, v in seconds.items()},
        "bytes": {label: len(text) for label, text in outputs.items()},
        "parse_ms": parse_ms,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zfs", choices=("2.1", "2.3"), default="2.1")
    parser.add_argument("--add-mb", type=int, default=20)
    parser.add_argument("--source-mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7, help="incremental runs of each kind")
    parser.add_argument(
        "--full-mb", type=int, default=100, help="full sends of this size (0: none)"
    )
    parser.add_argument("--full-repeats", type=int, default=3, help="full sends of each kind")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "update.jsonl"))
    parser.add_argument(
        "--formats", action="store_true",
        help="also time the source's listing as -Hp and as JSON (-j, OpenZFS 2.3)",
    )  # fmt: skip
    args = parser.parse_args()
    load_before = load()
    with guest_installed(test_lab_name(), args.zfs, "zb-bench-openzfs-") as (vm, share):
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
        if args.full_mb:
            result.update(bench.full(args.full_mb, args.full_repeats))
        formats = listing_formats(bench) if args.formats else {}
        version = zb.dstside.sh("zfs version | head -1").stdout.strip()
    load_after = load()
    print(f"{'case':<14}{'raw s':>9}{'zettabee s':>12}{'ratio':>8}")
    for label, cols in result.items():
        ratio = cols.get("ratio", cols.get("throughput_ratio"))
        print(f"{label:<14}{cols['raw']:>9.3f}{cols['zettabee']:>12.3f}{ratio:>8.2f}")
    said = verdicts(result)
    for label, text in said.items():
        print(f"  {label}: {text}")
    print(f"no-change update ({path}), --debug timings: "
          + " ".join(f"{k}={v:.3f}s" for k, v in parts.items()))  # fmt: skip
    if formats:
        print(f"listing of {formats['snapshots']} snapshots: median s {formats['median_s']}, "
              f"bytes {formats['bytes']}, parse ms {formats['parse_ms']}")  # fmt: skip
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
        "full_mb": args.full_mb,
        "options": "",
        "results": result,
        "verdicts": said,
        "no_change_path": path,
        "no_change_timings": parts,
        **({"listing_formats": formats} if formats else {}),
        "raw_median_spread": {
            label: round(statistics.pstdev(cols["raw_all"]), 3)  # type: ignore[arg-type]
            for label, cols in result.items()
        },
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
