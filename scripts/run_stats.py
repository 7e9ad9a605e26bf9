#!/usr/bin/env python3
"""Statistics over seeds for plot_runs.py: the mean and standard deviation of a metric, and the
paired difference of two runs (seed s of one against seed s of the other) with its 95%
t-interval. Standard library and numpy only (scipy is not in the project's venv).

Example:
    s = summary([4.77, 4.76, 4.78])            # {"n": 3, "mean": 4.77, "sd": 0.01}
    d = paired({1: 4.76, 2: 4.75}, {1: 4.77, 2: 4.77})
    d["lo"], d["hi"], d["distinguishable"]     # the interval of b - a; True when it excludes 0
"""
import math

import numpy as np

# Two-sided 95% quantiles t_{0.975, df} of Student's t distribution.
T_975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836,
         6: 2.446911851, 7: 2.364624252, 8: 2.306004135, 9: 2.262157163, 10: 2.228138852,
         11: 2.200985160, 12: 2.178812830, 13: 2.160368656, 14: 2.144786688, 15: 2.131449546,
         16: 2.119905299, 17: 2.109815578, 18: 2.100922040, 19: 2.093024054, 20: 2.085963447,
         21: 2.079613845, 22: 2.073873068, 23: 2.068657610, 24: 2.063898562, 25: 2.059538553,
         26: 2.055529439, 27: 2.051830516, 28: 2.048407142, 29: 2.045229642, 30: 2.042272456}
Z_975 = 1.959963984540054


def t_quantile_975(df):
    """t_{0.975, df}: the table up to 30 degrees of freedom, beyond it the Cornish-Fisher
    expansion around the normal quantile (error below 1e-5 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom ({df}) must be >= 1")
    if df in T_975:
        return T_975[df]
    z = Z_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def summary(values):
    """n, mean and sample standard deviation (None below 2 values) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"n": 0, "mean": None, "sd": None}
    return {"n": len(v), "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if len(v) >= 2 else None}


def paired(reference, other):
    """other - reference over the seeds both have ({seed: value} each): the mean difference, its
    standard deviation and the 95% t-interval of the mean (lo, hi; None below 2 seeds), and
    whether that interval excludes 0."""
    seeds = sorted(s for s in reference if s in other
                   and math.isfinite(reference[s]) and math.isfinite(other[s]))
    d = np.asarray([other[s] - reference[s] for s in seeds], dtype=float)
    out = {"n": len(d), "seeds": seeds, "mean": float(d.mean()) if len(d) else None,
           "sd": None, "lo": None, "hi": None, "distinguishable": None}
    if len(d) >= 2:
        sd = float(d.std(ddof=1))
        half = t_quantile_975(len(d) - 1) * sd / math.sqrt(len(d))
        out.update(sd=sd, lo=out["mean"] - half, hi=out["mean"] + half,
                   distinguishable=bool(out["mean"] - half > 0 or out["mean"] + half < 0))
    return out
