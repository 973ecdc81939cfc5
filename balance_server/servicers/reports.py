"""balance.v1.ReportService: CSV downloads streamed in byte chunks."""

from __future__ import annotations

from balance.v1 import report_service_pb2_grpc as pb_grpc
from balance_server.db.database import Database
from balance_server.money import Currencies
from balance_server.servicers.edge import CallGate


class ReportServicer(pb_grpc.ReportServiceServicer):
    def __init__(self, database: Database, currencies: Currencies, gate: CallGate) -> None:
        self.database = database
        self.currencies = currencies
        self.gate = gate
