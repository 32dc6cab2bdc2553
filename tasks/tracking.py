"""track_mlflow: one MLflow run per flow run — params, tags, summary metrics, MPRT curves, artifacts."""
from __future__ import annotations

import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
import threading
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
#: Seconds the end of a run may spend on tracking in all, whatever the server does (answers slowly, hangs,
#: fails and is retried): one overall deadline, not a timeout per request multiplied by retries.
TRACKING_DEADLINE = 60.0


class TrackingTimeout(TimeoutError):
    """The tracking server did not finish logging the run within TRACKING_DEADLINE."""


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
    """(name, value, step), the method first, so that MLflow's charts (one section per name's first
    segment) put a method's curves together: ``gradcampp/class_sensitivity/min/ssim`` (mean similarity)
    and ``…/ssim/R`` (mean retention) for the class test; one curve per (method, metric) with step =
    state index for curve tests (MPRT: ``gradcampp/mprt/ssim``, ``gradcampp/mprt/ssim/R``; eMPRT); the
    MPRT cascade mean as ``gradcampp/mprt_cascade/ssim/R``. A policy variant (``gradcampp/signed``)
    sits in its method's section."""
    rows = []
    for r in summary.to_pylist():
        curve = get_test(r["test"]).curve
        if curve and r["state_index"] >= 0:
            name, step = f"{r['method']}/{r['test']}/{r['metric']}", r["state_index"]
        elif curve:
            name, step = f"{r['method']}/{r['test']}_{r['state']}/{r['metric']}", 0
        else:
            name, step = f"{r['method']}/{r['test']}/{r['state']}/{r['metric']}", 0
        rows.append((name, r["mean"], step))
        if r["retention_mean"] is not None and math.isfinite(r["retention_mean"]):
            rows.append((f"{name}/R", r["retention_mean"], step))
    return rows


def verdict_rows(verdicts: pa.Table, comparisons: pa.Table | None) -> list[tuple[str, float, int]]:
    """Verdict counts (``verdicts/fail``, …, and ``verdicts/threshold_sensitive``), and the paper's
    comparison: mean ΔR per pair (``compare/gradcampp-vs-gradcampp_signed/class_sensitivity/min/ssim``)."""
    kinds = verdicts["verdict"].to_pylist()
    rows = [(f"verdicts/{kind}", float(kinds.count(kind)), 0) for kind in VERDICTS]
    rows.append(("verdicts/threshold_sensitive", float(sum(verdicts["threshold_sensitive"].to_pylist())), 0))
    for r in (comparisons.to_pylist() if comparisons is not None else []):
        pair = f"{r['variant']}-vs-{r['signed']}".replace("/", "_")
        rows.append((f"compare/{pair}/{r['test']}/{r['scope']}/{r['metric']}", r["mean_difference"], 0))
    return rows


def model_tags(manifest: Manifest) -> dict[str, str]:
    """``random_weights`` (true/false), ``model_outputs`` and ``model_check`` (the line the terminal and
    the report show), so a run of an untrained model is visible in the runs list."""
    check = manifest.model_check
    if check is None:
        return {}
    return {"random_weights": str(check.random_weights).lower(), "model_outputs": str(check.outputs),
            "model_check": check.describe()}


#: The experiment tag MLflow 3's UI reads to choose between its GenAI pages (traces, evaluations) and
#: its machine-learning pages (runs, metric charts); unset, it may infer GenAI.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
VERDICT_TABLE = "verdict_table.json"
"""The run's verdicts at each test's headline metric, logged with ``log_table`` (a table on the run page)."""


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created if need be, marked as a machine-learning experiment unless it is
    already marked otherwise (a user's choice is kept)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND[0] not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts next to the database, not in the working directory
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def verdict_table(verdicts: pa.Table) -> dict[str, list]:
    """Columns of the verdict table shown on the MLflow run page: one row per method, test and scope
    at the test's headline metric, in the report's order, with R [95% CI] (eMPRT: the value) and why."""
    from saliency.plots import method_groups
    from tasks.report_content import headline_metrics, matrix_cell, matrix_columns

    headline = headline_metrics(verdicts)
    rows = [r for r in verdicts.to_pylist() if r["metric"] == headline[r["test"]]]
    columns = {column: i for i, column in enumerate(matrix_columns(rows))}
    rank = {m: i for i, m in enumerate(m for _, ms in method_groups({r["method"] for r in rows}) for m in ms)}
    rows.sort(key=lambda r: (r["model"], rank[r["method"]], columns[(r["test"], r["scope"])]))
    cells = [matrix_cell(r) for r in rows]
    return {"model": [r["model"] for r in rows], "method": [r["method"] for r in rows],
            "test": [r["test"] for r in rows], "scope": [r["scope"] for r in rows],
            "metric": [r["metric"] for r in rows], "verdict": [r["verdict"] for r in rows],
            "R or value [95% CI]": [f"{c['label']} {c['value']}".strip() for c in cells],
            "reason": [r["reason"] for r in rows]}


def _local_copy(run_dir: RunDir, name: str, into: Path) -> Path | None:
    if not run_dir.exists(name):
        return None
    target = into / name
    with run_dir.fs.open_input_stream(run_dir.file(name)) as stream:
        target.write_bytes(stream.read())
    return target


@task(name="track_mlflow", cache_policy=NO_CACHE)
def track_mlflow(cfg: Config, run_dir: RunDir, manifest: Manifest, summary: pa.Table,
                 stats: dict[str, Any], verdicts: pa.Table | None = None,
                 report_dir: str | None = None, comparisons: pa.Table | None = None,
                 started_at: float | None = None) -> str:
    """Log the run within TRACKING_DEADLINE seconds; returns the MLflow run id. ``started_at`` (epoch
    seconds, default now) is when the flow started: the MLflow run is logged at the end but spans the
    whole run, so its duration is real. Not retried by Prefect: MLflow's client retries each request
    itself, and retries around it would multiply the time a failing server costs."""
    uri = tracking_uri(cfg)
    return within_deadline(lambda: log_run(cfg, run_dir, manifest, summary, stats, verdicts, report_dir,
                                           comparisons, started_at),
                           TRACKING_DEADLINE, f"the MLflow tracking server {uri} did not finish logging the run")


def within_deadline(work, seconds: float, what: str):
    """``work()``'s result, or TrackingTimeout after ``seconds``: the work runs in a daemon thread that is
    abandoned if it hangs (an HTTP call cannot be interrupted; the process may exit with it pending)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=target, name="mlflow-tracking", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TrackingTimeout(f"{what} within {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def log_run(cfg: Config, run_dir: RunDir, manifest: Manifest, summary: pa.Table, stats: dict[str, Any],
            verdicts: pa.Table | None, report_dir: str | None, comparisons: pa.Table | None,
            started_at: float | None) -> str:
    """One MLflow run: params, tags, metrics, artifacts (no deadline: track_mlflow sets it)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        ensure_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    tags = {"code_version": manifest.code_version, "model": cfg.model.name, "dataset": manifest.dataset,
            "run_dir": str(run_dir), "saliency_run_id": manifest.run_id, **model_tags(manifest)}
    if run_dir.exists("changes.json"):  # a later revision of a scheduled config: what changed since the previous
        changes = run_dir.read_json("changes.json")
        tags.update({"previous_run_dir": changes["previous"], "changed_since_previous": ", ".join(changes["what"]),
                     "verdicts_flipped": str(len(changes["flipped"]))})
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
        check = manifest.model_check
        if check is not None and check.accuracy is not None:
            values.append(("model/accuracy", check.accuracy, 0))
        values += [(f"run/non_finite_maps/{method}", float(n), 0)
                   for method, n in stats.get("non_finite_maps", {}).items()]
        if verdicts is not None:
            values += verdict_rows(verdicts, comparisons)
        metrics = [Metric(name, value if value is not None else math.nan, now, step)
                   for name, value, step in values]
        for start in range(0, len(metrics), BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + BATCH])
        if verdicts is not None and verdicts.num_rows:
            client.log_table(run_id, verdict_table(verdicts), VERDICT_TABLE)
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("manifest.json", "summary.parquet", "verdicts.parquet", "comparisons.parquet", "changes.json"):
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


# ------------------------------------------------------------------------ reachability, store, logging later
#: Seconds a tracking server gets to answer the check made before any compute.
REACH_TIMEOUT = 5.0


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or created; raised before any compute."""


def check_tracking(uri: str, timeout: float = REACH_TIMEOUT) -> None:
    """Before compute: an http(s) tracking server must answer within ``timeout`` seconds (any HTTP
    answer counts; MLflow's own client would retry an unreachable one for about ten minutes per call),
    and a SQLite store is created now, whole (see ensure_sqlite_store). Other stores are not checked."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # it answered
        except (OSError, ValueError) as error:  # refused, timed out, unknown host, bad URL
            reason = getattr(error, "reason", None) or error
            raise TrackingUnavailable(
                f"the MLflow tracking server {uri} did not answer within {timeout:.0f} s ({reason}); nothing was "
                "computed: start it, set tracking.uri, or run with tracking.enabled=false and log the run later "
                "with `saliency-sanity track RUN_DIR`") from None
    elif uri.startswith("sqlite:///"):
        try:
            ensure_sqlite_store(uri)
        except Exception as error:
            raise TrackingUnavailable(f"cannot create the MLflow store {uri}: {type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''}") from error


def ensure_sqlite_store(uri: str) -> None:
    """Create the SQLite tracking store with its full schema if it does not exist, so that a process
    killed while creating it cannot leave a half-made store (which breaks every later run with
    `duplicate column name`): the store is made in a temporary file in the same directory, which is
    then linked into place (a concurrent creator's complete store wins). Temporaries of dead creators
    are removed. The store is a copy of an empty one that MLflow's migrations made once per MLflow
    version in the cache (``empty_sqlite_store``): running them takes 6–7 s here, a copy a millisecond."""
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    try:
        empty = empty_sqlite_store()
    except OSError:  # no writable cache: migrate this store itself
        _create_whole(path, _migrated_schema)
    else:
        _create_whole(path, lambda temporary: shutil.copyfile(empty, temporary))


def empty_sqlite_store() -> Path:
    """An MLflow SQLite store with the full schema of the installed MLflow and nothing in it, made once
    (as ``ensure_sqlite_store`` makes a store) under the cache directory, keyed by MLflow's version."""
    from mlflow.version import VERSION

    from saliency.models import default_cache_dir

    empty = default_cache_dir() / f"mlflow-{VERSION}-empty.db"
    if not empty.exists():
        _create_whole(empty, _migrated_schema)
    return empty


def _migrated_schema(path: Path) -> None:
    """MLflow's own table creation and migrations, in a new SQLite file ``path``, quietly."""
    import mlflow.store.db.utils as db_utils

    chatty = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]  # INFO lines per table
    levels = [logger.level for logger in chatty]
    try:
        for logger in chatty:
            logger.setLevel(logging.WARNING)
        engine = db_utils.create_sqlalchemy_engine_with_retry(f"sqlite:///{path}")
        try:
            db_utils._initialize_tables(engine)
        finally:
            engine.dispose()
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)


def _create_whole(path: Path, make) -> None:
    """``make(temporary)`` in a temporary file beside ``path``, then link it into place (kept if another
    process linked its own first); temporaries of dead creators are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        owner = stale.name.removeprefix(f".{path.name}.").split(".")[0]
        if not (owner.isdigit() and Path(f"/proc/{owner}").exists()):
            stale.unlink(missing_ok=True)
    import uuid

    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        make(temporary)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def logged_run(client, experiment_id: str, run_dir: RunDir) -> str | None:
    """The id of a FINISHED MLflow run already logged for this run directory (tag ``run_dir``), if any."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.run_dir = '{run_dir}' and "
                              "attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def track_run_dir(run_dir: RunDir, uri: str | None = None, experiment: str | None = None) -> tuple[str, bool]:
    """Log a finished run directory to MLflow, e.g. after tracking failed at the end of its run; once
    only: if a finished MLflow run of this directory exists, nothing is logged. Returns (MLflow run id,
    whether it was logged now)."""
    from mlflow.tracking import MlflowClient

    from tasks.manifest import read_manifest

    manifest = read_manifest(run_dir)
    cfg = Config.model_validate(manifest.config)
    cfg.storage.out = str(Path(run_dir.location).parent) if run_dir.is_local else cfg.storage.out
    cfg.tracking.uri = uri or tracking_uri(cfg)
    cfg.tracking.experiment = experiment or cfg.tracking.experiment
    check_tracking(cfg.tracking.uri)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    existing = logged_run(client, _experiment_id(client, cfg.tracking.experiment, cfg.tracking.uri), run_dir)
    if existing is not None:
        return existing, False
    stats = run_dir.read_json("stats.json") if run_dir.exists("stats.json") else {}
    started_at = stats.pop("started_at", None)  # the MLflow run spans the real run, logged now or later
    optional = {name: run_dir.read_table(f"{name}.parquet") if run_dir.exists(f"{name}.parquet") else None
                for name in ("verdicts", "comparisons")}
    report = run_dir.file("report") if run_dir.is_local and run_dir.exists("report", "index.html") else None
    run_id = track_mlflow.fn(cfg, run_dir, manifest, run_dir.read_table("summary.parquet"), stats,
                             optional["verdicts"], report, optional["comparisons"], started_at=started_at)
    return run_id, True
