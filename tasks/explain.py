"""explain_shard: one shard on a free Ray actor; a Prefect task with retries."""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.actor import ActorPool
from tasks.shards import Shard


@task(name="explain_shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      task_run_name="explain-shard-{shard.index}")
def explain_shard(shard: Shard, pool: ActorPool) -> dict[str, Any]:
    """Score records, stored maps and per-image failures of one shard (see ShardWorker.run)."""
    return pool.run(shard)
