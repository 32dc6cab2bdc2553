"""A shard's parts checked against the plan before they are trusted: on resume a part that fails is
deleted and its shard recomputed; after computing, a part that fails stops the run, named."""
from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq

from saliency.sanity import Settings, get_test
from tasks.shards import Shard
from tasks.storage import PART_KINDS, RunDir, part_name

WHOLE_IMAGE_STAGES = ("load", "forward", "explain")  # failures that leave an image without any score


def rows_per_image_and_method(settings: Settings, n_states: int) -> int:
    """Score rows of one image and method for these settings (every test says its own)."""
    return sum(get_test(test).rows_per_image(settings, n_states) for test in settings.tests)


def check_shard(run_dir: RunDir, shard: Shard, image_ids: list[str], methods: list[str],
                per_method: int, run_id: str) -> str | None:
    """Why the shard's stored parts cannot be trusted, or None: unreadable parts, rows of another run
    (another run_id: another config, e.g. the same shard of a run with another seed), rows of another
    shard, images not in the shard, images neither scored nor recorded as failed, or row counts that do
    not match images × methods × (states × metrics) minus the recorded failures."""
    try:
        scores = pq.read_table(run_dir.part_path("scores", shard.index), columns=["run_id", "shard", "image_id",
                                                                                  "method"], filesystem=run_dir.fs)
        failures = (pq.read_table(run_dir.part_path("failures", shard.index), filesystem=run_dir.fs)
                    if run_dir.exists("failures", part_name(shard.index)) else None)
        maps = (pq.read_table(run_dir.part_path("maps", shard.index), columns=["run_id"], filesystem=run_dir.fs)
                if run_dir.exists("maps", part_name(shard.index)) else None)
    except Exception as error:  # truncated, zero bytes, not Parquet, wrong columns
        return f"a part is unreadable ({type(error).__name__}: {error})"
    for kind, table in (("scores", scores), ("failures", failures), ("maps", maps)):
        foreign = sorted(set([] if table is None else table["run_id"].to_pylist()) - {run_id})
        if foreign:
            return f"its {kind} part holds rows of another run (run_id {foreign[0]}; this run is {run_id})"
    other = sorted(set(scores["shard"].to_pylist()) - {shard.index})
    if other:
        return f"its scores part holds rows of shard(s) {other}"
    expected = set(image_ids)
    scored = set(scores["image_id"].to_pylist())
    stray = sorted(scored - expected)
    if stray:
        return f"its scores part holds images that are not in the shard (e.g. {stray[0]})"
    failed, map_failed = set(), set()
    for row in ([] if failures is None else failures.to_pylist()):
        if row["stage"] in WHOLE_IMAGE_STAGES:
            failed.add(row["image_id"])
        elif row["stage"] == "map":
            map_failed.add((row["image_id"], row["method"]))
    missing = sorted(expected - scored - failed)
    if missing:
        return f"{len(missing)} of its images have neither scores nor a recorded failure (e.g. {missing[0]})"
    counts = Counter(zip(scores["image_id"].to_pylist(), scores["method"].to_pylist()))
    for image_id in sorted(scored):
        for method in methods:
            n = counts.get((image_id, method), 0)
            allowed = n <= per_method if (image_id, method) in map_failed else n == per_method
            if not allowed:
                return f"image {image_id}, method {method}: {n} score rows, expected {per_method}"
    return None


def delete_shard(run_dir: RunDir, index: int) -> None:
    """Remove every part of a shard (scores last written, so first removed), so it is recomputed."""
    for kind in ("scores", *[k for k in PART_KINDS if k != "scores"]):
        if run_dir.exists(kind, part_name(index)):
            run_dir.fs.delete_file(run_dir.part_path(kind, index))
