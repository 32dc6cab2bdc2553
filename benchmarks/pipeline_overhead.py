"""The pipeline's overhead: the default run through Prefect + Ray + Parquet + MLflow versus the same work
done by calling saliency/ in a plain loop (one process, torch on every core, no services).

    .venv/bin/python benchmarks/pipeline_overhead.py              # the default run: 1000 images
    .venv/bin/python benchmarks/pipeline_overhead.py --images 100 # a slice

Each side runs in a fresh subprocess. Prints wall time (interpreter start to exit), images per second and
peak memory (proportional set size summed over the subprocess and everything it started: Ray's GCS,
raylet and actors, Prefect's ephemeral server; shared pages counted once) for both, their ratio, and the
largest difference between the two sides' scores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _tree_pss_bytes(root: int) -> int:
    """Proportional set size of ``root`` and all its descendants, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:")), 0)
        except OSError:
            continue
    return total


def measure(command: list[str]) -> tuple[float, int, dict]:
    """Run a command; return its wall seconds, peak memory of its process tree, and its last JSON line."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak, stop = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_pss_bytes(process.pid))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    return seconds, peak, json.loads(output.strip().splitlines()[-1])


def plain_loop(n_images: int, out: Path) -> dict:
    """The default run's science with no services."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from saliency.data import batches
    from saliency.sanity import run_sanity
    from saliency.statistics import summarize
    from tasks.config import load_config
    from tasks.shards import load_configured_model, load_data

    cfg = load_config(overrides=[f"data.limit={n_images}", "tests.grid_pointing.enabled=false"])  # not for the CNN
    torch.set_num_threads(os.cpu_count() or 1)
    model, dataset, settings = load_configured_model(cfg), load_data(cfg), cfg.sanity_settings()
    tables = [run_sanity(model, x, settings, image_ids=ids, labels=labels, model_name=cfg.model.name)
              for ids, x, labels in batches(dataset, cfg.compute.batch_size)]
    scores = pa.concat_tables(tables)
    summarize(scores, n_boot=cfg.metrics.n_boot, seed=cfg.seed)
    pq.write_table(scores, out / "plain-scores.parquet")
    return {"scores": str(out / "plain-scores.parquet")}


def pipeline(n_images: int, out: Path) -> dict:
    import flows  # noqa: F401  (environment defaults for Ray and Prefect)
    from flows.sanity_check import sanity_check

    outcome = sanity_check(config=None, out=str(out), overrides=[f"data.limit={n_images}"], progress=False)
    return {"run_dir": outcome["run_dir"], "stats": outcome["stats"]}


def max_difference(plain, piped) -> float:
    import numpy as np

    keys = ["image_id", "method", "test", "state", "seed", "metric"]
    a = plain.sort_by([(k, "ascending") for k in keys])
    b = piped.sort_by([(k, "ascending") for k in keys])
    if a.num_rows != b.num_rows or not a.select(keys).equals(b.select(keys)):
        return float("inf")
    x, y = a["value"].to_numpy(zero_copy_only=False), b["value"].to_numpy(zero_copy_only=False)
    if (np.isfinite(x) != np.isfinite(y)).any():
        return float("inf")
    both = np.isfinite(x)
    return float(np.abs(x[both] - y[both]).max()) if both.any() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="held-out MNIST digits (default run: 1000)")
    parser.add_argument("--out", default=None, help="results root (default: a temporary directory)")
    parser.add_argument("--side", choices=("plain", "pipeline"), help=argparse.SUPPRESS)  # a child's job
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="pipeline-overhead-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.side:
        result = (plain_loop if args.side == "plain" else pipeline)(args.images, out)
        print(json.dumps(result))
        return

    from saliency.models import load_reference

    load_reference()  # train the reference CNN first if needed, so that neither side pays for it
    child = [sys.executable, __file__, "--images", str(args.images), "--out", str(out), "--side"]
    plain_seconds, plain_peak, plain = measure(child + ["plain"])
    piped_seconds, piped_peak, piped = measure(child + ["pipeline"])

    import pyarrow.parquet as pq

    from tasks.storage import RunDir

    plain_scores = pq.read_table(plain["scores"])
    piped_scores = RunDir(piped["run_dir"]).read_parts("scores")
    stats = piped["stats"]
    print(f"\n{args.images} images, {plain_scores.num_rows} scores, {os.cpu_count()} CPUs")
    print(f"{'':46s}{'wall s':>9s}{'img/s':>9s}{'peak MiB':>10s}")
    for name, seconds, peak in (("plain loop (saliency/ only)", plain_seconds, plain_peak),
                                ("pipeline (Prefect + Ray + Parquet + MLflow)", piped_seconds, piped_peak)):
        print(f"{name:46s}{seconds:9.1f}{args.images / seconds:9.2f}{peak / 2**20:10.0f}")
    print(f"pipeline / plain wall time: {piped_seconds / plain_seconds:.2f}x "
          f"(pipeline's shards alone: {stats['shard_seconds']:.1f} s, {stats['images_per_second']:.2f} img/s)")
    print(f"largest |score difference| pipeline vs plain: {max_difference(plain_scores, piped_scores):.2e}")
    print(f"pipeline results: {piped['run_dir']}")


if __name__ == "__main__":
    main()
