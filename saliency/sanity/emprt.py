"""eMPRT (Hedström et al. 2023): the relative rise of map entropy under randomisation, scored on MPRT's
maps. Metric "entropy_rise" = (H_k − H_0)/H_0 of the 100-bin histogram entropy (see
``discrete_entropy``); for a cascade the last state is eMPRT proper. A rise passes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saliency.sanity.base import Block, SanityTest
from saliency.sanity.mprt import randomization_seeds

ENTROPY_BINS = 100
ENTROPY_METRIC = "entropy_rise"


def discrete_entropy(maps: Tensor, bins: int = ENTROPY_BINS) -> Tensor:
    """Shannon entropy (nats) of each map's histogram: ``bins`` equal bins spanning that map's own
    min..max, on the signed values, as quantus.functions.discrete_entropy (np.histogram, then
    scipy.stats.entropy). np.histogram on the map's own dtype is used so that values on a bin edge
    fall in the same bin as in Quantus.

    maps: B×H×W (or B×…); returns float64 B on the maps' device. A constant map has entropy 0. A finite
    map whose range overflows its dtype (np.histogram: "Too many bins for data range") is binned after
    the affine rescaling (v − min)/(max − min) in float64, which puts every value in the same bin in
    exact arithmetic, instead of losing the whole call (issue 18).
    """
    flat = maps.detach().flatten(1).cpu().numpy()
    entropies = []
    for row in flat:
        counts = _histogram(row, bins)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return torch.tensor(entropies, dtype=torch.float64, device=maps.device)


def _histogram(row: np.ndarray, bins: int) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            return np.histogram(row, bins=bins)[0]
        except ValueError:
            if not np.isfinite(row).all():
                raise
    shifted = row.astype(np.float64) - float(row.min())
    return np.histogram(shifted / max(float(shifted.max()), np.finfo(np.float64).tiny), bins=bins)[0]


def entropy_rise(original: Tensor, randomized: Tensor, bins: int = ENTROPY_BINS) -> Tensor:
    """eMPRT score per image: (H(randomised) − H(original)) / H(original); NaN where H(original) = 0."""
    h_orig = discrete_entropy(original, bins)
    h_rand = discrete_entropy(randomized, bins)
    safe = torch.where(h_orig > 0, h_orig, torch.ones_like(h_orig))
    return torch.where(h_orig > 0, (h_rand - h_orig) / safe, torch.full_like(h_orig, math.nan))


@dataclass(frozen=True)
class EntropyRise(SanityTest):
    def score(self, run, block: Block) -> None:
        for method in run.methods:
            run.rows.add(method, self.id, block, ENTROPY_METRIC, entropy_rise(run.original[method], block.maps[method]))

    def rows_per_image(self, settings, n_states: int) -> int:
        states = n_states if settings.states is None else len(set(settings.states))
        return len(randomization_seeds(settings)) * states

    def scope(self, state: str, state_index: int, n_states: int, order: str) -> str | None:
        return "full" if state_index == n_states - 1 else None


EMPRT = EntropyRise(
    id="emprt", title="eMPRT (entropy rise)", direction="higher", normalised=False, curve=True,
    figure="value", maps_from="mprt",
    description="eMPRT (Hedström et al. 2023): relative rise of the 100-bin histogram entropy of the map "
                "from the trained to the randomised model, i.e. a rise in map complexity; the verdict reads the "
                "fully randomised state. A rise passes (the map became noise); no rise fails. It measures "
                "complexity, not retention, so it neither supports nor refutes an MPRT verdict.")
