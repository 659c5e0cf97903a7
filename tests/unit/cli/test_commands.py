"""The CLI's pure decisions: exit codes, naming where a value came from, status checks,
the demo's latency labels, migration reports and the consumer loader's diagnosis."""

from __future__ import annotations

import pytest

from consumer.loader import _is_the_module_itself
from outbox.cli.commands import ExitCode, exit_code_for, name_sources
from outbox.cli.views import status_problems
from outbox.embedded.demo import latency_rows
from outbox.errors import (
    ConfigError,
    NotFound,
    NotMigrated,
    OutboxError,
    SlotLost,
    TransientError,
)
from outbox.migrate import head, revisions_between


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotMigrated("relation outbox_events does not exist"), ExitCode.NOT_MIGRATED),
        (NotFound("no dead row with id 9"), ExitCode.NOT_FOUND),
        (ConfigError("--slots=0"), ExitCode.USAGE),
        (ConnectionError("cannot connect"), ExitCode.UNAVAILABLE),
        (TransientError("broker down"), ExitCode.UNAVAILABLE),
        (SlotLost("slot 1"), ExitCode.FAILED),
        (OutboxError("anything else"), ExitCode.FAILED),
        (RuntimeError("a bug"), ExitCode.FAILED),
    ],
)
def test_each_error_kind_has_its_documented_exit_code(error: Exception, code: ExitCode) -> None:
    assert exit_code_for(error) is code


def test_exit_codes_are_distinct_and_only_ok_is_zero() -> None:
    values = [c.value for c in ExitCode]
    assert len(set(values)) == len(values)
    assert [c for c in ExitCode if c.value == 0] == [ExitCode.OK]


@pytest.mark.parametrize(
    ("message", "from_env", "expected"),
    [
        ("--slots=0 must be between 1 and 32", {"--slots": "OUTBOX_SLOTS"}, "OUTBOX_SLOTS=0 must"),
        ("--slots=0 must be between 1 and 32", {}, "--slots=0 must"),
        (
            "--processes=5 must be at most --slots=4",
            {"--slots": "OUTBOX_SLOTS"},
            "--processes=5 must be at most OUTBOX_SLOTS=4",
        ),
        ("--max-slots=0 must be at least 1", {"--slots": "OUTBOX_SLOTS"}, "--max-slots=0"),
        ("--slots-file x", {"--slots": "OUTBOX_SLOTS"}, "--slots-file x"),
    ],
)
def test_an_error_names_the_env_var_only_for_values_from_the_env(
    message: str, from_env: dict[str, str], expected: str
) -> None:
    assert expected in name_sources(message, from_env)


def _report(dead: int = 0, oldest: float = 0.0) -> dict[str, object]:
    return {"dead_rows": dead, "oldest_age_s": oldest, "pending": [], "slots": []}


@pytest.mark.parametrize(
    ("dead", "oldest", "max_lag", "problems"),
    [
        (0, 0.0, None, []),
        (0, 500.0, None, []),  # lag counts only with a threshold
        (2, 0.0, None, ["2 dead rows"]),
        (0, 61.0, 60.0, ["above --max-lag 60"]),
        (0, 60.0, 60.0, []),  # at the threshold is fine
        (1, 61.0, 60.0, ["1 dead rows", "above --max-lag 60"]),
    ],
)
def test_status_check_fails_on_dead_rows_and_lag_above_the_threshold(
    dead: int, oldest: float, max_lag: float | None, problems: list[str]
) -> None:
    found = status_problems(_report(dead, oldest), max_lag=max_lag)
    assert len(found) == len(problems)
    for text, expected in zip(found, problems, strict=True):
        assert expected in text


def test_demo_labels_the_steady_latency_apart_from_the_bursts_queue() -> None:
    rows = latency_rows({"burst": [2.0, 3.0], "steady": [0.01, 0.02]}, burst=3000, steady_rate=50)
    labels = [label for label, _ in rows]
    assert labels == [
        "latency commit -> handler at a steady 50 events/s",
        "queueing of the 3000-event burst (not the steady latency)",
    ]
    assert rows[0][1] == (0.02, 0.02)
    assert latency_rows({"burst": [1.0]}, burst=10, steady_rate=0)[0][0].startswith("queueing")


def test_migrate_reports_the_revisions_between_two_states() -> None:
    everything = [r.id for r in revisions_between(None, head())]
    assert everything[:2] == ["0001", "0002"]
    assert everything[-1] == head()
    assert [r.id for r in revisions_between("0001", "0002")] == ["0002"]
    assert revisions_between("0002", "0002") == []
    assert revisions_between(None, "0001")[0].title == "Outbox and dead-row tables."


@pytest.mark.parametrize(
    ("missing", "module", "itself"),
    [
        ("shop", "shop.projector", True),
        ("shop.projector", "shop.projector", True),
        ("requests", "shop.projector", False),  # the module's own import
        ("shop.settings", "shop.projector", False),
    ],
)
def test_a_missing_module_is_told_apart_from_a_missing_dependency(
    missing: str, module: str, itself: bool
) -> None:
    error = ModuleNotFoundError(f"No module named {missing!r}", name=missing)
    assert _is_the_module_itself(error, module) is itself


def test_values_from_the_environment_are_told_apart_from_flags_given_on_the_command_line() -> None:
    import typer

    from outbox.cli.commands import app, env_sourced_flags

    command = typer.main.get_command(app)
    environ = {"OUTBOX_DB": "postgresql://x", "OUTBOX_SLOTS": "4", "OUTBOX_DEMO_DB": "y"}
    relay = env_sourced_flags(command, ["relay", "--slots", "2"], environ)
    assert relay["--db"] == "OUTBOX_DB"
    assert "--slots" not in relay  # given on the command line: the flag is named
    assert "--db" not in env_sourced_flags(command, ["relay", "--db=postgresql://z"], environ)
    assert env_sourced_flags(command, ["dead", "list"], environ) == {"--db": "OUTBOX_DB"}
    assert "--db" in env_sourced_flags(command, ["demo"], environ)  # OUTBOX_DEMO_DB's --db
    assert env_sourced_flags(command, ["demo"], environ)["--db"] == "OUTBOX_DEMO_DB"


def test_the_cli_imports_nothing_private_of_typer() -> None:
    """typer vendors click privately (typer._click); its layout may change in any release."""
    from pathlib import Path

    import outbox.cli

    for source in Path(outbox.cli.__file__).parent.glob("*.py"):
        assert "typer._click" not in source.read_text(), source


@pytest.mark.parametrize("topic", ["a[/b]", "t[bold]x", "[red]"])
def test_i6_dead_list_and_status_print_any_topic_a_sql_writer_stored_verbatim(topic: str) -> None:
    """Topic names and errors come from rows another writer made: never read as markup."""
    from outbox.cli.views import render_dead, render_status

    dead = render_dead(
        [
            {
                "id": 1,
                "topic": topic,
                "value_bytes": 3,
                "attempts": 1,
                "failed_at": None,
                "error": f"TOPIC_EXCEPTION [/x] {topic}",
            }
        ]
    )
    assert topic in dead
    assert "[/x]" in dead
    status = render_status(
        {
            "outbox_id": None,
            "pending": [{"topic": topic, "pending": 1, "oldest_age_s": 0.5}],
            "slots": [],
            "dead_rows": 0,
        }
    )
    assert topic in status


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--max-lag", "inf"],
        ["demo", "--steady-rate", "inf"],
        ["demo", "--steady-seconds", "inf"],
    ],
)
def test_i8_cli_only_seconds_and_rates_must_be_finite(args: list[str]) -> None:
    """Infinity passes a range with no upper bound."""
    from typer.testing import CliRunner

    from outbox.cli.commands import app

    result = CliRunner().invoke(app, [*args, "--db", "postgresql://u@127.0.0.1:1/x"])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert f"Invalid value for '{args[1]}'" in result.output
