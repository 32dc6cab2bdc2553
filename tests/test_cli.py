"""The saliency-sanity command line (typer, in-process) against real services."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import Config
from saliency.methods import available_methods

runner = CliRunner()
TINY_SETS = ["data.limit=6", "methods.ids=gradient,edge_sobel", "compute.images_per_shard=3",
             "compute.batch_size=3", "metrics.names=ssim", "metrics.n_boot=20", "tests.class_sensitivity.others=min",
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

    def documented(model, depth: int) -> int:  # every field below the top level has its help above it
        count = 0
        for field in model.model_fields.values():
            nested = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            count += (depth > 0) + (documented(field.annotation, depth + 1) if nested else 0)
        return count

    assert result.output.count("  # ") == documented(Config, 0)
    assert "  mprt:\n    # run this test\n    enabled: true\n" in result.output  # a test's generated section


def test_run_with_a_bad_setting_exits_2_naming_the_field(tmp_path):
    result = runner.invoke(app, ["run", "--out", str(tmp_path), "--set", "tests.class_sensitivity.others=max"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "tests.class_sensitivity.others" in result.output and "'min', 'random' or 'second'" in result.output
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.slow
def test_run_then_runs_then_report(prefect_server, ray_local, tmp_path, monkeypatch):
    """`run` prints where the results are and how to open MLflow; `runs` lists it; `report` rewrites it.
    The run parses its config once and loads its dataset once in this process (the actors, in their own
    processes, load their own copy): the report takes the flow's tables, manifest and dataset."""
    import tasks.config
    import tasks.shards
    import flows.sanity_check

    calls = {"parse": 0, "load": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    parse = counted("parse", tasks.config.load_config)
    monkeypatch.setattr(tasks.config, "load_config", parse)
    monkeypatch.setattr(flows.sanity_check, "load_config", parse)
    monkeypatch.setattr(tasks.shards, "load_dataset", counted("load", tasks.shards.load_dataset))
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
    assert calls == {"parse": 1, "load": 1}

    listed = runner.invoke(app, ["runs", "--out", str(out)], env={"COLUMNS": "250"})
    assert listed.exit_code == 0, listed.output
    assert mlflow_id in listed.output and "FINISHED" in listed.output

    (run_dir / "report" / "index.html").unlink()
    rendered = runner.invoke(app, ["report", str(run_dir)])
    assert rendered.exit_code == 0, rendered.output
    assert (run_dir / "report" / "index.html").is_file()
    assert any(Path(run_dir / "report").glob("mprt_*.png"))


def _headline_fails(run_dir: Path) -> dict[tuple[str, str], list[str]]:
    """(test, scope) → the failing methods at the test's headline metric, read from verdicts.parquet."""
    import pyarrow.parquet as pq

    rows = pq.read_table(run_dir / "verdicts.parquet").to_pylist()
    values = {"emprt": "entropy_rise", "deletion": "srg_gain", "grid_pointing": "share"}  # tests read by value
    headline = {r["test"]: values.get(r["test"], "ssim") for r in rows}
    fails: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["metric"] == headline[r["test"]]:
            fails.setdefault((r["test"], r["scope"]), [])
            if r["verdict"] == "fail":
                fails[(r["test"], r["scope"])].append(r["method"])
    return fails


@pytest.mark.slow
def test_run_ends_with_the_verdicts_and_json_for_scripts(prefect_server, ray_local, tmp_path, monkeypatch):
    """The terminal ends with the answer: one line per test and scope naming the failing methods, the
    controls line, then the paths. `--json` (a resume of the same run here) prints one JSON object
    holding the same verdicts, nothing else on stdout."""
    from saliency.statistics import control_checks
    import pyarrow.parquet as pq

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "results"
    sets = [arg for s in TINY_SETS for arg in ("--set", s)]
    result = runner.invoke(app, ["run", "--out", str(out), *sets, "--no-progress"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    run_dir = next(out.glob("reference-mnist-*"))
    fails = _headline_fails(run_dir)
    assert {test for test, _ in fails} == {"class_sensitivity", "mprt", "emprt", "data_randomization", "deletion"}
    lines = result.output.splitlines()
    for (test, scope), methods in fails.items():
        assert any(line.startswith(f"fail  {test} {scope} (") and line.split(": ", 1)[1].split("  · ")[0]
                   == (", ".join(sorted(methods)) or "none") for line in lines), (test, scope, result.output)
    assert "edge_sobel" in fails[("class_sensitivity", "min")]
    checks = control_checks(pq.read_table(run_dir / "verdicts.parquet"))
    wrong = [c for c in checks if not c["ok"]]
    controls = next(line for line in lines if line.startswith("controls: "))
    assert controls == (f"controls: all {len(checks)} checks hold" if not wrong else controls)
    assert lines.index(controls) < next(i for i, line in enumerate(lines) if line.startswith("results:"))
    assert lines.index(controls) == max(i for i, line in enumerate(lines) if line.startswith("fail  ")) + 1

    scripted = runner.invoke(app, ["run", "--out", str(out), *sets, "--json"])
    assert scripted.exit_code == 0, scripted.output
    summary = json.loads(scripted.stdout)
    assert summary["run_dir"] == str(run_dir) and summary["stats"]["shards_skipped"] == 2
    assert summary["model"].startswith("model: trained weights; top-1 accuracy")
    columns = summary["verdicts"]["columns"]
    assert {(c["test"], c["scope"]): c["fail"] for c in columns} == {k: sorted(v) for k, v in fails.items()}
    for c in columns:
        assert set(c["methods"]) == {"gradient", "edge_sobel"}
        assert all(m["verdict"] in ("pass", "fail", "inconclusive", "uninformative") for m in c["methods"].values())
    assert summary["verdicts"]["controls"] == {"checks": len(checks), "hold": len(checks) - len(wrong),
                                               "wrong": [{k: c[k] for k in ("control", "test", "scope", "metric",
                                                                            "expected", "verdict")} for c in wrong]}


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
