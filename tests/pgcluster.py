"""A throwaway PostgreSQL cluster for the test suite.

``PgCluster`` runs ``initdb`` into a fresh temporary directory and starts a private
``postgres`` on 127.0.0.1 with durability switched off (``fsync``, ``synchronous_commit``,
``full_page_writes``): the data is thrown away anyway, and this makes start-up and
``CREATE DATABASE`` fast. Nothing is shared with a system PostgreSQL, so tests never
need a configured server, a password or a port that is free on every machine.

Fixtures: import them into a conftest or test module. Like the other helpers here
(``invariants``, ``sim_helpers``) the module is imported by its bare name, because
``tests/`` is not a package and pytest puts it on ``sys.path``; the redundant aliases
tell ruff the imports are deliberate re-exports (no F401/F811 in the importing file)::

    from pgcluster import pg_cluster as pg_cluster
    from pgcluster import pg_url as pg_url

Import both, even if only ``pg_url`` is used: pytest looks its dependency ``pg_cluster``
up by name. Do not mix in ``tests.pgcluster``: that would be a second copy of the module.

``count_round_trips()`` counts the network round trips of every psycopg async connection while
it is active (the test of one round trip per transition, and tests/bench/bench_store.py).

``pg_cluster`` (session scope) is one cluster per process: under pytest-xdist each worker
starts its own, which keeps workers independent and costs about a second each.
``pg_url`` (function scope) is the URL of a new, empty database, dropped after the test.

Server binaries come from ``pg_config --bindir``, else the newest
``/usr/lib/postgresql/*/bin``, else ``PATH``. Without them the fixture skips, unless
``BATCHKLING_REQUIRE_POSTGRES=1`` (set by CI) turns the skip into a failure so that a
broken CI image cannot silently skip the PostgreSQL tests.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as
the ``postgres`` OS user and the temporary directory is handed to that user.

A killed test process must not leave servers behind: on Linux the postmaster is started
with a parent-death signal (SIGQUIT, PostgreSQL's immediate shutdown), so it goes when
the process that started it goes, even on SIGKILL. ``atexit`` covers ordinary exits
that skip fixture teardown, and directories left by killed runs are swept at the next
start.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

__all__ = [
    "MISSING_BINARIES",
    "REQUIRE_ENV",
    "PgCluster",
    "PgClusterError",
    "RoundTrips",
    "count_round_trips",
    "find_bindir",
    "pg_cluster",
    "pg_url",
]

#: The skip (or, under ``REQUIRE_ENV``, failure) message when no server is installed.
MISSING_BINARIES = "no PostgreSQL server binaries (initdb) found: install the OS package postgresql"
#: Set to ``1`` to fail instead of skip when PostgreSQL is missing.
REQUIRE_ENV = "BATCHKLING_REQUIRE_POSTGRES"

#: Temporary directories start with this, so the sweep only ever touches our own.
_PREFIX = "bkpg-"
#: Written next to the data directory: the pid of the test process that owns the cluster.
_OWNER_FILE = "owner.pid"
_SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
}
_PR_SET_PDEATHSIG = 1


class PgClusterError(RuntimeError):
    """The cluster could not be initialised, started or stopped."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``postgres`` and ``pg_ctl``, or None."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        # pg_config may come from a client-only package (libpq-dev) whose bindir has no
        # server, so each candidate is checked for initdb below rather than trusted.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    )
    initdb = shutil.which("initdb")
    if initdb:
        # Follow symlinks (e.g. /usr/local/bin/initdb) so postgres is found beside initdb.
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres")):
            return bindir
    return None


def _version_key(bindir: Path) -> tuple[int, ...]:
    # Numeric, so that 9.6 sorts below 15 (a string sort would put it above).
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def _free_port() -> int:
    # Another process can take the port before postgres binds it; start() retries then.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGQUIT when we die (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        # Popen runs preexec_fn after switching user/group; a credential change clears
        # the parent-death signal, so this order is what makes it stick for postgres.
        # The signal follows the *thread* that forked: pytest sets up session fixtures in
        # the main thread, which lives as long as the process.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return preexec


class PgCluster:
    """A private PostgreSQL server in a temporary directory, on 127.0.0.1.

    ``start()`` initialises and starts it, ``stop()`` shuts it down immediately and
    deletes every file; both are idempotent. Also usable as a context manager.
    """

    def __init__(self, bindir: Path, *, startup_timeout: float = 30.0,
                 settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.startup_timeout = startup_timeout
        #: Server settings over the defaults (a benchmark turns durability back on).
        self.settings = {**_SERVER_SETTINGS, **(settings or {})}
        self.port = 0
        self.root: Path | None = None
        #: Seconds the last ``start()`` took, initdb included.
        self.startup_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: pwd.struct_passwd | None = None

    @property
    def dsn(self) -> str:
        """URL of the ``postgres`` maintenance database."""
        return self.url("postgres")

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "server.log"

    def url(self, dbname: str) -> str:
        if not self.port:
            raise PgClusterError("cluster not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        if self._proc is not None:
            return
        began = time.monotonic()
        self._run_as = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        parent = self._temp_parent()
        _sweep_stale_dirs(parent)
        self.root = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))
        atexit.register(self.stop)
        try:
            (self.root / _OWNER_FILE).write_text(str(os.getpid()))
            (self.root / "sock").mkdir()
            if self._run_as is not None:
                for path in (self.root, self.root / "sock"):
                    os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
            self._initdb()
            # Free ports are found by probing, so a parallel process can win the race.
            for _attempt in range(3):
                self.port = _free_port()
                self._launch()
                if self._wait_ready():
                    break
            else:
                raise PgClusterError(f"postgres did not start:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self._terminate(proc)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        self.port = 0
        atexit.unregister(self.stop)

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its URL."""
        # CREATE DATABASE cannot run inside a transaction block.
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting any session a test left open."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def __enter__(self) -> PgCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------

    def _temp_parent(self) -> Path:
        parent = Path(tempfile.gettempdir())
        if self._run_as is None:
            return parent
        # The postgres user must be able to reach the directory; a root-only TMPDIR
        # (e.g. under /root) would make initdb fail with a baffling permission error.
        for part in (parent.resolve(), *parent.resolve().parents):
            if not part.stat().st_mode & stat.S_IXOTH:
                return Path("/tmp")
        return parent

    def _popen_credentials(self) -> tuple[int | None, int | None, list[int] | None]:
        """``user``, ``group`` and ``extra_groups`` for Popen: None keeps our own."""
        if self._run_as is None:
            return None, None, None
        # An empty extra_groups drops root's supplementary groups instead of inheriting them.
        return self._run_as.pw_uid, self._run_as.pw_gid, []

    def _initdb(self) -> None:
        assert self.root is not None
        cmd = [
            str(self.bindir / "initdb"),
            "-D", str(self.root / "data"),
            "-A", "trust",
            "-U", "postgres",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        user, group, extra_groups = self._popen_credentials()
        out = subprocess.run(
            cmd,
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        if out.returncode != 0:
            raise PgClusterError(f"initdb failed ({out.returncode}):\n{out.stdout}{out.stderr}")

    def _launch(self) -> None:
        assert self.root is not None
        cmd = [str(self.bindir / "postgres"), "-D", str(self.root / "data")]
        settings = {
            **self.settings,
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            # Inside our directory: never collides with a system server's /var/run socket.
            "unix_socket_directories": str(self.root / "sock"),
        }
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        user, group, extra_groups = self._popen_credentials()
        with open(self.log_path, "ab") as log:
            if self._run_as is not None:
                os.chown(self.log_path, self._run_as.pw_uid, self._run_as.pw_gid)
            # postgres is started directly (not via pg_ctl) so that it is our child and
            # the parent-death signal applies to it. Its own session keeps a Ctrl-C in
            # the terminal from shutting it down behind the fixture's back.
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(),
                user=user,
                group=group,
                extra_groups=extra_groups,
            )

    def _wait_ready(self) -> bool:
        """True once the server accepts connections; False if it lost the port race."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                if "already in use" in self._log_tail():
                    return False
                raise PgClusterError(f"postgres exited during start-up:\n{self._log_tail()}")
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PgClusterError(
                        f"postgres not accepting connections after {self.startup_timeout:.0f}s"
                        f" ({exc}):\n{self._log_tail()}"
                    ) from exc
                time.sleep(0.05)
            else:
                return True

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        # SIGQUIT is immediate shutdown: no checkpoint, backends exit at once. Nothing
        # here needs to survive, so a clean shutdown would only cost time.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _sweep_stale_dirs(parent: Path) -> None:
    """Delete clusters left by killed test runs (their server died with them)."""
    for path in parent.glob(f"{_PREFIX}*"):
        try:
            owner = int((path / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # being created right now, or not ours
        if _pid_alive(owner):
            continue
        # Only if the postmaster is really gone (no parent-death signal off Linux).
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int((path / "data" / "postmaster.pid").read_text().split()[0])
            if _pid_alive(postmaster):
                continue
        shutil.rmtree(path, ignore_errors=True)


# -- counting round trips ----------------------------------------------------------------


class RoundTrips:
    """How many exchanges with the server psycopg's async connections made (``count``)."""

    def __init__(self) -> None:
        self.count = 0

    def track(self, gen: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
        """``gen`` (a psycopg I/O generator), counted once if it touches the network.

        Every statement, BEGIN, COMMIT or pipeline sync is one generator that
        ``AsyncConnection.wait`` drives: it writes, then reads the answer. A generator that
        finishes without waiting on the socket (the commit a pool issues on an autocommit
        connection) made no round trip and is not counted.
        """
        try:
            state = next(gen)
        except StopIteration as stop:
            return stop.value
        self.count += 1
        while True:
            try:
                state = gen.send((yield state))
            except StopIteration as stop:
                return stop.value


@contextlib.contextmanager
def count_round_trips() -> Iterator[RoundTrips]:
    """Count the round trips of every ``psycopg.AsyncConnection`` while the block runs."""
    counter = RoundTrips()
    original = psycopg.AsyncConnection.wait

    async def wait(conn: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
        return await original(conn, counter.track(gen), *args, **kwargs)

    psycopg.AsyncConnection.wait = wait  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        psycopg.AsyncConnection.wait = original  # type: ignore[method-assign]


# -- pytest fixtures ---------------------------------------------------------------------

_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A running PostgreSQL cluster, one per test process (xdist worker)."""
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(MISSING_BINARIES, pytrace=False)
        pytest.skip(MISSING_BINARIES)
    with PgCluster(bindir) as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """URL of a fresh, empty database, dropped after the test."""
    # Each worker has its own cluster, but the worker id keeps names unique if a cluster
    # is ever shared, and tells in server logs which worker a database belonged to.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"test_{worker}_{next(_db_counter)}"
    yield pg_cluster.create_database(name)
    pg_cluster.drop_database(name)
