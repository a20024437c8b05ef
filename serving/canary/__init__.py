"""Canary rollouts: a candidate version takes a growing share of an alias's traffic until the numbers decide.

    start ──► step 1 (5%) ──► step 2 (25%) ──► ... ──► promoted (100%: the stable pointer moves)
                   │ regression at any analysis
                   ▼
              rolled back (the candidate is retired; stable kept serving throughout)

Assignment is sticky and deterministic: a user (the request's ``user`` field,
else the ``X-Lorafleet-User`` header, else the API key) hashes to a point in
[0, 1); the candidate serves users below the current weight. The point does
not depend on the step, so a user who saw the candidate keeps seeing it as the
weight grows.

Every ``interval_s`` the gateway compares what each variant served in the
step's window (``analyze``): JSON validity and error rate with one-sided
two-proportion tests (a drop beyond the tolerated margin), end-to-end latency
and time to first token with one-sided Mann-Whitney U tests (a regression is
a p95 above ``max_latency_ratio`` × stable's that the test finds
significant), each at ``confidence``. Too few samples: wait
(and say so), never promote. A significant regression: roll back at once.
Otherwise: next step, and after the last one, promote.

Canaries and their audit events live in the state database, so a canary
survives a gateway restart; on SQLite the samples of the step under way do
not (the window starts again, which is recorded). With several gateways on
PostgreSQL, each shares its samples of the window and follows the canaries'
state in the database, and one (``serving.state.leadership``, an advisory lock)
analyses the merged samples and decides.

The package, one concept a module (nothing is imported here: ``analysis``
and ``state`` are plain values that ``serving.state`` builds on):

- ``analysis``: the pure part: a canary's config, what a variant served in a
  window, the statistical comparison, and sticky user assignment;
- ``state``: a canary's record (kept by ``serving.state.canaries``);
- ``manager``: the decision loop and the manual operations the admin API calls.
"""
