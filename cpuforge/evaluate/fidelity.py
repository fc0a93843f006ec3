"""How a quant's answers differ from the fine-tune's, with the confidence the held-out rows allow.

The reference is the f16 GGUF's own greedy answer on each held-out row. Per row a quant's answer equals
it or not (agreement), and against the task's gold answer a row flips right -> wrong (`worse`) or
wrong -> right (`better`). Two bounds, each one-sided at a stated confidence:

- the disagreement rate: Clopper-Pearson's exact upper bound on k disagreements in n rows. With none, it is
  1 - (1 - confidence) ** (1 / n): 40 rows bound it no tighter than 7.2 % at 95 %, whatever the quant;
- the paired accuracy drop against f16: exact McNemar on the flips, inverted. Given m = worse + better
  discordant rows, `worse` is binomial in m with p = 1/2 when the two are as accurate; the lower bound theta
  on that p gives the drop the rows show at least, (m / n) * (2 theta - 1). Above 0 exactly where the
  one-sided McNemar test says the quant is less accurate. It falls as right -> wrong flips are offset by
  wrong -> right ones, where an upper bound would widen with every flip either way.
"""

from __future__ import annotations

import math

BISECTIONS = 60  # halvings of [0, 1]: far past a float's resolution of a probability


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X binomial in n trials of probability p."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def upper_bound(k: int, n: int, confidence: float) -> float:
    """Clopper-Pearson's one-sided upper bound on a rate seen k times in n: the p at which seeing k or fewer
    has probability 1 - confidence."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"upper_bound: {k} of {n}")
    if k == n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(k, n, mid) > 1 - confidence else (lo, mid)
    return hi


def lower_bound(k: int, n: int, confidence: float) -> float:
    """Clopper-Pearson's one-sided lower bound on a rate seen k times in n."""
    return 1 - upper_bound(n - k, n, confidence)


def mcnemar_p(worse: int, better: int) -> float:
    """Exact one-sided McNemar: the probability of at least `worse` right -> wrong flips among the
    worse + better discordant rows when either way is as likely (1 when there are none)."""
    m = worse + better
    return 1.0 if m == 0 else 1 - binomial_cdf(worse - 1, m, 0.5)


def shown_drop(worse: int, better: int, n: int, confidence: float) -> float:
    """The paired accuracy drop against the reference that the rows show at `confidence` (a lower bound, from
    exact McNemar inverted; 0 where they show none)."""
    m = worse + better
    return 0.0 if m == 0 else max(0.0, m / n * (2 * lower_bound(worse, m, confidence) - 1))


def rows_needed(bound: float, confidence: float) -> int:
    """The held-out rows that bound the disagreement rate within `bound` when no row disagrees."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - bound))


def compare(reference_right: list[bool], right: list[bool], agree: list[bool], confidence: float) -> dict:
    """A quant's answers beside the reference's, row by row: agreement, flips and their bounds."""
    if not len(reference_right) == len(right) == len(agree) > 0:
        raise ValueError("compare: per-row vectors of unequal or zero length")
    n = len(agree)
    worse = sum(r and not q for r, q in zip(reference_right, right, strict=True))
    better = sum(q and not r for r, q in zip(reference_right, right, strict=True))
    disagree = n - sum(agree)
    return {
        "rows": n,
        "agree": n - disagree,
        "agreement": (n - disagree) / n,
        "worse": worse,
        "better": better,
        "disagreement_bound": upper_bound(disagree, n, confidence),
        "shown_accuracy_drop": shown_drop(worse, better, n, confidence),
        "mcnemar_p": mcnemar_p(worse, better),
        "confidence": confidence,
    }


def certifies(n: int, confidence: float, limit: float) -> str:
    """What `n` held-out rows can certify, in one sentence."""
    best = upper_bound(0, n, confidence)
    sentence = (f"{n} held-out rows bound a quant's disagreement with the f16 answers no tighter than "
                f"{best * 100:.1f} % at {confidence * 100:g} % confidence")  # fmt: skip
    if best > limit:
        return f"{sentence}, above eval.gate.max_disagreement ({limit:g}): no quant can pass; give at least " \
               f"{rows_needed(limit, confidence)} rows."
    return f"{sentence}; a bound of 5 % needs {rows_needed(0.05, confidence)} rows, 1 % {rows_needed(0.01, confidence)}."
