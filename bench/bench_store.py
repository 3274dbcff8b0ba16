"""The write path alone: this product's PostgreSQL store against plain asyncio + asyncpg.

Issue 4's targets, measured in one run on one (temporary) database:

- **product**: :class:`~relate_smtp.storage.postgres.PostgresStore` (Trio, bridged to
  asyncpg in an asyncio thread, group commit), driven by N Trio tasks calling
  ``save_email``;
- **baseline**: plain ``asyncio.run`` + an asyncpg pool of N connections, N tasks each
  storing the same rows with one transaction per message (``BEGIN``, ``INSERT`` the
  e-mail, ``executemany`` the recipients, ``COMMIT``) — the obvious asyncpg code. It is
  given the user id up front (the product resolves it in the database) and the same
  no-op pool reset as the product, so it is not handicapped;
- **sqlite**: the embedded store at the same concurrency, for reference.

Every message is one ``Emails`` row with a 2 KiB text body and two ``EmailRecipients``
rows (a linked local user and a remote address). A measurement runs N writers and
counts the messages committed. Each of ``--runs`` paired runs gives product and
baseline ``--seconds`` each, in ``--slices`` alternating slices (the order flipping
every slice): the machine is shared, and load from elsewhere (other processes, other
databases' WAL flushes on the same disk) then falls on both alike instead of on
whichever ran at a bad moment. The table shows the medians and the median of the
paired ratios against the targets: ≥ 2.0x at 20 writers, ≥ 0.85x at 1 writer. Tables
are emptied (and a CHECKPOINT taken, where allowed) before each slice, and every slice
starts with a fresh store or pool and a short untimed warm-up.

    python -m bench.bench_store                     # 5 paired runs of 5 s (about 4 min)
    python -m bench.bench_store --runs 1 --seconds 1 --slices 1   # a quick look
    python -m bench.bench_store --connection "Host=…;Database=…"   # an existing,
        # initialised database instead of a temporary one (its mail tables are emptied!)

The temporary database is made on ``RELATE_SMTP_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``) and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final

import asyncpg
import attrs
import trio

from relate_smtp.storage import HeaderRecipient, NewEmail, Store
from relate_smtp.storage.connstring import PostgresParams, parse_connection_string
from relate_smtp.storage.postgres import open_postgres_store
from relate_smtp.storage.records import RECIPIENT_CC, RECIPIENT_TO
from relate_smtp.storage.sqlite import SqliteStore

__all__ = ["Figures", "main", "run"]

ADMIN_URL: Final = os.environ.get(
    "RELATE_SMTP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TARGETS: Final = {20: 2.0, 1: 0.85}  # issue 4: product ÷ baseline, median of paired runs
BODY: Final = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 37)[:2048]
LOCAL_USER: Final = "bench-user@example.com"
REMOTE: Final = "someone@remote.example"
WARM_UP_SECONDS: Final = 0.3

_BASELINE_EMAIL = """
INSERT INTO "Emails" ("Id", "MessageId", "FromAddress", "FromDisplayName", "Subject",
    "TextBody", "HtmlBody", "ReceivedAt", "SizeBytes", "InReplyTo", "References",
    "ThreadId", "SentByUserId")
VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $8, NULL, NULL, NULL, NULL)
"""
_BASELINE_RECIPIENT = """
INSERT INTO "EmailRecipients" ("Id", "EmailId", "Address", "DisplayName", "Type", "UserId",
    "IsRead")
VALUES ($1, $2, $3, $4, $5, $6, false)
"""


@attrs.frozen
class Rate:
    """One measurement: messages committed by ``writers`` concurrent writers."""

    messages: int
    seconds: float
    cpu_seconds: float  # this process's CPU (the client side of the database)

    def __add__(self, other: Rate) -> Rate:
        return Rate(
            self.messages + other.messages,
            self.seconds + other.seconds,
            self.cpu_seconds + other.cpu_seconds,
        )

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_us_per_message(self) -> float:
        return self.cpu_seconds / max(self.messages, 1) * 1e6


@attrs.frozen
class Figures:
    """Every measurement of one concurrency level."""

    writers: int
    product: tuple[Rate, ...]
    baseline: tuple[Rate, ...]
    sqlite: tuple[Rate, ...]

    @property
    def ratios(self) -> list[float]:
        return [
            p.per_second / b.per_second for p, b in zip(self.product, self.baseline, strict=True)
        ]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def _median(rates: Sequence[Rate]) -> float:
    return statistics.median(r.per_second for r in rates) if rates else float("nan")


def _median_cpu(rates: Sequence[Rate]) -> float:
    return statistics.median(r.cpu_us_per_message for r in rates) if rates else float("nan")


# --- the workload --------------------------------------------------------------------------


def bench_email() -> NewEmail:
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
            HeaderRecipient(address=LOCAL_USER, display_name="Local", type=RECIPIENT_TO),
            HeaderRecipient(address=REMOTE, display_name=None, type=RECIPIENT_CC),
        ),
        envelope_recipients=(LOCAL_USER,),
    )


async def _trio_writers(store: Store, writers: int, seconds: float) -> Rate:
    """``writers`` Trio tasks saving back to back until ``seconds`` have passed."""
    count = 0

    async def writer(deadline: float) -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await store.save_email(bench_email())
            count += 1

    async def phase(duration: float) -> Rate:
        nonlocal count
        count = 0
        cpu, start = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(writers):
                nursery.start_soon(writer, start + duration)
        return Rate(count, time.perf_counter() - start, time.process_time() - cpu)

    await phase(WARM_UP_SECONDS)
    return await phase(seconds)


async def _measure_product(params: PostgresParams, writers: int, seconds: float) -> Rate:
    async with open_postgres_store(params) as store:
        return await _trio_writers(store, writers, seconds)


async def _measure_sqlite(path: Path, writers: int, seconds: float) -> Rate:
    store = await SqliteStore.open(path)
    try:
        if await store.find_user_by_address(LOCAL_USER) is None:
            await store.create_user(LOCAL_USER, display_name=None, aliases=())
        return await _trio_writers(store, writers, seconds)
    finally:
        await store.aclose()


async def _no_reset(con: asyncpg.Connection) -> None:
    """The product's pool reset (nothing to undo), so the baseline is not slowed."""


def _run_product(params: PostgresParams, writers: int, seconds: float) -> Rate:
    rate: Rate = trio.run(_measure_product, params, writers, seconds)
    return rate


def _run_sqlite(path: Path, writers: int, seconds: float) -> Rate:
    rate: Rate = trio.run(_measure_sqlite, path, writers, seconds)
    return rate


def _run_baseline(params: PostgresParams, writers: int, seconds: float) -> Rate:
    rate: Rate = asyncio.run(_measure_baseline(params, writers, seconds))
    return rate


async def _measure_baseline(params: PostgresParams, writers: int, seconds: float) -> Rate:
    pool = await asyncpg.create_pool(
        **_connect_kwargs(params), min_size=writers, max_size=writers, reset=_no_reset
    )
    try:
        user_id = await pool.fetchval('SELECT "Id" FROM "Users" WHERE "Email" = $1', LOCAL_USER)
        count = 0

        async def save(email: NewEmail) -> None:
            async with pool.acquire() as con, con.transaction():
                await con.execute(
                    _BASELINE_EMAIL,
                    email.id,
                    email.message_id,
                    email.from_address,
                    email.from_display_name,
                    email.subject,
                    email.text_body,
                    email.received_at,
                    email.size_bytes,
                )
                await con.executemany(
                    _BASELINE_RECIPIENT,
                    [
                        (uuid.uuid4(), email.id, r.address, r.display_name, r.type, linked)
                        for r, linked in zip(email.header_recipients, (user_id, None), strict=True)
                    ],
                )

        async def writer(deadline: float) -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                await save(bench_email())
                count += 1

        async def phase(duration: float) -> Rate:
            nonlocal count
            count = 0
            cpu, start = time.process_time(), time.perf_counter()
            await asyncio.gather(*(writer(start + duration) for _ in range(writers)))
            return Rate(count, time.perf_counter() - start, time.process_time() - cpu)

        await phase(WARM_UP_SECONDS)
        return await phase(seconds)
    finally:
        await pool.close()


# --- the database --------------------------------------------------------------------------


def _connect_kwargs(params: PostgresParams) -> dict[str, Any]:
    return {
        "host": params.host,
        "port": params.port,
        "user": params.user,
        "password": params.password,
        "database": params.database,
        "ssl": params.ssl,
    }


def _on_database(
    params: PostgresParams, work: Callable[[asyncpg.Connection], Awaitable[Any]]
) -> Any:
    async def go() -> Any:
        con = await asyncpg.connect(**_connect_kwargs(params))
        try:
            return await work(con)
        finally:
            await con.close()

    return asyncio.run(go())


@contextmanager
def _database(connection: str | None) -> Iterator[PostgresParams]:
    """``connection`` parsed, or a temporary database dropped on exit."""
    if connection is not None:
        yield parse_connection_string(connection)
        return
    admin = parse_connection_string(ADMIN_URL)
    name = f"relate_smtp_bench_{uuid.uuid4().hex[:12]}"
    _on_database(admin, lambda con: con.execute(f'CREATE DATABASE "{name}"'))
    try:
        yield attrs.evolve(admin, database=name)
    finally:
        _on_database(admin, lambda con: con.execute(f'DROP DATABASE "{name}" WITH (FORCE)'))


async def _prepare(con: asyncpg.Connection) -> None:
    """Create the tables if absent and the one local user the messages link to."""
    await con.execute(
        resources.files("relate_smtp.storage").joinpath("schema/postgres.sql").read_text()
    )
    await con.execute(
        'INSERT INTO "Users" ("Id", "OidcSubject", "OidcIssuer", "Email", "CreatedAt")'
        " SELECT $1::uuid, $1::uuid::text, 'relate-smtp-bench', $2::text, now()"
        ' WHERE NOT EXISTS (SELECT 1 FROM "Users" WHERE "Email" = $2::text)',
        uuid.uuid4(),
        LOCAL_USER,
    )


async def _reset(con: asyncpg.Connection) -> None:
    """Empty the mail tables and flush dirty pages, so each measurement starts alike."""
    # CASCADE: tables added later (labels) refer to e-mails too.
    await con.execute('TRUNCATE "Emails", "EmailRecipients", "EmailAttachments" CASCADE')
    with suppress(asyncpg.InsufficientPrivilegeError):
        await con.execute("CHECKPOINT")


# --- the run -------------------------------------------------------------------------------


def _sliced(
    measures: Sequence[tuple[str, Callable[[float], Rate]]],
    seconds: float,
    slices: int,
    reset: Callable[[], None],
) -> dict[str, Rate]:
    """Give each contender ``seconds`` in all, in ``slices`` alternating slices (the
    order flipping every slice), so that load from elsewhere on the machine falls on
    all of them alike; return each one's slices summed."""
    totals: dict[str, Rate] = {}
    for index in range(slices):
        for name, measure in measures if index % 2 == 0 else measures[::-1]:
            reset()
            rate = measure(seconds / slices)
            totals[name] = totals[name] + rate if name in totals else rate
    return totals


def run(
    *,
    connection: str | None = None,
    seconds: float = 5.0,
    runs: int = 5,
    slices: int = 5,
    writers: Sequence[int] = (1, 20),
    sqlite: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Measure, print the table, and return the headline figures by name.

    Each of ``runs`` paired runs gives product and baseline ``seconds`` each, in
    ``slices`` alternating slices; SQLite gets ``seconds`` in one go. ``connection``:
    an initialised database to use instead of a temporary one.
    """
    say = progress or (lambda text: print(text, file=sys.stderr, flush=True))
    figures = []
    with (
        _database(connection) as database,
        tempfile.TemporaryDirectory(prefix="relate-smtp-bench-") as tmp,
    ):
        params = attrs.evolve(database, max_pool_size=max(20, *writers), min_pool_size=0)
        _on_database(params, _prepare)

        def reset() -> None:
            _on_database(params, _reset)

        for count in writers:
            rates: dict[str, list[Rate]] = {"product": [], "baseline": [], "sqlite": []}
            for index in range(runs):
                measures: list[tuple[str, Callable[[float], Rate]]] = [
                    ("product", functools.partial(_run_product, params, count)),
                    ("baseline", functools.partial(_run_baseline, params, count)),
                ]
                if index % 2:
                    measures.reverse()
                if sqlite:
                    path = Path(tmp) / f"sqlite-{count}-{index}.db"
                    measures.append(("sqlite", functools.partial(_run_sqlite, path, count)))
                paired = _sliced(measures[:2], seconds, slices, reset)
                if sqlite:
                    paired |= _sliced(measures[2:], seconds, 1, reset)
                for name, rate in paired.items():
                    rates[name].append(rate)
                    say(
                        f"  {count:>2} writers, run {index + 1}/{runs}, {name:<8}"
                        f" {rate.per_second:8.0f} msg/s ({rate.cpu_us_per_message:5.0f} us CPU/msg)"
                    )
            figures.append(
                Figures(count, *(tuple(rates[k]) for k in ("product", "baseline", "sqlite")))
            )
        reset()
    print(report(figures, seconds=seconds, runs=runs, slices=slices))
    return headline(figures)


def headline(figures: Sequence[Figures]) -> dict[str, float]:
    result: dict[str, float] = {}
    for f in figures:
        result[f"postgres_msgs_per_s_{f.writers}w"] = _median(f.product)
        result[f"asyncio_baseline_msgs_per_s_{f.writers}w"] = _median(f.baseline)
        result[f"ratio_{f.writers}w"] = f.ratio
        if f.sqlite:
            result[f"sqlite_msgs_per_s_{f.writers}w"] = _median(f.sqlite)
    return result


def report(figures: Sequence[Figures], *, seconds: float, runs: int, slices: int) -> str:
    lines = [
        f"Write path, messages committed per second: median of {runs} paired run(s) of"
        f" {seconds:g} s each (in {slices} alternating slice(s)); one Emails row with a"
        " 2 KiB body + two EmailRecipients rows per message",
        "",
        f"{'writers':>7}  {'product':>9}  {'asyncio':>9}  {'ratio':>6}  {'target':>7}"
        f"  {'':4}  {'sqlite':>8}  {'CPU us/msg product / asyncio':>28}  paired ratios",
    ]
    for f in figures:
        target = TARGETS.get(f.writers)
        verdict = "" if target is None else ("met" if f.ratio >= target else "MISSED")
        lines.append(
            f"{f.writers:>7}  {_median(f.product):>9.0f}  {_median(f.baseline):>9.0f}"
            f"  {f.ratio:>5.2f}x  {'' if target is None else f'≥{target:.2f}x':>7}"
            f"  {verdict:<6}  {f'{_median(f.sqlite):.0f}' if f.sqlite else '-':>8}"
            f"  {_median_cpu(f.product):>13.0f} / {_median_cpu(f.baseline):<12.0f}"
            f"  {' '.join(f'{r:.2f}' for r in f.ratios)}"
        )
    lines += [
        "",
        "product: PostgresStore (Trio + asyncpg in an asyncio thread, group commit);"
        " asyncio: plain asyncio + asyncpg, one transaction per message;"
        " sqlite: the embedded store (reference). CPU is this process's (client side).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_store", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    parser.add_argument("--runs", type=int, default=5, help="paired runs (the median is kept)")
    parser.add_argument(
        "--slices",
        type=int,
        default=5,
        help="alternating slices per paired run (1: each contender in one go)",
    )
    parser.add_argument(
        "--writers", default="1,20", help="concurrency levels, comma-separated (default 1,20)"
    )
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite figures")
    parser.add_argument("--connection", help="an initialised database instead of a temporary one")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.slices < 1 or args.seconds <= 0:
        parser.error("--runs and --slices must be at least 1, --seconds positive")
    run(
        connection=args.connection,
        seconds=args.seconds,
        runs=args.runs,
        slices=args.slices,
        writers=[int(w) for w in args.writers.split(",")],
        sqlite=not args.no_sqlite,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
