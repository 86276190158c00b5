"""The ts search finds the known minimum of toy objectives."""
import pytest

from cmpipe.sampling.ts_search import search_ts, ternary_search


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


def test_the_given_ts_stays_unless_the_search_beats_it_with_confidence():
    def toy(ts):  # the search's optimum is [0, 8] and [0, 8, 12]; the given ts score a little worse
        return abs(ts[1] - 8) + (abs(ts[2] - 12) if len(ts) == 3 else 0)
    start = {2: [0, 11], 3: [0, 9, 12]}
    chosen, _ = search_ts(toy, 3, 18, "ternary", start=start, beats=lambda a, b: False)
    assert chosen == start  # never confident: the given ts stay
    chosen, _ = search_ts(toy, 3, 18, "ternary", start=start, beats=lambda a, b: True)
    assert chosen == {2: [0, 8], 3: [0, 8, 12]}
    assert search_ts(toy, 3, 18, "ternary", start=start)[0] == {2: [0, 8], 3: [0, 8, 12]}  # default: lower wins


def test_beats_compares_a_given_ts_the_search_never_visited():
    """`beats` reads the samples of both ts: the given one is evaluated even when the ternary
    search's path never reached it (a 2-step given [0, 16] on a minimum at index 3)."""
    seen_by_beats = []

    def toy(ts):
        return abs(ts[1] - 3)

    chosen, seen = search_ts(toy, 2, 18, "ternary", start={2: [0, 16]},
                             beats=lambda a, b: seen_by_beats.append((a, b)) or True)
    assert seen_by_beats == [([0, 3], [0, 16])] and "0,16" in seen
    assert chosen == {2: [0, 3]}


def test_fid_of_few_samples_equals_the_full_formula():
    import numpy as np

    from cmpipe.metrics.fid import feature_stats, fid, fid_few, fid_from_stats

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40))
    mu_ref, sigma_ref = feature_stats(ref)
    for n in (2, 12, 39, 40, 41, 80):   # fid() takes fid_few's path up to n = d = 40
        feats = rng.normal(loc=0.3, size=(n, 40)).astype(np.float32)
        full = fid_from_stats(*feature_stats(feats), mu_ref, sigma_ref)
        assert fid(feats, mu_ref, sigma_ref) == pytest.approx(full, rel=1e-6)
        if n <= 40:
            assert fid_few(feats, mu_ref, sigma_ref) == pytest.approx(full, rel=1e-6)


def test_paired_win_rate():
    import numpy as np

    from cmpipe.metrics.fid import feature_stats
    from cmpipe.sampling.ts_search import paired_win_rate

    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 16))
    ref = dict(zip(("mu", "sigma"), feature_stats(real)))
    noise = rng.normal(size=(64, 16))
    close, far = noise, noise + 1.5  # paired rows: the same draws, one shifted away from the data
    assert paired_win_rate(close, far, ref, rounds=50) == 1.0
    assert paired_win_rate(far, close, ref, rounds=50) == 0.0
    assert paired_win_rate(close, close, ref, rounds=50) == 0.0  # a tie is no win
    slightly = noise + 0.02 * rng.normal(size=noise.shape)
    assert 0.0 < paired_win_rate(slightly, close, ref, rounds=200) < 1.0  # noise: no confident winner
    with pytest.raises(ValueError, match="one shape"):
        paired_win_rate(close, far[:10], ref)


def test_fid_of_resampled_rows_is_fid_few_of_those_rows():
    import numpy as np

    from cmpipe.metrics.fid import feature_stats, fid_few, fid_few_of_rows

    rng = np.random.default_rng(2)
    mu_ref, sigma_ref = feature_stats(rng.normal(size=(200, 12)))
    feats = rng.normal(loc=0.2, size=(10, 12))
    of_rows = fid_few_of_rows(feats, mu_ref, sigma_ref)
    for _ in range(3):
        rows = rng.integers(0, 10, 10)
        assert of_rows(rows) == pytest.approx(fid_few(feats[rows], mu_ref, sigma_ref), rel=1e-6)
    with pytest.raises(ValueError, match="a resample of 10 rows"):
        of_rows(np.arange(5))
    with pytest.raises(ValueError, match="NaN"):
        fid_few_of_rows(np.full((3, 12), np.nan), mu_ref, sigma_ref)
