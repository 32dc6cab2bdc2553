"""aggregate: all score parts → summary.parquet (mean, bootstrap CIs of s, c, r and R), verdicts.parquet
and comparisons.parquet (the paper's paired pos/abs-vs-signed table)."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from saliency.sanity import SCORE_SCHEMA
from saliency.statistics import VerdictRules, comparisons, summarize, verdicts
from tasks.storage import FAILURE_SCHEMA, RunDir


@dataclass
class Aggregate:
    scores: pa.Table
    summary: pa.Table
    verdicts: pa.Table
    comparisons: pa.Table
    failures: pa.Table


def read_scores(run_dir: RunDir, n_shards: int) -> pa.Table:
    """Every shard's scores, in shard order; an error if a shard's part is missing."""
    missing = sorted(set(range(n_shards)) - run_dir.done_shards())
    if missing:
        raise RuntimeError(f"{len(missing)} shards have no scores part yet (e.g. {missing[:5]}); "
                           f"re-run with the same --out to finish them")
    return run_dir.read_parts("scores") or SCORE_SCHEMA.empty_table()


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate(run_dir: RunDir, n_shards: int, n_boot: int, seed: int, rules: VerdictRules = VerdictRules(),
              order: str = "cascade_top_down") -> Aggregate:
    scores = read_scores(run_dir, n_shards)
    summary = summarize(scores, n_boot=n_boot, seed=seed)
    run_dir.write_table(summary, "summary.parquet")
    verdict = verdicts(summary, rules, order=order)
    run_dir.write_table(verdict, "verdicts.parquet")
    paired = comparisons(scores, order=order, n_boot=n_boot, seed=seed, rules=rules)
    run_dir.write_table(paired, "comparisons.parquet")
    failures = run_dir.read_parts("failures") or FAILURE_SCHEMA.empty_table()
    return Aggregate(scores, summary, verdict, paired, failures)
