"""The one entry point: ``python -m benchmarks.run [--size smoke|default|full] [--only NAME]``.

Starts one PostgreSQL (fsync and synchronous_commit on) and one Tansu broker,
or uses the servers given, runs every figure against them, and writes
``<out>/<size>.json``, ``<out>/<size>.md`` (the summary table) and, when
matplotlib is installed, ``<out>/<size>-<figure>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import (
    backlog_independence,
    consumer_overhead,
    end_to_end_latency,
    relay_memory,
    relay_scaling,
    relay_throughput,
    write_overhead,
)
from benchmarks.harness import SIZES, Result, Services, Size, quiet_logging, services

# Latency first: Tansu keeps every record in memory, and late in a full run (~2M records
# of 1 KB) its transactions were much slower (commit -> Kafka p99 from ~130 ms to ~1.7 s).
FIGURES: dict[str, Callable[[Services, Size], Result]] = {
    "write_overhead": write_overhead.run,
    "end_to_end_latency": end_to_end_latency.run,
    "consumer_overhead": consumer_overhead.run,
    "relay_throughput": relay_throughput.run,
    "relay_scaling": relay_scaling.run,
    "backlog_independence": backlog_independence.run,
    "relay_memory": relay_memory.run,
}

TITLES = {
    "write_overhead": "write overhead",
    "relay_throughput": "relay throughput",
    "relay_scaling": "relay scaling",
    "backlog_independence": "backlog independence",
    "end_to_end_latency": "end-to-end latency",
    "consumer_overhead": "consumer overhead",
    "relay_memory": "memory",
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(FIGURES),
        help="run only this figure (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--db",
        default=os.environ.get("OUTBOX_BENCH_DB"),
        help="PostgreSQL URL whose user may CREATE DATABASE (default: start an embedded one)",
    )
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("OUTBOX_BENCH_BOOTSTRAP_SERVERS"),
        help="Kafka bootstrap servers (default: start the embedded Tansu broker)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    quiet_logging()
    size = SIZES[args.size]
    names = args.only or list(FIGURES)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "command": command.strip(),
            "size": size.name,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        },
        "figures": {},
    }
    with services(args.db, args.bootstrap_servers) as svc:
        results["meta"]["postgres"] = {"source": svc.postgres, **svc.server_settings()}
        results["meta"]["broker"] = svc.broker
        for name in names:
            print(f"[benchmarks] {name} ({size.name}) ...", flush=True)
            t0 = time.perf_counter()
            try:
                result = FIGURES[name](svc, size)
            except Exception as exc:
                traceback.print_exc()
                result = {"status": "failed", "summary": f"{type(exc).__name__}: {exc}"}
            result["runtime_s"] = round(time.perf_counter() - t0, 1)
            results["figures"][name] = result
            print(f"[benchmarks] {name}: {result['summary']}", flush=True)
    results["meta"]["runtime_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{size.name}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    table_path = args.out / f"{size.name}.md"
    table_path.write_text(markdown_table(results))
    print(f"[benchmarks] wrote {json_path} and {table_path}")
    if args.no_plots:
        print("[benchmarks] plots skipped (--no-plots)")
    else:
        from benchmarks import plots

        written = plots.write_all(results, args.out)
        if written is None:
            print("[benchmarks] plots skipped: matplotlib is not installed (extra 'bench')")
        else:
            print(f"[benchmarks] wrote {len(written)} plots to {args.out}")
    failed = [n for n, r in results["figures"].items() if r.get("status") == "failed"]
    return 1 if failed else 0


def markdown_table(results: dict[str, Any]) -> str:
    """The README's summary table for one run."""
    meta = results["meta"]
    pg = meta.get("postgres", {})
    lines = [
        f"`{meta['command']}` ({meta['size']} size, {meta.get('runtime_s', '?')} s, "
        f"{meta['machine']}, PostgreSQL {pg.get('server_version', '?')} fsync="
        f"{pg.get('fsync', '?')} synchronous_commit={pg.get('synchronous_commit', '?')}, "
        f"broker: {meta.get('broker', '?')})",
        "",
        "| figure | result | target | met |",
        "|---|---|---|---|",
    ]
    for name, fig in results["figures"].items():
        value = fig.get("value")
        shown = "—" if value is None else f"**{value:g}** {fig.get('unit', '')}"
        met = {True: "yes", False: "**no**", None: "—"}[fig.get("met")]
        if fig.get("status") != "measured":
            shown, met = fig.get("status", "?"), "—"
        lines.append(
            f"| {TITLES.get(name, name)} | {shown}: {fig['summary']} | "
            f"{fig.get('target') or '—'} | {met} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
