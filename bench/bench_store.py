"""Write-path throughput of the PostgreSQL store: saves per second of a typical small
message (two header recipients, one linked local user, a ~2 KiB text body, no
attachment) at several numbers of concurrent savers.

    python -m bench.bench_store                      # a throw-away database on the
                                                     # test server (RELATE_SMTP_TEST_POSTGRES)
    python -m bench.bench_store "Host=…;Database=…"  # an existing database (rows are added)
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import attrs
import trio

from relate_smtp.storage import HeaderRecipient, NewEmail
from relate_smtp.storage.connstring import PostgresParams, parse_connection_string
from relate_smtp.storage.postgres import PostgresStore, open_postgres_store
from relate_smtp.storage.records import RECIPIENT_CC, RECIPIENT_TO

BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 36)[:2048]


@attrs.frozen
class Result:
    concurrency: int
    messages: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds


def small_email(local_user: str) -> NewEmail:
    return NewEmail(
        id=uuid.uuid4(),
        message_id=f"{uuid.uuid4()}@sender.example",
        from_address="sender@sender.example",
        from_display_name="Sender",
        subject="Quarterly numbers",
        text_body=BODY,
        html_body=None,
        received_at=datetime.now(UTC),
        size_bytes=2600,
        in_reply_to=None,
        references=None,
        sent_by_user_id=None,
        header_recipients=(
            HeaderRecipient(address=local_user, display_name="Local", type=RECIPIENT_TO),
            HeaderRecipient(address="someone@remote.example", display_name=None, type=RECIPIENT_CC),
        ),
        envelope_recipients=(local_user,),
    )


async def measure(store: PostgresStore, local_user: str, concurrency: int, messages: int) -> Result:
    emails = [small_email(local_user) for _ in range(messages)]
    queue = iter(emails)

    async def saver() -> None:
        for email in queue:  # the savers share one iterator: each message is saved once
            await store.save_email(email)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(saver)
    return Result(concurrency=concurrency, messages=messages, seconds=time.perf_counter() - start)


@asynccontextmanager
async def _database(connection: str | None) -> AsyncIterator[PostgresParams]:
    if connection is not None:
        yield parse_connection_string(connection)
        return
    from tests.storage.pg_support import temporary_database  # a dev-only dependency

    async with temporary_database("init") as db:
        yield attrs.evolve(db.params, max_pool_size=20)


async def run(
    connection: str | None = None,
    *,
    concurrencies: Sequence[int] = (1, 20),
    messages: int = 2000,
) -> list[Result]:
    """Save ``messages`` messages at each concurrency; print and return the rates."""
    results = []
    async with _database(connection) as params, open_postgres_store(params) as store:
        local = f"bench-{uuid.uuid4().hex[:8]}@example.com"
        await store.create_user(local, display_name=None, aliases=())
        await measure(store, local, concurrency=4, messages=200)  # warm the pool and caches
        for concurrency in concurrencies:
            result = await measure(store, local, concurrency, messages)
            results.append(result)
            print(
                f"save_email: {result.per_second:8.0f} saves/s at {concurrency:>2} concurrent "
                f"savers ({messages} messages in {result.seconds:.2f} s)"
            )
    return results


if __name__ == "__main__":
    trio.run(run, sys.argv[1] if len(sys.argv) > 1 else None)
