"""The run's answer for the terminal: which methods fail, per test and scope, and whether the controls
hold; as a few lines for people or as one JSON object for scripts (``saliency-sanity run --json``).

Read off verdicts.parquet at each test's headline metric, as the report's first screen is."""
from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from saliency.sanity import get_test
from saliency.statistics import VERDICTS, control_checks
from tasks.report_content import headline_metrics, matrix_columns


def verdict_summary(verdicts: pa.Table) -> dict[str, Any]:
    """Per (test, scope) column at its headline metric: the methods of each verdict, and each method's
    verdict with R [95% CI] (a test whose quantity is not a retention, eMPRT, gives its value); the
    control checks with those that do not hold."""
    headline = headline_metrics(verdicts) if verdicts.num_rows else {}
    rows = [r for r in verdicts.to_pylist() if r["metric"] == headline[r["test"]]]
    several = len({r["model"] for r in rows}) > 1
    columns = []
    for test, scope in matrix_columns(rows):
        cells = [r for r in rows if (r["test"], r["scope"]) == (test, scope)]
        columns.append({
            "test": test, "scope": scope, "metric": headline[test],
            **{verdict: sorted(_name(r, several) for r in cells if r["verdict"] == verdict) for verdict in VERDICTS},
            "methods": {_name(r, several): _judged(r) for r in cells}})
    checks = control_checks(verdicts)
    wrong = [{key: c[key] for key in ("control", "test", "scope", "metric", "expected", "verdict")}
             for c in checks if not c["ok"]]
    return {"columns": columns, "controls": {"checks": len(checks), "hold": len(checks) - len(wrong), "wrong": wrong}}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """'fail   mprt head (ssim): gradcam/pos, guided_backprop  · 3 pass, 1 inconclusive', one line per
    column, then the controls line."""
    lines = []
    for c in summary["columns"]:
        others = ", ".join(f"{len(c[v])} {v}" for v in VERDICTS if v != "fail" and c[v])
        failing = ", ".join(c["fail"]) if c["fail"] else "none"
        lines.append(f"fail  {c['test']} {c['scope']} ({c['metric']}): {failing}" + (f"  · {others}" if others else ""))
    controls = summary["controls"]
    if not controls["checks"]:
        lines.append("controls: none in this run (edge_sobel, random, gradient)")
    elif not controls["wrong"]:
        lines.append(f"controls: all {controls['checks']} checks hold")
    else:
        lines.append(f"controls: {len(controls['wrong'])} of {controls['checks']} checks do not hold, the verdicts are "
                     "suspect: " + "; ".join(f"{w['control']} {w['test']} {w['scope']} ({w['metric']}) expected "
                                            f"{w['expected']}, got {w['verdict']}" for w in controls["wrong"]))
    return lines


def _name(row: dict, several_models: bool) -> str:
    return f"{row['model']}: {row['method']}" if several_models else row["method"]


def _judged(row: dict) -> dict[str, Any]:
    """The verdict and its number: R [CI] where the test has one, else the value [CI]."""
    normalised = get_test(row["test"]).normalised
    keys = ("retention_mean", "retention_ci_low", "retention_ci_high") if normalised else ("mean", "ci_low", "ci_high")
    values = [row[key] if row[key] is not None and math.isfinite(row[key]) else None for key in keys]
    return {"verdict": row["verdict"], "quantity": "R" if normalised else "value",
            "mean": values[0], "ci_low": values[1], "ci_high": values[2]}
