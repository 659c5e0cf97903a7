"""Every SQL statement the library runs, named, each with its one-line purpose.

Statements use psycopg's ``%(name)s`` placeholders; the write path runs them
through SQLAlchemy ``text()`` with ``:name`` (see ``publish.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from outbox.partitioner import SHARD_COUNT as _SHARD_COUNT
from outbox.schema import EVENT_ID_VERSION
from outbox.schema import NOTIFY_CHANNEL as _CHANNEL

# -- write path (runs inside the caller's transaction) ------------------------

# Insert one event whose id publish() generated (a fresh uuid4 cannot collide).
INSERT_NEW_EVENT = """
INSERT INTO outbox_events (event_id, topic, shard, key, value, header_names, header_values)
VALUES (:event_id, :topic, :shard, :key, :value, :header_names, :header_values)
"""

# Insert one event with the caller's event_id; one still pending is ignored (idempotency key).
INSERT_EVENT = f"""
{INSERT_NEW_EVENT.strip()}
ON CONFLICT (event_id) DO NOTHING
"""

# Either insert plus a wake-up for the relay slot owning the shard, in a single round trip.
INSERT_NEW_EVENT_AND_NOTIFY = f"""
WITH inserted AS ({INSERT_NEW_EVENT.strip()} RETURNING 1)
SELECT pg_notify(:channel, CAST(:shard AS text))
"""
INSERT_EVENT_AND_NOTIFY = f"""
WITH inserted AS ({INSERT_EVENT.strip()} RETURNING 1)
SELECT pg_notify(:channel, CAST(:shard AS text))
"""

# -- relay ------------------------------------------------------------------------

# Are the outbox tables there? (NULL: never migrated.)
OUTBOX_TABLES = """
SELECT to_regclass('outbox_events') AS events, to_regclass('outbox_dead_events') AS dead
"""

# Take a slot for this session; released when the session ends (crash included).
TRY_LOCK_SLOT = "SELECT pg_try_advisory_lock(%(namespace)s, %(slot)s)"

# Bound a slot or control session on the server (outbox.relay.sessions): names, values.
SET_SESSION = """
SELECT set_config(name, setting, false)
FROM unnest(%(names)s::text[], %(settings)s::text[]) AS s(name, setting)
"""

# A slot connection's heartbeat: the server ends a session silent for the takeover timeout.
HEARTBEAT = "SELECT 1"

# Give a slot back on purpose (rebalancing, shutdown).
UNLOCK_SLOT = "SELECT pg_advisory_unlock(%(namespace)s, %(slot)s)"

# Advisory locks belong to one database, pg_locks shows the whole server's: outboxes in
# other databases of the server are other outboxes (I9).
_THIS_DATABASE = "database = (SELECT oid FROM pg_database WHERE datname = current_database())"

# Announce this process's slot count; shared so that relays agreeing on it coexist.
LOCK_SLOT_COUNT = "SELECT pg_advisory_lock_shared(%(namespace)s, %(slots)s)"

# Slot counts announced by other live relays (must all be equal).
OTHER_SLOT_COUNTS = f"""
SELECT DISTINCT objid::int AS slots FROM pg_locks
WHERE locktype = 'advisory' AND classid::bigint = %(namespace)s AND objsubid = 2
  AND granted AND objid::bigint <> %(slots)s AND {_THIS_DATABASE}
"""

# Live relays of this slot count: they split the slots between them.
COUNT_RELAYS = f"""
SELECT count(DISTINCT pid) AS n FROM pg_locks
WHERE locktype = 'advisory' AND classid::bigint = %(namespace)s AND objid::bigint = %(slots)s
  AND objsubid = 2 AND granted AND {_THIS_DATABASE}
"""

# Serialise relays announcing their slot count (a transaction-level lock: check and announce
# happen under it, so two relays with different --slots cannot both pass the check).
GUARD_SLOT_COUNT = "SELECT pg_advisory_xact_lock(%(namespace)s, 0)"

# After a fence: does this session still hold the slot's lock (then the fencer is outside
# this database, I9), and is a slot-count change settling or settled (a relay of this database
# fences the old layout's slots)?
SLOT_LOCK_STATE = f"""
SELECT EXISTS (
         SELECT 1 FROM pg_locks
         WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
           AND classid::bigint = %(namespace)s AND objid::bigint = %(slot)s AND objsubid = 2
       ) AS holds_slot,
       EXISTS (
         SELECT 1 FROM pg_locks
         WHERE locktype = 'advisory' AND pid <> pg_backend_pid() AND granted
           AND classid::bigint = %(guard)s AND objid = 0 AND objsubid = 2 AND {_THIS_DATABASE}
       ) OR coalesce((SELECT slot_count FROM outbox_identity), %(slots)s) <> %(slots)s
         AS layout_changing
"""

# This outbox's identity and the slot layout its relays last used.
READ_IDENTITY = "SELECT outbox_id, slot_count FROM outbox_identity"

# Give a copied database its own outbox identity (`outbox identity renew`); its relays then
# use transactional ids of their own, and re-learn the slot layout.
RENEW_IDENTITY_UPDATE = (
    "UPDATE outbox_identity SET outbox_id = gen_random_uuid(), slot_count = NULL"
)
RENEW_IDENTITY = RENEW_IDENTITY_UPDATE + " RETURNING outbox_id"

# Connections of this database's relays that hold a slot or announce a slot count right now.
LIVE_RELAYS = f"""
SELECT count(DISTINCT pid) AS n FROM pg_locks
WHERE locktype = 'advisory' AND classid::bigint IN (%(slot_namespace)s, %(count_namespace)s)
  AND objsubid = 2 AND granted AND {_THIS_DATABASE}
"""

# Give an outbox whose tables came from outbox.metadata (not `outbox migrate`) its identity.
ENSURE_IDENTITY = """
INSERT INTO outbox_identity (outbox_id) VALUES (gen_random_uuid()) ON CONFLICT DO NOTHING
"""

# Remember the slot layout once the batches of the previous one are settled.
RECORD_SLOT_COUNT = "UPDATE outbox_identity SET slot_count = %(slots)s"

_CLAIMED = "id, event_id, topic, key, value, header_names, header_values, created_at"

# Bytes a claimed row brings into the relay's memory; a value above the relay's limit
# is never loaded (it is buried by id), so it counts for nothing. octet_length() of a
# bytea reads the TOAST header only, not the value.
_ROW_BYTES = """coalesce(octet_length(key), 0)
       + CASE WHEN octet_length(value) > %(max_value_bytes)s THEN 0
              ELSE coalesce(octet_length(value), 0) END"""

# The rows of a claim up to a byte budget, in id order: the first row always (however
# large), then rows while the running total stays under ``max_bytes``. Values above
# ``max_value_bytes`` come back as NULL with their size, to be buried by id.
_BUDGETED = f"""
SELECT id, event_id, {{topic}}, key,
       CASE WHEN octet_length(value) > %(max_value_bytes)s THEN NULL ELSE value END AS value,
       {{header_names}}, header_values,
       (extract(epoch FROM created_at) * 1000)::int8 AS created_ms,
       coalesce(octet_length(value), 0) AS value_bytes
FROM (
  SELECT sized.*, sum(row_bytes) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS running_bytes
  FROM (SELECT claimed.*, {_ROW_BYTES} AS row_bytes FROM ({{claim}}) AS claimed) AS sized
) AS budgeted
WHERE running_bytes - row_bytes < %(max_bytes)s
ORDER BY id
"""

# The text columns as a claim reads them: as text, which the server converts to the session's
# UTF8; or, in a SQL_ASCII database, as the bytes stored (bytea), which the relay decodes
# itself. SQL_ASCII lets a writer store bytes that are not UTF-8, and the server refuses a
# whole result holding one (a poison row would stop its slot for good, I6). The other server
# encodings check text on the way in.
_TEXT = {"topic": "topic", "header_names": "header_names"}
# unnest() flattens a multidimensional array, which would make headers of a row that has
# none (``record_defect`` buries it): such an array comes back as NULLs of its shape instead.
_STORED_BYTES = {
    "topic": "convert_to(topic, 'SQL_ASCII') AS topic",
    "header_names": """CASE WHEN header_names IS NULL THEN NULL
         WHEN array_ndims(header_names) > 1 THEN array_fill(NULL::bytea, ARRAY(
           SELECT array_length(header_names, d)
           FROM generate_series(1, array_ndims(header_names)) AS d ORDER BY d))
         ELSE ARRAY(
         SELECT convert_to(name, 'SQL_ASCII')
         FROM unnest(header_names) WITH ORDINALITY AS h(name, n) ORDER BY n) END AS header_names""",
}

# Oldest pending rows of every shard, in id order: the claim of a slot owning them all.
# Held topics (missing or not writable, see kafka.TopicHolds) are left out.
_CLAIM_ALL = f"""SELECT {_CLAIMED}
  FROM outbox_events WHERE topic <> ALL(%(held)s::text[])
  ORDER BY id
  LIMIT %(limit)s"""
CLAIM_BATCH = _BUDGETED.format(claim=_CLAIM_ALL, **_TEXT)

# One shard's oldest pending rows, on (shard, id); claim_batch() merges a slot's in id order.
CLAIM_SHARD = f"""(SELECT {_CLAIMED}
 FROM outbox_events WHERE shard = {{shard:d}} AND topic <> ALL(%(held)s::text[])
 ORDER BY id LIMIT %(limit)s)"""


def claim_batch(shards: Iterable[int], *, stored_bytes: bool = False) -> str:
    """The claim of a slot: its shards' oldest pending rows in id order, reading no others.

    A slot owning some shards merges one (shard, id) range scan per shard
    (a Merge Append that stops after ``limit`` rows). Filtering the primary key
    on ``shard = ANY(...)`` instead walks every other slot's rows below the
    ones it wants: behind a slot that lags (its relay was down), each claim of
    the others grew with that backlog (18 ms instead of 4 for 1000 rows past
    50k of another slot's). The byte budget is a window sum over the claimed
    rows' sizes on top of the same scans, so the claim stays index-driven.

    ``stored_bytes``: topic and header names as the bytes stored (for a SQL_ASCII database).
    """
    own = sorted(set(shards))
    text = _STORED_BYTES if stored_bytes else _TEXT
    if len(own) == _SHARD_COUNT:
        return _BUDGETED.format(claim=_CLAIM_ALL, **text)
    if len(own) == 1:
        # One scan is ordered and limited already; PostgreSQL refuses a second ORDER BY on a
        # parenthesised SELECT that no UNION follows (slots of 17 and more own one shard).
        return _BUDGETED.format(claim=CLAIM_SHARD.format(shard=own[0]), **text)
    merged = "\nUNION ALL\n".join(CLAIM_SHARD.format(shard=shard) for shard in own)
    return _BUDGETED.format(claim=f"{merged}\nORDER BY id\nLIMIT %(limit)s", **text)


def claim_params(
    *, limit: int, held: Sequence[str], max_value_bytes: int, max_bytes: int
) -> dict[str, object]:
    """The parameters ``claim_batch``'s statement takes: at most ``limit`` rows and about
    ``max_bytes`` of values, none of the ``held`` topics; values over ``max_value_bytes``
    come back as NULL (with their size), never loaded."""
    return {
        "limit": limit,
        "held": list(held),
        "max_value_bytes": max_value_bytes,
        "max_bytes": max_bytes,
    }


# Remove a batch's rows (their Kafka transaction commits before this one, I2), saying which
# were still there: a row deleted by hand since its claim is withdrawn, not published.
DELETE_EVENTS = "DELETE FROM outbox_events WHERE id = ANY(%(ids)s) RETURNING id"

# Rows still pending under the ids a recovery marker names, in the marker's own shards only.
RECOVERY_CANDIDATES = """
SELECT id, event_id FROM outbox_events
WHERE id = ANY(%(ids)s) AND shard = ANY(%(shards)s)
FOR UPDATE
"""

# Delete the rows recovery matched to the marker's events (id AND event id): published (I4, I9).
DELETE_RECOVERED = """
DELETE FROM outbox_events WHERE id = ANY(%(ids)s) AND event_id = ANY(%(event_ids)s)
"""

# Give the id of a row about to be buried up, when a dead row of another event has it (ids
# repeat after TRUNCATE ... RESTART IDENTITY): that row moves past every dead row's id.
FREE_DEAD_ID = """
UPDATE outbox_dead_events
SET id = (SELECT max(id) + 1 FROM outbox_dead_events)
WHERE id = %(id)s
  AND event_id <> (SELECT event_id FROM outbox_events WHERE id = %(id)s)
"""

# Move one poison row aside with its error, in one statement (I6).
MOVE_TO_DEAD = """
WITH moved AS (DELETE FROM outbox_events WHERE id = %(id)s RETURNING *)
INSERT INTO outbox_dead_events
  (id, event_id, topic, shard, key, value, header_names, header_values, created_at, error,
   attempts)
SELECT id, event_id, topic, shard, key, value, header_names, header_values, created_at, %(error)s,
       dead_attempts + 1
FROM moved
ON CONFLICT (event_id) DO UPDATE
  SET error = EXCLUDED.error, failed_at = now(),
      attempts = outbox_dead_events.attempts + 1
"""

# Subscribe this session to publish()'s wake-ups.
LISTEN = f"LISTEN {_CHANNEL}"

# Wake every relay slot, e.g. after re-queuing rows of any shard (an empty payload).
WAKE_ALL_SLOTS = f"SELECT pg_notify('{_CHANNEL}', '')"

# -- operations -------------------------------------------------------------------

# Pending rows and the oldest one's age, per topic (the outbox lag).
PENDING_BY_TOPIC = """
SELECT topic, count(*) AS pending,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_s
FROM outbox_events GROUP BY topic ORDER BY topic
"""

# Slots held right now, and by which backend.
SLOT_OWNERS = f"""
SELECT l.objid::int AS slot, a.pid, a.application_name, a.client_addr::text AS client_addr,
       a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.classid::bigint = %(namespace)s AND l.objsubid = 2
  AND l.granted AND l.mode = 'ExclusiveLock' AND l.{_THIS_DATABASE}
ORDER BY slot
"""

# Poison rows with their error, newest first.
LIST_DEAD = """
SELECT id, event_id, topic, octet_length(value) AS value_bytes, error, attempts, failed_at
FROM outbox_dead_events ORDER BY failed_at DESC LIMIT %(limit)s
"""

# Put dead rows back in the outbox after a fix (they keep their id, hence their order, and the
# count of their failures, which a new failure goes on from).
REQUEUE_DEAD = """
WITH moved AS (
  DELETE FROM outbox_dead_events WHERE %(all)s OR id = ANY(%(ids)s) RETURNING *
)
INSERT INTO outbox_events
  (id, event_id, topic, shard, key, value, header_names, header_values, created_at, dead_attempts)
OVERRIDING SYSTEM VALUE
SELECT id, event_id, topic, shard, key, value, header_names, header_values, created_at, attempts
FROM moved
RETURNING id
"""

# Dead rows (of those named) the outbox table's header constraints refuse back.
UNBUILDABLE_DEAD = """
SELECT id FROM outbox_dead_events
WHERE (%(all)s OR id = ANY(%(ids)s))
  AND (cardinality(header_names) IS DISTINCT FROM cardinality(header_values)
       -- array_position() refuses a multidimensional array: CASE asks it of the others only
       OR CASE WHEN array_ndims(header_names) > 1 THEN true
               ELSE array_position(header_names, NULL) IS NOT NULL END)
ORDER BY id
"""

# Dead rows (of those named) whose id or event id a row in the outbox has.
CLASHING_DEAD = """
SELECT d.id FROM outbox_dead_events d
WHERE (%(all)s OR d.id = ANY(%(ids)s))
  AND EXISTS (SELECT 1 FROM outbox_events e WHERE e.id = d.id OR e.event_id = d.event_id)
ORDER BY d.id
"""

# One dead row whole, for ``outbox dead show``.
SHOW_DEAD = """
SELECT id, event_id, topic, shard, key, value, header_names, header_values, created_at,
       failed_at, attempts, error
FROM outbox_dead_events WHERE id = %(id)s
"""

# Lock the named dead rows, so re-queue and discard act on all of them or on none.
LOCK_DEAD = "SELECT id FROM outbox_dead_events WHERE id = ANY(%(ids)s) FOR UPDATE"

# Drop dead rows for good (the event is never published).
DISCARD_DEAD = "DELETE FROM outbox_dead_events WHERE id = ANY(%(ids)s) RETURNING id"

# Fail when the relay's tables are missing (migrations not run), reading no row.
CHECK_SCHEMA = "SELECT 1 FROM outbox_events, outbox_dead_events LIMIT 0"

# How many rows were moved aside, for ``outbox status``.
COUNT_DEAD = "SELECT count(*) AS n FROM outbox_dead_events"

# -- testing (outbox.testing) ------------------------------------------------------------

# Outbox rows after a given id, of one topic or all, oldest first: what a test published.
PUBLISHED_AFTER = """
SELECT id, event_id, topic, key, value, header_names, header_values
FROM outbox_events
WHERE id > %(after)s AND (%(topic)s::text IS NULL OR topic = %(topic)s::text)
ORDER BY id
"""

# The newest outbox row id the transaction sees (0 when empty), where a recorder starts.
LAST_EVENT_ID = "SELECT coalesce(max(id), 0) FROM outbox_events"

# -- delivery record (outbox.relay.deliveries) -------------------------------------------

# The key hash of outbox.relay.deliveries.key_hash, in SQL: the first 8 bytes of SHA-256.
KEY_HASH_SQL = "('x' || left(encode(sha256({key}), 'hex'), 16))::bit(64)::int8"


# Record a batch's events where their delivery reports placed them: one statement per batch,
# in the transaction that deletes the batch. Parameters go in binary (%(...)b, pre-encoded by
# outbox.relay.deliveries.batch_params), the keys hashed by the relay: SHA-256 in Python costs
# it ~0.5 us a key, the same in SQL (hex text, bit string) cost the server ~2 us, which the
# relay waits for. Not a COPY: see outbox.relay.deliveries (a frozen relay in COPY keeps its
# slot, I12).
RECORD_DELIVERIES = """
INSERT INTO outbox_deliveries (event_id, id, topic, partition, kafka_offset, key_hash)
SELECT * FROM unnest(%(event_ids)b::uuid[], %(ids)b::int8[], %(topics)b::text[],
                     %(partitions)b::int4[], %(offsets)b::int8[], %(key_hashes)b::int8[])
"""


# Delete the rows recovery matched to the marker's events and record them: the marker tells
# that they were committed, not where (partition and offset stay NULL).
DELETE_RECOVERED_AND_RECORD = f"""
WITH deleted AS ({DELETE_RECOVERED.strip()} RETURNING id, event_id, topic, key)
INSERT INTO outbox_deliveries (event_id, id, topic, key_hash)
SELECT event_id, id, topic, {KEY_HASH_SQL.format(key="key")} FROM deleted
"""

# Does the delivery record exist (NULL: the database is not migrated to it yet)?
DELIVERIES_TABLE = "SELECT to_regclass('outbox_deliveries') AS deliveries"

# Partition upkeep waits at most this long for a lock: dropping a day locks the whole record
# briefly, and batches that insert must not queue behind a drop that waits on a long batch.
UPKEEP_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '2s'"

# Serialise partition upkeep between relays (a transaction-level lock).
TRY_LOCK_UPKEEP = "SELECT pg_try_advisory_xact_lock(%(key)s, 0)"

# The partitions of the delivery record.
DELIVERY_PARTITIONS = """
SELECT c.relname FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass(%(parent)s)
"""


def create_default_delivery_partition(parent: str, default: str) -> str:
    """The partition catching rows no daily one covers."""
    return f"CREATE TABLE IF NOT EXISTS {default} PARTITION OF {parent} DEFAULT"


def create_delivery_partition(
    parent: str, default: str, name: str, lower: object, upper: object
) -> list[str]:
    """A day's partition: built beside the table, given the rows the default partition holds
    for that day, then attached (attaching checks that the default partition has none left)."""
    return [
        f"CREATE TABLE {name} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
        f"""WITH moved AS (
  DELETE FROM {default} WHERE published_at >= TIMESTAMPTZ '{lower}'
    AND published_at < TIMESTAMPTZ '{upper}' RETURNING *
) INSERT INTO {name} SELECT * FROM moved""",
        f"ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES FROM "
        f"(TIMESTAMPTZ '{lower}') TO (TIMESTAMPTZ '{upper}')",
    ]


def drop_delivery_partition(name: str) -> str:
    """Expire a day of the record at once: no DELETE, nothing for vacuum."""
    return f"DROP TABLE IF EXISTS {name}"


# The database's clock: partition upkeep judges days by it, as published_at is set by it.
DATABASE_NOW = "SELECT now()"


def expire_deliveries(table: str) -> str:
    """Rows of ``table`` older than the retention window: of the default partition (rarely
    used), or of the whole record through its parent table, whose privileges cover its
    partitions (the expiry of a role that may not drop partitions)."""
    return f"DELETE FROM {table} WHERE published_at < %(before)s"


# -- trace (outbox trace) ------------------------------------------------------------------

# The event still waiting in the outbox.
TRACE_PENDING = """
SELECT id, topic, created_at, dead_attempts FROM outbox_events WHERE event_id = %(event_id)s
"""

# The event moved aside as poison, with its error and tries.
TRACE_DEAD = """
SELECT id, topic, error, attempts, failed_at FROM outbox_dead_events WHERE event_id = %(event_id)s
"""

# Where the delivery record says these events went (a recovered batch has no place). v7 ids
# are found by the BRIN index, the others by the btree (migration 0008): each branch repeats
# its index's predicate so the planner may use it, one id at a time (a BRIN index cannot
# take ``= ANY(array)`` on every supported version).
TRACE_DELIVERIES = f"""
SELECT d.* FROM unnest(%(event_ids)s::uuid[]) AS wanted(e) CROSS JOIN LATERAL (
  SELECT event_id, id, topic, partition, kafka_offset, published_at FROM outbox_deliveries
  WHERE event_id = wanted.e AND {EVENT_ID_VERSION} = 7
  UNION ALL
  SELECT event_id, id, topic, partition, kafka_offset, published_at FROM outbox_deliveries
  WHERE event_id = wanted.e AND {EVENT_ID_VERSION} <> 7
) AS d ORDER BY d.published_at
"""

# The consumer groups that applied the event (their dedup records, I5).
TRACE_APPLIED = """
SELECT group_id, processed_at FROM outbox_processed_events
WHERE event_id = %(event_id)s ORDER BY processed_at, group_id
"""

# -- verify (outbox verify) -------------------------------------------------------------

# The delivery record of one topic since a time, in outbox order.
TOPIC_DELIVERIES = """
SELECT event_id::text AS event_id, id, partition, kafka_offset, key_hash FROM outbox_deliveries
WHERE topic = %(topic)s AND published_at >= %(since)s ORDER BY id
"""

# Each partition's first recorded offset since a time: where verify starts reading.
TOPIC_FIRST_OFFSETS = """
SELECT partition, min(kafka_offset) FROM outbox_deliveries
WHERE topic = %(topic)s AND published_at >= %(since)s AND partition IS NOT NULL
GROUP BY partition
"""

# Which of these events one consumer group applied (its dedup records, I5).
GROUP_APPLIED = """
SELECT event_id FROM outbox_processed_events
WHERE group_id = %(group)s AND event_id = ANY(%(event_ids)s::text[])
"""
