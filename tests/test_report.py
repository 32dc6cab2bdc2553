"""Report figures and HTML (SPEC.md §4) on synthetic scores run through saliency.statistics."""
from __future__ import annotations

import base64
import html
import math
import re

import matplotlib.colors as mcolors
import numpy as np
import pyarrow as pa
import pytest
import torch
from matplotlib.container import BarContainer

from saliency import plots as report
from saliency.sanity import SCORE_SCHEMA
from saliency.statistics import SUMMARY_SCHEMA, VerdictRules, comparisons, summarize, verdicts
from tasks import report as page_report
from tasks.manifest import Manifest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ["fc", "layer4.1.conv2", "layer4.1.conv1", "conv1"]
METHODS = ["gradient", "gradcampp/signed", "gradcampp", "edge_sobel", "random"]
LEVELS = {"gradient": 0.1, "gradcampp/signed": 0.5, "gradcampp": 0.9, "edge_sobel": 1.0, "random": 0.5}
"""Retention R of each method at the head state and in class sensitivity: pass, inconclusive (its images
spread ±0.3 around 0.5), fail, fail; random has r − c = 0.05 (uninformative)."""
CHANCE = 0.2


def retention_at(method: str, k: int, levels=LEVELS) -> float:
    """R of a method at MPRT state k: its level, shrinking by 0.8 per randomised layer."""
    return levels.get(method, 0.3) * 0.8 ** k


def scores_table(methods=METHODS, layers=LAYERS, tests=("mprt", "class_sensitivity"), metrics=("ssim",),
                 model="cnn", n_images=6, levels=LEVELS, nan_at=None) -> pa.Table:
    """Scores in SCORE_SCHEMA with c = 0.2, r = 1 (random: 0.25) and s = c + R (r − c); MPRT and eMPRT
    rows for seeds 0 and 1, listed in reverse state order."""
    rows = []

    def add(method, test, state, index, seed, metric, value, chance=None, retest=None):
        for i in range(n_images):
            spread = (0.3 if i % 2 else -0.3) if method == "gradcampp/signed" and chance is not None else 0.0
            rows.append(dict(run_id="r", shard=0, image_id=f"img{i}", label=1, model=model, method=method,
                             test=test, state=state, state_index=index, seed=seed, target_class=1, metric=metric,
                             value=value + spread, chance=chance, retest=retest))

    for m, method in enumerate(methods):
        retest = CHANCE + (0.05 if method == "random" else 0.8)
        for metric in metrics:
            if "mprt" in tests:
                for k in reversed(range(len(layers))):
                    r = math.nan if nan_at == (method, k) else retention_at(method, k, levels)
                    for seed in (0, 1):
                        add(method, "mprt", f"{k:02d}:{layers[k]}", k, seed, metric,
                            CHANCE + r * (retest - CHANCE), CHANCE, retest)
            if "class_sensitivity" in tests:
                for j, other in enumerate(("min", "random", "second")):
                    r = levels.get(method, 0.3)
                    add(method, "class_sensitivity", other, j, None, metric, CHANCE + r * (retest - CHANCE),
                        CHANCE, retest)
        if "emprt" in tests:
            for k in range(len(layers)):
                for seed in (0, 1):
                    add(method, "emprt", f"{k:02d}:{layers[k]}", k, seed, "entropy_rise",
                        0.1 * k * (1 - levels.get(method, 0.3)))
    return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)


def summary_table(**kwargs) -> pa.Table:
    return summarize(scores_table(**kwargs), n_boot=200)


def labelled_lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_mprt_curve_plots_retention_and_raw_similarity_in_state_order():
    fig = report.mprt_curve_figure(summary_table(metrics=("spearman_abs", "ssim")), metric="ssim")
    ax_r, ax_s = fig.axes
    r_lines, s_lines = labelled_lines(ax_r), labelled_lines(ax_s)
    assert set(r_lines) == set(METHODS) | {"verdict threshold R = 0.5", "R = 0: another image's map"}
    assert set(s_lines) == set(METHODS) | {"original (identical map)"}
    for ax in (ax_r, ax_s):
        assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
        assert len(ax.collections) == len(METHODS)  # one CI band per method
    # y follows state_index order although the rows came in reverse order
    expected = [retention_at("gradient", k) for k in range(len(LAYERS))]
    np.testing.assert_allclose(r_lines["gradient"].get_ydata(), expected)
    np.testing.assert_allclose(s_lines["gradient"].get_ydata(), CHANCE + 0.8 * np.array(expected))
    np.testing.assert_allclose(r_lines["verdict threshold R = 0.5"].get_ydata(), [0.5, 0.5])
    assert fig.legends and not ax_r.get_legend() and not ax_s.get_legend()  # one legend, outside the axes


def test_mprt_curve_excludes_the_cascade_state():
    summary = summary_table()
    assert "cascade" in summary["state"].to_pylist()
    for ax in report.mprt_curve_figure(summary, "ssim").axes:
        assert "cascade" not in [t.get_text() for t in ax.get_xticklabels()]
        assert all(list(line.get_xdata()) == list(range(len(LAYERS)))
                   for name, line in labelled_lines(ax).items() if name in METHODS)


def test_mprt_retention_is_not_drawn_for_an_uninformative_method():
    ax_r, ax_s = report.mprt_curve_figure(summary_table(), "ssim").axes
    assert np.isnan(labelled_lines(ax_r)["random"].get_ydata()).all()
    assert np.isfinite(labelled_lines(ax_s)["random"].get_ydata()).all()


def test_mprt_controls_are_dashed_grey_and_black_references():
    for ax in report.mprt_curve_figure(summary_table(), "ssim").axes:
        lines = labelled_lines(ax)
        for control, colour in (("edge_sobel", "0.55"), ("random", "black")):
            assert lines[control].get_linestyle() == "--"
            assert mcolors.same_color(lines[control].get_color(), colour)
        assert lines["gradient"].get_linestyle() == "-"
        assert not any(mcolors.same_color(lines["gradient"].get_color(), c) for c in ("0.55", "black"))


def test_mprt_thins_tick_labels_of_many_states_keeping_both_ends():
    layers = [f"block{i}.conv" for i in range(60)]
    ax = report.mprt_curve_figure(summary_table(layers=layers, tests=("mprt",)), "ssim").axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) <= report.MAX_TICK_LABELS
    assert labels[0] == "block0.conv" and labels[-1] == "block59.conv"
    assert labels == sorted(labels, key=lambda name: int(name[5:-5]))


def test_mprt_nan_mean_leaves_a_gap_and_single_method_works():
    summary = summary_table(methods=["gradient"], nan_at=("gradient", 2))
    for ax in report.mprt_curve_figure(summary, "ssim").axes:
        y = labelled_lines(ax)["gradient"].get_ydata()
        assert np.isnan(y[2]) and np.isfinite(np.delete(y, 2)).all()


def test_mprt_panel_per_model_or_one_chosen_model():
    both = pa.concat_tables([summary_table(model="a"), summary_table(model="b")])
    assert len(report.mprt_curve_figure(both, "ssim").axes) == 4
    assert len(report.mprt_curve_figure(both, "ssim", model="b").axes) == 2


def test_figures_name_the_missing_rows():
    with pytest.raises(ValueError, match="no mprt rows.*'pearson'"):
        report.mprt_curve_figure(summary_table(), metric="pearson")
    with pytest.raises(ValueError, match="no emprt rows"):
        report.entropy_figure(summary_table())


FAMILY_ORDER = ["gradient", "gradcampp/signed", "gradcampp", "edge_sobel", "random"]
"""METHODS as the verdict matrix orders them (report.method_groups): families, signed first, controls last."""


def test_class_sensitivity_bars_in_the_matrix_order_with_controls_and_threshold():
    fig = report.class_sensitivity_figure(summary_table(), metric="ssim")
    (ax,) = fig.axes
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(containers) == 3 and all(len(c) == len(METHODS) for c in containers)
    assert [c.get_label() for c in containers] == ["other class: min", "other class: random", "other class: second"]
    assert [t.get_text() for t in ax.get_xticklabels()] == FAMILY_ORDER  # not alphabetical: the matrix's rows
    assert [t.get_text() for t in ax.texts if t.get_text() != "uninformative"] == ["plain gradient", "aggregation",
                                                                                 "controls"]
    heights = [bar.get_height() for bar in containers[1]]
    np.testing.assert_allclose(heights[:4], [0.1, 0.5, 0.9, 1.0], atol=1e-9)
    assert np.isnan(heights[4])  # random: uninformative, no R
    assert "uninformative" in [text.get_text() for text in ax.texts]
    hatched = [[bool(bar.get_hatch()) for bar in c] for c in containers]
    assert all(h == [False, False, False, True, True] for h in hatched)
    threshold = [line for line in ax.get_lines() if line.get_label().startswith("verdict threshold")]
    assert len(threshold) == 1 and np.allclose(threshold[0].get_ydata(), 0.5)
    # nothing is drawn over a bar: no shaded band (every patch is a bar), separators and grid behind the bars
    assert len(ax.patches) == 3 * len(METHODS)
    bar_z = containers[0][0].get_zorder()
    separators = [line for line in ax.get_lines() if len(set(np.ravel(line.get_xdata()))) == 1]
    assert len(separators) == 2 and all(line.get_zorder() < bar_z for line in separators)
    assert ax.get_axisbelow()  # the grid too
    assert all(len(c.errorbar.lines[2]) == 1 for c in containers)  # CI error bars
    positions = [bar.get_x() + bar.get_width() / 2 for bar in containers[1]]
    gaps = np.diff(positions)
    assert gaps[0] > gaps[1] and gaps[2] > gaps[1]  # a wider gap between families


def test_entropy_bars_coloured_by_the_verdict_with_its_threshold():
    """eMPRT bars: the matrix's order, one colour per verdict (statistics.verdicts under the same rules),
    the threshold drawn; a stricter threshold turns bars from pass to fail."""
    summary = summary_table(tests=("emprt",))
    for rules, expected in ((VerdictRules(), {"gradient": "pass", "gradcampp/signed": "pass", "gradcampp": "pass",
                                              "edge_sobel": "fail", "random": "pass"}),
                            (VerdictRules(thresholds={"entropy_rise": 0.2}), {"gradient": "pass", "gradcampp/signed": "fail",
                                                              "gradcampp": "fail", "edge_sobel": "fail",
                                                              "random": "fail"})):
        judged = {r["method"]: r["verdict"] for r in verdicts(summary, rules).to_pylist() if r["test"] == "emprt"}
        assert judged == expected
        ax = report.entropy_figure(summary, rules=rules).axes[0]
        (bars,) = [c for c in ax.containers if isinstance(c, BarContainer) and len(c) == len(METHODS)]
        names = [t.get_text() for t in ax.get_xticklabels()]
        assert names == FAMILY_ORDER
        heights = dict(zip(names, [b.get_height() for b in bars]))
        assert heights["gradient"] == pytest.approx(0.27)  # 0.1 * last index 3 * (1 − 0.1)
        colours = {name: mcolors.to_hex(bar.get_facecolor()) for name, bar in zip(names, bars)}
        assert colours == {m: mcolors.to_hex(report.VERDICT_BAR_COLOURS[v]) for m, v in expected.items()}
        assert len(set(colours.values())) == len(set(expected.values()))  # as many colours as verdicts
        (threshold,) = [line for line in ax.get_lines() if line.get_label().startswith("verdict threshold")]
        assert np.allclose(threshold.get_ydata(), rules.threshold('entropy_rise'))
        legend = [t.get_text() for t in ax.figure.legends[0].get_texts()]
        assert set(expected.values()) <= set(legend)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_mprt_small_multiples_y_labels_do_not_overlap_for_any_metric():
    """The stacked R and s panels share the left margin: their y-labels must not run into each other
    (spearman_abs's two-line labels did)."""
    methods = ["gradient", "smoothgrad", "gradcam", "gradcam/pos", "edge_sobel", "random"]
    summary = summary_table(methods=methods, metrics=("spearman_abs", "ssim"), tests=("mprt",))
    for metric in ("spearman_abs", "ssim"):
        fig = report.mprt_small_multiples(summary, metric)
        fig.draw_without_rendering()
        renderer = fig._get_renderer()
        labelled = [ax for ax in fig.axes if ax.get_visible() and ax.get_ylabel()]
        assert len(labelled) == 2 and all(metric in ax.get_ylabel() for ax in labelled)
        boxes = [ax.yaxis.label.get_window_extent(renderer) for ax in labelled]
        assert not _overlaps(*boxes), boxes
        for ax, box in zip(labelled, boxes):  # each label stays beside its own panel
            panel = ax.get_window_extent(renderer)
            assert panel.y0 - 2 <= box.y0 and box.y1 <= panel.y1 + 2


def map_axes(fig) -> dict[str, object]:
    """The cells of an example-maps figure by label: "input:<id>" and "map:<id>:<method>:<column>"."""
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label().startswith(("input:", "map:"))}


def smallest_text_px(fig, display_px: int = 1366) -> float:
    """The smallest visible text of a figure in screen pixels on the report page: points at the page's
    dpi, scaled down when the figure is wider than the page (1400-px window less the body margins)."""
    from tasks.report import FIGURE_DPI

    fig.draw_without_rendering()
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
             if t.get_visible() and t.get_text().strip()]
    shrink = min(1.0, display_px / (fig.get_figwidth() * FIGURE_DPI))
    return min(t.get_fontsize() for t in texts) * FIGURE_DPI / 72 * shrink


def test_example_maps_one_column_group_per_image_methods_as_rows_readable_labels():
    """Issue 23: three images side by side (each headed by its input), methods as rows in the matrix's
    order, at most MAPS_PER_IMAGE columns per image (the original, the first, a middle and the last
    state), every label at least 10 px on the page."""
    columns = ["original"] + [f"{k:02d}:{name}" for k, name in enumerate(LAYERS)] + ["04:extra"]
    ids = ["img0", "img1", "img2"]
    methods = ("gradcampp/signed", "gradient", "<b>odd</b>")
    maps = {i: {m: [torch.randn(8, 8) * (k + 1) for k in range(len(columns))] for m in methods} for i in ids}
    fig = report.example_maps_figure(maps, columns, {i: torch.rand(1, 8, 8) for i in ids}, title="MPRT")
    cells = map_axes(fig)
    assert [label for label in cells if label.startswith("input:")] == [f"input:{i}" for i in ids]
    assert all(cells[f"input:{i}"].images[0].get_cmap().name == "gray" for i in ids)
    shown = ["original", "00:fc", "02:layer4.1.conv1", "04:extra"]  # the first, a middle and the last state
    rows = list(dict.fromkeys(label.split(":", 2)[2].rsplit(":", 2)[0] for label in cells if label.startswith("map:")))
    assert rows == ["gradient", "gradcampp/signed", "<b>odd</b>"]  # families in the matrix's order, unknown last
    assert len(cells) == len(ids) * (1 + len(methods) * len(shown))
    assert all(f"map:{i}:{m}:{c}" in cells for i in ids for m in methods for c in shown)
    first_row = [cells[f"map:{i}:gradient:{c}"] for i in ids for c in shown]
    assert [ax.get_title() for ax in first_row] == ["original", "fc", "…er4.1.conv1", "extra"] * len(ids)  # 12 chars
    left = [cells[f"map:{i}:gradient:original"].get_position().x0 for i in ids]
    assert left == sorted(left)  # image groups side by side, in order
    assert "showing 3 of 5 states per image" in fig.get_suptitle()
    texts = {t.get_text() for t in fig.texts}
    assert set(ids) <= texts and "gradient\n(signed)" in texts and "input" in texts
    for ax in (a for label, a in cells.items() if label.startswith("map:")):
        low, high = ax.images[0].get_clim()
        data = np.asarray(ax.images[0].get_array())
        assert low == -high and high == pytest.approx(np.abs(data).max())
    assert smallest_text_px(fig) >= 10.0


PAPER_FOUR = ["gradient", "gradcampp/signed", "lrp_epsilon_plus_flat", "edge_sobel"]


def test_example_maps_of_the_report_show_three_images_at_readable_size():
    """tasks.report_run.map_grids: the first EXAMPLE_IMAGES stored images of four, one grid per test;
    the longest method name of the paper still leaves every label at 10 px."""
    from tasks import report_run
    from tasks.storage import maps_schema, tensor_column

    states = ["original"] + [f"{k:02d}:{name}" for k, name in enumerate(LAYERS)]
    keys = [(f"img{i}", m, "original" if s == "original" else "mprt", s, max(k - 1, 0))
            for i in range(4) for m in PAPER_FOUR for k, s in enumerate(states)]
    table = pa.table({"run_id": ["r"] * len(keys), "shard": [0] * len(keys), "image_id": [k[0] for k in keys],
                      "method": [k[1] for k in keys], "test": [k[2] for k in keys], "state": [k[3] for k in keys],
                      "state_index": [k[4] for k in keys], "target_class": [1] * len(keys),
                      "map": tensor_column(np.random.default_rng(0).normal(size=(len(keys), 6, 6)))},
                     schema=maps_schema(6, 6))
    (fig,) = report_run.map_grids(table, {"img0": torch.rand(1, 6, 6)}).values()
    cells = map_axes(fig)
    assert [label for label in cells if label.startswith("input:")] == ["input:img0", "input:img1", "input:img2"]
    assert not cells["input:img1"].images  # input not available: an empty cell, the maps still drawn
    assert len(cells) == 3 * (1 + len(PAPER_FOUR) * report.MAPS_PER_IMAGE)
    assert smallest_text_px(fig) >= 10.0


def test_map_grid_of_one_image_subsamples_columns_keeping_first_and_last():
    columns = ["original"] + [f"{k:02d}:l{k}" for k in range(19)]
    maps = {"gradient": [torch.full((4, 4), float(i)) - 0.5 for i in range(len(columns))]}
    fig = report.map_grid_figure(maps, columns, image=torch.rand(3, 4, 4), max_columns=6)
    cells = map_axes(fig)
    assert len(cells) == 1 + 6
    titles = [ax.get_title() for label, ax in cells.items() if label.startswith("map:")]
    assert titles[0] == "original" and titles[1] == "l0" and titles[-1] == "l18"
    assert "showing 5 of 19 states" in fig.get_suptitle()
    assert cells["input:"].images[0].get_array().shape == (4, 4, 3)


def test_map_grid_rejects_a_wrong_number_of_maps():
    with pytest.raises(ValueError, match="'gradient' has 1 maps but there are 2 columns"):
        report.map_grid_figure({"gradient": [torch.zeros(4, 4)]}, ["original", "00:fc"])


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def manifest(methods=METHODS) -> Manifest:
    """A manifest as the planner types it (tasks.manifest.Manifest): every field, so a renamed field
    fails here rather than in a page that guesses."""
    states = [f"{k:02d}:{name}" for k, name in enumerate(LAYERS)]
    return Manifest(
        run_id="abc", run_name="cnn-mnist-abc", created="2026-11-27T00:00:00+0000", code_version="abc123",
        code_hash="0" * 16, libraries={"torch": "2"}, config={"methods": {"ids": list(methods), "batch_size": 32}},
        identity={}, model="cnn", dataset="mnist", n_images=6, image_ids_sha256="0" * 64, shard_content=[], num_classes=10,
        methods=list(methods), tests=["class_sensitivity", "mprt", "emprt"], seeds={"seed": 0},
        randomization={"order": "cascade_top_down", "granularity": "module", "init": "reset", "sigma": 0.01,
                       "bn_stats": "keep", "target": "original", "seeds": [0, 1]},
        cam_layer="layer4", verdict_rules=VerdictRules(retention=0.5, min_gap=0.2).as_dict(), layers=LAYERS[::-1],
        states=states, shards=[], dataset_failures=0)


def run_tables(**kwargs) -> tuple[pa.Table, pa.Table, pa.Table]:
    scores = scores_table(tests=("mprt", "class_sensitivity", "emprt"), metrics=("ssim", "spearman_abs"), **kwargs)
    summary = summarize(scores, n_boot=200)
    return summary, verdicts(summary), comparisons(scores, n_boot=200)


def test_write_report_writes_index_and_valid_pngs_with_escaped_names(tmp_path):
    methods = ["gradient", "a<b&c", "edge_sobel", "random"]
    summary = summary_table(methods=methods, tests=("mprt", "class_sensitivity", "emprt"),
                            metrics=("ssim", "spearman_abs"))
    grid = report.map_grid_figure({"gradient": [torch.randn(6, 6), torch.randn(6, 6)]}, ["original", "00:fc"])
    judged = verdicts(summary)
    index = page_report.write_report(summary, tmp_path / "report", verdicts=judged,
                                     manifest=manifest(methods), map_grids={"image 0": grid})
    assert index == tmp_path / "report" / "index.html"
    files = page_report.written_files(index)
    names = sorted(path.name for path in files)
    assert names == sorted(["index.html", "mprt_ssim.png", "mprt_spearman_abs.png", "class_sensitivity_ssim.png",
                            "class_sensitivity_spearman_abs.png", "emprt_entropy_rise.png", "maps_image_0.png",
                            "summary.csv", "verdicts.csv"])
    for path in files[1:]:
        if path.suffix == ".png":
            _assert_png(path)
    page = index.read_text(encoding="utf-8")
    assert "a&lt;b&amp;c" in page and "a<b&c" not in page
    assert "<dd>mnist</dd>" in page and "<dd>6</dd>" in page and "<dd>cnn</dd>" in page
    assert "0.280 ± 0.000" in page and "0.100 [0.100, 0.100]" in page  # gradient's s and R at the head state
    assert str(tmp_path) not in page  # links are relative
    # every figure is embedded, so the page is one file (MLflow's artifact view shows it as it is)
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 6 and all(base64.b64decode(data).startswith(PNG_SIGNATURE) for data in embedded)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing external
    csv = (tmp_path / "report" / "verdicts.csv").read_text().splitlines()
    assert len(csv) == judged.num_rows + 1 and csv[0].startswith('"model","method","test","scope"')


def test_run_line_and_details_read_the_manifest(tmp_path):
    summary, verdict, _ = run_tables()
    page = page_report.write_report(summary, tmp_path, verdicts=verdict, manifest=manifest()).read_text(encoding="utf-8")
    header = page[page.index("<body>"):page.index("<h2>")]
    line = re.search(r'<p class="runline">([^<]+)</p>', header).group(1)
    assert line == "cnn on mnist · 6 images · CAM layer layer4 · randomisation seeds 0, 1 · 2026-11-27 · code abc123"
    assert f"<dd>{', '.join(METHODS)}</dd>" in header and "batch_size" not in header and "{" not in header
    assert "<dt>CAM layer</dt><dd>layer4</dd>" in header
    assert "seeds 0, 1" in header and "CI_low(R) &gt; 0.5" in header and "&lt; 0.2" in header


def matrix_cells(page: str) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]], list[str]]:
    """The verdict matrix of a page: its (test, scope) columns, per method the (verdict, text) of each
    cell, and the family labels in order."""
    table = re.search(r'<table class="matrix" id="verdict-matrix">.*?</table>', page, re.S).group()
    columns = re.findall(r'<th data-test="([^"]+)" data-scope="([^"]+)">', table)
    rows = {}
    for method, cells in re.findall(r'<th class="method">([^<]+)</th>(.*?)</tr>', table, re.S):
        rows[html.unescape(method)] = [(verdict, re.sub(r"<[^>]+>", "", text).strip())
                                       for verdict, text in re.findall(r'<td class="(\w+)"[^>]*>(.*?)</td>', cells)]
    families = re.findall(r'<th class="family" rowspan="\d+">([^<]+)</th>', table)
    return columns, rows, families


def test_verdict_matrix_groups_methods_by_family_with_r_and_ci(tmp_path):
    summary, verdict, _ = run_tables()
    page = page_report.write_report(summary, tmp_path, verdicts=verdict, manifest=manifest()).read_text(encoding="utf-8")
    matrix = page.index('id="verdict-matrix"')
    assert matrix < page.index("<figure") and matrix < page.index("<details><summary>All")
    columns, rows, families = matrix_cells(page)
    assert columns == [("class_sensitivity", "min"), ("class_sensitivity", "random"), ("class_sensitivity", "second"),
                       ("mprt", "head"), ("mprt", "cascade"), ("emprt", "full")]
    assert families == ["plain gradient", "aggregation", "controls"]
    assert list(rows) == ["gradient", "gradcampp/signed", "gradcampp", "edge_sobel", "random"]  # signed first
    assert rows["gradient"][3] == ("pass", "pass 0.10 [0.10, 0.10]")
    assert rows["gradcampp"][0] == ("fail", "fail 0.90 [0.90, 0.90]")
    assert rows["gradcampp/signed"][0][0] == "inconclusive"
    assert rows["random"][0] == ("uninformative", "uninfo r − c 0.05")
    assert rows["gradient"][5][0] == "pass" and rows["gradient"][5][1].startswith("pass 0.27 [")
    assert "Controls behave" in page and "Warning" not in page
    # every cell agrees with verdicts.parquet's row at the headline metric (ssim)
    for r in verdict.to_pylist():
        if r["metric"] in ("ssim", "entropy_rise"):
            assert rows[r["method"]][columns.index((r["test"], r["scope"]))][0] == r["verdict"]


def reading_items(page: str) -> dict[str, tuple[str, str]]:
    """The reading of a page, a list: per item (data-item) its label and its text without the detail."""
    block = re.search(r'<ul class="reading" id="reading">(.*?)</ul>', page, re.S).group(1)
    items = re.findall(r'<li data-item="([^"]+)"><strong>([^<]+):</strong> (.*?)</li>', block, re.S)
    return {key: (html.unescape(label), html.unescape(text)) for key, label, text in items}


def test_reading_is_a_short_list_what_fails_passes_is_inconclusive_and_the_paired_result(tmp_path):
    """Issue 23: the reading is a list, not a paragraph repeating the matrix column by column: methods
    (not cells) under fails / passes / inconclusive, then the paired result and the caveats."""
    summary, verdict, paired = run_tables()
    page = page_report.write_report(summary, tmp_path, verdicts=verdict, comparisons=paired,
                                    manifest=manifest()).read_text(encoding="utf-8")
    assert '<p class="reading"' not in page
    items = reading_items(page)
    assert list(items) == ["fail", "pass", "inconclusive", "paired", "emprt", "sign"]
    assert [label for label, _ in items.values()][:4] == ["Fails", "Passes", "Inconclusive", "Paired"]
    assert items["fail"][1] == "1 of 3 methods: gradcampp — Class sensitivity (min, random, second) and MPRT (head, cascade)."
    assert items["pass"][1] == "1 of 3 methods pass every Class sensitivity and MPRT verdict: gradient."
    assert items["inconclusive"][1].startswith("1 of 3 methods fail nothing but do not pass everything: gradcampp/signed — ")
    n_pairs = sum(r["metric"] == "ssim" for r in paired.to_pylist())
    n_more = sum(r["metric"] == "ssim" and r["significant"] and r["mean_difference"] > 0 for r in paired.to_pylist())
    assert (f"keeps significantly more of its map than its signed twin in {n_more} of {n_pairs} comparisons"
            in items["paired"][1])
    assert "Controls" not in page[page.index('id="reading"'):page.index("</ul>", page.index('id="reading"'))]


def test_reading_marks_threshold_sensitive_verdicts_sign_disagreements_and_reads_emprt_as_complexity(tmp_path):
    """SPEC §4 / issue 19: a verdict that changes at R threshold ± spread gets † in the matrix and on the
    method in the reading, the cells named in a detail; where ssim and the sign-invariant spearman_abs
    disagree, the reading names the methods (the cells in a detail); eMPRT is read as a rise in map
    complexity, and its disagreement with MPRT over the cascade is named."""
    from saliency.statistics import VERDICT_SCHEMA

    summary, verdict, paired = run_tables()
    rows = verdict.to_pylist()
    for r in rows:
        if (r["method"], r["test"], r["scope"]) == ("gradcampp", "class_sensitivity", "min") and r["metric"] == "ssim":
            r.update(verdict_at_low="inconclusive", threshold_sensitive=True)
        if (r["method"], r["test"], r["scope"], r["metric"]) == ("gradient", "mprt", "head", "spearman_abs"):
            r.update(verdict="fail")
        if (r["method"], r["test"]) == ("gradient", "emprt"):
            r.update(verdict="fail")
    edited = pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA)
    page = page_report.write_report(summary, tmp_path, verdicts=edited, comparisons=paired,
                                    manifest=manifest()).read_text(encoding="utf-8")
    _, cells, _ = matrix_cells(page)
    assert cells["gradcampp"][0] == ("fail", "fail 0.90 [0.90, 0.90] †")
    assert "†" not in cells["gradcampp"][1][1]
    items = reading_items(page)
    assert items["fail"][1].startswith("1 of 3 methods: gradcampp † — ")
    assert "gradient." in items["pass"][1] and "†" not in items["pass"][1]
    label, text = items["sensitive"]
    assert label == "Threshold-sensitive †" and text.startswith("1 of 15 verdicts change at the R threshold ± its spread")
    assert ("<details><summary>the cells</summary>gradcampp class_sensitivity/min fail (inconclusive / fail).</details>"
            in page)
    assert items["sign"][1].startswith("spearman_abs (a sign flip is no change) disagrees with ssim in 1 of 15 cells, "
                                       "for gradient.")
    assert "gradient mprt/head (ssim pass, spearman_abs fail)" in html.unescape(page)
    assert items["emprt"][1].startswith("2 pass, 1 fail (gradient). eMPRT measures a rise in map complexity")
    assert "gradient (eMPRT fail, MPRT pass)" in items["emprt"][1]
    assert 'title="fail: CI_low(R) = 0.900 &gt; 0.5; threshold-sensitive: inconclusive at the lower threshold' in page


def test_a_failing_control_is_shown_as_a_warning(tmp_path):
    summary, verdict, _ = run_tables(levels=LEVELS | {"edge_sobel": 0.1})
    page = page_report.write_report(summary, tmp_path, verdicts=verdict).read_text(encoding="utf-8")
    warning = re.search(r'<div class="controls warning" id="controls">.*?</div>', page, re.S).group()
    assert "edge_sobel — class_sensitivity min (ssim): expected fail, got <strong>pass</strong>" in warning
    assert "<li>edge_sobel" in warning and "<li>random" not in warning and "Controls behave" not in page
    assert page.index("controls warning") < page.index("<figure")
    assert "the verdicts are suspect" in page


def test_the_controls_banner_states_each_check_and_never_contradicts_the_matrix(tmp_path):
    """Gradient fails eMPRT, which is not a control check: the banner said "Controls behave … gradient
    passes" right above that red cell. Now it says which checks it made (gradient: class sensitivity
    and the head-randomised MPRT), names gradient's eMPRT verdict as not a check, and lists every check
    with what was expected and what happened."""
    from saliency.statistics import VERDICT_SCHEMA, control_checks

    summary, verdict, _ = run_tables()
    rows = verdict.to_pylist()
    for r in rows:
        if (r["method"], r["test"]) == ("gradient", "emprt"):
            r.update(verdict="fail")
    edited = pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA)
    page = page_report.write_report(summary, tmp_path, verdicts=edited).read_text(encoding="utf-8")
    banner = html.unescape(re.search(r'<div class="controls ok" id="controls">(.*?)</div>', page, re.S).group(1))
    checks = control_checks(edited)
    assert banner.startswith(f"Controls behave: all {len(checks)} checks hold, as expected edge_sobel fails in "
                             "class_sensitivity (min, random, second), mprt (head, cascade), emprt (full); "
                             "random is uninformative in ")
    assert "; gradient passes in class_sensitivity (min, random, second), mprt (head)." in banner
    assert "Not control checks: gradient mprt cascade: pass; gradient emprt full: fail." in banner
    listed = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>"
                        r'<td class="[a-z]+">([^<]+)</td></tr>', banner)
    assert listed == [(c["control"], c["test"], c["scope"], c["metric"], c["expected"], c["verdict"])
                      for c in checks]


def test_paired_table_puts_variants_under_their_signed_method(tmp_path):
    summary, verdict, paired = run_tables()
    page = page_report.write_report(summary, tmp_path, verdicts=verdict, comparisons=paired).read_text(encoding="utf-8")
    assert page.index('id="verdict-matrix"') < page.index('<table class="paired">') < page.index("<figure")
    table = re.search(r'<table class="paired">.*?</table>', page, re.S).group()
    rows = re.findall(r'<tr class="(signed|variant)"><th>([^<]+)</th>(.*?)</tr>', table, re.S)
    assert [(role, method) for role, method, _ in rows] == [("signed", "gradcampp/signed"), ("variant", "gradcampp")]
    heads = re.findall(r"<th>([^<]+)<br><small>([^<(]+)", table)
    assert [(t, s.strip()) for t, s in heads] == [("Class sensitivity", "min"), ("Class sensitivity", "random"),
                                                 ("Class sensitivity", "second"),
                                                 ("Model parameter randomisation (MPRT)", "head"),
                                                 ("Model parameter randomisation (MPRT)", "cascade")]
    row = next(r for r in paired.to_pylist() if (r["test"], r["scope"], r["metric"]) == ("mprt", "head", "ssim"))
    variant_cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[1][2])
    headline, invariant = re.findall(r'<span class="(\w+)" data-metric="([^"]+)"><small>[^<]+</small> (.*?)</span>',
                                     variant_cells[3], re.S)
    assert headline[:2] == ("fail", "ssim") and invariant[:2] == ("fail", "spearman_abs")  # both metrics, headline first
    assert headline[2].startswith("0.90 [0.90, 0.90]<br><small>ΔR +0.40, p ")
    assert f"r {row['rank_biserial']:+.2f}" in headline[2]
    full = re.search(r"<summary>All paired comparisons.*?</details>", page, re.S).group()
    assert re.search(r"<td>gradcampp vs gradcampp/signed</td><td>mprt</td><td>head</td><td>ssim</td><td>6</td>"
                     r"<td>0.900</td><td>0.500</td><td>0.400 \[[-0-9.]+, [-0-9.]+\]</td>", full)
    empty = page_report.write_report(summary, tmp_path / "none", verdicts=verdict).read_text(encoding="utf-8")
    assert '<table class="paired">' not in empty


def test_write_report_survives_edge_cases(tmp_path):
    summary = summary_table(methods=["gradcampp/signed"], tests=("class_sensitivity",))
    nan_row = pa.Table.from_pylist([dict(model="cnn", method="gradcampp/signed", test="class_sensitivity",
                                         state="min", state_index=0, metric="spearman_abs", n=0)],
                                   schema=SUMMARY_SCHEMA)
    index = page_report.write_report(pa.concat_tables([summary, nan_row]), tmp_path)
    names = sorted(path.name for path in page_report.written_files(index))
    assert names == ["class_sensitivity_spearman_abs.png", "class_sensitivity_ssim.png", "index.html", "summary.csv"]
    assert "gradcampp/signed" in index.read_text(encoding="utf-8")
    empty = page_report.write_report(summary_table(tests=()), tmp_path / "empty")
    assert [p.name for p in page_report.written_files(empty)] == ["index.html", "summary.csv"]


def test_verdict_matrix_figure_colours_each_cell_by_its_verdict():
    rows = [("plain gradient", "gradient", [("pass", "pass 0.10 [0.05, 0.15]"), None]),
            ("aggregation", "gradcampp", [("fail", "fail 0.90 [0.85, 0.95]"), ("uninformative", "uninformative")])]
    fig = report.verdict_matrix_figure(rows, ["Class sensitivity\nmin", "MPRT\nhead"], title="a run")
    (ax,) = fig.axes
    faces = [mcolors.to_hex(patch.get_facecolor()) for patch in ax.patches]
    assert faces == [report.VERDICT_COLOURS[v][0] for v in ("pass", "fail", "uninformative")]  # None: no cell
    texts = [t.get_text() for t in ax.texts]
    assert {"pass 0.10 [0.05, 0.15]", "fail 0.90 [0.85, 0.95]", "gradient", "gradcampp", "a run",
            "plain gradient", "aggregation", "MPRT\nhead"} <= set(texts)


def test_map_cells_are_diverging_for_signed_rows_and_sequential_for_non_negative_ones():
    signed = [torch.tensor([[-1.0, 2.0], [0.0, 0.5]]), torch.tensor([[0.0, 1.0], [3.0, 0.0]])]
    positive = [torch.tensor([[1.0, 4.0], [2.0, 0.0]]), torch.zeros(2, 2)]
    fig = report.map_grid_figure({"gradcam": signed, "gradcampp": positive}, ["original", "00:fc"],
                                 image=torch.rand(3, 2, 2))
    cells = map_axes(fig)
    assert [ax.images[0].get_cmap().name for ax in cells.values()] == ["viridis", report.MAP_CMAP, report.MAP_CMAP,
                                                                     report.SEQUENTIAL_CMAP, report.SEQUENTIAL_CMAP]
    assert cells["map::gradcam:original"].images[0].get_clim() == (-2.0, 2.0)
    assert cells["map::gradcam:00:fc"].images[0].get_clim() == (-3.0, 3.0)
    assert cells["map::gradcampp:original"].images[0].get_clim() == (0.0, 4.0)
    assert cells["map::gradcampp:00:fc"].images[0].get_clim() == (0.0, 1.0)  # all zero: white, not saturated
    texts = {t.get_text() for t in fig.texts}
    assert "gradcam\n(signed)" in texts and "gradcampp\n(≥ 0)" in texts
    assert "white at 0" in report.MAP_NORMALISATION and "own maximum" in report.MAP_NORMALISATION


def test_paper_figure_shows_the_complete_pairs_per_image_and_names_what_is_missing():
    ids = ["img0", "img1"]
    pairs = {(i, m, s): np.full((4, 4), 1.0) for i in ids for m in ("gradcampp", "gradcampp/signed")
             for s in ("original", "min")}
    pairs[("img0", "gradcampp/signed", "min")] = -np.ones((4, 4))
    fig = report.paper_figure({"img0": torch.rand(1, 4, 4), "img1": None}, pairs)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["input", "gradcampp\ntop class", "gradcampp\nmin class", "gradcampp/signed\ntop class",
                      "gradcampp/signed\nmin class"]  # only the complete GradCAM++ group
    inputs = [ax for ax in fig.axes if ax.get_ylabel() in ids]
    assert [len(ax.images) for ax in inputs] == [1, 0]  # img1's input is not available: an empty cell
    maps = [ax for ax in fig.axes if ax.images and ax not in inputs]
    assert len(maps) == 2 * 4
    cmaps = [ax.images[0].get_cmap().name for ax in maps]  # row-major: img0's four maps, then img1's
    assert cmaps[:4] == [report.SEQUENTIAL_CMAP] * 2 + [report.MAP_CMAP] * 2  # signed: one map has negatives
    with pytest.raises(ValueError, match="none is complete"):
        report.paper_figure({"img0": None}, {("img0", "gradient", "original"): np.zeros((4, 4))})


def test_mprt_small_multiples_one_panel_per_family_with_the_controls_dashed_in_each():
    from saliency.methods import PAPER_METHODS

    panels = report.mprt_panels(PAPER_METHODS)
    assert [title for title, _ in panels] == ["plain gradient", "aggregation: gradcam", "aggregation: gradcampp",
                                              "aggregation: fullgrad", "propagation", "LRP"]
    assert all(len(members) <= report.MAX_PANEL_LINES and members[-2:] == ["edge_sobel", "random"]
               for _, members in panels)
    assert sorted(m for _, members in panels for m in members[:-2]) == sorted(set(PAPER_METHODS) - {"edge_sobel", "random"})
    methods = ["gradient", "smoothgrad", "gradcam", "gradcam/pos", "edge_sobel", "random"]
    fig = report.mprt_small_multiples(summary_table(methods=methods, levels=LEVELS | {"gradcam/pos": 0.9}), "ssim")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2 * 2  # two families, R above the raw similarity
    r_gradient, r_cam = axes[0], axes[1]
    assert r_gradient.get_legend().get_title().get_text() == "plain gradient"
    for ax in axes:
        lines = labelled_lines(ax)
        assert lines["edge_sobel"].get_linestyle() == "--" and lines["random"].get_linestyle() == "--"
        assert len([name for name in lines if name in methods]) <= report.MAX_PANEL_LINES
        assert len(ax.collections) == len([name for name in lines if name in methods])  # a CI band per line
    assert set(labelled_lines(r_cam)) >= {"gradcam", "gradcam/pos"} and "gradient" not in labelled_lines(r_cam)
    cam_lines = labelled_lines(r_cam)
    assert cam_lines["gradcam/pos"].get_linestyle() == "-." and cam_lines["gradcam"].get_linestyle() == "-"
    bottom = axes[2]
    assert [t.get_text() for t in bottom.get_xticklabels()] == LAYERS  # state 0 (logits side) first
    np.testing.assert_allclose(labelled_lines(r_cam)["gradcam/pos"].get_ydata(),
                               [retention_at("gradcam/pos", k, LEVELS | {"gradcam/pos": 0.9}) for k in range(len(LAYERS))])
    with pytest.raises(ValueError, match="several models"):
        report.mprt_small_multiples(pa.concat_tables([summary_table(model="a"), summary_table(model="b")]), "ssim")


def test_the_reading_says_where_a_new_test_disagrees_with_class_sensitivity_and_mprt():
    """Issue 20 item 4: a test read by its value (deletion here) or by retention from another side (data
    randomisation) is read against class sensitivity and MPRT:
    methods that fail there and pass here, or pass all of theirs and fail here, are named."""
    from saliency.statistics import VERDICT_SCHEMA
    from tasks.report_content import reading

    def row(method, test, scope, metric, verdict):
        return {"model": "m", "method": method, "test": test, "scope": scope, "state": scope, "state_index": 0,
                "metric": metric, "n": 10, "n_seeds": 1, "mean": 0.1, "ci_low": 0.0, "ci_high": 0.2,
                "verdict": verdict, "reason": "", "verdict_at_low": verdict, "verdict_at_high": verdict,
                "threshold_sensitive": False}

    classic = {"gradient": ("pass", "pass"), "gradcampp": ("fail", "pass"), "lrp_epsilon": ("pass", "pass"),
               "guided_backprop": ("fail", "fail")}
    deletion = {"gradient": "pass", "gradcampp": "pass", "lrp_epsilon": "fail", "guided_backprop": "fail"}
    data = {"gradient": "pass", "gradcampp": "pass", "lrp_epsilon": "inconclusive", "guided_backprop": "fail"}
    rows = []
    for method, (cs, head) in classic.items():
        rows += [row(method, "class_sensitivity", "min", "ssim", cs), row(method, "mprt", "head", "ssim", head),
                 row(method, "deletion", "gain", "srg_gain", deletion[method]),
                 row(method, "data_randomization", "label_randomised", "ssim", data[method])]
    items = {item["key"]: item["text"] for item in reading(pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA), None)}
    assert items["deletion"] == ("2 pass, 2 fail (guided_backprop, lrp_epsilon). Against class sensitivity and MPRT: "
                                 "agrees for 2 methods; passes here but fails there for 1: gradcampp; fails here "
                                 "but passes all of theirs for 1: lrp_epsilon.")
    # a retention test from another side (data randomisation) is read against them too; inconclusive left out
    assert items["data_randomization_agreement"] == ("Against class sensitivity and MPRT: agrees for 2 methods; "
                                                     "passes here but fails there for 1: gradcampp.")
