"""The paper's claims as verdicts: method × test → R (95% CI) and verdict, and the paired
pos/abs-vs-signed comparison table, as Markdown.

    .venv/bin/python benchmarks/sanity_table.py RUN_DIR [--metric ssim]
    .venv/bin/python benchmarks/sanity_table.py --model reference_resnet [--images 200] [--seeds 0,1,2]

With RUN_DIR it reads the run's verdicts.parquet and comparisons.parquet; otherwise it computes them with
the library alone (no services) on the first N held-out MNIST digits, every method of the paper, the
default tests (others min and random, the full top-down cascade) in batches of 50.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saliency.data import batches, load_dataset
from saliency.methods import PAPER_METHODS
from saliency.models import load_model
from saliency.sanity import class_sensitivity, get_test, parameter_randomization
from saliency.statistics import comparisons, summarize, verdicts

COLUMNS = (("class_sensitivity", "min"), ("class_sensitivity", "random"), ("mprt", "head"), ("mprt", "cascade"),
           ("emprt", "full"))


def compute(model_name: str, images: int, seeds: list[int]) -> tuple[pa.Table, pa.Table]:
    model = load_model(model_name)
    data = load_dataset("mnist", split="test", limit=images)
    tables = []
    for ids, x, labels in batches(data, 50):
        common = dict(image_ids=ids, labels=labels, model_name=model_name, metrics=("ssim", "spearman_abs"))
        tables.append(class_sensitivity(model, x, PAPER_METHODS, others=("min", "random"), **common))
        tables.append(parameter_randomization(model, x, PAPER_METHODS, randomization_seeds=seeds, **common))
    scores = pa.concat_tables(tables)
    return verdicts(summarize(scores)), comparisons(scores)


def verdict_markdown(table: pa.Table, metric: str) -> str:
    cells: dict[tuple[str, str, str], str] = {}
    for r in table.to_pylist():
        normalised = get_test(r["test"]).normalised
        if r["metric"] != metric and normalised:
            continue
        if not normalised:
            value = f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        else:
            value = f"{r['retention_mean']:.2f} [{r['retention_ci_low']:.2f}, {r['retention_ci_high']:.2f}]"
        cells[(r["method"], r["test"], r["scope"])] = f"{value} {r['verdict']}" + (" †" if r.get("threshold_sensitive") else "")
    methods = list(dict.fromkeys(r["method"] for r in table.to_pylist()))
    lines = ["| method | " + " | ".join(f"{t} {s}" for t, s in COLUMNS) + " |", "|---" * (1 + len(COLUMNS)) + "|"]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cells.get((method, t, s), "") for t, s in COLUMNS) + " |")
    return "\n".join(lines)


def comparison_markdown(table: pa.Table, metric: str) -> str:
    lines = ["| variant vs signed | test | scope | n | R variant | R signed | ΔR [95% CI] | p (Holm) | rank-biserial |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_pylist():
        if r["metric"] == metric:
            lines.append(f"| {r['variant']} vs {r['signed']} | {r['test']} | {r['scope']} | {r['n']} | "
                         f"{r['variant_retention']:.2f} | {r['signed_retention']:.2f} | {r['mean_difference']:+.2f} "
                         f"[{r['difference_ci_low']:+.2f}, {r['difference_ci_high']:+.2f}] | {r['p_holm']:.1e} | "
                         f"{r['rank_biserial']:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", help="a finished run directory")
    parser.add_argument("--model", default="reference")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--metric", default="ssim")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.run_dir:
        verdict = pq.read_table(Path(args.run_dir) / "verdicts.parquet")
        paired = pq.read_table(Path(args.run_dir) / "comparisons.parquet")
        print(f"{args.run_dir}; R (95% CI) and verdict on {args.metric}; eMPRT: entropy rise")
    else:
        torch.set_num_threads(2)
        seeds = [int(s) for s in args.seeds.split(",")]
        verdict, paired = compute(args.model, args.images, seeds)
        print(f"{args.model}, {args.images} held-out MNIST digits, seeds {seeds}, "
              f"{time.perf_counter() - start:.0f} s; R (95% CI) and verdict on {args.metric}; eMPRT: entropy rise")
    print(verdict_markdown(verdict, args.metric))
    print()
    print(comparison_markdown(paired, args.metric))


if __name__ == "__main__":
    main()
