"""The `balance` command line, run as a subprocess against a real server: every subcommand's exit
status and output, human and `--json`, errors, and the connection options and variables.

Starting a process costs about half a second, so independent runs go concurrently."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from balance_client import AsyncBalanceClient
from tests.e2e.test_client import start_faulty_server

_SCRIPT = Path(sys.executable).with_name("balance")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "balance_client.cli"]


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def balance(*arguments: str, environment: dict[str, str] | None = None) -> Run:
    """Runs `balance` with only the BALANCE_* variables given, and wide enough that tables do not wrap."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("BALANCE_")}
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**inherited, "COLUMNS": "200", **(environment or {})},
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
def target(running) -> str:
    return f"127.0.0.1:{running.port}"


@pytest.fixture
def cli(target):
    """Call it with arguments to run `balance --target <the test server> ...`."""
    return lambda *arguments: balance("--target", target, *arguments)


@pytest.fixture
async def client(target):
    async with AsyncBalanceClient(target) as opened:
        yield opened


def _table_row(output: str, *cells: str) -> str:
    """The one line of a table holding these cells, in order, separated by blanks."""
    pattern = re.compile(r"\s+".join(re.escape(cell) for cell in cells))
    rows = [line for line in output.splitlines() if pattern.search(line)]
    assert len(rows) == 1, output
    return rows[0]


# Money operations


async def test_deposit_prints_the_description_key_and_accounts(cli, new_id):
    """`deposit` exits 0 and prints the transaction's sentence, its key and the user's accounts as a table."""
    user, key = new_id(), f"pay-{new_id()}"
    run = await cli("deposit", str(user), "199.99", "--source", "visa-4421", "--key", key)
    assert (run.code, run.stderr) == (0, "")
    lines = run.stdout.splitlines()
    assert lines[0] == f"Deposit of 199.99 USD to user {user} from payment source 'visa-4421'."
    assert re.fullmatch(rf"key\s+{key}", lines[2])
    _table_row(run.stdout, str(user), "regular", "199.99 USD")
    _table_row(run.stdout, str(user), "reserve", "0.00 USD")


async def test_withdraw_and_transfer_print_json_with_exact_amounts(cli, client, new_id):
    """`withdraw` and `transfer` with --json print the receipt as JSON, amounts as exact strings."""
    user, receiver = new_id(), new_id()
    await client.deposit(user, "100.00")
    withdrawn = (await cli("withdraw", str(user), "30.5", "--destination", "iban-1", "--json")).json()
    transferred = (await cli("--json", "transfer", str(user), str(receiver), "19.50", "--comment", "rent")).json()
    assert (withdrawn["transaction"]["kind"], withdrawn["transaction"]["amount"]) == ("withdrawal", "30.50")
    assert withdrawn["accounts"][0] == {**withdrawn["accounts"][0], "kind": "regular", "balance": "69.50"}
    assert (transferred["transaction"]["to_user_id"], transferred["accounts"][0]["balance"]) == (receiver, "50.00")
    assert transferred["replayed"] is False


async def test_deposit_keeps_every_currencys_precision(cli, new_id):
    """`deposit --currency` keeps the currency's minor digits (CLF has 4) in the JSON it prints."""
    run = await cli("deposit", str(new_id()), "1.2345", "--currency", "CLF", "--json")
    assert (run.json()["transaction"]["amount"], run.json()["transaction"]["currency"]) == ("1.2345", "CLF")


async def test_reserve_release_and_revenue_move_the_orders_money(cli, client, new_id):
    """`reserve`, `release` and `revenue` (with and without AMOUNT) exit 0 and print what moved."""
    user, service, cancelled, delivered, whole = new_id(), new_id(), new_id(), new_id(), new_id()
    await client.deposit(user, "100.00")
    reserved = await cli("reserve", str(user), str(service), str(cancelled), "60", "--service-name", "Delivery")
    assert (
        reserved.stdout.splitlines()[0]
        == f"Reserved 60.00 USD of user {user} for order {cancelled} (service {service})."
    )
    released = await cli("release", str(cancelled), "--json")
    assert (released.json()["transaction"]["kind"], released.json()["accounts"][0]["balance"]) == ("release", "100.00")
    await client.reserve(user, service, delivered, "40.00")
    await client.reserve(user, service, whole, "10.00")
    partial, everything = await asyncio.gather(
        cli("revenue", str(user), str(service), str(delivered), "30", "--json"),
        cli("revenue", str(user), str(service), str(whole), "--json"),
    )
    assert (partial.code, partial.json()["transaction"]["amount"]) == (0, "30.00")
    assert (everything.code, everything.json()["transaction"]["amount"]) == (0, "10.00")


async def test_a_repeated_request_says_nothing_moved(cli, client, new_id):
    """Repeating a deposit with its key exits 0, prints the original and says that nothing moved."""
    user, key = new_id(), f"again-{new_id()}"
    original = await client.deposit(user, "5.00", idempotency_key=key)
    run = await cli("deposit", str(user), "5.00", "--key", key)
    assert run.code == 0
    assert "This repeated an earlier request: nothing moved this time." in run.stdout.splitlines()
    assert str(original.transaction.transaction_id) in run.stdout


# Reads


async def test_show_lists_every_currency_with_amounts_right_aligned(cli, client, new_id):
    """`show` prints one row per account with amounts right-aligned; --json before or after the command agrees."""
    user = new_id()
    await client.deposit(user, "5.00")
    await client.deposit(user, "1500", currency="JPY")
    table, after, before = await asyncio.gather(
        cli("show", str(user)), cli("show", str(user), "--json"), cli("--json", "show", str(user))
    )
    rows = [
        _table_row(table.stdout, str(user), kind, amount)
        for kind, amount in (("regular", "5.00 USD"), ("regular", "1500 JPY"), ("reserve", "0 JPY"))
    ]
    ends = {
        row.index(amount) + len(amount) for row, amount in zip(rows, ("5.00 USD", "1500 JPY", "0 JPY"), strict=True)
    }
    assert len(ends) == 1
    assert after.json() == before.json()
    assert sorted((a["currency"], a["kind"], a["balance"]) for a in after.json()) == [
        ("JPY", "regular", "1500"),
        ("JPY", "reserve", "0"),
        ("USD", "regular", "5.00"),
        ("USD", "reserve", "0.00"),
    ]


async def test_history_sorts_limits_and_filters(cli, client, new_id):
    """`history` honours --limit, --all, --sort amount --asc, --kind and a --since/--until window."""
    user = new_id()
    deposits = [(await client.deposit(user, amount)).transaction for amount in ("3.00", "1.00", "2.00")]
    await client.withdraw(user, "0.50")
    since, until = deposits[0].created_at.isoformat(), deposits[2].created_at.isoformat()
    newest, ascending, withdrawals, window, human = await asyncio.gather(
        cli("history", str(user), "--limit", "2", "--json"),
        cli("history", str(user), "--sort", "amount", "--asc", "--all", "--json"),
        cli("history", str(user), "--kind", "withdrawal", "--json"),
        cli("history", str(user), "--since", since, "--until", until, "--json"),
        cli("history", str(user), "--limit", "1"),
    )
    assert [t["amount"] for t in newest.json()] == ["0.50", "2.00"]
    assert [t["amount"] for t in ascending.json()] == ["0.50", "1.00", "2.00", "3.00"]
    assert [t["kind"] for t in withdrawals.json()] == ["withdrawal"]
    assert [t["amount"] for t in window.json()] == ["1.00", "3.00"]
    assert human.code == 0
    _table_row(human.stdout, "withdrawal", "0.50 USD", f"Withdrawal of 0.50 USD from user {user}")
    assert human.stderr == "(the first 1; more with --limit N or --all)\n"


async def test_order_prints_its_amounts_and_status(cli, client, new_id):
    """`order` prints what the order reserved, captured and released, as facts or as JSON."""
    user, service, order = new_id(), new_id(), new_id()
    await client.deposit(user, "100.00")
    await client.reserve(user, service, order, "60.00", service_name="Delivery")
    await client.recognize_revenue(user, service, order, "45.00")
    human, machine = await asyncio.gather(cli("order", str(order)), cli("order", str(order), "--json"))
    assert re.search(rf"service\s+{service} \(Delivery\)", human.stdout)
    assert re.search(r"status\s+captured", human.stdout)
    assert re.search(r"released\s+15\.00 USD", human.stdout)
    assert {
        key: machine.json()[key] for key in ("status", "reserved_amount", "captured_amount", "released_amount")
    } == {
        "status": "captured",
        "reserved_amount": "60.00",
        "captured_amount": "45.00",
        "released_amount": "15.00",
    }


async def test_health_prints_serving(cli):
    """`health` prints SERVING and exits 0; an unknown service exits 1 naming NOT_FOUND."""
    plain, machine, unknown = await asyncio.gather(
        cli("health"), cli("health", "--json"), cli("health", "no.such.Service")
    )
    assert (plain.code, plain.stdout) == (0, "SERVING\n")
    assert machine.json() == {"status": "SERVING"}
    assert unknown.code == 1
    assert unknown.stderr.startswith("balance: NOT_FOUND")


# Downloads


async def test_report_saves_the_month_and_verifies_its_checksum(cli, client, new_id, tmp_path):
    """`report` saves the month's CSV under the server's name (or to stdout) and prints its verified SHA-256."""
    user, service, order = new_id(), new_id(), new_id()
    await client.deposit(user, "100.00")
    await client.reserve(user, service, order, "60.00", service_name="Courier")
    await client.recognize_revenue(user, service, order, "42.00")
    month = f"{datetime.now(UTC):%Y-%m}"
    saved, streamed, named = await asyncio.gather(
        cli("report", month, "-o", str(tmp_path), "--json"),
        cli("report", month, "-o", "-", "--currency", "USD", "--tz", "UTC"),
        cli("report", month, "-o", str(tmp_path / "mine.csv")),
    )
    summary = saved.json()
    data = (tmp_path / f"revenue_{month}.csv").read_bytes()
    assert (summary["filename"], summary["sha256"]) == (f"revenue_{month}.csv", hashlib.sha256(data).hexdigest())
    assert f"\n{service};Courier;42.00;USD\n".encode() in data
    assert streamed.stdout.startswith("service_id;service_name;revenue;currency\n")
    assert f"\n{service};Courier;42.00;USD\n" in streamed.stdout
    assert streamed.stderr.startswith(f"saved revenue_{month}.csv: ")
    assert named.stdout.endswith(f"verified, to {tmp_path / 'mine.csv'}\n")
    assert re.match(rf"saved revenue_{month}\.csv: \d+ rows?, \d+ bytes, SHA-256 [0-9a-f]{{64}} verified", named.stdout)


async def test_statement_saves_the_users_csv(cli, client, new_id, tmp_path):
    """`statement` writes the user's transactions of the window, oldest first, to the file -o names."""
    user = new_id()
    first = await client.deposit(user, "10.00")
    await client.withdraw(user, "4.00")
    run = await cli(
        "statement", str(user), "--since", first.transaction.created_at.isoformat(), "-o", str(tmp_path / "s.csv")
    )
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert run.code == 0
    assert [line.split(";")[2] for line in lines[1:]] == ["deposit", "withdrawal"]
    assert "2 rows" in run.stdout


# Errors


async def test_refusals_exit_one_with_one_line_naming_the_reason(cli, client, new_id):
    """A refused call exits 1 with one stderr line naming the reason (and the field); --json also prints it."""
    user, order = new_id(), new_id()
    await client.deposit(user, "5.00")
    poor, malformed, missing, machine = await asyncio.gather(
        cli("withdraw", str(user), "1000"),
        cli("deposit", str(user), "1e5"),
        cli("order", str(order)),
        cli("withdraw", str(user), "1000", "--json"),
    )
    assert (poor.code, poor.stdout) == (1, "")
    assert poor.stderr == f"balance: INSUFFICIENT_FUNDS: user {user} has 5.00 USD available, less than 1000.00\n"
    assert (malformed.code, malformed.stderr) == (
        1,
        'balance: INVALID_AMOUNT (amount): amount must be a plain decimal such as "199.99"\n',
    )
    assert (missing.code, missing.stderr) == (1, f"balance: ORDER_NOT_FOUND: order {order} does not exist\n")
    error = machine.json()["error"]
    assert (machine.code, error["code"], error["reason"], error["metadata"]["available"]) == (
        1,
        "FAILED_PRECONDITION",
        "INSUFFICIENT_FUNDS",
        "5.00",
    )


async def test_an_unreachable_server_exits_one_naming_unavailable():
    """With nothing listening at the target, a command exits 1 with one line naming UNAVAILABLE."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = await balance("--target", f"127.0.0.1:{port}", "--timeout", "1", "show", "1")
    assert run.code == 1
    assert re.fullmatch(r"balance: UNAVAILABLE: [^\n]+\n", run.stderr)


async def test_usage_errors_exit_two(cli):
    """Arguments that do not parse (a month 13, a user 0, --limit with --all) exit 2 before any call."""
    month, user, both = await asyncio.gather(
        cli("report", "2026-13"), cli("deposit", "0", "5"), cli("history", "1", "--limit", "5", "--all")
    )
    assert (month.code, user.code, both.code) == (2, 2, 2)
    assert "'2026-13' is not a month" in month.stderr
    assert "Usage: balance deposit" in user.stderr
    assert "--limit and --all exclude each other" in both.stderr


# Connection options


async def test_environment_variables_and_flags_set_target_and_token(dsn, settings):
    """BALANCE_TARGET and BALANCE_TOKEN configure the connection; --token wins over its variable."""
    faults, running = await start_faulty_server(dsn, settings)
    try:
        environment = {"BALANCE_TARGET": f"127.0.0.1:{running.port}", "BALANCE_TOKEN": "from-env"}
        from_environment, from_flag = await asyncio.gather(
            balance("health", environment=environment),
            balance("--token", "from-flag", "health", environment=environment),
        )
    finally:
        await running.stop(grace_seconds=1)
    assert (from_environment.code, from_flag.code) == (0, 0)
    assert sorted(seen.metadata["authorization"] for seen in faults.seen[""]) == [
        "Bearer from-env",
        "Bearer from-flag",
    ]


@pytest.fixture
def certificate(tmp_path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(certificate),
        ],
        check=True,
        capture_output=True,
    )
    return key, certificate


@pytest.fixture
async def tls_health_server(certificate):
    """A TLS server of grpc.health.v1 alone, serving that certificate."""
    key, certificate = certificate
    tls_server = aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, tls_server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), certificate.read_bytes())])
    port = tls_server.add_secure_port("localhost:0", credentials)
    await tls_server.start()
    yield port, certificate
    await tls_server.stop(grace=None)


async def test_tls_ca_verifies_the_server_certificate(tls_health_server):
    """--tls-ca (or BALANCE_TLS_CA) makes the connection TLS, trusting that certificate."""
    port, certificate = tls_health_server
    flag, variable = await asyncio.gather(
        balance("--target", f"localhost:{port}", "--tls-ca", str(certificate), "health"),
        balance("health", environment={"BALANCE_TARGET": f"localhost:{port}", "BALANCE_TLS_CA": str(certificate)}),
    )
    assert (flag.code, flag.stdout, variable.code, variable.stdout) == (0, "SERVING\n", 0, "SERVING\n")
