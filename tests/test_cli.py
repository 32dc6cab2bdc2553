"""The saliency-sanity command line (typer, in-process) against real services."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import Config
from saliency.methods import available_methods

runner = CliRunner()
TINY_SETS = ["data.limit=6", "methods.ids=gradient,edge_sobel", "compute.images_per_shard=3",
             "compute.batch_size=3", "metrics.names=ssim", "metrics.n_boot=20", "tests.others=min",
             "storage.sample_images=1"]


def test_help_on_every_command():
    for command in ([], ["run"], ["report"], ["methods"], ["runs"], ["config"], ["train-reference"], ["serve"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_methods_lists_every_method_id():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for method_id in available_methods():
        assert re.search(rf"^{re.escape(method_id)} +(cam|gradient|propagation|lrp|control) ", result.output,
                         re.MULTILINE), method_id


def test_config_prints_the_documented_default():
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    assert Config.model_validate(yaml.safe_load(result.output)) == Config()
    assert result.output.count("  # ") == sum(len(type(getattr(Config(), name)).model_fields)
                                              for name, field in Config.model_fields.items() if name != "seed")


def test_run_with_a_bad_setting_exits_2_naming_the_field(tmp_path):
    result = runner.invoke(app, ["run", "--out", str(tmp_path), "--set", "tests.others=max"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "tests.others" in result.output and "'min', 'random' or 'second'" in result.output
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.slow
def test_run_then_runs_then_report(prefect_server, ray_local, tmp_path, monkeypatch):
    """`run` prints where the results are and how to open MLflow; `runs` lists it; `report` rewrites it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "results"
    sets = [arg for s in TINY_SETS for arg in ("--set", s)]
    result = runner.invoke(app, ["run", "--out", str(out), *sets, "--no-progress"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    run_dir = next(out.glob("reference-mnist-*"))
    assert f"results:   {run_dir}" in result.output
    mlflow_id = re.search(r"MLflow run ([0-9a-f]{32})", result.output).group(1)
    assert f"mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db" in result.output
    assert (run_dir / "report" / "index.html").is_file() and (out / "mlflow.db").is_file()

    listed = runner.invoke(app, ["runs", "--out", str(out)], env={"COLUMNS": "250"})
    assert listed.exit_code == 0, listed.output
    assert mlflow_id in listed.output and "FINISHED" in listed.output

    (run_dir / "report" / "index.html").unlink()
    rendered = runner.invoke(app, ["report", str(run_dir)])
    assert rendered.exit_code == 0, rendered.output
    assert (run_dir / "report" / "index.html").is_file()
    assert any(Path(run_dir / "report").glob("mprt_*.png"))


def test_runs_and_report_explain_a_missing_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["runs", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "no tracking store" in result.output
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "summary.parquet" in result.output


@pytest.mark.slow
def test_train_reference_reports_the_cached_model(prefect_server):
    from saliency.models import load_reference

    load_reference()  # cached by now in any session that ran the pipeline; trains it otherwise
    result = runner.invoke(app, ["train-reference"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "loaded from cache" in result.output and "accuracy" in result.output
