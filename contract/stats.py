"""The statistics behind every "is it better?" decision: evaluation gates and canaries.

Small samples are the rule (a held-out set of a few hundred examples, a canary
step of a few hundred requests), so every rate carries a Wilson interval and
every comparison is a test with a stated confidence:

- ``wilson``: the 95% interval of a rate; behaves near 0 and 1, where good adapters live.
- ``paired_drop``: did the candidate get *worse* than the stable version on the
  same examples? An exact one-sided McNemar test on the discordant pairs (the
  evaluation runs both on identical prompts, so pairs are the honest unit).
- ``two_proportion_drop``: the same question for two independent samples
  (a canary's candidate and stable traffic), with a tolerated margin.
- ``mann_whitney_greater``: is the candidate's latency higher than a tolerated
  ratio of the stable version's? A rank test, as Kayenta judges canaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    successes: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.successes / self.n if self.n else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "successes": self.successes, "n": self.n}


def wilson(successes: int, n: int, z: float = Z95) -> Rate:
    """The Wilson score interval for ``successes`` out of ``n``."""
    if n == 0:
        return Rate(0, 0, 0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Rate(successes, n, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Drop:
    """A one-sided test of "the candidate is worse than the baseline"."""

    baseline: float  # the baseline's rate
    candidate: float  # the candidate's rate
    p_value: float  # of observing this drop (or more) if the candidate were no worse
    test: str

    @property
    def drop(self) -> float:
        return self.baseline - self.candidate

    def significant(self, alpha: float) -> bool:
        return self.p_value < alpha


def paired_drop(baseline: list[bool], candidate: list[bool]) -> Drop:
    """Exact one-sided McNemar test on paired outcomes (same examples, two models).

    Only discordant pairs carry information: ``b`` examples the baseline got
    right and the candidate wrong, ``c`` the other way round. Under "no worse",
    ``b`` is at most Binomial(b + c, 1/2); the p-value is its upper tail.
    """
    if len(baseline) != len(candidate):
        raise ValueError(f"paired samples differ in length: {len(baseline)} vs {len(candidate)}")
    n = len(baseline)
    b = sum(1 for x, y in zip(baseline, candidate, strict=True) if x and not y)
    c = sum(1 for x, y in zip(baseline, candidate, strict=True) if y and not x)
    m = b + c
    p = 1.0 if m == 0 else sum(math.comb(m, k) for k in range(b, m + 1)) / 2**m
    return Drop(sum(baseline) / n if n else 0.0, sum(candidate) / n if n else 0.0, min(1.0, p), "mcnemar-exact")


def two_proportion_drop(
    baseline_successes: int, baseline_n: int, candidate_successes: int, candidate_n: int, margin: float = 0.0
) -> Drop:
    """One-sided z-test of H0: ``baseline - candidate <= margin`` for two independent samples.

    A drop inside ``margin`` is tolerated; the p-value says how surprising the
    observed drop would be if the true drop were exactly ``margin``.
    """
    if baseline_n == 0 or candidate_n == 0:
        return Drop(0.0, 0.0, 1.0, "two-proportion-z")
    p1, p2 = baseline_successes / baseline_n, candidate_successes / candidate_n
    se = math.sqrt(p1 * (1 - p1) / baseline_n + p2 * (1 - p2) / candidate_n)
    excess = (p1 - p2) - margin
    # With no spread (both rates 0 or 1) the drop is certain: significant iff beyond the margin.
    p = (0.0 if excess > 0 else 1.0) if se == 0.0 else 0.5 * math.erfc(excess / se / math.sqrt(2))
    return Drop(p1, p2, p, "two-proportion-z")


def mann_whitney_greater(baseline: list[float], candidate: list[float], ratio: float = 1.0) -> Drop:
    """One-sided Mann-Whitney U test of H1: ``candidate`` values tend to exceed ``ratio`` × ``baseline`` values.

    Kayenta's choice for latency: no normality assumed, robust to the long
    tails latencies have. Normal approximation with tie and continuity
    corrections (the samples of a canary step are tens to thousands).
    ``baseline``/``candidate`` in the result are the medians.
    """
    scaled = [ratio * x for x in baseline]
    n1, n2 = len(candidate), len(scaled)
    if n1 == 0 or n2 == 0:
        return Drop(0.0, 0.0, 1.0, "mann-whitney-u")
    pooled = sorted([(v, 1) for v in candidate] + [(v, 0) for v in scaled])
    rank_sum, ties, i = 0.0, 0.0, 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        average_rank = (i + j) / 2 + 1
        rank_sum += average_rank * sum(1 for k in range(i, j + 1) if pooled[k][1])
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    u = rank_sum - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        p = 1.0  # every value equal: no evidence of a shift
    else:
        z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
        p = 0.5 * math.erfc(z / math.sqrt(2))
    return Drop(_median(baseline), _median(candidate), min(1.0, p), "mann-whitney-u")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
