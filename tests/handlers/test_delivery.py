"""End of data: the outcome the handler returns, and its error contract.

Only a transient store failure (:class:`StoreUnavailable`) is answered 451 by the
handler itself; any other exception is a bug and propagates to the runtime, which
counts it (see tests/runtime/test_session.py and test_network_checks.py).
"""

from __future__ import annotations

import uuid

import pytest

from relate_smtp.handlers.delivery import DeliveryOutcome, MessageDelivery
from relate_smtp.handlers.parsing import MessageParser
from relate_smtp.protocol import ATTACHMENT_TOO_BIG, LOCAL_ERROR
from relate_smtp.storage import NewEmail, SavedEmail, StoreUnavailable

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


class Store:
    """The one method delivery uses; ``failure`` is raised instead of saving."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.saved: list[NewEmail] = []

    async def save_email(self, email: NewEmail) -> SavedEmail:
        if self.failure is not None:
            raise self.failure
        self.saved.append(email)
        return SavedEmail(id=uuid.uuid4(), thread_id=None, linked_user_ids=())


def delivery(store: Store, *, max_attachment_size: int = 1_000_000) -> MessageDelivery:
    parser = MessageParser(max_attachment_size=max_attachment_size)
    return MessageDelivery(store, parser=parser, discard=False)  # type: ignore[arg-type]


async def deliver(store: Store, message: bytes = MESSAGE, **kwargs: int) -> DeliveryOutcome:
    return await delivery(store, **kwargs).deliver(
        message, envelope_recipients=("b@example.com",), sent_by_user_id=None
    )


async def test_a_stored_message_is_accepted_with_its_commit_time() -> None:
    store = Store()
    outcome = await deliver(store)
    assert outcome.reply.code == 250
    assert outcome.refused is None
    assert outcome.store_seconds is not None and outcome.store_seconds >= 0
    assert len(store.saved) == 1


async def test_an_unavailable_store_is_a_transient_451() -> None:
    outcome = await deliver(Store(StoreUnavailable("connection reset")))
    assert outcome.reply == LOCAL_ERROR
    assert outcome.refused == "store_unavailable"
    assert outcome.store_seconds is None


async def test_a_bug_is_not_turned_into_a_reply_here() -> None:
    with pytest.raises(RuntimeError, match="bug"):
        await deliver(Store(RuntimeError("bug")))


async def test_a_refused_message_names_its_reason() -> None:
    big = (
        b"From: a@example.com\r\nSubject: att\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\nbody\r\n--b\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="x.bin"\r\n\r\n' + b"x" * 200 + b"\r\n--b--\r\n"
    )
    outcome = await deliver(Store(), big, max_attachment_size=10)
    assert outcome.reply == ATTACHMENT_TOO_BIG
    assert outcome.refused == "attachment_too_big"


async def test_discarded_messages_are_accepted_with_distinct_queue_ids() -> None:
    store = Store()
    parser = MessageParser(max_attachment_size=1_000_000)
    discarding = MessageDelivery(store, parser=parser, discard=True)  # type: ignore[arg-type]
    replies = [
        (
            await discarding.deliver(
                MESSAGE, envelope_recipients=("b@example.com",), sent_by_user_id=None
            )
        ).reply
        for _ in range(3)
    ]
    assert [reply.code for reply in replies] == [250, 250, 250]
    queue_ids = {reply.lines[0].removeprefix("OK: queued as ") for reply in replies}
    assert len(queue_ids) == 3 and all(len(q) == 32 for q in queue_ids)
    assert store.saved == []
