"""Verdicts from summary rows (SPEC §4): each registered test reads its rows with its own rule
(``SanityTest.verdict``) at the scopes it names, and its controls' expected verdicts become checks."""
from __future__ import annotations

from typing import Any, Mapping

import pyarrow as pa

from saliency.sanity import get_test, sanity_tests
from saliency.sanity.rules import VerdictRules

VERDICT_SCHEMA = pa.schema([
    ("model", pa.string()), ("method", pa.string()), ("test", pa.string()), ("scope", pa.string()),
    ("state", pa.string()), ("state_index", pa.int32()), ("metric", pa.string()), ("n", pa.int64()),
    ("n_seeds", pa.int64()), ("mean", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("chance_mean", pa.float64()), ("retest_mean", pa.float64()), ("gap_mean", pa.float64()),
    ("retention_mean", pa.float64()), ("retention_ci_low", pa.float64()), ("retention_ci_high", pa.float64()),
    ("verdict", pa.string()), ("reason", pa.string()),
    ("verdict_at_low", pa.string()), ("verdict_at_high", pa.string()), ("threshold_sensitive", pa.bool_()),
])

def verdicts(summary: pa.Table, rules: VerdictRules = VerdictRules(),
             options: Mapping[str, Any] | None = None) -> pa.Table:
    """pass | fail | inconclusive | uninformative per method and test (SPEC §4), at the scopes each
    registered test names (``SanityTest.scope``, given the test's ``options``: test id → its options,
    defaults where missing), by each test's own rule (``SanityTest.verdict``).

    Class sensitivity: one verdict per other class and metric. MPRT: scope "head" (the state where the
    classifier head is randomised) and "cascade" (the mean R over states), per metric, read by the CI of
    the retention R at ``rules.retention`` and at it ∓ ``rules.retention_spread`` (a verdict that
    changes there is ``threshold_sensitive``). eMPRT (scope "full") by the CI of its entropy rise, and
    uninformative where MPRT is uninformative at that state on every metric.
    """
    options = dict(options or {})
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
        scope = test.scope(r["state"], r["state_index"], n_states.get((r["model"], r["test"]), 0),
                           test.state_options(options))
        if scope is None:
            continue
        verdict = test.verdict(r, rules, gaps.get((r["model"], r["method"], test.source, r["state_index"]), []))
        for name in VERDICT_SCHEMA.names:
            if name in r:
                columns[name].append(r[name])
        columns["scope"].append(scope)
        columns["verdict"].append(verdict.verdict)
        columns["reason"].append(verdict.reason)
        columns["verdict_at_low"].append(verdict.at_low)
        columns["verdict_at_high"].append(verdict.at_high)
        columns["threshold_sensitive"].append(verdict.at_low != verdict.verdict or verdict.at_high != verdict.verdict)
    return pa.table(columns, schema=VERDICT_SCHEMA)


def control_expectations() -> list[tuple[str, str, str | None, str]]:
    """What the controls must show on a trained model (SPEC §4), as the registered tests declare it
    (``SanityTest.controls``): (test, control method, scope or None = every scope, expected verdict)."""
    return [(test.id, method, scope, expected) for test in sanity_tests() for method, scope, expected in test.controls]


def control_methods() -> list[str]:
    """The control methods some registered test has an expectation for, in declaration order."""
    return list(dict.fromkeys(method for _, method, _, _ in control_expectations()))


def control_checks(verdict_table: pa.Table) -> list[dict]:
    """Each control verdict against what its test expects: rows of control, test, scope, metric,
    expected, verdict, ok."""
    expected_by = {}
    for test, method, scope, expected in control_expectations():
        expected_by.setdefault((test, method), []).append((scope, expected))
    checks = []
    for r in verdict_table.to_pylist():
        for scope, expected in expected_by.get((r["test"], r["method"]), []):
            if scope is not None and r["scope"] != scope:
                continue
            checks.append({"control": r["method"], "test": r["test"], "scope": r["scope"], "metric": r["metric"],
                           "expected": expected, "verdict": r["verdict"], "ok": r["verdict"] == expected})
    return checks
