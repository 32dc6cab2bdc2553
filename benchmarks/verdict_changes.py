"""Which verdicts changed between two runs (or two verdict tables), as Markdown.

    .venv/bin/python benchmarks/verdict_changes.py BEFORE AFTER [--metric ssim] [--label-before …]

BEFORE and AFTER are run directories or verdicts.parquet files. Every (model, method, test, scope,
metric) cell whose verdict differs is listed with R [95% CI] (eMPRT: the entropy rise) on both sides,
then the counts. Rows are matched on the cell, so a run of another model or method set only shows
the cells both runs have; cells on one side only are counted, not listed.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

KEYS = ("model", "method", "test", "scope", "metric")


def read_verdicts(path: str) -> pa.Table:
    p = Path(path)
    return pq.read_table(p / "verdicts.parquet" if p.is_dir() else p)


def cell_text(row: dict) -> str:
    """R [CI] (the value for a test without retention) and the verdict, † when threshold-sensitive."""
    if row["test"] == "emprt" or row["retention_mean"] is None or not math.isfinite(row["retention_mean"]):
        low, mean, high = row["ci_low"], row["mean"], row["ci_high"]
    else:
        low, mean, high = row["retention_ci_low"], row["retention_mean"], row["retention_ci_high"]
    number = "–" if mean is None or not math.isfinite(mean) else f"{mean:.2f} [{low:.2f}, {high:.2f}]"
    return f"{row['verdict']} {number}" + (" †" if row.get("threshold_sensitive") else "")


def changes(before: pa.Table, after: pa.Table, metrics: set[str] | None = None) -> tuple[list[tuple], dict]:
    """([(cell key, before row, after row)] of the cells whose verdict differs, counts)."""
    old = {tuple(r[k] for k in KEYS): r for r in before.to_pylist()}
    new = {tuple(r[k] for k in KEYS): r for r in after.to_pylist()}
    common = [k for k in new if k in old and (metrics is None or k[4] in metrics)]
    changed = [(k, old[k], new[k]) for k in common if old[k]["verdict"] != new[k]["verdict"]]
    counts = {"cells compared": len(common), "changed": len(changed),
              "only before": len(old.keys() - new.keys()), "only after": len(new.keys() - old.keys())}
    return changed, counts


def markdown(changed: list[tuple], labels: tuple[str, str]) -> str:
    lines = [f"| model | method | test | scope | metric | {labels[0]} | {labels[1]} |", "|---" * 7 + "|"]
    for key, old, new in sorted(changed):
        lines.append("| " + " | ".join(map(str, key)) + f" | {cell_text(old)} | {cell_text(new)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--metric", action="append", help="only these metrics (repeatable; default: all)")
    parser.add_argument("--label-before", default="before")
    parser.add_argument("--label-after", default="after")
    args = parser.parse_args()
    changed, counts = changes(read_verdicts(args.before), read_verdicts(args.after),
                              set(args.metric) if args.metric else None)
    print(markdown(changed, (args.label_before, args.label_after)))
    print()
    print("; ".join(f"{name}: {value}" for name, value in counts.items()))


if __name__ == "__main__":
    main()
