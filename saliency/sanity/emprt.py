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
    for counts in _histograms(flat, bins):
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return torch.tensor(entropies, dtype=torch.float64, device=maps.device)


def _histograms(rows: np.ndarray, bins: int) -> np.ndarray:
    """``np.histogram(row, bins)[0]`` of every row, computed for all rows at once by the same steps in
    the same dtype (numpy's equal-bin path: edges by ``linspace``, index by scaling, then the ±1
    correction against the edges), so that every count is numpy's: a batch's 1 440 calls cost
    milliseconds, not seconds. Rows that numpy's own path would treat specially (not finite, a range
    too small for ``bins`` edges, an underflowing step) are handed to ``_histogram`` one by one."""
    counts = np.zeros((rows.shape[0], bins), dtype=np.intp)
    if rows.size == 0 or rows.shape[1] == 0 or rows.dtype not in (np.float32, np.float64):
        return np.stack([_histogram(row, bins) for row in rows]) if rows.shape[0] else counts
    with np.errstate(all="ignore"):
        first, last = rows.min(axis=1), rows.max(axis=1)
        flat_range = first == last
        first = np.where(flat_range, first - rows.dtype.type(0.5), first)
        last = np.where(flat_range, last + rows.dtype.type(0.5), last)
        delta = last - first
        step = delta / bins
        edges = np.arange(0, bins + 1, dtype=rows.dtype).reshape(-1, 1) * step + first
        edges[-1] = last
        edges = edges.T  # rows × (bins + 1), as linspace(first, last, bins + 1) row by row
        plain = (np.isfinite(first) & np.isfinite(last) & np.isfinite(delta) & (step != 0)
                 & (edges[:, :-1] < edges[:, 1:]).all(axis=1))
        f_indices = (rows - first[:, None]) / delta[:, None] * bins
        indices = np.where(plain[:, None], f_indices, 0).astype(np.intp)
        indices[indices == bins] -= 1
        indices -= rows < np.take_along_axis(edges, indices, axis=1)
        indices += (rows >= np.take_along_axis(edges, indices + 1, axis=1)) & (indices != bins - 1)
    offsets = np.arange(rows.shape[0]).reshape(-1, 1) * bins
    counts[:] = np.bincount((indices + offsets).ravel(), minlength=rows.shape[0] * bins).reshape(-1, bins)
    for i in np.flatnonzero(~plain):
        counts[i] = _histogram(rows[i], bins)
    return counts


def _histogram(row: np.ndarray, bins: int) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            return np.histogram(row, bins=bins)[0]
        except ValueError:
            if not np.isfinite(row).all():
                raise
    shifted = row.astype(np.float64) - float(row.min())
    return np.histogram(shifted / max(float(shifted.max()), np.finfo(np.float64).tiny), bins=bins)[0]


def entropy_rise(original: Tensor, randomized: Tensor, bins: int = ENTROPY_BINS, *,
                 original_entropy: Tensor | None = None) -> Tensor:
    """eMPRT score per image: (H(randomised) − H(original)) / H(original); NaN where H(original) = 0.
    ``original_entropy``: ``discrete_entropy(original, bins)`` where the caller already has it (every
    state of a batch compares with the same original maps)."""
    h_orig = discrete_entropy(original, bins) if original_entropy is None else original_entropy
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
        entropies = run.derived.setdefault(self.id, {})  # the original maps' entropies, once per batch
        for method in run.methods:
            if method not in entropies:
                entropies[method] = discrete_entropy(run.original[method], bins)
            run.rows.add(method, self.id, block, ENTROPY_METRIC,
                         entropy_rise(run.original[method], block.maps[method], bins,
                                      original_entropy=entropies[method]))

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
