"""Load benchmark of the balance service, next to pgbench running the same transfer.

Loads (once per --data-dir) 100 000 funded users and one user with 500 000 transactions into an
embedded PostgreSQL, works on a fresh copy of that data, starts `balance-server` as a subprocess,
and drives it from asyncio gRPC clients in processes of their own with a fixed number of calls in
flight: each scenario gets a warm-up and then a measured window of its own. In every run pgbench
first runs the same transfer (SERIALIZABLE, retries, same concurrency) against the same PostgreSQL,
and every figure is printed as a ratio to it, because these machines are shared and noisy: ratios
from one run are what count. Figures are medians of --runs runs; they also go to
bench/results/load.json. The first run on a --data-dir also loads the data (about a minute) and
follows the history's page tokens to page 10 000 once (about two minutes).

    .venv/bin/python bench/load.py                    all scenarios, 3 runs (about 13 minutes)
    .venv/bin/python bench/load.py --scaling          Transfer and GetBalance with 1 and 2 workers
    .venv/bin/python bench/load.py --soak 300         Transfer for 300 s; server memory every 30 s
    .venv/bin/python bench/load.py --profile          py-spy profile of the server under Transfer
    .venv/bin/python bench/load.py --users 10000 --history 50000 --duration 5 --runs 1   a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import grpc
import psycopg

from balance.v1 import info_service_pb2, info_service_pb2_grpc

# The repository root, so that `bench` imports as a package when this file runs as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balance_server.db.embedded import EmbeddedPostgres
from bench import _baseline, _load_client, _load_data
from bench._common import (
    RESULTS_DIRECTORY,
    RunningServer,
    machine_cpu,
    process_tree,
    progress,
    running_server,
    tree_cpu_seconds,
    tree_rss_mb,
)

RESULTS_PATH: Final = RESULTS_DIRECTORY / "load.json"
"""The default mode's figures; --scaling, --soak and --profile write load-scaling.json and so on."""
DATA_DIRECTORY_DEFAULT: Final = RESULTS_DIRECTORY / "load-pgdata"
LOGS_DIRECTORY: Final = RESULTS_DIRECTORY / "load-logs"

SCENARIOS: Final = (
    "transfer_uniform",
    "transfer_hot",
    "deposit",
    "order_cycle",
    "get_balance",
    "list_first_page",
    "list_last_page",
)
SCALING_SCENARIOS: Final = ("transfer_uniform", "get_balance")
BASELINE_FORMS: Final = ("one_call", "five_statements", "service_function")

# Targets of the issue, at 64 calls in flight.
TRANSFER_RATIO_TARGET: Final = 0.6
"""Transfer between random users: at least this share of pgbench's one-call transfers per second."""
TRANSFER_P99_MS_TARGET: Final = 50.0
HOT_RATIO_TARGET: Final = 0.8
"""Transfer touching one of 10 hot users: at least this share of Transfer between random users."""
GET_BALANCE_CALLS_PER_SECOND_TARGET: Final = 3000.0
LAST_PAGE_LATENCY_RATIO_TARGET: Final = 1.5
"""ListTransactions page 10 000: p50 latency at most this many times page 1's."""
SOAK_RSS_GROWTH_TARGET: Final = 0.20

PAGE_SIZE: Final = 50
LAST_PAGE_NUMBER_MAX: Final = 10_000
PAGE_CALL_SECONDS_MAX: Final = 10.0
START_LEAD_SECONDS: Final = 1.0
"""Between handing plans to the client processes and the load starting in all of them together."""
TALLY_EXTRA_SECONDS_MAX: Final = 60.0
"""How long after its window a client process may take to report before the benchmark gives up."""
SOAK_SAMPLE_SECONDS: Final = 30.0
ORDER_IDS_PER_PROCESS: Final = 10**9
IN_FLIGHT_MAX: Final = 1024
DURATION_SECONDS_MAX: Final = 3600.0
RUNS_MAX: Final = 20
PROFILE_RATE_PER_SECOND: Final = 100
SERIALIZATION_WARNING: Final = "serialization conflicts after"
"""The server's log line when a money operation ran out of retries (the caller got ABORTED)."""
HEALTH_LOST_WARNING: Final = "database unreachable: health is now NOT_SERVING"
"""The server's log line when its database ping failed: calls fail with UNAVAILABLE until one succeeds."""


# Measurements.


@dataclass
class Window:
    """One scenario's measured window in one run."""

    scenario: str
    workers: int
    run: int
    seconds: float
    calls: int = 0
    """Successful calls; their latencies are the percentiles."""
    calls_per_second: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    db_commits: int = 0
    db_rollbacks: int = 0
    retries_exhausted_logged: int = 0
    health_lost_logged: int = 0
    """Times a server process found its database ping failing and refused calls until the next."""
    server_cpu_seconds: float = 0.0
    postgres_cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    client_cpu_busiest_share: float = 0.0
    """The busiest client process's CPU time over the window's length: near 1.0, the generator
    itself may be what limits the figures."""
    machine_busy_share: float = 0.0
    """Busy time of all CPUs over their capacity in the window."""
    other_cpu_seconds: float = 0.0
    """CPU time of everything but server, PostgreSQL and clients: other tenants of a shared machine."""
    steal_seconds: float = 0.0
    calls_per_bucket: list[int] = field(default_factory=list)
    rss_samples_mb: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Run:
    number: int
    baseline: dict[str, _baseline.PgbenchResult] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)

    def window(self, scenario: str, workers: int) -> Window | None:
        for window in self.windows:
            if (window.scenario, window.workers) == (scenario, workers):
                return window
        return None


@dataclass
class Bench:
    """What every window needs: the arguments, the client processes and the database."""

    arguments: argparse.Namespace
    clients: ClientPool
    dsn: str
    admin_dsn: str
    postmaster_pid: int
    dataset: _load_data.Dataset
    page_number: int = 0
    page_token: str = ""
    windows_started: int = 0


# The client processes.


class ClientPool:
    """Load generator processes, started once (spawned: no gRPC state crosses a fork) and handed
    one plan per window."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections = []
        self.processes = []
        for _ in range(processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_load_client.serve, args=(child_end,), daemon=True)
            process.start()
            child_end.close()
            self.connections.append(parent_end)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid is not None]

    def start(self, plans: Sequence[_load_client.Plan]) -> None:
        for connection, plan in zip(self.connections, plans, strict=True):
            connection.send(plan)

    def tallies(self, until: float) -> list[_load_client.Tally]:
        tallies = []
        for connection in self.connections:
            if not connection.poll(max(0.0, until - time.monotonic())):
                raise SystemExit("a client process did not report in time")
            answer = connection.recv()
            if isinstance(answer, Exception):
                raise SystemExit(f"a client process failed: {answer}")
            tallies.append(answer)
        return tallies

    def close(self) -> None:
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


# Database statistics.


def database_counters(dsn: str) -> tuple[int, int]:
    """Committed and rolled-back transactions of the database so far. Busy backends report them at
    most a second late, so a window's difference is right to within about a second of load."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def checkpoint(dsn: str) -> None:
    """Each window starts with no dirty pages of the one before to write."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CHECKPOINT")


# One window.


def plans_for(bench: Bench, scenario: str, server: RunningServer, seconds: float) -> list[_load_client.Plan]:
    arguments = bench.arguments
    processes = arguments.client_processes
    start_at = time.monotonic() + START_LEAD_SECONDS
    bench.windows_started += 1
    plans = []
    for index in range(processes):
        # Calls in flight split as evenly as they go; order ids unique across processes and windows.
        in_flight = arguments.in_flight // processes + (1 if index < arguments.in_flight % processes else 0)
        plans.append(
            _load_client.Plan(
                scenario=scenario,
                target=server.target,
                process_index=index,
                in_flight=in_flight,
                channels=arguments.channels,
                start_at=start_at,
                warmup_seconds=arguments.warmup,
                duration_seconds=seconds,
                bucket_seconds=SOAK_SAMPLE_SECONDS if arguments.soak else seconds,
                users=bench.dataset.users,
                history_user=bench.dataset.history_user,
                page_token=bench.page_token,
                order_id_first=(bench.windows_started * processes + index) * ORDER_IDS_PER_PROCESS + 1,
                seed=bench.windows_started * 100 + index,
            )
        )
    return plans


@dataclass(frozen=True)
class LogCounts:
    retries_exhausted: int
    health_lost: int
    end: int


def _log_counts(path: Path, offset: int) -> LogCounts:
    """Warnings in the server's log after `offset` that explain failed calls, and the log's new end."""
    with path.open("rb") as log:
        log.seek(offset)
        text = log.read()
    return LogCounts(
        text.count(SERIALIZATION_WARNING.encode()), text.count(HEALTH_LOST_WARNING.encode()), offset + len(text)
    )


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


@dataclass
class Snapshot:
    at: float
    server_cpu: float
    postgres_cpu: float
    client_cpu: float
    machine_busy: float
    steal: float
    commits: int
    rollbacks: int
    log_offset: int
    rss_mb: float


def snapshot(bench: Bench, server: RunningServer, log_offset: int) -> Snapshot:
    machine, at = machine_cpu(), time.monotonic()
    commits, rollbacks = database_counters(bench.dsn)
    return Snapshot(
        at=at,
        server_cpu=tree_cpu_seconds([server.pid]),
        postgres_cpu=tree_cpu_seconds([bench.postmaster_pid]),
        client_cpu=tree_cpu_seconds(bench.clients.pids),
        machine_busy=machine.busy_seconds,
        steal=machine.steal_seconds,
        commits=commits,
        rollbacks=rollbacks,
        log_offset=log_offset,
        rss_mb=tree_rss_mb(server.pid),
    )


def run_window(
    bench: Bench, server: RunningServer, scenario: str, run: int, *, seconds: float, profile: Path | None = None
) -> Window:
    """Warm-up, then `seconds` of measured load of one scenario, with what the machine did meanwhile."""
    checkpoint(bench.dsn)
    window = Window(scenario, server.workers, run, seconds)
    window.rss_start_mb = tree_rss_mb(server.pid)
    log_offset = _log_counts(server.log_path, 0).end
    plans = plans_for(bench, scenario, server, seconds)
    bench.clients.start(plans)
    _sleep_until(plans[0].measure_from)
    before = snapshot(bench, server, log_offset)
    native = not bench.arguments.profile_python_only
    profiler = _start_profiler(server, seconds, profile, native=native) if profile else None
    window.rss_samples_mb.append((0.0, before.rss_mb))
    if bench.arguments.soak:
        for sample in range(1, int(seconds // SOAK_SAMPLE_SECONDS) + 1):
            _sleep_until(plans[0].measure_from + sample * SOAK_SAMPLE_SECONDS)
            window.rss_samples_mb.append((sample * SOAK_SAMPLE_SECONDS, tree_rss_mb(server.pid)))
    _sleep_until(plans[0].measure_until)
    logged = _log_counts(server.log_path, log_offset)
    after = snapshot(bench, server, logged.end)
    tallies = bench.clients.tallies(plans[0].measure_until + TALLY_EXTRA_SECONDS_MAX)
    if profiler is not None:
        profiler.wait(timeout=TALLY_EXTRA_SECONDS_MAX)
    window.rss_end_mb = after.rss_mb
    window.retries_exhausted_logged = logged.retries_exhausted
    window.health_lost_logged = logged.health_lost
    _fill(window, tallies, before, after)
    return window


def _fill(window: Window, tallies: list[_load_client.Tally], before: Snapshot, after: Snapshot) -> None:
    latencies = sorted(latency for tally in tallies for latency in tally.latencies_ms)
    window.calls = len(latencies)
    window.calls_per_second = window.calls / window.seconds
    if latencies:
        window.p50_ms, window.p95_ms, window.p99_ms = (percentile(latencies, q) for q in (0.50, 0.95, 0.99))
        window.max_ms = latencies[-1]
    for tally in tallies:
        for key, count in tally.statuses.items():
            window.statuses[key] = window.statuses.get(key, 0) + count
        window.error_examples.update(tally.error_examples)
    buckets = max((max(tally.buckets, default=-1) for tally in tallies), default=-1) + 1
    window.calls_per_bucket = [sum(tally.buckets.get(index, 0) for tally in tallies) for index in range(buckets)]
    elapsed = after.at - before.at
    window.db_commits = after.commits - before.commits
    window.db_rollbacks = after.rollbacks - before.rollbacks
    window.server_cpu_seconds = after.server_cpu - before.server_cpu
    window.postgres_cpu_seconds = after.postgres_cpu - before.postgres_cpu
    window.client_cpu_seconds = after.client_cpu - before.client_cpu
    window.client_cpu_busiest_share = max(tally.cpu_seconds for tally in tallies) / window.seconds
    busy = after.machine_busy - before.machine_busy
    window.machine_busy_share = busy / (elapsed * (os.cpu_count() or 1))
    known = window.server_cpu_seconds + window.postgres_cpu_seconds + window.client_cpu_seconds
    window.other_cpu_seconds = max(0.0, busy - known)
    window.steal_seconds = after.steal - before.steal


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


# The page token of the last page.


def find_page_token(bench: Bench, server: RunningServer) -> None:
    """Follows the history user's pages once, 50 at a time, to the token of page 10 000 (or the
    last page of a shorter history); kept with the template for later invocations, and found
    again when the server no longer takes the kept one (its token format changed)."""
    last_page = min(LAST_PAGE_NUMBER_MAX, math.ceil(bench.dataset.history / PAGE_SIZE))
    request = info_service_pb2.ListTransactionsRequest(user_id=bench.dataset.history_user, page_size=PAGE_SIZE)
    with grpc.insecure_channel(server.target) as channel:
        info = info_service_pb2_grpc.InfoServiceStub(channel)
        cached = _load_data.cached_page_token(bench.admin_dsn)
        if cached is not None and cached[0] == last_page and _page_rows(info, request, cached[1]) > 0:
            bench.page_number, bench.page_token = cached
            return
        progress(f"following {last_page - 1:,} page tokens to page {last_page:,}")
        started = time.perf_counter()
        token = ""
        for page in range(1, last_page):
            request.page_token = token
            token = info.ListTransactions(request, timeout=PAGE_CALL_SECONDS_MAX).next_page_token
            if not token:
                raise SystemExit(f"the history ended at page {page}, before page {last_page}")
        rows = _page_rows(info, request, token)
    if rows == 0:
        raise SystemExit(f"page {last_page} of the history is empty")
    progress(f"page {last_page:,} holds {rows} transactions ({time.perf_counter() - started:.1f} s to get there)")
    bench.page_number, bench.page_token = last_page, token
    _load_data.cache_page_token(bench.admin_dsn, last_page, token)


def _page_rows(
    info: info_service_pb2_grpc.InfoServiceStub, request: info_service_pb2.ListTransactionsRequest, token: str
) -> int:
    """Rows on the page a token leads to; 0 when the server refuses the token."""
    request.page_token = token
    try:
        return len(info.ListTransactions(request, timeout=PAGE_CALL_SECONDS_MAX).transactions)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return 0


# Baseline.


def run_baseline(bench: Bench, run: Run) -> None:
    arguments = bench.arguments
    for form in BASELINE_FORMS:
        checkpoint(bench.dsn)
        common = {
            "clients": arguments.in_flight,
            "threads": arguments.pgbench_threads,
            "users": bench.dataset.users,
            "postmaster_pid": bench.postmaster_pid,
        }
        if arguments.warmup >= 1:
            _baseline.run(bench.dsn, form, seconds=arguments.warmup, log=False, **common)
        result = _baseline.run(bench.dsn, form, seconds=arguments.duration, log=True, **common)
        run.baseline[form] = result
        progress(
            f"run {run.number}: {_baseline.DESCRIPTIONS[form]}: {result.tps:,.0f} tps, p99 {result.p99_ms:.1f} ms, "
            f"{result.failed} failed, {result.retried} retried"
            + (f", exit {result.returncode}: {result.errors}" if result.returncode else "")
        )


# Profiling.


def _start_profiler(server: RunningServer, seconds: float, output: Path, *, native: bool) -> subprocess.Popen[bytes]:
    """py-spy sampling the (first) serving process for the window, as collapsed stacks."""
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    serving = [pid for pid in process_tree(server.pid) if pid != server.pid] or [server.pid]
    command = [py_spy, "record", "--pid", str(serving[0]), "--duration", str(int(seconds))]
    command += ["--rate", str(PROFILE_RATE_PER_SECOND), "--format", "raw", "--output", str(output)]
    if native:
        # C and Cython frames too: without them, time in gRPC's Cython code shows as the Python
        # frame that called it (asyncio's Handle._run, threading's Thread.run).
        command.append("--native")
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


LAYERS: Final = (
    ("balance_server/", "balance_server"),
    ("grpc/_cython/cygrpc", "grpc Cython and C core"),
    ("grpc/", "grpc Python"),
    ("psycopg_binary/", "psycopg C"),
    ("psycopg_pool/", "psycopg_pool"),
    ("psycopg/", "psycopg Python"),
    ("google/protobuf", "protobuf"),
    ("asyncio/", "asyncio"),
    ("logging/", "logging"),
)
SYSTEM_CALLS: Final = frozenset(
    {"sendmsg", "send", "sendto", "write", "writev", "recv", "recvfrom", "recvmsg", "read", "epoll_ctl", "syscall"}
)
WAITS: Final = frozenset({"epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pthread_cond_wait", "futex"})


def _function(frame: str) -> str:
    """ "name (path/file.py:123)" without the line number."""
    return frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") and ".py:" in frame else frame


def _layer(frames: list[str]) -> str:
    """Who the sample's time belongs to: the innermost frame of a known package or extension;
    CPython's own C frames count for the Python code that called them."""
    for frame in reversed(frames):
        for marker, name in LAYERS:
            if marker in frame:
                return name
    return "other Python and CPython"


def _classify(frames: list[str]) -> str:
    leaf = frames[-1].split(" ", 1)[0]
    if "libc.so" in frames[-1] and leaf in WAITS:
        return "idle"
    if "libc.so" in frames[-1] and leaf in SYSTEM_CALLS:
        return f"kernel: {leaf} from {_layer(frames[:-1])}"
    return _layer(frames)


def summarize_profile(path: Path, top: int) -> dict[str, Any]:
    """CPU samples by layer, own (leaf) samples by function, and inclusive samples of the service's
    own functions; samples of threads waiting in epoll (idle, counted with --native) left out."""
    layers: dict[str, int] = {}
    own: dict[str, int] = {}
    service: dict[str, int] = {}
    busy = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count, frames = int(count_text), [_function(frame) for frame in stack.split(";")]
        layer = _classify(frames)
        if layer == "idle":
            idle += count
            continue
        busy += count
        layers[layer] = layers.get(layer, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in {frame for frame in frames if "balance_server/" in frame}:
            service[frame] = service.get(frame, 0) + count

    def ranked(counts: dict[str, int], limit: int) -> list[tuple[str, int, float]]:
        best = sorted(counts.items(), key=lambda item: -item[1])[:limit]
        return [(name, count, count / max(busy, 1)) for name, count in best]

    return {
        "busy_samples": busy,
        "idle_samples": idle,
        "layers": ranked(layers, len(layers)),
        "own": ranked(own, top),
        "service_inclusive": ranked(service, top),
    }


def print_profile(summary: dict[str, Any], path: Path) -> None:
    print(
        f"\nserver profile under transfer_uniform (py-spy, {path.relative_to(RESULTS_DIRECTORY.parent.parent)}): "
        f"{summary['busy_samples']:,} busy samples, {summary['idle_samples']:,} idle ones left out"
    )
    sections = (
        ("CPU by layer (innermost known frame; system calls apart)", "layers"),
        ("own time by function", "own"),
        ("inclusive time of the service's own functions", "service_inclusive"),
    )
    for title, key in sections:
        print(f"\n{title}:")
        for name, count, share in summary[key]:
            print(f"  {share:6.1%} {count:>7,}  {name}")


# Modes.


def run_windows(bench: Bench, configurations: Sequence[tuple[int, Sequence[str]]]) -> list[Run]:
    """--runs runs; each measures the baseline, then every configuration's scenarios, each on a
    server of its own with that many workers."""
    arguments = bench.arguments
    runs = []
    for number in range(1, arguments.runs + 1):
        run = Run(number)
        run_baseline(bench, run)
        for workers, scenarios in configurations:
            log_path = LOGS_DIRECTORY / f"server-run{number}-{workers}-workers.log"
            with running_server(bench.dsn, log_path, workers=workers, log_level=arguments.server_log_level) as server:
                if "list_last_page" in scenarios and not bench.page_token:
                    find_page_token(bench, server)
                for scenario in scenarios:
                    window = run_window(bench, server, scenario, number, seconds=arguments.duration)
                    run.windows.append(window)
                    _report_window(window, run)
        runs.append(run)
    return runs


def _report_window(window: Window, run: Run) -> None:
    baseline = run.baseline.get("one_call")
    ratio = f", {window.calls_per_second / baseline.tps:.2f}x pgbench" if baseline and baseline.tps else ""
    workers = f"{window.workers} worker{'s' if window.workers > 1 else ''}"
    progress(
        f"run {window.run}: {window.scenario} ({workers}): {window.calls_per_second:,.0f} calls/s, "
        f"p50 {window.p50_ms:.1f} ms, p99 {window.p99_ms:.1f} ms{ratio}, {_statuses_text(window.statuses)}"
    )


def run_soak(bench: Bench) -> Window:
    arguments = bench.arguments
    log_path = LOGS_DIRECTORY / "server-soak.log"
    with running_server(bench.dsn, log_path, workers=arguments.workers, log_level=arguments.server_log_level) as server:
        progress(f"soak: transfer_uniform for {arguments.soak:.0f} s, server memory every {SOAK_SAMPLE_SECONDS:.0f} s")
        return run_window(bench, server, "transfer_uniform", 1, seconds=arguments.soak)


def run_profile(bench: Bench) -> tuple[Window, dict[str, Any], Path]:
    arguments = bench.arguments
    output = RESULTS_DIRECTORY / "profile-transfer_uniform.txt"
    with running_server(
        bench.dsn,
        LOGS_DIRECTORY / "server-profile.log",
        workers=arguments.workers,
        log_level=arguments.server_log_level,
    ) as server:
        window = run_window(bench, server, "transfer_uniform", 1, seconds=arguments.duration, profile=output)
    return window, summarize_profile(output, arguments.profile_top), output


# Summaries.


@dataclass
class Row:
    label: str
    scenario: str
    workers: int
    windows: list[Window]
    calls_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: dict[str, int]
    ratio_one_call: float | None
    ratio_five_statements: float | None
    target: str = ""
    met: bool | None = None
    measured: str = ""


def _median(values: Iterator[float] | list[float]) -> float:
    listed = list(values)
    return statistics.median(listed) if listed else 0.0


def _ratio_median(runs: list[Run], scenario: str, workers: int, form: str) -> float | None:
    ratios = []
    for run in runs:
        window, baseline = run.window(scenario, workers), run.baseline.get(form)
        if window is not None and baseline is not None and baseline.tps > 0:
            ratios.append(window.calls_per_second / baseline.tps)
    return statistics.median(ratios) if ratios else None


def _paired_median(runs: list[Run], workers: int, numerator: str, denominator: str, metric: str) -> float | None:
    """Median over runs of one scenario's metric over another's in the same run."""
    ratios = []
    for run in runs:
        top, bottom = run.window(numerator, workers), run.window(denominator, workers)
        if top is not None and bottom is not None and getattr(bottom, metric) > 0:
            ratios.append(getattr(top, metric) / getattr(bottom, metric))
    return statistics.median(ratios) if ratios else None


def summarize(runs: list[Run], page_number: int) -> list[Row]:
    keys: list[tuple[str, int]] = []
    for run in runs:
        for window in run.windows:
            if (window.scenario, window.workers) not in keys:
                keys.append((window.scenario, window.workers))
    worker_counts = {workers for _, workers in keys}
    rows = []
    for scenario, workers in keys:
        windows = [w for run in runs if (w := run.window(scenario, workers)) is not None]
        statuses: dict[str, int] = {}
        for window in windows:
            for key, count in window.statuses.items():
                statuses[key] = statuses.get(key, 0) + count
        label = f"list page {page_number:,}" if scenario == "list_last_page" else scenario
        label = label.replace("list_first_page", "list page 1")
        if len(worker_counts) > 1:
            label += f" ({workers} worker{'s' if workers > 1 else ''})"
        row = Row(
            label=label,
            scenario=scenario,
            workers=workers,
            windows=windows,
            calls_per_second=_median(w.calls_per_second for w in windows),
            p50_ms=_median(w.p50_ms for w in windows),
            p95_ms=_median(w.p95_ms for w in windows),
            p99_ms=_median(w.p99_ms for w in windows),
            statuses=statuses,
            ratio_one_call=_ratio_median(runs, scenario, workers, "one_call"),
            ratio_five_statements=_ratio_median(runs, scenario, workers, "five_statements"),
        )
        _judge(row, runs)
        rows.append(row)
    return rows


def _judge(row: Row, runs: list[Run]) -> None:
    """The issue's target for the row's scenario, if it has one, and whether the medians meet it."""
    if row.scenario == "transfer_uniform" and row.ratio_one_call is not None:
        row.target = f">= {TRANSFER_RATIO_TARGET}x pgbench 1-call, p99 < {TRANSFER_P99_MS_TARGET:.0f} ms"
        row.met = row.ratio_one_call >= TRANSFER_RATIO_TARGET and row.p99_ms < TRANSFER_P99_MS_TARGET
        row.measured = f"{row.ratio_one_call:.2f}x, p99 {row.p99_ms:.1f} ms"
    elif row.scenario == "transfer_hot":
        ratio = _paired_median(runs, row.workers, "transfer_hot", "transfer_uniform", "calls_per_second")
        aborted = sum(count for key, count in row.statuses.items() if key.endswith(" ABORTED"))
        row.target = f">= {HOT_RATIO_TARGET}x transfer_uniform, no ABORTED"
        if ratio is not None:
            row.met = ratio >= HOT_RATIO_TARGET and aborted == 0
            row.measured = f"{ratio:.2f}x uniform, {aborted} ABORTED"
    elif row.scenario == "get_balance":
        row.target = f">= {GET_BALANCE_CALLS_PER_SECOND_TARGET:,.0f} calls/s"
        row.met = row.calls_per_second >= GET_BALANCE_CALLS_PER_SECOND_TARGET
        row.measured = f"{row.calls_per_second:,.0f} calls/s"
    elif row.scenario == "list_last_page":
        ratio = _paired_median(runs, row.workers, "list_last_page", "list_first_page", "p50_ms")
        row.target = f"p50 <= {LAST_PAGE_LATENCY_RATIO_TARGET}x page 1's"
        if ratio is not None:
            row.met = ratio <= LAST_PAGE_LATENCY_RATIO_TARGET
            row.measured = f"{ratio:.2f}x page 1"


def _statuses_text(statuses: dict[str, int]) -> str:
    by_code: dict[str, int] = {}
    for key, count in statuses.items():
        code = key.rsplit(" ", 1)[-1]
        by_code[code] = by_code.get(code, 0) + count
    return " ".join(f"{code} {count:,}" for code, count in sorted(by_code.items(), key=lambda item: -item[1]))


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def print_baseline(runs: list[Run], arguments: argparse.Namespace) -> None:
    print(
        f"\nbaseline: pgbench at SERIALIZABLE, --max-tries {_baseline.RETRIES_MAX}, -c {arguments.in_flight} "
        f"-j {arguments.pgbench_threads}, -M prepared, {arguments.duration:.0f} s per run"
    )
    header = (
        f"{'form':<50}{'tps':>9}{'per run':>22}{'p50 ms':>8}{'p99 ms':>8}{'failed':>8}{'retried':>9}{'PG us/tx':>10}"
    )
    print(header)
    print("-" * len(header))
    for form in BASELINE_FORMS:
        results = [run.baseline[form] for run in runs if form in run.baseline]
        if not results:
            continue
        per_run = "/".join(f"{result.tps:,.0f}" for result in results)
        postgres_us = _median(r.postgres_cpu_seconds / max(r.transactions, 1) * 1e6 for r in results)
        print(
            f"{_baseline.DESCRIPTIONS[form]:<50}{_median(r.tps for r in results):>9,.0f}{per_run:>22}"
            f"{_median(r.p50_ms for r in results):>8.1f}{_median(r.p99_ms for r in results):>8.1f}"
            f"{sum(r.failed for r in results):>8,}{sum(r.retried for r in results):>9,}{postgres_us:>10.0f}"
        )


def print_rows(rows: list[Row], arguments: argparse.Namespace) -> None:
    print(
        f"\nservice: {arguments.in_flight} calls in flight from {arguments.client_processes} client processes, "
        f"{arguments.warmup:.0f} s warm-up then {arguments.duration:.0f} s measured, medians of {arguments.runs} "
        "run(s); calls/s and latencies count successful calls; ratios are medians of each run's ratio to that "
        "run's pgbench one-call (vs pgbench) and five-statement (vs 5-stmt) transfers per second"
    )
    header = (
        f"{'scenario':<30}{'calls/s':>9}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'vs pgbench':>11}{'vs 5-stmt':>10}"
        f"  {'target':<42}{'met?':<6}{'measured':<28}statuses (all runs)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        print(
            f"{row.label:<30}{row.calls_per_second:>9,.0f}{row.p50_ms:>8.1f}{row.p95_ms:>8.1f}{row.p99_ms:>8.1f}"
            f"{_ratio_text(row.ratio_one_call):>11}{_ratio_text(row.ratio_five_statements):>10}"
            f"  {row.target or '-':<42}{met:<6}{row.measured or '-':<28}{_statuses_text(row.statuses)}"
        )


def print_resources(rows: list[Row]) -> None:
    print("\nwhere the time went (medians over runs; CPU per call in microseconds over the measured window)")
    header = (
        f"{'scenario':<30}{'RSS start MB':>13}{'RSS end MB':>11}{'DB rollbacks':>13}{'per 1k calls':>13}"
        f"{'exhausted':>10}{'health lost':>12}{'server us':>10}{'PG us':>8}{'client us':>10}{'machine':>9}{'other':>7}"
        f"{'busiest client':>15}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        windows = row.windows

        def per_call(seconds: float, window: Window) -> float:
            return seconds / max(window.calls, 1) * 1e6

        rollbacks = sum(w.db_rollbacks for w in windows)
        calls = sum(w.calls for w in windows)
        capacity = [w.seconds * (os.cpu_count() or 1) for w in windows]
        print(
            f"{row.label:<30}{_median(w.rss_start_mb for w in windows):>13.1f}"
            f"{_median(w.rss_end_mb for w in windows):>11.1f}"
            f"{rollbacks:>13,}{rollbacks / max(calls, 1) * 1000:>13.1f}"
            f"{sum(w.retries_exhausted_logged for w in windows):>10,}"
            f"{sum(w.health_lost_logged for w in windows):>12,}"
            f"{_median(per_call(w.server_cpu_seconds, w) for w in windows):>10.0f}"
            f"{_median(per_call(w.postgres_cpu_seconds, w) for w in windows):>8.0f}"
            f"{_median(per_call(w.client_cpu_seconds, w) for w in windows):>10.0f}"
            f"{_median(w.machine_busy_share for w in windows):>9.0%}"
            f"{_median(w.other_cpu_seconds / c for w, c in zip(windows, capacity, strict=True)):>7.0%}"
            f"{_median(w.client_cpu_busiest_share for w in windows):>15.0%}"
        )
    print(
        "DB rollbacks: serialization failures retried by the server (pg_stat_database); exhausted: operations out "
        "of retries (ABORTED); health lost: a server process's database ping failed, so it refused calls with "
        "UNAVAILABLE until the next one passed\nmachine: busy share of all CPUs; other: CPU of processes outside "
        "server, PostgreSQL and clients (other tenants); busiest client: one client process's CPU over the window "
        "(near 100 %: the generator limits)"
    )


def print_scaling(rows: list[Row]) -> dict[str, float]:
    scaling = {}
    for scenario in SCALING_SCENARIOS:
        by_workers = {row.workers: row.calls_per_second for row in rows if row.scenario == scenario}
        if 1 in by_workers and 2 in by_workers and by_workers[1] > 0:
            scaling[scenario] = by_workers[2] / by_workers[1]
    if scaling:
        print("\nscaling from 1 to 2 workers: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in scaling.items()))
    return scaling


def print_soak(window: Window) -> dict[str, Any]:
    first = window.rss_samples_mb[0][1]
    last = window.rss_samples_mb[-1][1]
    growth = (last - first) / first if first else 0.0
    print(
        f"\nsoak: transfer_uniform for {window.seconds:.0f} s: {window.calls_per_second:,.0f} calls/s, "
        f"p99 {window.p99_ms:.1f} ms, {_statuses_text(window.statuses)}"
    )
    print(f"{'seconds':>8}{'server RSS MB':>15}{'calls/s in the last 30 s':>26}")
    for index, (at, rss) in enumerate(window.rss_samples_mb):
        rate = (
            window.calls_per_bucket[index - 1] / SOAK_SAMPLE_SECONDS
            if 0 < index <= len(window.calls_per_bucket)
            else None
        )
        print(f"{at:>8.0f}{rss:>15.1f}{'-' if rate is None else f'{rate:,.0f}':>26}")
    met = growth <= SOAK_RSS_GROWTH_TARGET
    print(
        f"RSS growth {growth:+.1%} from the end of warm-up ({first:.1f} -> {last:.1f} MB); "
        f"target within {SOAK_RSS_GROWTH_TARGET:.0%}: {'met' if met else 'MISSED'}"
    )
    return {"rss_growth": growth, "rss_first_mb": first, "rss_last_mb": last, "met": met}


# Output.


def machine_facts() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
    }


def service_version() -> str:
    """The commit the server ran from, marked when its code differs from that commit."""
    repository = RESULTS_DIRECTORY.parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repository, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "balance_server"],
            cwd=repository,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" with uncommitted changes to balance_server/" if changed else "")


def results_path(arguments: argparse.Namespace) -> Path:
    for mode in ("scaling", "soak", "profile"):
        if getattr(arguments, mode):
            return RESULTS_PATH.with_name(f"load-{mode}.json")
    return RESULTS_PATH


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nfigures written to {path.relative_to(RESULTS_DIRECTORY.parent.parent)}")


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "label": row.label,
        "scenario": row.scenario,
        "workers": row.workers,
        "calls_per_second": round(row.calls_per_second, 1),
        "p50_ms": round(row.p50_ms, 3),
        "p95_ms": round(row.p95_ms, 3),
        "p99_ms": round(row.p99_ms, 3),
        "statuses": row.statuses,
        "ratio_to_pgbench_one_call": row.ratio_one_call,
        "ratio_to_pgbench_five_statements": row.ratio_five_statements,
        "target": row.target or None,
        "met": row.met,
        "measured": row.measured or None,
        "rss_start_mb": _median(w.rss_start_mb for w in row.windows),
        "rss_end_mb": _median(w.rss_end_mb for w in row.windows),
        "db_rollbacks": sum(w.db_rollbacks for w in row.windows),
        "retries_exhausted_logged": sum(w.retries_exhausted_logged for w in row.windows),
        "health_lost_logged": sum(w.health_lost_logged for w in row.windows),
    }


# Lifecycle.


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000, help="funded users")
    parser.add_argument("--history", type=int, default=500_000, help="transactions of the history user")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per scenario and run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each measured window")
    parser.add_argument("--runs", type=int, default=3, help="runs; figures are their medians")
    parser.add_argument("--in-flight", type=int, default=64, help="calls in flight (and pgbench clients)")
    parser.add_argument("--client-processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels (connections) per client process")
    parser.add_argument("--workers", type=int, default=1, help="server processes (balance-server --workers)")
    parser.add_argument("--pgbench-threads", type=int, default=2, help="pgbench -j")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenarios to run")
    parser.add_argument("--server-log-level", default="INFO", help="the server's --log-level (its default: INFO)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DATA_DIRECTORY_DEFAULT,
        help="embedded PostgreSQL data folder; loaded data there is reused when the sizes match",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--scaling", action="store_true", help="transfer_uniform and get_balance with 1 and 2 workers")
    mode.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="transfer_uniform this long; RSS")
    mode.add_argument("--profile", action="store_true", help="py-spy profile of the server under transfer_uniform")
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed in the profile summary")
    parser.add_argument(
        "--profile-python-only", action="store_true", help="with --profile: Python frames only (less overhead)"
    )
    arguments = parser.parse_args()
    arguments.scenarios = tuple(name for name in arguments.scenarios.split(",") if name)
    unknown = set(arguments.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    if arguments.users < 2 * _load_client.HOT_USERS or arguments.history < PAGE_SIZE:
        parser.error(f"--users must be at least {2 * _load_client.HOT_USERS} and --history at least {PAGE_SIZE}")
    if not 1 <= arguments.in_flight <= IN_FLIGHT_MAX or arguments.client_processes < 1 or arguments.channels < 1:
        parser.error(f"--in-flight must be 1..{IN_FLIGHT_MAX}; --client-processes and --channels at least 1")
    if arguments.client_processes > arguments.in_flight:
        parser.error("--client-processes must not exceed --in-flight")
    if not 1 <= arguments.duration <= DURATION_SECONDS_MAX or not 0 <= arguments.warmup <= DURATION_SECONDS_MAX:
        parser.error(f"--duration must be 1..{DURATION_SECONDS_MAX:.0f} s and --warmup 0..{DURATION_SECONDS_MAX:.0f} s")
    if not 0 <= arguments.soak <= DURATION_SECONDS_MAX or 0 < arguments.soak < SOAK_SAMPLE_SECONDS:
        parser.error(f"--soak must be at least {SOAK_SAMPLE_SECONDS:.0f} s and at most {DURATION_SECONDS_MAX:.0f} s")
    if not 1 <= arguments.runs <= RUNS_MAX or not 1 <= arguments.workers <= 8:
        parser.error(f"--runs must be 1..{RUNS_MAX} and --workers 1..8")
    return arguments


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


def measure(bench: Bench) -> dict[str, Any]:
    """Runs the chosen mode and prints its tables; returns what goes to the JSON file."""
    arguments = bench.arguments
    results: dict[str, Any] = {}
    if arguments.soak:
        window = run_soak(bench)
        results["soak"] = {**print_soak(window), "window": asdict(window)}
        return results
    if arguments.profile:
        window, summary, path = run_profile(bench)
        print(f"\ntransfer_uniform while profiled: {window.calls_per_second:,.0f} calls/s, p99 {window.p99_ms:.1f} ms")
        print_profile(summary, path)
        results["profile"] = {"summary": summary, "raw": str(path), "window": asdict(window)}
        return results
    if arguments.scaling:
        configurations: list[tuple[int, Sequence[str]]] = [(1, SCALING_SCENARIOS), (2, SCALING_SCENARIOS)]
    else:
        configurations = [(arguments.workers, arguments.scenarios)]
    runs = run_windows(bench, configurations)
    rows = summarize(runs, bench.page_number)
    print_baseline(runs, arguments)
    print_rows(rows, arguments)
    print_resources(rows)
    results["scaling"] = print_scaling(rows)
    results["rows"] = [_row_json(row) for row in rows]
    results["runs"] = [asdict(run) for run in runs]
    return results


def main() -> int:
    arguments = parse_arguments()
    LOGS_DIRECTORY.mkdir(parents=True, exist_ok=True)
    dataset = _load_data.Dataset(arguments.users, arguments.history)
    started = time.perf_counter()
    facts = machine_facts()
    facts["service_version"] = service_version()
    clients = ClientPool(arguments.client_processes)
    embedded = EmbeddedPostgres(arguments.data_dir)
    copy = None
    try:
        admin_dsn = embedded.start()
        _load_data.prepare_template(admin_dsn, dataset)
        copy = _load_data.copy_template(admin_dsn)
        dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=copy)
        bench = Bench(arguments, clients, dsn, admin_dsn, postmaster_pid(embedded.data_dir), dataset)
        results = measure(bench)
    finally:
        clients.close()
        if copy is not None:
            _load_data.drop_database(admin_dsn, copy)
        embedded.stop()
    facts["load_average_after"] = os.getloadavg()
    print(
        f"\nmachine: {facts['cpus']} CPUs ({facts['cpu_model']}), shared with other tenants: load average "
        f"{facts['load_average'][0]:.2f} before, {facts['load_average_after'][0]:.2f} after; "
        f"{time.perf_counter() - started:.0f} s in all; server code {facts['service_version']}"
    )
    parameters = {key: str(value) if isinstance(value, Path) else value for key, value in vars(arguments).items()}
    write_results(
        results_path(arguments),
        {
            "recorded_at": datetime.now(UTC).isoformat(),
            "parameters": parameters,
            "machine": facts,
            "page_number": bench.page_number,
            "targets": {
                "transfer_ratio_to_pgbench_one_call": TRANSFER_RATIO_TARGET,
                "transfer_p99_ms": TRANSFER_P99_MS_TARGET,
                "hot_ratio_to_uniform": HOT_RATIO_TARGET,
                "get_balance_calls_per_second": GET_BALANCE_CALLS_PER_SECOND_TARGET,
                "last_page_p50_ratio_to_first": LAST_PAGE_LATENCY_RATIO_TARGET,
                "soak_rss_growth": SOAK_RSS_GROWTH_TARGET,
            },
            **results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
