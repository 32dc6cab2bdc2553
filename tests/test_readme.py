"""The README's Python blocks run as written (its library snippet raised IndexError: `targets=None`
gives one target per image, and it indexed a second)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs_as_written(tmp_path, monkeypatch):
    """Every ```python block, in order, in one namespace, in a folder holding a run directory as `run`
    leaves it (summary.parquet, written by the library from real scores), as the blocks' reader has."""
    import saliency
    from saliency.data import load_dataset
    from saliency.models import load_model
    from saliency.statistics import summarize

    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    model = load_model("cifar_resnet20")
    x = torch.stack([s.image for s in load_dataset("cifar10_sample", limit=2)])
    run_dir = tmp_path / "runs" / "reference-mnist-0123456789ab"
    run_dir.mkdir(parents=True)
    summarize(saliency.sanity.class_sensitivity(model, x, ["gradient"]), n_boot=20).to_pandas().to_parquet(
        run_dir / "summary.parquet")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    assert namespace["maps"]["gradcampp"].shape == (2, 2, 32, 32)  # B×T×H×W with T = 2 targets
    assert len(namespace["summary"]) > 0
