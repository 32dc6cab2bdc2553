"""Aggregation of a run directory's score parts (tasks.aggregate): with the plan, every part is read once
and the tables equal those of the two-pass aggregation that finds the methods and states itself."""
from __future__ import annotations

import pandas
import pyarrow.parquet as pq

from models_for_tests import twin_file
from saliency.data import load_dataset
from tasks import aggregate as aggregation
from tasks.actor import ShardWorker
from tasks.config import load_config
from tasks.plan import build_manifest
from tasks.shards import load_configured_model, shard_ranges
from tasks.storage import RunDir


def test_with_the_plan_each_part_is_read_once_and_the_tables_are_the_same(tmp_path, monkeypatch):
    cfg = load_config({"data": {"limit": 8}, "methods": {"ids": ["gradient", "gradcampp", "gradcampp/signed",
                                                                 "random"]},
                       "randomization": {"seeds": [0]}, "compute": {"batch_size": 4}, "tracking": {"enabled": False},
                       "tests": {"data_randomization": {"weights": twin_file()}}})
    model = load_configured_model(cfg)
    shards = shard_ranges(8, 4)
    manifest = build_manifest(cfg, load_dataset("mnist", limit=8), model, shards)
    worker = ShardWorker(cfg.model_dump(mode="json"), run_id="t", model=model, run_dir=str(tmp_path))
    for shard in shards:
        worker.explain_and_write(shard)
    run_dir = RunDir(str(tmp_path))
    reads = []
    real = pq.read_table

    def counted(path, *args, **kwargs):
        reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(aggregation.pq, "read_table", counted)
    two_pass = aggregation.aggregate_parts(run_dir, len(shards), n_boot=50, seed=0)
    assert len(reads) == 2 * len(shards)  # the comparisons' pass reads the parts again
    reads.clear()
    one_pass = aggregation.aggregate_parts(run_dir, len(shards), n_boot=50, seed=0, plan=manifest)
    assert len(reads) == len(shards)
    assert one_pass.comparisons.num_rows > 0
    for name in ("summary", "verdicts", "comparisons"):  # NaN where R is undefined: compared as equal
        pandas.testing.assert_frame_equal(getattr(one_pass, name).to_pandas(), getattr(two_pass, name).to_pandas(),
                                          check_exact=True)
