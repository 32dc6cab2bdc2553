"""Shards and the data/model loading shared by the planner and the actors (no Prefect here: actors import it)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from saliency.data import ImageDataset, load_dataset
from saliency.models import REFERENCE_MODELS, load_model, train_reference
from saliency.sanity import get_test
from tasks.config import Config, ConfigError


@dataclass(frozen=True)
class Shard:
    """Images [start, stop) of the dataset, in its stable order; with ``pieces`` > 1, piece ``piece`` of
    the shard's work (``tasks.pieces``: a shard shared by several actors)."""
    index: int
    start: int
    stop: int
    piece: int = 0
    pieces: int = 1

    @property
    def n_images(self) -> int:
        return self.stop - self.start

    @property
    def progress_key(self) -> int | tuple[int, int]:
        """What the progress board counts it under: the shard, or (shard, piece)."""
        return self.index if self.pieces == 1 else (self.index, self.piece)


def shard_ranges(n_images: int, images_per_shard: int) -> list[Shard]:
    return [Shard(i, start, min(start + images_per_shard, n_images))
            for i, start in enumerate(range(0, n_images, images_per_shard))]


def load_data(cfg: Config) -> ImageDataset:
    """The configured dataset, silently: the images it skips (corrupt, outside the root) are in its
    ``failures``, which the run reports once, one line each; the library's warnings would repeat them
    with a source line every time the planner, an actor or the report loads the data."""
    d = cfg.data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_dataset(d.dataset, split=d.split, limit=d.limit, root=d.root, image_size=d.image_size,
                            **d.options)


def load_configured_model(cfg: Config) -> nn.Module:
    """The configured model; weights it is built with at random (a torchvision name without weights, a
    factory that loads none) are drawn under ``cfg.seed``, so that a run and its resume explain one model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return load_model(cfg.model.name, weights=cfg.model.weights, num_classes=cfg.model.num_classes)


def load_model_saying_how(cfg: Config) -> tuple[nn.Module, str]:
    """The configured model and a line saying where it came from: a reference model without weights
    says whether it was loaded from the cache or trained now (a minute on a fresh machine)."""
    m = cfg.model
    if m.name in REFERENCE_MODELS and m.weights is None and m.num_classes in (None, 10):
        model, info = train_reference(architecture=m.name)
        how = (f"loaded from the cache {info['cache_path']}" if info["cached"] else
               f"not cached: trained now in {info['seconds']:.0f} s, accuracy {info['accuracy']:.4f} "
               f"(cached at {info['cache_path']})")
        return model, f"{m.name} model {how}"
    return load_configured_model(cfg), f"{m.name} model" + ("" if m.weights is None else f", weights {m.weights}")


def example_input(dataset):
    """The first readable image of the dataset as a batch of one (the planner's checks run on it)."""
    for i in range(len(dataset)):
        try:
            return dataset[i].image[None]
        except Exception:  # a corrupt image: try the next one (the shard records it)
            continue
    raise ConfigError(f"dataset {dataset.name!r} has no readable image")


def inapplicable_tests(cfg: Config, model: nn.Module, example) -> dict[str, str]:
    """{test id: why} of the enabled tests this model cannot take (a grid twice the image's side through
    a flatten layer), said before any work; a config whose every test is inapplicable is refused."""
    options = cfg.tests.options()
    reasons = {}
    for test in cfg.tests.enabled():
        try:
            reason = get_test(test).applicable(model, example, options[test])
        except ValueError as error:  # an option that cannot work (a twin's weights file that does not fit)
            raise ConfigError(f"config field `tests.{test}`: {error}") from None
        if reason is not None:
            reasons[test] = reason
    if reasons and len(reasons) == len(cfg.tests.enabled()):
        raise ConfigError("config field `tests`: no enabled sanity test applies to this model: "
                          + "; ".join(f"{test}: {why}" for test, why in reasons.items()))
    return reasons


def provenance_of_tests(cfg: Config, model: nn.Module, not_applicable: dict[str, str]) -> dict[str, str]:
    """{test id: what it brings beside the model} of the enabled, applicable tests that say (a twin)."""
    options = cfg.tests.options()
    return {test: said for test in cfg.tests.enabled() if test not in not_applicable
            and (said := get_test(test).provenance(model, options[test])) is not None}
