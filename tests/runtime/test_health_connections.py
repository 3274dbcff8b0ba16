"""The health listener's connection table: idle order, eviction, release, caps."""

from __future__ import annotations

import pytest

from relate_smtp.runtime.health_connections import ConnectionTable


def test_idle_order_is_the_order_connections_began_to_wait() -> None:
    table = ConnectionTable(max_total=2, max_per_client=2)
    kept_alive, _ = table.admit("192.0.2.1")
    fresh, _ = table.admit("192.0.2.2")
    table.busy(kept_alive)  # answered a request, then waits for the next
    table.idle(kept_alive)
    _, eviction = table.admit("192.0.2.3")
    assert eviction is not None and eviction.slot is fresh


def test_releasing_an_evicted_slot_again_is_harmless() -> None:
    table = ConnectionTable(max_total=1, max_per_client=1)
    first, _ = table.admit("192.0.2.1")
    second, eviction = table.admit("192.0.2.1")
    assert eviction is not None and eviction.slot is first
    assert "one client" in eviction.reason
    table.release(first)
    assert len(table) == 1
    table.release(second)
    assert len(table) == 0
    assert table.admit("192.0.2.1")[1] is None


@pytest.mark.parametrize(("total", "per_client"), [(0, 1), (1, 0)])
def test_caps_below_one_are_refused(total: int, per_client: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionTable(max_total=total, max_per_client=per_client)
