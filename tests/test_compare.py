"""`saliency-sanity compare`: two runs' verdicts side by side in the terminal and on a page, with the
same method's MPRT curves overlaid (synthetic runs through saliency.statistics, written as a run does)."""
from __future__ import annotations

import re

import pyarrow.parquet as pq
from typer.testing import CliRunner

from flows.cli import app
from saliency.statistics import summarize, verdicts
from test_report import LAYERS, LEVELS, METHODS, scores_table

runner = CliRunner()


def fake_run(directory, levels):
    """summary.parquet and verdicts.parquet of a run whose methods keep R = levels[method]."""
    directory.mkdir(parents=True)
    summary = summarize(scores_table(tests=("mprt", "class_sensitivity", "emprt"), levels=levels), n_boot=50)
    pq.write_table(summary, directory / "summary.parquet")
    pq.write_table(verdicts(summary), directory / "verdicts.parquet")
    return directory


def test_compare_prints_every_run_per_method_and_test_at_any_terminal_width(tmp_path):
    one = fake_run(tmp_path / "a" / "run-x", LEVELS)
    two = fake_run(tmp_path / "b" / "run-x", LEVELS | {"gradient": 0.9})  # same name: labelled with the parent
    result = runner.invoke(app, ["compare", str(one), str(two), "--out", str(tmp_path / "page")],
                           env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"[1] a/run-x: {one}" and lines[1] == f"[2] b/run-x: {two}"
    head = next(i for i, line in enumerate(lines) if line.startswith("method"))
    body = [line for line in lines[head + 1:] if not line.startswith("page:")]
    assert body[0].startswith("gradient ") and len(body) == len(METHODS) * 6  # 6 (test, scope) per method
    mprt_head = next(line for line in lines if re.search(r"\bmprt\s+head\b", line))
    assert "pass 0.10 [0.10, 0.10]" in mprt_head and "fail 0.90 [0.90, 0.90]" in mprt_head
    assert max(len(line) for line in lines) > 40  # nothing cut to the 40 columns of $COLUMNS
    for method in METHODS:
        assert any(line.startswith(method + " ") for line in lines), method
    page = (tmp_path / "page" / "index.html").read_text(encoding="utf-8")
    assert page.count('<div class="pass" title=') >= 2 and "a/run-x" in page and "b/run-x" in page
    assert re.search(r'<img src="data:image/png;base64,', page) and (tmp_path / "page" / "mprt_ssim_overlay.png").exists()


def test_compare_names_a_directory_that_is_not_a_run(tmp_path):
    one = fake_run(tmp_path / "run", LEVELS)
    result = runner.invoke(app, ["compare", str(one), str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert "nothing is not a finished run directory: it has no summary.parquet, verdicts.parquet" in result.output


def test_overlay_draws_one_line_per_run_in_each_method_panel():
    from saliency.plots import mprt_overlay_figure

    summaries = {"a": summarize(scores_table(tests=("mprt",)), n_boot=20),
                 "b": summarize(scores_table(tests=("mprt",), layers=LAYERS + ["extra"]), n_boot=20)}
    fig = mprt_overlay_figure(summaries)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["gradient", "gradcampp/signed", "gradcampp", "edge_sobel", "random"]
    gradient = {line.get_label(): line for line in panels[0].get_lines() if not line.get_label().startswith("_")}
    assert set(gradient) == {"a", "b"}
    assert gradient["a"].get_xdata()[-1] == 1.0 and gradient["b"].get_xdata()[-1] == 1.0  # logits 0 → input 1
    assert len(gradient["b"].get_xdata()) == len(LAYERS) + 1
