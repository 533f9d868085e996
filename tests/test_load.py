"""Load: several notebook clients (separate processes) on mixed targets at once; every
result checked, none lost, duplicated or misdelivered. And a short soak of small calls.
Figures are printed by `kaas bench load`; here only correctness is asserted."""

from __future__ import annotations

import pytest

from kaas_magic.bench.load import SOAK_BOUND_MIB, run_load, run_soak


@pytest.mark.timeout(300)
def test_concurrent_clients_on_mixed_targets_get_their_own_right_results(pool):
    lines, totals = run_load(pool.scheduler_address, clients=3, seconds=4, security=pool.client.security)
    assert totals["reported_clients"] == 3
    assert totals["calls"] >= 3 * 4  # every kind ran for every client at least once
    assert totals["wrong"] == 0 and totals["lost"] == 0 and totals["errors"] == 0, "\n".join(lines)


def test_soak_of_small_calls_keeps_memory_flat(pool):
    lines, figures = run_soak(pool, calls=600)
    assert figures["worst_mib"] <= SOAK_BOUND_MIB, "\n".join(lines)
