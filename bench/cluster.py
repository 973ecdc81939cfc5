"""The processes a fault-injecting harness owns and breaks: an embedded PostgreSQL in a folder of its
own and the real server as a subprocess on a fixed port.

Used by bench/chaos.py and tests/e2e/test_faults.py. Every action is the one an operator (or a
crash) would take: SIGKILL and SIGTERM for the server, `pg_ctl -m immediate` for PostgreSQL (run as
the embedded server's OS user, like EmbeddedPostgres does), `pg_terminate_backend` for single
connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import psycopg
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPOSITORY: Final = Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from balance_server.db.embedded import POSTGRES_BIN_PATH  # noqa: E402

PG_CTL_SECONDS_MAX: Final = 120
SERVER_START_SECONDS_MAX: Final = 60.0
SERVER_STOP_SECONDS_MAX: Final = 30.0
HEALTH_POLL_SECONDS: Final = 0.05
HEALTH_CALL_SECONDS_MAX: Final = 1.0
ADMIN_CONNECT_SECONDS_MAX: Final = 3
RECONNECT_BACKOFF_MS_MIN: Final = 50
RECONNECT_BACKOFF_MS_MAX: Final = 500
"""A restarted server is found again within half a second instead of gRPC's default two minutes."""

SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def open_channel(port: int) -> aio.Channel:
    """A channel that reconnects quickly after the server at `port` restarts."""
    return aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS_MIN),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS_MIN),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS_MAX),
        ],
    )


async def health_of(channel: aio.Channel, timeout_seconds: float = HEALTH_CALL_SECONDS_MAX) -> int | None:
    """The server's overall health status, or None when it does not answer."""
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout_seconds
        )
    except aio.AioRpcError:
        return None
    return int(answer.status)


async def wait_for_health(channel: aio.Channel, status: int, *, timeout_seconds: float) -> float:
    """Seconds until the health service reports `status`; TimeoutError past `timeout_seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_seconds:
        if await health_of(channel) == status:
            return time.monotonic() - started
        await asyncio.sleep(HEALTH_POLL_SECONDS)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)  # type: ignore[arg-type]
    raise TimeoutError(f"health did not turn {name} within {timeout_seconds} s")


class Postgres:
    """An embedded PostgreSQL in `data_dir` that the harness may stop, crash and restart.

    PostgreSQL runs as the `embedded_postgres` OS user when the harness runs as root. Every command
    that switches user runs through `setpriv` (or a Python child for the first start), never through
    subprocess's `user=`: with `user=` Python forks instead of vforking, and a fork of a process in
    which gRPC threads are running runs gRPC's fork handlers, which crashed the child (pg_ctl died
    of SIGSEGV)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.dsn = ""
        self._socket_dir = ""

    def start(self) -> str:
        """Creates the data folder on first use (EmbeddedPostgres, in a child process) and starts
        the server; returns its DSN."""
        with tempfile.TemporaryFile() as output:
            subprocess.run(
                [sys.executable, "-c", _START_EMBEDDED, str(self.data_dir)],
                check=True,
                cwd=REPOSITORY,
                stdin=subprocess.DEVNULL,
                # A file, not a pipe: the server inherits the output and keeps it open while it runs.
                stdout=output,
                stderr=subprocess.DEVNULL,
                timeout=PG_CTL_SECONDS_MAX,
            )
            output.seek(0)
            self.dsn = output.read().decode().strip().splitlines()[-1]
        self._socket_dir = str(psycopg.conninfo.conninfo_to_dict(self.dsn)["host"])
        return self.dsn

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def restart_immediately(self) -> None:
        """A crash and a restart: no shutdown checkpoint, crash recovery from the WAL at start."""
        self._pg_ctl("-m", "immediate", "restart")

    def stop_immediately(self) -> None:
        self._pg_ctl("-m", "immediate", "stop")

    def start_again(self) -> None:
        """Starts the server after a stop, on the same socket as before."""
        self._pg_ctl("-o", '-h ""', "-o", f"-k {self._socket_dir}", "start")

    def running(self) -> bool:
        status = subprocess.run(
            [*self._as_owner(), str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), "status"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=PG_CTL_SECONDS_MAX,
            check=False,
        )
        return status.returncode == 0

    def create_database(self, name: str) -> str:
        """A new empty database on this server, and its DSN."""
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')  # a generated identifier, not input
        return psycopg.conninfo.make_conninfo(self.dsn, dbname=name)

    def _pg_ctl(self, *arguments: str) -> None:
        # Output to the server's log file, never to a pipe: the server inherits pg_ctl's output.
        command = [*self._as_owner(), str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), "-w"]
        command += ["-t", str(PG_CTL_SECONDS_MAX), "-l", str(self.data_dir / "log"), *arguments]
        subprocess.run(
            command,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=PG_CTL_SECONDS_MAX + 10,
        )

    @staticmethod
    def _as_owner() -> list[str]:
        # The OS user embedded-postgres runs the server as when started by root.
        if os.geteuid() != 0:
            return []
        return ["setpriv", f"--reuid={EMBEDDED_USER}", f"--regid={EMBEDDED_USER}", "--clear-groups"]


def can_control_postgres() -> bool:
    """Whether this process can restart an embedded PostgreSQL it started: as root it needs
    `setpriv` to act as the server's OS user."""
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


EMBEDDED_USER: Final = "embedded_postgres"
_START_EMBEDDED: Final = """
import sys
from pathlib import Path
from balance_server.db.embedded import EmbeddedPostgres
print(EmbeddedPostgres(Path(sys.argv[1])).start(), flush=True)
"""


TERMINATE_BACKENDS: Final = """
    SELECT count(pg_terminate_backend(pid)) FROM (
        SELECT pid FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
        ORDER BY random() LIMIT %s
    ) AS chosen
"""


async def terminate_backends(dsn: str, count_max: int) -> int:
    """Terminates up to `count_max` random client connections to the database of `dsn`."""
    connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=ADMIN_CONNECT_SECONDS_MAX)
    async with connection:
        cursor = await connection.execute(TERMINATE_BACKENDS, (count_max,))
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


class ServerProcess:
    """`python -m balance_server serve` on a fixed port, restartable; output appended to `log_path`."""

    def __init__(self, port: int, log_path: Path, arguments: list[str]) -> None:
        self.port = port
        self.log_path = log_path
        self.arguments = arguments
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server was started"
        return self.process.pid

    def start(self) -> None:
        command = [sys.executable, "-m", "balance_server", "serve", "--listen", f"127.0.0.1:{self.port}"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *self.arguments], cwd=REPOSITORY, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def exit_code(self) -> int | None:
        """None while the process runs."""
        return None if self.process is None else self.process.poll()

    async def wait_until_serving(self, channel: aio.Channel, timeout_seconds: float = SERVER_START_SECONDS_MAX) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout_seconds:
            code = self.exit_code()
            if code is not None:
                raise ServerExited(code, self.log_tail())
            if await health_of(channel) == SERVING:
                return
            await asyncio.sleep(HEALTH_POLL_SECONDS)
        raise TimeoutError(f"the server did not serve within {timeout_seconds} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no cleanup of any kind."""
        assert self.process is not None, "the server was started"
        self.process.kill()
        self.process.wait()

    def terminate(self) -> None:
        assert self.process is not None, "the server was started"
        self.process.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout_seconds: float = SERVER_STOP_SECONDS_MAX) -> int:
        assert self.process is not None, "the server was started"
        started = time.monotonic()
        while (code := self.process.poll()) is None:
            if time.monotonic() - started > timeout_seconds:
                raise TimeoutError(f"the server did not exit within {timeout_seconds} s")
            await asyncio.sleep(HEALTH_POLL_SECONDS)
        return code

    def stop(self) -> int | None:
        """SIGTERM and a bounded wait, then SIGKILL; the exit code (None if it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=SERVER_STOP_SECONDS_MAX)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def log_tail(self, characters: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-characters:]
        return ""


class ServerExited(RuntimeError):
    def __init__(self, code: int, log_tail: str) -> None:
        super().__init__(f"the server exited with {code}:\n{log_tail}")
        self.code = code
