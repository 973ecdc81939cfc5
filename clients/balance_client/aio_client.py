"""The asyncio client: the blocking client's methods as coroutines, over one grpc.aio channel.
Requests, results and retry decisions come from the same modules; only the call loops differ."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from types import TracebackType
from typing import Self

import grpc
from grpc import aio

from . import _calls, download
from ._calls import Request, Response, Result, Stream, Unary
from ._channel import DOWNLOAD_TIMEOUT_SECONDS_DEFAULT, text_metadata
from .client import ClientBase
from .download import Destination, Progress
from .models import (
    Account,
    Amount,
    Download,
    Order,
    Receipt,
    SortField,
    SortOrder,
    Transaction,
    TransactionKind,
    TransactionPage,
)


class AsyncBalanceClient(ClientBase):
    """An asyncio client of the balance service over one channel; use it as an async context manager.

    `target` defaults to $BALANCE_TARGET, else 127.0.0.1:50051. `root_certificates` (PEM) or
    `tls=True` make the channel TLS; `access_token` goes as `authorization: Bearer ...` metadata
    with every call, as does `metadata`. Each attempt of a call gets `timeout_seconds` (a
    method's own `timeout_seconds` overrides it; downloads get 600 s); `retry` bounds the
    automatic retries. Amounts are `Decimal` (a `str` is accepted, a `float` refused); times are
    aware `datetime`s; errors are `BalanceError`s.

    Example::

        async with AsyncBalanceClient("127.0.0.1:50051") as client:
            print((await client.deposit(2, Decimal("199.99"), source="visa-4421")).balance())
    """

    @functools.cached_property
    def channel(self) -> aio.Channel:
        """The grpc.aio channel, opened at the first call: inside the event loop that will use it."""
        return self.connection.aio_channel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel (if a call opened it); calls in flight are cancelled.

        Example::

            client = AsyncBalanceClient("127.0.0.1:50051")
            await client.close()
        """
        if "channel" in self.__dict__:
            await self.channel.close()

    # TransactionService

    async def deposit(
        self,
        user_id: int,
        amount: Amount,
        *,
        currency: str = "",
        source: str = "",
        idempotency_key: str | None = None,
        timeout_seconds: float | None = None,
    ) -> Receipt:
        """Money arrives from outside to the user's regular account (the first deposit opens the
        accounts). Without `idempotency_key` a fresh UUID is used, the same on every retry.

        Example::

            receipt = await client.deposit(2, Decimal("199.99"), currency="USD", source="visa-4421")
            print(receipt.transaction.transaction_id, receipt.balance())
        """
        call = _calls.deposit(user_id, amount, currency=currency, source=source, idempotency_key=idempotency_key)
        return await self._unary(call, timeout_seconds)

    async def withdraw(
        self,
        user_id: int,
        amount: Amount,
        *,
        currency: str = "",
        destination: str = "",
        idempotency_key: str | None = None,
        timeout_seconds: float | None = None,
    ) -> Receipt:
        """Money leaves the user's regular account to outside; `InsufficientFunds` if it holds less.

        Example::

            receipt = await client.withdraw(2, "50.00", destination="iban-DE89", idempotency_key="wd-1")
            print(receipt.balance())
        """
        call = _calls.withdraw(
            user_id, amount, currency=currency, destination=destination, idempotency_key=idempotency_key
        )
        return await self._unary(call, timeout_seconds)

    async def transfer(
        self,
        from_user_id: int,
        to_user_id: int,
        amount: Amount,
        *,
        currency: str = "",
        comment: str = "",
        idempotency_key: str | None = None,
        timeout_seconds: float | None = None,
    ) -> Receipt:
        """Money moves between two users' regular accounts; the receipt holds the sender's accounts.

        Example::

            receipt = await client.transfer(1, 2, Decimal("500"), comment="rent")
            print(receipt.transaction.description)
        """
        call = _calls.transfer(
            from_user_id, to_user_id, amount, currency=currency, comment=comment, idempotency_key=idempotency_key
        )
        return await self._unary(call, timeout_seconds)

    async def reserve(
        self,
        user_id: int,
        service_id: int,
        order_id: int,
        amount: Amount,
        *,
        currency: str = "",
        service_name: str = "",
        timeout_seconds: float | None = None,
    ) -> Receipt:
        """Money moves from the user's regular account to their reserve for an order; the order id
        is the idempotency key (the same request again replays, other fields are `OrderAlreadyExists`).

        Example::

            receipt = await client.reserve(1, 7, 2, Decimal("170000"), service_name="Delivery")
            print(receipt.balance(AccountKind.RESERVE))
        """
        call = _calls.reserve(user_id, service_id, order_id, amount, currency=currency, service_name=service_name)
        return await self._unary(call, timeout_seconds)

    async def release_reserve(self, order_id: int, *, timeout_seconds: float | None = None) -> Receipt:
        """The order was cancelled: its reserved money goes back to the regular account.

        Example::

            receipt = await client.release_reserve(2)
            print(receipt.transaction.kind, receipt.balance())
        """
        return await self._unary(_calls.release_reserve(order_id), timeout_seconds)

    async def recognize_revenue(
        self,
        user_id: int,
        service_id: int,
        order_id: int,
        amount: Amount | None = None,
        *,
        timeout_seconds: float | None = None,
    ) -> Receipt:
        """The order was delivered: `amount` (None: all that is reserved) becomes revenue and the
        rest goes back to the user.

        Example::

            receipt = await client.recognize_revenue(1, 7, 2, Decimal("150000"))
            print((await client.get_order(2)).released_amount)
        """
        return await self._unary(_calls.recognize_revenue(user_id, service_id, order_id, amount), timeout_seconds)

    # InfoService

    async def get_balance(
        self, user_id: int, *, currency: str = "", timeout_seconds: float | None = None
    ) -> tuple[Account, ...]:
        """The user's accounts (of one currency, or of every currency they hold).

        Example::

            for account in await client.get_balance(2):
                print(account.currency, account.kind, account.balance)
        """
        return await self._unary(_calls.get_balance(user_id, currency=currency), timeout_seconds)

    async def list_transactions(
        self,
        user_id: int,
        *,
        sort_by: SortField = SortField.DATE,
        order: SortOrder = SortOrder.DESCENDING,
        page_size: int = 0,
        page_token: str = "",
        kinds: Iterable[TransactionKind] = (),
        since: datetime | None = None,
        until: datetime | None = None,
        timeout_seconds: float | None = None,
    ) -> TransactionPage:
        """One page of the user's history: `since` inclusive, `until` exclusive, newest first by
        default; pass `next_page_token` back for the next page (or use `iter_transactions`).

        Example::

            page = await client.list_transactions(1, sort_by=SortField.AMOUNT, page_size=2)
            print([t.amount for t in page.transactions], page.next_page_token)
        """
        call = _calls.list_transactions(
            user_id,
            sort_by=sort_by,
            order=order,
            page_size=page_size,
            page_token=page_token,
            kinds=kinds,
            since=since,
            until=until,
        )
        return await self._unary(call, timeout_seconds)

    async def iter_transactions(
        self,
        user_id: int,
        *,
        sort_by: SortField = SortField.DATE,
        order: SortOrder = SortOrder.DESCENDING,
        page_size: int = 0,
        kinds: Iterable[TransactionKind] = (),
        since: datetime | None = None,
        until: datetime | None = None,
        timeout_seconds: float | None = None,
    ) -> AsyncIterator[Transaction]:
        """Every transaction of the query, fetching each page only when the previous one is used up.

        Example::

            async for transaction in client.iter_transactions(1, kinds=[TransactionKind.DEPOSIT]):
                print(transaction.created_at, transaction.amount, transaction.description)
        """
        call = _calls.list_transactions(
            user_id,
            sort_by=sort_by,
            order=order,
            page_size=page_size,
            page_token="",
            kinds=kinds,
            since=since,
            until=until,
        )
        while True:
            page = await self._unary(call, timeout_seconds)
            for transaction in page.transactions:
                yield transaction
            if not page.next_page_token:
                return
            call = _calls.next_page(call, page.next_page_token)

    async def get_transaction(
        self, transaction_id: str | uuid.UUID, *, timeout_seconds: float | None = None
    ) -> Transaction:
        """One transaction by its id.

        Example::

            transaction = await client.get_transaction("3dda7174-8b3a-4ad8-ae02-48922e8a3b08")
            print(transaction.kind, transaction.amount, transaction.currency)
        """
        return await self._unary(_calls.get_transaction(transaction_id), timeout_seconds)

    async def get_order(self, order_id: int, *, timeout_seconds: float | None = None) -> Order:
        """One order by its id: what was reserved and what became of it.

        Example::

            order = await client.get_order(2)
            print(order.status, order.reserved_amount, order.captured_amount)
        """
        return await self._unary(_calls.get_order(order_id), timeout_seconds)

    # ReportService

    async def download_revenue_report(
        self,
        year: int,
        month: int,
        destination: Destination,
        *,
        currency: str = "",
        time_zone: str = "",
        progress: Progress | None = None,
        timeout_seconds: float | None = None,
    ) -> Download:
        """Saves the month's revenue CSV to a path, a directory (under the server's file name) or a
        binary file object, checking the server's SHA-256 (`ChecksumMismatch` if it differs).

        Example::

            saved = await client.download_revenue_report(2026, 11, "reports/", time_zone="Europe/Moscow")
            print(saved.path, saved.row_count, saved.sha256)
        """
        stream = _calls.revenue_report(year, month, currency=currency, time_zone=time_zone)
        return await self._download(stream, destination, progress, timeout_seconds)

    async def export_transactions(
        self,
        user_id: int,
        destination: Destination,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        kinds: Iterable[TransactionKind] = (),
        progress: Progress | None = None,
        timeout_seconds: float | None = None,
    ) -> Download:
        """Saves the user's statement CSV (oldest first), checked as `download_revenue_report` does.

        Example::

            saved = await client.export_transactions(2, "statement.csv", since=datetime(2026, 1, 1, tzinfo=UTC))
            print(saved.size_bytes, saved.row_count)
        """
        stream = _calls.statement(user_id, since=since, until=until, kinds=kinds)
        return await self._download(stream, destination, progress, timeout_seconds)

    # Health

    async def check_health(self, service: str = "", *, timeout_seconds: float | None = None) -> str:
        """The server's grpc.health.v1 status: SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN.

        Example::

            if await client.check_health() != "SERVING":
                raise SystemExit("the balance service is not serving")
        """
        return await self._unary(_calls.health(service), timeout_seconds)

    # The call loops: the only code that differs from the blocking client.

    async def _unary(self, call: Unary[Request, Response, Result], timeout_seconds: float | None) -> Result:
        multicallable = self.channel.unary_unary(
            call.method, request_serializer=_calls.serialize, response_deserializer=call.response_type.FromString
        )
        attempts = self._attempts(keyed=call.keyed, timeout_seconds=timeout_seconds)
        while True:
            try:
                rpc = multicallable(call.request, timeout=attempts.next_timeout(), metadata=self.connection.metadata)
                response = await rpc
                return call.convert(response, text_metadata(await rpc.trailing_metadata()))
            except grpc.RpcError as error:
                delay_seconds = attempts.delay_after(error)
            await asyncio.sleep(delay_seconds)

    async def _download(
        self,
        stream: Stream[Request],
        destination: Destination,
        progress: Progress | None,
        timeout_seconds: float | None,
    ) -> Download:
        multicallable = self.channel.unary_stream(
            stream.method, request_serializer=_calls.serialize, response_deserializer=_calls.REPORT_CHUNK.FromString
        )
        attempts = self._attempts(
            keyed=False, timeout_seconds=timeout_seconds, default=DOWNLOAD_TIMEOUT_SECONDS_DEFAULT
        )
        while True:
            with download.Receiver(destination, progress) as receiver:
                try:
                    timeout = attempts.next_timeout()
                    rpc = multicallable(stream.request, timeout=timeout, metadata=self.connection.metadata)
                    receiver.start(text_metadata(await rpc.initial_metadata()))
                    async for chunk in rpc:
                        receiver.write(chunk.data)
                    return receiver.finish(text_metadata(await rpc.trailing_metadata()))
                except grpc.RpcError as error:
                    # Started over only while nothing was written: a file object cannot be rewound.
                    delay_seconds = attempts.delay_after(error, retryable=receiver.received_bytes == 0)
            await asyncio.sleep(delay_seconds)
