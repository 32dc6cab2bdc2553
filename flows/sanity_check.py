"""The main job: config → shards → Ray actors → Parquet parts → summary → report → MLflow.

Re-running with the same config and ``out`` resumes: the run directory is named after the config's
content hash, shards whose scores part exists are skipped, and the final tables are the same as an
uninterrupted run's.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext
from itertools import islice
from typing import Any, Iterator

from prefect import flow, get_run_logger, runtime
from prefect.futures import as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from tasks.actor import ActorPool, actor_count
from tasks.aggregate import aggregate
from tasks.config import ConfigError, load_config
from tasks.explain import explain_shard
from tasks.plan import Plan, plan_shards
from tasks.report import render_report
from tasks.storage import RunDir, join
from tasks.tracking import track_mlflow, tracking_uri, ui_command

DEPLOYMENT_NAME = "nightly"
DEFAULT_CRON = "0 3 * * *"  # deployments/prefect.yaml and `saliency-sanity serve` use this schedule


@contextmanager
def ray_connection() -> Iterator[None]:
    """Use the connected Ray, else ``ray.init()``: $RAY_ADDRESS names a cluster, unset starts a local one."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


class ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        speed = task.completed / elapsed if elapsed else None
        return Text("– img/s" if not speed else f"{speed:.1f} img/s", style="cyan")


def shard_progress(enabled: bool) -> Progress | nullcontext:
    if not enabled:
        return nullcontext()
    return Progress(TextColumn("shards {task.fields[shards]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("images"), ImagesPerSecond(), TimeElapsedColumn())


def run_shards(plan: Plan, cfg, show_progress: bool) -> tuple[list[dict[str, Any]], float]:
    """Explain every pending shard on a pool of Ray actors, which write its parts; raise if any shard failed.

    As many shard tasks run as there are actors; each actor writes its shard's parts as soon as they are
    computed (so an interrupted run keeps them) and returns only counts, and the next shard is submitted.
    Returns the shards' metadata and the seconds from the actors being ready to the last shard written.
    """
    logger = get_run_logger()
    done_before = len(plan.shards) - len(plan.pending)
    results, errors = [], []
    with ray_connection():
        n_actors, use_gpu = actor_count(cfg, len(plan.pending))
        pool = ActorPool(cfg, plan.model, plan.run_id, n_actors, use_gpu, plan.run_dir)
        ready = time.perf_counter()
        logger.info("%d actors (%s) on nodes %s", n_actors, "GPU" if use_gpu else "CPU",
                    sorted({w["node"][:12] for w in pool.workers}))
        explain = explain_shard.with_options(retries=cfg.compute.retries)
        waiting = iter(plan.pending)
        running = {explain.submit(shard, pool) for shard in islice(waiting, n_actors)}
        try:
            with shard_progress(show_progress) as bar:
                if bar is not None:
                    job = bar.add_task("shards", total=sum(s.n_images for s in plan.pending),
                                       shards=f"{done_before}/{len(plan.shards)}")
                while running:
                    future = next(as_completed(list(running)))
                    running.remove(future)
                    following = next(waiting, None)
                    if following is not None:
                        running.add(explain.submit(following, pool))
                    try:
                        result = future.result()
                    except Exception as error:  # keep going: finished shards stay saved for a resume
                        errors.append(error)
                        continue
                    results.append(result)
                    logger.info("shard %d: %d images, %d rows, %d failures, %.1f s on node %s",
                                result["shard"], result["n_images"], result["rows"], result["failures"],
                                result["seconds"], result["node"][:12])
                    if bar is not None:
                        bar.update(job, advance=result["n_images"],
                                   shards=f"{done_before + len(results)}/{len(plan.shards)}")
            seconds = time.perf_counter() - ready
        finally:
            pool.shutdown()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(plan.pending)} shards failed (first: {errors[0]!r}); the "
                           "finished shards are saved: re-run with the same --out to resume") from errors[0]
    return results, seconds


#: The environment variable of a deployment's own config (prefect.yaml job_variables.env, or the
#: environment of `saliency-sanity serve`) listing the model factories its runs may import.
ALLOWED_FACTORIES_ENV = "SALIENCY_SANITY_ALLOWED_FACTORIES"


def check_factory_allowed(cfg, deployed: bool) -> None:
    """``model.name=pkg.module:function`` imports and runs code. Configs given to the CLI or the library
    are trusted input; a deployment's runs take parameters from whoever triggers them, so there a factory
    must be on the deployment's allow-list ($SALIENCY_SANITY_ALLOWED_FACTORIES, comma-separated)."""
    if not deployed or ":" not in cfg.model.name:
        return
    allowed = {name.strip() for name in os.environ.get(ALLOWED_FACTORIES_ENV, "").split(",") if name.strip()}
    if cfg.model.name not in allowed:
        raise ConfigError(f"config field `model.name`: the factory {cfg.model.name!r} is not on this "
                          f"deployment's allow-list (${ALLOWED_FACTORIES_ENV} = {sorted(allowed) or 'empty'}); "
                          "deployments run only the factories their own configuration allows")


def non_finite_maps(failures) -> dict[str, int]:
    """Per method, how many images had a non-finite map in some state (their scores are left out)."""
    images: dict[str, set] = {}
    for row in failures.to_pylist():
        if row["stage"] == "map" and row.get("method"):
            images.setdefault(row["method"], set()).add(row["image_id"])
    return {method: len(ids) for method, ids in sorted(images.items())}


@flow(name="sanity_check")
def sanity_check(config: str | dict[str, Any] | None = None, out: str | None = None,
                 overrides: list[str] | None = None, progress: bool = False,
                 allow_code_change: bool = False) -> dict[str, Any]:
    """Run the sanity checks of a config (a YAML path, a dict, or None = the embedded default).

    ``out`` (default: storage.out) holds the run directory ``<out>/<run name>``; ``overrides`` are
    ``key.path=value`` strings. Resuming a run directory made by other code or libraries is refused
    unless ``allow_code_change`` (recorded in the manifest). Returns where the results are and the run's
    counts.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    cfg = load_config(config, overrides or [])
    if out is not None:
        cfg.storage.out = out
    check_factory_allowed(cfg, deployed=runtime.deployment.id is not None)
    with RunDir(join(cfg.storage.out, cfg.run_name())).lock():  # a second run on it is refused
        plan = plan_shards(cfg, allow_code_change)
        logger.info("run %s: %d images in %d shards, %d to compute, %d layers", plan.run_dir, plan.n_images,
                    len(plan.shards), len(plan.pending), len(plan.manifest.layers))
        for index, reason in plan.rejected.items():
            logger.warning("shard %d: its stored parts are not trusted (%s); deleted, recomputing it", index, reason)
        results, compute_seconds = run_shards(plan, cfg, progress) if plan.pending else ([], 0.0)
        untrusted = plan.untrusted(cfg, plan.pending)
        if untrusted:
            raise RuntimeError("parts written by this run do not match the plan: " + "; ".join(
                f"shard {index}: {reason}" for index, reason in sorted(untrusted.items())))
        computed = sum(r["n_images"] for r in results)
        agg = aggregate(plan.run_dir, len(plan.shards), cfg.metrics.n_boot, cfg.seed, cfg.verdicts.rules(),
                        cfg.randomization.order)
        report_dir = render_report(plan.run_dir) if cfg.storage.report else None
        stats = {"images": plan.n_images, "images_computed": computed, "failures": agg.failures.num_rows,
                 "score_rows": agg.score_rows, "shards": len(plan.shards),
                 "shards_skipped": len(plan.shards) - len(plan.pending), "shards_rejected": len(plan.rejected),
                 "shard_seconds": compute_seconds,
                 "images_per_second": computed / compute_seconds if computed else 0.0,
                 "wall_seconds": time.perf_counter() - started,
                 "non_finite_maps": non_finite_maps(agg.failures)}
        mlflow_run_id = uri = None
        if cfg.tracking.enabled:
            uri = tracking_uri(cfg)
            mlflow_run_id = track_mlflow(cfg, plan.run_dir, plan.manifest, agg.summary, stats, agg.verdicts,
                                         report_dir, agg.comparisons)
        outcome = {
            "run_dir": str(plan.run_dir), "run_id": plan.run_id, "summary": plan.run_dir.file("summary.parquet"),
            "report": None if report_dir is None else plan.run_dir.file("report", "index.html"),
            "mlflow_run_id": mlflow_run_id, "tracking_uri": uri, "mlflow_ui": uri and ui_command(uri),
            "stats": stats,
            "shards": {r["shard"]: {k: r[k] for k in ("node", "pid", "seconds", "n_images", "failures")}
                       for r in results},
        }
        logger.info("results in %s; MLflow run %s (%s)", outcome["run_dir"], mlflow_run_id, outcome["mlflow_ui"])
        return outcome
