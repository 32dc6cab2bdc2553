"""Issue 11, cases 8-11: runs that never hang on tracking, fail fast on errors a retry would repeat,
stop when asked (SIGINT, SIGTERM) and leave no processes behind (SIGKILL). Real MLflow, Prefect, Ray
and CLI subprocesses where signals matter."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.storage import RunDir

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"data": {"limit": 4}, "methods": {"ids": ["gradient", "edge_sobel"]},
         "metrics": {"names": ["ssim"], "n_boot": 20}, "tests": {"others": ["min"]},
         "compute": {"images_per_shard": 2, "batch_size": 2, "actors": 1},
         "storage": {"store_maps": "none", "report": False}, "tracking": {"enabled": False}}


def small(**sections) -> dict:
    config = json.loads(json.dumps(SMALL))
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


# ------------------------------------------------------------------------------------ case 10: MLflow
@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers: a hung tracking server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_an_unreachable_tracking_server_is_refused_before_compute(prefect_server, silent_server, tmp_path):
    from flows.sanity_check import sanity_check
    from tasks.tracking import REACH_TIMEOUT, TrackingUnavailable

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: connection refused
    for uri in (silent_server, refused):
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable, match=rf"the MLflow tracking server {uri} did not answer within "
                                                      r"5 s .*nothing was computed.*saliency-sanity track RUN_DIR"):
            sanity_check(config=small(tracking={"enabled": True, "uri": uri}), out=str(tmp_path))
        assert time.monotonic() - started < REACH_TIMEOUT + 5, uri
        assert list(tmp_path.iterdir()) == []  # no run directory: nothing planned or computed
    closed.close()


@pytest.mark.slow
def test_track_logs_a_finished_run_once(prefect_server, ray_local, tmp_path, monkeypatch):
    """A run made without tracking (or whose tracking failed at the end) is logged later by `track`;
    tracking it twice leaves one MLflow run with the run's metrics."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.sanity_check import sanity_check
    from tasks.tracking import metric_rows

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    outcome = sanity_check(config=small(), out=str(tmp_path))
    assert outcome["mlflow_run_id"] is None and not (tmp_path / "mlflow.db").exists()
    runner = CliRunner()
    first = runner.invoke(app, ["track", outcome["run_dir"]], env={"COLUMNS": "250"})
    again = runner.invoke(app, ["track", outcome["run_dir"]], env={"COLUMNS": "250"})
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    run_id = first.output.split("logged as MLflow run ")[1].split()[0]
    assert again.output.strip() == f"already logged as MLflow run {run_id}"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("saliency-sanity")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [run_id] and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert metrics["run/images"] == 4 and metrics["run/score_rows"] == outcome["stats"]["score_rows"]
    logged = metric_rows(RunDir(outcome["run_dir"]).read_table("summary.parquet"))
    assert {name for name, _, _ in logged} <= set(metrics)
    curve = client.get_metric_history(run_id, "mprt/gradient/ssim")
    assert len(curve) == sum(name == "mprt/gradient/ssim" for name, _, _ in logged) > 1  # once, not twice
    assert runs[0].data.tags["run_dir"] == outcome["run_dir"]


HALF_MADE_STORE = """
import sys
import mlflow.store.db.utils as db_utils
from tasks.tracking import ensure_sqlite_store

def killed_midway(engine):  # the first tables exist, then the process dies (as under SIGKILL)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE experiments (experiment_id INTEGER, name VARCHAR(256))")
    import os
    os._exit(9)

db_utils._initialize_tables = killed_midway
ensure_sqlite_store(sys.argv[1])
"""


def test_a_store_killed_while_being_created_does_not_break_the_next_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import ensure_sqlite_store

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    killed = subprocess.run([sys.executable, "-c", HALF_MADE_STORE, uri], cwd=ROOT, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert killed.returncode == 9, killed.stderr.decode()[-2000:]
    assert not (tmp_path / "mlflow.db").exists()  # the half-made schema stayed in its temporary file
    stale = [path.name for path in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(".mlflow.db.") and stale[0].endswith(".tmp")

    ensure_sqlite_store(uri)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mlflow.db"]  # the dead creator's file is gone
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    client.log_metric(run.info.run_id, "m", 1.0, step=2)
    assert client.get_metric_history(run.info.run_id, "m")[0].step == 2


# ------------------------------------------------------------------------------------ case 11: fail fast
def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A CLI subprocess with its own Prefect home, its own local Ray and the test models importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    return {**env, "PREFECT_HOME": str(home), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra}


def cli_run(config: dict, out: Path, *args: str) -> list[str]:
    config_file = out.parent / f"{out.name}.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    return [sys.executable, "-m", "flows.cli", "run", str(config_file), "--out", str(out), "--no-progress", *args]


@pytest.mark.slow
def test_an_error_every_shard_would_repeat_is_not_retried(tmp_path):
    """A model whose backward raises fails the first shard: one attempt (no Prefect retries, no other
    shard started), exit 1, one line naming the error, no traceback, no advice to re-run."""
    count = tmp_path / "backward-calls"
    config = small(data={"limit": 8}, methods={"ids": ["gradient"]}, compute={"retries": 2},
                   model={"name": "models_for_tests:broken_backward"})
    out = tmp_path / "out"
    started = time.monotonic()
    done = subprocess.run(cli_run(config, out), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=cli_env(tmp_path, SALIENCY_TEST_COUNT_FILE=str(count)))
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    print(f"failed in {seconds:.1f} s")
    # one attempt of shard 0 (2 images): the batch, then each image alone; nothing retried or started after
    assert len(count.read_text().splitlines()) == 3
    failed = [line for line in done.stdout.splitlines() if "run failed" in line]
    assert failed == ["run failed: a shard failed with an error that re-running would repeat (ValueError: this "
                      "model's backward is broken); not retried, the run stopped: fix its cause (config, model "
                      "or data); 0 finished shard(s) are kept (--verbose for details)"]
    assert "resume" not in done.stdout and "second line" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not list(out.rglob("*.parquet"))
