"""MkDocs hook: the command-line reference, generated from the `outbox` commands at build time.

Typer's own Markdown generator (`typer ... utils docs`) writes it, run in-process so that a
command that fails to load fails the build instead of leaving the page empty. The help texts
are plain text: angle brackets in them (`outbox-<12 hex digits>`) are escaped, not HTML.
"""

from __future__ import annotations

import html
import re
from typing import Any

import typer
from typer.cli import get_docs_for_click

MARKER = "<!-- outbox-cli-reference -->"
_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.DOTALL)


def _escape_outside_code(text: str) -> str:
    parts = _CODE.split(text)
    return "".join(p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts))


def reference() -> str:
    """The Markdown reference of every `outbox` command, one heading per command."""
    from outbox.cli.commands import app

    command = typer.main.get_command(app)
    with typer.Context(command, info_name="outbox") as ctx:
        text = get_docs_for_click(obj=command, ctx=ctx, indent=1, name="outbox")
    return _escape_outside_code(text)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference())
