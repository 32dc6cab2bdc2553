"""`saliency-sanity compare RUN_DIR [RUN_DIR ...]`: runs side by side (two models, two seeds, two
configs): one verdict matrix whose cells hold each run's verdict and R [95% CI], the same method's MPRT
curves overlaid, as a page and as plain text for the terminal (no width-dependent truncation)."""
from __future__ import annotations

import base64
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pyarrow as pa

from saliency.plots import method_groups, mprt_overlay_figure
from saliency.sanity import get_test, sanity_tests
from tasks.manifest import Manifest, read_manifest
from tasks.report_content import headline_metrics, matrix_cell, matrix_columns, run_line, scope_words
from tasks.storage import RunDir

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("tasks", "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined)


@dataclass
class Run:
    label: str
    location: str
    manifest: Manifest | None
    summary: pa.Table
    verdicts: pa.Table


def load_runs(locations: list[str]) -> list[Run]:
    """The finished runs at ``locations`` (paths or URIs), labelled by their directory name (with the
    parent's where two names are equal); a clear error naming a directory that is not a finished run."""
    runs = []
    for location in locations:
        directory = RunDir(location)
        missing = [name for name in ("summary.parquet", "verdicts.parquet") if not directory.exists(name)]
        if missing:
            raise ValueError(f"{location} is not a finished run directory: it has no {', '.join(missing)}")
        try:  # the run line only; the tables are what is compared, also for a run of an older version
            manifest = read_manifest(directory) if directory.exists("manifest.json") else None
        except ValueError:
            manifest = None
        runs.append(Run(Path(directory.path).name, str(directory), manifest,
                        directory.read_table("summary.parquet"), directory.read_table("verdicts.parquet")))
    counts = Counter(run.label for run in runs)
    for run in runs:
        if counts[run.label] > 1:
            run.label = "/".join(Path(RunDir(run.location).path).parts[-2:])
    counts = Counter(run.label for run in runs)
    seen: Counter = Counter()
    for run in runs:
        if counts[run.label] > 1:
            seen[run.label] += 1
            run.label = f"{run.label} #{seen[run.label]}"
    return runs


def comparison_rows(runs: list[Run]) -> tuple[list[tuple[str, str]], list[dict]]:
    """The (test, scope) columns of every run's headline verdicts, and one row per method (family
    order) with per column and run the matrix cell (or None where that run lacks it)."""
    headline: dict[str, str] = {}
    for run in runs:
        for test, metric in headline_metrics(run.verdicts).items():
            headline.setdefault(test, metric)
    cells = {}
    for i, run in enumerate(runs):
        for r in run.verdicts.to_pylist():
            if r["metric"] == headline.get(r["test"]):
                cells[(i, r["method"], r["test"], r["scope"])] = r
    columns = matrix_columns([r for r in cells.values()])
    rows = []
    for family, methods in method_groups({key[1] for key in cells}):
        for method in methods:
            rows.append({"family": family, "method": method,
                         "cells": [[matrix_cell(cells.get((i, method, *c))) for i in range(len(runs))] for c in columns]})
    return columns, rows


def format_comparison(runs: list[Run]) -> str:
    """Plain text: one line per method × (test, scope), one column per run; widths from the content,
    never from the terminal."""
    columns, rows = comparison_rows(runs)
    head = ["method", "test", "scope"] + [f"[{i + 1}]" for i in range(len(runs))]
    body = []
    for row in rows:
        for (test, scope), per_run in zip(columns, row["cells"]):
            body.append([row["method"], test, scope] + [
                "–" if c is None else f"{c['verdict']} {c['label'] + ' ' if c['label'] else ''}{c['value']}".strip()
                for c in per_run])
    widths = [max(len(line[k]) for line in [head] + body) for k in range(len(head))]
    lines = [f"[{i + 1}] {run.label}: {run.location}" for i, run in enumerate(runs)]
    lines.append("cells: verdict and R [95% CI] (eMPRT: the entropy rise [95% CI]; uninformative: r − c)")
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    previous = None
    for line in body:
        shown = list(line)
        if line[0] == previous:
            shown[0] = ""
        previous = line[0]
        lines.append("  ".join(c.ljust(w) for c, w in zip(shown, widths)).rstrip())
    return "\n".join(lines)


def write_comparison(runs: list[Run], out_dir: str | Path) -> Path:
    """index.html (figures embedded) and the overlaid MPRT curves as PNGs in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = comparison_rows(runs)
    figures = []
    for test in (t for t in sanity_tests() if t.curve and t.normalised):
        metrics = sorted({m for run in runs for m, t in zip(run.summary["metric"].to_pylist(),
                                                            run.summary["test"].to_pylist()) if t == test.id})
        for metric in metrics:
            fig = mprt_overlay_figure({run.label: run.summary for run in runs}, metric, test.id)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80)
            name = f"{test.id}_{metric}_overlay.png"
            (out / name).write_bytes(buffer.getvalue())
            figures.append({"file": name, "alt": name, "caption": f"{test.title}: R per randomised layer, "
                            f"{metric}, one line per run, 95% CI bands",
                            "data": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()})
    heads = [{"test": get_test(t).title, "scope": s, "words": scope_words(t, s)} for t, s in columns]
    page = _TEMPLATES.get_template("compare.html").render(
        runs=[{"label": r.label, "location": r.location, "line": run_line(r.summary, None, r.manifest)} for r in runs],
        heads=heads, groups=[(family, [r for r in rows if r["family"] == family])
                             for family in dict.fromkeys(r["family"] for r in rows)], figures=figures)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
