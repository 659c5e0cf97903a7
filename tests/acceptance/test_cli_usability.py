"""The ``outbox`` command as a new user meets it: one-line errors with documented exit codes,
scripting output, help at 80 columns, and the conventions of other CLIs.

Most tests run the installed ``outbox`` executable (`run`). The checks of a command's message
alone (help, usage errors, an unmigrated database) call the console script's ``main`` in this
process instead (`run_in_process`): the same parsing, messages and exit codes, without an
interpreter start per call; one case of each of them still runs the executable.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from outbox import publish, sql
from outbox.cli import errors
from outbox.cli.commands import ExitCode, main
from outbox.db import connect
from outbox.relay import SLOT_NAMESPACE
from tests.conftest import Broker, Services

OUTBOX = str(Path(sys.executable).parent / "outbox")
ENV_WITHOUT_OUTBOX = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}


def run(
    *args: str,
    columns: int = 250,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    command: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {**ENV_WITHOUT_OUTBOX, "COLUMNS": str(columns), "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [*(command or [OUTBOX]), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=full_env,
        cwd=cwd,
    )


def run_in_process(
    *args: str, columns: int = 250, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`run`, but through the console script's ``main`` in this process, in the environment
    `run` gives the executable (no ``OUTBOX_*`` of the caller's; ``COLUMNS`` sets the width as
    it does for a terminal). What the process keeps between commands is put back after it:
    the root logger's handlers (taken off first, so a command that starts logging with
    ``force=True`` does not close them) and level, and which flags came from the
    environment (``errors.ENV_SOURCED``, which later error messages read). The cyclic garbage
    collector is run before and paused during the command: garbage of earlier tests (a pooled
    connection whose database is gone) would otherwise log into the command's stderr. It runs
    again at the command's end, its output still captured: what the command itself leaked
    shows in its stderr every time, not in a later command's or never."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sourced = dict(errors.ENV_SOURCED)
    code: int | str | None = 0
    gc.collect()  # before stderr is captured: earlier tests' garbage is not the command's
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        for name in [n for n in os.environ if n.startswith("OUTBOX_")]:
            patch.delenv(name)
        for name, value in {"COLUMNS": str(columns), "NO_COLOR": "1", **(env or {})}.items():
            patch.setenv(name, value)
        collecting = gc.isenabled()
        gc.disable()
        root.handlers[:] = []
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code
        finally:
            gc.collect()  # the command's own garbage, into its own stderr and logging
            if collecting:
                gc.enable()
            root.handlers[:] = handlers
            root.setLevel(level)
            errors.ENV_SOURCED.clear()
            errors.ENV_SOURCED.update(sourced)
    assert code is None or isinstance(code, int), code
    return subprocess.CompletedProcess(["outbox", *args], code or 0, out.getvalue(), err.getvalue())


def test_a_command_run_in_process_leaves_logging_and_flag_sources_as_it_found_them(
    tmp_path: Path,
) -> None:
    handler = logging.FileHandler(tmp_path / "test.log")
    root = logging.getLogger()
    root.addHandler(handler)
    before = dict(errors.ENV_SOURCED)
    try:
        done = run_in_process(
            "relay", "--db", "postgresql://u@127.0.0.1:1/db", "-b", "127.0.0.1:1",
            env={"OUTBOX_SLOTS": "0"},
        )  # fmt: skip
        assert done.returncode != 0
        assert "OUTBOX_SLOTS=0" in done.stderr, done.stderr
        assert before == errors.ENV_SOURCED
        assert handler in root.handlers
        assert handler.stream is not None, "the command closed a handler of the test process"
    finally:
        root.removeHandler(handler)
        handler.close()


def test_a_command_run_in_process_does_not_print_what_an_earlier_tests_garbage_logs(
    unmigrated_database_url: str, services: Services
) -> None:
    """The CI flake of stop 31: a pooled connection an earlier test left checked out, whose
    database was dropped WITH (FORCE), was garbage-collected while a command ran, and SQLAlchemy's
    "Exception during reset" traceback landed in that command's stderr."""
    engine = create_engine(unmigrated_database_url)
    conn = engine.connect()
    pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with connect(services.admin_url, application_name="test") as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    cycle: dict[str, object] = {"conn": conn}
    cycle["self"] = cycle  # only the cyclic collector frees it, at a moment nobody chooses
    del conn, cycle
    done = run_in_process("dead", "list", "--db", unmigrated_database_url)
    assert done.returncode == ExitCode.NOT_MIGRATED
    assert "run `outbox migrate" in one_line_error(done)
    engine.dispose()


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr, ``error: ...``, and no traceback."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    return lines[0]


def _dead_row(engine: Engine, database_url: str, topic: str) -> int:
    """A poison row moved aside the way the relay does it (the same statement)."""
    with Session(engine) as session, session.begin():
        publish(
            session,
            topic=topic,
            key="k",
            value={"order": 1, "note": "x" * 300},
            headers={"event-type": "OrderPlaced"},
        )
    with engine.connect() as conn:
        row_id = int(conn.execute(text("SELECT max(id) FROM outbox_events")).scalar_one())
    with connect(database_url, application_name="test") as conn:
        error = "Broker: Message size too large: the record is above message.max.bytes=2000 " * 3
        conn.execute(sql.MOVE_TO_DEAD, {"id": row_id, "error": error})
    return row_id


# -- 1. failures: one line, a documented exit code ------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "--json"),
        ("dead", "list"),
        ("dead", "show", "1"),
        ("dead", "requeue", "--all"),
        ("dead", "requeue", "1"),
        ("dead", "discard", "1"),
        ("identity", "renew"),
    ],
)
def test_unmigrated_database_says_run_outbox_migrate(
    unmigrated_database_url: str, args: tuple[str, ...]
) -> None:
    runner = run if args == ("status",) else run_in_process  # `status` through the executable
    done = runner(*args, "--db", unmigrated_database_url)
    assert done.returncode == ExitCode.NOT_MIGRATED
    assert "run `outbox migrate" in one_line_error(done)


def test_unreachable_server_fails_in_one_line_with_its_own_code() -> None:
    done = run("status", "--db", "postgresql+psycopg://app:pw@127.0.0.1:1/app")
    assert done.returncode == ExitCode.UNAVAILABLE
    assert "cannot connect to PostgreSQL" in one_line_error(done)


@pytest.mark.parametrize(
    ("args", "env", "named", "not_named"),
    [
        (["--log-level", "foo"], {}, "--log-level", "Traceback"),
        (["--log-level", "info"], {"OUTBOX_LOG_FORMAT": "yaml"}, "OUTBOX_LOG_FORMAT", "--log-"),
        (["--metrics-port", "99999"], {}, "--metrics-port", "OUTBOX_METRICS_PORT"),
        (["--slots", "0"], {}, "--slots", "--processes"),
        (["--slots", "0"], {}, "--slots", "OUTBOX_SLOTS"),
        ([], {"OUTBOX_SLOTS": "0"}, "OUTBOX_SLOTS", "--slots"),
        (["--slots", "2", "--processes", "3"], {}, "--processes=3 must be at most --slots=2", ""),
        (["--processes", "3"], {"OUTBOX_SLOTS": "2"}, "at most OUTBOX_SLOTS=2", "--slots"),
        (["--batch-size", "0"], {}, "--batch-size", "OUTBOX_BATCH_SIZE"),
        (["--poll-interval", "nan"], {}, "--poll-interval=nan", "OUTBOX_POLL_INTERVAL"),
        ([], {"OUTBOX_POLL_INTERVAL": "inf"}, "OUTBOX_POLL_INTERVAL=inf", "--poll-interval"),
        (["--missing-topic-timeout", "nan"], {}, "--missing-topic-timeout=nan", ""),
        (["--missing-topic-timeout", "inf"], {}, "--missing-topic-timeout=inf", ""),
        (["--slots", "0", "--processes", "2"], {}, "--slots=0", "--processes"),
    ],
)
def test_invalid_option_values_fail_in_one_line_naming_where_the_value_came_from(
    args: list[str], env: dict[str, str], named: str, not_named: str
) -> None:
    # The first case through the executable: a traceback there would be one a user sees.
    runner = run if args == ["--log-level", "foo"] else run_in_process
    done = runner(
        "relay", "--db", "postgresql://u@127.0.0.1:1/x", "-b", "127.0.0.1:1", *args, env=env
    )
    assert done.returncode == ExitCode.USAGE
    line = one_line_error(done)
    assert named in line
    if not_named:
        assert not_named not in line


def test_missing_required_option_names_the_flag_and_its_env_var() -> None:
    done = run_in_process("relay", "-b", "127.0.0.1:1")
    assert done.returncode == ExitCode.USAGE
    line = one_line_error(done)
    assert "--db" in line
    assert "OUTBOX_DB" in line


def test_consumer_module_whose_own_import_fails_gets_the_real_error(tmp_path: Path) -> None:
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "projector.py").write_text(
        "import shop.settings_missing_dependency_xyz\n", encoding="utf-8"
    )
    done = run(
        "consume",
        "shop.projector:Projector",
        "--db",
        "postgresql://u@127.0.0.1:1/x",
        "-b",
        "127.0.0.1:1",
        cwd=tmp_path,
    )
    assert done.returncode == ExitCode.USAGE
    line = one_line_error(done)
    assert "No module named 'shop.settings_missing_dependency_xyz'" in line
    assert "projector.py:1" in line
    assert "run from the directory" not in line


# -- 2. operations and scripting ------------------------------------------------------------


def test_migrate_says_what_it_applied_then_that_nothing_was_left(
    unmigrated_database_url: str,
) -> None:
    first = run("migrate", "--db", unmigrated_database_url)
    assert first.returncode == ExitCode.OK, first.stderr
    assert "applied 0001: Outbox and dead-row tables." in first.stdout
    assert "applied 0002" in first.stdout
    again = run("migrate", "--db", unmigrated_database_url)
    assert again.returncode == ExitCode.OK
    assert "applied" not in again.stdout.replace("nothing applied", "")
    assert "already up to date" in again.stdout


def test_sql_prints_the_ddl_between_two_revisions() -> None:
    between = run("sql", "--from", "0001", "--to", "0002")
    assert between.returncode == ExitCode.OK, between.stderr
    assert "CREATE TABLE outbox_processed_events" in between.stdout
    assert "CREATE TABLE outbox_events" not in between.stdout
    first = run("sql", "--to", "0001")
    assert "CREATE TABLE outbox_events" in first.stdout
    assert "outbox_processed_events" not in first.stdout
    bad = run("sql", "--from", "0009")
    assert bad.returncode == ExitCode.USAGE
    assert "--from '0009'" in one_line_error(bad)


def test_status_json_and_check_fail_on_dead_rows(
    engine: Engine, database_url: str, topic: str
) -> None:
    clean = run("status", "--db", database_url, "--check")
    assert clean.returncode == ExitCode.OK, clean.stderr
    row_id = _dead_row(engine, database_url, topic)
    shown = run("status", "--db", database_url, "--json")
    assert shown.returncode == ExitCode.OK  # no --check: only reports
    report = json.loads(shown.stdout)
    assert report["dead_rows"] == 1
    assert report["pending"] == []
    checked = run("status", "--db", database_url, "--check", "--json")
    assert checked.returncode == ExitCode.FAILED
    assert json.loads(checked.stdout)["problems"][0].startswith("1 dead rows")
    assert "1 dead rows" in one_line_error(checked)
    assert run("dead", "discard", str(row_id), "--db", database_url).returncode == ExitCode.OK
    assert run("status", "--db", database_url, "--check").returncode == ExitCode.OK


def test_status_check_prints_one_line_for_cron(
    engine: Engine, database_url: str, topic: str
) -> None:
    clean = run("status", "--db", database_url, "--check")
    assert clean.returncode == ExitCode.OK, clean.stderr
    [line] = clean.stdout.strip().splitlines()
    assert line.startswith("ok: 0 pending")
    assert "0 dead rows" in line
    assert clean.stderr == ""
    _dead_row(engine, database_url, topic)
    failed = run("status", "--db", database_url, "--check")
    assert failed.returncode == ExitCode.FAILED
    assert failed.stdout == ""
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "1 dead rows" in one_line_error(failed)


def test_status_check_fails_on_lag_above_the_threshold(
    engine: Engine, database_url: str, topic: str
) -> None:
    with Session(engine) as session, session.begin():
        publish(session, topic=topic, key="k", value={"n": 1})
    ok = run("status", "--db", database_url, "--check", "--max-lag", "3600")
    assert ok.returncode == ExitCode.OK, ok.stderr
    lagging = run("status", "--db", database_url, "--max-lag", "0")
    assert lagging.returncode == ExitCode.FAILED
    assert "above --max-lag 0" in one_line_error(lagging)
    report = json.loads(run("status", "--db", database_url, "--json").stdout)
    assert report["pending"][0]["topic"] == topic
    assert report["pending_total"] == 1


def test_dead_rows_listed_in_80_columns_shown_whole_and_discarded(
    engine: Engine, database_url: str, topic: str
) -> None:
    row_id = _dead_row(engine, database_url, topic)
    listed = run("dead", "list", "--db", database_url, columns=80)
    assert listed.returncode == ExitCode.OK, listed.stderr
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80, listed.stdout
    assert str(row_id) in listed.stdout
    rows = json.loads(run("dead", "list", "--db", database_url, "--json").stdout)
    assert [r["id"] for r in rows] == [row_id]
    assert "message.max.bytes=2000" in rows[0]["error"]
    shown = run("dead", "show", str(row_id), "--db", database_url)
    assert shown.returncode == ExitCode.OK
    assert rows[0]["event_id"] in shown.stdout
    assert "header event-type: OrderPlaced" in shown.stdout
    assert '"order": 1' in shown.stdout  # the JSON value, pretty-printed
    whole = json.loads(run("dead", "show", str(row_id), "--db", database_url, "--json").stdout)
    assert json.loads(whole["value"]["data"])["order"] == 1
    missing = run("dead", "discard", str(row_id), "999", "--db", database_url)
    assert missing.returncode == ExitCode.NOT_FOUND
    assert "no dead row with id 999" in one_line_error(missing)
    assert len(json.loads(run("dead", "list", "--db", database_url, "--json").stdout)) == 1
    done = run("dead", "discard", str(row_id), "--db", database_url)
    assert done.stdout.strip() == "discarded 1 rows"
    assert json.loads(run("dead", "list", "--db", database_url, "--json").stdout) == []
    with engine.connect() as conn:  # discarded for good, not re-queued
        assert conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one() == 0


def test_requeue_of_a_missing_id_is_an_error_and_changes_nothing(
    engine: Engine, database_url: str, topic: str
) -> None:
    row_id = _dead_row(engine, database_url, topic)
    done = run("dead", "requeue", str(row_id), "999", "--db", database_url)
    assert done.returncode == ExitCode.NOT_FOUND
    assert "no dead row with id 999" in one_line_error(done)
    shown = run("dead", "show", "999", "--db", database_url)
    assert shown.returncode == ExitCode.NOT_FOUND
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one() == 0
    ok = run("dead", "requeue", str(row_id), "--db", database_url)
    assert ok.stdout.strip() == "re-queued 1 rows"


# -- 3. help, version, completion -----------------------------------------------------------

COMMANDS = [
    [],
    ["migrate"],
    ["sql"],
    ["relay"],
    ["status"],
    ["demo"],
    ["dev"],
    ["consume"],
    ["dead"],
    ["dead", "list"],
    ["dead", "show"],
    ["dead", "requeue"],
    ["dead", "discard"],
    ["identity"],
    ["identity", "renew"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "outbox")
def test_help_is_readable_at_80_columns(command: list[str]) -> None:
    runner = run_in_process if command else run  # `outbox -h` through the executable
    done = runner(*command, "-h", columns=80)
    assert done.returncode == ExitCode.OK, done.stderr
    out = done.stdout
    lines = out.splitlines()
    assert "…" not in out
    cut = [line for line in lines if line.endswith("...") and not line.startswith("Usage:")]
    assert not cut, f"a description was cut: {cut}"
    assert max(len(line) for line in lines) <= 80
    assert not re.search(r"\(I\d+\)", out), "invariant numbers are not for users"
    options = out.split("Options:", 1)[1].split("\nCommands:", 1)[0]
    for placeholder in ("<bool>", "list[str]", "<str>"):
        assert placeholder not in options
    for name in re.findall(r"OUTBOX_[A-Z_]*", out):  # never cut at the line end
        assert not name.endswith("_"), f"{name} is cut"
    for entry in re.split(r"\n(?=  -)", options.strip("\n")):
        declaration, _, description = entry.strip().partition("  ")
        assert description.strip(), f"{declaration} has no description"


def test_relay_help_describes_every_option_with_a_placeholder() -> None:
    out = run_in_process("relay", "--help", columns=80).stdout
    assert "--batch-size N" in out
    assert "Most events per Kafka transaction." in out
    assert "--transactional-id-prefix PREFIX" in out
    assert "-X KEY=VALUE" in out
    assert "OUTBOX_BOOTSTRAP_SERVERS" in out
    assert "OUTBOX_TRANSACTIONAL_ID_PREFIX" in out
    listed = run_in_process("dead", "list", "-h", columns=80).stdout
    assert "--limit N" in listed
    assert "newest first" in listed


def test_version_short_help_python_m_and_completion() -> None:
    version = run("--version")
    assert version.returncode == ExitCode.OK
    assert re.fullmatch(r"outbox \(kafka-outbox\) \d+\.\d+\.\S+\n", version.stdout)
    module = run("--version", command=[sys.executable, "-m", "outbox"])
    assert module.stdout == version.stdout
    assert "Usage: outbox status" in run("status", "-h").stdout
    completion = run(
        env={"_OUTBOX_COMPLETE": "complete_bash", "COMP_WORDS": "outbox de", "COMP_CWORD": "1"}
    )
    assert set(completion.stdout.split()) == {"dead", "demo", "dev"}
    # Typer's own switch to name the shell instead of detecting it from the parent process.
    script = run(
        "--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    )
    assert "_OUTBOX_COMPLETE" in script.stdout


def test_exit_codes_are_listed_in_the_cli_reference() -> None:
    page = (Path(__file__).parents[2] / "docs" / "reference" / "cli.md").read_text()
    section = page.split("## Exit codes", 1)[1].split("\n#", 1)[0]
    for code in ExitCode:
        assert f"| {code.value} |" in section, f"exit code {code.value} ({code.name}) undocumented"


def test_consume_on_an_unmigrated_database_says_run_outbox_migrate(
    unmigrated_database_url: str, bootstrap_servers: str
) -> None:
    done = run(
        "consume",
        "examples.order_projector:OrderProjector",
        "--db",
        unmigrated_database_url,
        "-b",
        bootstrap_servers,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == ExitCode.NOT_MIGRATED
    assert "run `outbox migrate" in one_line_error(done)


def test_relay_on_an_unmigrated_database_says_run_outbox_migrate(
    unmigrated_database_url: str, bootstrap_servers: str
) -> None:
    done = run("relay", "--db", unmigrated_database_url, "-b", bootstrap_servers, "--once")
    assert done.returncode == ExitCode.NOT_MIGRATED, done.stderr
    assert "run `outbox migrate" in one_line_error(done)


# -- 5. the demo's latency --------------------------------------------------------------------


@pytest.mark.both_brokers
def test_demo_measures_latency_at_a_steady_rate_after_the_burst_and_labels_it(
    database_url: str, broker: Broker
) -> None:
    # --broker kafka on the Kafka cluster: the demo then also requires 0 duplicates on the topic.
    kind = ["--broker", "kafka"] if broker.name == "kafka" else []
    done = run(
        "demo",
        "--db",
        database_url,
        "--bootstrap-servers",
        broker.bootstrap_servers,
        *kind,
        "--events",
        "200",
        "--writers",
        "2",
        "--no-crash-relay",
        "--steady-rate",
        "20",
        "--steady-seconds",
        "1",
        columns=120,
    )
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert "latency commit -> handler at a steady 20 events/s p50" in done.stdout
    assert "queueing of the 200-event burst (not the steady latency) p99" in done.stdout
    assert "transactions committed (events)" in done.stdout


# -- identity: a copied database gets its own -------------------------------------------------


def _status_id(database_url: str) -> str:
    done = run("status", "--json", "--db", database_url)
    assert done.returncode == ExitCode.OK, done.stderr
    return str(json.loads(done.stdout)["outbox_id"])


def test_i9_identity_renew_gives_the_database_a_new_identity_and_keeps_pending_rows(
    engine: Engine, database_url: str
) -> None:
    with Session(engine) as session, session.begin():
        publish(session, topic="orders", key="k", value={"n": 1})
    before = _status_id(database_url)
    done = run("identity", "renew", "--db", database_url)
    assert done.returncode == ExitCode.OK, done.stderr
    after = _status_id(database_url)
    assert after != before
    assert done.stdout.strip() == f"outbox identity renewed: {before} -> {after}"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one() == 1
        assert conn.execute(text("SELECT slot_count FROM outbox_identity")).scalar_one() is None


def test_i9_identity_renew_is_refused_while_a_relay_of_the_database_runs(
    database_url: str,
) -> None:
    """A running relay keeps its transactional ids until it restarts: renewing under it would
    change nothing but the status output. A relay is seen by the slot lock it holds."""
    before = _status_id(database_url)
    with connect(database_url, application_name="outbox-relay") as relay_session:
        relay_session.execute("SELECT pg_advisory_lock(%s, 0)", (SLOT_NAMESPACE,))
        done = run("identity", "renew", "--db", database_url)
    assert done.returncode == ExitCode.USAGE
    assert "stop them first" in one_line_error(done)
    assert _status_id(database_url) == before
