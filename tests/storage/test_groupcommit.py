"""The group commit both stores share, driven by a fake ``write_batch``."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from relate_smtp.storage import SavedEmail, StoreError, StoreUnavailable
from relate_smtp.storage.groupcommit import GroupCommit, Outcome


class Writer:
    """Stores batches of ids; each batch waits for ``release`` when ``hold`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[uuid.UUID]] = []
        self.hold = False
        self.release = trio.Event()
        self.entered = trio.Event()
        self.fail: Exception | None = None

    async def __call__(self, items: Sequence[uuid.UUID]) -> list[Outcome]:
        self.batches.append(list(items))
        self.entered.set()
        if self.hold:
            await self.release.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self.fail is not None:
            raise self.fail
        return [SavedEmail(id=i, thread_id=None, linked_user_ids=()) for i in items]


async def _save(
    commit: GroupCommit[uuid.UUID], item: uuid.UUID, out: dict[uuid.UUID, object]
) -> None:
    try:
        out[item] = await commit.submit(item, size=1)
    except StoreError as exc:
        out[item] = exc


async def test_messages_queued_behind_a_batch_form_the_next_one() -> None:
    writer = Writer()
    writer.hold = True
    commit = GroupCommit(writer, name="test")
    first, *rest = (uuid.uuid4() for _ in range(5))
    out: dict[uuid.UUID, object] = {}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_save, commit, first, out)
        await writer.entered.wait()
        for item in rest:
            nursery.start_soon(_save, commit, item, out)
        await trio.testing.wait_all_tasks_blocked()
        assert commit.stats().queued == 4
        writer.hold = False
        writer.release.set()

    assert writer.batches[0] == [first]
    assert sorted(writer.batches[1]) == sorted(rest)
    assert all(isinstance(out[i], SavedEmail) for i in [first, *rest])
    stats = commit.stats()
    assert (stats.batches, stats.messages, stats.largest_batch, stats.queued) == (2, 5, 4, 0)


async def test_batches_are_capped_by_count_and_bytes() -> None:
    writer = Writer()
    writer.hold = True
    commit = GroupCommit(writer, name="test", max_batch=2)
    items = [uuid.uuid4() for _ in range(6)]
    out: dict[uuid.UUID, object] = {}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_save, commit, items[0], out)
        await writer.entered.wait()
        for item in items[1:]:
            nursery.start_soon(_save, commit, item, out)
        await trio.testing.wait_all_tasks_blocked()
        writer.hold = False
        writer.release.set()

    assert [len(batch) for batch in writer.batches] == [1, 2, 2, 1]


async def test_a_cancelled_caller_withdraws_until_its_message_is_in_a_batch() -> None:
    writer = Writer()
    writer.hold = True
    commit = GroupCommit(writer, name="test")
    leader, withdrawn, kept = (uuid.uuid4() for _ in range(3))
    out: dict[uuid.UUID, object] = {}
    scopes: list[trio.CancelScope] = []

    async def cancellable(item: uuid.UUID) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await _save(commit, item, out)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancellable, leader)
        await writer.entered.wait()
        nursery.start_soon(cancellable, withdrawn)
        nursery.start_soon(_save, commit, kept, out)
        await trio.testing.wait_all_tasks_blocked()
        for scope in scopes:
            scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert commit.stats().queued == 1
        writer.hold = False
        writer.release.set()

    # the leader's batch went ahead although its caller left; the withdrawn one never ran
    assert writer.batches == [[leader], [kept]]
    assert set(out) == {kept}


async def test_a_bug_in_write_batch_fails_each_caller_with_its_own_store_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = Writer()
    writer.fail = KeyError("bug")
    commit = GroupCommit(writer, name="test")
    items = [uuid.uuid4() for _ in range(3)]
    out: dict[uuid.UUID, object] = {}

    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(_save, commit, item, out)

    errors = [out[i] for i in items]
    assert all(type(e) is StoreError and isinstance(e.__cause__, KeyError) for e in errors)
    assert len({id(e) for e in errors}) == 3
    assert "group commit failed" in caplog.text


async def test_closing_fails_the_queue_and_cancels_a_batch_past_its_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    writer = Writer()
    writer.hold = True
    commit = GroupCommit(writer, name="test")
    first, queued = uuid.uuid4(), uuid.uuid4()
    out: dict[uuid.UUID, object] = {}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_save, commit, first, out)
        await writer.entered.wait()
        nursery.start_soon(_save, commit, queued, out)
        await trio.testing.wait_all_tasks_blocked()
        await commit.aclose(grace=5)

    assert isinstance(out[queued], StoreUnavailable) and "closing" in str(out[queued])
    assert isinstance(out[first], StoreUnavailable) and "mid-commit" in str(out[first])
    with pytest.raises(StoreUnavailable, match="closed"):
        await commit.submit(uuid.uuid4(), size=1)
