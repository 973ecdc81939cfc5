"""UserLocks: one operation at a time per user within the process, without deadlocks or leaks."""

from __future__ import annotations

import asyncio

from balance_server.db.locks import UserLocks


async def test_operations_on_one_user_run_one_at_a_time():
    """Two holders of the same user never overlap."""
    locks, inside, overlaps = UserLocks(), 0, 0

    async def operation():
        nonlocal inside, overlaps
        async with locks.hold(7):
            inside += 1
            overlaps += inside > 1
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(operation() for _ in range(20)))
    assert overlaps == 0


async def test_operations_on_different_users_run_together():
    """Holders of different users do not wait for each other."""
    locks = UserLocks()
    both_inside = asyncio.Event()
    entered = 0

    async def operation(user_id):
        nonlocal entered
        async with locks.hold(user_id):
            entered += 1
            if entered == 2:
                both_inside.set()
            await asyncio.wait_for(both_inside.wait(), timeout=1)

    await asyncio.gather(operation(1), operation(2))


async def test_opposing_pairs_do_not_deadlock():
    """Transfers A->B and B->A at once both finish: locks are taken in ascending order."""
    locks = UserLocks()

    async def transfer(source, target):
        async with locks.hold(source, target):
            await asyncio.sleep(0.001)

    await asyncio.wait_for(asyncio.gather(*(transfer(1, 2) if i % 2 else transfer(2, 1) for i in range(50))), 5)


async def test_locks_are_dropped_when_unused():
    """No lock stays behind once nobody holds or awaits it, so memory does not grow with users."""
    locks = UserLocks()
    await asyncio.gather(*(_hold(locks, user_id) for user_id in range(100)))
    assert len(locks) == 0


async def test_same_user_twice_in_one_hold_is_one_lock():
    """A hold naming one user twice takes that user's lock once (no self-deadlock)."""
    locks = UserLocks()
    await asyncio.wait_for(_hold(locks, 5, 5), timeout=1)


async def _hold(locks, *user_ids):
    async with locks.hold(*user_ids):
        await asyncio.sleep(0)
