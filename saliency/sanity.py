"""Sanity tests over a batch (SPEC §2) and their statistics (SPEC §4), as long-format Arrow tables.

- ``class_sensitivity``: similarity between the map for the top class and maps for other classes.
- ``parameter_randomization``: similarity between maps of the trained model and of randomised states
  (MPRT, Adebayo et al. 2018), plus the relative rise of map entropy (eMPRT, Hedström et al. 2023).
Each similarity row carries its two references (SPEC §4): ``chance`` (the same comparison against another
image's map, image i paired with image i+1 of the batch) and ``retest`` (1 for deterministic methods, the
similarity of two draws with different seeds for stochastic ones). ``saliency.statistics`` turns them into
the normalised retention R = (s − c)/(r − c), verdicts and the paper's paired comparisons.

Every score depends only on its own image (per-image seeds, per-image normalisation) and, for ``chance``,
on its partner in the batch; so a table is the same whatever the number of workers.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from saliency.engine import cam_layer, explain
from saliency.passes import forward_logits
from saliency.methods import get_method
from saliency.randomize import ORDERS, parameter_layers, randomized_state, state_name
from saliency.seeds import stable_seed
from saliency.similarity import METRICS, similarity

OTHERS = ("min", "random", "second")
TARGET_MODES = ("original", "recompute")
ENTROPY_BINS = 100
ENTROPY_METRIC = "entropy_rise"

SCORE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("shard", pa.int32()), ("image_id", pa.string()), ("label", pa.int64()),
    ("model", pa.string()), ("method", pa.string()), ("test", pa.string()), ("state", pa.string()),
    ("state_index", pa.int32()), ("seed", pa.int64()), ("target_class", pa.int64()), ("metric", pa.string()),
    ("value", pa.float64()), ("chance", pa.float64()), ("retest", pa.float64()),
])


# --------------------------------------------------------------------------------------------- helpers
def random_other_classes(top: Tensor, num_classes: int, seed: int, image_ids: Sequence[str]) -> Tensor:
    """A uniform class ≠ top per image, drawn from a generator seeded by (seed, image id).

    Seeding per image id (not per batch position) makes the draw independent of batch composition and
    sharding. The draw picks an offset in [0, num_classes − 2] and skips the top class.
    """
    if num_classes < 2:
        raise ValueError(f"a random other class needs at least 2 classes, the model has {num_classes}")
    offsets = [int(np.random.default_rng([seed, stable_seed(image_id)]).integers(num_classes - 1))
               for image_id in image_ids]
    offsets_t = torch.tensor(offsets, dtype=torch.long, device=top.device)
    return offsets_t + (offsets_t >= top).long()


def discrete_entropy(maps: Tensor, bins: int = ENTROPY_BINS) -> Tensor:
    """Shannon entropy (nats) of each map's histogram: ``bins`` equal bins spanning that map's own
    min..max, on the signed values, as quantus.functions.discrete_entropy (np.histogram, then
    scipy.stats.entropy). np.histogram on the map's own dtype is used so that values on a bin edge
    fall in the same bin as in Quantus.

    maps: B×H×W (or B×…); returns float64 B on the maps' device. A constant map has entropy 0.
    """
    flat = maps.detach().flatten(1).cpu().numpy()
    entropies = []
    for row in flat:
        counts = np.histogram(row, bins=bins)[0]
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return torch.tensor(entropies, dtype=torch.float64, device=maps.device)


def entropy_rise(original: Tensor, randomized: Tensor, bins: int = ENTROPY_BINS) -> Tensor:
    """eMPRT score per image: (H(randomised) − H(original)) / H(original); NaN where H(original) = 0."""
    h_orig = discrete_entropy(original, bins)
    h_rand = discrete_entropy(randomized, bins)
    safe = torch.where(h_orig > 0, h_orig, torch.ones_like(h_orig))
    return torch.where(h_orig > 0, (h_rand - h_orig) / safe, torch.full_like(h_orig, math.nan))


def _method_list(methods: str | Sequence[str]) -> list[str]:
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise ValueError("methods is empty; give at least one method id (see saliency.available_methods())")
    duplicates = sorted({m for m in names if names.count(m) > 1})
    if duplicates:
        raise ValueError(f"method ids listed more than once (they would duplicate rows): {duplicates}")
    return names


def _metric_list(metrics: str | Sequence[str]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise ValueError(f"metrics is empty; allowed: {', '.join(METRICS)}")
    for name in names:
        if name not in METRICS:  # let similarity() word the message, before any expensive work
            similarity(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), name)
    return names


def _image_ids(image_ids: Sequence[str] | None, batch: int) -> list[str]:
    if image_ids is None:
        return [str(i) for i in range(batch)]
    ids = [str(i) for i in image_ids]
    if len(ids) != batch:
        raise ValueError(f"image_ids has {len(ids)} entries but x has {batch} images")
    return ids


def _labels(labels, batch: int) -> list[int | None]:
    if labels is None:
        return [None] * batch
    values = labels.tolist() if isinstance(labels, (Tensor, np.ndarray)) else list(labels)
    if len(values) != batch:
        raise ValueError(f"labels has {len(values)} entries but x has {batch} images")
    return [None if v is None else int(v) for v in values]


def class_targets(logits: Tensor, others: Sequence[str], seed: int, image_ids: Sequence[str]) -> Tensor:
    """B×(1+len(others)) targets: the top class, then each other class ("min", "second", "random")."""
    order = logits.argsort(dim=1, descending=True, stable=True)
    top = order[:, 0]
    choices = {"min": lambda: logits.argmin(dim=1), "second": lambda: order[:, 1],
               "random": lambda: random_other_classes(top, logits.shape[1], seed, image_ids)}
    return torch.stack([top] + [choices[name]() for name in others], dim=1)


def as_2d(maps: Tensor) -> Tensor:
    """B×H×W maps of one target: channel maps (channel_reduction="none") are summed, keeping the sign."""
    return maps.sum(dim=1) if maps.dim() == 4 else maps


def chance_partners(batch: int) -> Tensor | None:
    """π(i) = (i + 1) mod B: the fixed other image each image is compared with for the chance level
    (None for a single image, whose chance level is then NaN)."""
    return None if batch < 2 else torch.arange(1, batch + 1) % batch


def _paired(a: Tensor, b: Tensor, metric: str, partners: Tensor | None) -> tuple[Tensor, Tensor]:
    """(similarity of a and b per image, chance: similarity of a and b's map of the partner image)."""
    score = similarity(a, b, metric)
    if partners is None:
        return score, torch.full_like(score, math.nan)
    return score, similarity(a, b[partners.to(b.device)], metric)


def retest_seed(seed: int) -> int:
    """The second draw's seed for the retest level of stochastic methods."""
    return stable_seed(seed, "retest")


def _retest(model: nn.Module, x: Tensor, method_ids: list[str], metric_ids: list[str], first: dict[str, Tensor],
            targets: Tensor, layer: str | None, kwargs: dict) -> dict[tuple[str, str], Tensor]:
    """Retest level per (method, metric): 1 for deterministic methods; for stochastic ones the similarity
    of ``first`` (their B×H×W maps for ``targets``) with a second draw under another seed."""
    stochastic = [m for m in method_ids if get_method(m).stochastic]
    second = {}
    if stochastic:
        redraw = explain(model, x, stochastic, targets[:, None], layer=layer,
                         **{**kwargs, "seed": retest_seed(kwargs["seed"])})
        second = {m: as_2d(redraw[m][:, 0]) for m in stochastic}
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    return {(m, metric): similarity(first[m], second[m], metric) if m in second else ones
            for m in method_ids for metric in metric_ids}


class _Rows:
    """Column buffers for score rows; one ``add`` per (method, state, metric) block of B images."""

    def __init__(self, image_ids: list[str], labels: list[int | None], model_name: str):
        self.image_ids, self.labels, self.model_name = image_ids, labels, model_name
        self.columns: dict[str, list] = {name: [] for name in SCORE_SCHEMA.names}

    def add(self, method: str, test: str, state: str, state_index: int, targets: Tensor,
            metric: str, values: Tensor, chance: Tensor | None = None, retest: Tensor | None = None,
            seed: int | None = None) -> None:
        batch = len(self.image_ids)
        c = self.columns
        c["run_id"] += [""] * batch
        c["shard"] += [0] * batch
        c["image_id"] += self.image_ids
        c["label"] += self.labels
        c["model"] += [self.model_name] * batch
        c["method"] += [method] * batch
        c["test"] += [test] * batch
        c["state"] += [state] * batch
        c["state_index"] += [state_index] * batch
        c["seed"] += [seed] * batch
        c["target_class"] += targets.tolist()
        c["metric"] += [metric] * batch
        c["value"] += values.double().cpu().tolist()
        c["chance"] += [None] * batch if chance is None else chance.double().cpu().tolist()
        c["retest"] += [None] * batch if retest is None else retest.double().cpu().tolist()

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=SCORE_SCHEMA)


# --------------------------------------------------------------------------------------------- tests
def class_sensitivity(model: nn.Module, x: Tensor, methods: str | Sequence[str],
                      others: Sequence[str] = ("min", "random", "second"),
                      metrics: str | Sequence[str] = ("ssim", "spearman_abs"), seed: int = 0, *,
                      image_ids: Sequence[str] | None = None, labels=None, model_name: str = "model",
                      layer: str | None = None, explain_kwargs: dict | None = None) -> pa.Table:
    """Similarity of each image's map for its top class with its maps for other classes (SPEC §2.1).

    One forward pass picks the classes; one explain call computes the maps for all of them. Rows:
    test="class_sensitivity", state = the other's name, state_index = its position in ``others``,
    target_class = the other class; ``chance`` compares the top-class map with the partner image's map
    for its own other class; ``retest`` is the top-class map against a second draw (stochastic methods).
    High similarity means the method ignores the output. "random" is drawn per image id (see
    ``random_other_classes``): pass real ``image_ids`` so that the draw does not depend on batch position.
    """
    method_ids = _method_list(methods)
    metric_ids = _metric_list(metrics)
    other_names = [others] if isinstance(others, str) else list(others)
    if not other_names:
        raise ValueError(f"others is empty; allowed: {', '.join(OTHERS)}")
    for name in other_names:
        if name not in OTHERS:
            raise ValueError(f"unknown other class {name!r}; allowed: {', '.join(OTHERS)}")
    if len(set(other_names)) != len(other_names):
        raise ValueError(f"others lists a class rule twice: {other_names}")
    ids = _image_ids(image_ids, x.shape[0])
    rows = _Rows(ids, _labels(labels, x.shape[0]), model_name)

    logits = forward_logits(model, x)
    if logits.shape[1] < 2:
        raise ValueError(f"class sensitivity needs at least 2 classes, the model has {logits.shape[1]}")
    targets = class_targets(logits, other_names, seed, ids)
    layer = cam_layer(model, x, method_ids, layer)

    kwargs = {"seed": seed, **(explain_kwargs or {})}
    maps = explain(model, x, method_ids, targets, layer=layer, **kwargs)
    top_maps = {m: as_2d(maps[m][:, 0]) for m in method_ids}
    retest = _retest(model, x, method_ids, metric_ids, top_maps, targets[:, 0], layer, kwargs)
    partners = chance_partners(x.shape[0])
    for method in method_ids:
        for index, name in enumerate(other_names):
            other_map = as_2d(maps[method][:, index + 1])
            for metric in metric_ids:
                score, chance = _paired(top_maps[method], other_map, metric, partners)
                rows.add(method, "class_sensitivity", name, index, targets[:, index + 1], metric, score,
                         chance, retest[(method, metric)])
    return rows.table()


def parameter_randomization(model: nn.Module, x: Tensor, methods: str | Sequence[str],
                            order: str = "cascade_top_down", granularity: str = "module",
                            init: str = "reset", metrics: str | Sequence[str] = ("ssim", "spearman_abs"),
                            target: str = "original", seed: int = 0, *, bn_stats: str = "keep",
                            sigma: float = 0.01, states: Iterable[int] | None = None, emprt: bool = True,
                            randomization_seeds: Sequence[int] | None = None,
                            image_ids: Sequence[str] | None = None, labels=None, model_name: str = "model",
                            layer: str | None = None, explain_kwargs: dict | None = None) -> pa.Table:
    """MPRT and eMPRT scores of each image for each randomisation state and seed (SPEC §2.2).

    The original maps are computed once under the trained model for its top class. Each state k (all,
    or the subset ``states`` so that workers can share them out) is built alone by ``randomized_state``
    for every seed of ``randomization_seeds`` (default: ``seed`` alone), explained, scored and freed.
    ``target="original"`` keeps the original top class (Quantus's choice); ``"recompute"`` uses each
    state's own argmax. Rows: "mprt" (one per metric, with ``chance``: the original map against the
    partner image's map in the same state, and ``retest``) and, if ``emprt``, "emprt" with metric
    "entropy_rise" = (H_k − H_0)/H_0 of the 100-bin histogram entropy (see ``discrete_entropy``); for a
    cascade the last state is eMPRT proper. The ``seed`` column holds the randomisation seed.
    """
    method_ids = _method_list(methods)
    metric_ids = _metric_list(metrics)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; allowed: {', '.join(ORDERS)}")
    if target not in TARGET_MODES:
        raise ValueError(f"unknown target mode {target!r}; allowed: {', '.join(TARGET_MODES)}")
    seeds = [seed] if randomization_seeds is None else [int(s) for s in randomization_seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"randomization_seeds must be distinct seeds, at least one; got {seeds}")
    ids = _image_ids(image_ids, x.shape[0])
    rows = _Rows(ids, _labels(labels, x.shape[0]), model_name)

    layers = parameter_layers(model, example_input=x[:1], granularity=granularity)
    state_indices = _state_indices(states, len(layers))
    kwargs = {"seed": seed, **(explain_kwargs or {})}
    layer = cam_layer(model, x, method_ids, layer)

    top = forward_logits(model, x).argmax(dim=1)
    original = explain(model, x, method_ids, top[:, None], layer=layer, **kwargs)
    original = {m: as_2d(original[m][:, 0]) for m in method_ids}
    retest = _retest(model, x, method_ids, metric_ids, original, top, layer, kwargs)
    partners = chance_partners(x.shape[0])
    for rand_seed in seeds:
        for k in state_indices:
            state_model = randomized_state(model, layers, order, k, init=init, seed=rand_seed,
                                           bn_stats=bn_stats, sigma=sigma)
            targets = forward_logits(state_model, x).argmax(dim=1) if target == "recompute" else top
            maps = explain(state_model, x, method_ids, targets[:, None], layer=layer, **kwargs)
            del state_model
            name = state_name(k, _state_layer(layers, order, k))
            for method in method_ids:
                state_map = as_2d(maps[method][:, 0])
                for metric in metric_ids:
                    score, chance = _paired(original[method], state_map, metric, partners)
                    rows.add(method, "mprt", name, k, targets, metric, score, chance,
                             retest[(method, metric)], seed=rand_seed)
                if emprt:
                    rows.add(method, "emprt", name, k, targets, ENTROPY_METRIC,
                             entropy_rise(original[method], state_map), seed=rand_seed)
            del maps
    return rows.table()


def _state_indices(states: Iterable[int] | None, count: int) -> list[int]:
    if states is None:
        return list(range(count))
    chosen = sorted({int(k) for k in states})
    bad = [k for k in chosen if not 0 <= k < count]
    if bad:
        raise ValueError(f"states {bad} out of range; this model has {count} states: 0..{count - 1}")
    return chosen


def _state_layer(layers: list[str], order: str, k: int) -> str:
    """The layer randomised at step k (saliency.randomize's convention): top-down and independent
    count from the logits, bottom-up from the input."""
    return layers[k] if order == "cascade_bottom_up" else layers[len(layers) - 1 - k]
