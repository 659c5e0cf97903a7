"""The fault schedule: a pure function of the seed, so a failing run can be replayed exactly.

Timing is the only random part of a chaos run: which process dies when, when
PostgreSQL restarts, when and for how long the broker link is cut. All of it
comes from ``schedule(seed, ...)``, which does no I/O; the harness only plays
the result back (``actions()`` turns it into timed steps).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum


class FaultKind(StrEnum):
    KILL_RELAY = "kill-relay"
    KILL_CONSUMER = "kill-consumer"
    RESTART_POSTGRES = "restart-postgres"
    CUT_BROKER = "cut-broker"
    FREEZE_RELAY = "freeze-relay"


class Step(StrEnum):
    """What the harness does at one instant; a fault is one or two steps."""

    KILL_RELAY = "kill-relay"
    START_RELAY = "start-relay"
    KILL_CONSUMER = "kill-consumer"
    START_CONSUMER = "start-consumer"
    RESTART_POSTGRES = "restart-postgres"
    CUT_BROKER = "cut-broker"
    RESTORE_BROKER = "restore-broker"
    FREEZE_RELAY = "freeze-relay"  # SIGSTOP
    THAW_RELAY = "thaw-relay"  # SIGCONT


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: ``at`` seconds into the fault phase.

    ``target`` is the index of the relay or consumer to kill (or relay to freeze);
    ``duration`` is how long the broker link stays cut, how long a killed process
    stays dead before its replacement starts, or how long a relay stays frozen.
    """

    at: float
    kind: FaultKind
    target: int = 0
    duration: float = 0.0


@dataclass(frozen=True, slots=True)
class Action:
    at: float
    step: Step
    target: int = 0


@dataclass(frozen=True, slots=True)
class Rates:
    """Mean seconds between faults of a kind, and the bounds of the random durations."""

    relay_kill_every: float = 4.0
    consumer_kill_every: float = 6.0
    cut_every: float = 10.0
    cut_seconds: tuple[float, float] = (1.0, 4.0)
    dead_seconds: tuple[float, float] = (0.0, 2.0)
    kill_after_cut: float = 0.7
    """Chance that a relay is also killed just after a cut ends, while it drains the backlog
    the cut built up: the moment it is most likely to be inside a Kafka transaction."""
    postgres_restarts: int | None = None
    """None: one restart for runs under a minute, two for longer ones."""
    outage_seconds: float = 0.0
    """If positive: one broker-wide outage this long replaces the random cuts (made longer than
    the relay's delivery timeout, so records expire while it lasts). No process is killed while
    it lasts: a relay killed then would take its expiring records with it, and a consumer
    kill would wait in vain for a consumer to be inside its offset-commit window."""
    freeze_seconds: float = 6.0
    """How long a relay stays frozen (SIGSTOP, then SIGCONT): longer than the takeover time of
    the run's relays (``--takeover-timeout``), so its slots are taken over meanwhile (I12)."""


def schedule(
    seed: int, seconds: float, *, relays: int, consumers: int, rates: Rates | None = None
) -> list[Fault]:
    """Every fault of a run of ``seconds``, sorted by time; the same inputs give the same list.

    Faults start after a short quiet period (the processes are still starting)
    and end early enough that the last replacement is running before the fault
    phase is over. A process is never killed again before its replacement
    started; broker cuts never overlap each other (a restore must not end another
    cut early); PostgreSQL restarts are spread over the middle of the run.
    """
    if seconds <= 0:
        raise ValueError(f"seconds={seconds} must be positive")
    if relays < 1 or consumers < 1:
        raise ValueError("a chaos run needs at least one relay and one consumer")
    rates = rates or Rates()
    rng = random.Random(seed)
    start = min(2.0, seconds * 0.1)
    end = seconds - max(rates.cut_seconds[1], rates.dead_seconds[1]) - 1.5
    if end <= start:
        end = start + seconds * 0.5
    if rates.outage_seconds >= seconds - start:
        raise ValueError(f"an outage of {rates.outage_seconds}s does not fit in {seconds}s")
    faults: list[Fault] = []

    def every(mean: float) -> list[float]:
        times, t = [], start + rng.uniform(0, mean)
        while t < end:
            times.append(round(t, 3))
            t += rng.uniform(0.5 * mean, 1.5 * mean)
        return times

    cut_end = start
    after_cuts: list[float] = []
    cuts = every(rates.cut_every) or [round(rng.uniform(start, end), 3)]
    if rates.outage_seconds > 0:
        # After some traffic (so the kills before it strike batches), with time left after it.
        lo = start + seconds * 0.2
        latest = seconds - rates.outage_seconds - 1.5 - rates.dead_seconds[1]
        cuts = [round(rng.uniform(lo, max(lo, min(latest, lo + seconds * 0.1))), 3)]
    for planned in cuts:
        at = round(max(planned, cut_end + 1.0), 3)
        if at >= end and rates.outage_seconds <= 0:
            break
        duration = round(rates.outage_seconds or rng.uniform(*rates.cut_seconds), 3)
        faults.append(Fault(at, FaultKind.CUT_BROKER, 0, duration))
        cut_end = at + duration
        kill_at = round(cut_end + rng.uniform(0.2, 1.5), 3)
        if rng.random() < rates.kill_after_cut and kill_at + rates.dead_seconds[1] < seconds:
            after_cuts.append(kill_at)

    outages = [
        (f.at - rates.dead_seconds[1], f.at + f.duration) for f in faults if rates.outage_seconds
    ]
    for kind, count, planned_kills in (
        (FaultKind.KILL_RELAY, relays, sorted(every(rates.relay_kill_every) + after_cuts)),
        (FaultKind.KILL_CONSUMER, consumers, every(rates.consumer_kill_every)),
    ):
        times = [t for t in planned_kills if not any(a <= t <= b for a, b in outages)]
        if not times:  # a short run still meets every kind of fault once
            after = max([start, *(b for _, b in outages)])
            times = [round(rng.uniform(after, max(after, end)), 3)]
        dead_until = [0.0] * count
        for at in times:
            alive = [i for i in range(count) if dead_until[i] < at]
            if not alive:
                continue
            target = rng.choice(alive)
            dead = round(rng.uniform(*rates.dead_seconds), 3)
            dead_until[target] = at + dead
            faults.append(Fault(at, kind, target, dead))

    # One relay freeze in the middle of the run, over by the end of the fault phase.
    latest = max(start, seconds - rates.freeze_seconds - 1.5)
    freeze_at = round(rng.uniform(start, max(start, min(latest, end))), 3)
    faults.append(
        Fault(freeze_at, FaultKind.FREEZE_RELAY, rng.randrange(relays), rates.freeze_seconds)
    )

    restarts = rates.postgres_restarts
    if restarts is None:
        restarts = 1 if seconds < 60 else 2
    span = (end - start) / max(1, restarts)
    for i in range(restarts):
        # One restart in each equal share of the run, away from the share's edges.
        lo = start + i * span
        at = round(rng.uniform(lo + 0.2 * span, lo + 0.8 * span), 3)
        faults.append(Fault(at, FaultKind.RESTART_POSTGRES))
    return sorted(faults, key=lambda f: (f.at, f.kind))


def actions(faults: list[Fault]) -> list[Action]:
    """The timed steps that play ``faults``: a kill is followed by a start, a cut by a restore."""
    out: list[Action] = []
    for f in faults:
        match f.kind:
            case FaultKind.KILL_RELAY:
                out += [
                    Action(f.at, Step.KILL_RELAY, f.target),
                    Action(f.at + f.duration, Step.START_RELAY, f.target),
                ]
            case FaultKind.KILL_CONSUMER:
                out += [
                    Action(f.at, Step.KILL_CONSUMER, f.target),
                    Action(f.at + f.duration, Step.START_CONSUMER, f.target),
                ]
            case FaultKind.CUT_BROKER:
                out += [
                    Action(f.at, Step.CUT_BROKER),
                    Action(f.at + f.duration, Step.RESTORE_BROKER),
                ]
            case FaultKind.RESTART_POSTGRES:
                out.append(Action(f.at, Step.RESTART_POSTGRES))
            case FaultKind.FREEZE_RELAY:
                out += [
                    Action(f.at, Step.FREEZE_RELAY, f.target),
                    Action(f.at + f.duration, Step.THAW_RELAY, f.target),
                ]
    # Stable sort: a zero-length death still kills before it starts.
    return sorted(out, key=lambda a: a.at)


def count_by_kind(faults: list[Fault]) -> dict[str, int]:
    counts = Counter(f.kind.value for f in faults)
    return {kind.value: counts.get(kind.value, 0) for kind in FaultKind}


@dataclass(frozen=True, slots=True)
class Aim:
    """What a fault kind is there to hit: the run counter that shows it struck at least once."""

    counter: str
    meaning: str


Aims = dict[FaultKind, tuple[Aim, ...]]


def aims_of(kinds: list[FaultKind], special: Aims) -> Aims:
    """The aims of the kinds a run schedules: ``special``'s where it has some, else "injected
    once" (a kill of a live process, a restart, a cut), so a new kind needs no entry."""
    return {
        kind: special.get(kind)
        or (Aim(kind.value, f"no {kind.value} fault was injected (its target was never up)"),)
        for kind in FaultKind
        if kind in kinds
    }


def unstruck(aims: Aims, counts: dict[str, int]) -> list[FaultKind]:
    """The kinds with an aim whose counter is still 0 (the ones to aim again)."""
    return [kind for kind, of in aims.items() if any(not counts.get(a.counter, 0) for a in of)]


def reaim(
    kind: FaultKind,
    at: float,
    rng: random.Random,
    *,
    relays: int,
    consumers: int,
    rates: Rates,
) -> Fault:
    """One more fault of ``kind`` at ``at``, for a kind that has not struck yet.

    Its target is drawn among the processes of its role (a kind named after ``relay`` or
    ``consumer``), its duration from the kind's range in ``rates``: the schedule's rules,
    applied to one fault at a time.
    """
    if "relay" in kind.value:
        target = rng.randrange(relays)
    elif "consumer" in kind.value:
        target = rng.randrange(consumers)
    else:
        target = 0
    if kind is FaultKind.CUT_BROKER:
        duration = rates.outage_seconds or rng.uniform(*rates.cut_seconds)
    elif kind is FaultKind.RESTART_POSTGRES:
        duration = 0.0
    elif kind is FaultKind.FREEZE_RELAY:
        # Twice the scheduled freeze: on a busy machine the takeover (the server ending the
        # frozen relay's sessions, then another relay's next try and its producer's start)
        # can outlast the scheduled one, which then thaws a relay that still holds its slots.
        duration = 2 * rates.freeze_seconds
    else:
        duration = rng.uniform(*rates.dead_seconds)
    return Fault(round(at, 3), kind, target, round(duration, 3))


def aim_failures(
    aims: Aims, counts: dict[str, int], reaimed: dict[str, int], extension: float
) -> list[str]:
    """One line per aim never struck, saying that the bounded extension did not help either."""
    return [
        f"fault kind {kind.value} never struck ({aim.counter}=0), not even after "
        f"{reaimed.get(kind.value, 0)} extra faults in an extension of up to {extension:.0f}s: "
        f"{aim.meaning}"
        for kind, of in aims.items()
        for aim in of
        if not counts.get(aim.counter, 0)
    ]
