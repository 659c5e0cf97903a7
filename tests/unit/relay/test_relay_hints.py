"""Every fix the relay suggests names only options the real ``outbox relay`` has (I8): an
operator who follows a hint must not meet "no such option"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

import outbox.relay
from outbox.cli.commands import app
from outbox.relay.classify import CONFIG_FIXES, config_fix

FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]+|-X)\b")


def _relay_options() -> set[str]:
    command = typer.main.get_command(app)
    assert isinstance(command, typer.core.TyperGroup)
    relay = command.commands["relay"]
    return {opt for param in relay.params for opt in (*param.opts, *param.secondary_opts)}


def test_i8_every_hint_of_the_error_table_names_only_flags_the_relay_has() -> None:
    options = _relay_options()
    hints = [*CONFIG_FIXES.values(), config_fix(_UnknownError())]
    named = {flag for hint in hints for flag in FLAG.findall(hint)}
    assert named, "the hints name no flag at all: the pattern is wrong"
    assert named <= options, f"hints name flags the relay lacks: {sorted(named - options)}"


@pytest.mark.parametrize(
    "source", sorted(Path(outbox.relay.__file__).parent.glob("*.py")), ids=lambda p: p.name
)
def test_i8_every_flag_the_relays_messages_name_exists(source: Path) -> None:
    """Refusals, warnings and fence explanations name flags too (e.g. the transaction timeout
    is ``-X transaction.timeout.ms``: there is no ``--transaction-timeout``)."""
    named = set(FLAG.findall(source.read_text()))
    assert named <= _relay_options(), f"{source.name} names {sorted(named - _relay_options())}"


class _UnknownError:
    """An error the table has no fix for: the default hint."""

    def code(self) -> int:
        return -1

    def name(self) -> str:
        return "UNKNOWN"

    def str(self) -> str:
        return "unknown"


def test_i12_every_wait_reads_the_producers_transaction_timeout() -> None:
    """One source of truth: the producer's ``transaction.timeout.ms`` (``ProducerPlan``), which
    ``-X`` can set; ``RelayConfig.transaction_timeout`` is only its default. A worker waiting
    60 s on a transaction the broker aborted at 30 s read the other one."""
    package = Path(outbox.relay.__file__).parent
    readers = [
        p.name
        for p in package.glob("*.py")
        if p.name != "config.py" and "config.transaction_timeout" in p.read_text()
    ]
    assert readers == []
