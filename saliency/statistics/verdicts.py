"""Verdicts from summary rows (SPEC §4): the retention rule with its threshold sensitivity, eMPRT's
entropy rule, and the controls' expected verdicts as checks."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import pyarrow as pa

from saliency.sanity import get_test

VERDICTS = ("pass", "fail", "inconclusive", "uninformative")

VERDICT_SCHEMA = pa.schema([
    ("model", pa.string()), ("method", pa.string()), ("test", pa.string()), ("scope", pa.string()),
    ("state", pa.string()), ("state_index", pa.int32()), ("metric", pa.string()), ("n", pa.int64()),
    ("n_seeds", pa.int64()), ("mean", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("chance_mean", pa.float64()), ("retest_mean", pa.float64()), ("gap_mean", pa.float64()),
    ("retention_mean", pa.float64()), ("retention_ci_low", pa.float64()), ("retention_ci_high", pa.float64()),
    ("verdict", pa.string()), ("reason", pa.string()),
    ("verdict_at_low", pa.string()), ("verdict_at_high", pa.string()), ("threshold_sensitive", pa.bool_()),
])

@dataclass(frozen=True)
class VerdictRules:
    """The thresholds of SPEC §4, recorded with the results.

    retention: fail when CI_low(R) > it, pass when CI_high(R) < it. min_gap: a method whose mean
    r − c is below it is uninformative (the metric cannot tell its maps from another image's).
    entropy_rise: eMPRT passes when the CI of the entropy rise is above it, fails when at or below.
    alpha: family-wise level of the Holm-corrected paired comparisons.
    retention_spread: the 0.5 has no source in the literature, so every retention verdict is also read
    at retention ± this (0.4 and 0.6 by default); one that changes there is threshold-sensitive.
    """

    retention: float = 0.5
    min_gap: float = 0.2
    entropy_rise: float = 0.0
    alpha: float = 0.05
    retention_spread: float = 0.1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _retention_verdict(row: dict, rules: VerdictRules) -> tuple[str, str]:
    gap, low, high = row["gap_mean"], row["retention_ci_low"], row["retention_ci_high"]
    if gap is None or not math.isfinite(gap):
        return "uninformative", "no finite retest − chance (constant maps, or one image per batch)"
    if gap < rules.min_gap:
        return "uninformative", f"mean(r − c) = {gap:.3f} < {rules.min_gap}"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive", "no finite retention"
    if low > rules.retention:
        return "fail", f"CI_low(R) = {low:.3f} > {rules.retention}"
    if high < rules.retention:
        return "pass", f"CI_high(R) = {high:.3f} < {rules.retention}"
    return "inconclusive", f"CI(R) = [{low:.3f}, {high:.3f}] contains {rules.retention}"


def _entropy_verdict(row: dict, mprt_gaps: list[float], rules: VerdictRules) -> tuple[str, str]:
    if mprt_gaps and all(g is not None and math.isfinite(g) and g < rules.min_gap for g in mprt_gaps):
        return "uninformative", f"MPRT mean(r − c) < {rules.min_gap} on every metric at this state"
    low, high = row["ci_low"], row["ci_high"]
    if low is None or not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive", "no finite entropy rise"
    if low > rules.entropy_rise:
        return "pass", f"CI_low(entropy rise) = {low:.3f} > {rules.entropy_rise}"
    if high <= rules.entropy_rise:
        return "fail", f"CI_high(entropy rise) = {high:.3f} ≤ {rules.entropy_rise}"
    return "inconclusive", f"CI(entropy rise) = [{low:.3f}, {high:.3f}] contains {rules.entropy_rise}"


def verdicts(summary: pa.Table, rules: VerdictRules = VerdictRules(), order: str = "cascade_top_down") -> pa.Table:
    """pass | fail | inconclusive | uninformative per method and test (SPEC §4), at the scopes each
    registered test names (``SanityTest.scope``).

    Class sensitivity: one verdict per other class and metric. MPRT: scope "head" (the state where the
    classifier head is randomised) and "cascade" (the mean R over states), per metric. A test whose low
    score passes is read by the CI of its retention R; one whose high score passes (eMPRT, scope "full":
    the fully randomised model) by the CI of its value, and is uninformative when the test whose maps it
    scores is uninformative at that state on every metric. Each retention verdict is also read at
    ``rules.retention`` ∓ ``rules.retention_spread`` (``verdict_at_low``/``_high``): one that changes
    there is ``threshold_sensitive``.
    """
    rows = summary.to_pylist()
    n_states: dict[tuple[str, str], int] = {}
    for r in rows:
        if get_test(r["test"]).curve and r["state_index"] >= 0:
            key = (r["model"], r["test"])
            n_states[key] = max(n_states.get(key, 0), r["state_index"] + 1)
    gaps: dict[tuple, list[float]] = {}
    for r in rows:
        if get_test(r["test"]).normalised:
            gaps.setdefault((r["model"], r["method"], r["test"], r["state_index"]), []).append(r["gap_mean"])
    columns: dict[str, list] = {name: [] for name in VERDICT_SCHEMA.names}
    for r in rows:
        test = get_test(r["test"])
        scope = test.scope(r["state"], r["state_index"], n_states.get((r["model"], r["test"]), 0), order)
        if scope is None:
            continue
        if test.direction == "lower":
            verdict, reason = _retention_verdict(r, rules)
            at_low = _retention_verdict(r, replace(rules, retention=rules.retention - rules.retention_spread))[0]
            at_high = _retention_verdict(r, replace(rules, retention=rules.retention + rules.retention_spread))[0]
        else:
            source_gaps = gaps.get((r["model"], r["method"], test.source, r["state_index"]), [])
            verdict, reason = _entropy_verdict(r, source_gaps, rules)
            at_low = at_high = verdict  # its threshold (no rise) is not a free choice
        for name in VERDICT_SCHEMA.names:
            if name in r:
                columns[name].append(r[name])
        columns["scope"].append(scope)
        columns["verdict"].append(verdict)
        columns["reason"].append(reason)
        columns["verdict_at_low"].append(at_low)
        columns["verdict_at_high"].append(at_high)
        columns["threshold_sensitive"].append(at_low != verdict or at_high != verdict)
    return pa.table(columns, schema=VERDICT_SCHEMA)


#: What the controls must show on a trained model (SPEC §4): (method, test or None = every test, verdict).
CONTROL_EXPECTATIONS = (("edge_sobel", None, "fail"), ("random", None, "uninformative"),
                        ("gradient", "class_sensitivity", "pass"), ("gradient", "mprt", "pass"))


def control_checks(verdict_table: pa.Table) -> list[dict]:
    """Each control verdict against what it must be: rows of control, test, scope, metric, expected,
    verdict, ok. For ``gradient`` the MPRT check is the head-randomised state."""
    checks = []
    for r in verdict_table.to_pylist():
        for method, test, expected in CONTROL_EXPECTATIONS:
            if r["method"] != method or (test is not None and r["test"] != test):
                continue
            if method == "gradient" and r["test"] == "mprt" and r["scope"] != "head":
                continue
            checks.append({"control": method, "test": r["test"], "scope": r["scope"], "metric": r["metric"],
                           "expected": expected, "verdict": r["verdict"], "ok": r["verdict"] == expected})
    return checks
