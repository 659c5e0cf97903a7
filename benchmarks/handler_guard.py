"""The cost of the consumer's handler adapters (I11), per record, on a real PostgreSQL.

Three ways of running the same handler (one INSERT per record, batches of 100 records in one
transaction, as the consumer's fast path does), interleaved in rounds, median of rounds:

- ``bare``: the handler called directly on a Session (what the consumer did before I11);
- ``guarded``: through ``SyncTransactions`` (commit refused while the handler runs, the
  transaction checked after each call: open, the same, not in error);
- ``async-bare``: the ``async def`` handler awaited directly on an AsyncSession, the whole batch
  in one coroutine (what the async driver costs by itself);
- ``async``: the ``async def`` handler through ``AsyncTransactions`` (an AsyncSession awaited on
  the runner's private event loop, one ``run_until_complete`` per record, guarded).

No broker: the figure isolates the per-record cost of the adapter and the guard, which is what
the consumer's throughput can lose to them. ``python -m benchmarks.handler_guard [--db URL]``
(default: a throwaway embedded PostgreSQL).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from consumer.event import Event
from consumer.handling import AsyncTransactions, SyncTransactions, async_engine_for

INSERT = text("INSERT INTO guard_bench (n) VALUES (:n)")
BATCH = 100


def _event(n: int) -> Event:
    return Event(
        id=str(n),
        topic="bench",
        partition=0,
        offset=n,
        key=None,
        value={"n": n},
        raw=b"{}",
        headers={},
        timestamp=None,
    )


def handle(session: Session, event: Event) -> None:
    session.execute(INSERT, {"n": event.offset})


async def ahandle(session: AsyncSession, event: Event) -> None:
    await session.execute(INSERT, {"n": event.offset})


def bare(engine: Engine, events: list[Event]) -> None:
    with Session(engine) as session, session.begin():
        session.execute(text("SELECT 1"))
        for event in events:
            handle(session, event)


async def abare(engine: AsyncEngine, events: list[Event]) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await session.execute(text("SELECT 1"))
        for event in events:
            await ahandle(session, event)


def through(adapter: Any, events: list[Event]) -> None:
    with adapter.open() as tx:
        tx.run(lambda s: s.execute(text("SELECT 1")))
        for event in events:
            tx.handle(event)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="SQLAlchemy URL (default: an embedded PostgreSQL)")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pg = None
    url = args.db
    if url is None:
        from outbox.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(database="postgres").start()
        url = pg.sqlalchemy_url
    engine = create_engine(url, pool_size=2)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS guard_bench (n bigint)"))
    sync = SyncTransactions(engine, handle, object)
    aio = AsyncTransactions(async_engine_for(engine.url), ahandle, object, owns=True)
    events = [_event(n) for n in range(args.records)]
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    rates: dict[str, list[float]] = {"bare": [], "guarded": [], "async-bare": [], "async": []}
    runners = {
        "bare": lambda b: bare(engine, b),
        "guarded": lambda b: through(sync, b),
        "async-bare": lambda b: aio.wait(abare(aio.engine, b)),
        "async": lambda b: through(aio, b),
    }
    try:
        for round_no in range(args.rounds):
            order = list(runners) if round_no % 2 == 0 else list(reversed(runners))
            for name in order:
                started = time.perf_counter()
                for batch in batches:
                    runners[name](batch)
                rates[name].append(len(events) / (time.perf_counter() - started))
    finally:
        aio.close()
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE guard_bench"))
        engine.dispose()
        if pg is not None:
            pg.stop()
    med = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{args.records:,} records, batches of {BATCH}, {args.rounds} interleaved rounds")
    for name, rate in med.items():
        print(f"  {name:8s} {rate:10,.0f} records/s  ({rate / med['bare']:.1%} of bare)")
    per_record_us = (1 / med["guarded"] - 1 / med["bare"]) * 1e6
    print(f"  the guard costs {per_record_us:.1f} us per record")
    adapter_us = (1 / med["async"] - 1 / med["async-bare"]) * 1e6
    print(f"  the async adapter (loop round trip and guard) costs {adapter_us:.1f} us per record")


if __name__ == "__main__":
    main()
