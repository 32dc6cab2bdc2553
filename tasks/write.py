"""write_parquet: one shard's parts, each written atomically; the scores part last (it marks the shard done)."""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.storage import RunDir


@task(name="write_parquet", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def write_parquet(run_dir: RunDir, result: dict[str, Any]) -> dict[str, Any]:
    """Write maps/ and failures/ parts, then scores/; return the shard's counts and provenance."""
    shard = result["shard"]
    if result["maps"] is not None:
        run_dir.write_part("maps", shard, result["maps"])
    if result["failures"].num_rows:
        run_dir.write_part("failures", shard, result["failures"])
    run_dir.write_part("scores", shard, result["scores"])
    return {"shard": shard, "n_images": result["n_images"], "rows": result["scores"].num_rows,
            "failures": result["failures"].num_rows, "node": result["node"], "pid": result["pid"],
            "seconds": result["seconds"]}
