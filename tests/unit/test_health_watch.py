"""The health watcher: an outage is failed pings in a row, not one slow ping."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

from balance_server import limits, server
from balance_server.settings import Settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Pings:
    """A database stand-in whose pings answer as scripted; it notes what health and the calls'
    flag were when each ping came, and stops the watcher two pings after the script ends."""

    def __init__(self, answers: list[bool], servicer: health.aio.HealthServicer) -> None:
        self.answers = answers
        self.servicer = servicer
        self.reachable = True
        self.renewed = 0
        self.seen: list[tuple[int, bool]] = []
        self.done = asyncio.Event()

    async def ping(self, *, timeout_seconds: float) -> bool:
        response = await self.servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
        self.seen.append((response.status, self.reachable))
        if not self.answers:
            if len(self.seen) > 1 and self.seen[-2][0] == SERVING:
                self.done.set()
            return True
        return self.answers.pop(0)

    async def renew_connections(self) -> None:
        self.renewed += 1


async def _watch(answers: list[bool]) -> Pings:
    servicer = health.aio.HealthServicer()
    database = Pings(list(answers), servicer)
    settings = Settings(health_check_interval_seconds=0.001)
    watcher = asyncio.create_task(server._watch_database(database, servicer, settings))  # type: ignore[arg-type]
    await asyncio.wait_for(database.done.wait(), timeout=10)
    watcher.cancel()
    return database


async def test_fewer_failed_pings_than_the_limit_keep_serving():
    """Up to HEALTH_PING_FAILURES_MAX - 1 failed pings in a row (a slow ping on busy cores) change nothing."""
    database = await _watch([False] * (limits.HEALTH_PING_FAILURES_MAX - 1))
    assert set(database.seen) == {(SERVING, True)}
    assert database.renewed == 0


async def test_the_limit_of_failed_pings_is_an_outage_until_one_passes():
    """HEALTH_PING_FAILURES_MAX failed pings in a row turn health NOT_SERVING and calls away; the next
    passing ping brings both back and renews the pools' connections."""
    database = await _watch([False] * (limits.HEALTH_PING_FAILURES_MAX + 2))
    flips = [state for index, state in enumerate(database.seen) if index == 0 or state != database.seen[index - 1]]
    assert flips == [(SERVING, True), (NOT_SERVING, False), (SERVING, True)]
    assert database.seen.index((NOT_SERVING, False)) == limits.HEALTH_PING_FAILURES_MAX
    assert database.renewed == 1
