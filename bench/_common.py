"""What the benchmarks share: the real server as a subprocess, and what /proc says about processes.

`bench/reports.py` and `bench/load.py` both start `python -m balance_server serve` on a database
they loaded, wait until every server process serves, and read resident memory and CPU time of
process trees from /proc (Linux only, like the machines these figures come from).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPOSITORY: Final = Path(__file__).resolve().parent.parent
RESULTS_DIRECTORY: Final = REPOSITORY / "bench" / "results"

SERVER_START_SECONDS_MAX: Final = 60.0
SERVER_STOP_SECONDS_MAX: Final = 30.0
SERVING_LINE: Final = "balance-server: serving gRPC on"
"""What each server process prints once it serves; with --workers N there are N such lines."""
CLOCK_TICKS_PER_SECOND: Final = os.sysconf("SC_CLK_TCK")
BYTES_PER_MB: Final = 1024 * 1024


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The server.


@dataclass(frozen=True)
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    workers: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def running_server(
    dsn: str, log_path: Path, *, workers: int = 1, log_level: str = "WARNING"
) -> Iterator[RunningServer]:
    """The real server in a subprocess (with `workers` processes on one port), once every process
    serves; stopped with SIGTERM at the end, as a supervisor would."""
    port = free_port()
    # Settings go through the environment, not flags: with --workers N the worker processes are
    # started with the environment only.
    environment = {
        **os.environ,
        "BALANCE_DSN": dsn,
        "BALANCE_LISTEN": f"127.0.0.1:{port}",
        "BALANCE_LOG_LEVEL": log_level,
        "BALANCE_WORKERS": str(workers),
    }
    command = [sys.executable, "-m", "balance_server", "serve"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPOSITORY, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    server = RunningServer(process, port, log_path, workers)
    try:
        wait_until_serving(server)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=SERVER_STOP_SECONDS_MAX)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_serving(server: RunningServer) -> None:
    """Until each of the server's processes has said it serves and its health check says SERVING."""
    deadline = time.monotonic() + SERVER_START_SECONDS_MAX
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise SystemExit(f"the server exited with {server.process.returncode}:\n{server.log_path.read_text()}")
            if server.log_path.read_text(errors="replace").count(SERVING_LINE) >= server.workers:
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
    raise SystemExit(f"the server did not serve within {SERVER_START_SECONDS_MAX} s:\n{server.log_path.read_text()}")


# Processes, from /proc.


@dataclass(frozen=True)
class ProcessStat:
    parent_pid: int
    cpu_ticks: int
    """User and system time of the process and of its children it has waited for."""


def process_stat(pid: int) -> ProcessStat | None:
    """None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces: the fields follow the last ')'.
    fields = text.rsplit(")", 1)[1].split()
    user, system, children_user, children_system = (int(value) for value in fields[11:15])
    return ProcessStat(int(fields[1]), user + system + children_user + children_system)


def process_tree(root_pid: int) -> list[int]:
    """The process and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = process_stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat.parent_pid, []).append(int(entry.name))
    tree, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def rss_kb(pid: int) -> int:
    """Resident set size of one process; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory summed over a process and its descendants."""
    return sum(rss_kb(pid) for pid in process_tree(root_pid)) / 1024


def tree_cpu_seconds(root_pids: list[int]) -> float:
    """CPU time used so far by processes and their descendants, including descendants that ended
    (their time is added to their parent's when it waits for them)."""
    ticks = 0
    for root in root_pids:
        for pid in process_tree(root):
            stat = process_stat(pid)
            ticks += stat.cpu_ticks if stat is not None else 0
    return ticks / CLOCK_TICKS_PER_SECOND


@dataclass(frozen=True)
class MachineCpu:
    busy_seconds: float
    """All CPUs' time outside idle and I/O wait."""
    steal_seconds: float
    """Time the hypervisor gave to other machines while this one wanted to run."""


def machine_cpu() -> MachineCpu:
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user, nice, system, idle, iowait, irq, softirq, steal: busy is all but idle and iowait.
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    steal = fields[7]
    return MachineCpu(busy / CLOCK_TICKS_PER_SECOND, steal / CLOCK_TICKS_PER_SECOND)
