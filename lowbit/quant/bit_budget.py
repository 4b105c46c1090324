"""Pick one measured option per linear: the least total error within a bit budget.

A multiple-choice knapsack: minimise sum_i w_i * err_i(o_i) subject to
sum_i total_bits_i(o_i) <= bpw * sum_i numel_i, where w_i is the linear's measured sensitivity (the
KL a unit of its output error costs: quant/sensitivity.py), so the sum is the predicted KL.
Solved by dynamic programming over the budget left above the cheapest choice of every linear, in at
most MAX_CELLS steps: with fewer bits to spend than that the DP is exact; otherwise each option's
extra cost is rounded *up* to whole steps (so the answer always fits) and a greedy pass then spends
what the rounding left, upgrading wherever one more option fits and lowers the error most. Without
weights errors are weighted by numel (what the first optimizer did: it gave layer 0's q and o
projections 2 bits, and lost to uniform 4-bit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

MAX_CELLS = 100_000  # DP budget steps: 210 linears x 18 options x 1e5 cells is well under a second


@dataclass
class Choice:
    picks: list[int]  # option index per linear, in the measurement's order
    total_bits: int
    numel: int
    weighted_err: float  # sum of weight * err over the chosen options (with sensitivities: the predicted KL)

    @property
    def bpw(self) -> float:
        return self.total_bits / self.numel


def feasible_bpw(entries: list[dict]) -> tuple[float, float]:
    """(least, most) bits per weight this measurement can spend: cheapest and dearest option everywhere."""
    numel = sum(e["numel"] for e in entries)
    lo = sum(min(o["total_bits"] for o in e["options"]) for e in entries)
    hi = sum(max(o["total_bits"] for o in e["options"]) for e in entries)
    return lo / numel, hi / numel


MAX_BPW = 8.0  # the ceiling: above 8 bits per weight mixed precision has nothing left to choose


def check_budget(bpw: float, entries: list[dict], where: str = "--bpw") -> None:
    lo, hi = feasible_bpw(entries)
    top = min(hi, MAX_BPW)
    if not (lo <= bpw <= top):
        raise LowbitError(f"{where} {bpw:g}: outside the feasible range {math.ceil(lo * 1000) / 1000:.3f} to "
                          f"{math.floor(top * 1000) / 1000:.3f} bits per weight (the cheapest option of every linear, "
                          f"scales and zeros counted, up to {'8 bits' if top == MAX_BPW else 'the dearest options'})")


def optimize(entries: list[dict], bpw: float, weights: list[float] | None = None) -> Choice:
    """`weights`: per entry, what a unit of its err costs (default: its numel)."""
    check_budget(bpw, entries)
    numel = sum(e["numel"] for e in entries)
    weights = weights if weights is not None else [e["numel"] for e in entries]
    costs = [np.array([o["total_bits"] for o in e["options"]], dtype=np.int64) for e in entries]
    values = [np.array([w * o["err"] for o in e["options"]], dtype=np.float64) for e, w in zip(entries, weights)]
    budget = int(math.floor(bpw * numel))
    base = sum(int(c.min()) for c in costs)
    slack = budget - base  # >= 0 by check_budget
    cells = min(slack, MAX_CELLS)
    step = slack / cells if cells else 1.0

    def steps(c: np.ndarray) -> np.ndarray:
        """Each option's cost above the linear's cheapest, in whole DP steps, rounded up so a pick that
        fits in steps fits in bits; without slack only the cheapest options fit."""
        if not cells:
            return np.where(c == c.min(), 0, 1)
        return c - c.min() if step == 1.0 else np.ceil((c - c.min()) / step).astype(np.int64)

    dp = np.zeros(cells + 1)  # dp[b]: least error of the linears so far using at most b steps of extra cost
    back = np.zeros((len(entries), cells + 1), dtype=np.int16)
    for i, (c, v) in enumerate(zip(costs, values)):
        extra = steps(c)
        best = np.full(cells + 1, np.inf)
        arg = np.zeros(cells + 1, dtype=np.int16)
        for o, (w, val) in enumerate(zip(extra, v)):
            if w > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[w:] = dp[:cells + 1 - w] + val
            better = cand < best
            best[better], arg[better] = cand[better], o
        dp, back[i] = best, arg
    picks, b = [0] * len(entries), cells
    for i in range(len(entries) - 1, -1, -1):
        picks[i] = int(back[i, b])
        b -= int(steps(costs[i])[picks[i]])
    picks = _spend_rest(picks, costs, values, budget)
    total = sum(int(c[p]) for c, p in zip(costs, picks))
    return Choice(picks, total, numel, float(sum(v[p] for v, p in zip(values, picks))))


def _spend_rest(picks: list[int], costs, values, budget: int) -> list[int]:
    """Greedy: while some single change lowers the error and still fits, take the one that lowers it most."""
    used = sum(int(c[p]) for c, p in zip(costs, picks))
    while True:
        best = None
        for i, (c, v) in enumerate(zip(costs, values)):
            fits = used - c[picks[i]] + c <= budget
            gain = np.where(fits, v[picks[i]] - v, 0.0)
            o = int(np.argmax(gain))
            if gain[o] > 0 and (best is None or gain[o] > best[0]):
                best = (gain[o], i, o)
        if best is None:
            return picks
        _, i, o = best
        used += int(costs[i][o] - costs[i][picks[i]])
        picks[i] = o
