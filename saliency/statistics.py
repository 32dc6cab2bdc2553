"""From score rows to answers (SPEC §4): normalised retention, bootstrap summaries, verdicts, and the
paper's paired pos/abs-vs-signed comparisons.

A raw similarity s means little on its own (an edge detector scores 1, noise 0), so every score row
carries its chance level c (the same comparison against other images' maps) and its retest level r
(1, or two draws of a stochastic method). The normalised retention R = (s̄ − c̄)/(r̄ − c̄) is 0 when the
maps changed as much as if they were other images', 1 when they did not change at all. It is a ratio of
means over the images (per randomisation seed, then averaged over seeds): the mean of per-image ratios
is dominated by the images with a small r − c (SPEC §4). Per-image R is kept for the paired comparisons.

Confidence intervals resample randomisation seeds (multinomially), then images (a two-level percentile
bootstrap). An image's resample weights are Poisson(1) draws hashed from (seed, image id, resample), so
per-shard partial sums merge into the same resamples (``SummaryAccumulator``): the summary of a run is
built one part at a time, and a CI is reproducible for a given seed and does not depend on the order of
the rows, on sharding, or on which other groups are in the table.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from saliency.methods import signed_pairs
from saliency.sanity import CASCADE, CASCADE_INDEX, SCORE_SCHEMA, get_test, sanity_tests
from saliency.seeds import stable_seed

GROUP_KEYS = ("model", "method", "test", "state", "state_index", "metric")
#: Summed per group, seed and resample. gap = r − c and excess = s − c are taken over the rows where s, c
#: and r are all finite, so that R = Σ excess / Σ gap compares the same images.
QUANTITIES = ("value", "chance", "retest", "gap", "excess")
_GAP, _EXCESS = QUANTITIES.index("gap"), QUANTITIES.index("excess")
VERDICTS = ("pass", "fail", "inconclusive", "uninformative")

_STAT_FIELDS = [("n", pa.int64()), ("n_seeds", pa.int64()), ("mean", pa.float64()), ("std", pa.float64()),
                ("ci_low", pa.float64()), ("ci_high", pa.float64())]
_REFERENCE_FIELDS = [(f"{q}_{s}", pa.float64()) for q in ("chance", "retest", "gap", "retention")
                     for s in ("mean", "ci_low", "ci_high")]
SUMMARY_SCHEMA = pa.schema([("model", pa.string()), ("method", pa.string()), ("test", pa.string()),
                            ("state", pa.string()), ("state_index", pa.int32()), ("metric", pa.string()),
                            *_STAT_FIELDS, *_REFERENCE_FIELDS])
VERDICT_SCHEMA = pa.schema([
    ("model", pa.string()), ("method", pa.string()), ("test", pa.string()), ("scope", pa.string()),
    ("state", pa.string()), ("state_index", pa.int32()), ("metric", pa.string()), ("n", pa.int64()),
    ("n_seeds", pa.int64()), ("mean", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("chance_mean", pa.float64()), ("retest_mean", pa.float64()), ("gap_mean", pa.float64()),
    ("retention_mean", pa.float64()), ("retention_ci_low", pa.float64()), ("retention_ci_high", pa.float64()),
    ("verdict", pa.string()), ("reason", pa.string()),
    ("verdict_at_low", pa.string()), ("verdict_at_high", pa.string()), ("threshold_sensitive", pa.bool_()),
])
COMPARISON_SCHEMA = pa.schema([
    ("model", pa.string()), ("variant", pa.string()), ("signed", pa.string()), ("test", pa.string()),
    ("scope", pa.string()), ("state", pa.string()), ("metric", pa.string()), ("n", pa.int64()),
    ("variant_retention", pa.float64()), ("signed_retention", pa.float64()), ("mean_difference", pa.float64()),
    ("difference_ci_low", pa.float64()), ("difference_ci_high", pa.float64()),
    ("wilcoxon_statistic", pa.float64()), ("p_value", pa.float64()), ("p_holm", pa.float64()),
    ("rank_biserial", pa.float64()), ("significant", pa.bool_()),
])


@dataclass(frozen=True)
class VerdictRules:
    """The thresholds of SPEC §4, recorded with the results.

    retention: fail when CI_low(R) > it, pass when CI_high(R) < it. min_gap: a method whose mean
    r − c is below it is uninformative (the metric cannot tell its maps from another image's).
    entropy_rise: eMPRT passes when the CI of the entropy rise is above it, fails when at or below.
    alpha: family-wise level of the Holm-corrected paired comparisons.
    retention_spread: the 0.5 has no source in the literature, so every retention verdict is also read
    at retention ± this (0.4 and 0.6 by default); one that changes there is threshold-sensitive.
    """

    retention: float = 0.5
    min_gap: float = 0.2
    entropy_rise: float = 0.0
    alpha: float = 0.05
    retention_spread: float = 0.1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- retention
def retention(value, chance, retest) -> np.ndarray:
    """R = (s − c)/(r − c), element-wise; NaN where it is undefined (r = c, or a missing reference)."""
    s, c, r = (np.asarray(v, dtype=np.float64) for v in (value, chance, retest))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (s - c) / (r - c)
    return np.where(np.isfinite(out), out, np.nan)


def _nan_to_null(array: pa.ChunkedArray | pa.Array) -> pa.Array:
    array = pc.cast(array, pa.float64())
    return pc.if_else(pc.is_nan(array), pa.scalar(None, pa.float64()), array)


def _working_table(scores: pa.Table) -> pa.Table:
    """Score rows with gap, excess and per-image retention columns (NaN → null), seed filled with −1
    where the test has none, plus one "cascade" row per (model, method, test, metric, seed, image) of each
    normalised curve test (MPRT): the means over its states."""
    missing = [c for c in (*GROUP_KEYS, "image_id", "value", "chance", "retest", "seed")
               if c not in scores.column_names]
    if missing:
        raise ValueError(f"scores lacks columns {missing}; expected the score schema {SCORE_SCHEMA.names}")
    value, chance, retest = (scores[c].to_numpy(zero_copy_only=False).astype(np.float64)
                             for c in ("value", "chance", "retest"))
    joint = np.isfinite(value) & np.isfinite(chance) & np.isfinite(retest)
    with np.errstate(invalid="ignore"):
        gap, excess = np.where(joint, retest - chance, np.nan), np.where(joint, value - chance, np.nan)
    columns = {k: scores[k] for k in (*GROUP_KEYS, "image_id")}
    columns["seed"] = pc.fill_null(scores["seed"], -1)
    for name, array in (("value", value), ("chance", chance), ("retest", retest), ("gap", gap),
                        ("excess", excess), ("retention", retention(value, chance, retest))):
        columns[name] = _nan_to_null(pa.array(array, pa.float64()))
    table = pa.table(columns)
    curves = [test.id for test in sanity_tests() if test.curve and test.normalised]
    mprt = table.filter(pc.is_in(table["test"], pa.array(curves, pa.string())))
    if mprt.num_rows:
        keys = ["model", "method", "test", "metric", "seed", "image_id"]
        mprt = mprt.sort_by([(k, "ascending") for k in (*keys, "state_index")])  # sums in state order
        cascade = mprt.group_by(keys, use_threads=False).aggregate([(q, "mean") for q in (*QUANTITIES, "retention")])
        cascade = cascade.rename_columns([c.removesuffix("_mean") for c in cascade.column_names])
        n = cascade.num_rows
        cascade = cascade.append_column("state", pa.array([CASCADE] * n, pa.string()))
        cascade = cascade.append_column("state_index", pa.array([CASCADE_INDEX] * n, pa.int32()))
        table = pa.concat_tables([table, cascade.select(table.column_names)])
    return table


# --------------------------------------------------------------------------------------------- bootstrap
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


# --------------------------------------------------------------------------------------------- verdicts
def _retention_verdict(row: dict, rules: VerdictRules) -> tuple[str, str]:
    gap, low, high = row["gap_mean"], row["retention_ci_low"], row["retention_ci_high"]
    if gap is None or not math.isfinite(gap):
        return "uninformative", "no finite retest − chance (constant maps, or one image per batch)"
    if gap < rules.min_gap:
        return "uninformative", f"mean(r − c) = {gap:.3f} < {rules.min_gap}"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive", "no finite retention"
    if low > rules.retention:
        return "fail", f"CI_low(R) = {low:.3f} > {rules.retention}"
    if high < rules.retention:
        return "pass", f"CI_high(R) = {high:.3f} < {rules.retention}"
    return "inconclusive", f"CI(R) = [{low:.3f}, {high:.3f}] contains {rules.retention}"


def _entropy_verdict(row: dict, mprt_gaps: list[float], rules: VerdictRules) -> tuple[str, str]:
    if mprt_gaps and all(g is not None and math.isfinite(g) and g < rules.min_gap for g in mprt_gaps):
        return "uninformative", f"MPRT mean(r − c) < {rules.min_gap} on every metric at this state"
    low, high = row["ci_low"], row["ci_high"]
    if low is None or not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive", "no finite entropy rise"
    if low > rules.entropy_rise:
        return "pass", f"CI_low(entropy rise) = {low:.3f} > {rules.entropy_rise}"
    if high <= rules.entropy_rise:
        return "fail", f"CI_high(entropy rise) = {high:.3f} ≤ {rules.entropy_rise}"
    return "inconclusive", f"CI(entropy rise) = [{low:.3f}, {high:.3f}] contains {rules.entropy_rise}"


def verdicts(summary: pa.Table, rules: VerdictRules = VerdictRules(), order: str = "cascade_top_down") -> pa.Table:
    """pass | fail | inconclusive | uninformative per method and test (SPEC §4), at the scopes each
    registered test names (``SanityTest.scope``).

    Class sensitivity: one verdict per other class and metric. MPRT: scope "head" (the state where the
    classifier head is randomised) and "cascade" (the mean R over states), per metric. A test whose low
    score passes is read by the CI of its retention R; one whose high score passes (eMPRT, scope "full":
    the fully randomised model) by the CI of its value, and is uninformative when the test whose maps it
    scores is uninformative at that state on every metric. Each retention verdict is also read at
    ``rules.retention`` ∓ ``rules.retention_spread`` (``verdict_at_low``/``_high``): one that changes
    there is ``threshold_sensitive``.
    """
    rows = summary.to_pylist()
    n_states: dict[tuple[str, str], int] = {}
    for r in rows:
        if get_test(r["test"]).curve and r["state_index"] >= 0:
            key = (r["model"], r["test"])
            n_states[key] = max(n_states.get(key, 0), r["state_index"] + 1)
    gaps: dict[tuple, list[float]] = {}
    for r in rows:
        if get_test(r["test"]).normalised:
            gaps.setdefault((r["model"], r["method"], r["test"], r["state_index"]), []).append(r["gap_mean"])
    columns: dict[str, list] = {name: [] for name in VERDICT_SCHEMA.names}
    for r in rows:
        test = get_test(r["test"])
        scope = test.scope(r["state"], r["state_index"], n_states.get((r["model"], r["test"]), 0), order)
        if scope is None:
            continue
        if test.direction == "lower":
            verdict, reason = _retention_verdict(r, rules)
            at_low = _retention_verdict(r, replace(rules, retention=rules.retention - rules.retention_spread))[0]
            at_high = _retention_verdict(r, replace(rules, retention=rules.retention + rules.retention_spread))[0]
        else:
            source_gaps = gaps.get((r["model"], r["method"], test.source, r["state_index"]), [])
            verdict, reason = _entropy_verdict(r, source_gaps, rules)
            at_low = at_high = verdict  # its threshold (no rise) is not a free choice
        for name in VERDICT_SCHEMA.names:
            if name in r:
                columns[name].append(r[name])
        columns["scope"].append(scope)
        columns["verdict"].append(verdict)
        columns["reason"].append(reason)
        columns["verdict_at_low"].append(at_low)
        columns["verdict_at_high"].append(at_high)
        columns["threshold_sensitive"].append(at_low != verdict or at_high != verdict)
    return pa.table(columns, schema=VERDICT_SCHEMA)


#: What the controls must show on a trained model (SPEC §4): (method, test or None = every test, verdict).
CONTROL_EXPECTATIONS = (("edge_sobel", None, "fail"), ("random", None, "uninformative"),
                        ("gradient", "class_sensitivity", "pass"), ("gradient", "mprt", "pass"))


def control_checks(verdict_table: pa.Table) -> list[dict]:
    """Each control verdict against what it must be: rows of control, test, scope, metric, expected,
    verdict, ok. For ``gradient`` the MPRT check is the head-randomised state."""
    checks = []
    for r in verdict_table.to_pylist():
        for method, test, expected in CONTROL_EXPECTATIONS:
            if r["method"] != method or (test is not None and r["test"] != test):
                continue
            if method == "gradient" and r["test"] == "mprt" and r["scope"] != "head":
                continue
            checks.append({"control": method, "test": r["test"], "scope": r["scope"], "metric": r["metric"],
                           "expected": expected, "verdict": r["verdict"], "ok": r["verdict"] == expected})
    return checks


# --------------------------------------------------------------------------------------------- comparisons
def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count)."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def rank_biserial(differences: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation: (W⁺ − W⁻)/(W⁺ + W⁻) over the non-zero differences."""
    d = differences[differences != 0]
    if d.size == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def comparisons(scores: pa.Table, order: str = "cascade_top_down", n_boot: int = 1000, seed: int = 0,
                rules: VerdictRules = VerdictRules()) -> pa.Table:
    """The paper's table: per image, R of a pos/abs variant minus R of its signed counterpart
    (``Method.signed_counterpart``), at every class-sensitivity state and at MPRT's head and cascade
    scopes, per metric. R is first averaged over randomisation seeds per image; then the mean difference
    with a bootstrap 95% CI, a two-sided Wilcoxon signed-rank test, Holm-corrected over every row, and
    the matched-pairs rank-biserial effect size (> 0: the variant retains more, i.e. is less sensitive).
    One table at once; ``ComparisonAccumulator`` builds the same table one shard at a time.
    """
    table = _working_table(scores)
    methods = sorted(set(table["method"].to_pylist()))
    accumulator = ComparisonAccumulator(methods, curve_lengths(table), order, n_boot, seed, rules)
    accumulator.add(scores)
    return accumulator.table()


def curve_lengths(table: pa.Table) -> dict[tuple[str, str], int]:
    """{(model, test): number of states} of the curve tests, from a summary or score table."""
    lengths: dict[tuple[str, str], int] = {}
    for test in sanity_tests():
        if not test.curve:
            continue
        rows = table.filter(pc.and_(pc.equal(table["test"], test.id), pc.greater_equal(table["state_index"], 0)))
        if rows.num_rows:
            grouped = rows.group_by("model", use_threads=False).aggregate([("state_index", "max")])
            for model, last in zip(grouped["model"].to_pylist(), grouped["state_index_max"].to_pylist()):
                lengths[(model, test.id)] = last + 1
    return lengths


class ComparisonAccumulator:
    """The paired comparisons built one shard at a time: it keeps, per image, only the seed-mean R of the
    methods in a (variant, signed) pair at the scopes the table reports — one number per image and
    comparison, the least a Wilcoxon signed-rank test needs — not the score rows."""

    def __init__(self, methods: Sequence[str], n_states: dict[tuple[str, str], int],
                 order: str = "cascade_top_down", n_boot: int = 1000, seed: int = 0,
                 rules: VerdictRules = VerdictRules()) -> None:
        _check_n_boot(n_boot)
        self.pairs = signed_pairs(sorted(methods))
        self.methods = sorted({m for pair in self.pairs for m in pair})  # read only these rows
        self.n_states, self.order, self.n_boot, self.seed, self.rules = n_states, order, n_boot, seed, rules
        self._images: dict[tuple, list[np.ndarray]] = {}  # (model, method, test, state, index, metric) → codes
        self._codes: dict[str, int] = {}  # image id → code (one string per image, not one per value)
        self._values: dict[tuple, list[np.ndarray]] = {}  # … → seed-mean R per image

    def add(self, scores: pa.Table) -> None:
        """Fold in score rows (score schema) holding every row of their images."""
        if not self.methods:
            return
        scores = scores.filter(pc.is_in(scores["method"], pa.array(self.methods, pa.string())))
        normalised = [t.id for t in sanity_tests() if t.normalised]
        table = _working_table(scores.filter(pc.is_in(scores["test"], pa.array(normalised, pa.string()))))
        if table.num_rows == 0:
            return
        per_image = table.group_by([*GROUP_KEYS, "image_id"], use_threads=False).aggregate(
            [("retention", "mean")])  # nulls (undefined R) skipped: the mean over the seeds where R is defined
        ordered = per_image.sort_by([(k, "ascending") for k in (*GROUP_KEYS, "image_id")])
        run, keys = _runs(ordered, GROUP_KEYS)
        encoded = pc.dictionary_encode(ordered["image_id"]).combine_chunks()
        codes = np.array([self._codes.setdefault(i, len(self._codes)) for i in encoded.dictionary.to_pylist()],
                         dtype=np.int64)
        ids = codes[encoded.indices.to_numpy()]
        values = ordered["retention_mean"].to_numpy(zero_copy_only=False).astype(np.float64)
        bounds = np.searchsorted(run, np.arange(len(keys) + 1))
        for k, key in enumerate(keys):
            model, _, test, state, index, _ = key
            if get_test(test).scope(state, index, self.n_states.get((model, test), 0), self.order) is None:
                continue
            # copies, not views: a view would keep this part's rows of every state alive
            self._images.setdefault(key, []).append(ids[bounds[k]:bounds[k + 1]].copy())
            self._values.setdefault(key, []).append(values[bounds[k]:bounds[k + 1]].copy())

    def _per_image(self, key: tuple, names: list[str]) -> dict[str, float]:
        codes = np.concatenate(self._images[key]).tolist()
        return dict(zip((names[c] for c in codes), np.concatenate(self._values[key]).tolist()))

    def table(self) -> pa.Table:
        """The comparison table (COMPARISON_SCHEMA) of everything added."""
        rows = []
        names = list(self._codes)  # code → image id (dicts keep insertion order)
        for key in sorted(self._values):
            model, method, test, state, index, metric = key
            scope = get_test(test).scope(state, index, self.n_states.get((model, test), 0), self.order)
            for variant, signed in self.pairs:
                other_key = (model, signed, test, state, index, metric)
                if method != variant or other_key not in self._values:
                    continue
                values, other = self._per_image(key, names), self._per_image(other_key, names)
                common = sorted(i for i in values
                                if i in other and math.isfinite(values[i]) and math.isfinite(other[i]))
                v = np.array([values[i] for i in common])
                s = np.array([other[i] for i in common])
                d = v - s
                row = {"model": model, "variant": variant, "signed": signed, "test": test, "scope": scope,
                       "state": state, "metric": metric, "n": int(d.size)}
                if d.size:
                    weights = image_weights(common, self.n_boot, self.seed)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        low, high = _percentile_interval((weights @ d) / weights.sum(axis=1))
                    if np.any(d != 0):
                        result = stats.wilcoxon(d)
                        statistic, p = float(result.statistic), float(result.pvalue)
                    else:
                        statistic, p = 0.0, 1.0
                    row.update(variant_retention=float(v.mean()), signed_retention=float(s.mean()),
                               mean_difference=float(d.mean()), difference_ci_low=float(low),
                               difference_ci_high=float(high), wilcoxon_statistic=statistic, p_value=p,
                               rank_biserial=rank_biserial(d))
                rows.append(row)
        adjusted = holm([r.get("p_value", math.nan) for r in rows])
        for row, p in zip(rows, adjusted):
            row["p_holm"] = float(p)
            row["significant"] = bool(np.isfinite(p) and p < self.rules.alpha)
        full = [{name: row.get(name, math.nan) for name in COMPARISON_SCHEMA.names} for row in rows]
        return pa.Table.from_pylist(full, schema=COMPARISON_SCHEMA)
