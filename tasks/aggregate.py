"""aggregate: score parts → summary.parquet (mean, bootstrap CIs of s, c, r and R), verdicts.parquet and
comparisons.parquet (the paper's paired pos/abs-vs-signed table), reading one part at a time.

The driver's memory does not grow with the number of images: the summary is merged from each part's
partial statistics (saliency.statistics.SummaryAccumulator: sums and Poisson-bootstrap sums per group and
seed), and the comparisons keep one number per image and comparison (what a Wilcoxon test needs).
One pass over the parts when the caller knows the methods and the number of MPRT states (the flow
passes the manifest's); otherwise a second pass, after the first has found them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from saliency.statistics import (
    ComparisonAccumulator, SummaryAccumulator, VerdictRules, curve_lengths, verdicts,
)
from saliency.sanity import get_test
from tasks.manifest import Manifest
from tasks.storage import FAILURE_SCHEMA, RunDir

#: The score columns the statistics read (the others stay on disk).
STATISTICS_COLUMNS = ("image_id", "model", "method", "test", "state", "state_index", "seed", "metric", "value",
                      "chance", "retest")


@dataclass
class Aggregate:
    score_rows: int
    summary: pa.Table
    verdicts: pa.Table
    comparisons: pa.Table
    failures: pa.Table


def score_parts(run_dir: RunDir, n_shards: int, methods: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """Every shard's scores (the statistics' columns), one part at a time in shard order, optionally only
    some methods' rows; an error if a shard's part is missing. Only the plan's parts are read (never a
    stray copy or a part of a shard the plan does not have)."""
    missing = sorted(set(range(n_shards)) - run_dir.done_shards(n_shards))
    if missing:
        raise RuntimeError(f"{len(missing)} shards have no scores part yet (e.g. {missing[:5]}); "
                           f"re-run with the same --out to finish them")
    only = None if methods is None else [("method", "in", list(methods))]
    for path in run_dir.parts("scores", n_shards).values():
        yield pq.read_table(path, filesystem=run_dir.fs, columns=list(STATISTICS_COLUMNS), filters=only)
        pa.default_memory_pool().release_unused()  # hand the part's buffers back, do not let the pool grow


def aggregate_parts(run_dir: RunDir, n_shards: int, n_boot: int, seed: int, rules: VerdictRules = VerdictRules(),
                    options: Mapping[str, Any] | None = None, plan: Manifest | None = None) -> Aggregate:
    """Summary, verdicts and comparisons of a run directory's score parts, written next to them; with the
    run's ``plan`` (its methods and MPRT states) every part is read once."""
    summarizer, rows = SummaryAccumulator(n_boot, seed), 0
    comparer = None if plan is None else ComparisonAccumulator(plan.methods, planned_curves(plan), options, n_boot,
                                                               seed, rules)
    for part in score_parts(run_dir, n_shards):
        summarizer.add(part)
        if comparer is not None:
            comparer.add(part)
        rows += part.num_rows
    summary = summarizer.summary()
    run_dir.write_table(summary, "summary.parquet")
    verdict = verdicts(summary, rules, options)
    run_dir.write_table(verdict, "verdicts.parquet")
    if comparer is None:
        methods = sorted(set(summary["method"].to_pylist()))
        comparer = ComparisonAccumulator(methods, curve_lengths(summary), options, n_boot, seed, rules)
        if comparer.methods:
            for part in score_parts(run_dir, n_shards, comparer.methods):
                comparer.add(part)
    paired = comparer.table()
    run_dir.write_table(paired, "comparisons.parquet")
    failures = run_dir.read_parts("failures", n_shards) or FAILURE_SCHEMA.empty_table()
    return Aggregate(rows, summary, verdict, paired, failures)


def planned_curves(plan: Manifest) -> dict[tuple[str, str], int]:
    """{(model, test): number of states} of the plan's curve tests (as ``curve_lengths`` finds them)."""
    return {(plan.model, test): len(plan.states) for test in plan.tests if get_test(test).curve}


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate(run_dir: RunDir, n_shards: int, n_boot: int, seed: int, rules: VerdictRules = VerdictRules(),
              options: Mapping[str, Any] | None = None, plan: Manifest | None = None) -> Aggregate:
    return aggregate_parts(run_dir, n_shards, n_boot, seed, rules, options, plan)
