"""contract.stats against scipy's implementations (a dev dependency only: serving does not need scipy)."""

from __future__ import annotations

import random

import pytest
import scipy.stats as scipy_stats  # the dev extra has it: a missing scipy fails here, never skips

from contract.stats import mann_whitney_greater


@pytest.mark.parametrize("seed", range(6))
def test_mann_whitney_matches_scipy_on_overlapping_samples_with_ties(seed: int) -> None:
    rng = random.Random(seed)
    # Rounded latencies: overlapping distributions, many ties, unequal sizes.
    baseline = [round(rng.lognormvariate(0.0, 0.4), 1) for _ in range(rng.randint(15, 80))]
    candidate = [round(rng.lognormvariate(0.1 * (seed % 3), 0.4), 1) for _ in range(rng.randint(15, 80))]
    ours = mann_whitney_greater(baseline, candidate)
    theirs = scipy_stats.mannwhitneyu(
        candidate, baseline, alternative="greater", method="asymptotic", use_continuity=True
    )
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9, abs=1e-12)
