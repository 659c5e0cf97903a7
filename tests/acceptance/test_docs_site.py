"""The documentation site: built with warnings as errors, its generated pages complete, and the
tutorial's code blocks the very files the tutorial test runs."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from outbox.cli.commands import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mkdocs build --strict` of the repository's mkdocs.yml into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"mkdocs build --strict: {took:.1f} s")
    return out


def _text(page: Path) -> str:
    """A built page's text, without tags (what a reader sees, roughly)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_the_site_builds_with_warnings_as_errors(site: Path) -> None:
    for page in ("index", "tutorial/index", "concepts/index", "reference/cli/index"):
        name = f"{page}.html" if page == "index" else f"{page}.html".replace("/index.html", "/")
        built = site / name if name.endswith(".html") else site / name / "index.html"
        assert built.is_file(), f"{built} missing"


def test_the_cli_reference_documents_every_command_and_option(site: Path) -> None:
    """Generated from the commands: a command or option added to the CLI appears on its own."""
    reference = _text(site / "reference" / "cli" / "index.html")
    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        assert f"outbox {name}" in reference, name
        subcommands = getattr(command, "commands", {})
        for sub in subcommands:
            assert f"outbox {name} {sub}" in reference, (name, sub)
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in reference, (name, opt)
    assert "outbox-&lt;12 hex digits" in (site / "reference" / "cli" / "index.html").read_text()


def test_the_api_reference_shows_the_public_api_from_its_docstrings(site: Path) -> None:
    import consumer
    import outbox

    page = (site / "reference" / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="([A-Za-z_][\w.]*)"', page))
    for module in (outbox, consumer):
        for name in module.__all__:
            assert any(a.endswith(f".{name}") for a in anchors), f"{module.__name__}.{name}"
    for helper in (
        "outbox.testing.published",
        "outbox.migrate.upgrade",
        "consumer.testing.deliver",
    ):
        assert helper in anchors, helper
    assert "Subclass IdempotentConsumer" in _text(site / "reference" / "api" / "index.html")


def test_every_code_block_of_the_tutorial_is_a_file_its_test_runs() -> None:
    """Each fenced block of tutorial.md includes a file under docs/tutorial/ (so the page shows
    what tests/acceptance/test_tutorial.py runs), and every such file is on the page."""
    page = (DOCS / "tutorial.md").read_text()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", page, flags=re.DOTALL | re.MULTILINE)
    included: list[str] = []
    for block in blocks:
        if block.strip().startswith("shop/__init__.py"):  # the project's layout, not code
            continue
        match = re.fullmatch(r'--8<-- "tutorial/([^"]+)"\n', block)
        assert match, f"a tutorial code block is not an included file:\n{block}"
        included.append(match.group(1))
    files = {
        str(p.relative_to(DOCS / "tutorial"))
        for p in (DOCS / "tutorial").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name != "__init__.py"
    }
    assert sorted(included) == sorted(files)


def test_the_tutorial_page_shows_the_files_themselves(site: Path) -> None:
    built = _text(site / "tutorial" / "index.html")
    assert "--8<--" not in built
    assert "async def handle(self, session: AsyncSession, event: Event)" in built
