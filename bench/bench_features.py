#!/usr/bin/env python3
"""What holds and capability probing cost an update that has nothing to send.

The same no-change ``zettabee update`` on the lab (zfs-fuse, source over SSH), for two
pairs that differ only in ``hold``: with holds (the default: the new snapshot is held on
both sides and the old base released) and with ``hold=no``. Runs alternate, so a busy
machine slows both alike; both probe each host once per run (zfs-fuse has holds and
nothing else, so probing is all the rest of the modern machinery costs there).

Appends one JSON line to bench/results/features.jsonl and prints medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_update import release_holds  # noqa: E402
from bench.record import append, lab_held, machine  # noqa: E402

VARIANTS = {"holds": "", "hold=no": "hold=no"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "features.jsonl"))
    args = parser.parse_args()
    zettabee = str(Path(sys.executable).parent / "zettabee")
    with lab_held() as lab:
        tmp = Path(tempfile.mkdtemp(prefix="zb-features-"))
        ssh = Path(lab.source.key).parent
        (tmp / "z.ini").write_text(
            f"[paths]\npairs = {tmp}/pairs.cfg\nstate_dir = {tmp}/state\nlog_dir = {tmp}/log\n"
            f"lock_dir = {tmp}/run\nspool_dir = {tmp}/spool\nknown_hosts = {ssh}/known_hosts\n"
            f"[defaults]\nsshkey = {ssh}/client_ed25519\n"
        )
        lines, names = [], {}
        for variant, options in VARIANTS.items():
            leaf = "bench-feat-" + variant.replace("=", "-")
            names[variant] = f"{lab.dst_pool}/{leaf}"
            lines.append(
                f"{lab.source.address}:{lab.source.pool}/{leaf} "
                f"{lab.dest_address}:{lab.dst_pool}/{leaf} {options}".rstrip()
            )
        (tmp / "pairs.cfg").write_text("\n".join(lines) + "\n")
        env = dict(os.environ, ZETTABEE_SETTINGS=str(tmp / "z.ini"))
        fss = [f"{pool}/{n.split('/', 1)[1]}" for n in names.values()
               for pool in (lab.source.pool, lab.dst_pool)]  # fmt: skip
        timings: dict[str, list[float]] = {v: [] for v in VARIANTS}
        try:
            for fs in fss:
                release_holds(fs)
                subprocess.run(["zfs", "destroy", "-r", fs], capture_output=True)
            for dst in names.values():
                subprocess.run(["zfs", "create", dst.replace(lab.dst_pool, lab.source.pool, 1)],
                               check=True)  # fmt: skip
                subprocess.run([zettabee, "initialize", dst], check=True, env=env)
            for _ in range(args.repeats):
                for variant, dst in names.items():
                    time.sleep(1.05)  # one snapshot name per second
                    started = time.monotonic()
                    subprocess.run([zettabee, "update", dst], check=True, env=env)
                    timings[variant].append(time.monotonic() - started)
        finally:
            for fs in fss:
                release_holds(fs)
                subprocess.run(["zfs", "destroy", "-r", fs], capture_output=True)
    medians = {v: statistics.median(t) for v, t in timings.items()}
    for variant, value in medians.items():
        print(f"{variant:<10}{value:>8.3f} s  (median of {args.repeats})")
    print(f"holds cost {1000 * (medians['holds'] - medians['hold=no']):.0f} ms per update")
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load": os.getloadavg()[0],
        "case": "no-change update, ssh",
        "repeats": args.repeats,
        "median_s": medians,
    }
    append(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
