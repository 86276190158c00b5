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


def test_refinement_revisits_the_middle_index_the_greedy_pass_fixed():
    # 2 steps prefer index 11, but 3 steps are best at [0, 8, 12]: the greedy pass keeps 11 and
    # finds [0, 11, 13]; the coordinate pass moves the middle index back to 8.
    def toy(ts):
        if len(ts) == 2:
            return (ts[1] - 11) ** 2
        return (ts[1] - 8) ** 2 + (ts[2] - 12) ** 2 + 0.5 * abs(ts[2] - ts[1] - 4)
    for method in ("ternary", "grid"):
        chosen, seen = search_ts(toy, 3, 18, method)
        assert chosen[2] == [0, 11]
        assert chosen[3] == [0, 8, 12]
        assert "0,11,13" in seen or "0,11,12" in seen   # the greedy pass ran first


def test_a_given_start_is_kept_when_the_search_cannot_beat_it():
    # A plateau the search cannot see across: every ts scores 1 except the given one.
    def toy(ts):
        return 0.0 if ts == [0, 5, 9] else 1.0
    chosen, _ = search_ts(toy, 3, 18, "ternary", start={3: [0, 5, 9]})
    assert chosen[3] == [0, 5, 9]
    assert toy(search_ts(toy, 3, 18, "ternary")[0][3]) == 1.0   # without it the search misses it
