"""The report of a run directory: its tables, manifest, stored maps and input images read back, and the
page written (the flow after aggregating, and the ``report`` command)."""
from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from matplotlib.figure import Figure
from prefect import task
from prefect.cache_policies import NO_CACHE

from saliency.plots import PAPER_FIGURE, example_maps_figure, method_groups, paper_figure
from saliency.sanity import ORIGINAL, get_test, sanity_tests
from tasks.manifest import Manifest, read_manifest
from tasks.report import write_report
from tasks.storage import RunDir

SAMPLE_IMAGES = 6
"""Most images in the paper's figure (those whose maps were stored: storage.sample_images)."""
EXAMPLE_IMAGES = 3
"""Most images in the example maps (a column group each): three fit the page at readable labels."""

def stored_maps(run_dir: RunDir, most_images: int = SAMPLE_IMAGES) -> pa.Table | None:
    """The stored map rows (storage.store_maps) of the first ``most_images`` images, reading parts in
    shard order only until that many images are found (store_maps=all keeps every image)."""
    tables, found = [], []
    for path in run_dir.parts("maps").values():
        table = pq.read_table(path, filesystem=run_dir.fs)
        new = [i for i in dict.fromkeys(table["image_id"].to_pylist()) if i not in found][:most_images - len(found)]
        if new:
            tables.append(table.filter(pc.is_in(table["image_id"], pa.array(new, pa.string()))))
            found += new
        if len(found) >= most_images:
            break
    return pa.concat_tables(tables) if tables else None


def input_images(manifest: Manifest | None, image_ids: Sequence[str], dataset=None) -> dict[str, torch.Tensor | None]:
    """The input images of ``image_ids`` from ``dataset`` (the flow's, already loaded), else read again as
    the run's config loads it; None for each where the dataset cannot be read here (a folder on another
    machine)."""
    images: dict[str, torch.Tensor | None] = dict.fromkeys(image_ids)
    if manifest is None and dataset is None:
        return images
    try:
        if dataset is None:
            from tasks.config import load_config
            from tasks.shards import load_data

            dataset = load_data(load_config(manifest.config))
        position = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
        for image_id in image_ids:
            if image_id in position:
                images[image_id] = dataset[position[image_id]].image
    except Exception:  # the figure still shows the maps; the input column stays empty
        pass
    return images


def _keyed_maps(maps: pa.Table, manifest: Manifest | None) -> dict[tuple[str, str, str], np.ndarray]:
    """(image id, method, key) → H×W map; key = "original" for the top-class map, else the verdict
    scope the registry gives the map's state ("min", "head", …) and the state's own name."""
    shape = maps.schema.field("map").type.shape
    n_states: dict[str, int] = {}
    for test, index in zip(maps["test"].to_pylist(), maps["state_index"].to_pylist()):
        n_states[test] = max(n_states.get(test, 0), index + 1)
    options = manifest.options() if manifest else {}
    keyed = {}
    for row in maps.to_pylist():
        array = np.asarray(row["map"], dtype=np.float32).reshape(shape)
        keys = {row["state"]}
        if row["test"] == ORIGINAL:
            keys = {ORIGINAL}
        else:
            test = get_test(row["test"])
            scope = test.scope(row["state"], row["state_index"], n_states[row["test"]], test.state_options(options))
            if scope:
                keys.add(scope)
        for key in keys:
            keyed[(row["image_id"], row["method"], key)] = array
    return keyed


def map_grids(maps: pa.Table | None, images: Mapping[str, torch.Tensor | None] | None = None,
              most_images: int = EXAMPLE_IMAGES) -> dict:
    """For the first ``most_images`` stored images: one grid per test with maps of its own (the MPRT
    states, the other classes), methods as rows, one column group per image headed by its input."""
    if maps is None or maps.num_rows == 0:
        return {}
    ids = list(dict.fromkeys(maps["image_id"].to_pylist()))[:most_images]
    rows = maps.filter(pc.is_in(maps["image_id"], pa.array(ids, pa.string()))).to_pylist()
    shape = maps.schema.field("map").type.shape
    methods = [m for _, ms in method_groups(dict.fromkeys(r["method"] for r in rows)) for m in ms]
    grids = {}
    for name in (test.id for test in sanity_tests() if test.maps_from is None):
        chosen = [r for r in rows if r["test"] in (ORIGINAL, name)]
        columns = list(dict.fromkeys(r["state"] for r in chosen))
        if len(columns) < 2:
            continue
        cells = {(r["image_id"], r["method"], r["state"]): r["map"] for r in chosen}
        complete = [i for i in ids if all((i, m, c) in cells for m in methods for c in columns)]
        if not complete:
            continue
        grid = {i: {m: [torch.from_numpy(np.asarray(cells[(i, m, c)], dtype=np.float32).reshape(shape))
                        for c in columns] for m in methods} for i in complete}
        grids[name] = example_maps_figure(grid, columns, {i: (images or {}).get(i) for i in complete},
                                          title=f"{get_test(name).title}: {len(complete)} "
                                                f"image{'s' if len(complete) > 1 else ''}")
    return grids


def paper_figure_of(maps: pa.Table | None, images: Mapping[str, torch.Tensor | None],
                    manifest: Manifest | None) -> Figure | None:
    """The paper's figure from the stored maps, or None when no group of it has every map it needs."""
    if maps is None or maps.num_rows == 0:
        return None
    ids = list(dict.fromkeys(maps["image_id"].to_pylist()))
    try:
        return paper_figure({i: images.get(i) for i in ids}, _keyed_maps(maps, manifest), PAPER_FIGURE)
    except ValueError:
        return None


def write_run_report(run_dir: RunDir, results: Any = None, manifest: Manifest | None = None, dataset=None) -> str:
    """Write RUN_DIR/report/ (index.html, PNGs, CSVs); returns a local folder holding the report.

    The flow passes what it holds — ``results`` (its aggregate: summary, verdicts, comparisons), the
    plan's ``manifest`` and ``dataset`` — so that no table is read back and nothing loaded again (only the
    small changes.json, written just before, is read); the ``report`` command passes only the run directory
    and everything is read from it."""
    if results is None:
        summary = run_dir.read_table("summary.parquet")
        verdicts = run_dir.read_table("verdicts.parquet") if run_dir.exists("verdicts.parquet") else None
        comparisons = run_dir.read_table("comparisons.parquet") if run_dir.exists("comparisons.parquet") else None
    else:
        summary, verdicts, comparisons = results.summary, results.verdicts, results.comparisons
    manifest = manifest if manifest is not None else read_manifest(run_dir)
    maps = stored_maps(run_dir)
    images = input_images(manifest, list(dict.fromkeys(maps["image_id"].to_pylist())) if maps is not None else [],
                          dataset)
    out = Path(run_dir.file("report")) if run_dir.is_local else Path(tempfile.mkdtemp(prefix="report-"))
    changes = run_dir.read_json("changes.json") if run_dir.exists("changes.json") else None
    write_report(summary, out, manifest=manifest, map_grids=map_grids(maps, images), verdicts=verdicts,
                 comparisons=comparisons, paper=paper_figure_of(maps, images, manifest), parquet_links=True,
                 changes=changes)
    if not run_dir.is_local:
        run_dir.upload_dir(out, "report")
    return str(out)


@task(name="render_report", cache_policy=NO_CACHE)
def render_report(run_dir: RunDir, results: Any = None, manifest: Manifest | None = None, dataset=None) -> str:
    return write_run_report(run_dir, results, manifest, dataset)
