"""render_report: figures and index.html of a finished run directory (saliency.report.write_report)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from saliency.report import map_grid_figure, write_report
from tasks.storage import RunDir


def map_grids(maps: pa.Table | None) -> dict:
    """For the first stored image: a grid over the MPRT states and one over the other classes."""
    if maps is None or maps.num_rows == 0:
        return {}
    image_id = maps["image_id"][0].as_py()
    rows = maps.filter(pc.equal(maps["image_id"], image_id)).to_pylist()
    shape = maps.schema.field("map").type.shape
    methods = list(dict.fromkeys(r["method"] for r in rows))
    grids = {}
    for name, tests in (("mprt", ("original", "mprt")), ("class_sensitivity", ("original", "class_sensitivity"))):
        chosen = [r for r in rows if r["test"] in tests]
        columns = list(dict.fromkeys(r["state"] for r in chosen))
        if len(columns) < 2:
            continue
        cells = {(r["method"], r["state"]): r["map"] for r in chosen}
        grid = {m: [torch.from_numpy(np.asarray(cells[(m, c)], dtype=np.float32).reshape(shape))
                    for c in columns] for m in methods}
        grids[name] = map_grid_figure(grid, columns, title=f"{name}: {image_id}")
    return grids


def write_run_report(run_dir: RunDir) -> str:
    """Write RUN_DIR/report/ (index.html and PNGs); returns a local folder holding the report."""
    summary = run_dir.read_table("summary.parquet")
    verdicts = run_dir.read_table("verdicts.parquet") if run_dir.exists("verdicts.parquet") else None
    comparisons = run_dir.read_table("comparisons.parquet") if run_dir.exists("comparisons.parquet") else None
    manifest = run_dir.read_json("manifest.json")
    first_maps = next(iter(run_dir.parts("maps").values()), None)
    maps = pq.read_table(first_maps, filesystem=run_dir.fs) if first_maps else None
    out = Path(run_dir.file("report")) if run_dir.is_local else Path(tempfile.mkdtemp(prefix="report-"))
    write_report(summary, out, manifest=manifest, map_grids=map_grids(maps), verdicts=verdicts,
                 comparisons=comparisons)
    if not run_dir.is_local:
        run_dir.upload_dir(out, "report")
    return str(out)


@task(name="render_report", cache_policy=NO_CACHE)
def render_report(run_dir: RunDir) -> str:
    return write_run_report(run_dir)
