"""The run's report page: figures (saliency.plots) and index.html rendered from templates/report.html.

The page reads top-down: the run (from its typed manifest), the verdict table (one row per method, one
column per test and scope, headline metric ssim), the other metrics' verdicts, the control checks, the
pos/abs-vs-signed comparison table, then the figures and the full summary.
"""
from __future__ import annotations

import html
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
import pyarrow.parquet as pq
import torch
from matplotlib.figure import Figure
from prefect import task
from prefect.cache_policies import NO_CACHE

from saliency.plots import map_grid_figure, order_methods, report_figures, slug
from saliency.sanity import ORIGINAL, get_test, sanity_tests
from saliency.statistics import VerdictRules, control_checks
from tasks.manifest import Manifest, read_manifest
from tasks.storage import RunDir

SCOPE_ORDER = ("min", "random", "second", "head", "cascade", "full")
MAPS_CAPTION = ("Example maps: rows are methods, columns the original model then each state; each cell "
                "scaled by its own max|S|, red positive, blue negative.")
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("tasks", "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined)


def write_report(summary: pa.Table, out_dir: str | Path, *, scores: pa.Table | None = None,
                 manifest: Manifest | None = None, map_grids: Mapping[str, Figure] | None = None,
                 verdicts: pa.Table | None = None, comparisons: pa.Table | None = None) -> Path:
    """Write the PNG figures and a self-contained index.html (relative links) into ``out_dir``.

    ``summary``, ``verdicts`` and ``comparisons`` are tables of saliency.statistics' schemas; without a
    manifest the header shows what the tables tell. Returns the path of index.html; every file written
    sits next to it (``written_files``). The caller's map-grid figures are saved, not closed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rules = VerdictRules(**manifest.verdict_rules) if manifest else VerdictRules()
    figures: list[tuple[str, str, str]] = []  # (file name, alt text, caption)
    for stem, fig in report_figures(summary, rules).items():
        fig.savefig(out / f"{stem}.png", dpi=110)
        test = next(t for t in sanity_tests() if stem.startswith(f"{t.id}_"))
        figures.append((f"{stem}.png", stem, test.description))
    used: set[str] = set()
    for name, fig in (map_grids or {}).items():
        stem = _unique(f"maps_{slug(name)}", used)
        fig.savefig(out / f"{stem}.png", dpi=100)
        figures.append((f"{stem}.png", f"maps {name}", f"{MAPS_CAPTION} ({name})"))
    page = _TEMPLATES.get_template("report.html").render(
        facts=_facts(summary, scores, manifest),
        verdicts=_verdicts(verdicts) if verdicts is not None and verdicts.num_rows else None,
        controls=_controls(verdicts) if verdicts is not None else None,
        comparisons=_comparisons(comparisons) if comparisons is not None and comparisons.num_rows else None,
        figures=figures, summary=_summary(summary),
        manifest_json=json.dumps(manifest.to_json(), indent=2) if manifest else None)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def written_files(index: str | Path) -> list[Path]:
    """The files of a report: its index.html and the PNGs it links to (for logging as artifacts)."""
    linked = re.findall(r'<img src="([^"]+)"', Path(index).read_text(encoding="utf-8"))
    return [Path(index)] + [Path(index).parent / html.unescape(name) for name in linked]


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
        ("CAM layer", manifest.cam_layer or "none (no CAM method)"),
        ("methods", ", ".join(manifest.methods)),
        ("tests", ", ".join(manifest.tests)),
        ("randomization", f"seeds {', '.join(map(str, r.seeds))}; order {r.order}; "
                          f"{len(manifest.states)} MPRT states"),
        ("verdict rules", f"fail when CI_low(R) > {rules['retention']:g}, pass when CI_high(R) < "
                          f"{rules['retention']:g}, uninformative when mean(r − c) < {rules['min_gap']:g}; "
                          f"eMPRT passes when CI(entropy rise) > {rules['entropy_rise']:g}; comparisons "
                          f"Holm-corrected at α = {rules['alpha']:g}"),
        ("code version", manifest.code_version),
    ]


def _verdicts(verdicts: pa.Table) -> dict:
    """The headline grid (per test "ssim" if present, else its first metric) and the other metrics'."""
    rows = verdicts.to_pylist()
    headline = {}
    for test in {r["test"] for r in rows}:
        metrics = sorted({r["metric"] for r in rows if r["test"] == test})
        headline[test] = "ssim" if "ssim" in metrics else metrics[0]
    main = [r for r in rows if r["metric"] == headline[r["test"]]]
    other = [r for r in rows if r["metric"] != headline[r["test"]]]
    return {"headline": _grid(main), "other": _grid(other) if other else None,
            "other_metrics": ", ".join(sorted({r["metric"] for r in other}))}


def _grid(rows: list[dict]) -> dict:
    """One row per (model,) method, one column per (test, scope, metric) in registry and scope order."""
    tests = [t.id for t in sanity_tests()]
    columns = sorted({(r["test"], r["scope"], r["metric"]) for r in rows},
                     key=lambda c: (_rank(c[0], tests), _rank(c[1], SCOPE_ORDER), c[2]))
    rank = {m: i for i, m in enumerate(order_methods({r["method"] for r in rows}))}
    keys = sorted({(r["model"], r["method"]) for r in rows}, key=lambda k: (k[0], rank[k[1]]))
    cells = {(r["model"], r["method"], r["test"], r["scope"], r["metric"]): r for r in rows}
    return {"several_models": len({r["model"] for r in rows}) > 1, "columns": columns,
            "rows": [{"model": model, "method": method,
                      "cells": [_cell(cells.get((model, method, *c))) for c in columns]} for model, method in keys]}


def _cell(row: dict | None) -> dict | None:
    """The verdict; detail: R with its CI (a test whose high value passes: the value), or r − c for an
    uninformative one; the reason as tooltip."""
    if row is None:
        return None
    verdict = row["verdict"]
    if verdict == "uninformative":
        detail = f"r − c {_fmt(row['gap_mean'])}" if row["gap_mean"] is not None else ""
    elif not get_test(row["test"]).normalised:
        detail = f"rise {_fmt(row['mean'])} [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]"
    else:
        detail = f"R {_fmt(row['retention_mean'])} [{_fmt(row['retention_ci_low'])}, {_fmt(row['retention_ci_high'])}]"
    return {"verdict": verdict, "detail": detail, "reason": row["reason"]}


def _controls(verdicts: pa.Table) -> dict:
    checks = control_checks(verdicts)
    return {"checks": checks, "wrong": [c for c in checks if not c["ok"]]}


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


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _p(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.1e}" if value < 0.001 else f"{value:.3f}"


# ---------------------------------------------------------------- the run directory
def map_grids(maps: pa.Table | None) -> dict:
    """For the first stored image: one grid per test with maps of its own (the MPRT states, the other
    classes), the original first."""
    if maps is None or maps.num_rows == 0:
        return {}
    image_id = maps["image_id"][0].as_py()
    rows = maps.filter(pc.equal(maps["image_id"], image_id)).to_pylist()
    shape = maps.schema.field("map").type.shape
    methods = list(dict.fromkeys(r["method"] for r in rows))
    grids = {}
    for name in (test.id for test in sanity_tests() if test.maps_from is None):
        chosen = [r for r in rows if r["test"] in (ORIGINAL, name)]
        columns = list(dict.fromkeys(r["state"] for r in chosen))
        if len(columns) < 2:
            continue
        cells = {(r["method"], r["state"]): r["map"] for r in chosen}
        grid = {m: [torch.from_numpy(np.asarray(cells[(m, c)], dtype=np.float32).reshape(shape))
                    for c in columns] for m in methods}
        grids[name] = map_grid_figure(grid, columns, title=f"{name}: {image_id}")
    return grids


def write_run_report(run_dir: RunDir) -> str:
    """Write RUN_DIR/report/ (index.html and PNGs); returns a local folder holding the report."""
    summary = run_dir.read_table("summary.parquet")
    verdicts = run_dir.read_table("verdicts.parquet") if run_dir.exists("verdicts.parquet") else None
    comparisons = run_dir.read_table("comparisons.parquet") if run_dir.exists("comparisons.parquet") else None
    first_maps = next(iter(run_dir.parts("maps").values()), None)
    maps = pq.read_table(first_maps, filesystem=run_dir.fs) if first_maps else None
    out = Path(run_dir.file("report")) if run_dir.is_local else Path(tempfile.mkdtemp(prefix="report-"))
    write_report(summary, out, manifest=read_manifest(run_dir), map_grids=map_grids(maps), verdicts=verdicts,
                 comparisons=comparisons)
    if not run_dir.is_local:
        run_dir.upload_dir(out, "report")
    return str(out)


@task(name="render_report", cache_policy=NO_CACHE)
def render_report(run_dir: RunDir) -> str:
    return write_run_report(run_dir)
