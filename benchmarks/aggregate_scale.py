"""Does aggregation grow with the dataset? (issue 10, case 2)

    .venv/bin/python benchmarks/aggregate_scale.py rows                 # 10x the default run's rows
    .venv/bin/python benchmarks/aggregate_scale.py driver               # driver memory, 2 000 vs 20 000 images
    .venv/bin/python benchmarks/aggregate_scale.py rows --images 200 --n-boot 50   # a quick look

``rows``: writes synthetic score parts laid out like the default run's (24 methods; class sensitivity
against 2 other classes, MPRT and eMPRT over the reference CNN's 10 states and 3 seeds; 2 metrics; 100
images per part; realistic values with a few NaN) for ``--images`` images (default 10 000 = 10x the
default run), then aggregates them in a fresh process (tasks.aggregate.aggregate_parts: summary,
verdicts, comparisons) and prints its wall time and peak resident memory (ru_maxrss of that process,
interpreter and imports included). Targets: <= 60 s and <= 1.5 GB.

``driver``: runs the real flow (Prefect + local Ray + Parquet) with the shipped CIFAR-10 ResNet-20 on
synthetic 32×32 images (an imagefolder written here; the bundled digits are only 5 000) with cheap
methods (gradient, edge_sobel, random), class sensitivity only (MPRT's states would make 20 000 images
cost most of an hour on this shared 2-core machine; the rows benchmark covers the statistics' growth),
ssim only, 100 images per shard, for two image counts
(default 2 000 and 20 000), each in a fresh process, and prints the driver process's peak resident memory
(ru_maxrss: the flow's own process, not the Ray actors, which hold one shard each). Target: the larger
run's peak <= 1.2x the smaller's.

Each measurement prints one JSON line starting with "RESULT ".
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PER_PART = 100
TARGET_SECONDS, TARGET_BYTES, TARGET_RATIO = 60.0, 1.5e9, 1.2


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def synthetic_part(first_image: int, n_images: int, shard: int, seed: int = 0):
    """One shard's score rows, laid out like the default run's (see the module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from saliency.sanity import SCORE_SCHEMA
    from tasks.config import Config

    cfg = Config()
    methods, metrics, seeds = cfg.methods.ids, cfg.metrics.names, cfg.tests.mprt.seeds
    states = [f"{k:02d}:layer{k}" for k in range(10)]
    blocks = [("class_sensitivity", other, 0, None, metric) for other in cfg.tests.class_sensitivity.others for metric in metrics]
    blocks += [("mprt", state, k, s, metric) for s in seeds for k, state in enumerate(states) for metric in metrics]
    blocks += [("emprt", state, k, s, "entropy_rise") for s in seeds for k, state in enumerate(states)]
    m, b, n = len(methods), len(blocks), n_images
    method = np.repeat(np.arange(m), b * n)
    block = np.tile(np.repeat(np.arange(b), n), m)
    image = np.tile(np.arange(n), m * b)
    rng = np.random.default_rng([seed, shard])
    test, state, index, seed_of, metric = (np.array(column, dtype=object) for column in zip(*blocks))
    level = rng.random(m)[method]  # each method its own retention level
    value = np.clip(level * (1 - index[block].astype(float) / 12) + rng.normal(0, 0.15, method.size), -1, 1)
    value[rng.random(method.size) < 0.002] = np.nan
    normalised = (test != "emprt")[block]
    chance = np.where(normalised, rng.normal(0.1, 0.05, method.size), np.nan)

    def strings(values, codes):
        return pc.take(pa.array(list(values), pa.string()), pa.array(codes))

    rows = method.size
    data = {"run_id": strings(["synthetic"], np.zeros(rows, dtype=np.int64)),
            "shard": pa.array(np.full(rows, shard, dtype=np.int32)),
            "image_id": strings([f"img{first_image + i:07d}" for i in range(n)], image),
            "label": pa.array(rng.integers(0, 10, rows)),
            "model": strings(["reference"], np.zeros(rows, dtype=np.int64)),
            "method": strings(methods, method), "test": strings(test, block), "state": strings(state, block),
            "state_index": pa.array(index[block].astype(np.int32)),
            "seed": pc.take(pa.array(list(seed_of), pa.int64()), pa.array(block)),
            "target_class": pa.array(rng.integers(0, 10, rows)), "metric": strings(metric, block),
            "value": pa.array(value), "chance": pa.array(chance),
            "retest": pa.array(np.where(normalised, 1.0, np.nan))}
    return pa.table(data, schema=SCORE_SCHEMA)


def write_parts(run_dir: Path, n_images: int) -> tuple[int, int]:
    """Write the synthetic parts; (number of parts, rows)."""
    from tasks.storage import RunDir

    directory, rows = RunDir(str(run_dir)), 0
    shards = range((n_images + PER_PART - 1) // PER_PART)
    for shard in shards:
        first = shard * PER_PART
        part = synthetic_part(first, min(PER_PART, n_images - first), shard)
        directory.write_part("scores", shard, part)
        rows += part.num_rows
    return len(shards), rows


def aggregate_child(run_dir: str, n_parts: int, n_boot: int) -> dict:
    """(in a fresh process) aggregate the parts; seconds and peak memory."""
    from tasks.aggregate import aggregate_parts
    from tasks.storage import RunDir

    imported = _peak_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    result = aggregate_parts(RunDir(run_dir), n_parts, n_boot=n_boot, seed=0)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "peak_bytes": _peak_bytes(), "after_imports_bytes": imported,
            "rows": result.score_rows, "summary_rows": result.summary.num_rows,
            "verdict_rows": result.verdicts.num_rows, "comparison_rows": result.comparisons.num_rows}


def synthetic_images(root: Path, n_images: int) -> None:
    """n_images small RGB PNGs (32×32, CIFAR-sized blobs) in 10 class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32
    for i in range(n_images):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        pixels = np.stack([blob * rng.uniform(0.3, 1) + rng.normal(0, 0.05, (32, 32)) for _ in range(3)], -1)
        Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:06d}.png")


def driver_child(n_images: int, out: str, n_boot: int) -> dict:
    """(in a fresh process) the flow on n_images cheap images; the driver's peak memory."""
    import flows  # noqa: F401  (environment defaults for Ray and Prefect)
    from flows.sanity_check import sanity_check

    overrides = ["model.name=cifar_resnet20", "data.dataset=imagefolder", f"data.root={out}/images",
                 "data.image_size=32", f"data.limit={n_images}", "methods.ids=gradient,edge_sobel,random",
                 "metrics.names=ssim", f"metrics.n_boot={n_boot}", "tests.mprt.seeds=0",
                 "tests.mprt.granularity=block", "tests.mprt.enabled=false", "tests.emprt.enabled=false", "storage.store_maps=none",
                 "storage.report=false", "tracking.enabled=false", "compute.batch_size=100"]
    start = time.perf_counter()
    outcome = sanity_check(config=None, out=out, overrides=overrides, progress=False)
    return {"images": n_images, "seconds": time.perf_counter() - start, "peak_bytes": _peak_bytes(),
            "score_rows": outcome["stats"]["score_rows"], "shards": outcome["stats"]["shards"],
            "shard_seconds": outcome["stats"]["shard_seconds"]}


def child(arguments: list[str], env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, *arguments], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{arguments} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("rows", "driver"))
    parser.add_argument("--images", type=int, nargs="+", help="rows: images (default 10000); "
                        "driver: two image counts (default 2000 20000)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="aggregate-scale-")).resolve()

    if args.child:  # one measurement, in this fresh process
        result = (aggregate_child(str(out), args.images[0], args.n_boot) if args.mode == "rows"
                  else driver_child(args.images[0], str(out), args.n_boot))
        print("RESULT " + json.dumps(result))
        return

    if args.mode == "rows":
        n_images = (args.images or [10_000])[0]
        start = time.perf_counter()
        n_parts, rows = write_parts(out, n_images)
        print(f"wrote {rows:,} synthetic score rows ({n_images} images, {n_parts} parts) in "
              f"{time.perf_counter() - start:.1f} s to {out}")
        result = child(["rows", "--child", "--out", str(out), "--images", str(n_parts), "--n-boot", str(args.n_boot)])
        met = result["seconds"] <= TARGET_SECONDS and result["peak_bytes"] <= TARGET_BYTES
        print(f"aggregate {result['rows']:,} rows (n_boot {args.n_boot}): {result['seconds']:.1f} s "
              f"({result['cpu_seconds']:.1f} s CPU, all threads), peak "
              f"{result['peak_bytes'] / 2**20:.0f} MiB "
              f"(after imports {result['after_imports_bytes'] / 2**20:.0f} MiB); "
              f"{result['summary_rows']} summary rows, {result['comparison_rows']} comparisons; target <= "
              f"{TARGET_SECONDS:.0f} s and <= {TARGET_BYTES / 1e9:.1f} GB: {'met' if met else 'MISSED'}")
        print("RESULT " + json.dumps({**result, "images": n_images, "parts": n_parts, "met": met}))
        return

    small, large = args.images or [2_000, 20_000]
    for n in (small, large):
        synthetic_images(out / str(n) / "images", n)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = [child(["driver", "--child", "--out", str(out / str(n)), "--images", str(n), "--n-boot",
                      str(args.n_boot)], env) for n in (small, large)]
    ratio = results[1]["peak_bytes"] / results[0]["peak_bytes"]
    for r in results:
        print(f"{r['images']:>7} images, {r['shards']} shards, {r['score_rows']:,} score rows: {r['seconds']:.0f} s, "
              f"driver peak {r['peak_bytes'] / 2**20:.0f} MiB")
    print(f"driver peak ratio {large}/{small} images: {ratio:.3f} (target <= {TARGET_RATIO}): "
          f"{'met' if ratio <= TARGET_RATIO else 'MISSED'}")
    print("RESULT " + json.dumps({"runs": results, "ratio": ratio, "met": ratio <= TARGET_RATIO}))


if __name__ == "__main__":
    main()
