"""eMPRT (Hedström et al. 2023): the relative rise of map entropy under randomisation, scored on MPRT's
maps. Metric "entropy_rise" = (H_k − H_0)/H_0 of the 100-bin histogram entropy (see
``discrete_entropy``); for a cascade the last state is eMPRT proper. A rise passes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saliency.options import check_options, option
from saliency.sanity.base import Block, SanityTest
from saliency.sanity.mprt import state_rows
from saliency.sanity.rules import Verdict, ci_verdict

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
class EntropyOptions:
    bins: int = option(ENTROPY_BINS, "equal bins of each map's histogram (Quantus: 100)", ge=2)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class EntropyThresholds:
    entropy_rise: float = option(0.0, "eMPRT passes when the entropy rise's CI is above it")


@dataclass(frozen=True)
class EntropyRise(SanityTest):
    def score(self, run, block: Block) -> None:
        bins = run.options(self).bins
        for method in run.methods:
            run.rows.add(method, self.id, block, ENTROPY_METRIC,
                         entropy_rise(run.original[method], block.maps[method], bins))

    def rows_per_image(self, settings, n_states: int) -> int:
        return state_rows(settings, n_states)

    def scope(self, state: str, state_index: int, n_states: int, options) -> str | None:
        return "full" if state_index == n_states - 1 else None

    def reading(self, rules) -> str:
        return f"eMPRT passes when CI(entropy rise) > {rules.threshold('entropy_rise'):g}"

    def verdict(self, row, rules, source_gaps) -> Verdict:
        """A rise passes, no rise fails; uninformative where MPRT cannot tell the maps from another
        image's on any metric at this state (the entropy of such maps says nothing about the model)."""
        if source_gaps and all(g is not None and math.isfinite(g) and g < rules.min_gap for g in source_gaps):
            reason = f"MPRT mean(r − c) < {rules.min_gap} on every metric at this state"
            return Verdict("uninformative", reason, "uninformative", "uninformative")
        return ci_verdict(row, rules.threshold("entropy_rise"), "entropy rise")


EMPRT = EntropyRise(
    id="emprt", title="eMPRT (entropy rise)", direction="higher", normalised=False, curve=True,
    figure="value", maps_from="mprt", options=EntropyOptions, thresholds=EntropyThresholds,
    scope_words={"full": "fully randomised"},
    controls=(("edge_sobel", None, "fail"), ("random", None, "uninformative")),
    description="eMPRT (Hedström et al. 2023): relative rise of the 100-bin histogram entropy of the map "
                "from the trained to the randomised model, i.e. a rise in map complexity; the verdict reads the "
                "fully randomised state. A rise passes (the map became noise); no rise fails. It measures "
                "complexity, not retention, so it neither supports nor refutes an MPRT verdict.")
