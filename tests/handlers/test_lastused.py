"""LastUsedAt updates after a successful AUTH: batched, coalesced, drained on close, a
bounded queue that never makes an AUTH wait, and store errors logged, not raised."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta

import pytest
import trio
import trio.testing

from relate_smtp.handlers.auth import AuthOutcome
from relate_smtp.handlers.lastused import LastUsedUpdater
from tests.handlers.helpers import IP, NOW, OTHER_IP, FakeStore, Harness


async def test_last_used_updates_are_batched_coalesced_and_drained_on_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    updater = LastUsedUpdater(store, capacity=16, min_interval=0)
    first, second = uuid.uuid4(), uuid.uuid4()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(updater.run)
            await trio.testing.wait_all_tasks_blocked()
            assert updater.enqueue(first, NOW)
            assert updater.enqueue(second, NOW)
            assert updater.enqueue(first, NOW + timedelta(seconds=5))
            assert updater.enqueue(first, NOW + timedelta(seconds=1))
            updater.close()
    assert store.touched == [{first: NOW + timedelta(seconds=5), second: NOW}]
    assert updater.written == 2


async def test_a_key_used_again_soon_is_not_written_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    now = [100.0]
    updater = LastUsedUpdater(store, capacity=16, min_interval=60, clock=lambda: now[0])
    key = uuid.uuid4()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(updater.run)
            assert updater.enqueue(key, NOW)
            await trio.testing.wait_all_tasks_blocked()
            now[0] += 59
            assert updater.enqueue(key, NOW + timedelta(seconds=59))
            await trio.testing.wait_all_tasks_blocked()
            now[0] += 2
            assert updater.enqueue(key, NOW + timedelta(seconds=61))
            updater.close()
    assert store.touched == [{key: NOW}, {key: NOW + timedelta(seconds=61)}]
    assert updater.skipped == 1


async def test_last_used_run_flushes_what_was_queued_before_it_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    updater = LastUsedUpdater(store, capacity=16, batch_size=2, min_interval=0)
    keys = [uuid.uuid4() for _ in range(5)]
    for key in keys:
        assert updater.enqueue(key, NOW)
    await updater.aclose()
    with trio.fail_after(5):
        await updater.run()
    assert [len(batch) for batch in store.touched] == [2, 2, 1]
    assert {k for batch in store.touched for k in batch} == set(keys)
    assert updater.enqueue(uuid.uuid4(), NOW) is False


def test_last_used_queue_is_bounded_and_drops_when_full() -> None:
    updater = LastUsedUpdater(FakeStore(), capacity=2, min_interval=0)
    assert updater.enqueue(uuid.uuid4(), NOW)
    assert updater.enqueue(uuid.uuid4(), NOW)
    assert updater.enqueue(uuid.uuid4(), NOW) is False
    assert updater.dropped == 1


async def test_authentication_never_waits_for_a_full_last_used_queue() -> None:
    h = Harness(queue_capacity=1)
    for ip in (IP, OTHER_IP, "203.0.113.1"):
        assert await h.login(ip=ip) is AuthOutcome.SUCCESS
    assert h.updater.dropped == 2


async def test_last_used_store_errors_are_logged_not_raised(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FakeStore()
    store.touch_unavailable = True
    updater = LastUsedUpdater(store, capacity=16, min_interval=0)
    failing, later = uuid.uuid4(), uuid.uuid4()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(updater.run)
            updater.enqueue(failing, NOW)
            await trio.testing.wait_all_tasks_blocked()
            store.touch_unavailable = False
            updater.enqueue(later, NOW)
            updater.close()
    assert store.calls["touch_api_keys"] == 2
    assert store.touched == [{later: NOW}]
    assert updater.failed_batches == 1
    assert "Could not update LastUsedAt" in caplog.text


async def test_aclose_waits_until_queued_updates_are_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class SlowStore(FakeStore):
        async def touch_api_keys(self, last_used: Mapping[uuid.UUID, datetime]) -> None:
            await trio.sleep(0.2)
            await super().touch_api_keys(last_used)

    store = SlowStore()
    updater = LastUsedUpdater(store, capacity=16, batch_size=1, min_interval=0)
    keys = [uuid.uuid4() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(updater.run)
        for key in keys:
            assert updater.enqueue(key, NOW)
        await updater.aclose()
        assert updater.written == 3
        assert [set(batch) for batch in store.touched] == [{key} for key in keys]
