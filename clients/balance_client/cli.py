"""`balance`: the balance service from a shell. Tables for people, `--json` for programs.

Exit status: 0 on success; 1 when the service refused or failed the call (one line on stderr
names the reason, and the fields for INVALID_ARGUMENT), or when health is not SERVING; 2 for a
command line that does not parse.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import re
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich import box
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ._channel import TARGET_DEFAULT, TARGET_ENVIRONMENT, TIMEOUT_SECONDS_DEFAULT
from .client import BalanceClient
from .download import Destination
from .errors import BalanceError
from .models import (
    Account,
    Download,
    Order,
    Receipt,
    SortField,
    SortOrder,
    Transaction,
    TransactionKind,
)

HISTORY_LIMIT_DEFAULT = 20
PAGE_SIZE_MAX = 1000
"""The server's largest page; `history --all` asks for pages this large."""
EXIT_FAILURE = 1

# Markup off: descriptions and comments are the users' own text, and "[...]" in them must print as is.
_stdout = Console(markup=False, highlight=False, emoji=False)
_stderr = Console(stderr=True, markup=False, highlight=False, emoji=False)


@dataclasses.dataclass
class _Settings:
    target: str
    token: str | None
    tls_ca: Path | None
    tls: bool
    timeout_seconds: float
    json: bool

    def client(self) -> BalanceClient:
        return BalanceClient(
            self.target,
            tls=self.tls,
            root_certificates=self.tls_ca.read_bytes() if self.tls_ca else None,
            access_token=self.token,
            timeout_seconds=self.timeout_seconds,
        )


class _Commands(click.Group):
    """Turns the client's errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BalanceError as error:
            _fail(ctx, str(error), _jsonable(error))
        except OSError as error:
            _fail(ctx, f"{error.strerror or error}: {error.filename or ''}".rstrip(": "), {"error": str(error)})


def _fail(ctx: click.Context, line: str, details: dict[str, Any]) -> None:
    settings = ctx.find_object(_Settings)
    if settings is not None and settings.json:
        click.echo(json.dumps({"error": details}, indent=2))
    click.echo(f"balance: {line}", err=True)
    ctx.exit(EXIT_FAILURE)


class _Moment(click.ParamType[datetime]):
    """An ISO 8601 date or time; one without a zone is UTC."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date or time such as 2026-11-01 or 2026-11-01T12:00+03:00")
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class _Month(click.ParamType[date]):
    name = "YYYY-MM"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> date:
        match = re.fullmatch(r"(\d{4})-(\d{2})", str(value))
        if match is None or not 1 <= int(match.group(2)) <= 12:
            self.fail(f"{value!r} is not a month such as 2026-11")
        return date(int(match.group(1)), int(match.group(2)), 1)


def _set_json(ctx: click.Context, parameter: click.Parameter, value: bool) -> None:
    if value:
        settings = ctx.find_object(_Settings)
        assert settings is not None, "the group sets the settings before a command parses its options"
        settings.json = True


_json_option = click.option(
    "--json", is_flag=True, expose_value=False, callback=_set_json, help="Print JSON instead of tables."
)
_currency_option = click.option("--currency", default="", help="ISO 4217 code (default: the server's currency).")
_key_option = click.option("--key", default=None, help="Idempotency key (default: a new UUID, kept across retries).")
_USER = click.argument("user", type=click.IntRange(min=1))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--target",
    envvar=TARGET_ENVIRONMENT,
    default=TARGET_DEFAULT,
    show_default=True,
    show_envvar=True,
    help="host:port of the balance server.",
)
@click.option("--token", envvar="BALANCE_TOKEN", show_envvar=True, help="Access token, sent as a Bearer token.")
@click.option(
    "--tls-ca",
    envvar="BALANCE_TLS_CA",
    show_envvar=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM file of root certificates; turns TLS on.",
)
@click.option("--tls", is_flag=True, envvar="BALANCE_TLS", show_envvar=True, help="TLS with the system's roots.")
@click.option(
    "--timeout",
    "timeout_seconds",
    envvar="BALANCE_TIMEOUT",
    show_envvar=True,
    type=click.FloatRange(min=0, min_open=True),
    default=TIMEOUT_SECONDS_DEFAULT,
    show_default=True,
    help="Seconds each attempt of a call may take.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables (also after the command).")
@click.version_option(package_name="balance-client", prog_name="balance")
@click.pass_context
def cli(
    ctx: click.Context,
    target: str,
    token: str | None,
    tls_ca: Path | None,
    tls: bool,
    timeout_seconds: float,
    as_json: bool,
) -> None:
    """Deposits, withdrawals, transfers, orders, history and reports of the balance service."""
    ctx.obj = _Settings(target, token or None, tls_ca, tls, timeout_seconds, as_json)


# Money operations


@cli.command()
@_USER
@click.argument("amount")
@_currency_option
@click.option("--source", default="", help="Where the money came from, e.g. a payment reference.")
@_key_option
@_json_option
@click.pass_obj
def deposit(settings: _Settings, user: int, amount: str, currency: str, source: str, key: str | None) -> None:
    """Money arrives from outside to USER's regular account."""
    with settings.client() as client:
        receipt = client.deposit(user, amount, currency=currency, source=source, idempotency_key=key)
    _show_receipt(settings, receipt)


@cli.command()
@_USER
@click.argument("amount")
@_currency_option
@click.option("--destination", default="", help="Where the money goes, e.g. a payout reference.")
@_key_option
@_json_option
@click.pass_obj
def withdraw(settings: _Settings, user: int, amount: str, currency: str, destination: str, key: str | None) -> None:
    """Money leaves USER's regular account to outside."""
    with settings.client() as client:
        receipt = client.withdraw(user, amount, currency=currency, destination=destination, idempotency_key=key)
    _show_receipt(settings, receipt)


@cli.command()
@click.argument("source_user", metavar="FROM", type=click.IntRange(min=1))
@click.argument("target_user", metavar="TO", type=click.IntRange(min=1))
@click.argument("amount")
@_currency_option
@click.option("--comment", default="", help="Free text kept with the transfer.")
@_key_option
@_json_option
@click.pass_obj
def transfer(
    settings: _Settings, source_user: int, target_user: int, amount: str, currency: str, comment: str, key: str | None
) -> None:
    """Money moves from user FROM to user TO (the sender's accounts are shown)."""
    with settings.client() as client:
        receipt = client.transfer(
            source_user, target_user, amount, currency=currency, comment=comment, idempotency_key=key
        )
    _show_receipt(settings, receipt)


@cli.command()
@_USER
@click.argument("service", type=click.IntRange(min=1))
@click.argument("order", type=click.IntRange(min=1))
@click.argument("amount")
@_currency_option
@click.option("--service-name", default="", help="Name of the service, shown in revenue reports.")
@_json_option
@click.pass_obj
def reserve(
    settings: _Settings, user: int, service: int, order: int, amount: str, currency: str, service_name: str
) -> None:
    """Money moves to USER's reserve for ORDER of SERVICE (the order id is the idempotency key)."""
    with settings.client() as client:
        receipt = client.reserve(user, service, order, amount, currency=currency, service_name=service_name)
    _show_receipt(settings, receipt)


@cli.command()
@click.argument("order", type=click.IntRange(min=1))
@_json_option
@click.pass_obj
def release(settings: _Settings, order: int) -> None:
    """ORDER was cancelled: its reserved money goes back to the user."""
    with settings.client() as client:
        receipt = client.release_reserve(order)
    _show_receipt(settings, receipt)


@cli.command()
@_USER
@click.argument("service", type=click.IntRange(min=1))
@click.argument("order", type=click.IntRange(min=1))
@click.argument("amount", required=False)
@_json_option
@click.pass_obj
def revenue(settings: _Settings, user: int, service: int, order: int, amount: str | None) -> None:
    """ORDER was delivered: AMOUNT (default: all reserved) becomes revenue, the rest goes back."""
    with settings.client() as client:
        receipt = client.recognize_revenue(user, service, order, amount)
    _show_receipt(settings, receipt)


# Reads


@cli.command()
@_USER
@_currency_option
@_json_option
@click.pass_obj
def show(settings: _Settings, user: int, currency: str) -> None:
    """USER's accounts and balances."""
    with settings.client() as client:
        accounts = client.get_balance(user, currency=currency)
    if settings.json:
        _print_json(list(accounts))
        return
    _echo_table(_accounts_table(accounts))


@cli.command()
@_USER
@click.option("--sort", "sort_by", type=click.Choice([f.value for f in SortField]), default="date", show_default=True)
@click.option("--asc", is_flag=True, help="Oldest or smallest first (default: newest or largest first).")
@click.option("--limit", type=click.IntRange(min=1), default=HISTORY_LIMIT_DEFAULT, show_default=True)
@click.option("--all", "everything", is_flag=True, help="Every transaction (all pages), not just --limit.")
@click.option("--kind", "kinds", multiple=True, type=click.Choice([k.value for k in TransactionKind]))
@click.option("--since", type=_Moment(), help="From this time on (inclusive); a time without a zone is UTC.")
@click.option("--until", type=_Moment(), help="Before this time (exclusive).")
@_json_option
@click.pass_obj
def history(
    settings: _Settings,
    user: int,
    sort_by: str,
    asc: bool,
    limit: int,
    everything: bool,
    kinds: Sequence[str],
    since: datetime | None,
    until: datetime | None,
) -> None:
    """USER's transactions, newest first (or as sorted)."""
    if everything and click.get_current_context().get_parameter_source("limit") is not ParameterSource.DEFAULT:
        raise click.UsageError("--limit and --all exclude each other")
    with settings.client() as client:
        found = client.iter_transactions(
            user,
            sort_by=SortField(sort_by),
            order=SortOrder.ASCENDING if asc else SortOrder.DESCENDING,
            page_size=PAGE_SIZE_MAX if everything else min(limit + 1, PAGE_SIZE_MAX),
            kinds=[TransactionKind(kind) for kind in kinds],
            since=since,
            until=until,
        )
        # One more than shown tells whether there are more.
        transactions = list(found if everything else itertools.islice(found, limit + 1))
    more = not everything and len(transactions) > limit
    transactions = transactions[:limit] if more else transactions
    if settings.json:
        _print_json(transactions)
        return
    _echo_table(_history_table(transactions))
    if more:
        click.echo(f"(the first {limit}; more with --limit N or --all)", err=True)


@cli.command(name="order")
@click.argument("order_id", metavar="ORDER", type=click.IntRange(min=1))
@_json_option
@click.pass_obj
def order_command(settings: _Settings, order_id: int) -> None:
    """What ORDER reserved and what became of it."""
    with settings.client() as client:
        found = client.get_order(order_id)
    if settings.json:
        _print_json(found)
        return
    _show_order(found)


@cli.command()
@click.argument("service", default="")
@_json_option
@click.pass_obj
def health(settings: _Settings, service: str) -> None:
    """The server's health; exit status 1 unless SERVING.

    SERVICE (e.g. balance.v1.TransactionService) asks about one service instead of the server."""
    with settings.client() as client:
        status = client.check_health(service)
    if settings.json:
        _print_json({"status": status})
    else:
        click.echo(status)
    if status != "SERVING":
        raise click.exceptions.Exit(EXIT_FAILURE)


# Downloads

_output_option = click.option(
    "-o",
    "--output",
    default=".",
    show_default=True,
    help="File or directory to save to (a directory gets the server's file name); - writes to stdout.",
)


@cli.command()
@click.argument("month", type=_Month())
@_output_option
@_currency_option
@click.option("--tz", "time_zone", default="", help="IANA time zone whose calendar sets the month (default UTC).")
@_json_option
@click.pass_obj
def report(settings: _Settings, month: date, output: str, currency: str, time_zone: str) -> None:
    """The revenue report of MONTH (YYYY-MM) per service, as CSV."""
    with settings.client() as client, _destination(output) as destination, _progress() as progress:
        saved = client.download_revenue_report(
            month.year, month.month, destination, currency=currency, time_zone=time_zone, progress=progress
        )
    _show_download(settings, saved, to_stdout=output == "-")


@cli.command()
@_USER
@click.option("--since", type=_Moment(), help="From this time on (inclusive); a time without a zone is UTC.")
@click.option("--until", type=_Moment(), help="Before this time (exclusive).")
@click.option("--kind", "kinds", multiple=True, type=click.Choice([k.value for k in TransactionKind]))
@_output_option
@_json_option
@click.pass_obj
def statement(
    settings: _Settings,
    user: int,
    since: datetime | None,
    until: datetime | None,
    kinds: Sequence[str],
    output: str,
) -> None:
    """USER's statement (every transaction, oldest first), as CSV."""
    with settings.client() as client, _destination(output) as destination, _progress() as progress:
        saved = client.export_transactions(
            user, destination, since=since, until=until, kinds=[TransactionKind(k) for k in kinds], progress=progress
        )
    _show_download(settings, saved, to_stdout=output == "-")


@contextmanager
def _destination(output: str) -> Iterator[Destination]:
    if output == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
    else:
        yield Path(output)


@contextmanager
def _progress() -> Iterator[Callable[[int], None] | None]:
    """A progress bar with bytes and rate on stderr while a download runs, when stderr is a terminal."""
    if not _stderr.is_terminal:
        yield None
        return
    columns = (TextColumn("downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=_stderr, transient=True) as bar:
        task = bar.add_task("download", total=None)
        yield lambda received: bar.update(task, completed=received)


# Output


def _show_receipt(settings: _Settings, receipt: Receipt) -> None:
    if settings.json:
        _print_json(receipt)
        return
    transaction = receipt.transaction
    click.echo(transaction.description)
    if receipt.replayed:
        click.echo("This repeated an earlier request: nothing moved this time.")
    facts = [("transaction", str(transaction.transaction_id)), ("time (UTC)", _time(transaction.created_at))]
    if transaction.idempotency_key:
        facts.insert(1, ("key", transaction.idempotency_key))
    _echo_facts(facts)
    _echo_table(_accounts_table(receipt.accounts))


def _echo_table(table: Table) -> None:
    """A table without the trailing blanks rich pads its last column with."""
    with _stdout.capture() as captured:
        _stdout.print(table)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _echo_facts(facts: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in facts)
    for label, value in facts:
        click.echo(f"{label:<{width}}  {value}")


def _accounts_table(accounts: Sequence[Account]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("user", justify="right")
    table.add_column("account")
    table.add_column("balance", justify="right")
    table.add_column("updated (UTC)")
    for account in accounts:
        table.add_row(
            str(account.user_id),
            account.kind.value,
            _money(account.balance, account.currency),
            _time(account.updated_at),
        )
    return table


def _history_table(transactions: Sequence[Transaction]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("kind")
    table.add_column("amount", justify="right", no_wrap=True)
    table.add_column("description")
    for transaction in transactions:
        table.add_row(
            _time(transaction.created_at),
            transaction.kind.value,
            _money(transaction.amount, transaction.currency),
            transaction.description,
        )
    return table


def _show_order(order: Order) -> None:
    service = f"{order.service_id} ({order.service_name})" if order.service_name else str(order.service_id)
    _echo_facts(
        [
            ("order", str(order.order_id)),
            ("user", str(order.user_id)),
            ("service", service),
            ("status", order.status.value),
            ("reserved", _money(order.reserved_amount, order.currency)),
            ("captured", _money(order.captured_amount, order.currency)),
            ("released", _money(order.released_amount, order.currency)),
            ("created (UTC)", _time(order.created_at)),
            ("updated (UTC)", _time(order.updated_at)),
        ]
    )


def _show_download(settings: _Settings, saved: Download, *, to_stdout: bool) -> None:
    if settings.json and not to_stdout:
        _print_json(saved)
        return
    where = "stdout" if to_stdout else str(saved.path)
    rows = f"{saved.row_count} row{'' if saved.row_count == 1 else 's'}"
    line = f"{saved.filename}: {rows}, {saved.size_bytes} bytes, SHA-256 {saved.sha256} verified"
    # With the file on stdout the summary goes to stderr, so that the output stays the file alone.
    click.echo(f"saved {line}, to {where}", err=to_stdout)


def _money(amount: Decimal, currency: str) -> str:
    return f"{amount:f} {currency}"


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _jsonable(value: Any) -> Any:
    """The client's objects as JSON values: amounts as exact strings, times in ISO 8601, no protobuf."""
    if isinstance(value, BalanceError):
        return {
            "code": value.code.name,
            "reason": value.reason,
            "message": value.message,
            "metadata": dict(value.metadata),
            "fields": list(value.fields),
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "proto"}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID | Path):
        return str(value)
    return value


def _print_json(value: Any) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))


def main() -> None:
    cli(prog_name="balance")


if __name__ == "__main__":
    main()
