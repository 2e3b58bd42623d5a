"""Benchmark: 1000 passive results through our NSCA client and through ``send_nsca``.

Both against the same lab nsca daemon (lab/nscad.py, XOR with a password), each case
repeated; the figures are medians in wall seconds:

- ``client_one_connection``: ``NscaClient.send`` of the 1000 results on one connection;
- ``send_nsca_one_run``: one ``send_nsca`` run with the 1000 results ETB-separated;
- ``send_nsca_per_result``: one ``send_nsca`` run per result, as the original Ruby
  Zettabee called it for every pair (measured on ``--per-result`` results and scaled).

"sent" is when the sender returned, "arrived" when all lines were in nsca's command
file. Prints a JSON line and appends it to bench/results/nsca.jsonl.

Run as root: ``.venv/bin/python bench/bench_nsca.py [--count 1000] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import machine  # noqa: E402
from lab.nscad import SEND_NSCA_BINARY, NscaDaemon  # noqa: E402
from nsca.client import NscaClient  # noqa: E402
from nsca.result import PassiveResult  # noqa: E402
from nsca.sendnsca import SendNscaBackend  # noqa: E402

RESULTS_FILE = REPO / "bench" / "results" / "nsca.jsonl"


def make_results(count: int) -> list[PassiveResult]:
    return [
        PassiveResult(
            f"backup{i % 20}",
            f"zettabee tank/fs{i}",
            i % 4,
            f"{('OK', 'WARNING', 'CRITICAL', 'UNKNOWN')[i % 4]} - tank/fs{i} lag {i}s",
            [f"lag={i}s;3600;7200;0", f"runtime={i % 60}s"],
        )
        for i in range(count)
    ]


def timed(daemon: NscaDaemon, count: int, send: Callable[[], None]) -> tuple[float, float]:
    daemon.clear()
    start = time.perf_counter()
    send()
    sent = time.perf_counter() - start
    # A tight poll on the line count: NscaDaemon.wait_for parses every line and sleeps
    # 20 ms between looks, too coarse for this measurement.
    deadline = start + 120
    while (seen := daemon.command_file.read_bytes().count(b"\n")) < count:
        if time.perf_counter() > deadline:
            raise SystemExit(f"only {seen} of {count} results arrived")
        time.sleep(0.001)
    arrived = time.perf_counter() - start
    return sent, arrived


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--per-result", type=int, default=200, help="results for the per-call case")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    results = make_results(args.count)
    few = results[: args.per_result]
    figures: dict[str, dict[str, float]] = {}
    with (
        NscaDaemon(password="bench-pass", decryption=1) as daemon,
        tempfile.TemporaryDirectory() as tmp,
    ):
        config = daemon.write_send_nsca_config(Path(tmp) / "send_nsca.cfg")
        client = NscaClient(daemon.host, daemon.port, password=daemon.password)
        backend = SendNscaBackend(
            daemon.host, daemon.port, binary=SEND_NSCA_BINARY, config=str(config)
        )

        def one_connection() -> None:
            client.send(results)

        def per_result() -> None:
            for result in few:
                backend.submit([result])

        cases: dict[str, tuple[Callable[[], None], int, int]] = {
            "client_one_connection": (
                one_connection,
                args.count,
                args.repeat,
            ),
            "send_nsca_one_run": (lambda: backend.submit(results), args.count, args.repeat),
            "send_nsca_per_result": (per_result, len(few), max(1, args.repeat // 2)),
        }
        for name, (send, expected, repeat) in cases.items():
            runs = [timed(daemon, expected, send) for _ in range(repeat)]
            scale = args.count / expected
            figures[name] = {
                "sent_s": round(statistics.median(r[0] for r in runs) * scale, 4),
                "arrived_s": round(statistics.median(r[1] for r in runs) * scale, 4),
                "runs": repeat,
                "measured_results": expected,
            }
    base = figures["client_one_connection"]["arrived_s"]
    record = {
        "bench": "nsca",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": args.count,
        "machine": machine(),
        "figures": figures,
        "speedup_vs_send_nsca_one_run": round(figures["send_nsca_one_run"]["arrived_s"] / base, 2),
        "speedup_vs_send_nsca_per_result": round(
            figures["send_nsca_per_result"]["arrived_s"] / base, 2
        ),
    }
    line = json.dumps(record, sort_keys=True)
    print(line)
    if not args.no_save:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS_FILE, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
