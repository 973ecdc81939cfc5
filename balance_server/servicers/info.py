"""balance.v1.InfoService: balances, history and orders."""

from __future__ import annotations

import re
import uuid
from typing import Any

from grpc import aio

from balance.v1 import info_service_pb2 as pb
from balance.v1 import info_service_pb2_grpc as pb_grpc
from balance.v1 import types_pb2
from balance_server import ledger, limits, pagination
from balance_server.db.database import Database
from balance_server.models import SortField
from balance_server.money import Currencies
from balance_server.pagination import HistoryQuery
from balance_server.servicers import convert
from balance_server.servicers.edge import CallGate, Fields, unary_call

Context = aio.ServicerContext[Any, Any]

_SORT_FIELDS = {
    pb.SORT_FIELD_UNSPECIFIED: SortField.DATE,
    pb.SORT_FIELD_DATE: SortField.DATE,
    pb.SORT_FIELD_AMOUNT: SortField.AMOUNT,
}
# The form transactions are given in; uuid.UUID() alone also takes braces, "urn:uuid:" and more.
_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_REPEATED_FIELD_OVERHEAD_BYTES = 8  # a field tag and length prefix per transaction, rounded up
_DESCENDING = {pb.SORT_ORDER_UNSPECIFIED: True, pb.SORT_ORDER_DESC: True, pb.SORT_ORDER_ASC: False}


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, database: Database, currencies: Currencies, gate: CallGate) -> None:
        self.database = database
        self.currencies = currencies
        self.gate = gate

    @unary_call
    async def GetBalance(self, request: pb.GetBalanceRequest, context: Context) -> pb.GetBalanceResponse:
        fields = Fields()
        user_id = fields.positive_id(request.user_id, "user_id")
        currency = fields.currency(request.currency, self.currencies) if request.currency else None
        fields.done()
        accounts = await ledger.get_balance(self.database, user_id, currency)
        return pb.GetBalanceResponse(accounts=[convert.account(account, self.currencies) for account in accounts])

    @unary_call
    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: Context
    ) -> pb.ListTransactionsResponse:
        query = self._history_query(request)
        after = pagination.decode(request.page_token, query) if request.page_token else None
        page = await ledger.list_transactions(self.database, query, after)
        # A page also ends where its bytes would pass the message limit: a thousand transactions
        # with long comments do not fit in one message.
        messages: list[types_pb2.Transaction] = []
        size, more = 0, page.more
        for transaction in page.transactions:
            message = convert.transaction(transaction, self.currencies)
            size += message.ByteSize() + _REPEATED_FIELD_OVERHEAD_BYTES
            if size > limits.PAGE_BYTES_MAX and messages:
                more = True
                break
            messages.append(message)
        next_page_token = pagination.continue_after(query, page.transactions[len(messages) - 1]) if more else ""
        return pb.ListTransactionsResponse(transactions=messages, next_page_token=next_page_token)

    @unary_call
    async def GetTransaction(self, request: pb.GetTransactionRequest, context: Context) -> pb.GetTransactionResponse:
        fields = Fields()
        transaction_id = None
        if _CANONICAL_UUID.fullmatch(request.transaction_id):
            transaction_id = uuid.UUID(request.transaction_id)
        else:
            fields.add("transaction_id", "transaction_id must be a UUID such as 0b7e6a2c-9c1d-4f1e-8a3b-2d5c7e9f1a2b")
        fields.done()
        assert transaction_id is not None
        transaction = await ledger.get_transaction(self.database, transaction_id)
        return pb.GetTransactionResponse(transaction=convert.transaction(transaction, self.currencies))

    @unary_call
    async def GetOrder(self, request: pb.GetOrderRequest, context: Context) -> pb.GetOrderResponse:
        fields = Fields()
        order_id = fields.positive_id(request.order_id, "order_id")
        fields.done()
        order = await ledger.get_order(self.database, order_id)
        return pb.GetOrderResponse(order=convert.order(order, self.currencies))

    def _history_query(self, request: pb.ListTransactionsRequest) -> HistoryQuery:
        fields = Fields()
        user_id = fields.positive_id(request.user_id, "user_id")
        sort_by = _SORT_FIELDS.get(request.sort_by)
        if sort_by is None:
            fields.add("sort_by", f"sort_by {request.sort_by} is not a SortField")
        descending = _DESCENDING.get(request.order)
        if descending is None:
            fields.add("order", f"order {request.order} is not a SortOrder")
        if request.page_size < 0:
            fields.add("page_size", "page_size must not be negative (0 means the default of 50)")
        page_size = min(request.page_size or limits.PAGE_SIZE_DEFAULT, limits.PAGE_SIZE_MAX)
        kinds = fields.transaction_kinds(request.kinds, convert.TRANSACTION_KINDS_FROM_PROTO)
        from_time = fields.timestamp(request.from_time, "from_time") if request.HasField("from_time") else None
        to_time = fields.timestamp(request.to_time, "to_time") if request.HasField("to_time") else None
        if from_time and to_time and from_time >= to_time:
            fields.add("to_time", "to_time must be after from_time")
        fields.done()
        return HistoryQuery(
            user_id=user_id,
            sort_by=sort_by or SortField.DATE,
            descending=bool(descending),
            kinds=kinds,
            from_time=from_time,
            to_time=to_time,
            page_size=page_size,
        )
