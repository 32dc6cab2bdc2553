"""The run's report page: figures (saliency.plots) and index.html rendered from templates/report.html.

The first screen answers the question: the run in one line, the verdict matrix (methods grouped by
family, one column per test and verdict scope, each cell coloured by its verdict with R and its CI) and
a paragraph read off the numbers. Then the paper's comparison (signed vs pos/abs, and its figure), the
MPRT small multiples, the map grids, and the full tables collapsed, with CSV exports and links to the
Parquet files. Images are embedded as data URIs (and also written as PNGs), so the page is one file
that works from a copied folder and inside MLflow's artifact view.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from matplotlib.figure import Figure
from prefect import task
from prefect.cache_policies import NO_CACHE

from saliency.plots import (CONTROLS, MAP_NORMALISATION, PAPER_FIGURE, map_grid_figure, method_groups,
                            order_methods, paper_figure, report_figures, slug)
from saliency.sanity import ORIGINAL, get_test, sanity_tests
from saliency.statistics import CONTROL_EXPECTATIONS, VerdictRules, control_checks
from tasks.manifest import Manifest, read_manifest
from tasks.storage import RunDir

SCOPE_WORDS = {"min": "least likely class", "random": "random other class", "second": "second class",
               "head": "head randomised", "cascade": "mean over the cascade", "full": "fully randomised"}
"""Plain words under a scope's name in the matrix header (a scope not listed shows its name only)."""
MAPS_CAPTION = ("Example maps of one image: rows are methods, columns the input, the original model's map, "
                f"then each state; {MAP_NORMALISATION}.")
PAPER_CAPTION = ("The paper's comparison at a glance: per image, the input, then the maps for the top class and "
                 "for the least likely class (min) of GradCAM++, FullGrad and GradCAM with pos/abs aggregation "
                 "beside their signed twins, and the maps of the trained and the head-randomised model for "
                 "Guided Backprop beside the gradient. Maps that look alike across a pair ignore the class or "
                 f"the weights. Stored maps of the run (the scored ones, first randomisation seed); {MAP_NORMALISATION}.")
SAMPLE_IMAGES = 6
"""Most images in the paper's figure (those whose maps were stored: storage.sample_images)."""
TABLE_FILES = ("summary", "verdicts", "comparisons")
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("tasks", "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined)


def write_report(summary: pa.Table, out_dir: str | Path, *, scores: pa.Table | None = None,
                 manifest: Manifest | None = None, map_grids: Mapping[str, Figure] | None = None,
                 verdicts: pa.Table | None = None, comparisons: pa.Table | None = None,
                 paper: Figure | None = None, parquet_links: bool = False) -> Path:
    """Write index.html with its figures (embedded, and as PNGs) and CSV exports into ``out_dir``.

    ``summary``, ``verdicts`` and ``comparisons`` are tables of saliency.statistics' schemas; without a
    manifest the header shows what the tables tell. ``paper`` is the paper's figure (``paper_figure``).
    ``parquet_links``: link ../<table>.parquet (the page sits in RUN_DIR/report). Returns the path of
    index.html; ``written_files`` lists every file written. The caller's figures are saved, not closed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rules = VerdictRules(**manifest.verdict_rules) if manifest else VerdictRules()
    used: set[str] = set()

    def image(stem: str, fig: Figure, dpi: int) -> dict:
        name = f"{_unique(stem, used)}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        (out / name).write_bytes(buffer.getvalue())
        return {"file": name, "data": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}

    curves, other_figures = [], []
    for stem, fig in report_figures(summary, rules).items():
        test = next(t for t in sanity_tests() if stem.startswith(f"{t.id}_"))
        entry = image(stem, fig, 90) | {"alt": stem, "caption": test.description}
        (curves if test.curve and test.figure != "value" else other_figures).append(entry)
    grids = [image(f"maps_{slug(name)}", fig, 90) | {"alt": f"maps {name}", "caption": f"{MAPS_CAPTION} ({name})"}
             for name, fig in (map_grids or {}).items()]
    paper_entry = image("paper_figure", paper, 90) | {"alt": "paper figure", "caption": PAPER_CAPTION} if paper else None
    tables = {"summary": summary, "verdicts": verdicts, "comparisons": comparisons}
    exports = []
    for name in TABLE_FILES:
        if tables[name] is not None:
            pacsv.write_csv(tables[name], out / f"{name}.csv")
            exports.append({"name": name, "csv": f"{name}.csv",
                            "parquet": f"../{name}.parquet" if parquet_links else None})
    judged = verdicts is not None and verdicts.num_rows > 0
    page = _TEMPLATES.get_template("report.html").render(
        run_line=run_line(summary, scores, manifest), facts=_facts(summary, scores, manifest),
        untrained=manifest.model_check.describe() if manifest and manifest.model_check
        and manifest.model_check.random_weights else None,
        matrices=verdict_matrices(verdicts) if judged else [],
        reading=_reading(verdicts, comparisons) if judged else None,
        controls=_controls(verdicts) if verdicts is not None else None,
        paired=_paired(verdicts, comparisons) if judged and comparisons is not None and comparisons.num_rows else None,
        paper=paper_entry, curves=curves, other_figures=other_figures, grids=grids,
        verdict_table=_verdict_table(verdicts) if judged else None,
        comparisons=_comparisons(comparisons) if comparisons is not None and comparisons.num_rows else None,
        summary=_summary(summary), exports=exports, scores_link="../scores/" if parquet_links else None,
        manifest_json=json.dumps(manifest.to_json(), indent=2) if manifest else None)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def written_files(index: str | Path) -> list[Path]:
    """The files of a report: its index.html and the PNGs and CSVs it links to (for logging as artifacts)."""
    text = Path(index).read_text(encoding="utf-8")
    linked = dict.fromkeys(html.unescape(name) for name in re.findall(r'href="([^"/:#]+\.(?:png|csv))"', text))
    return [Path(index)] + [Path(index).parent / name for name in linked]


# ---------------------------------------------------------------- what the page shows
def _facts(summary: pa.Table, scores: pa.Table | None, manifest: Manifest | None) -> list[tuple[str, object]]:
    """(label, text) facts of the run: from the manifest, else what the tables tell."""
    if manifest is None:
        facts = [("model", ", ".join(_distinct(summary, "model"))),
                 ("methods", ", ".join(order_methods(_distinct(summary, "method"))))]
        if scores is not None:
            facts.append(("images", str(len(pc.unique(scores["image_id"])))))
        return facts
    rules, r = manifest.verdict_rules, manifest.randomization
    return [
        ("model", manifest.model), ("dataset", manifest.dataset), ("images", manifest.n_images),
        ("model check", manifest.model_check.describe() if manifest.model_check else "not recorded"),
        ("CAM layer", manifest.cam_layer or "none (no CAM method)"),
        ("methods", ", ".join(manifest.methods)),
        ("tests", ", ".join(manifest.tests)),
        ("randomization", f"seeds {', '.join(map(str, r.seeds))}; order {r.order}; "
                          f"{len(manifest.states)} MPRT states"),
        ("verdict rules", f"R = (s̄ − c̄)/(r̄ − c̄) per seed, averaged over seeds; fail when CI_low(R) > "
                          f"{rules['retention']:g}, pass when CI_high(R) < "
                          f"{rules['retention']:g} (also read at ± {rules.get('retention_spread', 0.1):g}: † marks "
                          f"a verdict that changes there), uninformative when mean(r − c) < {rules['min_gap']:g}; "
                          f"eMPRT passes when CI(entropy rise) > {rules['entropy_rise']:g}; comparisons "
                          f"Holm-corrected at α = {rules['alpha']:g}"),
        ("code version", manifest.code_version),
    ]


def run_line(summary: pa.Table, scores: pa.Table | None, manifest: Manifest | None) -> str:
    """The run in one line: model, dataset, images, CAM layer, seeds, date, code version."""
    if manifest is None:
        parts = [", ".join(_distinct(summary, "model")) or "no model"]
        if scores is not None:
            parts.append(f"{len(pc.unique(scores['image_id']))} images")
        return " · ".join(parts)
    seeds = manifest.randomization.seeds
    check = manifest.model_check
    weights = [] if check is None else ["random weights" if check.random_weights else "trained weights",
                                        "accuracy " + ("–" if check.accuracy is None else f"{check.accuracy:.1%}")]
    return " · ".join([
        f"{manifest.model} on {manifest.dataset}", *weights, f"{manifest.n_images} images",
        f"CAM layer {manifest.cam_layer or 'none'}",
        f"randomisation seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
        manifest.created[:10], f"code {manifest.code_version}"])


def headline_metrics(verdicts: pa.Table) -> dict[str, str]:
    """The metric each test is read by on the first screen: "ssim" where the test has it, else its first."""
    metrics: dict[str, set[str]] = {}
    for test, metric in zip(verdicts["test"].to_pylist(), verdicts["metric"].to_pylist()):
        metrics.setdefault(test, set()).add(metric)
    return {test: "ssim" if "ssim" in found else sorted(found)[0] for test, found in metrics.items()}


def matrix_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(test, scope) columns: tests in registry order, scopes in the order of their states (the
    summary scopes, state_index < 0, last), as the verdicts table holds them."""
    tests = [t.id for t in sanity_tests()]
    first: dict[tuple[str, str], float] = {}
    for r in rows:
        index = r["state_index"] if r["state_index"] >= 0 else math.inf
        first[(r["test"], r["scope"])] = min(first.get((r["test"], r["scope"]), math.inf), index)
    return sorted(first, key=lambda c: (_rank(c[0], tests), first[c], c[1]))


def verdict_matrices(verdicts: pa.Table) -> list[dict]:
    """One verdict matrix per model: rows = methods grouped by family, columns = (test, scope) at the
    test's headline metric."""
    headline = headline_metrics(verdicts)
    rows = [r for r in verdicts.to_pylist() if r["metric"] == headline[r["test"]]]
    columns = matrix_columns(rows)
    matrices = []
    for model in sorted({r["model"] for r in rows}):
        cells = {(r["method"], r["test"], r["scope"]): r for r in rows if r["model"] == model}
        groups = []
        for label, methods in method_groups({method for method, *_ in cells}):
            groups.append({"label": label, "rows": [
                {"method": method, "cells": [matrix_cell(cells.get((method, *c))) for c in columns]} for method in methods]})
        matrices.append({"model": model, "groups": groups, "columns": _column_heads(columns, headline)})
    return matrices


def _column_heads(columns: list[tuple[str, str]], headline: dict[str, str]) -> list[dict]:
    heads = []
    for test, scope in columns:
        if heads and heads[-1]["test"] == test:
            heads[-1]["scopes"].append({"scope": scope, "words": SCOPE_WORDS.get(scope, "")})
            continue
        declared = get_test(test)
        heads.append({"test": test, "title": declared.title, "metric": headline[test],
                      "quantity": "R" if declared.normalised else "value",
                      "description": declared.description,
                      "scopes": [{"scope": scope, "words": SCOPE_WORDS.get(scope, "")}]})
    return heads


def matrix_cell(row: dict | None) -> dict | None:
    """The verdict; the number: R [CI] (a test whose high value passes: the value [CI]), or r − c for
    an uninformative one (labelled, as the column header names the other quantities); the reason as
    tooltip."""
    if row is None:
        return None
    verdict = row["verdict"]
    if verdict == "uninformative":
        gap = row["gap_mean"]
        label, value = ("r − c", _fmt(gap, 2)) if gap is not None and math.isfinite(gap) else ("", "")
    elif not get_test(row["test"]).normalised:
        label, value = "", f"{_fmt(row['mean'], 2)} [{_fmt(row['ci_low'], 2)}, {_fmt(row['ci_high'], 2)}]"
    else:
        label, value = "", (f"{_fmt(row['retention_mean'], 2)} [{_fmt(row['retention_ci_low'], 2)}, "
                            f"{_fmt(row['retention_ci_high'], 2)}]")
    sensitive = bool(row.get("threshold_sensitive"))
    reason = f"{verdict}: {row['reason']}"
    if sensitive:
        reason += (f"; threshold-sensitive: {row['verdict_at_low']} at the lower threshold, "
                   f"{row['verdict_at_high']} at the higher")
    return {"verdict": verdict, "label": label, "value": value, "reason": reason, "sensitive": sensitive}


def _reading(verdicts: pa.Table, comparisons: pa.Table | None) -> str:
    """One paragraph read off the matrix: per column how many of the non-control methods fail (named)
    and pass; how many paired comparisons are significant; whether the controls behave."""
    headline = headline_metrics(verdicts)
    rows = [r for r in verdicts.to_pylist() if r["metric"] == headline[r["test"]] and r["method"] not in CONTROLS]
    sentences = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        n = len({r["method"] for r in mine})
        prefix = f"{model}: " if len({r["model"] for r in rows}) > 1 else ""
        for test, scope in matrix_columns(mine):
            cells = [r for r in mine if (r["test"], r["scope"]) == (test, scope)]
            order = {m: i for i, m in enumerate(m for _, ms in method_groups(r["method"] for r in cells) for m in ms)}
            by = {v: sorted((r["method"] for r in cells if r["verdict"] == v), key=order.get)
                  for v in ("fail", "pass", "inconclusive", "uninformative")}
            where = f"{get_test(test).title} ({SCOPE_WORDS.get(scope, scope)}, {headline[test]})"
            text = f"{prefix}{len(by['fail'])} of {n} methods fail {where}"
            text += f": {', '.join(by['fail'])}" if by["fail"] else ""
            rest = [f"{len(by[v])} {v}" for v in ("pass", "inconclusive", "uninformative") if by[v]]
            sentences.append(text + (f"; {', '.join(rest)}" if rest else "") + ".")
    sensitive = [r for r in rows if r.get("threshold_sensitive")]
    if sensitive:
        sentences.append(f"{len(sensitive)} of these verdicts are threshold-sensitive (†: another verdict at R "
                         f"threshold ± the spread): " + "; ".join(_cell_name(r) for r in sensitive) + ".")
    sentences += _sign_invariant_reading(verdicts, headline)
    sentences += _complexity_reading(verdicts)
    if comparisons is not None and comparisons.num_rows:
        pairs = [r for r in comparisons.to_pylist() if r["metric"] == headline.get(r["test"])]
        more = [r for r in pairs if r["significant"] and (r["mean_difference"] or 0) > 0]
        names = sorted({r["variant"] for r in more})
        sentences.append(f"In {len(more)} of {len(pairs)} paired comparisons a pos/abs variant keeps significantly "
                         f"more of its map than its signed twin (Holm-corrected; "
                         f"{', '.join(names) if names else 'none'}).")
    checks = control_checks(verdicts)
    wrong = [c for c in checks if not c["ok"]]
    if checks:
        sentences.append(f"Controls: {len(checks) - len(wrong)} of {len(checks)} checks hold"
                         + (" — the verdicts are suspect." if wrong else "."))
    return " ".join(sentences)


SIGN_INVARIANT = "spearman_abs"
"""The metric a sign flip does not change: every claim is also read on it (SPEC §4)."""


def _cell_name(row: dict) -> str:
    return f"{row['method']} {row['test']}/{row['scope']} {row['verdict']} ({row['verdict_at_low']} / {row['verdict_at_high']})"


def _sign_invariant_reading(verdicts: pa.Table, headline: dict[str, str]) -> list[str]:
    """Where the headline metric and the sign-invariant one give different verdicts, named: a signed
    metric counts a sign flip of the map as a change."""
    rows = verdicts.to_pylist()
    invariant = {(r["model"], r["method"], r["test"], r["scope"]): r["verdict"] for r in rows
                 if r["metric"] == SIGN_INVARIANT}
    compared = [r for r in rows if r["metric"] == headline[r["test"]] != SIGN_INVARIANT and r["method"] not in CONTROLS
                and (r["model"], r["method"], r["test"], r["scope"]) in invariant]
    if not compared:
        return []
    differ = [f"{r['method']} {r['test']}/{r['scope']} ({r['metric']} {r['verdict']}, {SIGN_INVARIANT} "
              f"{invariant[(r['model'], r['method'], r['test'], r['scope'])]})" for r in compared
              if r["verdict"] != invariant[(r["model"], r["method"], r["test"], r["scope"])]]
    if not differ:
        return [f"The sign-invariant {SIGN_INVARIANT} gives the same verdict in all {len(compared)} cells."]
    return [f"The sign-invariant {SIGN_INVARIANT} disagrees in {len(differ)} of {len(compared)} cells: "
            + "; ".join(differ) + "."]


def _complexity_reading(verdicts: pa.Table) -> list[str]:
    """eMPRT measures a rise in map complexity (Hedström et al. 2023), not how much of the map is kept:
    where it disagrees with MPRT over the cascade, say so rather than read it as support or refutation."""
    rows = verdicts.to_pylist()
    headline = headline_metrics(verdicts)
    mprt = {(r["model"], r["method"]): r["verdict"] for r in rows
            if r["test"] == "mprt" and r["scope"] == "cascade" and r["metric"] == headline.get("mprt")}
    judged = [(r, mprt[(r["model"], r["method"])]) for r in rows if r["test"] == "emprt" and r["method"] not in CONTROLS
              and (r["model"], r["method"]) in mprt and {r["verdict"], mprt[(r["model"], r["method"])]} <= {"pass", "fail"}]
    if not judged:
        return []
    differ = [f"{r['method']} (eMPRT {r['verdict']}, MPRT {verdict})" for r, verdict in judged if r["verdict"] != verdict]
    text = ("eMPRT measures a rise in map complexity (entropy), not retention, so it neither supports nor refutes "
            "an MPRT verdict")
    return [text + (f"; it differs from MPRT over the cascade for {len(differ)} of {len(judged)} methods: "
                    + "; ".join(differ) + "." if differ else f"; it agrees with MPRT for all {len(judged)} methods.")]


def _paired(verdicts: pa.Table, comparisons: pa.Table) -> dict:
    """The paper's table: per signed method its pos/abs variants beside it, per (test, scope) at the
    headline metric: R [CI] from the verdicts, and ΔR, Holm p and rank-biserial r from the comparisons."""
    headline = headline_metrics(verdicts)
    judged = {(r["model"], r["method"], r["test"], r["scope"], r["metric"]): r for r in verdicts.to_pylist()}
    metrics = {test: list(dict.fromkeys([metric, SIGN_INVARIANT])) for test, metric in headline.items()}
    every = comparisons.to_pylist()
    pairs = [r for r in every if r["metric"] == headline.get(r["test"])]
    columns = [c for c in matrix_columns([r for r in verdicts.to_pylist() if r["metric"] == headline[r["test"]]])
               if any((r["test"], r["scope"]) == c for r in pairs)]
    several = len({r["model"] for r in pairs}) > 1
    blocks = []
    for model in sorted({r["model"] for r in pairs}):
        mine = [r for r in pairs if r["model"] == model]
        order = {m: i for i, m in enumerate(m for _, ms in method_groups({r["signed"] for r in mine}) for m in ms)}
        for signed in sorted({r["signed"] for r in mine}, key=order.get):
            variants = list(dict.fromkeys(r["variant"] for r in mine if r["signed"] == signed))
            rows = []
            for method in [signed] + variants:
                cells = []
                for test, scope in columns:
                    lines = []
                    for metric in metrics[test]:
                        verdict = judged.get((model, method, test, scope, metric))
                        pair = next((r for r in every if (r["model"], r["variant"], r["signed"], r["test"], r["scope"],
                                                          r["metric"]) == (model, method, signed, test, scope, metric)), None)
                        if verdict is None and pair is None:
                            continue
                        lines.append({"metric": metric, "verdict": verdict["verdict"] if verdict else "",
                                      "r": matrix_cell(verdict)["value"] if verdict else "–",
                                      "pair": None if pair is None else
                                      f"ΔR {_signed(pair['mean_difference'])}, p {_p(pair['p_holm'])}, "
                                      f"r {_signed(pair['rank_biserial'])}"})
                    cells.append({"verdict": lines[0]["verdict"] if lines else "", "lines": lines})
                rows.append({"method": method, "role": "signed" if method == signed else "variant", "cells": cells})
            blocks.append({"model": model if several else None, "rows": rows})
    return {"columns": [{"test": get_test(t).title, "scope": s, "words": SCOPE_WORDS.get(s, "")} for t, s in columns],
            "blocks": blocks}


def _verdict_table(verdicts: pa.Table) -> dict:
    rank = {m: i for i, m in enumerate(m for _, ms in method_groups(verdicts["method"].to_pylist()) for m in ms)}
    tests = [t.id for t in sanity_tests()]
    rows = sorted(verdicts.to_pylist(), key=lambda r: (r["model"], rank[r["method"]], _rank(r["test"], tests),
                                                     r["scope"], r["metric"]))
    head = ("model", "method", "test", "scope", "metric", "verdict", "at R threshold − / +", "n", "R [95% CI]",
            "value [95% CI]", "r − c", "reason")
    body = [[r["model"], r["method"], r["test"], r["scope"], r["metric"], r["verdict"],
             f"{r['verdict_at_low']} / {r['verdict_at_high']}" + (" †" if r["threshold_sensitive"] else ""), _fmt(r["n"]),
             f"{_fmt(r['retention_mean'])} [{_fmt(r['retention_ci_low'])}, {_fmt(r['retention_ci_high'])}]",
             f"{_fmt(r['mean'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", _fmt(r["gap_mean"]), r["reason"]]
            for r in rows]
    return {"head": head, "rows": body}


VERBS = {"fail": "fails", "pass": "passes", "uninformative": "is uninformative"}


def _controls(verdicts: pa.Table) -> dict:
    """The control checks the run made (statistics.control_checks), each with what was expected and
    what happened; ``made``: one sentence built from those checks only, so the banner never claims a
    check it did not make; ``unchecked``: the controls' other verdicts at the headline metric (say
    gradient's eMPRT), named so that a verdict in the matrix is never left contradicting the banner."""
    checks = control_checks(verdicts)
    tested: dict[tuple[str, str], dict[str, list[str]]] = {}
    for c in checks:
        scopes = tested.setdefault((c["control"], c["expected"]), {}).setdefault(c["test"], [])
        if c["scope"] not in scopes:
            scopes.append(c["scope"])
    tests = [t.id for t in sanity_tests()]
    controls = list(dict.fromkeys(method for method, _, _ in CONTROL_EXPECTATIONS))
    made = "; ".join(f"{control} {VERBS.get(expected, expected)} in " + ", ".join(
        f"{test} ({', '.join(by_test[test])})" for test in sorted(by_test, key=lambda t: _rank(t, tests)))
        for (control, expected), by_test in sorted(tested.items(), key=lambda item: _rank(item[0][0], controls)))
    headline = headline_metrics(verdicts) if verdicts.num_rows else {}
    checked = {(c["control"], c["test"], c["scope"]) for c in checks}
    unchecked = [f"{r['method']} {r['test']} {r['scope']}: {r['verdict']}" for r in sorted(
        verdicts.to_pylist(), key=lambda r: (_rank(r["method"], controls), _rank(r["test"], tests)))
        if r["method"] in controls and r["metric"] == headline.get(r["test"])
        and (r["method"], r["test"], r["scope"]) not in checked]
    return {"checks": checks, "wrong": [c for c in checks if not c["ok"]], "made": made,
            "unchecked": "; ".join(unchecked)}


def _comparisons(comparisons: pa.Table) -> dict:
    rows = comparisons.to_pylist()
    several = len({r["model"] for r in rows}) > 1
    head = (["model"] if several else []) + ["variant vs signed", "test", "scope", "metric", "n", "R variant",
                                             "R signed", "mean ΔR [95% CI]", "p (Holm)", "rank-biserial",
                                             "significant"]
    body = []
    for r in rows:
        cells = ([r["model"]] if several else []) + [
            f"{r['variant']} vs {r['signed']}", r["test"], r["scope"], r["metric"], r["n"],
            _fmt(r["variant_retention"]), _fmt(r["signed_retention"]),
            f"{_fmt(r['mean_difference'])} [{_fmt(r['difference_ci_low'])}, {_fmt(r['difference_ci_high'])}]",
            _p(r["p_holm"]), _fmt(r["rank_biserial"]), "yes" if r["significant"] else "no"]
        body.append({"cells": cells, "significant": r["significant"]})
    return {"head": head, "rows": body}


def _summary(summary: pa.Table) -> dict:
    rank = {method: i for i, method in enumerate(order_methods(_distinct(summary, "method")))}
    rows = sorted(summary.to_pylist(), key=lambda r: (r["model"] or "", r["test"] or "", r["metric"] or "",
                                                      rank.get(r["method"], -1), r["state_index"]))
    head = ("model", "method", "test", "state", "metric", "n", "mean ± std", "95% CI", "r − c", "R [95% CI]")
    body = [[r["model"], r["method"], r["test"], r["state"], r["metric"], _fmt(r["n"]),
             f"{_fmt(r['mean'])} ± {_fmt(r['std'])}", f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
             _fmt(r["gap_mean"]),
             f"{_fmt(r['retention_mean'])} [{_fmt(r['retention_ci_low'])}, {_fmt(r['retention_ci_high'])}]"]
            for r in rows]
    return {"head": head, "rows": body}


def _distinct(table: pa.Table, column: str) -> list[str]:
    return sorted({v for v in table[column].to_pylist() if v is not None})


def _rank(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)


def _unique(stem: str, used: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.2f}"


def _p(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.1e}" if value < 0.001 else f"{value:.3f}"


# ---------------------------------------------------------------- the run directory
def stored_maps(run_dir: RunDir, most_images: int = SAMPLE_IMAGES) -> pa.Table | None:
    """The stored map rows (storage.store_maps) of the first ``most_images`` images, reading parts in
    shard order only until that many images are found (store_maps=all keeps every image)."""
    tables, found = [], []
    for path in run_dir.parts("maps").values():
        table = pq.read_table(path, filesystem=run_dir.fs)
        new = [i for i in dict.fromkeys(table["image_id"].to_pylist()) if i not in found][:most_images - len(found)]
        if new:
            tables.append(table.filter(pc.is_in(table["image_id"], pa.array(new, pa.string()))))
            found += new
        if len(found) >= most_images:
            break
    return pa.concat_tables(tables) if tables else None


def input_images(manifest: Manifest | None, image_ids: Sequence[str]) -> dict[str, torch.Tensor | None]:
    """The input images of ``image_ids``, read again from the run's dataset (as the run's config loads
    it); None for each where the dataset cannot be read here (a folder on another machine)."""
    images: dict[str, torch.Tensor | None] = dict.fromkeys(image_ids)
    if manifest is None:
        return images
    try:
        from tasks.config import load_config
        from tasks.shards import load_data

        dataset = load_data(load_config(manifest.config))
        position = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
        for image_id in image_ids:
            if image_id in position:
                images[image_id] = dataset[position[image_id]].image
    except Exception:  # the figure still shows the maps; the input column stays empty
        pass
    return images


def _keyed_maps(maps: pa.Table, manifest: Manifest | None) -> dict[tuple[str, str, str], np.ndarray]:
    """(image id, method, key) → H×W map; key = "original" for the top-class map, else the verdict
    scope the registry gives the map's state ("min", "head", …) and the state's own name."""
    shape = maps.schema.field("map").type.shape
    n_states: dict[str, int] = {}
    for test, index in zip(maps["test"].to_pylist(), maps["state_index"].to_pylist()):
        n_states[test] = max(n_states.get(test, 0), index + 1)
    order = manifest.randomization.order if manifest else "cascade_top_down"
    keyed = {}
    for row in maps.to_pylist():
        array = np.asarray(row["map"], dtype=np.float32).reshape(shape)
        keys = {row["state"]}
        if row["test"] == ORIGINAL:
            keys = {ORIGINAL}
        else:
            scope = get_test(row["test"]).scope(row["state"], row["state_index"], n_states[row["test"]], order)
            if scope:
                keys.add(scope)
        for key in keys:
            keyed[(row["image_id"], row["method"], key)] = array
    return keyed


def map_grids(maps: pa.Table | None, images: Mapping[str, torch.Tensor | None] | None = None) -> dict:
    """For the first stored image: one grid per test with maps of its own (the MPRT states, the other
    classes), the input and the original first."""
    if maps is None or maps.num_rows == 0:
        return {}
    image_id = maps["image_id"][0].as_py()
    rows = maps.filter(pc.equal(maps["image_id"], image_id)).to_pylist()
    shape = maps.schema.field("map").type.shape
    methods = [m for _, ms in method_groups(dict.fromkeys(r["method"] for r in rows)) for m in ms]
    grids = {}
    for name in (test.id for test in sanity_tests() if test.maps_from is None):
        chosen = [r for r in rows if r["test"] in (ORIGINAL, name)]
        columns = list(dict.fromkeys(r["state"] for r in chosen))
        if len(columns) < 2:
            continue
        cells = {(r["method"], r["state"]): r["map"] for r in chosen}
        grid = {m: [torch.from_numpy(np.asarray(cells[(m, c)], dtype=np.float32).reshape(shape))
                    for c in columns] for m in methods}
        grids[name] = map_grid_figure(grid, columns, image=(images or {}).get(image_id),
                                      title=f"{get_test(name).title}: {image_id}")
    return grids


def paper_figure_of(maps: pa.Table | None, images: Mapping[str, torch.Tensor | None],
                    manifest: Manifest | None) -> Figure | None:
    """The paper's figure from the stored maps, or None when no group of it has every map it needs."""
    if maps is None or maps.num_rows == 0:
        return None
    ids = list(dict.fromkeys(maps["image_id"].to_pylist()))
    try:
        return paper_figure({i: images.get(i) for i in ids}, _keyed_maps(maps, manifest), PAPER_FIGURE)
    except ValueError:
        return None


def write_run_report(run_dir: RunDir) -> str:
    """Write RUN_DIR/report/ (index.html, PNGs, CSVs); returns a local folder holding the report."""
    summary = run_dir.read_table("summary.parquet")
    verdicts = run_dir.read_table("verdicts.parquet") if run_dir.exists("verdicts.parquet") else None
    comparisons = run_dir.read_table("comparisons.parquet") if run_dir.exists("comparisons.parquet") else None
    manifest = read_manifest(run_dir)
    maps = stored_maps(run_dir)
    images = input_images(manifest, list(dict.fromkeys(maps["image_id"].to_pylist())) if maps is not None else [])
    out = Path(run_dir.file("report")) if run_dir.is_local else Path(tempfile.mkdtemp(prefix="report-"))
    write_report(summary, out, manifest=manifest, map_grids=map_grids(maps, images), verdicts=verdicts,
                 comparisons=comparisons, paper=paper_figure_of(maps, images, manifest), parquet_links=True)
    if not run_dir.is_local:
        run_dir.upload_dir(out, "report")
    return str(out)


@task(name="render_report", cache_policy=NO_CACHE)
def render_report(run_dir: RunDir) -> str:
    return write_run_report(run_dir)
