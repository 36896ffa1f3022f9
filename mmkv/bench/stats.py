"""Confidence intervals for benchmark accuracies: paired bootstrap over videos.

The questions of one video are not independent (three questions about the same video share its
difficulty), so the resampling unit is the video: each bootstrap replicate draws videos with
replacement and takes every question of each drawn video. A recipe's difference from the
uncompressed model is computed on the SAME replicate (paired), which is far tighter than two
independent intervals when both mostly agree.

    lo, hi = paired_interval(correct_by_video, baseline_by_video)   # points, e.g. (-1.3, 0.4)
"""
from __future__ import annotations

import numpy as np

REPLICATES = 10_000


def paired_interval(recipe: dict[str, list[int]], base: dict[str, list[int]], level: float = 0.95,
                    replicates: int = REPLICATES, seed: int = 0) -> tuple[float, float, float]:
    """(delta, low, high) in accuracy points (100 x fraction) of `recipe` minus `base`, over the
    videos both have: `recipe[v]` and `base[v]` are the 0/1 outcomes of video v's questions (the
    same questions in the same order). The interval is the percentile bootstrap over videos."""
    vids = sorted(set(recipe) & set(base))
    if not vids:
        return float("nan"), float("nan"), float("nan")
    diff = np.array([sum(recipe[v]) - sum(base[v]) for v in vids], dtype=np.float64)   # per video
    count = np.array([len(base[v]) for v in vids], dtype=np.float64)
    if any(len(recipe[v]) != len(base[v]) for v in vids):
        raise ValueError("paired outcomes need the same questions per video")
    delta = 100 * diff.sum() / count.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(vids), (replicates, len(vids)))
    boot = 100 * diff[idx].sum(1) / count[idx].sum(1)
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return float(delta), float(lo), float(hi)


def interval(outcomes: dict[str, list[int]], level: float = 0.95, replicates: int = REPLICATES,
             seed: int = 0) -> tuple[float, float, float]:
    """(accuracy, low, high) in points, bootstrap over videos."""
    zero = {v: [0] * len(o) for v, o in outcomes.items()}
    return paired_interval(outcomes, zero, level, replicates, seed)
