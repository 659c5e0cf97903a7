"""Verdict of a chaos run from what was collected: pure, so its own tests can feed it bad data.

The truth of what committed is the database (``chaos_orders``, written in the
same transaction as each event), not what the writers believe: a commit that
was cut by a PostgreSQL restart has an unknown outcome until it is read back.
Against that truth the checker counts, from the projector's effects table and
from the topic as read by an independent client:

- effects: each committed event applied exactly once (no loss, no duplicate),
  nothing applied that did not commit (phantoms), per-key order of effects;
- topic: each committed event present, nothing uncommitted, one partition per
  key, and per-key order judged on every copy (see ``_topic_order``). Duplicates
  on the topic are only reported on a broker that shows records of aborted
  transactions (Tansu): it has them after a relay is killed mid-transaction, and
  the consumer absorbs them. On a broker that filters aborts they must be 0.
- the run itself: events left out of the check (a transaction that failed
  before its commit, a commit whose outcome stayed unknown and did not commit)
  are counted and bounded, and a run that committed too little of what it
  planned fails: a check of nothing proves nothing.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

EXAMPLES = 5
"""Example ids kept per kind of failure, for the report and the logs."""

MAX_EXCLUDED_SHARE = 0.05
"""At most this share of the events that did not roll back on purpose may be left out of the
check as "failed before commit" or "commit outcome unknown" (a PostgreSQL restart cuts a few
transactions; a publish() bug under concurrency would cut many)."""

MIN_COMMITTED_SHARE = 0.5
"""A run must commit at least this share of the events it planned (10 % roll back on purpose),
or it checked too little to prove anything."""


@dataclass(frozen=True, slots=True)
class Written:
    """A business row read back from the database: this event committed."""

    event_id: str
    key: str
    seq: int


@dataclass(frozen=True, slots=True)
class Effect:
    """One row the projector wrote; ``id`` orders effects as they were applied."""

    id: int
    event_id: str
    key: str
    seq: int


@dataclass(frozen=True, slots=True)
class TopicRecord:
    partition: int
    offset: int
    event_id: str
    key: str
    seq: int


@dataclass(slots=True)
class Observations:
    """Everything collected at the end of a run, once every process has stopped."""

    committed: dict[str, Written]
    """From the database: the truth."""
    acknowledged: set[str] = field(default_factory=set)
    """Events whose commit() returned: all of them must be in ``committed``."""
    rolled_back: set[str] = field(default_factory=set)
    """Events of transactions rolled back on purpose."""
    failed: set[str] = field(default_factory=set)
    """Events of transactions that failed before their commit was sent."""
    ambiguous: set[str] = field(default_factory=set)
    """Events whose commit raised (PostgreSQL restarted under it): either outcome is fine."""
    effects: list[Effect] = field(default_factory=list)
    topic: list[TopicRecord] = field(default_factory=list)
    pending_outbox: int = 0
    dead_rows: int = 0
    dead_letters: int = 0
    planned: int = 0
    """Events the writers were asked to attempt (0: not known, no near-empty check)."""
    filters_aborts: bool = False
    """The broker hides records of aborted transactions: every copy is a committed one."""
    excluded_reasons: dict[str, int] = field(default_factory=dict)
    """Why transactions failed before or during their commit: error class -> events."""
    to_missing_topic: set[str] = field(default_factory=set)
    """Events published to a topic that does not exist, in acknowledged transactions: each
    must end in ``outbox_dead_events``."""
    to_missing_topic_unknown: set[str] = field(default_factory=set)
    """The same, in transactions whose commit outcome is unknown: dead rows or nothing."""
    dead_of_missing_topic: set[str] = field(default_factory=set)
    """Event ids of the dead rows whose topic is the missing one (counted in ``dead_rows``)."""


@dataclass(slots=True)
class Report:
    """Counts that must be zero are listed in ``failures`` when they are not."""

    committed: int = 0
    acknowledged: int = 0
    rolled_back: int = 0
    failed_before_commit: int = 0
    ambiguous: int = 0
    ambiguous_committed: int = 0
    excluded: int = 0
    """Events left out of the check: failed before commit, or unknown and not committed."""
    excluded_share: float = 0.0
    excluded_over_limit: int = 0
    excluded_reasons: dict[str, int] = field(default_factory=dict)
    planned: int = 0
    too_few_committed: int = 0
    effects_applied: int = 0
    duplicate_effects: int = 0
    lost: int = 0
    phantoms: int = 0
    phantoms_rolled_back: int = 0
    order_violations: int = 0
    mismatched_effects: int = 0
    topic_records: int = 0
    topic_duplicates: int = 0
    topic_duplicates_filtered: int = 0
    """The extra copies, counted as a failure, when the broker filters aborts."""
    topic_lost: int = 0
    topic_phantoms: int = 0
    topic_order_violations: int = 0
    keys_on_several_partitions: int = 0
    acknowledged_missing: int = 0
    uncommitted_in_database: int = 0
    pending_outbox: int = 0
    dead_rows: int = 0
    """Dead rows other than the events written to the missing topic."""
    dead_letters: int = 0
    missing_topic_dead: int = 0
    """Events written to the missing topic that became dead rows (reported)."""
    missing_topic_not_dead: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    """For each example of a topic order violation: its key's copies in offset order, as
    ``seq@partition/offset``, which say what repeated or skipped what."""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MUST_BE_ZERO = (
    ("lost", "committed events without an effect"),
    ("duplicate_effects", "events applied more than once"),
    ("phantoms", "effects of events that never committed"),
    ("order_violations", "effects applied out of per-key order"),
    ("mismatched_effects", "effects whose key/seq differ from the committed row"),
    ("topic_lost", "committed events missing from the topic"),
    ("topic_phantoms", "records on the topic of events that never committed"),
    ("topic_order_violations", "records on the topic out of per-key order"),
    ("keys_on_several_partitions", "keys whose records landed on several partitions"),
    ("acknowledged_missing", "acknowledged commits missing from the database"),
    ("uncommitted_in_database", "rolled-back or failed transactions found in the database"),
    ("topic_duplicates_filtered", "extra copies on a broker that hides aborted transactions"),
    ("excluded_over_limit", f"events left out of the check above {MAX_EXCLUDED_SHARE:.0%}"),
    ("too_few_committed", f"committed events short of {MIN_COMMITTED_SHARE:.0%} of the plan"),
    ("pending_outbox", "rows still in the outbox at the end"),
    ("dead_rows", "rows moved to outbox_dead_events (no poison but the missing topic's)"),
    ("missing_topic_not_dead", "events to the missing topic not in outbox_dead_events"),
    ("dead_letters", "records dead-lettered by the consumers (no poison in this run)"),
)


def _late_in_order(seqs: Iterable[tuple[str, int]]) -> list[str]:
    """Event ids that came after a higher seq of the same key; repeats of an id are skipped."""
    seen: set[str] = set()
    highest: int | None = None
    late = []
    for event_id, seq in seqs:
        if event_id in seen:
            continue
        seen.add(event_id)
        if highest is not None and seq < highest:
            late.append(event_id)
        highest = seq if highest is None else max(highest, seq)
    return late


def _topic_order(copies: list[TopicRecord], committed_seqs: list[int], strict: bool) -> list[str]:
    """Event ids of one key's copies (in offset order) that break per-key order.

    Every copy is judged, not only first appearances:

    - first appearances ascend (a new event never comes before an older one);
    - every ascending run of copies is a stretch of the key's committed seqs with none
      skipped: the relay publishes a key's pending events oldest first, so a batch sent again
      after an abort replays a stretch from its start. A run that skips a committed event
      (``3, 5`` while 4 committed) is a reordering or a loss that an earlier aborted copy of 4
      would otherwise hide;
    - ``strict`` (a broker that filters aborts): every copy is a committed one, so the copies
      ascend as a whole: any repeat or step back is a violation.
    """
    late = _late_in_order((r.event_id, r.seq) for r in copies)
    rank = {seq: i for i, seq in enumerate(committed_seqs)}
    previous: TopicRecord | None = None
    for r in copies:
        if r.seq not in rank:
            previous = None  # a phantom: counted on its own
            continue
        if previous is not None:
            if r.seq > previous.seq and rank[r.seq] != rank[previous.seq] + 1:
                late.append(r.event_id)  # skipped a committed event of the key
            elif r.seq <= previous.seq and strict:
                late.append(r.event_id)
        previous = r
    return sorted(set(late))


def check(obs: Observations) -> Report:
    """Compare what was applied and published with what committed."""
    committed = obs.committed
    report = Report(
        committed=len(committed),
        acknowledged=len(obs.acknowledged),
        rolled_back=len(obs.rolled_back),
        failed_before_commit=len(obs.failed),
        ambiguous=len(obs.ambiguous),
        ambiguous_committed=len(obs.ambiguous & committed.keys()),
        excluded_reasons=dict(obs.excluded_reasons),
        planned=obs.planned,
        effects_applied=len(obs.effects),
        topic_records=len(obs.topic),
        pending_outbox=obs.pending_outbox,
        dead_letters=obs.dead_letters,
    )
    examples: dict[str, list[str]] = {}

    def note(kind: str, ids: Iterable[str]) -> int:
        found = sorted(ids)
        if found:
            examples[kind] = found[:EXAMPLES]
        return len(found)

    # The writers' own view must agree with the database (a harness or durability check).
    report.acknowledged_missing = note("acknowledged_missing", obs.acknowledged - committed.keys())

    # Events to a topic that does not exist: all of them, and nothing else, are dead rows.
    expected_dead = obs.dead_of_missing_topic & (
        obs.to_missing_topic | obs.to_missing_topic_unknown
    )
    report.missing_topic_dead = len(expected_dead)
    report.dead_rows = obs.dead_rows - len(expected_dead)
    report.missing_topic_not_dead = note(
        "missing_topic_not_dead", obs.to_missing_topic - obs.dead_of_missing_topic
    )
    report.uncommitted_in_database = note(
        "uncommitted_in_database", (obs.rolled_back | obs.failed) & committed.keys()
    )

    # The run checked enough: few events left out, most of the plan committed.
    excluded = obs.failed | (obs.ambiguous - committed.keys())
    report.excluded = len(excluded)
    checked = len(committed) + report.excluded
    report.excluded_share = round(report.excluded / checked, 4) if checked else 0.0
    if report.excluded > MAX_EXCLUDED_SHARE * checked:
        report.excluded_over_limit = note("excluded_over_limit", excluded)
    if obs.planned and len(committed) < MIN_COMMITTED_SHARE * obs.planned:
        report.too_few_committed = obs.planned - len(committed)
    if not committed:
        report.too_few_committed = max(1, obs.planned)

    # Effects: exactly once, nothing uncommitted, in per-key order, with the right payload.
    applied = Counter(e.event_id for e in obs.effects)
    report.lost = note("lost", committed.keys() - applied.keys())
    report.duplicate_effects = sum(n - 1 for n in applied.values())
    note("duplicate_effects", (i for i, n in applied.items() if n > 1))
    report.phantoms = note("phantoms", applied.keys() - committed.keys())
    report.phantoms_rolled_back = len(applied.keys() & obs.rolled_back)
    report.mismatched_effects = note(
        "mismatched_effects",
        {
            e.event_id
            for e in obs.effects
            if e.event_id in committed
            and (e.key, e.seq) != (committed[e.event_id].key, committed[e.event_id].seq)
        },
    )
    by_key: dict[str, list[Effect]] = defaultdict(list)
    for e in obs.effects:
        by_key[e.key].append(e)
    late: list[str] = []
    for effects in by_key.values():
        effects.sort(key=lambda e: e.id)
        late += _late_in_order((e.event_id, e.seq) for e in effects)
    report.order_violations = note("order_violations", late)

    # The topic: complete, nothing uncommitted, one partition per key, per-key order.
    on_topic = Counter(r.event_id for r in obs.topic)
    report.topic_duplicates = sum(n - 1 for n in on_topic.values())
    if obs.filters_aborts:
        report.topic_duplicates_filtered = note(
            "topic_duplicates_filtered", (i for i, n in on_topic.items() if n > 1)
        )
        report.topic_duplicates_filtered = report.topic_duplicates
        # Where each copy sits (partition/offset) tells which batches repeated one another.
        copies_at: dict[str, list[str]] = defaultdict(list)
        for r in sorted(obs.topic, key=lambda r: (r.partition, r.offset)):
            if on_topic[r.event_id] > 1:
                copies_at[r.event_id].append(f"{r.partition}/{r.offset}")
        if shown := examples.get("topic_duplicates_filtered"):
            examples["topic_duplicates_filtered"] = [
                f"{i} at {' and '.join(copies_at[i])}" for i in shown
            ]
    report.topic_lost = note("topic_lost", committed.keys() - on_topic.keys())
    report.topic_phantoms = note("topic_phantoms", on_topic.keys() - committed.keys())
    records: dict[str, list[TopicRecord]] = defaultdict(list)
    for r in obs.topic:
        records[r.key].append(r)
    committed_seqs: dict[str, list[int]] = defaultdict(list)
    for w in committed.values():
        committed_seqs[w.key].append(w.seq)
    split, late = [], []
    copies_of: dict[str, str] = {}  # a late event id -> its key's copies, seq@offset
    for key, recs in records.items():
        if len({r.partition for r in recs}) > 1:
            split.append(key)
            continue
        recs.sort(key=lambda r: r.offset)
        found = _topic_order(recs, sorted(committed_seqs[key]), obs.filters_aborts)
        late += found
        for event_id in found:
            copies_of[event_id] = " ".join(f"{r.seq}@{r.partition}/{r.offset}" for r in recs)
    report.keys_on_several_partitions = note("keys_on_several_partitions", split)
    report.topic_order_violations = note("topic_order_violations", late)
    report.copies = {i: copies_of[i] for i in examples.get("topic_order_violations", [])}

    report.examples = examples
    for name, meaning in MUST_BE_ZERO:
        value = getattr(report, name)
        if value:
            shown = [
                f"{i} [{report.copies[i]}]" if i in report.copies else i
                for i in examples.get(name, [])
            ]
            suffix = f" (e.g. {', '.join(shown)})" if shown else ""
            report.failures.append(f"{name}={value}: {meaning}{suffix}")
    return report


MISPLACED = "another record is at its offset"
"""How ``outbox verify`` names an event whose recorded offset holds another event."""


def cross_check(
    exit_code: int | None,
    verify: Mapping[str, Any] | None,
    harness: Report,
    copies: Mapping[str, int],
    *,
    offsets_misreported: bool = False,
) -> list[str]:
    """Where ``outbox verify``'s verdict (its exit code and ``--json`` report, one group)
    disagrees with the harness's own for one outbox; empty when they agree.

    ``copies``: how often the harness's reader saw each event id on the topic. When the
    harness found a failure, verify's view is only reported. Every event on the topic must be
    recorded once and applied by the group; when the topic holds each event once, verify
    must exit 0 (clean). A broker that shows records of aborted transactions (Tansu) leaves extra
    copies the harness tolerates; verify must then report exactly those as duplicates (order
    findings only among them) and nothing else.
    """
    if exit_code not in (0, 1) or verify is None:
        return [f"outbox verify gave no verdict (exit {exit_code})"]
    if harness.failures:
        return []
    out: list[str] = []
    events = len(copies)
    if verify["recorded"] != events:
        out.append(
            f"outbox verify: {verify['recorded']} events in the delivery record, "
            f"{events} on the topic"
        )
    groups = verify["groups"]
    if len(groups) != 1:
        out.append(f"outbox verify reported {len(groups)} groups, asked for one")
    for g in groups:
        if (g["applied"], g["lag"], g["unreadable"], g["passed_unapplied"]) != (
            events,
            0,
            [],
            [],
        ):
            out.append(
                f"outbox verify: group {g['group']} applied {g['applied']} of "
                f"{events} events on the topic, lag {g['lag']}, "
                f"{len(g['unreadable'])} unreadable, {len(g['passed_unapplied'])} read past"
            )
    lost = verify["lost"]
    if offsets_misreported:
        # Tansu 0.6 can answer a produce with a base offset one below where it stored the
        # records (a CI run: 61 records of one partition, each on the topic one offset past
        # its recorded one): verify then finds another event at the recorded offset. The
        # harness read the event on the topic, so that is the broker's report, not a loss.
        lost = [
            e
            for e in lost
            if not (e["event_id"] in copies and str(e.get("reason", "")).startswith(MISPLACED))
        ]
    if lost:
        out.append(f"outbox verify: {len(lost)} lost, e.g. {lost[0]}")
    extra = {e: n for e, n in sorted(copies.items()) if n > 1}
    excused = len(verify["lost"]) - len(lost)
    if not extra:
        only_excused = excused and not (verify["duplicates"] or verify["order_violations"])
        if (exit_code != 0 or not verify["clean"]) and not only_excused:
            out.append(
                f"outbox verify exited {exit_code} (clean: {verify['clean']}) on a topic the "
                f"harness found clean: {len(verify['duplicates'])} duplicated, "
                f"{len(verify['order_violations'])} out of order"
            )
        return out
    if verify["duplicates"] != extra:
        out.append(
            f"outbox verify: duplicates {len(verify['duplicates'])} events, the harness saw "
            f"{len(extra)} with extra copies (aborted transactions shown by the broker)"
        )
    stray = [v for v in verify["order_violations"] if v["event_id"] not in extra]
    if stray:
        out.append(f"outbox verify: out of key order outside the extra copies, e.g. {stray[0]}")
    return out
