"""The one entry point: ``python -m benchmarks.run [--size S] [--broker tansu|kafka] [--only N]``.

Starts one PostgreSQL (fsync and synchronous_commit on) and one broker (Tansu, or with
``--broker kafka`` the 3-node Apache Kafka cluster of outbox.embedded.kafka_cluster), or uses the
servers given, runs every figure against them, and writes ``<out>/<run>.json``,
``<out>/<run>.md`` (the summary table) and, when matplotlib is installed,
``<out>/<run>-<figure>.png``, where ``<run>`` is the size, plus ``-kafka`` on Kafka. When
both brokers' results of a size are there, ``<out>/<size>-brokers.md`` puts them side by
side.
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
    delivery_record,
    end_to_end_latency,
    latency_stages,
    relay_memory,
    relay_scaling,
    relay_throughput,
    write_overhead,
)
from benchmarks.harness import (
    BROKERS,
    SIZES,
    Result,
    Services,
    Size,
    quiet_logging,
    services,
)

# Latency first: Tansu keeps every record in memory, and late in a full run (~2M records
# of 1 KB) its transactions were much slower (commit -> Kafka p99 from ~130 ms to ~1.7 s).
FIGURES: dict[str, Callable[[Services, Size], Result]] = {
    "write_overhead": write_overhead.run,
    "end_to_end_latency": end_to_end_latency.run,
    "latency_stages": latency_stages.run,
    "consumer_overhead": consumer_overhead.run,
    "relay_throughput": relay_throughput.run,
    "relay_scaling": relay_scaling.run,
    "backlog_independence": backlog_independence.run,
    "relay_memory": relay_memory.run,
    "delivery_record": delivery_record.run,
}

TITLES = {
    "write_overhead": "write overhead",
    "relay_throughput": "relay throughput",
    "relay_scaling": "relay scaling",
    "backlog_independence": "backlog independence",
    "end_to_end_latency": "end-to-end latency",
    "latency_stages": "latency by stage vs floor",
    "consumer_overhead": "consumer overhead",
    "relay_memory": "memory",
    "delivery_record": "delivery record",
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
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default="tansu",
        help="the broker to start when no --bootstrap-servers is given: the embedded Tansu "
        "(default) or a 3-node Apache Kafka KRaft cluster (needs java; mvn for the first fetch)",
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
    run_name = run_file_name(size.name, args.broker if not args.bootstrap_servers else "given")
    with services(args.db, args.bootstrap_servers, args.broker) as svc:
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
    json_path = args.out / f"{run_name}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    table_path = args.out / f"{run_name}.md"
    table_path.write_text(markdown_table(results))
    print(f"[benchmarks] wrote {json_path} and {table_path}")
    if compared := write_broker_comparison(args.out, size.name):
        print(f"[benchmarks] wrote {compared} (Tansu and Apache Kafka side by side)")
    if args.no_plots:
        print("[benchmarks] plots skipped (--no-plots)")
    else:
        from benchmarks import plots

        written = plots.write_all(results, args.out, run_name)
        if written is None:
            print("[benchmarks] plots skipped: matplotlib is not installed (extra 'bench')")
        else:
            print(f"[benchmarks] wrote {len(written)} plots to {args.out}")
    failed = [n for n, r in results["figures"].items() if r.get("status") == "failed"]
    return 1 if failed else 0


def run_file_name(size: str, broker: str) -> str:
    """``default`` for Tansu (and servers given), ``default-kafka`` for the Kafka cluster."""
    return f"{size}-kafka" if broker == "kafka" else size


def write_broker_comparison(out: Path, size: str) -> Path | None:
    """``<size>-brokers.md`` from ``<size>.json`` (Tansu) and ``<size>-kafka.json``, if both."""
    paths = [out / f"{run_file_name(size, b)}.json" for b in BROKERS]
    if not all(p.exists() for p in paths):
        return None
    tansu, kafka = (json.loads(p.read_text()) for p in paths)
    path = out / f"{size}-brokers.md"
    path.write_text(comparison_table(tansu, kafka))
    return path


def comparison_table(tansu: dict[str, Any], kafka: dict[str, Any]) -> str:
    """One row per figure: its value and target on Tansu and on Apache Kafka, side by side."""

    def cell(fig: dict[str, Any] | None) -> str:
        if fig is None:
            return "not run"
        if fig.get("status") != "measured" or fig.get("value") is None:
            return str(fig.get("status", "?"))
        met = {True: "met", False: "**not met**", None: ""}[fig.get("met")]
        return f"**{fig['value']:g}** {fig.get('unit', '')}" + (f" ({met})" if met else "")

    lines = [
        f"Tansu: `{tansu['meta']['command']}` ({tansu['meta'].get('started', '?')}, "
        f"{tansu['meta'].get('runtime_s', '?')} s; {tansu['meta'].get('broker', '?')})  ",
        f"Apache Kafka: `{kafka['meta']['command']}` ({kafka['meta'].get('started', '?')}, "
        f"{kafka['meta'].get('runtime_s', '?')} s; {kafka['meta'].get('broker', '?')})",
    ]
    for broker, run in (("Tansu", tansu), ("Apache Kafka", kafka)):
        lines += [f"\n{broker}: {note}" for note in run["meta"].get("notes", ())]
    lines += ["", "| figure | target | Tansu | Apache Kafka |", "|---|---|---|---|"]
    names = list(dict.fromkeys([*tansu["figures"], *kafka["figures"]]))
    for name in names:
        t, k = tansu["figures"].get(name), kafka["figures"].get(name)
        target = (k or t or {}).get("target") or "—"
        lines.append(f"| {TITLES.get(name, name)} | {target} | {cell(t)} | {cell(k)} |")
    return "\n".join(lines) + "\n"


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
