"""The main job: config → shards → Ray actors → Parquet parts → summary → report → MLflow.

Re-running with the same config and ``out`` resumes: the run directory is named after the config's
content hash, shards whose scores part exists are skipped, and the final tables are the same as an
uninterrupted run's.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from itertools import islice
from typing import Any, Iterator

from prefect import flow, get_run_logger, runtime
from prefect.futures import as_completed
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from flows.services import keep_stop_handlers
from saliency.sanity.mprt import randomization_seeds
from tasks.actor import ActorPool, actor_count
from tasks.aggregate import aggregate
from tasks.answer import CHANGES_FILE, change_lines, changes_since
from tasks.config import Config, ConfigError, load_config
from tasks.explain import describe, explain_shard, transient
from tasks.manifest import Manifest
from tasks.pieces import PiecesDiffer, into_pieces, write_pieces
from tasks.plan import Plan, RevisionChanged, plan_shards, revision_changes
from tasks.report_run import render_report
from tasks.storage import RunDir, join, next_revision, resource_error, resource_message, revision_dirs
from tasks.tracking import check_tracking, track_mlflow, track_run_dir, tracking_uri, ui_command

DEPLOYMENT_NAME = "nightly"  # deployments/prefect.yaml's (`prefect deploy`)
SERVED_DEPLOYMENT_NAME = "nightly-served"  # `saliency-sanity serve`'s: never the same, so neither replaces the other
DEFAULT_CRON = "0 3 * * *"  # deployments/prefect.yaml and `saliency-sanity serve` use this schedule


#: Ray settings of the local cluster a run starts itself. Its metrics agent serves Prometheus metrics
#: on every interface without the token (Ray's other ports ask for it): the run reads no metrics, so off.
LOCAL_RAY_SYSTEM_CONFIG = {"enable_metrics_collection": False}


class _NoAuthOptOutAdvice(logging.Filter):
    """Drops Ray's notice that token authentication is on, which ends "Set RAY_AUTH_MODE=disabled to opt
    out": a run must never advise switching authentication off. Authentication itself is untouched,
    and Ray's warning that it is *disabled* still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RAY_AUTH_MODE=disabled to opt out" not in record.getMessage()


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextmanager
def ray_connection() -> Iterator[None]:
    """Use the connected Ray, else ``ray.init()``: $RAY_ADDRESS names a cluster, unset starts a local one
    (without the metrics export: LOCAL_RAY_SYSTEM_CONFIG) — always a new one: Ray's own rule for no address
    joins the latest cluster started on the machine (`ray start`'s /tmp/ray/ray_current_cluster), someone
    else's perhaps. Quietly: Ray's INFO lines are off (its warnings stay) and so is its advice to opt out
    of authentication (_NoAuthOptOutAdvice)."""
    import ray

    started = not ray.is_initialized()
    if started:
        local = os.environ.get("RAY_ADDRESS", "") in ("", "local")  # a cluster's settings are its own
        auth_logger = logging.getLogger(RAY_AUTH_LOGGER)
        if not any(isinstance(f, _NoAuthOptOutAdvice) for f in auth_logger.filters):
            auth_logger.addFilter(_NoAuthOptOutAdvice())
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 **({"address": "local", "_system_config": LOCAL_RAY_SYSTEM_CONFIG} if local else {}))
        keep_stop_handlers()  # the CLI's SIGINT/SIGTERM handling, not Ray's exit with a stack dump
    try:
        yield
    finally:
        if started:
            ray.shutdown()


class ImagesPerSecond(ProgressColumn):
    """Images per second, or seconds per image below 0.1 img/s (a large model on a CPU)."""

    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        speed = task.completed / elapsed if elapsed else None
        if not speed:
            return Text("– img/s", style="cyan")
        return Text(f"{speed:.1f} img/s" if speed >= 0.1 else f"{1 / speed:.0f} s/img", style="cyan")


PROGRESS_SECONDS = 0.5  # how often the bar reads the actors' per-batch counts


@contextmanager
def shard_progress(enabled: bool, pool: ActorPool, images: int, shards: str,
                   seconds: float = PROGRESS_SECONDS) -> Iterator[tuple[Progress | None, Any]]:
    """(bar, task) of the run's progress bar, or (None, None). A thread moves the bar to the images the
    actors have explained, which they count after every batch: a shard of a large model takes minutes,
    and a bar that waited for whole shards sat at 0 meanwhile."""
    if not enabled:
        yield None, None
        return
    stop = threading.Event()
    with Progress(TextColumn("shards {task.fields[shards]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("images"), ImagesPerSecond(), TimeElapsedColumn(), TextColumn("left"),
                  TimeRemainingColumn()) as bar:
        job = bar.add_task("shards", total=images, shards=shards)

        def move() -> None:
            done = pool.images_done()
            if done is not None:
                bar.update(job, completed=done)

        def follow() -> None:
            while not stop.wait(seconds):
                move()

        thread = threading.Thread(target=follow, name="progress-bar", daemon=True)
        thread.start()
        try:
            yield bar, job
        finally:
            stop.set()
            thread.join()
            move()


@contextmanager
def phase(enabled: bool, doing: str) -> Iterator[None]:
    """Name a step after the compute on the terminal, then its seconds ("aggregating … 2.1 s"): the bar
    has ended and these steps take seconds to a minute."""
    if not enabled:
        yield
        return
    print(f"{doing} …", end="", flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" stopped", flush=True)
        raise
    print(f" {time.perf_counter() - start:.1f} s", flush=True)


def run_shards(plan: Plan, cfg, show_progress: bool) -> tuple[list[dict[str, Any]], float]:
    """Explain every pending shard on a pool of Ray actors, which write its parts; raise if any shard failed.

    As many shard tasks run as there are actors; each actor writes its shard's parts as soon as they are
    computed (so an interrupted run keeps them) and returns only counts, and the next shard is submitted.
    Returns the shards' metadata and the seconds from the actors being ready to the last shard written.
    """
    logger = get_run_logger()
    done_before = len(plan.shards) - len(plan.pending)
    results, errors = [], []
    n_states = len(plan.manifest.states)
    pieces: dict[int, list[dict[str, Any]]] = {}  # shard → its pieces computed so far (tasks.pieces)
    with ray_connection():
        n_actors, use_gpu = actor_count(cfg, len(plan.pending) * max(1, n_states))
        work = into_pieces(plan.pending, n_actors, cfg.compute.batch_size, plan.manifest.tests, n_states)
        n_actors = min(n_actors, len(work))
        pool = ActorPool(cfg, plan.model, plan.run_id, n_actors, use_gpu, plan.run_dir, plan.manifest)
        ready = time.perf_counter()
        logger.info("%d actors (%s%s) on nodes %s", n_actors, "GPU" if use_gpu else "CPU",
                    f", {pool.reused} kept from the run before" if pool.reused else "",
                    sorted({w["node"][:12] for w in pool.workers}))
        if len(work) > len(plan.pending):
            logger.info("fewer shards than actors: MPRT's %d states of each shard shared out to %d pieces",
                        n_states, work[0].pieces)
        explain = explain_shard.with_options(retries=cfg.compute.retries)
        waiting = iter(work)
        running = {explain.submit(shard, pool) for shard in islice(waiting, n_actors)}
        finished = False  # every shard ran and none failed: the actors may be kept (tasks.actor.kept_workers)
        try:
            with shard_progress(show_progress, pool, sum(s.n_images for s in plan.pending),
                                f"{done_before}/{len(plan.shards)}") as (bar, job):
                while running:
                    future = next(as_completed(list(running)))
                    running.remove(future)
                    try:
                        computed = future.result()
                    except Exception as error:
                        computed = None
                        errors.append(error)
                        if not transient(error) or resource_error(error):
                            break  # every other shard would repeat it: stop before starting another
                    following = next(waiting, None)
                    if following is not None:
                        running.add(explain.submit(following, pool))
                    if computed is None:
                        continue  # keep going: finished shards stay saved for a resume
                    if computed.get("pieces", 1) > 1 and "scores" in computed:  # a piece's tables
                        shard_pieces = pieces.setdefault(computed["shard"], [])
                        shard_pieces.append(computed)
                        if len(shard_pieces) < computed["pieces"]:
                            continue
                        try:
                            computed = write_pieces(plan.run_dir, pieces.pop(computed["shard"]),
                                                    randomization_seeds(cfg.sanity_settings(plan.manifest)),
                                                    plan.manifest.tests)
                        except PiecesDiffer as error:
                            logger.warning("shard %d computed whole: %s", computed["shard"], error)
                            running.add(explain.submit(plan.shards[computed["shard"]], pool))
                            continue
                    result = computed
                    results.append(result)
                    logger.info("shard %d: %d images, %d rows, %d failures, %.1f s on node %s%s",
                                result["shard"], result["n_images"], result["rows"], result["failures"],
                                result["seconds"], result["node"][:12],
                                f" ({result['pieces']} pieces)" if result.get("pieces", 1) > 1 else "")
                    if bar is not None:
                        bar.update(job, shards=f"{done_before + len(results)}/{len(plan.shards)}")
            seconds = time.perf_counter() - ready
            finished = not errors
        finally:
            pool.shutdown(keep=finished)
    if errors:
        raise shards_failed(errors, len(plan.pending), len(results))
    return results, seconds


def shards_failed(errors: list[Exception], pending: int, written: int) -> RuntimeError:
    """One line: what failed, and whether re-running can help. An error of the computation itself (a
    model or method raising on every image) is not retried and stops the run at once; re-running would
    repeat it. A full disk (or another resource) stops it too, but re-running resumes once it is freed."""
    last = errors[-1]
    full = resource_error(last)
    if full is not None:
        return RuntimeError(resource_message(full, written))
    if not transient(last):
        return RuntimeError(f"a shard failed with an error that re-running would repeat ({describe(last)}); not "
                            f"retried, the run stopped: fix its cause (config, model or data); {written} finished "
                            "shard(s) are kept")
    return RuntimeError(f"{len(errors)} of {pending} shards failed after retries (first: {describe(errors[0])}); "
                        "the finished shards are saved: re-run with the same --out to resume")


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


def plan_line(plan: Plan) -> str:
    """'6 imagefolder images in 2 shards (2 to compute); reference model loaded from the cache …', then
    the model's weights and accuracy on a line of its own."""
    shards = f"{len(plan.shards)} shard" + ("s" if len(plan.shards) != 1 else "")
    return (f"{plan.n_images} {plan.manifest.dataset} images in {shards} ({len(plan.pending)} to compute); "
            f"{plan.model_origin}\n{model_line(plan.manifest)}")


def model_line(manifest: Manifest) -> str:
    """'model: trained weights; top-1 accuracy 98.3% on 20 labelled images (chance 10.0%)'; a manifest
    from before the check says so."""
    check = manifest.model_check
    line = "model: " + (check.describe() if check is not None else "weights and accuracy not recorded")
    return (line + "".join(f"\nnot applicable to this model: {test} ({why})" for test, why in manifest.not_applicable.items())
            + "".join(f"\n{test}: {said}" for test, said in manifest.test_provenance.items()))


def non_finite_maps(failures) -> dict[str, int]:
    """Per method, how many images had a non-finite map in some state (their scores are left out)."""
    images: dict[str, set] = {}
    for row in failures.to_pylist():
        if row["stage"] == "map" and row.get("method"):
            images.setdefault(row["method"], set()).add(row["image_id"])
    return {method: len(ids) for method, ids in sorted(images.items())}


def track_or_explain(cfg, plan: Plan, agg, stats: dict[str, Any], report_dir,
                     started_at: float) -> tuple[str | None, str | None]:
    """(MLflow run id, None), or (None, why) when tracking fails at the end: the results are complete on
    disk by then, and `saliency-sanity track RUN_DIR` logs them later."""
    try:
        return track_mlflow(cfg, plan.run_dir, plan.manifest, agg.summary, stats, agg.verdicts, report_dir,
                            agg.comparisons, started_at=started_at), None
    except Exception as error:
        reason = first_line(error)
        get_run_logger().warning("MLflow tracking failed (%s); the results are complete in %s", reason, plan.run_dir)
        return None, reason


def first_line(error: BaseException) -> str:
    """'TrackingTimeout: the MLflow tracking server … did not answer': an error in one line."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


@flow(name="sanity_check")
def sanity_check(config: str | dict[str, Any] | Config | None = None, out: str | None = None,
                 overrides: list[str] | None = None, progress: bool = False,
                 allow_code_change: bool = False) -> dict[str, Any]:
    """Run the sanity checks of a config (a YAML path, a dict, a validated ``Config`` — the CLI's, so that a
    run parses its config once — or None = the embedded default).

    ``out`` (default: storage.out) holds the run directory ``<out>/<run name>``; ``overrides`` are
    ``key.path=value`` strings. Resuming a run directory made by other code or libraries is refused
    unless ``allow_code_change`` (recorded in the manifest). Returns where the results are and the run's
    counts.
    """
    logger = get_run_logger()
    started, started_at = time.perf_counter(), time.time()
    if isinstance(config, Config):
        if overrides:
            raise ValueError("overrides apply to a YAML path or a dict; a Config is already complete")
        cfg = config
    else:
        cfg = load_config(config, overrides or [])
    if out is not None:
        cfg.storage.out = out
    scheduled = runtime.deployment.id is not None
    check_factory_allowed(cfg, deployed=scheduled)
    if cfg.tracking.enabled:
        check_tracking(tracking_uri(cfg))  # an unreachable server is refused now, not after the compute
    name = cfg.run_name()
    # a scheduled run goes on in its config's latest revision; other code, weights or data start the next
    location = (revision_dirs(cfg.storage.out, name) or [join(cfg.storage.out, name)])[-1] if scheduled else \
        join(cfg.storage.out, name)
    while True:
        with RunDir(location).lock():  # a second run on it is refused
            try:
                plan = plan_shards(cfg, allow_code_change, location, revisions=scheduled)
            except RevisionChanged as change:
                location = next_revision(cfg.storage.out, name)
                logger.warning("%s: this scheduled run starts %s", change, location)
                continue
            return run_planned(cfg, plan, progress, started, started_at, scheduled)


def previous_revision(cfg, plan: Plan, scheduled: bool) -> RunDir | None:
    """The finished run directory of the same config before this one (scheduled runs), if any."""
    if not scheduled:
        return None
    dirs = [RunDir(d) for d in revision_dirs(cfg.storage.out, plan.manifest.run_name)]
    names = [str(d) for d in dirs]
    if str(plan.run_dir) not in names:
        return None
    earlier = [d for d in dirs[:names.index(str(plan.run_dir))] if d.exists("verdicts.parquet")]
    return earlier[-1] if earlier else None


def already_complete(cfg, plan: Plan, started: float) -> dict[str, Any] | None:
    """The outcome of a finished run re-triggered with the same code, weights, data and verdict rules: its
    stored results (and its MLflow run, logged now only if it never was); None when there is work to do."""
    if not plan.complete:
        return None
    mlflow_run_id, uri, tracking_error = None, None, None
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg)
        try:
            mlflow_run_id, _ = track_run_dir(plan.run_dir, uri, cfg.tracking.experiment)
        except Exception as error:
            tracking_error = first_line(error)
    stats = {**plan.run_dir.read_json("stats.json"), "images_computed": 0, "shards_skipped": len(plan.shards),
             "shards_rejected": 0, "shard_seconds": 0.0, "images_per_second": 0.0,
             "wall_seconds": time.perf_counter() - started}
    stats.pop("started_at", None)
    get_run_logger().info("already complete: %s (MLflow run %s): nothing computed", plan.run_dir, mlflow_run_id)
    changes = plan.run_dir.read_json(CHANGES_FILE) if plan.run_dir.exists(CHANGES_FILE) else None
    return run_outcome(plan, stats, plan.run_dir.exists("report", "index.html"), (mlflow_run_id, uri, tracking_error),
                       [], changes, already_complete=True)


def run_outcome(plan: Plan, stats: dict[str, Any], has_report: bool, tracking: tuple, results: list[dict],
                changes: dict[str, Any] | None, already_complete: bool = False) -> dict[str, Any]:
    """What the flow returns (the CLI prints it): where the results are, the counts, the MLflow run
    (``tracking`` = (run id, URI, error)), the shards computed now and what changed since the previous run."""
    mlflow_run_id, uri, tracking_error = tracking
    return {
        "run_dir": str(plan.run_dir), "run_id": plan.run_id, "summary": plan.run_dir.file("summary.parquet"),
        "report": plan.run_dir.file("report", "index.html") if has_report else None,
        "mlflow_run_id": mlflow_run_id, "tracking_uri": uri, "mlflow_ui": uri and ui_command(uri),
        "stats": stats, "model_origin": plan.model_origin, "model": model_line(plan.manifest),
        "tracking_error": tracking_error, "ignored_files": plan.strays,
        "shards": {r["shard"]: {**{k: r[k] for k in ("node", "pid", "seconds", "n_images", "failures")},
                                "pieces": r.get("pieces", 1), "pids": r.get("pids", [r["pid"]])} for r in results},
        "already_complete": already_complete, "changes": changes,
    }


def run_planned(cfg, plan: Plan, progress: bool, started: float, started_at: float,
                scheduled: bool) -> dict[str, Any]:
    """Compute the plan's pending shards, aggregate, report, track; the run's outcome."""
    logger = get_run_logger()
    logger.info("run %s: %d images in %d shards, %d to compute, %d layers", plan.run_dir, plan.n_images,
                len(plan.shards), len(plan.pending), len(plan.manifest.layers))
    finished = already_complete(cfg, plan, started)
    if finished is not None:
        return finished
    if progress:  # the terminal's first lines: what is about to run, counted from the plan
        print(plan_line(plan), flush=True)
    for path, message in plan.data_failures:  # one line each (the dataset's warnings are silenced)
        logger.warning("skipped image %s: %s", path, message)
    if plan.strays:
        logger.warning("%d file(s) in %s are not parts of this run and are ignored (never read): %s",
                       len(plan.strays), plan.run_dir, ", ".join(plan.strays))
    for index, reason in plan.rejected.items():
        logger.warning("shard %d: its stored parts are not trusted (%s); deleted, recomputing it", index, reason)
    results, compute_seconds = run_shards(plan, cfg, progress) if plan.pending else ([], 0.0)
    untrusted = plan.untrusted(cfg, plan.pending)
    if untrusted:
        raise RuntimeError("parts written by this run do not match the plan: " + "; ".join(
            f"shard {index}: {reason}" for index, reason in sorted(untrusted.items())))
    computed = sum(r["n_images"] for r in results)
    with phase(progress, "aggregating the scores (bootstrap CIs, verdicts)"):
        agg = aggregate(plan.run_dir, len(plan.shards), cfg.metrics.n_boot, cfg.seed, cfg.verdicts.rules(),
                        cfg.tests.options(), plan.manifest)
    previous = previous_revision(cfg, plan, scheduled)
    changes = None
    if previous is not None:  # what changed since the previous run of this config: terminal, report, MLflow
        changes = changes_since(str(previous), revision_changes(previous.read_json("manifest.json"),
                                                                plan.manifest.to_json()),
                                previous.read_table("verdicts.parquet"), agg.verdicts)
        plan.run_dir.write_json(changes, CHANGES_FILE)
        logger.warning("\n".join(change_lines(changes)))  # a served run's terminal is its log
    with phase(progress and cfg.storage.report, "writing the report"):
        report_dir = render_report(plan.run_dir, agg, plan.manifest, plan.dataset) if cfg.storage.report else None
    stats = {"images": plan.n_images, "images_computed": computed, "failures": agg.failures.num_rows,
             "score_rows": agg.score_rows, "shards": len(plan.shards),
             "shards_skipped": len(plan.shards) - len(plan.pending), "shards_rejected": len(plan.rejected),
             "shard_seconds": compute_seconds,
             "images_per_second": computed / compute_seconds if computed else 0.0,
             "wall_seconds": time.perf_counter() - started,
             "non_finite_maps": non_finite_maps(agg.failures),
             **({} if changes is None else {"verdicts_changed": len(changes["flipped"])})}
    plan.run_dir.write_json({**stats, "started_at": started_at}, "stats.json")  # for `track RUN_DIR`
    mlflow_run_id, uri, tracking_error = None, None, None
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg)
        with phase(progress, "logging to MLflow"):
            mlflow_run_id, tracking_error = track_or_explain(cfg, plan, agg, stats, report_dir, started_at)
    outcome = run_outcome(plan, stats, report_dir is not None, (mlflow_run_id, uri, tracking_error), results, changes)
    logger.info("results in %s; MLflow run %s (%s)", outcome["run_dir"], mlflow_run_id, outcome["mlflow_ui"])
    return outcome
