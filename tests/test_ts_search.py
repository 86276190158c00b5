"""The ts search finds the known minimum of toy objectives."""
import pytest

from cmpipe.ts_search import search_ts, ternary_search


def test_ternary_search_finds_the_minimum_of_a_unimodal_function():
    for target in range(1, 18):
        calls = []

        def f(i):
            calls.append(i)
            return (i - target) ** 2
        assert ternary_search(f, 1, 17) == target
        assert len(set(calls)) < 17   # fewer evaluations than trying every index


def test_search_ts_2_and_3_steps_on_a_toy_objective():
    # minimum at ts = [0, 6] for 2 steps and [0, 6, 13] for 3 steps
    def toy(ts):
        return (ts[1] - 6) ** 2 + (0 if len(ts) < 3 else (ts[2] - 13) ** 2)
    for method in ("ternary", "grid"):
        chosen, seen = search_ts(toy, 3, 18, method)
        assert chosen == {2: [0, 6], 3: [0, 6, 13]}
        assert seen["0,6"] == 0 and seen["0,6,13"] == 0
    assert len(search_ts(toy, 3, 18, "ternary")[1]) < len(search_ts(toy, 3, 18, "grid")[1])


def test_search_ts_refuses_bad_settings():
    with pytest.raises(ValueError, match="method"):
        search_ts(lambda ts: 0.0, 2, 18, "random")
    with pytest.raises(ValueError, match="steps"):
        search_ts(lambda ts: 0.0, 1, 18)
