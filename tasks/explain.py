"""explain_shard: one shard on a free Ray actor, which writes its parts; a Prefect task that retries
only what a retry can cure."""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.actor import ActorPool
from tasks.shards import Shard


def transient(error: BaseException) -> bool:
    """Whether a retry can cure the error: an actor, worker or node died, or an object was lost. An
    error raised by the computation itself (Ray wraps it in RayTaskError, e.g. a ValueError from the
    model) would only repeat, on this shard and every other."""
    from ray.exceptions import (NodeDiedError, ObjectLostError, OutOfMemoryError, RayActorError, RaySystemError,
                                RayTaskError, WorkerCrashedError)

    return (isinstance(error, (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, OutOfMemoryError,
                               RaySystemError)) and not isinstance(error, RayTaskError))


def describe(error: BaseException) -> str:
    """One line: the original error's type and first line (not Ray's remote traceback)."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition of explain_shard: retry only transient errors."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and transient(error)


@task(name="explain_shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_if_transient, task_run_name="explain-shard-{shard.index}")
def explain_shard(shard: Shard, pool: ActorPool) -> dict[str, Any]:
    """Compute one shard and write its parts on the actor; returns only its metadata
    (ShardWorker.explain_and_write)."""
    return pool.run(shard)
