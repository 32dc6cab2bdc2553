"""Which verdicts changed between two runs (or two verdict tables), as Markdown.

    .venv/bin/python benchmarks/verdict_changes.py BEFORE AFTER [--metric ssim] [--label-before …]

BEFORE and AFTER are run directories or verdicts.parquet files. Every (model, method, test, scope,
metric) cell whose verdict differs is listed with R [95% CI] (eMPRT: the entropy rise) on both sides,
then the counts. Rows are matched on the cell, so a run of another model or method set only shows
the cells both runs have; cells on one side only are counted, not listed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.answer import CELL_KEYS, cell_text, verdict_changes as changes  # noqa: E402


def read_verdicts(path: str) -> pa.Table:
    p = Path(path)
    return pq.read_table(p / "verdicts.parquet" if p.is_dir() else p)


def markdown(changed: list[tuple], labels: tuple[str, str]) -> str:
    lines = ["| " + " | ".join(CELL_KEYS) + f" | {labels[0]} | {labels[1]} |", "|---" * 7 + "|"]
    for key, old, new in changed:
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
