"""Finding a consumer class by ``package.module:ClassName``, for ``outbox consume``."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from consumer.consumer import IdempotentConsumer
from outbox.errors import ConfigError


def load_consumer_class(path: str) -> type[IdempotentConsumer]:
    """Import ``module:Class`` and check that it is an ``IdempotentConsumer`` subclass (I8).

    The current directory is importable, as for ``python -m``, so an
    application's own package works without installing it.
    """
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"{path!r} is not module:Class; pass e.g. mypkg.projector:OrderProjector")
    cwd = os.getcwd()
    _refuse_shadowing(module_name, Path(cwd))
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not _is_the_module_itself(exc, module_name):
            raise ConfigError(_failed_import(module_name, exc)) from None
        raise ConfigError(
            f"cannot import module {module_name!r} for {path!r}: {exc}; run from the directory "
            "that contains the package, or install it"
        ) from None
    except Exception as exc:  # the module exists but its own code failed
        raise ConfigError(_failed_import(module_name, exc)) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, IdempotentConsumer)):
        raise ConfigError(
            f"{path!r} is {obj!r}, not a subclass of consumer.IdempotentConsumer; "
            "point at your consumer class"
        )
    if obj is IdempotentConsumer:
        raise ConfigError(
            f"{path!r} is the IdempotentConsumer base class itself; point at your subclass"
        )
    return obj


OWN_PACKAGES = ("consumer", "outbox")
"""kafka-outbox's top-level packages: a user module of one of these names hides it."""


def _refuse_shadowing(module_name: str, cwd: Path) -> None:
    """A module ``consumer.py`` (or ``outbox.py``) of the user's beside the command has the
    name of this library's package: ``consumer:MyClass`` would look in the library's package
    and fail with a confusing "no attribute"; say what is wrong instead (I8)."""
    top = module_name.partition(".")[0]
    if top not in OWN_PACKAGES:
        return
    ours = Path(str(importlib.import_module(top).__file__)).resolve().parent
    for candidate in (cwd / f"{top}.py", cwd / top):
        if candidate.exists() and candidate.resolve() != ours:
            raise ConfigError(
                f"{candidate} has the name of kafka-outbox's own package {top!r}, which it "
                f"hides: rename your module (e.g. my_{top}.py) and pass my_{top}:YourClass"
            )


def _is_the_module_itself(exc: ModuleNotFoundError, module_name: str) -> bool:
    """True when ``module_name`` (or a package above it) is missing, not one it imports."""
    parts = module_name.split(".")
    return exc.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _failed_import(module_name: str, exc: BaseException) -> str:
    """The module's own error, with the line of the module's code that raised it."""
    where = ""
    tb = exc.__traceback__
    while tb is not None:  # the innermost frame outside the import machinery
        filename = tb.tb_frame.f_code.co_filename
        if "importlib" not in filename:
            where = f" at {filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return (
        f"importing {module_name!r} failed{where}: {type(exc).__name__}: {exc}; "
        "fix that error in your module (it was found, its code raised)"
    )
