"""Choosing the intermediate grid indices ts of multistep consistency sampling.

Song et al. 2023 pick the second index of 2-step sampling by a ternary search on FID, then,
for 3 steps, keep the first two and search the third the same way. `search_ts` does that (or an
exhaustive grid search) for any objective ts -> float, e.g. the FID of a held-out sample set;
each ts is evaluated once (memoised), and every evaluation is returned for the reports.

The greedy extension never revisits an earlier index, and the best 2-step index need not be
the best middle index of 3 steps. So for 3 or more steps the search then starts from the better
of the greedy ts and the ts the user gave (params), and makes one pass of coordinate descent:
each intermediate index in turn is searched between its neighbours with the others fixed. The
result is never worse on the objective than either starting point.

An FID of a few dozen samples is noisy: the search's best ts can beat the given ts on its own
samples and lose on the evaluated set. So a searched ts replaces the given one only when it
wins with confidence (`beats`): `search_ts_by_fid` asks that it have the lower FID in at
least `CONFIDENCE` of paired bootstrap resamples of the search's samples (the candidates share
their initial noises, so sample i of one ts pairs with sample i of the other).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

CONFIDENCE = 0.9  # fraction of paired bootstrap resamples a searched ts must win
BOOTSTRAP_ROUNDS = 200


def ternary_search(objective: Callable[[int], float], lo: int, hi: int) -> int:
    """The integer in [lo, hi] that minimises a unimodal objective (ties: the smaller)."""
    if lo > hi:
        raise ValueError(f"empty search interval [{lo}, {hi}]")
    while hi - lo > 2:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if objective(m1) <= objective(m2):
            hi = m2
        else:
            lo = m1
    return min(range(lo, hi + 1), key=lambda i: (objective(i), i))


def search_ts(objective: Callable[[list[int]], float], max_steps: int, num_scales: int,
              method: str = "ternary", start: dict[int, list[int]] | None = None,
              beats: Callable[[list[int], list[int]], bool] | None = None
              ) -> tuple[dict[int, list[int]], dict[str, float]]:
    """ts for 2..max_steps steps, each extending the previous one by its best last index, then
    (3 steps and more) refined by coordinate descent from the better of that and `start[steps]`.
    Last, the given `start[steps]` stays unless the search's ts `beats` it (by default: has the
    lower objective).

    Returns ({steps: ts}, {"0,11": value, ...}: every evaluated ts).
    """
    if method not in ("ternary", "grid"):
        raise ValueError(f"unknown ts search method {method!r}: use ternary or grid")
    if max_steps < 2 or max_steps > num_scales:
        raise ValueError(f"searching ts for {max_steps} steps needs 2 <= steps <= num_scales ({num_scales})")
    seen: dict[str, float] = {}

    def value(ts: list[int]) -> float:
        key = ",".join(map(str, ts))
        if key not in seen:
            seen[key] = float(objective(ts))
        return seen[key]

    def minimise(fn: Callable[[int], float], lo: int, hi: int) -> int:
        if method == "grid":
            return min(range(lo, hi + 1), key=lambda i: (fn(i), i))
        return ternary_search(fn, lo, hi)

    chosen, ts = {}, [0]
    for steps in range(2, max_steps + 1):
        lo, hi = ts[-1] + 1, num_scales - 1 - (max_steps - steps)  # leave room for later steps
        ts = [*ts, minimise(lambda i, prefix=tuple(ts): value([*prefix, i]), lo, hi)]
        chosen[steps] = ts
    for steps in range(3, max_steps + 1):
        best = chosen[steps]
        given = (start or {}).get(steps)
        if given is not None and len(given) == steps and value(list(given)) < value(best):
            best = list(given)
        for j in range(1, steps):  # one coordinate-descent pass over the intermediate indices
            lo, hi = best[j - 1] + 1, (best[j + 1] - 1 if j + 1 < steps else num_scales - 1)
            best = [*best[:j], minimise(lambda i, b=tuple(best): value([*b[:j], i, *b[j + 1:]]), lo, hi),
                    *best[j + 1:]]
        chosen[steps] = best
    for steps, given in (start or {}).items():
        if steps in chosen and len(given) == steps and chosen[steps] != list(given):
            value(list(given))  # the search may not have visited it; `beats` compares the samples of both
            better = beats(chosen[steps], list(given)) if beats else value(chosen[steps]) < value(list(given))
            if not better:
                chosen[steps] = list(given)
    return chosen, seen


def paired_win_rate(feats_a: np.ndarray, feats_b: np.ndarray, ref: dict, rounds: int = BOOTSTRAP_ROUNDS,
                    seed: int = 0) -> float:
    """Fraction of paired bootstrap resamples (the same rows of both) in which a has the lower FID
    (each resample's FID is `metrics.fid.fid_few`, by `fid_few_of_rows`)."""
    from cmpipe.metrics.fid import fid_few_of_rows

    if feats_a.shape != feats_b.shape:
        raise ValueError(f"paired features must have one shape, got {feats_a.shape} and {feats_b.shape}")
    fid_a, fid_b = (fid_few_of_rows(f, ref["mu"], ref["sigma"]) for f in (feats_a, feats_b))
    n = len(feats_a)

    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(rounds):
        rows = rng.integers(0, n, n)
        wins += fid_a(rows) < fid_b(rows)
    return wins / rounds


def search_ts_by_fid(f, sig, shape, max_steps: int, count: int, seed: int, batch_size: int, device,
                     ref: dict, method: str = "ternary", inception=None, start: dict | None = None,
                     labels=None, dist=None, parts_dir=None) -> tuple[dict[int, list[int]], dict[str, float], dict]:
    """`search_ts` on the FID of `count` samples drawn with `seed` against reference statistics.
    A searched ts replaces `start[steps]` only if it wins `CONFIDENCE` of the paired bootstrap
    resamples; the third value returned holds those win rates per step count.

    Every candidate uses the same initial noises (common random numbers), so the FIDs differ by
    the ts and not by the draw; keep `seed` apart from the evaluated sets' seed (held out).
    `labels` gives a conditional model its classes (`sampling.sets.class_labels`). Under torchrun
    (`dist`) every rank samples its batches (passed through beside `parts_dir`, see
    `sampling.sets.generate`), rank 0 scores them and shares the FID, so all ranks follow the
    same search.
    """
    import logging

    from cmpipe.distributed.ddp import SINGLE, broadcast_object
    from cmpipe.metrics import fid as evaluation
    from cmpipe.sampling.sets import cm_sampler, generate

    log = logging.getLogger(__name__)
    dist = dist or SINGLE
    model = None
    if dist.is_main:
        model = inception if inception is not None else evaluation.build_inception(device)

    features: dict[str, np.ndarray] = {}

    def fid_of(ts: list[int]) -> float:
        images, _ = generate(cm_sampler(f, sig, ts, seed, shape, labels), count, batch_size, shape, seed, device,
                             f"ts {ts}", dist=dist, parts_dir=parts_dir)
        value = None
        if dist.is_main:
            feats = evaluation.inception_features(images, model=model, progress=False, desc=f"ts {ts}")
            features[",".join(map(str, ts))] = feats
            value = evaluation.fid_few(feats, ref["mu"], ref["sigma"])
            log.info("ts %s: FID %.2f (%d samples)", ts, value, count)
        return broadcast_object(dist, value)

    def beats(searched: list[int], given: list[int]) -> bool:
        rate = None
        if dist.is_main:
            a, b = (features[",".join(map(str, t))] for t in (searched, given))
            rate = paired_win_rate(a, b, ref, seed=seed)
            log.info("ts %s beats the given %s in %.0f%% of %d paired resamples (needs %.0f%%)",
                     searched, given, 100 * rate, BOOTSTRAP_ROUNDS, 100 * CONFIDENCE)
            win_rates[len(given)] = {"searched": searched, "given": given, "win_rate": rate}
        return broadcast_object(dist, rate) >= CONFIDENCE

    win_rates: dict[int, dict] = {}
    chosen, seen = search_ts(fid_of, max_steps, sig.num_scales, method, start, beats)
    return chosen, seen, win_rates
