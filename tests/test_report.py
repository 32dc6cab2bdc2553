"""Report figures and HTML (SPEC.md §4) on small synthetic tables in the contract's schemas."""
from __future__ import annotations

import math

import matplotlib.colors as mcolors
import numpy as np
import pyarrow as pa
import pytest
import torch
from matplotlib.container import BarContainer

from saliency import report

SUMMARY_SCHEMA = pa.schema([("model", pa.string()), ("method", pa.string()), ("test", pa.string()),
                            ("state", pa.string()), ("state_index", pa.int32()), ("metric", pa.string()),
                            ("n", pa.int64()), ("mean", pa.float64()), ("std", pa.float64()),
                            ("ci_low", pa.float64()), ("ci_high", pa.float64())])
SCORE_SCHEMA = pa.schema([("run_id", pa.string()), ("shard", pa.int32()), ("image_id", pa.string()),
                          ("label", pa.int64()), ("model", pa.string()), ("method", pa.string()),
                          ("test", pa.string()), ("state", pa.string()), ("state_index", pa.int32()),
                          ("target_class", pa.int64()), ("metric", pa.string()), ("value", pa.float64())])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ["fc", "layer4.1.conv2", "layer4.1.conv1", "conv1"]
METHODS = ["gradient", "gradcampp/signed", "gradcampp", "edge_sobel", "random"]


def summary_table(methods=METHODS, layers=LAYERS, mprt=True, class_sensitivity=True, emprt=False,
                  metrics=("ssim",), model="cnn", nan_at=None) -> pa.Table:
    """A summary in SUMMARY_SCHEMA: rows deliberately not in state order, means that differ per method."""
    rows = []

    def add(method, test, state, index, metric, mean):
        rows.append(dict(model=model, method=method, test=test, state=state, state_index=index, metric=metric,
                         n=8, mean=mean, std=0.1, ci_low=mean - 0.05, ci_high=mean + 0.05))

    for m, method in enumerate(methods):
        for metric in metrics:
            if mprt:
                for k in reversed(range(len(layers))):
                    mean = math.nan if nan_at == (method, k) else 0.9 - 0.1 * k - 0.01 * m
                    add(method, "mprt", f"{k:02d}:{layers[k]}", k, metric, mean)
            if class_sensitivity:
                for j, other in enumerate(("min", "random", "second")):
                    add(method, "class_sensitivity", other, j, metric, 0.95 if method == "edge_sobel" else 0.3 + 0.1 * j)
        if emprt:
            for k in range(len(layers)):
                add(method, "emprt", f"{k:02d}:{layers[k]}", k, "entropy_rise", 0.1 * k + 0.01 * m)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def labelled_lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_mprt_curve_draws_one_line_per_method_in_state_order():
    fig = report.mprt_curve_figure(summary_table(metrics=("spearman_abs", "ssim")), metric="ssim")
    (ax,) = fig.axes
    lines = labelled_lines(ax)
    assert set(lines) == set(METHODS) | {"original (identical map)"}
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
    # y follows state_index order although the rows came in reverse order
    np.testing.assert_allclose(lines["gradient"].get_ydata(), [0.9, 0.8, 0.7, 0.6])
    np.testing.assert_allclose(lines["original (identical map)"].get_ydata(), [1.0, 1.0])
    assert len(ax.collections) == len(METHODS)  # one CI band per method
    assert fig.legends and not ax.get_legend()  # one legend, outside the axes


def test_mprt_controls_are_dashed_grey_and_black_references():
    lines = labelled_lines(report.mprt_curve_figure(summary_table(), "ssim").axes[0])
    for control, colour in (("edge_sobel", "0.55"), ("random", "black")):
        assert lines[control].get_linestyle() == "--"
        assert mcolors.same_color(lines[control].get_color(), colour)
    assert lines["gradient"].get_linestyle() == "-"
    assert not any(mcolors.same_color(lines["gradient"].get_color(), c) for c in ("0.55", "black"))


def test_mprt_thins_tick_labels_of_many_states_keeping_both_ends():
    layers = [f"block{i}.conv" for i in range(60)]
    ax = report.mprt_curve_figure(summary_table(layers=layers, class_sensitivity=False), "ssim").axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) <= report.MAX_TICK_LABELS
    assert labels[0] == "block0.conv" and labels[-1] == "block59.conv"
    assert labels == sorted(labels, key=lambda name: int(name[5:-5]))


def test_mprt_nan_mean_leaves_a_gap_and_single_method_works():
    summary = summary_table(methods=["gradcampp/signed"], nan_at=("gradcampp/signed", 2))
    lines = labelled_lines(report.mprt_curve_figure(summary, "ssim").axes[0])
    y = lines["gradcampp/signed"].get_ydata()
    assert np.isnan(y[2]) and np.isfinite(np.delete(y, 2)).all()


def test_mprt_panel_per_model_or_one_chosen_model():
    both = pa.concat_tables([summary_table(model="a"), summary_table(model="b")])
    assert len(report.mprt_curve_figure(both, "ssim").axes) == 2
    assert len(report.mprt_curve_figure(both, "ssim", model="b").axes) == 1


def test_figures_name_the_missing_rows():
    with pytest.raises(ValueError, match="no mprt rows.*'pearson'"):
        report.mprt_curve_figure(summary_table(), metric="pearson")
    with pytest.raises(ValueError, match="no emprt rows"):
        report.entropy_figure(summary_table())


def test_class_sensitivity_grouped_bars_with_controls_and_edge_level():
    fig = report.class_sensitivity_figure(summary_table(), metric="ssim")
    (ax,) = fig.axes
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(containers) == 3 and all(len(c) == len(METHODS) for c in containers)
    assert [c.get_label() for c in containers] == ["other class: min", "other class: random", "other class: second"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gradcampp", "gradcampp/signed", "gradient",
                                                            "edge_sobel", "random"]
    np.testing.assert_allclose([bar.get_height() for bar in containers[1]], [0.4, 0.4, 0.4, 0.95, 0.4])
    hatched = [[bool(bar.get_hatch()) for bar in c] for c in containers]
    assert all(h == [False, False, False, True, True] for h in hatched)
    edge = [line for line in ax.get_lines() if line.get_label().startswith("edge_sobel level")]
    assert len(edge) == 1 and np.allclose(edge[0].get_ydata(), 0.95)
    assert len(ax.patches) - 3 * len(METHODS) == 2  # the two shaded control groups
    assert all(len(c.errorbar.lines[2]) == 1 for c in containers)  # CI error bars


def test_entropy_figure_one_bar_per_method_at_the_last_state():
    ax = report.entropy_figure(summary_table(emprt=True)).axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    heights = dict(zip([t.get_text() for t in ax.get_xticklabels()], [b.get_height() for b in bars]))
    assert set(heights) == set(METHODS)
    assert heights["gradient"] == pytest.approx(0.3)  # 0.1 * last index 3


def test_map_grid_has_rows_times_columns_and_symmetric_limits_per_cell():
    columns = ["original"] + [f"{k:02d}:{name}" for k, name in enumerate(LAYERS)]
    maps = {method: [torch.randn(8, 8) * (i + 1) for i in range(len(columns))]
            for method in ("gradient", "gradcampp/signed", "<b>odd</b>")}
    fig = report.map_grid_figure(maps, columns, image=torch.rand(1, 8, 8), title="image 0")
    grid = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(grid) == 3 * (len(columns) + 1)
    assert grid[0].images[0].get_cmap().name == "gray"
    assert [ax.get_title() for ax in grid[1:len(columns) + 1]] == ["original"] + LAYERS
    cells = [ax for ax in grid if ax.images and ax.images[0].get_cmap().name == report.MAP_CMAP]
    assert len(cells) == 3 * len(columns)
    for ax in cells:
        low, high = ax.images[0].get_clim()
        data = np.asarray(ax.images[0].get_array())
        assert low == -high and high == pytest.approx(np.abs(data).max())
        assert data.min() < 0  # signed maps are not clipped


def test_map_grid_subsamples_columns_keeping_first_and_last():
    columns = ["original"] + [f"{k:02d}:l{k}" for k in range(19)]
    maps = {"gradient": [torch.full((4, 4), float(i)) - 0.5 for i in range(len(columns))]}
    fig = report.map_grid_figure(maps, columns, image=torch.rand(3, 4, 4), max_columns=6)
    grid = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(grid) == 1 + 6
    titles = [ax.get_title() for ax in grid[1:]]
    assert titles[0] == "original" and titles[-1] == "l18"
    assert "showing 6 of 20" in fig.get_suptitle()
    assert grid[0].images[0].get_array().shape == (4, 4, 3)


def test_map_grid_rejects_a_wrong_number_of_maps():
    with pytest.raises(ValueError, match="'gradient' has 1 maps but there are 2 columns"):
        report.map_grid_figure({"gradient": [torch.zeros(4, 4)]}, ["original", "00:fc"])


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_write_report_writes_index_and_valid_pngs_with_escaped_names(tmp_path):
    methods = ["gradient", "a<b&c", "edge_sobel", "random"]
    summary = summary_table(methods=methods, emprt=True, metrics=("ssim", "spearman_abs"))
    scores = pa.Table.from_pylist([dict(run_id="r", shard=0, image_id=str(i), label=1, model="cnn", method="gradient",
                                        test="mprt", state="00:fc", state_index=0, target_class=1, metric="ssim",
                                        value=0.5) for i in range(7)], schema=SCORE_SCHEMA)
    verdicts = pa.table({"method": ["a<b&c", "gradient"], "test": ["mprt", "mprt"], "metric": ["ssim", "ssim"],
                         "mean": [0.2, 0.97], "control_mean": [0.95, 0.95], "passes": [True, False]})
    grid = report.map_grid_figure({"gradient": [torch.randn(6, 6), torch.randn(6, 6)]}, ["original", "00:fc"])
    index = report.write_report(summary, tmp_path / "report", scores=scores, verdicts=verdicts,
                                manifest={"config": {"model": {"name": "cnn"}, "dataset": "mnist"}},
                                map_grids={"image 0": grid})
    assert index == tmp_path / "report" / "index.html"
    files = report.written_files(index)
    names = sorted(path.name for path in files)
    assert names == sorted(["index.html", "mprt_ssim.png", "mprt_spearman_abs.png", "class_sensitivity_ssim.png",
                            "class_sensitivity_spearman_abs.png", "emprt_entropy_rise.png", "maps_image_0.png"])
    for path in files[1:]:
        _assert_png(path)
    page = index.read_text(encoding="utf-8")
    assert "a&lt;b&amp;c" in page and "a<b&c" not in page
    assert all(method in page for method in ("gradient", "edge_sobel", "random"))
    assert '<td class="pass">pass</td>' in page and '<td class="fail">fail</td>' in page
    assert "<dd>mnist</dd>" in page and "<dd>7</dd>" in page and "<dd>cnn</dd>" in page
    assert "0.900 ± 0.100" in page and "[0.850, 0.950]" in page
    assert str(tmp_path) not in page  # links are relative


def test_write_report_survives_edge_cases(tmp_path):
    summary = summary_table(methods=["gradcampp/signed"], mprt=False, nan_at=None)
    nan_row = pa.Table.from_pylist([dict(model="cnn", method="gradcampp/signed", test="class_sensitivity",
                                         state="min", state_index=0, metric="spearman_abs", n=0, mean=None,
                                         std=None, ci_low=None, ci_high=None)], schema=SUMMARY_SCHEMA)
    index = report.write_report(pa.concat_tables([summary, nan_row]), tmp_path)
    names = sorted(path.name for path in report.written_files(index))
    assert names == ["class_sensitivity_spearman_abs.png", "class_sensitivity_ssim.png", "index.html"]
    assert "gradcampp/signed" in index.read_text(encoding="utf-8")
    empty = report.write_report(summary_table(mprt=False, class_sensitivity=False), tmp_path / "empty")
    assert report.written_files(empty) == [empty]
