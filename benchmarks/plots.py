"""PNG plots of one run's JSON, one per figure; matplotlib is optional (extra ``bench``).

Imported lazily and typed as ``Any`` so that the benchmarks, their smoke test
and ``mypy`` work without matplotlib installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _pyplot() -> Any | None:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    return importlib.import_module("matplotlib.pyplot")


def write_all(results: dict[str, Any], out: Path, run: str | None = None) -> list[Path] | None:
    """Write every plot whose figure was measured; None when matplotlib is missing.

    ``run`` names the files (``<run>-<figure>.png``): the size, or e.g. ``default-kafka``."""
    plt = _pyplot()
    if plt is None:
        return None
    size = run or results["meta"]["size"]
    written = []
    for name, draw in PLOTS.items():
        fig_data = results["figures"].get(name)
        if not fig_data or fig_data.get("status") != "measured":
            continue
        wide = name == "end_to_end_latency"  # ten phases side by side
        fig, ax = plt.subplots(figsize=(11 if wide else 7.5, 4.6), layout="constrained")
        draw(ax, fig_data)
        ax.set_title(f"{name.replace('_', ' ')} ({size})", fontsize=11)
        path = out / f"{size}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _bars(ax: Any, labels: list[str], values: list[float], ylabel: str) -> None:
    bars = ax.bar(labels, values, color="#4C72B0")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=8)


def _write_overhead(ax: Any, data: dict[str, Any]) -> None:
    concurrency = data["concurrency"]
    variants = list(next(iter(concurrency.values()))["ratios"])
    width = 0.8 / len(concurrency)
    for i, (writers, detail) in enumerate(concurrency.items()):
        xs = [j + i * width for j in range(len(variants))]
        bars = ax.bar(xs, [detail["ratios"][v] for v in variants], width, label=f"{writers} wr.")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([j + width * (len(concurrency) - 1) / 2 for j in range(len(variants))])
    ax.set_xticklabels(variants, fontsize=8)
    ax.axhline(1.15, color="red", linestyle="--", linewidth=1, label="target 1.15")
    ax.set_ylabel("time per request / without publish")
    ax.legend(fontsize=8)


def _relay_throughput(ax: Any, data: dict[str, Any]) -> None:
    rounds = data["rounds"]
    relay = sum(r["relay_events_per_s"] for r in rounds) / len(rounds)
    raw = sum(r["raw_events_per_s"] for r in rounds) / len(rounds)
    _bars(ax, ["best raw producer", "relay, 1 slot"], [raw, relay], "events/s")


def _relay_scaling(ax: Any, data: dict[str, Any]) -> None:
    labels = ["raw producer"] + [f"{n} slot(s)" for n in data["slots"]]
    values = [data["raw_events_per_s"]] + [s["events_per_s"] for s in data["slots"].values()]
    _bars(ax, labels, values, "events/s")


def _backlog(ax: Any, data: dict[str, Any]) -> None:
    for slots, by_backlog in data["backlogs"].items():
        for backlog, detail in by_backlog.items():
            batches = detail["batch_ms"]
            label = f"{slots} slot(s), {int(backlog):,} pending"
            ax.plot(range(1, len(batches) + 1), batches, marker="o", label=label)
    ax.set_xlabel("batch (all slots)")
    ax.set_ylabel("claim + publish + delete (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def _latency(ax: Any, data: dict[str, Any]) -> None:
    """Commit -> handler per phase; the broker floor has no consumer: hand-over -> readable."""
    phases = data["phases"]
    labels = [
        name.replace("fetch.wait.max.ms", "fwm")
        .replace("consumer defaults", "defaults")
        .replace(" / ", "\n")
        .replace(", ", ",\n")
        .replace(": ", ":\n")
        for name in phases
    ]
    xs = list(range(len(phases)))
    main = [p.get("commit_to_handler", p["commit_to_kafka"]) for p in phases.values()]
    ax.bar([x - 0.2 for x in xs], [m["p50_ms"] for m in main], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [m["p99_ms"] for m in main], 0.4, label="p99")
    kafka_p99 = [p["commit_to_kafka"]["p99_ms"] for p in phases.values()]
    ax.scatter(xs, kafka_p99, color="black", marker="_", s=200, zorder=3, label="p99 readable")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_yscale("log")
    ax.axhline(50, color="red", linestyle="--", linewidth=1, label="p99 target 50 ms")
    ax.set_ylabel("commit -> handler, floor: -> readable (ms, log)", fontsize=9)
    ax.legend(fontsize=8)


def _consumer(ax: Any, data: dict[str, Any]) -> None:
    dedup = sum(data["dedup_msgs_per_s"]) / len(data["dedup_msgs_per_s"])
    plain = sum(data["plain_msgs_per_s"]) / len(data["plain_msgs_per_s"])
    _bars(ax, ["plain at-least-once", "deduplicating"], [plain, dedup], "messages/s")


def _memory(ax: Any, data: dict[str, Any]) -> None:
    runs = data["runs"]
    _bars(
        ax,
        [f"{int(n):,} rows" for n in runs],
        [r["peak_rss_mib"] for r in runs.values()],
        "peak RSS of outbox relay --once (MiB)",
    )


def _delivery_record(ax: Any, data: dict[str, Any]) -> None:
    rounds = data["rounds"]
    off = sum(r["off_events_per_s"] for r in rounds) / len(rounds)
    on = sum(r["on_events_per_s"] for r in rounds) / len(rounds)
    _bars(ax, ["relay, no record", "relay, delivery record"], [off, on], "events/s")


def _stages(ax: Any, data: dict[str, Any]) -> None:
    """One stacked bar per phase: the p50 of each stage, commit (or hand-over) to handler."""
    phases = data["phases"]
    names = list(phases)
    steps = list(dict.fromkeys(s for p in phases.values() for s in p["steps"]))
    bottoms = [0.0] * len(names)
    for step in steps:
        values = [max(0.0, p["steps"].get(step, {}).get("p50_ms", 0.0)) for p in phases.values()]
        ax.barh(names, values, left=bottoms, label=step)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_xlabel("ms, p50 of each stage (stacked)")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=6)


PLOTS: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "write_overhead": _write_overhead,
    "relay_throughput": _relay_throughput,
    "relay_scaling": _relay_scaling,
    "backlog_independence": _backlog,
    "end_to_end_latency": _latency,
    "latency_stages": _stages,
    "consumer_overhead": _consumer,
    "relay_memory": _memory,
    "delivery_record": _delivery_record,
}
