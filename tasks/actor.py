"""The Ray actor: holds the model once, runs saliency/ on the batches of one shard at a time and writes
the shard's parts to the run directory itself (any pyarrow filesystem), so that only counts and timings
travel back to the driver, never a shard's rows.

Scores depend only on (config, image): randomised models are rebuilt from the seed, random classes
and noise are seeded per image, and torch uses a fixed number of threads per actor. So a shard gives
the same bits on any actor, and a run the same tables with one actor or many.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn

from saliency.sanity import SCORE_SCHEMA, Block, SanityRun, Settings
from tasks.allocator import keep_freed_memory
from tasks.config import Config, ConfigError
from tasks.manifest import Manifest
from tasks.pieces import MPRT, mprt_tests, piece_settings
from tasks.progress import ProgressBoard
from tasks.shards import Shard, example_input, inapplicable_tests, load_data
from tasks.storage import FAILURE_SCHEMA, RunDir, maps_schema, tensor_column
from tasks.write import write_shard


class NonFiniteMap(ValueError):
    """A method returned a NaN/Inf map for an image (e.g. LRP-ε relevance overflowing float32)."""


class ShardWorker:
    """Computes one shard: its score records, its stored maps and its per-image failures."""

    def __init__(self, config: dict[str, Any], run_id: str, device: str = "cpu",
                 model: nn.Module | None = None, progress: Any = None,
                 run_dir: str | RunDir | None = None, manifest: Manifest | None = None) -> None:
        self.start(config, run_id, device, model, progress, run_dir, manifest)

    def start(self, config: dict[str, Any], run_id: str, device: str = "cpu",
              model: nn.Module | None = None, progress: Any = None,
              run_dir: str | RunDir | None = None, manifest: Manifest | None = None) -> None:
        """Take on a run: its config, the planner's decisions, the data and (optionally) the model. A kept
        worker (``kept_workers``) is started again for each run; nothing of the run before is left."""
        self.cfg = Config.model_validate(config)
        self.settings = self.cfg.sanity_settings(manifest)  # the planner's tests, CAM layer, layout and layers
        self.planned = manifest is not None
        self.n_states = None if manifest is None else len(manifest.states)  # MPRT's, which pieces share out
        torch.set_num_threads(self.cfg.compute.threads_per_actor)
        self.run_id = run_id
        self.device = torch.device(device)
        # CPU passes allocate a forward's activations each time: keep freed pages (tasks.allocator)
        self.keeps_freed_memory = self.device.type == "cpu" and keep_freed_memory()
        self.dataset = load_data(self.cfg)
        self.model: nn.Module | None = None
        self.healthy = False  # True once a batch has succeeded here
        self.progress = progress  # a ProgressBoard actor told after every explain call, or None
        self._within_batch: Callable[[int, int], None] | None = None  # the batch being computed's reporter
        self.run_dir = RunDir(run_dir) if isinstance(run_dir, str) else run_dir  # where explain_and_write writes
        if model is not None:
            self.set_model(model)

    def stop(self) -> None:
        """Let go of the run's model, data and progress board: the worker is kept idle for the next run."""
        self.model = self.dataset = self.progress = self.run_dir = self._within_batch = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def set_model(self, model: nn.Module) -> dict[str, Any]:
        """Hold the model (the planner's copy, so that every actor explains the very same weights)."""
        self.model = model.to(self.device).eval()
        if not self.planned:  # a worker used without the planner (tests, benchmarks) drops what cannot apply
            dropped = inapplicable_tests(self.cfg, self.model, example_input(self.dataset).to(self.device))
            self.settings.tests = [test for test in self.settings.tests if test not in dropped]
        return self.ready()

    def ready(self) -> dict[str, Any]:
        """Where this worker runs (node, process, device)."""
        return {"node": _node_id(), "pid": os.getpid(), "device": str(self.device)}

    def explain_and_write(self, shard: Shard) -> dict[str, Any]:
        """Compute a shard, write its parts to the run directory, return its metadata: shard, image,
        row, failure and non-finite counts, where it ran, and seconds (total and writing)."""
        if self.run_dir is None:
            raise ValueError("this worker has no run directory to write to (ShardWorker(..., run_dir=...))")
        result = self.run(shard)
        if shard.pieces > 1:
            return result  # a piece's tables go to the driver, which merges the shard's pieces and writes them
        written = write_shard(self.run_dir, shard.index, result["scores"], result["maps"], result["failures"])
        return {**written, "n_images": result["n_images"], "compute_seconds": result["seconds"],
                "seconds": result["seconds"] + written["write_seconds"],
                **{k: result[k] for k in ("node", "pid", "device")}}

    def run(self, shard: Shard) -> dict[str, Any]:
        """A shard's tables (scores, maps, failures) in memory; ``explain_and_write`` stores them. A piece
        of a shard (``tasks.pieces``) computes its share of the MPRT states; the rows of each batch are
        counted (``unit_rows``), so that the driver can merge the pieces batch by batch."""
        if shard.pieces > 1 and not self.planned:
            raise ValueError("a piece of a shard needs the run's manifest (its MPRT states)")
        settings = piece_settings(self.settings, shard, self.n_states) if shard.pieces > 1 else self.settings
        start = time.perf_counter()
        failures: list[tuple[str, str, BaseException | str]] = []
        samples = []  # (position in the dataset, sample)
        for index in range(shard.start, shard.stop):
            try:
                samples.append((index, self.dataset[index]))
            except Exception as error:  # a corrupt or unreadable image
                failures.append((self.dataset.image_ids[index], "load", error))
        scores, maps, units = [], [], []  # units: per computed batch (image ids, score rows, map rows)
        for first, last in batch_bounds(len(samples), self.cfg.compute.batch_size):
            before = samples[first][0] - shard.start  # images of the shard ahead of this batch
            self._within_batch = lambda done, total, before=before, n=last - first: self._report(
                shard, before + n * done / total)
            batch, inputs = self._finite(samples[first:last], failures)

            def compute(items: list, batch=batch, inputs=inputs) -> tuple[pa.Table, pa.Table | None, list]:
                return self._compute(items, inputs if items is batch else None, settings, shard.piece)

            for score_table, map_table, map_failures in self._guarded(batch, compute, failures, "explain"):
                scores.append(score_table)
                maps += [] if map_table is None else [map_table]
                failures += map_failures
                units.append((tuple(score_table["image_id"].unique().to_pylist()), score_table.num_rows,
                              0 if map_table is None else map_table.num_rows))
            self._report(shard, samples[last - 1][0] + 1 - shard.start)
        self._report(shard, shard.n_images)
        if shard.piece > 0:  # the first piece records the images that failed as a whole, once
            failures = [f for f in failures if f[1] == "map"]
        return {
            "shard": shard.index,
            "piece": shard.piece,
            "pieces": shard.pieces,
            "unit_images": [images for images, _, _ in units],
            "unit_rows": [rows for _, rows, _ in units],
            "unit_map_rows": [rows for _, _, rows in units],
            "scores": self._stamp(pa.concat_tables(scores) if scores else SCORE_SCHEMA.empty_table(), shard),
            "maps": self._stamp(pa.concat_tables(maps), shard) if maps else None,
            "failures": self._failure_table(failures, shard),
            "n_images": shard.n_images,
            "seconds": time.perf_counter() - start,
            **self.ready(),
        }

    def _report(self, shard: Shard, images: float) -> None:
        """Tell the progress board how far this shard is, in images (a fraction within a batch: after each of
        its explain calls). Fire and forget: never waits, never fails the run."""
        if self.progress is not None:
            try:
                self.progress.report.remote(shard.progress_key, images / shard.pieces)
            except Exception:  # the board is gone: progress is only for show
                self.progress = None

    # ------------------------------------------------------------------------------------ batches
    def _tensors(self, batch: list) -> tuple[list[str], Tensor, list[int]]:
        ids = [sample.image_id for _, sample in batch]
        x = torch.stack([sample.image for _, sample in batch]).to(self.device)
        return ids, x, [sample.label for _, sample in batch]

    def _finite(self, batch: list, failures: list) -> tuple[list, tuple | None]:
        """Drop images whose logits are not finite (recorded as failures). When every image is kept, the
        batch's tensors and logits come back too, so that the sanity run neither stacks the batch nor
        runs its forward again."""
        if not batch:
            return batch, None
        ids, x, labels = self._tensors(batch)
        with torch.no_grad():
            logits = self.model(x)
        finite = torch.isfinite(logits).all(dim=1).tolist()
        for ok, (_, sample) in zip(finite, batch):
            if not ok:
                failures.append((sample.image_id, "forward", "the model produced non-finite logits (NaN/inf)"))
        if all(finite):
            return batch, (ids, x, labels, logits)
        return [item for ok, item in zip(finite, batch) if ok], None

    def _guarded(self, batch: list, compute: Callable[[list], Any], failures: list, stage: str) -> list[Any]:
        """Run a batch; if it fails, run its images one by one and record the ones that fail.

        If nothing has ever succeeded on this worker, a failure is not the images' fault (a bad layer
        name, a broken model): raise, so that the shard fails and the run stops with the error.
        """
        if not batch:
            return []
        try:
            tables = [compute(batch)]
        except Exception as error:
            tables, failed = [], []
            if len(batch) == 1:
                failed.append((batch[0][1].image_id, stage, error))
            else:
                for item in batch:
                    try:
                        tables.append(compute([item]))
                    except Exception as image_error:
                        failed.append((item[1].image_id, stage, image_error))
            if not tables and not self.healthy:
                raise error
            failures.extend(failed)
        self.healthy = self.healthy or bool(tables)
        return tables

    def _compute(self, batch: list, inputs: tuple | None = None, settings: Settings | None = None,
                 piece: int = 0) -> tuple[pa.Table, pa.Table | None, list]:
        """Scores of a batch, the maps the config stores (from the very same explain calls), and a
        failure per non-finite map (its scores are left out, every other score is kept). ``inputs``:
        (ids, x, labels, logits) of this very batch from the finiteness check, if it made them. A piece
        after the first leaves the original maps (stored, failed) to the first."""
        ids, x, labels, logits = inputs if inputs is not None else (*self._tensors(batch), None)
        keep = [b for b, (index, _) in enumerate(batch) if self._keeps_map(index)]
        run = SanityRun(self.model, x, settings or self.settings, image_ids=ids, labels=labels,
                        model_name=self.cfg.model.name, logits=logits, progress=self._within_batch)
        first_seed = self.cfg.tests.mprt.seeds[0]
        stored = [block for block in run.blocks() if keep and block.seed in (None, first_seed) and not block.reused
                  and (piece == 0 or block.test == MPRT)]
        map_failures = [(f["image_id"], "map", NonFiniteMap(_where(f) + f": {f['reason']}"), f["method"], f["state"])
                        for f in run.failures if piece == 0 or f["test"] == MPRT]
        table = run.table()
        if piece > 0:  # the first piece has the other tests' rows
            table = table.filter(pc.is_in(table["test"], pa.array(mprt_tests(run.settings.tests))))
        return table, self._map_table(ids, keep, stored) if stored else None, map_failures

    def _keeps_map(self, index: int) -> bool:
        store = self.cfg.storage.store_maps
        return store == "all" or (store == "sample" and index < self.cfg.storage.sample_images)

    def _map_table(self, ids: list[str], keep: list[int], blocks: list[Block]) -> pa.Table:
        """Map rows of the images at positions ``keep``: the original (top class), the other classes and
        every MPRT state of the first randomisation seed."""
        columns: dict[str, list] = {name: [] for name in ("image_id", "method", "test", "state",
                                                          "state_index", "target_class")}
        arrays = []
        for block in blocks:
            for method in self.cfg.methods.ids:
                values = block.maps[method]
                for b in keep:
                    columns["image_id"].append(ids[b])
                    columns["method"].append(method)
                    columns["test"].append(block.test)
                    columns["state"].append(block.state)
                    columns["state_index"].append(block.state_index)
                    columns["target_class"].append(int(block.targets[b]))
                    arrays.append(values[b].detach().cpu().numpy())
        stacked = np.stack(arrays)
        schema = maps_schema(*stacked.shape[1:])
        n = len(arrays)
        data = {"run_id": [""] * n, "shard": [0] * n, **columns, "map": tensor_column(stacked)}
        return pa.table({name: data[name] for name in schema.names}, schema=schema)

    # ------------------------------------------------------------------------------------ tables
    def _stamp(self, table: pa.Table, shard: Shard) -> pa.Table:
        """Fill the run id and shard columns."""
        n = table.num_rows
        table = table.set_column(table.schema.get_field_index("run_id"), table.schema.field("run_id"),
                                 pa.array([self.run_id] * n, pa.string()))
        return table.set_column(table.schema.get_field_index("shard"), table.schema.field("shard"),
                                pa.array([shard.index] * n, pa.int32()))

    def _failure_table(self, failures: list, shard: Shard) -> pa.Table:
        rows = [{"run_id": self.run_id, "shard": shard.index, "image_id": image_id, "stage": stage,
                 "error_type": type(error).__name__ if isinstance(error, BaseException) else "NonFiniteLogits",
                 "message": str(error), "method": where[0] if where else None, "state": where[1] if where else None}
                for image_id, stage, error, *where in failures]
        return pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)


def _where(failure: dict) -> str:
    """'lrp_epsilon mprt/03:conv1 seed 1' for a failure row's message."""
    seed = "" if failure["seed"] is None else f" seed {failure['seed']}"
    return f"{failure['method']} {failure['test']}/{failure['state']}{seed}"


def batch_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of the batches of n images: at most ``size`` each and never a single image when
    n ≥ 2 (a lone image has no partner for its chance level), by moving one image from the batch before."""
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1 and size > 1:
        (a, b), (_, d) = bounds[-2], bounds[-1]
        bounds[-2:] = [(a, b - 1), (b - 1, d)]
    return bounds


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class PoolClosed(RuntimeError):
    """The pool was shut down (the run stops): not an error a retry could cure."""


class KeptWorkers:
    """Idle ShardWorker actors kept between runs (``kept_workers``), by what they were made for: Ray job,
    threads per actor, GPU or not. Each holds its CPUs (or GPU) while idle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[tuple[tuple, Any]] = []  # (needs, actor)

    def take(self, needs: tuple, n: int) -> list:
        """Up to n kept actors made for ``needs``. Those kept for other needs in this job are killed first:
        their CPUs may be what the run needs; those of another job (a Ray connection since shut down) are
        gone with it."""
        import ray

        with self._lock:
            mine = [actor for kept_for, actor in self._idle if kept_for == needs]
            others = [(kept_for, actor) for kept_for, actor in self._idle if kept_for != needs]
            self._idle = [(needs, actor) for actor in mine[n:]]
        for kept_for, actor in others:
            if kept_for[0] == needs[0]:
                ray.kill(actor)
        return mine[:n]

    def keep(self, needs: tuple, actors: list) -> None:
        with self._lock:
            self._idle += [(needs, actor) for actor in actors]

    def release(self) -> int:
        """Kill every kept actor (their CPUs and GPUs are free again); returns how many."""
        import ray

        with self._lock:
            idle, self._idle = self._idle, []
        for _, actor in idle:
            try:
                ray.kill(actor)
            except Exception:  # its Ray connection has ended: the actor ended with it
                pass
        return len(idle)


_kept: KeptWorkers | None = None  # set inside kept_workers()


@contextmanager
def kept_workers() -> Iterator[KeptWorkers]:
    """Within this block, the actors of a run that ends cleanly are kept, and the next run in this process
    on the same Ray connection, with the same threads per actor and device, takes them instead of starting
    its own: their processes have already imported torch and the library (seconds per actor; minutes of
    GPU set-up on a cluster add up over a sweep). A kept actor is started again for each run (its config,
    data and model; nothing of the run before is left) and holds its CPUs or GPU while idle, so use it for
    runs one after another (a sweep, a test session), not around other work on the same cluster. Leaving
    the block (or ``release()``) kills them. Nested blocks share the outermost's."""
    global _kept
    if _kept is not None:
        yield _kept
        return
    _kept = KeptWorkers()
    try:
        yield _kept
    finally:
        kept, _kept = _kept, None
        kept.release()


class ActorPool:
    """Ray actors running ShardWorker; ``run`` borrows a free actor (thread-safe, for Prefect threads)."""

    def __init__(self, cfg: Config, model: nn.Module, run_id: str, n_actors: int, use_gpu: bool,
                 run_dir: RunDir, manifest: Manifest | None = None) -> None:
        import ray

        self._remote = ray.remote(ShardWorker).options(num_cpus=cfg.compute.threads_per_actor,
                                                       num_gpus=1 if use_gpu else 0)
        self.progress = ray.remote(ProgressBoard).options(num_cpus=0).remote()
        # the run directory travels as its location (a path or URI), each actor opens its own filesystem
        self._args = (cfg.model_dump(mode="json"), run_id, "cuda" if use_gpu else "cpu", None, self.progress,
                      run_dir.location, manifest)
        self._model = ray.put(model.cpu())
        self._free: queue.Queue = queue.Queue()
        self._needs = (ray.get_runtime_context().get_job_id(), cfg.compute.threads_per_actor, use_gpu)
        self._kept = _kept
        reused = [] if self._kept is None else self._kept.take(self._needs, n_actors)
        self.actors = [actor for actor, alive in zip(reused, self._started(reused)) if alive]
        self.reused = len(self.actors)  # actors taken from kept_workers
        self.actors += [self._remote.remote(*self._args) for _ in range(n_actors - self.reused)]
        self.workers = ray.get([actor.set_model.remote(self._model) for actor in self.actors])
        self.closed = False  # set by shutdown: a shard still running then fails with PoolClosed
        for actor in self.actors:
            self._free.put(actor)

    def _started(self, kept: list) -> list[bool]:
        """Start kept actors on this run; whether each did. One that died while idle, or whose start
        raised, is dropped (killed): a new actor takes its place and meets any error as a first one would."""
        import ray

        alive = []
        for actor, ref in [(actor, actor.start.remote(*self._args)) for actor in kept]:
            try:
                ray.get(ref)
                alive.append(True)
            except Exception:
                ray.kill(actor)
                alive.append(False)
        return alive

    def _replace(self, dead):
        """A new actor for one that died (its process crashed or its node left)."""
        import ray

        actor = self._remote.remote(*self._args)
        ray.get(actor.set_model.remote(self._model))
        self.actors[self.actors.index(dead)] = actor
        return actor

    def run(self, shard: Shard) -> dict[str, Any]:
        """Compute and write a shard on the next free actor; returns its metadata (ShardWorker.explain_and_write).
        A dead actor is replaced and the error re-raised (the Prefect task retries the shard)."""
        import ray
        from ray.exceptions import RayActorError

        actor = self._free.get()
        try:
            if self.closed:
                raise PoolClosed(f"shard {shard.index} not run: the run is stopping")
            return ray.get(actor.explain_and_write.remote(shard))
        except RayActorError:
            if self.closed:
                raise PoolClosed(f"shard {shard.index} stopped: the run is stopping") from None
            actor = self._replace(actor)
            raise
        finally:
            self._free.put(actor)

    def images_done(self) -> float | None:
        """Images explained so far by the pool's actors (None if the board cannot be read now, or the pool
        is shut down: ray.kill is asynchronous, so the killed board may still answer for a moment)."""
        import ray

        if self.closed:
            return None

        try:
            return ray.get(self.progress.images.remote(), timeout=5)
        except Exception:  # progress is only for show: never fail the run over it
            return None

    def shutdown(self, keep: bool = False) -> None:
        """Kill the actors and the progress board. With ``keep`` (the run ended cleanly) inside the
        ``kept_workers`` block the pool was made in, the actors are stopped and kept for the next run."""
        import ray

        self.closed = True
        ray.kill(self.progress)
        if keep and self._kept is not None and self._kept is _kept:
            try:
                ray.get([actor.stop.remote() for actor in self.actors], timeout=60)
            except Exception:  # one died or hangs: keep none of them
                pass
            else:
                self._kept.keep(self._needs, self.actors)
                return
        for actor in self.actors:
            ray.kill(actor)


def actor_count(cfg: Config, n_shards: int) -> tuple[int, bool]:
    """(number of actors, whether each gets a GPU) for the connected Ray cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = cfg.compute.device == "cuda" or (cfg.compute.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise ConfigError("config field `compute.device`: cuda was asked for but the Ray cluster has no GPU; "
                          f"allowed: {', '.join(('auto', 'cpu'))}")
    room = gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // cfg.compute.threads_per_actor)
    return max(1, min(cfg.compute.actors or room, room, n_shards)), use_gpu
