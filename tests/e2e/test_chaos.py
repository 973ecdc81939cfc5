"""The bank checker of bench/chaos.py, short and seeded: the same code as the full run, on an
embedded PostgreSQL and a server process of its own, whatever BALANCE_TEST_DSN says (it kills and
restarts both)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from bench import chaos, cluster

pytestmark = pytest.mark.slow

OPERATIONS = 3000
SEED = 20261121


async def test_a_short_run_with_every_fault_alone_and_mixed_finds_no_anomaly():
    """3000 operations by 96 clients on a money pool of 4 connections, with each fault kind
    injected once on its own and then all mixed: no anomaly, every operation settled, and the
    server stops cleanly at the end."""
    faults = chaos.FAULT_KINDS
    if not cluster.can_control_postgres():
        faults = tuple(kind for kind in faults if kind != chaos.POSTGRES_RESTART)
    options = chaos.Options(operations=OPERATIONS, seed=SEED, faults=faults, faults_per_phase=1, mixed_faults=5)
    with tempfile.TemporaryDirectory(prefix="balance-chaos-test-") as scratch:
        report = await chaos.run(options, Path(scratch))
    chaos.print_report(report)
    assert report.anomalies == []
    assert all(report.stats.faults[kind] >= 1 for kind in faults)
    assert report.stats.backends_terminated >= 1
    assert report.stats.client_faults[chaos.CLIENT_CANCEL] >= 1
    assert report.stats.client_faults[chaos.TINY_DEADLINE] >= 1
    assert report.operations >= OPERATIONS
    assert report.outcomes[chaos.ACKNOWLEDGED] + report.outcomes[chaos.REFUSED] == report.operations
    assert report.stats.post_fault_checks >= 1
    assert report.server_exit_code == 0
