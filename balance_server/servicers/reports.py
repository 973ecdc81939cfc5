"""balance.v1.ReportService: CSV downloads streamed in byte chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from grpc import aio

from balance.v1 import report_service_pb2 as pb
from balance.v1 import report_service_pb2_grpc as pb_grpc
from balance_server import limits, reports
from balance_server.db.database import Database
from balance_server.money import Currencies
from balance_server.servicers import convert
from balance_server.servicers.edge import CallGate, Fields, stream_call

Context = aio.ServicerContext[Any, Any]
_TIME_ZONE_LENGTH_MAX = 64


class ReportServicer(pb_grpc.ReportServiceServicer):
    def __init__(self, database: Database, currencies: Currencies, gate: CallGate) -> None:
        self.database = database
        self.currencies = currencies
        self.gate = gate

    @stream_call
    async def GetRevenueReport(
        self, request: pb.RevenueReportRequest, context: Context
    ) -> AsyncIterator[pb.ReportChunk]:
        report = self._revenue_report(request)
        download = reports.Download(report.filename)
        async for chunk in _send(context, download, reports.revenue_report(self.database, report, download)):
            yield chunk

    @stream_call
    async def ExportTransactions(
        self, request: pb.ExportTransactionsRequest, context: Context
    ) -> AsyncIterator[pb.ReportChunk]:
        query = self._statement(request)
        download = reports.Download(query.filename)
        async for chunk in _send(context, download, reports.statement(self.database, query, download)):
            yield chunk

    def _revenue_report(self, request: pb.RevenueReportRequest) -> reports.RevenueReport:
        fields = Fields()
        year_max = datetime.now(UTC).year + 1
        if not limits.REPORT_YEAR_MIN <= request.year <= year_max:
            fields.add("year", f"year must be between {limits.REPORT_YEAR_MIN} and {year_max}")
        if not 1 <= request.month <= 12:
            fields.add("month", "month must be between 1 and 12")
        currency = fields.currency(request.currency, self.currencies) if request.currency else None
        time_zone = _time_zone(request.time_zone or "UTC", fields)
        fields.done()
        return reports.RevenueReport(request.year, request.month, currency, time_zone or ZoneInfo("UTC"))

    def _statement(self, request: pb.ExportTransactionsRequest) -> reports.Statement:
        fields = Fields()
        user_id = fields.positive_id(request.user_id, "user_id")
        from_time = fields.timestamp(request.from_time, "from_time") if request.HasField("from_time") else None
        to_time = fields.timestamp(request.to_time, "to_time") if request.HasField("to_time") else None
        if from_time and to_time and from_time >= to_time:
            fields.add("to_time", "to_time must be after from_time")
        kinds = fields.transaction_kinds(request.kinds, convert.TRANSACTION_KINDS_FROM_PROTO)
        fields.done()
        return reports.Statement(user_id, from_time, to_time, kinds)


def _time_zone(name: str, fields: Fields) -> ZoneInfo | None:
    if len(name) <= _TIME_ZONE_LENGTH_MAX:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            # OSError: a name of a folder of the time zone database, such as "Europe".
            pass
    fields.add(
        "time_zone", f"time_zone {name[:_TIME_ZONE_LENGTH_MAX]!r} is not an IANA time zone such as Europe/Moscow"
    )
    return None


async def _send(
    context: Context, download: reports.Download, chunks: AsyncIterator[bytes]
) -> AsyncIterator[pb.ReportChunk]:
    """The file's chunks, with its name before the first and its row count and checksum after the last."""
    first = True
    async for chunk in chunks:
        if first:
            # Sent with the first chunk, so that a refusal found before it (an unknown user)
            # comes as a plain error with no file announced.
            await context.send_initial_metadata((("content-disposition", f"attachment; filename={download.filename}"),))
            first = False
        yield pb.ReportChunk(data=chunk)
    context.set_trailing_metadata((("x-row-count", str(download.rows)), ("x-sha256", download.digest.hexdigest())))
