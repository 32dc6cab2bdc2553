"""write_shard: one shard's parts written by the actor that computed them, each atomically; the scores
part last (it marks the shard done). No Prefect here: actors import it."""
from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tasks.storage import RunDir


def write_shard(run_dir: RunDir, shard: int, scores: pa.Table, maps: pa.Table | None,
                failures: pa.Table) -> dict[str, Any]:
    """Write maps/ and failures/ parts, then scores/; return what the driver needs to know about them
    (never the rows): row counts, failure counts, non-finite values and the seconds spent writing."""
    start = time.perf_counter()
    if maps is not None:
        run_dir.write_part("maps", shard, maps)
    if failures.num_rows:
        run_dir.write_part("failures", shard, failures)
    run_dir.write_part("scores", shard, scores)
    stages = failures["stage"].to_pylist()
    values = scores["value"]
    return {"shard": shard, "rows": scores.num_rows, "map_rows": 0 if maps is None else maps.num_rows,
            "failures": failures.num_rows, "non_finite_maps": stages.count("map"),
            "non_finite_scores": values.null_count + int(pc.sum(pc.is_nan(values.fill_null(0.0))).as_py() or 0),
            "write_seconds": time.perf_counter() - start}
