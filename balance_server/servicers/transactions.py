"""balance.v1.TransactionService: moves money."""

from __future__ import annotations

from typing import Any

from grpc import aio

from balance.v1 import transaction_service_pb2 as pb
from balance.v1 import transaction_service_pb2_grpc as pb_grpc
from balance_server import ledger, limits
from balance_server.db.database import Database
from balance_server.models import Receipt
from balance_server.money import Currencies
from balance_server.servicers import convert
from balance_server.servicers.edge import CallGate, Fields, deadline_of, unary_call

Context = aio.ServicerContext[Any, Any]


class TransactionServicer(pb_grpc.TransactionServiceServicer):
    def __init__(self, database: Database, currencies: Currencies, gate: CallGate) -> None:
        self.database = database
        self.currencies = currencies
        self.gate = gate

    @unary_call
    async def Deposit(self, request: pb.DepositRequest, context: Context) -> pb.DepositResponse:
        fields = Fields()
        currency = fields.currency(request.currency, self.currencies)
        command = ledger.Deposit(
            user_id=fields.positive_id(request.user_id, "user_id"),
            currency=currency or "",
            amount=fields.amount(request.amount, currency, self.currencies),
            source=fields.text(request.source, "source", limits.MEMO_LENGTH_MAX),
            idempotency_key=fields.idempotency_key(request.idempotency_key),
        )
        fields.done()
        receipt = await ledger.deposit(self.database, command, deadline=deadline_of(context))
        return pb.DepositResponse(**self._receipt(receipt, context))

    @unary_call
    async def Withdraw(self, request: pb.WithdrawRequest, context: Context) -> pb.WithdrawResponse:
        fields = Fields()
        currency = fields.currency(request.currency, self.currencies)
        command = ledger.Withdraw(
            user_id=fields.positive_id(request.user_id, "user_id"),
            currency=currency or "",
            amount=fields.amount(request.amount, currency, self.currencies),
            destination=fields.text(request.destination, "destination", limits.MEMO_LENGTH_MAX),
            idempotency_key=fields.idempotency_key(request.idempotency_key),
        )
        fields.done()
        receipt = await ledger.withdraw(self.database, command, deadline=deadline_of(context))
        return pb.WithdrawResponse(**self._receipt(receipt, context))

    @unary_call
    async def Transfer(self, request: pb.TransferRequest, context: Context) -> pb.TransferResponse:
        fields = Fields()
        currency = fields.currency(request.currency, self.currencies)
        command = ledger.Transfer(
            from_user_id=fields.positive_id(request.from_user_id, "from_user_id"),
            to_user_id=fields.positive_id(request.to_user_id, "to_user_id"),
            currency=currency or "",
            amount=fields.amount(request.amount, currency, self.currencies),
            comment=fields.text(request.comment, "comment", limits.MEMO_LENGTH_MAX),
            idempotency_key=fields.idempotency_key(request.idempotency_key),
        )
        if command.from_user_id == command.to_user_id > 0:
            fields.add("to_user_id", "to_user_id must differ from from_user_id: a user cannot pay themselves")
        fields.done()
        receipt = await ledger.transfer(self.database, command, deadline=deadline_of(context))
        return pb.TransferResponse(**self._receipt(receipt, context))

    @unary_call
    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        fields = Fields()
        currency = fields.currency(request.currency, self.currencies)
        command = ledger.Reserve(
            user_id=fields.positive_id(request.user_id, "user_id"),
            service_id=fields.positive_id(request.service_id, "service_id"),
            order_id=fields.positive_id(request.order_id, "order_id"),
            currency=currency or "",
            amount=fields.amount(request.amount, currency, self.currencies),
            service_name=fields.text(request.service_name, "service_name", limits.SERVICE_NAME_LENGTH_MAX),
        )
        fields.done()
        receipt = await ledger.reserve(self.database, command, deadline=deadline_of(context))
        return pb.ReserveResponse(**self._receipt(receipt, context))

    @unary_call
    async def ReleaseReserve(self, request: pb.ReleaseReserveRequest, context: Context) -> pb.ReleaseReserveResponse:
        fields = Fields()
        order_id = fields.positive_id(request.order_id, "order_id")
        fields.done()
        receipt = await ledger.release_reserve(self.database, order_id, deadline=deadline_of(context))
        return pb.ReleaseReserveResponse(**self._receipt(receipt, context))

    @unary_call
    async def RecognizeRevenue(
        self, request: pb.RecognizeRevenueRequest, context: Context
    ) -> pb.RecognizeRevenueResponse:
        fields = Fields()
        command = ledger.RecognizeRevenue(
            user_id=fields.positive_id(request.user_id, "user_id"),
            service_id=fields.positive_id(request.service_id, "service_id"),
            order_id=fields.positive_id(request.order_id, "order_id"),
            amount=fields.decimal(request.amount) if request.amount else None,
        )
        fields.done()
        receipt = await ledger.recognize_revenue(self.database, command, deadline=deadline_of(context))
        return pb.RecognizeRevenueResponse(**self._receipt(receipt, context))

    def _receipt(self, receipt: Receipt, context: Context) -> dict[str, Any]:
        if receipt.replayed:
            # The request repeated an earlier one: nothing moved this time.
            context.set_trailing_metadata((("x-idempotent-replay", "true"),))
        return {
            "transaction": convert.transaction(receipt.transaction, self.currencies),
            "accounts": [convert.account(account, self.currencies) for account in receipt.accounts],
        }
