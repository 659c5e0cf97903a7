#!/usr/bin/env python3
"""One entry point for a fresh checkout: `python3 dev.py demo` or `python3 dev.py test`.

It needs only Python 3.11+: it makes `.venv`, installs the project with its
test extras into it (again only when pyproject.toml changed), then runs the
command inside it. No Docker, no preinstalled PostgreSQL or Kafka.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".kafka-outbox-installed"
INSTALL_RECIPE = "compiled"
"""Part of the stamp: a venv installed by an older recipe (no bytecode) is installed again once."""
SOURCES = ("outbox", "consumer", "benchmarks", "examples", "migrations", "tests")
"""The project's own packages, compiled before each test run (`compile_sources`)."""


def ensure_venv() -> None:
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    digest = hashlib.sha256(pyproject + INSTALL_RECIPE.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    if not (BIN / "python").exists():
        print(f"dev.py: creating {VENV}", flush=True)
        # No pip of its own yet: uv installs it with the rest (`install_with_uv`).
        venv.EnvBuilder(with_pip=False).create(VENV)
    print("dev.py: installing kafka-outbox[test] into .venv", flush=True)
    if not install_with_uv():
        install_with_pip()
    STAMP.write_text(digest)


def install_with_uv() -> bool:
    """uv (from PyPI) installs the project in seconds where pip took minutes here: pip re-downloads
    every wheel (~2 min 20 s from a clean clone on this machine), uv keeps them in its cache
    (~25 s in all, most of it fetching uv itself). False when uv cannot be had or fails: then
    pip does it, as before."""
    uv = BIN / "uv"
    quiet = ["-q", "--disable-pip-version-check"]
    if not uv.exists():
        # The pip of the Python that runs dev.py installs uv into .venv (``--python``: pip 22.3+).
        got = subprocess.run(
            [sys.executable, "-m", "pip", *quiet, "--python", str(BIN / "python"), "install", "uv"],
            check=False,
            stderr=subprocess.DEVNULL,
        )
        if got.returncode != 0 or not uv.exists():
            print("dev.py: uv unavailable, installing with pip", flush=True)
            return False
    # pip too, so that `.venv/bin/pip` is there as in any venv. ``--compile-bytecode``: pip
    # compiles what it installs, uv does not; without the .pyc files (and with
    # PYTHONDONTWRITEBYTECODE=1, as on this machine) every `outbox` or `python` started later
    # compiled its ~500 modules again: ~1.2 s of CPU per process, twice the rest of its start.
    cmd = [str(uv), "pip", "install", "-q", "--compile-bytecode", "--python", str(BIN / "python")]
    done = subprocess.run([*cmd, "-e", f"{ROOT}[test]", "pip"], check=False)
    if done.returncode != 0:
        print("dev.py: uv failed (above), installing with pip", flush=True)
        return False
    return True


def install_with_pip() -> None:
    if not (BIN / "pip").exists():
        subprocess.run(
            [str(BIN / "python"), "-m", "ensurepip", "--default-pip"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-e",
            f"{ROOT}[test]",
        ],
        check=True,
    )


def compile_sources() -> None:
    """Compile the project's own modules (an editable install: no installer compiles them) where
    their .pyc is missing or stale: the tests start hundreds of `outbox` and `python`
    processes, and under PYTHONDONTWRITEBYTECODE=1 none of them writes a .pyc of its own. A
    fraction of a second when nothing changed; a failure (a syntax error) is left to the tests."""
    subprocess.run(
        [str(BIN / "python"), "-m", "compileall", "-q", *SOURCES],
        cwd=ROOT,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(cmd: list[str]) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


WORKERS = 4
"""pytest-xdist workers of `dev.py test`: the tests mostly wait (consumer group joins, relays,
subprocesses), so four share two cores well once the processes they start no longer compile
their modules (`compile_sources`); the [kafka] runs are one group on one worker."""


def quick_checks() -> int:
    """Lint and format: a second, so they run first and a slip stops the command at once."""
    for cmd in ([str(BIN / "ruff"), "check", "."], [str(BIN / "ruff"), "format", "--check", "."]):
        if (rc := run(cmd)) != 0:
            return rc
    return 0


SLOW_CHECKS = (
    [str(BIN / "mypy")],
    [str(BIN / "lint-imports")],  # the dependency rules of docs/architecture.md
    ["bash", "scripts/check-compose.sh"],  # docker compose config, no Docker engine needed
)


def with_slow_checks(cmd: list[str]) -> int:
    """Run ``cmd`` (pytest) while `SLOW_CHECKS` run beside it, one after the other, instead of
    before it: mypy alone took 40 to 110 s from a clean clone here, time the tests' first minute
    (services starting, consumer groups joining) mostly spends waiting. A check's output shows
    when it ends; a failed check fails the command, after the tests (Ctrl-C stops them)."""
    failed: list[str] = []

    def slow_checks() -> None:
        for check in SLOW_CHECKS:
            done = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, check=False)
            print(f"+ {' '.join(check)}\n{done.stdout}{done.stderr}".rstrip(), flush=True)
            if done.returncode != 0:
                failed.append(" ".join(check))
                print(f"dev.py: {failed[0]} failed (above); the tests go on", flush=True)
                return

    thread = threading.Thread(target=slow_checks, name="dev.py checks", daemon=True)
    thread.start()
    rc = run(cmd)
    thread.join()
    if failed:
        print(f"dev.py: FAILED: {failed[0]} (its output is above)", flush=True)
        return rc or 1
    return rc


def parallel(extra: list[str]) -> list[str]:
    """xdist's options, unless the caller chose (``-n``, ``-p no:xdist``, ``--dist``)."""
    chosen = any(
        a in {"no:xdist", "-pno:xdist"} or a.startswith(("-n", "--numprocesses", "--dist"))
        for a in extra
    )
    return [] if chosen else ["-n", str(WORKERS), "--dist", "loadgroup"]


def test(extra: list[str]) -> int:
    """Lint, then the whole pytest suite in parallel, with type-checking, the import rules and
    the docker-compose.yml check beside it (``--quick``: the unit tests only, for the inner
    loop)."""
    if (rc := quick_checks()) != 0:
        return rc
    compile_sources()
    if extra[:1] == ["--quick"]:
        # A tenth of the Hypothesis examples (tests/hypothesis_profiles.py): the inner loop.
        quick = [str(BIN / "pytest"), "tests/unit", "-q", "--hypothesis-profile=quick"]
        return with_slow_checks([*quick, *extra[1:]])
    return with_slow_checks([str(BIN / "pytest"), *parallel(extra), *extra])


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "outbox"}:
        print(
            "usage: python3 dev.py demo [outbox demo options]  run the demo, embedded services\n"
            "       python3 dev.py test [pytest options]       lint, type-check, run all tests\n"
            "       python3 dev.py test --quick [options]      lint, type-check, unit tests\n"
            "       python3 dev.py outbox ARGS...              any outbox command in .venv"
        )
        return 2
    ensure_venv()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if argv[0] == "test":
        return test(argv[1:])
    if argv[0] == "demo":
        return run([str(BIN / "outbox"), "demo", *argv[1:]])
    return run([str(BIN / "outbox"), *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
