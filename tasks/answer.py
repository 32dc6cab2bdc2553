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


#: Written in a run directory that has a previous run of its config: what changed since (changes_since).
CHANGES_FILE = "changes.json"

#: A verdict cell: a run's verdicts are matched on these columns.
CELL_KEYS = ("model", "method", "test", "scope", "metric")


def cell_text(row: dict) -> str:
    """R [CI] (the value for a test without retention) and the verdict, † when threshold-sensitive."""
    judged = _judged(row)
    number = ("–" if judged["mean"] is None else
              f"{judged['mean']:.2f} [{_number(judged['ci_low'])}, {_number(judged['ci_high'])}]")
    return f"{row['verdict']} {number}" + (" †" if row.get("threshold_sensitive") else "")


def verdict_changes(before: pa.Table, after: pa.Table, metrics: set[str] | None = None) -> tuple[list[tuple], dict]:
    """([(cell key, before row, after row)] of the cells whose verdict differs, counts): what a re-run of a
    config changed, or what a code change moved."""
    old = {tuple(r[k] for k in CELL_KEYS): r for r in before.to_pylist()}
    new = {tuple(r[k] for k in CELL_KEYS): r for r in after.to_pylist()}
    common = [k for k in new if k in old and (metrics is None or k[4] in metrics)]
    changed = [(k, old[k], new[k]) for k in common if old[k]["verdict"] != new[k]["verdict"]]
    counts = {"cells compared": len(common), "changed": len(changed),
              "only before": len(old.keys() - new.keys()), "only after": len(new.keys() - old.keys())}
    return sorted(changed, key=lambda change: change[0]), counts


def changes_since(previous: str, what: list[str], before: pa.Table, after: pa.Table) -> dict[str, Any]:
    """What changed since the previous run of the same config (``previous``, its run directory): what
    differed (code, weights, data) and every verdict that flipped, with R before and after."""
    changed, counts = verdict_changes(before, after)
    return {"previous": previous, "what": what, "compared": counts["cells compared"],
            "flipped": [{**dict(zip(CELL_KEYS, key)), "before": cell_text(old), "after": cell_text(new)}
                        for key, old, new in changed]}


def change_lines(changes: dict[str, Any]) -> list[str]:
    """'since …/reference-mnist-3fa2 (the code changed): 2 of 96 verdicts flipped', then one line each."""
    what = ", ".join(changes["what"]) or "nothing recorded"
    flipped = changes["flipped"]
    lines = [f"since {changes['previous']} ({what} changed): {len(flipped)} of {changes['compared']} verdicts "
             "flipped" + (":" if flipped else "")]
    lines += [f"  {f['method']} {f['test']} {f['scope']} ({f['metric']}): {f['before']} → {f['after']}"
              for f in flipped]
    return lines


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
