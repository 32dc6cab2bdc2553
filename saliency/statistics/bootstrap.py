"""The summary of score rows with two-level bootstrap CIs (seeds, then images), built one shard at a time
(``SummaryAccumulator``): Poisson(1) image weights hashed from (seed, image id, resample) make per-shard
partial sums merge into the same resamples, whatever the sharding or the order of the rows."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saliency.sanity import CASCADE_INDEX
from saliency.seeds import stable_seed
from saliency.statistics.retention import GROUP_KEYS, QUANTITIES, _EXCESS, _GAP, _working_table

_STAT_FIELDS = [("n", pa.int64()), ("n_seeds", pa.int64()), ("mean", pa.float64()), ("std", pa.float64()),
                ("ci_low", pa.float64()), ("ci_high", pa.float64())]
_REFERENCE_FIELDS = [(f"{q}_{s}", pa.float64()) for q in ("chance", "retest", "gap", "retention")
                     for s in ("mean", "ci_low", "ci_high")]
SUMMARY_SCHEMA = pa.schema([("model", pa.string()), ("method", pa.string()), ("test", pa.string()),
                            ("state", pa.string()), ("state_index", pa.int32()), ("metric", pa.string()),
                            *_STAT_FIELDS, *_REFERENCE_FIELDS])

#: P(K ≤ k) for K ~ Poisson(1), k = 0..20 (the tail beyond 20 is < 1e-19).
_POISSON_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(21)])
_MASK64 = (1 << 64) - 1


def _splitmix64(state: np.ndarray) -> np.ndarray:
    """The splitmix64 output function on uint64 arrays (wrapping arithmetic): a stateless, portable hash."""
    z = state.copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def image_weights(image_ids: Sequence[str], n_boot: int, seed: int) -> np.ndarray:
    """n_boot × images Poisson(1) bootstrap weights: weight (b, i) is a function of (seed, image id, b)
    alone, so partial sums over any split of the images (shards) add up to the same resample."""
    keys = np.array([stable_seed("bootstrap-image", seed, str(i)) for i in image_ids], dtype=np.uint64)
    steps = (np.arange(1, n_boot + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))[:, None]
    with np.errstate(over="ignore"):
        uniform = (_splitmix64(keys[None, :] + steps) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return np.searchsorted(_POISSON_CDF, uniform, side="right").astype(np.float64)


def seed_weights(n_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """n_boot × n_seeds multinomial resample counts of the randomisation seeds (few, so not Poisson:
    a resample with no seed would be empty); all ones for a single seed."""
    if n_seeds == 1:
        return np.ones((n_boot, 1))
    rng = np.random.default_rng([seed, stable_seed("bootstrap-seeds", n_seeds)])
    draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    return np.stack([(draws == s).sum(axis=1) for s in range(n_seeds)], axis=1).astype(np.float64)


def _percentile_interval(means: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Percentile CI over the resamples (axis 0), ignoring empty resamples (NaN)."""
    tail = (1.0 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(means, [tail, 100 - tail], axis=0)


def _check_n_boot(n_boot: int) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive number of bootstrap resamples, got {n_boot}")


def _runs(ordered: pa.Table, keys: Sequence[str]) -> tuple[np.ndarray, list[tuple]]:
    """For a table sorted by ``keys``: the run number of every row and the key values of every run
    (strings compared by their dictionary codes, not as Python objects)."""
    change = np.zeros(ordered.num_rows, dtype=bool)
    change[:1] = True
    for k in keys:
        column = ordered[k]
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = pc.dictionary_encode(column).combine_chunks().indices
        array = column.to_numpy(zero_copy_only=False)
        change[1:] |= array[1:] != array[:-1]
    starts = np.flatnonzero(change)
    heads = ordered.select(list(keys)).take(pa.array(starts)).to_pydict()
    return np.cumsum(change) - 1, list(zip(*(heads[k] for k in keys)))


class SummaryAccumulator:
    """Partial statistics of score rows that merge by addition, so that a summary is built one shard at
    a time in memory that does not grow with the number of images.

    Per group (model, method, test, state, state_index, metric) and randomisation seed, and per quantity
    (s, c, r, r − c, s − c): the count, sum and (for s) the sum of squared deviations of the finite values,
    and for every bootstrap resample b the weighted sum Σ_i w_bi v_i and weight Σ_i w_bi m_i (m = finite)
    with Poisson(1) image weights w_bi that depend only on (seed, image id, b). ``summary`` then draws
    the seeds (multinomial) and takes percentile CIs of Σ_s u_bs Σ_i w_bi v_si / Σ_s u_bs Σ_i w_bi m_si,
    and of R: per seed the ratio of means Σ_i w_bi (s − c)_i / Σ_i w_bi (r − c)_i, averaged over the
    drawn seeds (``_retention``). ``add`` must receive every row of its images (one shard): the MPRT
    cascade is a mean over states.
    """

    def __init__(self, n_boot: int = 1000, seed: int = 0) -> None:
        _check_n_boot(n_boot)
        self.n_boot, self.seed = n_boot, seed
        self._rows: dict[tuple, int] = {}  # (group key…, seed) → row of the arrays below
        q = len(QUANTITIES)
        self._numerator = np.zeros((0, q, n_boot))  # [row, quantity, resample]: Σ_i w_bi v_i
        # Σ_i w_bi m_i: sums of small integers, exact in float32 below 2**24 (16.7 M weighted images)
        self._weight = np.zeros((0, q, n_boot), dtype=np.float32)
        self._count = np.zeros((0, q))
        self._sum = np.zeros((0, q))
        self._value_m2 = np.zeros(0)  # Σ (s − mean s)² of the finite raw scores, merged (Chan et al.)

    def _row_indices(self, keys: list[tuple]) -> np.ndarray:
        new = [k for k in keys if k not in self._rows]
        if new:
            for k in new:
                self._rows[k] = len(self._rows)
            grow = len(self._rows) - self._count.shape[0]
            self._numerator = np.concatenate([self._numerator, np.zeros((grow, *self._numerator.shape[1:]))])
            self._weight = np.concatenate([self._weight, np.zeros((grow, *self._weight.shape[1:]), np.float32)])
            self._count = np.concatenate([self._count, np.zeros((grow, len(QUANTITIES)))])
            self._sum = np.concatenate([self._sum, np.zeros((grow, len(QUANTITIES)))])
            self._value_m2 = np.concatenate([self._value_m2, np.zeros(grow)])
        return np.array([self._rows[k] for k in keys], dtype=np.int64)

    def add(self, scores: pa.Table) -> None:
        """Fold in score rows (score schema) holding every row of their images."""
        table = _working_table(scores)
        if table.num_rows == 0:
            return
        ordered = table.sort_by([(k, "ascending") for k in (*GROUP_KEYS, "seed")])
        run, keys = _runs(ordered, (*GROUP_KEYS, "seed"))
        encoded = pc.dictionary_encode(ordered["image_id"]).combine_chunks()
        names = np.array(encoded.dictionary.to_pylist(), dtype=object)
        rank = np.empty(len(names), dtype=np.int64)
        rank[np.argsort(names, kind="stable")] = np.arange(len(names))
        image_index, images = rank[encoded.indices.to_numpy()], np.sort(names)  # sums in image-id order
        cube = np.full((len(QUANTITIES), len(keys), len(images)), np.nan)
        for q, name in enumerate(QUANTITIES):
            cube[q, run, image_index] = ordered[name].to_numpy(zero_copy_only=False).astype(np.float64)
        finite = np.isfinite(cube)
        filled = np.where(finite, cube, 0.0)
        weights = image_weights(images.tolist(), self.n_boot, self.seed).T  # images × B
        rows = self._row_indices(keys)
        # the same keys in the same order as the first part: add in place into a slice (no fancy-index copies)
        window = slice(rows[0], rows[-1] + 1) if np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)) else rows
        masks: list[list[int]] = []  # quantities with the same finite mask share their weight sums
        for q in range(len(QUANTITIES)):  # one quantity at a time: transient memory groups × B, not Q × that
            self._numerator[window, q] += filled[q] @ weights
            same = next((group for group in masks if np.array_equal(finite[group[0]], finite[q])), None)
            if same is None:
                masks.append([q])
            else:
                same.append(q)
        for group in masks:
            sums = (finite[group[0]].astype(np.float32) @ weights.astype(np.float32))
            for q in group:
                self._weight[window, q] += sums
        count, total = finite.sum(axis=2).T, filled.sum(axis=2).T
        old_n, old_mean = self._count[rows, 0], _ratio(self._sum[rows, 0], self._count[rows, 0])
        new_n, new_mean = count[:, 0], _ratio(total[:, 0], count[:, 0])
        new_m2 = np.where(finite[0], (cube[0] - new_mean[:, None]) ** 2, 0.0).sum(axis=1)
        n = old_n + new_n
        delta = np.nan_to_num(new_mean - old_mean)
        self._value_m2[rows] += new_m2 + np.where(n > 0, delta ** 2 * old_n * new_n / np.maximum(n, 1), 0.0)
        self._count[rows] += count
        self._sum[rows] += total

    def summary(self) -> pa.Table:
        """The summary table (SUMMARY_SCHEMA) of everything added, in group order."""
        columns: dict[str, list] = {name: [] for name in SUMMARY_SCHEMA.names}
        by_group: dict[tuple, list[int]] = {}
        for key in sorted(self._rows):
            by_group.setdefault(key[:-1], []).append(self._rows[key])
        retentions = {group: self._retention(rows) for group, rows in by_group.items()}
        for group, rows in by_group.items():
            counts = self._count[rows]
            weights = seed_weights(len(rows), self.n_boot, self.seed)  # B × seeds
            numerator = np.einsum("bs,sqb->qb", weights, self._numerator[rows])
            denominator = np.einsum("bs,sqb->qb", weights, self._weight[rows].astype(np.float64))
            with np.errstate(invalid="ignore", divide="ignore"):
                intervals = _percentile_interval((numerator / denominator).T)  # 2 × Q
            n = int(counts[:, 0].sum())
            means = _ratio(self._sum[rows].sum(axis=0), counts.sum(axis=0))
            m2 = _merged_m2(counts[:, 0], _ratio(self._sum[rows, 0], counts[:, 0]), self._value_m2[rows])
            for name, item in zip(GROUP_KEYS, group):
                columns[name].append(item)
            columns["n"].append(n)
            columns["n_seeds"].append(int((counts[:, 0] > 0).sum()))
            columns["std"].append(math.sqrt(m2 / (n - 1)) if n > 1 else math.nan)
            for q, name in enumerate(QUANTITIES[:_EXCESS]):
                label = "" if name == "value" else f"{name}_"
                present = counts[:, q].sum() > 0
                columns[f"{label}mean"].append(float(means[q]))
                columns[f"{label}ci_low"].append(float(intervals[0, q]) if present else math.nan)
                columns[f"{label}ci_high"].append(float(intervals[1, q]) if present else math.nan)
            point, resamples = _cascade_mean(group, retentions) if group[4] == CASCADE_INDEX else retentions[group]
            low, high = _percentile_interval(resamples[:, None])[:, 0] if np.isfinite(resamples).any() else (math.nan,) * 2
            columns["retention_mean"].append(float(point))
            columns["retention_ci_low"].append(float(low))
            columns["retention_ci_high"].append(float(high))
        return pa.table(columns, schema=SUMMARY_SCHEMA)

    def _retention(self, rows: list[int]) -> tuple[float, np.ndarray]:
        """R of one group: (point estimate, B resamples). Per seed the ratio of means Σ(s − c)/Σ(r − c) over
        the images (the resample's weighted sums in the bootstrap), then the mean over the seeds (drawn
        multinomially in the bootstrap); seeds whose ratio is undefined are left out."""
        per_seed = _ratio_any_sign(self._sum[rows, _EXCESS], self._sum[rows, _GAP])  # seeds
        point = float(np.nanmean(per_seed)) if np.isfinite(per_seed).any() else math.nan
        ratios = _ratio_any_sign(self._numerator[rows, _EXCESS], self._numerator[rows, _GAP])  # seeds × B
        weights = seed_weights(len(rows), self.n_boot, self.seed).T * np.isfinite(ratios)  # seeds × B
        with np.errstate(invalid="ignore", divide="ignore"):
            resamples = (weights * np.nan_to_num(ratios)).sum(axis=0) / weights.sum(axis=0)
        return point, np.where(np.isfinite(resamples), resamples, np.nan)


def _cascade_mean(group: tuple, retentions: dict[tuple, tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
    """R of a cascade summary row: the mean over the curve's states of their R (SPEC §4), point and
    resamples alike (every group's resamples use the same image and seed weights, so they pair up)."""
    model, method, test, _, _, metric = group
    states = [value for key, value in retentions.items()
              if key[4] >= 0 and (key[0], key[1], key[2], key[5]) == (model, method, test, metric)]
    if not states:
        return math.nan, np.full(1, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (float(np.nanmean([point for point, _ in states])),
                np.nanmean(np.stack([resamples for _, resamples in states]), axis=0))


def _ratio_any_sign(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator/denominator, NaN where the denominator is 0 (either sign allowed)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = numerator / np.where(denominator != 0, denominator, np.nan)
    return np.where(np.isfinite(out), out, np.nan)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator/denominator, NaN where the denominator is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def _merged_m2(counts: np.ndarray, means: np.ndarray, m2: np.ndarray) -> float:
    """Σ of squared deviations from the pooled mean, from per-part counts, means and M2 (Chan et al.)."""
    keep = counts > 0
    if not keep.any():
        return math.nan
    counts, means, m2 = counts[keep], means[keep], m2[keep]
    pooled = (counts * means).sum() / counts.sum()
    return float(m2.sum() + (counts * (means - pooled) ** 2).sum())


# --------------------------------------------------------------------------------------------- summary
def summarize(scores: pa.Table, n_boot: int = 1000, seed: int = 0) -> pa.Table:
    """Per (model, method, test, state, state_index, metric): n (finite scores), n_seeds, mean, sample std
    and bootstrap 95% CI of the raw score; mean and CI of chance, retest, gap = r − c and of the retention
    R = (s̄ − c̄)/(r̄ − c̄), a ratio of means per seed, averaged over seeds.

    MPRT also gets state "cascade" (state_index −1): per seed and image, the mean over states of every
    quantity; its R is the mean of the states' R (SPEC §4). NaN scores are left out of every statistic.
    One table at once; ``SummaryAccumulator`` builds the same summary one shard at a time.
    """
    accumulator = SummaryAccumulator(n_boot, seed)
    accumulator.add(scores)
    return accumulator.summary()
