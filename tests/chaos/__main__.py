"""``python -m tests.chaos``: one chaos run from the repository root; exit 0 when every
invariant held, 1 when one broke, 2 when the run itself could not be carried out."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

from tests.chaos.faults import Rates
from tests.chaos.harness import ChaosConfig, Summary, run_chaos


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Writers, relays and deduplicating consumers under seeded faults "
        "(SIGKILL, PostgreSQL restarts, broker link cuts), then an exactly-once check.",
    )
    parser.add_argument("--events", type=int, default=20000, help="events to attempt")
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the fault phase")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--relays", type=int, default=3, help="outbox relay processes")
    parser.add_argument("--consumers", type=int, default=2, help="outbox consume processes")
    parser.add_argument("--writers", type=int, default=4, help="application writer threads")
    parser.add_argument("--settle-timeout", type=float, default=180.0, help="seconds to catch up")
    parser.add_argument(
        "--no-second-outbox",
        action="store_true",
        help="run one outbox only (default: a second service on the same broker, both with "
        "default relay settings)",
    )
    parser.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="tansu behind a proxy (the broker fault cuts it) or a 3-node Apache Kafka cluster "
        "(the broker fault SIGKILLs a node; the topic must hold no duplicate)",
    )
    parser.add_argument(
        "--guarantee",
        choices=("exactly-once", "at-least-once"),
        default="exactly-once",
        help="the relays' --guarantee; at-least-once (tansu only) gives records an 8 s "
        "delivery timeout",
    )
    parser.add_argument(
        "--outage",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="one broker-wide outage this long instead of the random cuts (tansu; with "
        "--guarantee at-least-once, make it longer than 8 s so records expire)",
    )
    parser.add_argument(
        "--missing-topic-share",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of events written to a topic that does not exist (kafka only): they must "
        "all end in outbox_dead_events, and nothing else",
    )
    parser.add_argument(
        "--aim-extension",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after the schedule, aim a fault kind that has not struck yet (e.g. no kill "
        "landed with a batch in flight) again for up to this long; only then is it a failure",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep process logs here")
    parser.add_argument("--keep-logs", action="store_true", help="keep logs of a passing run")
    parser.add_argument(
        "--strict", action="store_true", help="also fail on crashed processes and tracebacks"
    )
    parser.add_argument("--quiet", action="store_true", help="only the summary")
    return parser.parse_args(argv)


def _print(summary: Summary) -> None:
    rows = [
        ("seed", summary.seed),
        ("events attempted", summary.events_attempted),
        ("events committed", summary.events_committed),
        ("events rolled back (on purpose)", summary.events_rolled_back),
        ("events failed before commit", summary.events_failed_before_commit),
        ("commits with unknown outcome", summary.events_commit_unknown),
        ("events left out of the check (bounded)", summary.events_excluded),
        *((f"  cut by: {reason}", n) for reason, n in summary.excluded_reasons.items()),
        *((f"faults: {kind}", n) for kind, n in summary.faults.items()),
        *((f"  aimed again: {kind}", n) for kind, n in summary.faults_reaimed.items()),
        ("relay kills with a batch in flight", summary.relay_kills_mid_batch),
        ("  of which between Kafka and DB commit", summary.relay_kills_in_commit_window),
        ("consumer kills between DB and offset commit", summary.consumer_kills_in_window),
        ("effects applied", summary.effects_applied),
        ("duplicate effects (must be 0)", summary.duplicate_effects),
        *(
            (
                f"outbox {name}: missing-topic events buried / not buried",
                f"{r['missing_topic_dead']} / {r['missing_topic_not_dead']}",
            )
            for name, r in summary.outboxes.items()
            if r["missing_topic_dead"] or r["missing_topic_not_dead"]
        ),
        ("lost (must be 0)", summary.lost),
        ("phantoms (must be 0)", summary.phantoms),
        ("order violations (must be 0)", summary.order_violations),
        ("topic records", summary.topic_records),
        ("topic duplicates (reported)", summary.topic_duplicates),
        *(
            (
                f"outbox {name}: committed / lost / topic lost",
                f"{r['committed']} / {r['lost']} / {r['topic_lost']}",
            )
            for name, r in summary.outboxes.items()
        ),
        ("unexpected process exits", len(summary.unexpected_exits)),
        *((f"logs: {name}", n) for name, n in summary.process_logs.items()),
        ("elapsed seconds", summary.elapsed_seconds),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("RESULT: " + ("PASS" if summary.ok else "FAIL"))
    for failure in summary.failures:
        print(f"  - {failure}")
    for failure in summary.aim_failures:
        print(f"  - aim: {failure}")
    if summary.log_dir:
        print(f"logs: {summary.log_dir}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"chaos seed: {seed}  (replay with --seed {seed})", flush=True)
    try:
        config = ChaosConfig(
            seed=seed,
            events=args.events,
            seconds=args.seconds,
            relays=args.relays,
            consumers=args.consumers,
            writers=args.writers,
            settle_timeout=args.settle_timeout,
            log_dir=args.log_dir,
            keep_logs=args.keep_logs,
            strict=args.strict,
            second_outbox=not args.no_second_outbox,
            broker=args.broker,
            guarantee=args.guarantee,
            missing_topic_share=args.missing_topic_share,
            rates=Rates(outage_seconds=args.outage),
            aim_extension=args.aim_extension,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_chaos(config)
    except Exception as exc:
        logging.getLogger("chaos").exception("the chaos run could not be carried out")
        print(f"error: {type(exc).__name__}: {exc} (seed {seed})", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    _print(summary)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
