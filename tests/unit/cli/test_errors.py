"""I8: every command's errors end in one line with a documented exit code, through one handler;
a defect keeps its traceback."""

from __future__ import annotations

import pytest
import typer

from outbox.cli.errors import ENV_SOURCED, ExitCode, reported
from outbox.errors import ConfigError, NotMigrated


def _raising(exc: BaseException) -> None:
    raise exc


def test_i8_a_command_error_is_one_line_with_its_exit_code_and_no_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    command = reported(_raising)
    with pytest.raises(typer.Exit) as stopped:
        command(NotMigrated("postgresql://app:s3cret@db/app:\n run `outbox migrate`"))
    assert stopped.value.exit_code == ExitCode.NOT_MIGRATED
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: ")
    assert "s3cret" not in err


def test_i8_the_error_names_the_environment_variable_a_value_came_from(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ENV_SOURCED, "--slots", "OUTBOX_SLOTS")
    with pytest.raises(typer.Exit) as stopped:
        reported(_raising)(ConfigError("--slots=0 must be between 1 and 32"))
    assert stopped.value.exit_code == ExitCode.USAGE
    assert capsys.readouterr().err == "error: OUTBOX_SLOTS=0 must be between 1 and 32\n"


def test_a_defect_keeps_its_traceback_unless_the_command_reports_it_too() -> None:
    with pytest.raises(KeyError):
        reported(_raising)(KeyError("a bug"))
    with pytest.raises(typer.Exit) as stopped:
        reported(_raising, also=(KeyError,))(KeyError("expected here"))
    assert stopped.value.exit_code == ExitCode.FAILED


def test_a_commands_own_exit_code_passes_even_when_every_exception_is_reported() -> None:
    with pytest.raises(typer.Exit) as stopped:
        reported(_raising, also=(Exception,))(typer.Exit(ExitCode.FAILED))
    assert stopped.value.exit_code == ExitCode.FAILED


def test_i8_every_cli_module_reports_errors_through_the_one_handler() -> None:
    """No command prints its own ``error:`` line: ``errors.report`` is the only writer."""
    import re
    from pathlib import Path

    import outbox.cli

    for source in Path(outbox.cli.__file__).parent.glob("*.py"):
        if source.name != "errors.py":
            assert not re.search(r"echo\(f?\"error: ", source.read_text()), source
