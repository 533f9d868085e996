"""A run record's phases add up to its total, whatever the measured parts were."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from kaas_magic.record import PHASES, Timings

seconds = st.floats(min_value=-10.0, max_value=1e4, allow_nan=False, allow_infinity=False)
parts = st.dictionaries(st.sampled_from(PHASES), seconds, max_size=len(PHASES))


@given(parts, st.floats(min_value=0.0, max_value=1e4), st.sampled_from(PHASES))
def test_balanced_phases_always_sum_to_the_total_and_are_never_negative(measured, total, rest):
    t = Timings.balanced(measured, total, rest)
    values = [getattr(t, p) for p in PHASES]
    assert all(v >= 0 for v in values)
    assert math.isclose(sum(values), t.total, rel_tol=1e-9, abs_tol=1e-12)
    assert t.total == total
    assert all(v <= total * (1 + 1e-9) for v in values)  # no phase longer than the call


@given(parts, st.floats(min_value=0.0, max_value=1e4), st.sampled_from(PHASES))
def test_parts_that_fit_are_kept_and_the_rest_goes_to_the_named_phase(measured, total, rest):
    clean = {p: max(0.0, v) for p, v in measured.items()}
    if sum(clean.values()) > total:
        return
    t = Timings.balanced(measured, total, rest)
    for phase in PHASES:
        expected = clean.get(phase, 0.0) + (total - sum(clean.values()) if phase == rest else 0.0)
        assert math.isclose(getattr(t, phase), expected, rel_tol=1e-9, abs_tol=1e-9)


def test_the_reported_timeout_case_no_longer_shows_a_phase_longer_than_the_call():
    # Seen before: transfer in 2.00 s, execute 1.00 s, total 2.00 s.
    t = Timings.balanced({"transfer_in": 2.0, "execute": 1.0}, 2.0)
    assert t.transfer_in + t.execute == 2.0 and t.execute < 2.0 and t.transfer_in < 2.0
