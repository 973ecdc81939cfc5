"""The server as users run it: a `balance-server` process on the embedded PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from balance.v1 import info_service_pb2 as info_pb
from balance.v1 import info_service_pb2_grpc, transaction_service_pb2_grpc
from balance.v1 import transaction_service_pb2 as pb
from balance_server.db import migrations

START_SECONDS_MAX = 60
STOP_SECONDS_MAX = 30


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    def __init__(self, data_dir: Path, *arguments: str) -> None:
        self.port = _free_port()
        self.target = f"127.0.0.1:{self.port}"
        environment = {key: value for key, value in os.environ.items() if not key.startswith("BALANCE_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "balance_server", "--listen", self.target, "--data-dir", str(data_dir), *arguments],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_SECONDS_MAX
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.process.stdout.read() if self.process.stdout else ""
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise AssertionError("the server did not start serving")

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=STOP_SECONDS_MAX)
        return self.process.returncode, output


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "pgdata"
    # Whatever happened in the test, no PostgreSQL of this folder outlives it.
    for process in _postgres_of(tmp_path / "pgdata"):
        process.kill()


def _postgres_of(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "postgres" and str(data_dir) in " ".join(process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_server_process_serves_reflection_health_and_keeps_data_across_restarts(data_dir: Path):
    """The server starts on the embedded PostgreSQL, lists the three services by reflection, reports
    SERVING overall and per service, stops cleanly on SIGTERM together with its PostgreSQL, and the
    money is still there after a restart on the same data folder."""
    first = ServerProcess(data_dir)
    first.wait_serving()
    with grpc.insecure_channel(first.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"balance.v1.InfoService", "balance.v1.TransactionService", "balance.v1.ReportService"} <= services
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "balance.v1.InfoService", "balance.v1.TransactionService", "balance.v1.ReportService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == 1, service
        transaction_service_pb2_grpc.TransactionServiceStub(channel).Deposit(
            pb.DepositRequest(user_id=42, amount="12.34", idempotency_key="restart-1"), timeout=10
        )
    code, output = first.stop()
    assert code == 0, output
    assert f"embedded PostgreSQL with its data in {data_dir}" in output
    assert "Deposit OK" in output
    assert "12.34" not in output and "restart-1" not in output, "no amounts or keys in the call log"
    assert _postgres_of(data_dir) == [], "the embedded PostgreSQL stops with the server"

    second = ServerProcess(data_dir)
    second.wait_serving()
    with grpc.insecure_channel(second.target) as channel:
        accounts = info_service_pb2_grpc.InfoServiceStub(channel).GetBalance(
            info_pb.GetBalanceRequest(user_id=42), timeout=10
        )
    assert [account.balance for account in accounts.accounts] == ["12.34", "0.00"]
    code, output = second.stop()
    assert code == 0, output


def test_migrate_applies_migrations_without_serving(data_dir: Path):
    """`balance-server migrate` applies the migrations, says which, exits 0 and leaves nothing running."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BALANCE_")}
    result = subprocess.run(
        [sys.executable, "-m", "balance_server", "migrate", "--data-dir", str(data_dir)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=START_SECONDS_MAX,
    )
    assert result.returncode == 0, result.stderr
    shipped = migrations.available()
    assert f"applied {len(shipped)} migration(s): {shipped[0].name}" in result.stdout
    again = subprocess.run(
        [sys.executable, "-m", "balance_server", "migrate", "--data-dir", str(data_dir)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=START_SECONDS_MAX,
    )
    assert "applied 0 migration(s): none needed" in again.stdout
    assert _postgres_of(data_dir) == []
