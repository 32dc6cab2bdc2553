"""The run's report page: figures (saliency.plots) and index.html rendered from templates/report.html.

The first screen answers the question: the run in one line, the verdict matrix (methods grouped by
family, one column per test and verdict scope, each cell coloured by its verdict with R and its CI) and
a short list read off the numbers (what fails, what passes, what is inconclusive, the paired result,
then the caveats). Then the paper's comparison (signed vs pos/abs, and its figure), the
MPRT small multiples, the map grids, and the full tables collapsed, with CSV exports and links to the
Parquet files. Images are embedded as data URIs (and also written as PNGs), so the page is one file
that works from a copied folder and inside MLflow's artifact view.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import pyarrow as pa
import pyarrow.csv as pacsv
from matplotlib.figure import Figure

from saliency.plots import MAP_NORMALISATION, report_figures, slug
from saliency.sanity import sanity_tests
from saliency.statistics import VerdictRules
from tasks.manifest import Manifest
from tasks.report_content import (comparison_table, controls_section, facts, paired_section, reading, run_line,
                                   summary_table, verdict_matrices, verdict_table)

MAPS_CAPTION = ("Example maps of the first stored images: rows are methods, grouped by family as in the verdict "
                "matrix; one column group per image, headed by its input: the original model's map, then the "
                "states (the other classes, or the first, a middle and the last randomised layer); "
                f"{MAP_NORMALISATION}.")
PAPER_CAPTION = ("The paper's comparison at a glance: per image, the input, then the maps for the top class and "
                 "for the least likely class (min) of GradCAM++, FullGrad and GradCAM with pos/abs aggregation "
                 "beside their signed twins, and the maps of the trained and the head-randomised model for "
                 "Guided Backprop beside the gradient. Maps that look alike across a pair ignore the class or "
                 f"the weights. Stored maps of the run (the scored ones, first randomisation seed); {MAP_NORMALISATION}.")
TABLE_FILES = ("summary", "verdicts", "comparisons")
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("tasks", "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined)


FIGURE_DPI = 90
"""Resolution of the page's figures (1.25 px per point): a figure up to 13.3 inches wide is 1200 px, shown
unscaled on a page at least that wide, so an 8-point label is 10 px there."""


def write_report(summary: pa.Table, out_dir: str | Path, *, scores: pa.Table | None = None,
                 manifest: Manifest | None = None, map_grids: Mapping[str, Figure] | None = None,
                 verdicts: pa.Table | None = None, comparisons: pa.Table | None = None,
                 paper: Figure | None = None, parquet_links: bool = False,
                 changes: Mapping[str, Any] | None = None) -> Path:
    """Write index.html with its figures (embedded, and as PNGs) and CSV exports into ``out_dir``.

    ``summary``, ``verdicts`` and ``comparisons`` are tables of saliency.statistics' schemas; without a
    manifest the header shows what the tables tell. ``paper`` is the paper's figure (``paper_figure``).
    ``parquet_links``: link ../<table>.parquet (the page sits in RUN_DIR/report). ``changes``: what changed
    since the previous run of the same config (``tasks.answer.changes_since``). Returns the path of
    index.html; ``written_files`` lists every file written. The caller's figures are saved, not closed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rules = VerdictRules.from_dict(manifest.verdict_rules) if manifest else VerdictRules()
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
        entry = image(stem, fig, FIGURE_DPI) | {"alt": stem, "caption": test.description}
        (curves if test.curve and test.figure != "value" else other_figures).append(entry)
    grids = [image(f"maps_{slug(name)}", fig, FIGURE_DPI) | {"alt": f"maps {name}", "caption": f"{MAPS_CAPTION} ({name})"}
             for name, fig in (map_grids or {}).items()]
    paper_entry = image("paper_figure", paper, FIGURE_DPI) | {"alt": "paper figure", "caption": PAPER_CAPTION} if paper else None
    tables = {"summary": summary, "verdicts": verdicts, "comparisons": comparisons}
    exports = []
    for name in TABLE_FILES:
        if tables[name] is not None:
            pacsv.write_csv(tables[name], out / f"{name}.csv")
            exports.append({"name": name, "csv": f"{name}.csv",
                            "parquet": f"../{name}.parquet" if parquet_links else None})
    judged = verdicts is not None and verdicts.num_rows > 0
    page = _TEMPLATES.get_template("report.html").render(
        run_line=run_line(summary, scores, manifest), facts=facts(summary, scores, manifest),
        untrained=manifest.model_check.describe() if manifest and manifest.model_check
        and manifest.model_check.random_weights else None, changes=changes,
        matrices=verdict_matrices(verdicts) if judged else [],
        reading=reading(verdicts, comparisons) if judged else None,
        controls=controls_section(verdicts) if verdicts is not None else None,
        paired=paired_section(verdicts, comparisons) if judged and comparisons is not None and comparisons.num_rows else None,
        paper=paper_entry, curves=curves, other_figures=other_figures, grids=grids,
        verdict_table=verdict_table(verdicts) if judged else None,
        comparisons=comparison_table(comparisons) if comparisons is not None and comparisons.num_rows else None,
        summary=summary_table(summary), exports=exports, scores_link="../scores/" if parquet_links else None,
        manifest_json=json.dumps(manifest.to_json(), indent=2) if manifest else None)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def written_files(index: str | Path) -> list[Path]:
    """The files of a report: its index.html and the PNGs and CSVs it links to (for logging as artifacts)."""
    text = Path(index).read_text(encoding="utf-8")
    linked = dict.fromkeys(html.unescape(name) for name in re.findall(r'href="([^"/:#]+\.(?:png|csv))"', text))
    return [Path(index)] + [Path(index).parent / name for name in linked]

def _unique(stem: str, used: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate
