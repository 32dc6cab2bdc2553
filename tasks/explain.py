"""explain_shard: one shard on a free Ray actor, which writes its parts; a Prefect task with retries."""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.actor import ActorPool
from tasks.shards import Shard


@task(name="explain_shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      task_run_name="explain-shard-{shard.index}")
def explain_shard(shard: Shard, pool: ActorPool) -> dict[str, Any]:
    """Compute one shard and write its parts on the actor; returns only its metadata
    (ShardWorker.explain_and_write)."""
    return pool.run(shard)
