"""Background results: errors surface where awaited, cancellation stays local."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relate_smtp.sender_auth._pending import Pending


async def test_error_is_raised_by_result_not_into_the_nursery() -> None:
    async def broken() -> int:
        raise ValueError("bug")

    async with trio.open_nursery() as nursery:
        pending = Pending(nursery, broken)
        with pytest.raises(ValueError, match="bug"):
            await pending.result()


async def test_cancelled_work_is_recomputed_if_still_wanted() -> None:
    calls = 0
    release = trio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
        return calls

    async with trio.open_nursery() as nursery:
        pending = Pending(nursery, work)
        await trio.testing.wait_all_tasks_blocked()
        pending.cancel()
        assert await pending.result() == 2
