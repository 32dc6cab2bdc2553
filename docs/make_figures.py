"""Make the README's opening figures from a real run: docs/verdict_matrix.png (the report's verdict
matrix) and docs/paper_figure.png (the paper's comparison, from the run's stored maps).

    python docs/make_figures.py               # runs the natural-image reference first (see RUN below)
    python docs/make_figures.py RUN_DIR       # draws from a finished run directory

RUN is the CIFAR-10 ResNet-20 config (deployments/configs/cifar_resnet20.yaml) cut to one randomisation
seed and the first 50 of its 100 images: a sixth of the full three-seed run's work (about 30 min on a
2-core machine); the README's caption says so. Maps of the first 6 images are stored for the figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "deployments" / "configs" / "cifar_resnet20.yaml"
RUN = ["data.limit=50", "tests.mprt.seeds=[0]", "compute.images_per_shard=25", "storage.sample_images=6",
       "tracking.enabled=false"]
MAX_BYTES = 300_000


def run_reference(out: str) -> str:
    from flows.sanity_check import sanity_check

    return sanity_check(config=str(CONFIG), out=out, overrides=RUN, progress=True)["run_dir"]


def draw(run_dir: str, docs: Path) -> list[Path]:
    from saliency.plots import verdict_matrix_figure
    from tasks.manifest import read_manifest
    from tasks.report_content import verdict_matrices
    from tasks.report_run import input_images, paper_figure_of, stored_maps
    from tasks.storage import RunDir

    docs.mkdir(parents=True, exist_ok=True)
    directory = RunDir(run_dir)
    manifest = read_manifest(directory)
    (matrix,) = verdict_matrices(directory.read_table("verdicts.parquet"))
    headings = [f"{_short(head['title'])}\n{s['scope']}" + (f" ({s['words']})" if s["words"] else "")
                for head in matrix["columns"] for s in head["scopes"]]
    rows = [(group["label"], row["method"],
             [None if c is None else (c["verdict"], f"{c['verdict']}  {c['label'] + ' ' if c['label'] else ''}{c['value']}")
              for c in row["cells"]])
            for group in matrix["groups"] for row in group["rows"]]
    seeds = manifest.randomization.seeds
    title = (f"{manifest.model} on {manifest.n_images} {manifest.dataset} images, randomisation seed"
             f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}: verdict, R [95% CI] "
             f"(eMPRT: entropy rise) at ssim")
    written = [_save(verdict_matrix_figure(rows, headings, title), docs / "verdict_matrix.png", 160)]
    maps = stored_maps(directory)
    ids = list(dict.fromkeys(maps["image_id"].to_pylist()))
    paper = paper_figure_of(maps, input_images(manifest, ids), manifest)
    if paper is None:
        raise SystemExit(f"{run_dir} has no stored maps of the paper's methods (storage.store_maps=sample)")
    written.append(_save(paper, docs / "paper_figure.png", 72))
    return written


def _short(title: str) -> str:
    """A test's title, or its abbreviation in parentheses when the title is long ("MPRT")."""
    if len(title) > 20 and title.endswith(")"):
        return title[title.rindex("(") + 1:-1]
    return title


def _save(fig, path: Path, dpi: int) -> Path:
    """Save at ``dpi``, lowering it until the PNG is under MAX_BYTES (README images stay small)."""
    while True:
        fig.savefig(path, dpi=dpi)
        if path.stat().st_size < MAX_BYTES or dpi <= 40:
            return path
        dpi = int(dpi * 0.85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a finished run directory; omitted: run RUN first")
    parser.add_argument("--out", default=str(ROOT / "runs-docs"), help="results root of the run (no RUN_DIR)")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where the PNGs go")
    args = parser.parse_args()
    run_dir = args.run_dir or run_reference(args.out)
    for path in draw(run_dir, Path(args.docs)):
        print(f"{path}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
