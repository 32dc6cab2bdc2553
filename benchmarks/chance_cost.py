"""What averaging the chance level over K partners costs (SPEC §4, issue 19): one batch of the default
run's work (reference CNN, 50 held-out digits, every method of the paper, class sensitivity against
min and random, the full top-down cascade for one seed, eMPRT, ssim and spearman_abs) with K = 1 and
with K = 10, interleaved in one process, median of the repeats.

    .venv/bin/python benchmarks/chance_cost.py [--repeats 3] [--partners 10]

Prints the seconds of each side and their ratio; the extra cost is scoring only (the maps are the same).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from saliency.data import batches, load_dataset
from saliency.methods import PAPER_METHODS
from saliency.models import load_model
from saliency.sanity import Settings, run_sanity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partners", type=int, default=10)
    parser.add_argument("--images", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as one actor of the default run
    model = load_model("reference")
    ids, x, labels = next(iter(batches(load_dataset("mnist", split="test", limit=args.images), args.images)))
    times: dict[int, list[float]] = {1: [], args.partners: []}
    rows = {}
    for _ in range(args.repeats):
        for k in times:
            settings = Settings(methods=PAPER_METHODS, chance_partners=k,
                                options={"class_sensitivity": {"others": ["min", "random"]}, "mprt": {"seeds": [0]}})
            start = time.perf_counter()
            rows[k] = run_sanity(model, x, settings, image_ids=ids, labels=labels).num_rows
            times[k].append(time.perf_counter() - start)
    one, many = (statistics.median(times[k]) for k in times)
    print(f"{args.images} images, {rows[1]} score rows, median of {args.repeats}: K=1 {one:.1f} s, "
          f"K={args.partners} {many:.1f} s, ratio {many / one:.3f} (+{100 * (many / one - 1):.1f}%)")


if __name__ == "__main__":
    main()
