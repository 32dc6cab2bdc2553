"""Smooth MPRT (sMPRT, Hedström et al. 2023; SPEC §2.4): MPRT on denoised maps.

Every map — the trained model's and each randomised state's — is the mean of the method's maps over
``samples`` copies of the input, x + ε, ε ~ N(0, (noise · (max x − min x))²) per image, the last copy
noise-free, as Quantus's ``SmoothMPRT`` (N = 50, noise 0.1). The draws are seeded per (seed, image id,
sample) and are the same for the original and every randomised model, so only the model differs. The
states are MPRT's (its order, granularity, init and seeds: ``states_from="mprt"``), scored and read as
MPRT's: retention R at the head-randomised state and over the cascade. Averaging removes the shattered-
gradient noise that makes single maps unstable; it costs ``samples`` explain calls per map, so the test
is off by default (on in deployments/configs/smprt.yaml).

Retest levels: 1 for deterministic methods; for stochastic ones the smoothed original against a second
smoothed original drawn with the retest seed (the same input noise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from saliency.engine import explain
from saliency.methods import get_method
from saliency.options import check_options, option
from saliency.sanity.base import Block, as_2d, retest_seed
from saliency.sanity.mprt import ParameterRandomization, state_rows
from saliency.seeds import stable_seed
from saliency.similarity import similarity


@dataclass(frozen=True)
class SmoothOptions:
    samples: int = option(50, "copies of the input each map is averaged over, the last one noise-free "
                          "(Quantus's nr_samples)", ge=1)
    noise: float = option(0.1, "noise std as a share of each image's value range (Quantus's noise_magnitude)",
                          gt=0)

    def __post_init__(self) -> None:
        check_options(self)


def input_noise(x: Tensor, image_ids, seed: int, sample: int, noise: float) -> Tensor:
    """ε for one sample: standard normal draws per (seed, image id, sample) on the CPU, times
    noise · (max − min) of each image."""
    draws = torch.stack([torch.randn(x.shape[1:], dtype=x.dtype, generator=torch.Generator().manual_seed(
        stable_seed("smprt", seed, str(image_id), sample) % 2 ** 63)) for image_id in image_ids]).to(x.device)
    flat = x.detach().flatten(1)
    spread = (flat.max(dim=1).values - flat.min(dim=1).values).view(-1, *([1] * (x.dim() - 1)))
    return draws * noise * spread


@dataclass(frozen=True)
class SmoothParameterRandomization(ParameterRandomization):
    def smooth(self, run, model, targets: Tensor, methods=None, seed: int | None = None) -> dict[str, Tensor]:
        """{method: B×H×W}: the mean map over the noisy copies (the last noise-free) under ``model``."""
        o = run.options(self)
        methods = run.methods if methods is None else methods
        total: dict[str, Tensor] = {}
        for sample in range(o.samples):
            last = sample == o.samples - 1
            x = run.x if last else run.x + input_noise(run.x, run.image_ids, run.settings.seed, sample, o.noise)
            if seed is None:
                maps = run.explain(model, targets[:, None], x=x)
            else:
                run.explain_calls += 1
                maps = explain(model, x, methods, targets[:, None], layer=run.layer,
                               **{**run.explain_kwargs, "seed": seed})
            for method in methods:
                mean = as_2d(maps[method][:, 0]) / o.samples
                total[method] = mean if method not in total else total[method] + mean
        return total

    def blocks(self, run) -> Iterator[Block]:
        original = self.smooth(run, run.model, run.top)
        original = {m: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for m, v in original.items()}
        stochastic = [m for m in run.methods if get_method(m).stochastic]
        second = (self.smooth(run, run.model, run.top, stochastic, retest_seed(run.settings.seed))
                  if stochastic else {})
        ones = torch.ones(run.x.shape[0], dtype=torch.float64)
        run.derived[self.id] = {
            "original": original,
            "retest": {(m, metric): similarity(original[m], torch.nan_to_num(second[m]), metric) if m in second
                       else ones for m in run.methods for metric in run.metrics}}
        for seed, k, name, model, targets in self.states(run):
            yield Block(self.id, name, k, targets, self.smooth(run, model, targets), seed=seed)

    def score(self, run, block: Block) -> None:
        derived = run.derived[self.id]
        for method in run.methods:
            for metric in run.metrics:
                value, chance = run.paired(method, metric, block, original=derived["original"][method])
                run.rows.add(method, self.id, block, metric, value, chance, derived["retest"][(method, metric)])

    def rows_per_image(self, settings, n_states: int) -> int:
        return state_rows(settings, n_states) * len(list(settings.metrics))


SMPRT = SmoothParameterRandomization(
    id="smprt", title="Smooth MPRT (sMPRT)", curve=True, options=SmoothOptions, states_from="mprt",
    enabled_by_default=False,
    scope_words={"head": "head randomised", "cascade": "mean over the cascade"},
    controls=(("edge_sobel", None, "fail"), ("random", None, "uninformative")),
    description="Smooth MPRT (Hedström et al. 2023): MPRT on maps averaged over 50 noisy copies of the input "
                "(noise 0.1 of the image's range, the same draws for the trained and every randomised model): "
                "retention R of the denoised original map under each randomised model. R near 0 passes.")
