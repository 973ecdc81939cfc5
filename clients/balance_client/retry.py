"""When to retry a call and how long to wait: the decisions both clients share. Only the loop
that sleeps differs (time.sleep or asyncio.sleep), and it stays in each client.

A call is retried only when repeating it cannot move money twice: on UNAVAILABLE and ABORTED
(the server says nothing was applied, or the answer was lost and the idempotency key makes the
repeat a replay), and on DEADLINE_EXCEEDED only for calls that carry a key (or an order id),
since a call without one might have been applied. Waits are capped, jittered exponential
backoff; attempts and the call's overall deadline bound the whole.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from . import errors

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
"""Codes after which any call may be repeated."""
RETRYABLE_CODES_KEYED = RETRYABLE_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}
"""Codes after which a call with an idempotency key (or an order id) may be repeated."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds of the automatic retries of one call.

    Example::

        patient = RetryPolicy(attempts_max=8, delay_ms_max=5_000, deadline_seconds=120)
        client = BalanceClient("balance.internal:443", retry=patient)
    """

    attempts_max: int = 5
    """Calls made at most, the first included (1 turns retries off)."""
    delay_ms_base: int = 50
    """Wait before the first retry; it doubles after each further attempt."""
    delay_ms_max: int = 2_000
    """Longest wait between two attempts."""
    deadline_seconds: float = 30.0
    """All attempts of one call together, waits included (at least one attempt's timeout)."""

    def __post_init__(self) -> None:
        if self.attempts_max < 1:
            raise ValueError("attempts_max must be at least 1")
        if not 0 <= self.delay_ms_base <= self.delay_ms_max:
            raise ValueError("delays must satisfy 0 <= delay_ms_base <= delay_ms_max")
        if self.deadline_seconds <= 0:
            raise ValueError("deadline_seconds must be positive")


NO_RETRIES = RetryPolicy(attempts_max=1)


class Attempts:
    """The attempts of one call: each one's timeout, and after a failure either the wait before
    the next attempt or the error to raise.

    The caller's loop is::

        attempts = Attempts(policy, attempt_timeout_seconds=10, keyed=True)
        while True:
            try: return call(timeout=attempts.next_timeout())
            except grpc.RpcError as error: sleep(attempts.delay_after(error))
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        attempt_timeout_seconds: float,
        keyed: bool,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if attempt_timeout_seconds <= 0:
            raise ValueError("a call's timeout must be positive")
        self.policy = policy
        self.attempt_timeout_seconds = attempt_timeout_seconds
        self.retryable_codes = RETRYABLE_CODES_KEYED if keyed else RETRYABLE_CODES
        self.clock = clock
        self.jitter = jitter
        self.deadline = clock() + max(policy.deadline_seconds, attempt_timeout_seconds)
        self.count = 0

    def next_timeout(self) -> float:
        """Counts an attempt and returns its timeout: the client's, or what is left of the deadline."""
        self.count += 1
        return max(0.001, min(self.attempt_timeout_seconds, self.deadline - self.clock()))

    def delay_after(self, error: grpc.RpcError, *, retryable: bool = True) -> float:
        """Seconds to wait before the next attempt; raises the error's `BalanceError` when the
        call must not (`retryable=False`, a code that is not safe) or cannot (attempts or
        deadline spent) be repeated."""
        if not (retryable and error.code() in self.retryable_codes and self.count < self.policy.attempts_max):
            raise errors.from_rpc_error(error, attempts=self.count) from error
        ceiling_ms = min(self.policy.delay_ms_max, self.policy.delay_ms_base << min(self.count - 1, 30))
        # Half fixed, half random ("equal jitter"): clients that failed together spread out, yet
        # none retries at once.
        delay_seconds = ceiling_ms * (0.5 + 0.5 * self.jitter()) / 1000
        if self.clock() + delay_seconds >= self.deadline:
            raise errors.from_rpc_error(error, attempts=self.count) from error
        return delay_seconds
