"""The train_reference flow: train (or load from cache) a reference model on the bundled MNIST digits."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from prefect import flow, get_run_logger
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from saliency.models import train_reference


@flow(name="train_reference")
def train_reference_flow(force: bool = False, cache_dir: str | None = None, seed: int = 0,
                         progress: bool = False, architecture: str = "reference") -> dict[str, Any]:
    """Train a reference model ("reference" or "reference_resnet") unless it is cached (``force``
    retrains); returns its info (accuracy on the 1000 held-out digits, cache path, seconds)."""
    logger = get_run_logger()
    bar = Progress(TextColumn("epochs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                   TimeElapsedColumn()) if progress else nullcontext()
    with bar:
        job = bar.add_task("train", total=None, loss="") if progress else None

        def report(epoch: int, epochs: int, loss: float) -> None:
            logger.info("epoch %d/%d: loss %.4f", epoch, epochs, loss)
            if progress:
                bar.update(job, completed=epoch, total=epochs, loss=f"loss {loss:.4f}")

        _, info = train_reference(cache_dir=cache_dir, seed=seed, force=force, progress=report,
                                  architecture=architecture)
    logger.info("%s model: accuracy %.4f, %s", architecture, info.get("accuracy", float("nan")), info["cache_path"])
    return info
