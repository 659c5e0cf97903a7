"""The numbers and commands of the README and the docs pages, kept in step with the code they
describe; and the README kept to one screen that links to pages that exist."""

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
DOCS = {
    str(p.relative_to(ROOT / "docs")): p.read_text()
    for p in (ROOT / "docs").rglob("*.md")
    if "__pycache__" not in p.parts
}
SHELL_FILES = {
    str(p.relative_to(ROOT / "docs")): p.read_text() for p in (ROOT / "docs").rglob("*.sh")
}


def _shell_lines(text: str) -> list[str]:
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_dedup_window_default_is_the_codes() -> None:
    days = DEFAULT_DEDUP_WINDOW.days
    assert DEFAULT_DEDUP_WINDOW.total_seconds() == days * 86400
    for page in ("consumer.md", "operations.md"):
        stated = re.findall(r"default\s+(\d+)\s+days", DOCS[page])
        assert stated, f"docs/{page} no longer states the dedup window's default"
        assert set(map(int, stated)) == {days}, (page, stated)
    consume = typer.main.get_command(app).commands["consume"]  # type: ignore[attr-defined]
    helps = " ".join(str(getattr(p, "help", "")) for p in consume.params)
    assert f"the class's, {days * 24}" in helps


def test_limits_the_docs_state_are_the_codes() -> None:
    assert f"{DEFAULT_MAX_MESSAGE_BYTES:,} bytes" in DOCS["publishing.md"]
    assert f"{DEFAULT_MAX_MESSAGE_BYTES:,} bytes" in DOCS["dead-rows.md"]
    assert re.search(rf"cut\s+at {SHOW_CHARS} characters", DOCS["operations.md"])


def test_every_outbox_command_in_the_docs_exists() -> None:
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    used = set()
    texts = [README, *DOCS.values(), *(f"```sh\n{t}```" for t in SHELL_FILES.values())]
    for text in texts:
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
    for text in [README, *DOCS.values(), *SHELL_FILES.values()]:
        assert not re.search(r"pip install\s+\"?kafka-outbox(?!\[[^\]]*\] @)", text)
        for named in re.findall(r"pip install[^\n`]*?\[([a-z,]+)\]", text):
            assert set(named.split(",")) <= extras, named


def test_the_demo_page_sample_shows_every_row_the_demo_prints() -> None:
    import inspect

    from outbox.embedded import demo

    sample = DOCS["demo.md"].split("```\n│", 1)[1].split("```", 1)[0]
    labels = [line.split("│")[1].strip() for line in ("│" + sample).splitlines() if "│" in line]
    source = inspect.getsource(demo._report)
    static = re.findall(r'^\s+\("([a-z][^"]+)",', source, flags=re.MULTILINE)
    static += re.findall(r'table\.add_row\("([^"{]+)"', source)
    assert static, "no row labels found in the demo's report"
    for label in static:
        assert any(shown.startswith(label) for shown in labels), f"docs/demo.md lacks {label!r}"
    assert any(shown.startswith("duplicates on the topic") for shown in labels)


def test_the_readme_is_one_screen_with_the_quick_start_and_links_that_resolve() -> None:
    assert len(README.splitlines()) <= 70, "the README is a newcomer's one screen: move detail"
    quick = _shell_lines(README.split("## Quick start", 1)[1].split("\n## ", 1)[0])
    assert [line.split("#")[0].strip() for line in quick] == [
        "python3 dev.py demo",
        "python3 dev.py test",
    ]
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links
    for link in links:
        assert (ROOT / link).exists(), f"README links to a missing {link}"


def test_every_docs_page_is_on_the_site() -> None:
    """A page outside the nav is a warning, hence a failed `mkdocs build --strict`; this names it
    without building."""
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1]
    listed = set(re.findall(r":\s+(\S+\.md)\s*$", nav, flags=re.MULTILINE))
    assert set(DOCS) == listed, set(DOCS) ^ listed
