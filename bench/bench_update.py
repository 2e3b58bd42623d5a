#!/usr/bin/env python3
"""zettabee update beside the raw pipeline, on the lab, measured in the same run.

Raw pipeline: ``ssh src zfs send [-i A] B | zfs recv -F dst`` with the snapshot made
beforehand (not timed). zettabee: the whole ``zettabee initialize|update`` command as cron
runs it (start-up, control connection, snapshot, listing, stream, record, prune).

Appends one JSON line per run to bench/results/update.jsonl and prints a table.
Targets (issue 3): no-change update <= 1.5x raw; full 200 MB and +50 MB <= 1.1x raw.
"""

from __future__ import annotations

import argparse
import json
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

from bench.record import machine  # noqa: E402
from lab.zfslab import ZfsLab, test_lab_name  # noqa: E402


def run(argv: list[str], **kw: object) -> None:
    subprocess.run(argv, check=True, capture_output=True, **kw)  # type: ignore[call-overload]


def write_random(path: Path, mb: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(mb):
            handle.write(os.urandom(1 << 20))
    os.sync()


def release_holds(fs: str) -> None:
    """A pair holds its base (tag zettabee.<fingerprint>): release it, or destroy fails."""
    out = subprocess.run(
        ["zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", fs],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        name, _, refs = line.partition("\t")
        snap = name.partition("@")[2]
        if refs.isdigit() and int(refs) > 0 and snap.startswith("zettabee."):
            tag = ".".join(snap.split(".")[:2])
            subprocess.run(["zfs", "release", tag, name], capture_output=True)


class Bench:
    def __init__(self, lab: ZfsLab, transport: str) -> None:
        self.lab = lab
        self.src = lab.source
        self.transport = transport
        self.tmp = Path(tempfile.mkdtemp(prefix="zb-bench-"))
        self.name = f"bench-{transport}"
        self.sfs = f"{self.src.pool}/{self.name}"
        self.dfs = f"{lab.dst_pool}/{self.name}"
        self.rawfs = f"{lab.dst_pool}/{self.name}-raw"
        ssh = Path(self.src.key).parent
        (self.tmp / "z.ini").write_text(
            f"[paths]\npairs = {self.tmp}/pairs.cfg\nstate_dir = {self.tmp}/state\n"
            f"log_dir = {self.tmp}/log\nlock_dir = {self.tmp}/run\nspool_dir = {self.tmp}/spool\n"
            f"known_hosts = {ssh}/known_hosts\n[defaults]\nsshkey = {ssh}/client_ed25519\n"
        )
        (self.tmp / "pairs.cfg").write_text(
            f"{self.src.address}:{self.sfs} {lab.dest_address}:{self.dfs} transport={transport}\n"
        )
        self.env = dict(os.environ, ZETTABEE_SETTINGS=str(self.tmp / "z.ini"))
        self.zettabee = (
            shutil.which("zettabee", path=str(Path(sys.executable).parent)) or "zettabee"
        )
        self.n = 0

    def cleanup(self) -> None:
        for fs in (self.dfs, self.rawfs, self.sfs):
            release_holds(fs)
            for _ in range(20):
                if subprocess.run(["zfs", "destroy", "-r", fs], capture_output=True).returncode:
                    if (
                        b"does not exist"
                        in subprocess.run(["zfs", "list", fs], capture_output=True).stderr
                    ):
                        break
                    time.sleep(0.2)
                else:
                    break

    def zb(self, *args: str) -> float:
        os.sync()
        start = time.monotonic()
        subprocess.run([self.zettabee, *args], check=True, env=self.env, capture_output=True)
        return time.monotonic() - start

    def raw(self, base: str | None) -> float:
        """The raw pipeline for the same change; the snapshot is made before the clock."""
        self.n += 1
        snap = f"{self.sfs}@raw{self.n}"
        os.sync()
        self.src.run("zfs", "snapshot", snap)
        send = ["zfs", "send", *(["-i", f"{self.sfs}@{base}"] if base else []), snap]
        start = time.monotonic()
        sender = subprocess.Popen(self.src.ssh_argv(" ".join(send)), stdout=subprocess.PIPE)
        subprocess.run(["zfs", "recv", "-F", self.rawfs], stdin=sender.stdout, check=True,
                       capture_output=True)  # fmt: skip
        if sender.wait() != 0:
            raise RuntimeError("raw send failed")
        elapsed = time.monotonic() - start
        return elapsed

    def measure(self, full_mb: int, add_mb: int, repeats: int) -> dict[str, dict[str, float]]:
        self.cleanup()
        self.src.run("zfs", "create", self.sfs)
        write_random(Path(self.src.mountpoint) / self.name / "full.bin", full_mb)
        t_raw_full = self.raw(None)
        t_zb_full = self.zb("initialize", self.dfs)
        rows: dict[str, dict[str, list[float]]] = {
            "no change": {"raw": [], "zettabee": []},
            f"+{add_mb} MB": {"raw": [], "zettabee": []},
        }
        for i in range(repeats):
            base = f"raw{self.n}"
            rows["no change"]["raw"].append(self.raw(base))
            rows["no change"]["zettabee"].append(self.zb("update", self.dfs))
            write_random(Path(self.src.mountpoint) / self.name / f"add{i}.bin", add_mb)
            base = f"raw{self.n}"
            rows[f"+{add_mb} MB"]["raw"].append(self.raw(base))
            rows[f"+{add_mb} MB"]["zettabee"].append(self.zb("update", self.dfs))
        result = {
            f"full {full_mb} MB": {"raw": t_raw_full, "zettabee": t_zb_full},
        }
        for label, cols in rows.items():
            result[label] = {k: statistics.median(v) for k, v in cols.items()}
        for cols in result.values():
            cols["ratio"] = cols["zettabee"] / cols["raw"]
        self.cleanup()
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-mb", type=int, default=200)
    parser.add_argument("--add-mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transport", default="ssh", choices=["ssh", "mbuffer"])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "update.jsonl"))
    args = parser.parse_args()
    lab = ZfsLab(test_lab_name(), pool_size="3G")
    with lab.held():
        started_lab = not lab.is_up()
        if started_lab:
            lab.up()
        try:
            bench = Bench(lab, args.transport)
            result = bench.measure(args.full_mb, args.add_mb, args.repeats)
        finally:
            if started_lab:
                lab.down()

    print(f"{'case':<14}{'raw s':>9}{'zettabee s':>12}{'ratio':>8}   ({args.transport})")
    for label, cols in result.items():
        print(f"{label:<14}{cols['raw']:>9.3f}{cols['zettabee']:>12.3f}{cols['ratio']:>8.2f}")
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "transport": args.transport,
        "repeats": args.repeats,
        "results": result,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
