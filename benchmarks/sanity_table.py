"""The paper's claim on the reference model: class sensitivity (min class) and the fully randomised
top-down cascade, mean ± std of ssim and spearman_abs per method, with the verdict against edge_sobel.

    .venv/bin/python benchmarks/sanity_table.py [--images 200] [--batch 50]

Trains (or loads from cache) the reference CNN and uses the first N held-out MNIST digits.
"""
from __future__ import annotations

import argparse
import time

import pyarrow as pa
import pyarrow.compute as pc
import torch

from saliency.data import batches, load_dataset
from saliency.models import load_reference
from saliency.randomize import parameter_layers
from saliency.sanity import class_sensitivity, parameter_randomization, summarize, verdicts

METHODS = ["gradient", "gradcam", "gradcampp", "gradcampp/signed", "fullgrad", "fullgrad/signed",
           "guided_backprop", "rectgrad", "lrp_zplus", "lrp_epsilon", "edge_sobel", "random"]
METRICS = ("ssim", "spearman_abs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    start = time.perf_counter()
    model = load_reference()
    data = load_dataset("mnist", split="test", limit=args.images)
    last = len(parameter_layers(model, example_input=data[0].image[None])) - 1
    tables = []
    for ids, x, labels in batches(data, args.batch):
        tables.append(class_sensitivity(model, x, METHODS, others=("min",), metrics=METRICS,
                                        image_ids=ids, labels=labels, model_name="reference"))
        tables.append(parameter_randomization(model, x, METHODS, metrics=METRICS, states=[last],
                                              emprt=False, image_ids=ids, labels=labels,
                                              model_name="reference"))
    summary = summarize(pa.concat_tables(tables))
    verdict = verdicts(summary)
    print(f"reference CNN, {args.images} held-out MNIST digits, {time.perf_counter() - start:.1f} s; "
          f"cascade state {last} = fully randomised; fail = mean not significantly below edge_sobel")
    header = f"| {'method':18s} |" + "".join(
        f" {t} {m:12s} |" for t in ("class-min", "random-model") for m in METRICS)
    print(header)
    print("|" + "---|" * (1 + 2 * len(METRICS)))
    for method in METHODS:
        cells = []
        for test in ("class_sensitivity", "mprt"):
            for metric in METRICS:
                row = summary.filter(pc.and_(pc.and_(pc.equal(summary["method"], method),
                                                     pc.equal(summary["test"], test)),
                                             pc.equal(summary["metric"], metric))).to_pylist()[0]
                v = verdict.filter(pc.and_(pc.and_(pc.equal(verdict["method"], method),
                                                   pc.equal(verdict["test"], test)),
                                           pc.equal(verdict["metric"], metric))).to_pylist()
                mark = "" if method == "edge_sobel" or not v else f" {v[0]['verdict']}"
                cells.append(f"{row['mean']:.3f} ± {row['std']:.3f}{mark}")
        print(f"| {method:18s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
