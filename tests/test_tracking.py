"""What MLflow shows of a run (issue 23, item 7), against a real MLflow on SQLite: the verdict table on the
run page, an experiment marked as machine learning (not GenAI), and metric names grouped by method."""
from __future__ import annotations

import pytest
import torch

from saliency.sanity import run_sanity
from saliency.statistics import summarize, verdicts
from tasks.config import load_config
from tasks.plan import build_manifest
from tasks.report_content import headline_metrics
from tasks.shards import load_configured_model, load_data, shard_ranges
from tasks.storage import RunDir
from tasks.tracking import EXPERIMENT_KIND, VERDICT_TABLE, log_run

METHODS = ["gradient", "gradcam/signed", "gradcam/abs", "edge_sobel"]


@pytest.fixture(scope="module")
def judged_run():
    """(config, manifest, summary, verdicts) of a real sanity run on 4 digits (an untrained small CNN)."""
    cfg = load_config({"model": {"name": "models_for_tests:untrained_cnn"}, "data": {"limit": 4},
                       "methods": {"ids": METHODS}, "metrics": {"names": ["ssim"]}, "tests": {"others": ["min"]}})
    dataset, model = load_data(cfg), load_configured_model(cfg)
    manifest = build_manifest(cfg, dataset, model, shard_ranges(len(dataset), 4))
    x = torch.stack([dataset[i].image for i in range(len(dataset))])
    summary = summarize(run_sanity(model, x, cfg.sanity_settings(manifest), image_ids=dataset.image_ids), n_boot=20)
    return cfg, manifest, summary, verdicts(summary)


def _log(judged_run, mlflow_sqlite, tmp_path, experiment: str) -> str:
    cfg, manifest, summary, judged = judged_run
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.uri, cfg.tracking.experiment = mlflow_sqlite.get_tracking_uri(), experiment
    return log_run(cfg, RunDir(str(tmp_path / "run")), manifest, summary, {}, judged, None, None, None)


def test_the_run_page_holds_the_verdict_table(judged_run, mlflow_sqlite, tmp_path):
    *_, judged = judged_run
    run_id = _log(judged_run, mlflow_sqlite, tmp_path, "t")
    table = mlflow_sqlite.load_table(VERDICT_TABLE, run_ids=[run_id])
    headline = headline_metrics(judged)
    expected = {(r["method"], r["test"], r["scope"]): r["verdict"] for r in judged.to_pylist()
                if r["metric"] == headline[r["test"]]}
    assert len(table) == len(expected)
    assert {(m, t, s): v for m, t, s, v in zip(table["method"], table["test"], table["scope"], table["verdict"])} \
        == expected
    assert list(dict.fromkeys(table["method"])) == ["gradient", "gradcam/signed", "gradcam/abs", "edge_sobel"]
    assert all(cell for cell in table["R or value [95% CI]"]) and all(table["reason"])


def test_the_experiment_is_marked_machine_learning_unless_marked_already(judged_run, mlflow_sqlite, tmp_path):
    client = mlflow_sqlite.tracking.MlflowClient()
    _log(judged_run, mlflow_sqlite, tmp_path, "t")  # made by the fixture, untagged
    assert client.get_experiment_by_name("t").tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    _log(judged_run, mlflow_sqlite, tmp_path, "new")  # created by the run
    assert client.get_experiment_by_name("new").tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    client.create_experiment("theirs", tags={EXPERIMENT_KIND[0]: "genai_development"})
    _log(judged_run, mlflow_sqlite, tmp_path, "theirs")
    assert client.get_experiment_by_name("theirs").tags[EXPERIMENT_KIND[0]] == "genai_development"


def test_metric_names_start_with_the_method(judged_run, mlflow_sqlite, tmp_path):
    """MLflow's charts are sectioned by a name's first segment: the method's, so its curves sit together
    (a policy variant in its method's section)."""
    cfg, manifest, summary, _ = judged_run
    run_id = _log(judged_run, mlflow_sqlite, tmp_path, "t")
    client = mlflow_sqlite.tracking.MlflowClient()
    names = client.get_run(run_id).data.metrics.keys()
    per_method = [name for name in names if not name.startswith(("verdicts/", "compare/", "run/", "model/"))]
    assert per_method and all(name.split("/")[0] in {"gradient", "gradcam", "edge_sobel"} for name in per_method)
    for method in METHODS:
        assert {f"{method}/class_sensitivity/min/ssim", f"{method}/mprt_cascade/ssim/R"} <= set(names), method
        curve = client.get_metric_history(run_id, f"{method}/mprt/ssim")
        assert sorted(m.step for m in curve) == list(range(len(manifest.states)))
