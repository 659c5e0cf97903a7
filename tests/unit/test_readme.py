"""The README's numbers and commands, kept in step with the code they describe."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import typer

from consumer.config import DEFAULT_DEDUP_WINDOW
from outbox.cli.commands import app
from outbox.cli.views import SHOW_CHARS
from outbox.publish import DEFAULT_MAX_MESSAGE_BYTES

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}


def _shell_lines(text: str) -> list[str]:
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_dedup_window_default_is_the_codes() -> None:
    days = DEFAULT_DEDUP_WINDOW.days
    assert DEFAULT_DEDUP_WINDOW.total_seconds() == days * 86400
    stated = re.findall(r"default\s+(\d+)\s+days", README)
    assert stated, "the README no longer states the dedup window's default"
    assert set(map(int, stated)) == {days}, stated
    consume = typer.main.get_command(app).commands["consume"]  # type: ignore[attr-defined]
    helps = " ".join(str(getattr(p, "help", "")) for p in consume.params)
    assert f"the class's, {days * 24}" in helps


def test_limits_the_readme_states_are_the_codes() -> None:
    assert f"{DEFAULT_MAX_MESSAGE_BYTES:,} bytes" in README
    assert f"cut\n  at {SHOW_CHARS} characters" in README or f"at {SHOW_CHARS} characters" in README


def test_every_outbox_command_in_the_docs_exists() -> None:
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    used = set()
    for text in [README, *DOCS.values()]:
        for line in _shell_lines(text):
            for match in re.finditer(r"(?:^|[;&|]\s*|\bdev\.py\s+)outbox\s+([a-z][a-z-]*)", line):
                used.add(match.group(1))
    assert used, "no outbox command found in the docs' shell blocks"
    assert used <= set(commands), sorted(used - set(commands))


def test_install_instructions_name_a_checkout_or_git_and_only_real_extras() -> None:
    """The package is not on PyPI: a bare `pip install kafka-outbox` fails."""
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for text in [README, *DOCS.values()]:
        assert not re.search(r"pip install\s+\"?kafka-outbox(?!\[[^\]]*\] @)", text)
        for named in re.findall(r"pip install[^\n`]*?\[([a-z,]+)\]", text):
            assert set(named.split(",")) <= extras, named


def test_the_quick_start_sample_shows_every_row_the_demo_prints() -> None:
    import inspect

    from outbox.embedded import demo

    sample = README.split("## Quick start", 1)[1].split("```\n│", 1)[1].split("```", 1)[0]
    labels = [line.split("│")[1].strip() for line in ("│" + sample).splitlines() if "│" in line]
    source = inspect.getsource(demo._report)
    static = re.findall(r'^\s+\("([a-z][^"]+)",', source, flags=re.MULTILINE)
    static += re.findall(r'table\.add_row\("([^"{]+)"', source)
    assert static, "no row labels found in the demo's report"
    for label in static:
        assert any(shown.startswith(label) for shown in labels), f"README sample lacks {label!r}"
    assert any(shown.startswith("duplicates on the topic") for shown in labels)
