"""The scale model (issue 10, case 6): measure per-image and per-shard costs here, project the full study.

    .venv/bin/python benchmarks/scale_model.py                    # measure (CPU) and print the projection
    .venv/bin/python benchmarks/scale_model.py --gpu-pass-rate 1500 --skip-pipeline

Measured here, on the CPU (resnet50, 224², batch --batch):
  pass      one plain forward + backward to the input (the unit of GPU work);
  explain   one explain call with the study's 24 default method ids for one target (an MPRT state) and
            for 3 targets (class sensitivity: top class + min + random), in units of ``pass``;
  score     scoring one block (the 24 methods' maps against the original's and the chance partner's, ssim
            + spearman_abs, plus the eMPRT entropy), in units of ``pass``;
  write     seconds per million score rows written as zstd Parquet (the actor writes its own parts);
  driver    the driver's overhead per shard: a pipeline run with the near-free ``random`` method on many
            tiny shards, (shard phase − actor seconds) / shards, with one actor;
  aggregate seconds per million score rows (benchmarks/aggregate_scale.py rows; pass --aggregate-rate).
Assumed (no GPU was measured): ``--gpu-pass-rate`` images per second of one resnet50 224² forward +
input-backward on one GPU, and that explain and score cost the same multiple of a pass there as here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the full study (issue 10): ImageNet-val, resnet50, ≈ 25 method ids, 2 other classes, a 40-state
# cascade, 3 seeds, 2 similarity metrics and eMPRT
STUDY = {"images": 50_000, "methods": 24, "others": 2, "states": 40, "seeds": 3, "metrics": 2,
         "images_per_shard": 100}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_engine(batch: int, repeats: int) -> dict:
    import torch
    import torchvision

    import saliency
    from saliency.similarity import similarity
    from tasks.config import Config

    torch.manual_seed(0)
    methods = Config().methods.ids
    model = torchvision.models.resnet50().eval()
    x = torch.randn(batch, 3, 224, 224)
    top = model(x).argmax(1)
    three = torch.stack([top, (top + 1) % 1000, (top + 2) % 1000], dim=1)

    def plain():
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xi).gather(1, top[:, None]).sum(), xi)

    plain()
    pass_seconds = best(plain, repeats)
    maps = {}
    state_seconds = best(lambda: maps.update(saliency.explain(model, x, methods, top[:, None])), 1)
    class_seconds = best(lambda: saliency.explain(model, x, methods, three), 1)
    partner = torch.roll(torch.arange(batch), 1)

    def score():
        for values in maps.values():
            a, b = values[:, 0], values[:, 0].flip(-1)
            for metric in ("ssim", "spearman_abs"):
                similarity(a, b, metric)
                similarity(a, b[partner], metric)
            torch.histc(a.flatten(), bins=100)  # the eMPRT entropy's histogram

    score_seconds = best(score, repeats)
    return {"batch": batch, "methods": len(methods), "pass_seconds": pass_seconds,
            "state_call_passes": state_seconds / pass_seconds, "class_call_passes": class_seconds / pass_seconds,
            "score_block_passes": score_seconds / pass_seconds, "threads": torch.get_num_threads()}


def measure_write() -> float:
    """Seconds per million rows written (zstd Parquet, atomically), on synthetic default-layout rows."""
    from aggregate_scale import synthetic_part
    from tasks.storage import RunDir

    part = synthetic_part(0, 100, 0)
    directory = RunDir(tempfile.mkdtemp(prefix="scale-write-"))
    seconds = best(lambda: directory.write_part("scores", 0, part), 3)
    return seconds / part.num_rows * 1e6


def measure_driver(n_shards: int) -> dict:
    """The driver's per-shard overhead with a near-free method, one actor."""
    import flows  # noqa: F401
    from flows.sanity_check import sanity_check

    overrides = [f"data.limit={2 * n_shards}", "methods.ids=random", "metrics.names=ssim", "metrics.n_boot=10",
                 "tests.mprt.enabled=false", "tests.emprt.enabled=false", "tests.class_sensitivity.others=min", "compute.images_per_shard=2",
                 "compute.batch_size=2", "compute.actors=1", "storage.store_maps=none", "storage.report=false",
                 "tracking.enabled=false"]
    outcome = sanity_check(config=None, out=tempfile.mkdtemp(prefix="scale-driver-"), overrides=overrides)
    actor = sum(shard["seconds"] for shard in outcome["shards"].values())
    shard_phase = outcome["stats"]["shard_seconds"]
    return {"shards": n_shards, "shard_phase_seconds": shard_phase, "actor_seconds": actor,
            "overhead_per_shard": (shard_phase - actor) / n_shards}


def project(engine: dict, write_per_million: float, driver_per_shard: float, aggregate_per_million: float,
            gpu_pass_rate: float) -> list[dict]:
    s = STUDY
    rows_per_image = s["methods"] * (s["others"] * s["metrics"] + s["seeds"] * s["states"] * (s["metrics"] + 1))
    calls_passes = engine["class_call_passes"] + s["seeds"] * s["states"] * engine["state_call_passes"]
    score_passes = (1 + s["seeds"] * s["states"]) * engine["score_block_passes"]
    gpu_seconds_per_image = (calls_passes + score_passes) / gpu_pass_rate  # pass units scale per image
    n_shards = -(-s["images"] // s["images_per_shard"])
    rows = s["images"] * rows_per_image
    table = []
    for gpus in (1, 8, 64):
        compute = s["images"] * gpu_seconds_per_image / gpus
        write = rows * write_per_million / 1e6 / gpus  # each actor writes its own parts, in parallel
        driver = n_shards * driver_per_shard  # serial in the driver
        aggregate = rows * aggregate_per_million / 1e6  # serial, one part at a time
        table.append({"gpus": gpus, "compute_h": compute / 3600, "write_h": write / 3600, "driver_h": driver / 3600,
                      "aggregate_h": aggregate / 3600, "total_h": (compute + write + driver + aggregate) / 3600})
    return [{"rows_per_image": rows_per_image, "rows": rows, "shards": n_shards,
             "passes_per_image": calls_passes + score_passes}] + table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-pass-rate", type=float, default=1500.0,
                        help="ASSUMED images/s of one resnet50 224² forward + input-backward on one GPU")
    parser.add_argument("--aggregate-rate", type=float, default=None,
                        help="seconds per million rows of aggregation (from aggregate_scale.py rows)")
    parser.add_argument("--driver-shards", type=int, default=40)
    parser.add_argument("--skip-pipeline", action="store_true", help="reuse --driver-overhead instead")
    parser.add_argument("--driver-overhead", type=float, default=None, help="seconds per shard")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))

    engine = measure_engine(args.batch, args.repeats)
    print("engine (CPU, measured):", json.dumps(engine))
    write = measure_write()
    print(f"write (measured): {write:.2f} s per million rows")
    if args.skip_pipeline:
        driver = {"overhead_per_shard": args.driver_overhead or 0.0}
    else:
        driver = measure_driver(args.driver_shards)
    print("driver (measured):", json.dumps(driver))
    aggregate = args.aggregate_rate if args.aggregate_rate is not None else 2.0
    head, *table = project(engine, write, driver["overhead_per_shard"], aggregate, args.gpu_pass_rate)
    print(f"\nstudy: {STUDY}; {head['rows_per_image']} score rows per image, {head['rows'] / 1e6:.0f} M rows, "
          f"{head['shards']} shards, {head['passes_per_image']:.0f} pass-equivalents per image; "
          f"assumed GPU pass rate {args.gpu_pass_rate:.0f} images/s")
    print(f"{'GPUs':>5s}{'compute h':>11s}{'write h':>9s}{'driver h':>10s}{'aggregate h':>13s}{'total h':>9s}")
    for r in table:
        print(f"{r['gpus']:5d}{r['compute_h']:11.2f}{r['write_h']:9.2f}{r['driver_h']:10.2f}{r['aggregate_h']:13.2f}"
              f"{r['total_h']:9.2f}")
    print("RESULT " + json.dumps({"engine": engine, "write_per_million": write, "driver": driver,
                                  "aggregate_per_million": aggregate, "gpu_pass_rate": args.gpu_pass_rate,
                                  "study": head, "table": table}))


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    main()
