#!/usr/bin/env python3
"""Build and boot times of the OpenZFS lab guest.

Builds the image when the cache has none for the current recipe (``--rebuild`` forces
it, into a scratch cache so the shared one stays), then boots the guest ``--boots``
times and measures from QEMU's start to the first successful SSH command, plus one round
trip of a ``zfs list`` on an open connection. The build time is the one the build
recorded in the image's meta.json (measured now when this run built it).

Appends one JSON line to bench/results/guest.jsonl and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import append, machine  # noqa: E402
from lab.zfslab import test_lab_name  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true", help="build into a scratch cache")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "guest.jsonl"))
    args = parser.parse_args(argv)
    if args.rebuild:
        os.environ["ZETTABEE_GUEST_CACHE"] = f"/var/tmp/zettabee-lab/guest-bench-{os.getpid()}"
    from lab import guest as guest_module

    vm = guest_module.Guest(test_lab_name())
    built_now = not vm.built()
    vm.build()
    meta = vm.meta()
    boots: list[float] = []
    commands: list[float] = []
    with vm.held():
        try:
            for _ in range(args.boots):
                boots.append(vm.up())
                started = time.monotonic()
                vm.run("zfs", "list", "-H", "-o", "name")
                commands.append(time.monotonic() - started)
                vm.down()
        finally:
            vm.down()
            if args.rebuild:
                import shutil

                shutil.rmtree(guest_module.GUEST_CACHE, ignore_errors=True)
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": dict(machine(), zfs=f"OpenZFS {meta['zfs']} (guest kernel {meta['kernel']})"),
        "build_seconds": meta["build_seconds"],
        "built_by_this_run": built_now,
        "kernel_file": meta.get("kernel_file"),
        "boot_to_ssh_seconds": {
            "runs": boots,
            "median": round(statistics.median(boots), 1),
        },
        "zfs_list_over_open_ssh_ms": round(statistics.median(commands) * 1000, 1),
    }
    print(
        f"build {meta['build_seconds']:.0f} s ({'now' if built_now else 'cached'}), "
        f"boot to SSH median {record['boot_to_ssh_seconds']['median']} s over {len(boots)} "  # type: ignore[index]
        f"boots, zfs list {record['zfs_list_over_open_ssh_ms']} ms"
    )
    append(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
