"""The asyncpg pool as the connection string asks for it (SPEC §8): sizes, timeouts,
keepalive, load balancing, and no connection opened until one is needed."""

from __future__ import annotations

import functools
import inspect
import secrets
import socket
from typing import Any

import asyncpg

from relate_smtp.storage.connstring import PostgresParams, connect_arguments

__all__ = ["GENERIC_PLANS", "create_pool"]

#: Every statement the store runs is a short lookup or the batch insert, prepared once per
#: connection (asyncpg's statement cache). Left to choose, PostgreSQL plans the batch
#: statement afresh on every execution (its one-row custom plan looks cheaper than the
#: generic plan's ten-row estimate): about 0.5 ms of the database's CPU per batch, twice
#: what executing it costs. The generic plan is kept instead. An operator's
#: ``Options=-c plan_cache_mode=…`` still wins.
GENERIC_PLANS = {"plan_cache_mode": "force_generic_plan"}


def create_pool(params: PostgresParams) -> asyncpg.Pool:
    """Build the pool object without connecting (awaiting it connects ``init_size``)."""
    sizes: dict[str, int] = {"min_size": params.min_pool_size, "max_size": params.max_pool_size}
    options = inspect.signature(asyncpg.create_pool).parameters
    extra: dict[str, Any] = {
        "max_inactive_connection_lifetime": params.idle_lifetime,
        # Pooling=false: Npgsql closes the physical connection on every close.
        "max_queries": 50000 if params.pooling else 1,
    }
    if params.tcp_keepalive or params.keepalive_idle or params.keepalive_interval:
        extra["init"] = functools.partial(_set_keepalive, params)
    if params.load_balance_hosts and params.other_hosts:
        extra["connect"] = _connect_to_a_random_host_first
    if "reset" in options:
        extra["reset"] = _keep_session
    if "init_size" in options:
        sizes["init_size"] = 0  # asyncpg ≥ 0.32: keep min_size, refill it in the background
    else:  # older asyncpg would connect min_size at creation and fail while PG is down
        sizes["min_size"] = 0
    arguments = connect_arguments(params)
    arguments["server_settings"] = {**GENERIC_PLANS, **(arguments["server_settings"] or {})}
    return asyncpg.create_pool(
        **arguments,
        timeout=params.connect_timeout if params.connect_timeout is not None else 3600.0,
        command_timeout=params.command_timeout,
        **sizes,
        **extra,
    )


async def _set_keepalive(params: PostgresParams, con: asyncpg.Connection) -> None:
    """Keepalive / TCP Keepalive*: TCP probes on each new connection, so a peer that
    vanished (a failed-over primary, a dropped NAT entry) is noticed while idle."""
    transport = getattr(con, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    tunables = (
        (getattr(socket, "TCP_KEEPIDLE", None), params.keepalive_idle),
        (getattr(socket, "TCP_KEEPINTVL", None), params.keepalive_interval),
    )
    for option, seconds in tunables:
        if option is not None and seconds:
            sock.setsockopt(socket.IPPROTO_TCP, option, seconds)


async def _connect_to_a_random_host_first(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """Load Balance Hosts=true: each new connection tries the hosts in a random order."""
    hosts = list(zip(kwargs["host"], kwargs["port"], strict=True))
    secrets.SystemRandom().shuffle(hosts)
    kwargs["host"], kwargs["port"] = [h for h, _ in hosts], [p for _, p in hosts]
    return await asyncpg.connect(*args, **kwargs)


async def _keep_session(con: asyncpg.Connection) -> None:
    """Pool reset on release: nothing beyond asyncpg's own rollback of an unfinished
    transaction.

    asyncpg's default runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every release, a round trip per call. The store never changes session
    state (no SET, LISTEN, cursors or session-level advisory locks; ``db init`` takes
    a transaction-level lock), so there is nothing to undo.
    """
