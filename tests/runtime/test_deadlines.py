"""One task per run expires watched deadlines within its resolution."""

from __future__ import annotations

import math

import trio
import trio.testing

from relate_smtp.runtime.deadlines import RESOLUTION, deadlines


class Waiter:
    """A Timed that records when it was expired."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired_at: list[float] = []
        self.done = trio.Event()

    def expire(self) -> None:
        self.expired_at.append(trio.current_time())
        self.done.set()


async def test_a_deadline_expires_within_the_resolution(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = deadlines()
    waiter = Waiter(trio.current_time() + 3)
    watch.watch(waiter)
    await waiter.done.wait()
    watch.unwatch(waiter)
    assert 3 <= waiter.expired_at[0] <= 3 + RESOLUTION


async def test_a_moved_deadline_is_honoured_and_infinity_never_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = deadlines()
    paused = Waiter(math.inf)
    moved = Waiter(trio.current_time() + 1)
    watch.watch(paused)
    watch.watch(moved)
    moved.deadline = trio.current_time() + 10  # moved later before it fired
    await moved.done.wait()
    assert 10 <= moved.expired_at[0] <= 10 + RESOLUTION
    assert paused.expired_at == []
    watch.unwatch(paused)
    watch.unwatch(moved)
    assert len(watch) == 0


async def test_one_checker_per_run_that_sleeps_while_nothing_is_watched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = deadlines()
    assert deadlines() is watch
    await trio.sleep(100)  # nothing watched: the coarse clock is not kept
    stale = watch.now
    waiter = Waiter(trio.current_time() + 1)
    watch.watch(waiter)  # watching refreshes it, and wakes the checker
    assert watch.now > stale
    await waiter.done.wait()
    assert waiter.expired_at[0] - stale <= 101 + RESOLUTION
    watch.unwatch(waiter)


async def test_the_coarse_clock_lags_by_at_most_the_resolution(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = deadlines()
    waiter = Waiter(math.inf)
    watch.watch(waiter)
    for _ in range(20):
        await trio.sleep(0.37)
        assert 0 <= trio.current_time() - watch.now <= RESOLUTION
    watch.unwatch(waiter)
