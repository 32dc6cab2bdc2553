"""The report page as a reader sees it: rendered by headless Chromium at 1400×900 (tests/browser.py,
the DevTools protocol), and the headline's numbers checked against summary.parquet of a real run."""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from browser import Page, find_chromium
from saliency.methods import PAPER_METHODS
from saliency.statistics import comparisons, summarize, verdicts
from tasks import report as page_report
from tasks import report_run
from tasks.storage import RunDir, maps_schema, tensor_column
from test_report import LAYERS, manifest, matrix_cells, reading_items, scores_table

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (set $CHROMIUM, or install the "
                                                             "Debian package `chromium`, as .ci/run does)")
WIDTH, HEIGHT = 1400, 900
PAGE_FACTS = """(() => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom, r.left, r.right]; };
  const root = document.documentElement;
  return {matrix: box(document.getElementById("verdict-matrix")),
          images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
          scrollWidth: root.scrollWidth, clientWidth: root.clientWidth, text: document.body.innerText,
          wide: [...document.querySelectorAll("body *")].filter(e => e.getBoundingClientRect().right > root.clientWidth + 1)
                   .map(e => e.tagName + "." + e.className).slice(0, 5)};
})()"""


def check_in_browser(index, methods, screenshot) -> dict:
    """Open the page at 1400×900 and check what a reader sees; returns the page facts."""
    with Page(CHROMIUM, WIDTH, HEIGHT) as page:
        page.open(index)
        facts = page.evaluate(PAGE_FACTS)
        page.screenshot(screenshot)
        errors = page.errors()
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert errors == [], errors
    top, bottom, left, right = facts["matrix"]
    assert 0 <= top and bottom <= HEIGHT and 0 <= left and right <= WIDTH, f"matrix at {facts['matrix']}"
    assert facts["images"] and all(i["complete"] and i["width"] > 0 for i in facts["images"]), facts["images"]
    assert facts["scrollWidth"] <= facts["clientWidth"] == WIDTH, facts["wide"]
    for method in methods:
        assert method in facts["text"], method
    return facts


def synthetic_maps(methods, image_ids, states) -> pa.Table:
    """Stored-map rows in the actors' schema (tasks.storage.maps_schema): signed random 8×8 maps of the
    original, the other classes and every MPRT state."""
    rng = np.random.default_rng(0)
    blocks = [("original", "original", 0), ("class_sensitivity", "min", 0), ("class_sensitivity", "random", 1)]
    blocks += [("mprt", state, k) for k, state in enumerate(states)]
    keys = [(i, m, *block) for i in image_ids for m in methods for block in blocks]
    columns = {"run_id": ["r"] * len(keys), "shard": [0] * len(keys), "image_id": [k[0] for k in keys],
               "method": [k[1] for k in keys], "test": [k[2] for k in keys], "state": [k[3] for k in keys],
               "state_index": [k[4] for k in keys], "target_class": [1] * len(keys),
               "map": tensor_column(rng.normal(size=(len(keys), 8, 8)))}
    return pa.table(columns, schema=maps_schema(8, 8))


@needs_chromium
@pytest.mark.slow
def test_the_full_page_in_chromium_shows_the_matrix_on_the_first_screen(tmp_path):
    """Every method of the paper: the worst case for the first screen."""
    methods = list(PAPER_METHODS)
    scores = scores_table(methods=methods, tests=("mprt", "class_sensitivity", "emprt"), metrics=("ssim", "spearman_abs"))
    summary = summarize(scores, n_boot=50)
    states = [f"{k:02d}:{name}" for k, name in enumerate(LAYERS)]
    maps = synthetic_maps(methods, ["img0", "img1"], states)
    images = {"img0": torch.rand(1, 8, 8), "img1": torch.rand(1, 8, 8)}
    index = page_report.write_report(
        summary, tmp_path / "report", verdicts=verdicts(summary), comparisons=comparisons(scores, n_boot=50),
        manifest=manifest(methods), map_grids=report_run.map_grids(maps, images),
        paper=report_run.paper_figure_of(maps, images, None), parquet_links=True)
    facts = check_in_browser(index, methods, tmp_path / "screenshot.png")
    assert {"paper figure", "maps class_sensitivity", "maps mprt", "mprt_ssim"} <= {i["alt"] for i in facts["images"]}
    # the page is one file: a copy of index.html alone still shows every image
    alone = tmp_path / "copied" / "index.html"
    alone.parent.mkdir()
    alone.write_bytes(index.read_bytes())
    check_in_browser(alone, methods, tmp_path / "copied.png")


TWO_METHODS = ["gradcampp", "gradcampp/signed"]


@pytest.fixture(scope="module")
def two_method_run(prefect_server, ray_local, tmp_path_factory):
    from flows.sanity_check import sanity_check

    config = {"data": {"limit": 8}, "methods": {"ids": TWO_METHODS}, "randomization": {"seeds": [0]},
              "metrics": {"n_boot": 100}, "compute": {"images_per_shard": 8, "batch_size": 4, "actors": 1},
              "storage": {"store_maps": "sample", "sample_images": 4, "report": True}, "tracking": {"enabled": False}}
    return sanity_check(config=config, out=str(tmp_path_factory.mktemp("two-methods")))


@pytest.mark.slow
def test_the_headline_of_a_two_method_run_shows_summary_parquet(two_method_run):
    summary = RunDir(two_method_run["run_dir"]).read_table("summary.parquet").to_pylist()
    page = open(two_method_run["report"], encoding="utf-8").read()
    columns, rows, families = matrix_cells(page)
    assert list(rows) == ["gradcampp/signed", "gradcampp"] and families == ["aggregation"]
    assert columns == [("class_sensitivity", "min"), ("class_sensitivity", "random"), ("mprt", "head"),
                       ("mprt", "cascade"), ("emprt", "full"), ("data_randomization", "label_randomised"),
                       ("deletion", "gain")]
    n_states = 1 + max(r["state_index"] for r in summary if r["test"] == "mprt")
    where = {("class_sensitivity", "min"): ("class_sensitivity", "min"),
             ("class_sensitivity", "random"): ("class_sensitivity", "random"),
             ("mprt", "head"): ("mprt", next(r["state"] for r in summary if r["test"] == "mprt" and r["state_index"] == 0)),
             ("mprt", "cascade"): ("mprt", "cascade"),
             ("emprt", "full"): ("emprt", next(r["state"] for r in summary
                                               if r["test"] == "emprt" and r["state_index"] == n_states - 1)),
             ("data_randomization", "label_randomised"): ("data_randomization", "label_randomised"),
             ("deletion", "gain"): ("deletion", "gain")}
    value_metric = {"emprt": "entropy_rise", "deletion": "srg_gain"}
    for method in TWO_METHODS:
        for column, (verdict, text) in zip(columns, rows[method]):
            test, state = where[column]
            metric = value_metric.get(test, "ssim")
            (row,) = [r for r in summary
                      if (r["method"], r["test"], r["state"], r["metric"]) == (method, test, state, metric)]
            prefix = "" if test in value_metric else "retention_"
            if verdict == "uninformative":
                continue
            numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", text)]
            expected = [row[f"{prefix}mean"], row[f"{prefix}ci_low"], row[f"{prefix}ci_high"]]
            np.testing.assert_allclose(numbers, expected, atol=0.005 + 1e-9, err_msg=f"{method} {column}")
    items = reading_items(page)
    assert re.match(r"\d of 2 methods", items["fail"][1]) and re.match(r"\d of 2 methods pass", items["pass"][1])
    assert "paper figure" in page  # both maps of the GradCAM++ pair were stored: the figure is there


@needs_chromium
@pytest.mark.slow
def test_the_two_method_run_page_in_chromium(two_method_run, tmp_path):
    check_in_browser(two_method_run["report"], TWO_METHODS, tmp_path / "two.png")
