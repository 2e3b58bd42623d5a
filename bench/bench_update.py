#!/usr/bin/env python3
"""One zettabee run beside the raw pipeline doing the same transfer, on the lab.

Raw pipelines (their snapshot made beforehand, not timed):

- ssh: ``ssh src zfs send [-i A] B | zfs recv -F dst``;
- mbuffer: ``mbuffer -I port | zfs recv -F dst`` here, then
  ``ssh src 'zfs send B | mbuffer -O dst:port'``, with zettabee's block size and buffer.

zettabee: the whole command as cron runs it (start-up, connection, listing, snapshot,
stream, record, prune): ``zettabee update`` for an update with no change and with +N MB,
``zettabee initialize`` for a full send over ``ssh`` and over ``mbuffer``. Raw and
zettabee runs alternate, so both see the same load; figures are medians.

Targets (issue 8): no change <= 1.5x raw, +50 MB <= 1.1x raw; a full send of 500 MB at
>= 0.95x the raw pipeline's throughput on the same transport (throughput: bytes over the
whole command's wall time; the stream's own rate is recorded beside it).

Appends one JSON line to bench/results/update.jsonl and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import append, compile_package, lab_held, load, machine  # noqa: E402
from lab.zfslab import ZfsLab  # noqa: E402
from zettabee.mbuffer import (  # noqa: E402
    MBUFFER_BLOCK,
    MBUFFER_MEMORY,
    listener_is_ours,
    local_fds,
    local_tables,
)
from zettabee.pair import tag_of  # noqa: E402

TARGETS = {"no change": 1.5, "+MB": 1.1, "full ssh": 0.95, "full mbuffer": 0.95}
MBUFFER_PORT = 19431


def write_random(path: Path, mb: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(mb):
            handle.write(os.urandom(1 << 20))
    os.sync()


def release_holds(fs: str, lab: ZfsLab | None = None) -> None:
    """A pair holds its base (tag zettabee.<fingerprint>): release it, or destroy fails.
    On the source host with ``lab``, on this one without."""

    def run(*argv: str) -> str:
        if lab is not None:
            return str(lab.source.run(*argv, check=False).stdout)
        return subprocess.run(argv, capture_output=True, text=True).stdout

    out = run("zfs", "get", "-Hp", "-r", "-o", "name,value", "userrefs", fs)
    for line in out.splitlines():
        name, _, refs = line.partition("\t")
        tag = tag_of(name.partition("@")[2])
        if refs.isdigit() and int(refs) > 0 and tag is not None:
            run("zfs", "release", tag, name)


def destroy_on(lab: ZfsLab, fs: str) -> None:
    """``zfs destroy -r`` on the source host, again while zfs-fuse says it is busy (it
    can be for a minute after a benchmark wrote through its mount)."""
    release_holds(fs, lab)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return lab.source.run(*argv, check=False)

    for attempt in range(200):
        settle()
        proc = run("zfs", "destroy", "-r", fs)
        if proc.returncode == 0 or "does not exist" in proc.stderr:
            return
        if attempt == 5:  # zfs-fuse mounts on this host, not in the source's namespace
            unmount_all(fs, local_run)
        time.sleep(0.5)
    raise RuntimeError(f"cannot destroy {fs} on the source: {proc.stderr.strip()}")


def local_run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


def unmount_all(fs: str, run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """What zfs-fuse still calls busy after a benchmark wrote through its mount, a plain
    umount(8) lets go of: unmount ``fs`` and what is below it, deepest first."""
    out = run("zfs", "list", "-H", "-o", "mounted,mountpoint", "-r", fs).stdout
    points = [line.split("\t", 1)[1] for line in out.splitlines() if line.startswith("yes\t")]
    for point in sorted(points, reverse=True):
        run("umount", point)


def settle() -> None:
    """Write out what was written and drop cached pages: zfs-fuse may not unmount a file
    system whose pages the kernel still holds."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def destroy(fs: str, tries: int = 50, pause: float = 0.2) -> None:
    """``zfs destroy -r`` here, the pairs' holds released first, again while zfs-fuse
    says it is busy."""
    release_holds(fs)

    for attempt in range(tries):
        proc = local_run("zfs", "destroy", "-r", fs)
        if proc.returncode == 0 or "does not exist" in proc.stderr:
            return
        if attempt == tries // 4:
            unmount_all(fs, local_run)
        time.sleep(pause)
    raise RuntimeError(f"cannot destroy {fs}: {proc.stderr.strip()}")


class Bench:
    def __init__(self, lab: ZfsLab, options: str = "") -> None:
        self.lab = lab
        self.src = lab.source
        self.tmp = Path(tempfile.mkdtemp(prefix="zb-bench-"))
        self.sfs = f"{self.src.pool}/bench-update"
        self.dfs = {"ssh": f"{lab.dst_pool}/bench-update", "mbuffer": f"{lab.dst_pool}/bench-mbuf"}
        self.rawfs = f"{lab.dst_pool}/bench-raw"
        ssh = Path(self.src.key).parent
        (self.tmp / "z.ini").write_text(
            f"[paths]\npairs = {self.tmp}/pairs.cfg\nstate_dir = {self.tmp}/state\n"
            f"log_dir = {self.tmp}/log\nlock_dir = {self.tmp}/run\nspool_dir = {self.tmp}/spool\n"
            f"known_hosts = {ssh}/known_hosts\n[defaults]\nsshkey = {ssh}/client_ed25519\n"
        )
        (self.tmp / "pairs.cfg").write_text(
            "".join(
                f"{self.src.address}:{self.sfs} {lab.dest_address}:{fs} transport={kind}"
                f"{',' + options if options else ''}\n"
                for kind, fs in self.dfs.items()
            )
        )
        self.env = dict(os.environ, ZETTABEE_SETTINGS=str(self.tmp / "z.ini"))
        bindir = str(Path(sys.executable).parent)
        self.zettabee = shutil.which("zettabee", path=bindir) or "zettabee"
        self.n = 0

    def cleanup(self) -> None:
        for fs in (*self.dfs.values(), self.rawfs):
            destroy(fs)
        destroy_on(self.lab, self.sfs)

    # -- one timed run of each kind -------------------------------------------------------

    def zb(self, *args: str) -> float:
        os.sync()
        start = time.monotonic()
        subprocess.run([self.zettabee, *args], check=True, env=self.env, capture_output=True)
        return time.monotonic() - start

    def raw_snapshot(self) -> str:
        self.n += 1
        snap = f"raw{self.n}"
        self.src.run("zfs", "snapshot", f"{self.sfs}@{snap}")
        return snap

    def raw_ssh(self, snap: str, base: str | None) -> float:
        """The raw ssh pipeline for ``snap`` (from ``base``); the snapshot exists already."""
        send = [
            "zfs",
            "send",
            *(["-i", f"{self.sfs}@{base}"] if base else []),
            f"{self.sfs}@{snap}",
        ]
        os.sync()
        start = time.monotonic()
        sender = subprocess.Popen(self.src.ssh_argv(" ".join(send)), stdout=subprocess.PIPE)
        subprocess.run(["zfs", "recv", "-F", self.rawfs], stdin=sender.stdout, check=True,
                       capture_output=True)  # fmt: skip
        if sender.wait() != 0:
            raise RuntimeError("raw send failed")
        return time.monotonic() - start

    def raw_mbuffer(self, snap: str) -> float:
        os.sync()
        opts = ["-q", "-s", MBUFFER_BLOCK, "-m", MBUFFER_MEMORY]
        start = time.monotonic()
        listener = subprocess.Popen(
            ["mbuffer", *opts, "-I", f"{self.src.address}:{MBUFFER_PORT}"], stdout=subprocess.PIPE
        )
        receiver = subprocess.Popen(["zfs", "recv", "-F", self.rawfs], stdin=listener.stdout)
        while not listener_is_ours(local_tables(), local_fds(listener.pid), MBUFFER_PORT, "here"):
            time.sleep(0.005)
        remote = f"zfs send {self.sfs}@{snap} | mbuffer {' '.join(opts)} -O {self.lab.dest_address}:{MBUFFER_PORT}"
        sender = subprocess.run(self.src.ssh_argv(remote), capture_output=True)
        codes = (sender.returncode, listener.wait(), receiver.wait())
        if codes != (0, 0, 0):
            raise RuntimeError(f"raw mbuffer pipeline failed: {codes} {sender.stderr!r}")
        return time.monotonic() - start

    # -- the cases -----------------------------------------------------------------------

    def incremental(self, add_mb: int, repeats: int) -> dict[str, dict[str, object]]:
        dfs = self.dfs["ssh"]
        destroy(dfs)
        destroy(self.rawfs)
        self.zb("initialize", dfs)
        return alternate(
            add_mb,
            repeats,
            self.raw_snapshot,
            self.raw_ssh,
            lambda: self.zb("update", dfs),
            lambda name: write_random(Path(self.src.mountpoint) / "bench-update" / name, add_mb),
        )

    def breakdown(self) -> dict[str, float]:
        """One no-change update with --debug: what each part of it cost."""
        time.sleep(1.0)
        proc = subprocess.run([self.zettabee, "--debug", "update", self.dfs["ssh"]],
                              env=self.env, capture_output=True, text=True, check=True)  # fmt: skip
        line = next(line for line in proc.stderr.splitlines() if ": timings " in line)
        return {part: float(sec) for part, sec in re.findall(r"(\w+)=([0-9.]+)s", line)}

    def full(self, full_mb: int, repeats: int) -> dict[str, dict[str, object]]:
        snap = self.raw_snapshot()
        rows: dict[str, dict[str, list[float]]] = {
            "full ssh": {"raw": [], "zettabee": [], "stream": []},
            "full mbuffer": {"raw": [], "zettabee": [], "stream": []},
        }
        size = 0
        for _ in range(repeats):
            for kind in ("ssh", "mbuffer"):
                label = f"full {kind}"
                destroy(self.rawfs)
                raw = self.raw_ssh(snap, None) if kind == "ssh" else self.raw_mbuffer(snap)
                rows[label]["raw"].append(raw)
                destroy(self.dfs[kind])
                time.sleep(1.0)
                rows[label]["zettabee"].append(self.zb("initialize", self.dfs[kind]))
                status = self.status(self.dfs[kind])
                size = int(str(status["bytes"]))
                rows[label]["stream"].append(float(str(status["seconds"])))
        return full_rows(rows, size, repeats)

    def status(self, dfs: str) -> dict[str, object]:
        fp = subprocess.run([self.zettabee, "fingerprint", dfs], env=self.env, capture_output=True,
                            text=True, check=True).stdout.split()[-1]  # fmt: skip
        data = json.loads((self.tmp / "state" / f"{fp}.json").read_text())
        assert isinstance(data, dict)
        return data


def alternate(
    add_mb: int,
    repeats: int,
    snapshot: Callable[[], str],
    raw: Callable[[str, str | None], float],
    update: Callable[[], float],
    grow: Callable[[str], None],
) -> dict[str, dict[str, object]]:
    """The incremental cases, raw and zettabee runs alternating: ``repeats`` updates with
    no change and with ``add_mb`` more (``grow`` writes a new file of that size by name),
    each beside the raw pipeline's send of a ``snapshot`` from the one before."""
    base = snapshot()
    raw(base, None)
    rows: dict[str, dict[str, list[float]]] = {
        "no change": {"raw": [], "zettabee": []},
        f"+{add_mb} MB": {"raw": [], "zettabee": []},
    }
    for i in range(repeats):
        for label in rows:
            if label != "no change":
                grow(f"add{i}.bin")
            snap = snapshot()
            rows[label]["raw"].append(raw(snap, base))
            base = snap
            time.sleep(1.0)  # zettabee names snapshots by the second
            rows[label]["zettabee"].append(update())
    return {label: summary(cols, repeats) for label, cols in rows.items()}


def summary(cols: dict[str, list[float]], repeats: int) -> dict[str, object]:
    raw, zb = statistics.median(cols["raw"]), statistics.median(cols["zettabee"])
    return {
        "raw": round(raw, 3),
        "zettabee": round(zb, 3),
        "ratio": round(zb / raw, 3),
        "runs": repeats,
        "raw_all": [round(x, 3) for x in cols["raw"]],
        "zettabee_all": [round(x, 3) for x in cols["zettabee"]],
    }


def full_rows(
    rows: dict[str, dict[str, list[float]]], size: int, repeats: int
) -> dict[str, dict[str, object]]:
    """The full sends' figures: each case's medians (``raw``, ``zettabee`` and the
    stream's own seconds, ``size`` bytes each run) as throughputs and ratios."""
    result = {}
    for label, cols in rows.items():
        row = summary({"raw": cols["raw"], "zettabee": cols["zettabee"]}, repeats)
        mib = size / 2**20
        raw_s, zb_s = float(row["raw"]), float(row["zettabee"])  # type: ignore[arg-type]
        stream_s = statistics.median(cols["stream"])
        row.update(
            bytes=size,
            raw_mib_s=round(mib / raw_s, 1),
            zettabee_mib_s=round(mib / zb_s, 1),
            stream_mib_s=round(mib / stream_s, 1),
            throughput_ratio=round(raw_s / zb_s, 3),
            stream_throughput_ratio=round(raw_s / stream_s, 3),
        )
        del row["ratio"]
        result[label] = row
    return result


def verdicts(result: dict[str, dict[str, object]]) -> dict[str, str]:
    said = {}
    for label, row in result.items():
        if label.startswith("full"):
            value, target = float(row["throughput_ratio"]), TARGETS[label]  # type: ignore[arg-type]
            said[label] = f"{value:.2f}x raw throughput (target >= {target}): " + (
                "met" if value >= target else "NOT met"
            )
        else:
            target = TARGETS["no change" if label == "no change" else "+MB"]
            value = float(row["ratio"])  # type: ignore[arg-type]
            said[label] = f"{value:.2f}x raw wall time (target <= {target}): " + (
                "met" if value <= target else "NOT met"
            )
    return said


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-mb", type=int, default=500)
    parser.add_argument("--add-mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=9, help="incremental runs of each kind")
    parser.add_argument("--full-repeats", type=int, default=3, help="0: no full sends")
    parser.add_argument(
        "--options", default="", help="more options of the pairs, e.g. hold=no (default: none)"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "update.jsonl"))
    args = parser.parse_args()
    compile_package()
    load_before = load()
    with lab_held() as lab:
        bench = Bench(lab, args.options)
        try:
            bench.cleanup()
            bench.src.run("zfs", "create", bench.sfs)
            write_random(Path(bench.src.mountpoint) / "bench-update" / "full.bin", args.full_mb)
            result = bench.full(args.full_mb, args.full_repeats) if args.full_repeats else {}
            for fs in bench.dfs.values():
                destroy(fs)
            result.update(bench.incremental(args.add_mb, args.repeats))
            parts = bench.breakdown()
        finally:
            try:
                bench.cleanup()
            except RuntimeError as exc:  # the figures are taken: report them anyway
                print(f"warning: {exc}", file=sys.stderr)
    load_after = load()

    print(f"{'case':<14}{'raw s':>9}{'zettabee s':>12}{'ratio':>8}")
    for label, cols in result.items():
        ratio = cols.get("ratio", cols.get("throughput_ratio"))
        print(f"{label:<14}{cols['raw']:>9.3f}{cols['zettabee']:>12.3f}{ratio:>8.2f}")
    said = verdicts(result)
    for label, text in said.items():
        print(f"  {label}: {text}")
    print(
        "no-change update, --debug timings: " + " ".join(f"{k}={v:.3f}s" for k, v in parts.items())
    )
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_after,
        "full_mb": args.full_mb,
        "add_mb": args.add_mb,
        "options": args.options,
        "results": result,
        "verdicts": said,
        "no_change_timings": parts,
    }
    append(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
