"""Sanity tests over a batch (SPEC §2) and their statistics (SPEC §4), as long-format Arrow tables.

- ``class_sensitivity``: similarity between the map for the top class and maps for other classes.
- ``parameter_randomization``: similarity between maps of the trained model and of randomised states
  (MPRT, Adebayo et al. 2018), plus the relative rise of map entropy (eMPRT, Hedström et al. 2023).
- ``summarize`` and ``verdicts``: mean, std and bootstrap CI per group; pass/fail against a control.

Every score depends only on its own image (per-image seeds, per-image normalisation), so a table is the
same whatever the batch composition or the number of workers.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from saliency.engine import explain, forward_logits
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
    ("state_index", pa.int32()), ("target_class", pa.int64()), ("metric", pa.string()),
    ("value", pa.float64()),
])
SUMMARY_SCHEMA = pa.schema([
    ("model", pa.string()), ("method", pa.string()), ("test", pa.string()), ("state", pa.string()),
    ("state_index", pa.int32()), ("metric", pa.string()), ("n", pa.int64()), ("mean", pa.float64()),
    ("std", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
])
VERDICT_SCHEMA = pa.schema([
    ("model", pa.string()), ("method", pa.string()), ("test", pa.string()), ("state", pa.string()),
    ("state_index", pa.int32()), ("metric", pa.string()), ("method_mean", pa.float64()),
    ("control_mean", pa.float64()), ("method_ci_low", pa.float64()), ("method_ci_high", pa.float64()),
    ("control_ci_low", pa.float64()), ("control_ci_high", pa.float64()), ("verdict", pa.string()),
])
_GROUP_KEYS = ("model", "method", "test", "state", "state_index", "metric")


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


class _Rows:
    """Column buffers for score rows; one ``add`` per (method, state, metric) block of B images."""

    def __init__(self, image_ids: list[str], labels: list[int | None], model_name: str):
        self.image_ids, self.labels, self.model_name = image_ids, labels, model_name
        self.columns: dict[str, list] = {name: [] for name in SCORE_SCHEMA.names}

    def add(self, method: str, test: str, state: str, state_index: int, targets: Tensor,
            metric: str, values: Tensor) -> None:
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
        c["target_class"] += targets.tolist()
        c["metric"] += [metric] * batch
        c["value"] += values.double().cpu().tolist()

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
    target_class = the other class. High similarity means the method ignores the output.
    "random" is drawn per image id (see ``random_other_classes``): pass real ``image_ids`` so that
    the draw does not depend on batch position (the default ids are the positions in the batch).
    """
    method_ids = _method_list(methods)
    metric_ids = _metric_list(metrics)
    other_names = [others] if isinstance(others, str) else list(others)
    if not other_names:
        raise ValueError(f"others is empty; allowed: {', '.join(OTHERS)}")
    for name in other_names:
        if name not in OTHERS:
            raise ValueError(f"unknown other class {name!r}; allowed: {', '.join(OTHERS)}")
    ids = _image_ids(image_ids, x.shape[0])
    rows = _Rows(ids, _labels(labels, x.shape[0]), model_name)

    logits = forward_logits(model, x)
    if logits.shape[1] < 2:
        raise ValueError(f"class sensitivity needs at least 2 classes, the model has {logits.shape[1]}")
    targets = class_targets(logits, other_names, seed, ids)

    kwargs = {"seed": seed, **(explain_kwargs or {})}
    maps = explain(model, x, method_ids, targets, layer=layer, **kwargs)
    for method in method_ids:
        top_map = as_2d(maps[method][:, 0])
        for index, name in enumerate(other_names):
            other_map = as_2d(maps[method][:, index + 1])
            for metric in metric_ids:
                rows.add(method, "class_sensitivity", name, index, targets[:, index + 1], metric,
                         similarity(top_map, other_map, metric))
    return rows.table()


def parameter_randomization(model: nn.Module, x: Tensor, methods: str | Sequence[str],
                            order: str = "cascade_top_down", granularity: str = "module",
                            init: str = "reset", metrics: str | Sequence[str] = ("ssim", "spearman_abs"),
                            target: str = "original", seed: int = 0, *, bn_stats: str = "keep",
                            sigma: float = 0.01, states: Iterable[int] | None = None, emprt: bool = True,
                            image_ids: Sequence[str] | None = None, labels=None, model_name: str = "model",
                            layer: str | None = None, explain_kwargs: dict | None = None) -> pa.Table:
    """MPRT and eMPRT scores of each image for each randomisation state (SPEC §2.2).

    The original maps are computed once under the trained model for its top class. Each state k (all,
    or the subset ``states`` so that workers can share them out) is built alone by
    ``randomized_state`` from the seed, explained, scored and freed. ``target="original"`` keeps the
    original top class (Quantus's choice); ``"recompute"`` uses each state's own argmax. Rows: "mprt"
    (one per metric) and, if ``emprt``, "emprt" with metric "entropy_rise" = (H_k − H_0)/H_0 of the
    100-bin histogram entropy (see ``discrete_entropy``); for a cascade the last state is eMPRT proper.
    """
    method_ids = _method_list(methods)
    metric_ids = _metric_list(metrics)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; allowed: {', '.join(ORDERS)}")
    if target not in TARGET_MODES:
        raise ValueError(f"unknown target mode {target!r}; allowed: {', '.join(TARGET_MODES)}")
    ids = _image_ids(image_ids, x.shape[0])
    rows = _Rows(ids, _labels(labels, x.shape[0]), model_name)

    layers = parameter_layers(model, example_input=x[:1], granularity=granularity)
    state_indices = _state_indices(states, len(layers))
    kwargs = {"seed": seed, **(explain_kwargs or {})}

    top = forward_logits(model, x).argmax(dim=1)
    original = explain(model, x, method_ids, top[:, None], layer=layer, **kwargs)
    original = {m: as_2d(original[m][:, 0]) for m in method_ids}
    for k in state_indices:
        state_model = randomized_state(model, layers, order, k, init=init, seed=seed, bn_stats=bn_stats,
                                       sigma=sigma)
        targets = forward_logits(state_model, x).argmax(dim=1) if target == "recompute" else top
        maps = explain(state_model, x, method_ids, targets[:, None], layer=layer, **kwargs)
        del state_model
        name = state_name(k, _state_layer(layers, order, k))
        for method in method_ids:
            state_map = as_2d(maps[method][:, 0])
            for metric in metric_ids:
                rows.add(method, "mprt", name, k, targets, metric,
                         similarity(original[method], state_map, metric))
            if emprt:
                rows.add(method, "emprt", name, k, targets, ENTROPY_METRIC,
                         entropy_rise(original[method], state_map))
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


# --------------------------------------------------------------------------------------------- reporting
def _bootstrap_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, vectorised (resamples drawn in blocks to bound memory)."""
    n = values.size
    block = max(1, min(n_boot, 2**22 // n))
    means = np.concatenate([values[rng.integers(0, n, size=(min(block, n_boot - start), n))].mean(axis=1)
                            for start in range(0, n_boot, block)])
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize(scores: pa.Table, n_boot: int = 1000, seed: int = 0) -> pa.Table:
    """Mean, sample std (ddof=1), n and a 95% percentile-bootstrap CI of the mean per
    (model, method, test, state, state_index, metric).

    NaN scores (undefined similarity, e.g. a constant map) are left out: ``n`` counts the finite values
    used. A group with no finite value has n=0 and NaN statistics; n=1 gives std NaN and a zero-width CI.
    Each group's resamples come from a generator seeded by (seed, group key), so a group's CI does not
    depend on which other groups are in the table.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive number of bootstrap resamples, got {n_boot}")
    missing = [c for c in (*_GROUP_KEYS, "value") if c not in scores.column_names]
    if missing:
        raise ValueError(f"scores lacks columns {missing}; expected the score schema {SCORE_SCHEMA.names}")
    grouped = scores.group_by(list(_GROUP_KEYS), use_threads=False).aggregate([("value", "list")])
    grouped = grouped.sort_by([(k, "ascending") for k in _GROUP_KEYS])
    columns: dict[str, list] = {name: [] for name in SUMMARY_SCHEMA.names}
    for row in grouped.to_pylist():
        values = np.asarray([v for v in row["value_list"] if v is not None], dtype=np.float64)
        values = values[np.isfinite(values)]
        n = values.size
        key = tuple(row[k] for k in _GROUP_KEYS)
        if n == 0:
            mean = std = low = high = math.nan
        else:
            mean = float(values.mean())
            std = float(values.std(ddof=1)) if n > 1 else math.nan
            low, high = _bootstrap_ci(values, n_boot, np.random.default_rng([seed, stable_seed(*key)]))
        for name, value in zip(_GROUP_KEYS, key):
            columns[name].append(value)
        for name, value in (("n", n), ("mean", mean), ("std", std), ("ci_low", low), ("ci_high", high)):
            columns[name].append(value)
    return pa.table(columns, schema=SUMMARY_SCHEMA)


def verdicts(summary: pa.Table, control: str = "edge_sobel") -> pa.Table:
    """Pass/fail of each method against a model-independent control (SPEC §4), per
    (model, test, state, state_index, metric).

    Similarity tests (class_sensitivity, mprt): a method passes when its mean is significantly below
    the control's, ruled as non-overlapping 95% CIs: method ci_high < control ci_low. eMPRT's entropy
    rise goes the other way (higher = the map changed): pass when method ci_low > control ci_high.
    Anything else (overlap, or a NaN statistic) fails, because "not significantly better" is failing.
    Every state gets its own verdict; for a cascade the last state is the fully randomised model.
    """
    if control not in summary.column("method").to_pylist():
        methods = sorted(set(summary.column("method").to_pylist()))
        raise ValueError(f"control {control!r} is not in the summary; its methods are: {', '.join(methods)}")
    records = summary.to_pylist()
    key_of = lambda r: (r["model"], r["test"], r["state"], r["state_index"], r["metric"])  # noqa: E731
    controls = {key_of(r): r for r in records if r["method"] == control}
    columns: dict[str, list] = {name: [] for name in VERDICT_SCHEMA.names}
    for r in records:
        if r["method"] == control:
            continue
        c = controls.get(key_of(r))
        if c is None:
            raise ValueError(f"control {control!r} has no summary row for (model, test, state, state_index, "
                             f"metric) = {key_of(r)}; run the control with every method")
        if r["test"] == "emprt":
            passed = r["ci_low"] > c["ci_high"]
        else:
            passed = r["ci_high"] < c["ci_low"]  # False when either is NaN
        for name in ("model", "method", "test", "state", "state_index", "metric"):
            columns[name].append(r[name])
        columns["method_mean"].append(r["mean"])
        columns["control_mean"].append(c["mean"])
        columns["method_ci_low"].append(r["ci_low"])
        columns["method_ci_high"].append(r["ci_high"])
        columns["control_ci_low"].append(c["ci_low"])
        columns["control_ci_high"].append(c["ci_high"])
        columns["verdict"].append("pass" if passed else "fail")
    return pa.table(columns, schema=VERDICT_SCHEMA)
