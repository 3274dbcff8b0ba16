"""The process-wide memory budget for parsing and storing large messages."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relate_smtp.handlers.budget import BudgetWaitTooLong, MemoryBudget


async def test_messages_within_the_budget_do_not_wait() -> None:
    budget = MemoryBudget(100)
    async with budget.hold(60, timeout=0), budget.hold(40, timeout=0):
        assert budget.held == 100
    assert budget.held == 0


async def test_one_message_larger_than_the_budget_is_let_through_alone() -> None:
    budget = MemoryBudget(100)
    async with budget.hold(500, timeout=0):
        assert budget.held == 500


async def test_a_message_that_does_not_fit_waits_for_room_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    changes: list[tuple[int, int]] = []
    budget = MemoryBudget(100, on_change=lambda held, waiting: changes.append((held, waiting)))
    admitted: list[str] = []
    release = {name: trio.Event() for name in ("first", "second", "third", "fourth")}

    async def message(name: str, size: int) -> None:
        async with budget.hold(size, timeout=10):
            admitted.append(name)
            await release[name].wait()

    async def step(name: str, size: int) -> None:
        nursery.start_soon(message, name, size)
        await trio.testing.wait_all_tasks_blocked()

    async with trio.open_nursery() as nursery:
        await step("first", 80)
        await step("second", 50)
        await step("third", 60)
        await step("fourth", 10)  # would fit after "second", but queues behind "third"
        assert admitted == ["first"]
        assert (budget.held, budget.waiting) == (80, 120)
        release["first"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == ["first", "second"]  # 50 + 60 would not fit: "third" waits
        release["second"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(admitted[2:]) == ["fourth", "third"]
        assert budget.held == 70
        release["third"].set()
        release["fourth"].set()
    assert (budget.held, budget.waiting) == (0, 0)
    assert (80, 120) in changes


async def test_waiting_longer_than_the_timeout_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget(100)
    async with budget.hold(100, timeout=0):
        with pytest.raises(BudgetWaitTooLong):
            async with budget.hold(10, timeout=5):
                pass
        assert (budget.held, budget.waiting) == (100, 0)
    assert budget.held == 0


async def test_a_cancelled_waiter_leaves_nothing_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget(100)
    async with budget.hold(100, timeout=0):
        with trio.move_on_after(1):
            async with budget.hold(10, timeout=60):
                pass
    assert (budget.held, budget.waiting) == (0, 0)
