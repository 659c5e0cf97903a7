"""Consumer overhead: the deduplicating consumer vs a plain at-least-once loop, same handler.

Both read the same pre-filled topic (records as the relay writes them, with
``outbox-event-id`` headers), with the same librdkafka settings, batch size
(100) and poll timeout, and both run one INSERT per message in one database
transaction per batch, then commit offsets. The deduplicating consumer also
inserts the batch's dedup records and decodes each value. Each run is a fresh
process and a fresh consumer group; the clock starts at the first handled
message (group join excluded) and stops at the last database commit.
"""

from __future__ import annotations

import json
import time
import uuid

from confluent_kafka import Producer
from sqlalchemy import create_engine, text

from benchmarks.consumers import EFFECTS_DDL, EffectConsumer, plain_consume
from benchmarks.harness import (
    GROUP_SETTINGS,
    Database,
    Result,
    Services,
    Size,
    create_topics,
    figure,
    isolated,
    median,
    quiet_logging,
)
from consumer.config import ConsumerConfig

TARGET = 0.8
BATCH = 100
POLL_TIMEOUT = 0.1  # the last, partial batch must not wait a whole second in either loop


def fill_topic(svc: Services, topic: str, count: int) -> None:
    """Records shaped like the relay's: JSON value, event-id and content-type headers."""
    producer = Producer(
        {"bootstrap.servers": svc.bootstrap_servers, "linger.ms": 20, "enable.idempotence": True}
    )
    for i in range(count):
        event_id = str(uuid.uuid4())
        value = json.dumps({"order_id": i, "total": "12.50", "customer": f"c-{i % 977}"})
        while True:
            try:
                producer.produce(
                    topic,
                    key=f"order-{i % 1000}".encode(),
                    value=value.encode(),
                    headers=[
                        ("outbox-event-id", event_id.encode()),
                        ("content-type", b"application/json"),
                    ],
                )
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60)


def dedup_rate(svc: Services, db: Database, topic: str, count: int) -> float:
    quiet_logging()
    consumer = EffectConsumer(
        db.url,
        svc.bootstrap_servers,
        topics=[topic],
        group_id=f"bench-dedup-{uuid.uuid4().hex[:8]}",
        batch_size=BATCH,
        poll_timeout=POLL_TIMEOUT,
        settings=GROUP_SETTINGS,
        expected=count,
    )
    consumer.run()
    if consumer.first is None or consumer.last is None:
        raise RuntimeError(f"dedup consumer applied {consumer.applied} of {count}")
    return count / (consumer.last - consumer.first)


def plain_rate(svc: Services, db: Database, topic: str, count: int) -> float:
    quiet_logging()
    config = ConsumerConfig(
        bootstrap_servers=svc.bootstrap_servers,
        topics=(topic,),
        group_id=f"bench-plain-{uuid.uuid4().hex[:8]}",
        batch_size=BATCH,
        poll_timeout=POLL_TIMEOUT,
        settings=GROUP_SETTINGS,
    )
    engine = create_engine(db.url, pool_size=2)
    try:
        first, last = plain_consume(engine, config, count)
    finally:
        engine.dispose()
    return count / (last - first)


def run(svc: Services, size: Size) -> Result:
    db = svc.database("consumer")
    engine = create_engine(db.url)
    with engine.begin() as conn:
        conn.execute(text(EFFECTS_DDL))
    engine.dispose()
    topic = f"bench.consumer.{uuid.uuid4().hex[:6]}"
    create_topics(svc, topic)
    count = size.consumer_messages
    dedup: list[float] = []
    plain: list[float] = []
    started = time.perf_counter()
    try:
        fill_topic(svc, topic, count)
        for round_no in range(size.consumer_rounds):
            order = ("dedup", "plain") if round_no % 2 == 0 else ("plain", "dedup")
            for kind in order:
                if kind == "dedup":
                    dedup.append(isolated(dedup_rate, svc, db, topic, count))
                else:
                    plain.append(isolated(plain_rate, svc, db, topic, count))
    finally:
        svc.drop(db)
    ratios = [d / p for d, p in zip(dedup, plain, strict=True)]
    ratio = median(ratios)
    return figure(
        summary=(
            f"deduplicating consumer {median(dedup):,.0f} msg/s vs plain at-least-once "
            f"{median(plain):,.0f} msg/s ({count:,} messages, batches of {BATCH}, "
            "one INSERT per message)"
        ),
        value=ratio,
        unit="dedup / plain throughput",
        target=f">= {TARGET}",
        met=ratio >= TARGET,
        dedup_msgs_per_s=[round(x) for x in dedup],
        plain_msgs_per_s=[round(x) for x in plain],
        messages=count,
        batch_size=BATCH,
        poll_timeout_s=POLL_TIMEOUT,
        seconds=round(time.perf_counter() - started, 1),
    )
