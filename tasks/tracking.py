"""track_mlflow: one MLflow run per flow run — params, tags, summary metrics, MPRT curves, artifacts."""
from __future__ import annotations

import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from saliency.sanity import get_test
from saliency.statistics import VERDICTS
from tasks.config import Config
from tasks.manifest import Manifest
from tasks.storage import RunDir, local_path

BATCH = 1000  # MLflow's limit of metrics per log_batch call


def tracking_uri(cfg: Config) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db (./mlflow.db when out is remote)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = local_path(cfg.storage.out) or Path.cwd()
    return f"sqlite:///{base / 'mlflow.db'}"


def ui_command(uri: str, port: int = 5000) -> str:
    """The command that opens the MLflow UI on this tracking store, runnable as printed: the ``mlflow``
    executable beside this Python (``python -m mlflow`` where there is none), so it works without the
    virtual environment being active."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    beside = Path(sys.executable).parent / "mlflow"
    program = [str(beside)] if beside.is_file() else [sys.executable, "-m", "mlflow"]
    return shlex.join([*program, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)])


def metric_rows(summary: pa.Table) -> list[tuple[str, float, int]]:
    """(name, value, step): ``class_sensitivity/min/gradcampp/ssim`` (mean similarity) and
    ``…/ssim/R`` (mean retention) for the class test; one curve per (method, metric) with step = state
    index for curve tests (MPRT: ``mprt/gradcampp/ssim``, ``mprt/gradcampp/ssim/R``; eMPRT); the MPRT
    cascade mean as ``mprt_cascade/gradcampp/ssim/R``."""
    rows = []
    for r in summary.to_pylist():
        curve = get_test(r["test"]).curve
        if curve and r["state_index"] >= 0:
            name, step = f"{r['test']}/{r['method']}/{r['metric']}", r["state_index"]
        elif curve:
            name, step = f"{r['test']}_{r['state']}/{r['method']}/{r['metric']}", 0
        else:
            name, step = f"{r['test']}/{r['state']}/{r['method']}/{r['metric']}", 0
        rows.append((name, r["mean"], step))
        if r["retention_mean"] is not None and math.isfinite(r["retention_mean"]):
            rows.append((f"{name}/R", r["retention_mean"], step))
    return rows


def verdict_rows(verdicts: pa.Table, comparisons: pa.Table | None) -> list[tuple[str, float, int]]:
    """Verdict counts (``verdicts/fail``, …), and the paper's comparison: mean ΔR per pair
    (``compare/gradcampp-vs-gradcampp_signed/class_sensitivity/min/ssim``)."""
    kinds = verdicts["verdict"].to_pylist()
    rows = [(f"verdicts/{kind}", float(kinds.count(kind)), 0) for kind in VERDICTS]
    for r in (comparisons.to_pylist() if comparisons is not None else []):
        pair = f"{r['variant']}-vs-{r['signed']}".replace("/", "_")
        rows.append((f"compare/{pair}/{r['test']}/{r['scope']}/{r['metric']}", r["mean_difference"], 0))
    return rows


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts next to the database, not in the working directory
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _local_copy(run_dir: RunDir, name: str, into: Path) -> Path | None:
    if not run_dir.exists(name):
        return None
    target = into / name
    with run_dir.fs.open_input_stream(run_dir.file(name)) as stream:
        target.write_bytes(stream.read())
    return target


@task(name="track_mlflow", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def track_mlflow(cfg: Config, run_dir: RunDir, manifest: Manifest, summary: pa.Table,
                 stats: dict[str, Any], verdicts: pa.Table | None = None,
                 report_dir: str | None = None, comparisons: pa.Table | None = None,
                 started_at: float | None = None) -> str:
    """Log the run; returns the MLflow run id. ``started_at`` (epoch seconds, default now) is when the
    flow started: the MLflow run is logged at the end but spans the whole run, so its duration is real."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    tags = {"code_version": manifest.code_version, "model": cfg.model.name, "dataset": manifest.dataset,
            "run_dir": str(run_dir), "saliency_run_id": manifest.run_id}
    run = client.create_run(_experiment_id(client, cfg.tracking.experiment, uri), run_name=cfg.run_name(),
                            tags=tags, start_time=None if started_at is None else int(started_at * 1000))
    run_id = run.info.run_id
    try:
        params = [Param(k, str(v)) for k, v in cfg.flat().items()] + [Param("cam_layer", str(manifest.cam_layer))]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start:start + 100])
        now = int(time.time() * 1000)
        values = metric_rows(summary) + [(f"run/{k}", float(v), 0) for k, v in stats.items()
                                         if isinstance(v, (int, float))]
        values += [(f"run/non_finite_maps/{method}", float(n), 0)
                   for method, n in stats.get("non_finite_maps", {}).items()]
        if verdicts is not None:
            values += verdict_rows(verdicts, comparisons)
        metrics = [Metric(name, value if value is not None else math.nan, now, step)
                   for name, value, step in values]
        for start in range(0, len(metrics), BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + BATCH])
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("manifest.json", "summary.parquet", "verdicts.parquet", "comparisons.parquet"):
                path = _local_copy(run_dir, name, Path(tmp))
                if path is not None:
                    client.log_artifact(run_id, str(path))
        if report_dir is not None:
            client.log_artifacts(run_id, report_dir, artifact_path="report")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id
