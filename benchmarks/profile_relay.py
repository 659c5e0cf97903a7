"""Profile the relay's hot path: ``outbox relay --once`` under py-spy on a committed backlog.

``python -m benchmarks.profile_relay [--rows 100000] [--slots 1] [--idle]`` prints
where a slot thread spends its time (inclusive and own share of samples per
function) and keeps that in ``--out`` (py-spy's raw stacks go to the temp
directory). With ``--idle`` the samples include waiting (database and broker
round trips), so the shares add up to wall time; without it they show CPU
only. Needs ``pip install py-spy`` (and ptrace permission, which root has).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import (
    create_topics,
    fill_outbox,
    outbox_command,
    quiet_logging,
    services,
)

SLOT_THREAD = "SlotWorker._run"


def summarise(raw: Path, *, top: int = 30, within: str = SLOT_THREAD) -> str:
    """Inclusive and own shares of the samples whose stack passes through ``within``."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any(within in f for f in frames):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return f"no samples in {within}\n"
    out = [f"{total} samples of {within}", "", "inclusive:"]
    out += [f"{100 * c / total:6.1f}%  {f}" for f, c in inclusive.most_common(top)]
    out += ["", "own:"]
    out += [f"{100 * c / total:6.1f}%  {f}" for f, c in own.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_relay")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--profile", default="throughput")
    parser.add_argument("--idle", action="store_true", help="sample waiting threads too")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--db")
    parser.add_argument("--bootstrap-servers")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    quiet_logging()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"profile-relay-{args.slots}slot{'-idle' if args.idle else ''}"
    raw = Path(tempfile.gettempdir()) / f"{name}.raw.txt"  # py-spy's stacks: large, not kept
    with services(args.db, args.bootstrap_servers) as svc:
        db = svc.database("profile")
        topic = f"bench.profile.{uuid.uuid4().hex[:6]}"
        create_topics(svc, topic)
        fill_outbox(db, args.rows, topic=topic, value_bytes=args.value_bytes)
        relay = outbox_command(
            "relay",
            "--db",
            db.url,
            "-b",
            svc.bootstrap_servers,
            "--once",
            "--slots",
            str(args.slots),
            "--profile",
            args.profile,
            "-X",
            "request.timeout.ms=40000",
            "--log-level",
            "WARNING",
        )
        record = [py_spy, "record", "-r", str(args.rate), "--format", "raw", "-o", str(raw)]
        record += ["--idle"] if args.idle else []
        subprocess.run([*record, "--", *relay], check=True)
    report = summarise(raw)
    (args.out / f"{name}.txt").write_text(report)
    print(report)
    print(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
