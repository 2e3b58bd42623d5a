#!/usr/bin/env python3
"""A fleet of pairs from one source host on the lab: how ``replicate --all`` grows with
the number of pairs, and how fast ``status`` and ``check_zettabee_lag --all`` read them.

Set-up (not timed): FLEET pairs ``src/fleet/pNNN -> dst/fleet/pNNN``, initialized (the
file systems hold no data and are not mounted: the cost measured is zettabee's, per pair,
not the data's). Then, in rounds so that every case sees the same load:

- one ``zettabee update`` of one pair with no change (the unit of the targets);
- ``replicate --all --jobs J`` over pair files of 1, 10, 50 and 200 other pairs, with
  no change, for each J of ``--jobs`` (``4,8`` measures both in the same rounds); the
  per-pair time is the wall time over the number of pairs;
- ``zettabee status`` and ``check_zettabee_lag --all`` over all FLEET pairs.

Targets (issue 8): 50 pairs <= 10x one no-change update (judged for each J); status and
the check over 500 pairs < 1 s. Appends one JSON line to bench/results/fleet.jsonl and
prints tables.

``--zfs 2.1|2.3`` runs the same on OpenZFS, in the lab guest's main topology (as
bench_openzfs.py does): zettabee installed from the package built from this tree on the
backup host (the guest) with the destination pool, the source host in the guest's
network namespace over SSH. Its settings, pair files and state are on the guest's own
disk, every command is timed inside the guest, and the pairs are initialized there one
``zettabee initialize`` each (``--jobs`` at a time). Under software emulation every ZFS
command costs a second or more: a fleet of 500 takes hours to set up, so ``--fleet``
and ``--sizes`` are smaller there (the defaults: 62 pairs, sizes 1, 10 and 50), and the
ratio to one update is what counts. ``--lab`` picks the guest (default ZETTABEE_LAB).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_update import destroy, destroy_on  # noqa: E402
from bench.record import (  # noqa: E402
    append,
    compile_package,
    guest_installed,
    lab_held,
    load,
    machine,
    torn_down_after,
)
from lab.guest import BACKUP_ADDRESS, Guest  # noqa: E402
from lab.zfslab import ZfsLab, test_lab_name  # noqa: E402

SIZES = (1, 10, 50, 200)
GUEST_SIZES = (1, 10, 50)
TARGET_FLEET_50 = 10.0
TARGET_STATUS_S = 1.0


class Fleet:
    def __init__(self, lab: ZfsLab, count: int, options: str = "") -> None:
        self.lab = lab
        self.count = count
        self.src = lab.source
        self.tmp = Path(tempfile.mkdtemp(prefix="zb-fleet-"))
        self.sparent = f"{self.src.pool}/fleet"
        self.dparent = f"{lab.dst_pool}/fleet"
        ssh = Path(self.src.key).parent
        self.settings = self.tmp / "z.ini"
        self.settings.write_text(
            f"[paths]\npairs = {self.tmp}/all.cfg\nstate_dir = {self.tmp}/state\n"
            f"log_dir = {self.tmp}/log\nlock_dir = {self.tmp}/run\nspool_dir = {self.tmp}/spool\n"
            f"known_hosts = {ssh}/known_hosts\n[defaults]\nsshkey = {ssh}/client_ed25519\n"
        )
        self.lines = [
            f"{self.src.address}:{self.sparent}/p{i:03d} {lab.dest_address}:{self.dparent}/p{i:03d}"
            f"{' ' + options if options else ''}\n"
            for i in range(count)
        ]
        (self.tmp / "all.cfg").write_text("".join(self.lines))
        self.env = dict(os.environ, ZETTABEE_SETTINGS=str(self.settings))
        bindir = Path(sys.executable).parent
        self.bin = {name: shutil.which(name, path=str(bindir)) or name
                    for name in ("zettabee", "replicate", "check_zettabee_lag")}  # fmt: skip

    def pairfile(self, name: str, first: int, size: int) -> Path:
        path = self.tmp / f"{name}.cfg"
        path.write_text("".join(self.lines[first : first + size]))
        return path

    def set_up(self, jobs: int) -> float:
        """Create and initialize every pair (in this process, one connection)."""
        started = time.monotonic()
        self.tear_down()
        self.src.run("sh", "-c", f"zfs create -o mountpoint=none {self.sparent} && "
                     f"for i in $(seq -f %03g 0 {self.count - 1}); do zfs create {self.sparent}/p$i "
                     "|| exit 1; done")  # fmt: skip
        subprocess.run(["zfs", "create", "-o", "mountpoint=none", self.dparent], check=True)
        from zettabee.config import load_settings
        from zettabee.hosts import Hosts
        from zettabee.pairfile import load_pairs
        from zettabee.replicator import Replicator
        from zettabee.state import StateStore

        settings = load_settings(str(self.settings))
        pairs = load_pairs(settings.pairs, settings).pairs
        store = StateStore(settings.state_dir, settings.lock_dir, settings.log_dir)
        hosts = Hosts(settings.known_hosts)
        replicator = Replicator(store, hosts)
        try:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(replicator.initialize, pairs))
        finally:
            hosts.close()
        return time.monotonic() - started

    def tear_down(self) -> None:
        destroy(self.dparent, tries=100, pause=0.3)  # a fleet takes longer to go
        destroy_on(self.lab, self.sparent)

    def timed(self, program: str, *args: str, ok: tuple[int, ...] = (0,)) -> float:
        argv = [self.bin[program], *args]
        start = time.monotonic()
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        elapsed = time.monotonic() - start
        if proc.returncode not in ok:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        return elapsed


class GuestFleet:
    """The fleet on OpenZFS, in the lab guest's main topology; the same cases as
    :class:`Fleet`, timed inside the guest (the harness's own SSH costs no case)."""

    # Where the Debian package puts each program.
    BIN = {
        "zettabee": "/usr/sbin/zettabee",
        "replicate": "/usr/sbin/replicate",
        "check_zettabee_lag": "/usr/lib/nagios/plugins/check_zettabee_lag",
    }
    DIR = "/root/zb-fleet"  # the guest's own disk: state files over 9p would cost the runs

    def __init__(self, vm: Guest, count: int, options: str = "") -> None:
        self.vm = vm
        self.count = count
        src = vm.netns_source
        self.sparent = f"{vm.src_pool}/fleet"
        self.dparent = f"{vm.dst_pool}/fleet"
        self.lines = [
            f"{src.address}:{self.sparent}/p{i:03d} {BACKUP_ADDRESS}:{self.dparent}/p{i:03d}"
            f"{' ' + options if options else ''}\n"
            for i in range(count)
        ]
        self.settings = f"{self.DIR}/z.ini"
        self.write(
            "z.ini",
            f"[paths]\npairs = {self.DIR}/all.cfg\nstate_dir = {self.DIR}/state\n"
            f"log_dir = {self.DIR}/log\nlock_dir = {self.DIR}/run\n"
            f"spool_dir = {self.DIR}/spool\nknown_hosts = {src.known_hosts}\n"
            f"[defaults]\nsshkey = {src.key}\n",
        )
        self.write("all.cfg", "".join(self.lines))

    def write(self, name: str, text: str) -> str:
        path = f"{self.DIR}/{name}"
        self.vm.shell(f"mkdir -p {self.DIR} && cat >{path}", input=text)
        return path

    def pairfile(self, name: str, first: int, size: int) -> str:
        return self.write(f"{name}.cfg", "".join(self.lines[first : first + size]))

    def set_up(self, jobs: int) -> float:
        """Create every pair's file systems and initialize each pair, ``jobs`` at a time."""
        started = time.monotonic()
        self.vm.shell(
            f"zfs create -o mountpoint=none {self.sparent} && "
            f"for i in $(seq -f %03g 0 {self.count - 1}); do zfs create {self.sparent}/p$i "
            f"|| exit 1; done && zfs create -o mountpoint=none {self.dparent}",
            timeout=3600,
        )
        destinations = "".join(line.split()[1].partition(":")[2] + "\n" for line in self.lines)
        self.vm.shell(
            f"ZETTABEE_SETTINGS={self.settings} xargs -P {jobs} -n 1 "
            f"{self.BIN['zettabee']} initialize",
            input=destinations,
            timeout=4 * 3600,
        )
        return time.monotonic() - started

    def timed(self, program: str, *args: str, ok: tuple[int, ...] = (0,)) -> float:
        """Seconds the program took in the guest, measured there."""
        command = shlex.join([self.BIN[program], *args])
        proc = self.vm.shell(
            f"export ZETTABEE_SETTINGS={self.settings}; sync; t0=$(date +%s%N); "
            f"{command} >/dev/null 2>{self.DIR}/err; rc=$?; t1=$(date +%s%N); "
            f'echo "$rc $((t1 - t0))"; [ $rc -eq 0 ] || tail -c 2000 {self.DIR}/err >&2',
            timeout=3600,
        )
        code, nanoseconds = (int(word) for word in proc.stdout.split()[-2:])
        if code not in ok:
            raise RuntimeError(f"{command}: exit {code}: {proc.stderr.strip()}")
        return nanoseconds / 1e9

    def version(self) -> str:
        """``openzfs 2.3.9``, as the records name the back end."""
        text = self.vm.shell("zfs version | head -1").stdout.strip()
        return "openzfs " + text.removeprefix("zfs-")


def _jobs(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of jobs, e.g. 4 or 4,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each number of jobs must be 1 or more")
    return values


def _case(pairs: int, jobs: int) -> str:
    return f"replicate {pairs} jobs {jobs}"


@contextlib.contextmanager
def zfs_fuse_fleet(args: argparse.Namespace) -> Iterator[Fleet]:
    """The fleet on this host's zfs-fuse lab, torn down at the end unless ``--keep``."""
    with lab_held(keep=args.keep, name=args.lab) as lab:
        fleet = Fleet(lab, args.fleet, args.options)
        with torn_down_after(fleet.tear_down, args.keep):
            yield fleet


@contextlib.contextmanager
def guest_fleet(args: argparse.Namespace) -> Iterator[GuestFleet]:
    """The fleet in the lab guest of ``--zfs``, the package of this tree installed; the
    guest goes down at the end (its pools with it)."""
    with guest_installed(args.lab, args.zfs, "zb-bench-fleet-") as (vm, _share):
        yield GuestFleet(vm, args.fleet, args.options)


def measure(
    fleet: Fleet | GuestFleet, sizes: Sequence[int], jobs: Sequence[int], rounds: int
) -> tuple[float, dict[str, list[float]]]:
    """Set the fleet up, then time every case once a round; the set-up's seconds and
    each case's times."""
    times: dict[str, list[float]] = {"single update": [], "status": [], "check --all": []}
    times.update({_case(n, j): [] for j in jobs for n in sizes})
    setup_s = fleet.set_up(max(jobs))
    single = fleet.lines[0].split()[1]
    files, first = {}, 1
    for size in sizes:
        files[size] = fleet.pairfile(f"fleet{size}", first, size)
        first += size
    for _ in range(rounds):
        time.sleep(1.0)  # zettabee names snapshots by the second
        times["single update"].append(fleet.timed("zettabee", "update", single))
        for size in sizes:
            for j in jobs:
                time.sleep(1.0)  # the same pairs again: a new second
                argv = ["--all", "--jobs", str(j), "-c", str(files[size])]
                times[_case(size, j)].append(fleet.timed("replicate", *argv))
        times["status"].append(fleet.timed("zettabee", "status"))
        times["check --all"].append(fleet.timed("check_zettabee_lag", "--all", ok=(0, 1, 2)))
    return setup_s, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zfs", choices=("2.1", "2.3"),
                        help="on OpenZFS, in the lab guest's main topology (default: zfs-fuse here)")  # fmt: skip
    parser.add_argument("--lab", default=test_lab_name(), help="lab name (default ZETTABEE_LAB)")
    parser.add_argument("--fleet", type=int, help="pairs set up (status, check; default 500, "
                        f"in the guest {1 + sum(GUEST_SIZES)})")  # fmt: skip
    parser.add_argument("--sizes", type=_jobs, help="pairs per replicate run (default "
                        f"{','.join(map(str, SIZES))}, in the guest {','.join(map(str, GUEST_SIZES))})")  # fmt: skip
    parser.add_argument(
        "--jobs", type=_jobs, default=[4], help="replicate --jobs, or several: 4,8 (default 4)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="leave the fleet on the lab")
    parser.add_argument(
        "--options", default="", help="options of every pair, e.g. hold=no (default: none)"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fleet.jsonl"))
    args = parser.parse_args()
    sizes = args.sizes or (GUEST_SIZES if args.zfs else SIZES)
    args.fleet = args.fleet or (1 + sum(sizes) if args.zfs else 500)
    if args.fleet < 1 + sum(sizes):
        parser.error(f"--fleet must be at least {1 + sum(sizes)}")
    compile_package()
    load_before = load()
    host = machine()
    if args.zfs:
        with guest_fleet(args) as guest:
            host["zfs"] = guest.version()
            host["topology"] = (
                "guest (TCG emulation): backup host local pool, source in a netns over ssh"
            )
            setup_s, times = measure(guest, sizes, args.jobs, args.rounds)
    else:
        with zfs_fuse_fleet(args) as fleet:
            setup_s, times = measure(fleet, sizes, args.jobs, args.rounds)
    load_after = load()

    med = {label: statistics.median(values) for label, values in times.items()}
    unit = med["single update"]
    per_pair = {str(j): {str(n): round(med[_case(n, j)] / n, 3) for n in sizes} for j in args.jobs}
    ratios = {str(j): round(med[_case(50, j)] / unit, 2) for j in args.jobs if 50 in sizes}
    verdicts = {
        f"replicate 50, jobs {j}": f"{ratio:.1f}x one no-change update "
        f"(target <= {TARGET_FLEET_50}): " + ("met" if ratio <= TARGET_FLEET_50 else "NOT met")
        for j, ratio in ratios.items()
    }
    for label in ("status", "check --all"):
        verdicts[label] = (
            f"{med[label]:.3f}s for {args.fleet} pairs (target < {TARGET_STATUS_S}s"
            f"{'' if args.fleet >= 500 else ' for 500'}): "
            + ("met" if med[label] < TARGET_STATUS_S else "NOT met")
        )
    print(f"{'case':<24}{'median s':>10}")
    for label, value in med.items():
        print(f"{label:<24}{value:>10.3f}")
    for j in args.jobs:
        print(f"\n{'pairs':>6}{'wall s':>9}{'per pair s':>12}   (replicate --all --jobs {j})")
        for n in sizes:
            print(f"{n:>6}{med[_case(n, j)]:>9.3f}{per_pair[str(j)][str(n)]:>12.3f}")
    for label, text in verdicts.items():
        print(f"  {label}: {text}")
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": host,
        "load_before": load_before,
        "load_after": load_after,
        "fleet": args.fleet,
        "sizes": list(sizes),
        "jobs": args.jobs,
        "options": args.options,
        "rounds": args.rounds,
        "setup_s": round(setup_s, 1),
        "median_s": {label: round(value, 3) for label, value in med.items()},
        "all_s": {label: [round(v, 3) for v in values] for label, values in times.items()},
        "per_pair_s": per_pair,
        "replicate_50_over_single": ratios,
        "verdicts": verdicts,
    }
    append(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
