"""Running the shipped Alembic migrations: from an installed wheel or a checkout."""

from __future__ import annotations

import io
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from outbox.db import redact, sqlalchemy_url


def migrations_dir() -> Path:
    """``outbox/_migrations`` inside the wheel, else ``migrations/`` of the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("the outbox migrations are missing from this installation")


def _config(stdout: io.StringIO | None = None) -> Config:
    cfg = Config(stdout=stdout) if stdout is not None else Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def upgrade(db: str, revision: str = "head") -> None:
    """Create or upgrade the outbox tables (safe to run from several processes at once)."""
    engine = create_engine(sqlalchemy_url(db), poolclass=None)
    try:
        with engine.begin() as conn:
            cfg = _config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except OperationalError as exc:
        raise ConnectionError(
            f"migrating the outbox tables at {redact(db)}: {redact(str(exc.orig))}"
        ) from None
    finally:
        engine.dispose()


def print_sql(revision: str = "head") -> str:
    """The DDL, for teams that apply SQL by hand."""
    buf = io.StringIO()
    cfg = _config(buf)
    cfg.output_buffer = buf
    command.upgrade(cfg, revision, sql=True)
    return buf.getvalue()
