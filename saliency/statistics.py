"""From score rows to answers (SPEC §4): normalised retention, bootstrap summaries, verdicts, and the
paper's paired pos/abs-vs-signed comparisons.

A raw similarity s means little on its own (an edge detector scores 1, noise 0), so every score row
carries its chance level c (the same comparison against another image's map) and its retest level r
(1, or two draws of a stochastic method). The normalised retention R = (s − c)/(r − c) is 0 when the map
changed as much as if it were another image's, 1 when it did not change at all.

Confidence intervals resample randomisation seeds, then images (a two-level percentile bootstrap), on
tables sorted by seed and image id, so they are reproducible for a given seed and do not depend on the
order of the rows, on sharding, or on which other groups are in the table.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from saliency.methods import signed_pairs
from saliency.sanity import CASCADE, CASCADE_INDEX, SCORE_SCHEMA, get_test, sanity_tests
from saliency.seeds import stable_seed

GROUP_KEYS = ("model", "method", "test", "state", "state_index", "metric")
QUANTITIES = ("value", "chance", "retest", "gap", "retention")  # gap = r − c, retention = R
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
    """

    retention: float = 0.5
    min_gap: float = 0.2
    entropy_rise: float = 0.0
    alpha: float = 0.05

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
    """Score rows with gap and retention columns (NaN → null), seed filled with −1 where the test has
    none, plus one "cascade" row per (model, method, test, metric, seed, image) of each normalised curve test (MPRT):
    the means over its states."""
    missing = [c for c in (*GROUP_KEYS, "image_id", "value", "chance", "retest", "seed")
               if c not in scores.column_names]
    if missing:
        raise ValueError(f"scores lacks columns {missing}; expected the score schema {SCORE_SCHEMA.names}")
    value, chance, retest = (scores[c].to_numpy(zero_copy_only=False).astype(np.float64)
                             for c in ("value", "chance", "retest"))
    with np.errstate(invalid="ignore"):
        gap = retest - chance
    columns = {k: scores[k] for k in (*GROUP_KEYS, "image_id")}
    columns["seed"] = pc.fill_null(scores["seed"], -1)
    for name, array in (("value", value), ("chance", chance), ("retest", retest), ("gap", gap),
                        ("retention", retention(value, chance, retest))):
        columns[name] = _nan_to_null(pa.array(array, pa.float64()))
    table = pa.table(columns)
    curves = [test.id for test in sanity_tests() if test.curve and test.normalised]
    mprt = table.filter(pc.is_in(table["test"], pa.array(curves, pa.string())))
    if mprt.num_rows:
        keys = ["model", "method", "test", "metric", "seed", "image_id"]
        cascade = mprt.group_by(keys, use_threads=False).aggregate([(q, "mean") for q in QUANTITIES])
        cascade = cascade.rename_columns([c.removesuffix("_mean") for c in cascade.column_names])
        n = cascade.num_rows
        cascade = cascade.append_column("state", pa.array([CASCADE] * n, pa.string()))
        cascade = cascade.append_column("state_index", pa.array([CASCADE_INDEX] * n, pa.int32()))
        table = pa.concat_tables([table, cascade.select(table.column_names)])
    return table


def _groups(table: pa.Table, keys: Sequence[str]):
    """(key values, slice of the table sorted by keys, seed and image id) per group."""
    ordered = table.sort_by([(k, "ascending") for k in (*keys, "seed", "image_id")])
    key_arrays = [ordered[k].to_numpy(zero_copy_only=False) for k in keys]
    n = ordered.num_rows
    if n == 0:
        return
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for array in key_arrays:
        change[1:] |= array[1:] != array[:-1]
    starts = np.flatnonzero(change).tolist() + [n]
    for a, b in zip(starts[:-1], starts[1:]):
        yield tuple(array[a].item() if hasattr(array[a], "item") else array[a] for array in key_arrays), \
            ordered.slice(a, b - a)


# --------------------------------------------------------------------------------------------- bootstrap
class _Resampler:
    """Bootstrap weights shared by every group with the same (seeds, images) shape: resample seeds, then
    images; each resample's mean is Σ_s w_s Σ_i w_i v_si / Σ_s w_s Σ_i w_i m_si (m = finite). Drawn from a
    generator seeded by (seed, shape), so a group's CI does not depend on the other groups."""

    def __init__(self, n_boot: int, seed: int, level: float = 0.95):
        if n_boot < 1:
            raise ValueError(f"n_boot must be a positive number of bootstrap resamples, got {n_boot}")
        self.n_boot, self.seed, self.level = n_boot, seed, level
        self._weights: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _counts(self, rng: np.random.Generator, size: int) -> np.ndarray:
        draws = rng.integers(0, size, size=(self.n_boot, size))
        offsets = np.arange(self.n_boot)[:, None] * size
        return np.bincount((draws + offsets).ravel(), minlength=self.n_boot * size).reshape(
            self.n_boot, size).astype(np.float64)

    def weights(self, n_seeds: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
        key = (n_seeds, n_images)
        if key not in self._weights:
            rng = np.random.default_rng([self.seed, stable_seed("bootstrap", n_seeds, n_images)])
            seeds = self._counts(rng, n_seeds) if n_seeds > 1 else np.ones((self.n_boot, 1))
            self._weights[key] = (seeds, self._counts(rng, n_images))
        return self._weights[key]

    def intervals(self, cube: np.ndarray) -> np.ndarray:
        """cube Q×S×N (NaN = missing) → Q×2 percentile CIs of the mean."""
        q, s, n = cube.shape
        finite = np.isfinite(cube)
        seed_w, image_w = self.weights(s, n)
        num = (image_w @ np.where(finite, cube, 0.0).reshape(q * s, n).T).reshape(-1, q, s)
        den = (image_w @ finite.reshape(q * s, n).T.astype(np.float64)).reshape(-1, q, s)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (num * seed_w[:, None, :]).sum(axis=2) / (den * seed_w[:, None, :]).sum(axis=2)
        tail = (1.0 - self.level) / 2 * 100
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanpercentile(means, [tail, 100 - tail], axis=0).T


def _cube(group: pa.Table, quantities: Sequence[str]) -> np.ndarray:
    """Q×seeds×images array of a group (rows sorted by seed, image id); NaN where missing."""
    seeds, seed_index = np.unique(group["seed"].to_numpy(), return_inverse=True)
    images, image_index = np.unique(group["image_id"].to_numpy(zero_copy_only=False), return_inverse=True)
    cube = np.full((len(quantities), len(seeds), len(images)), np.nan)
    for q, name in enumerate(quantities):
        cube[q, seed_index, image_index] = group[name].to_numpy(zero_copy_only=False).astype(np.float64)
    return cube


# --------------------------------------------------------------------------------------------- summary
def summarize(scores: pa.Table, n_boot: int = 1000, seed: int = 0) -> pa.Table:
    """Per (model, method, test, state, state_index, metric): n (finite scores), n_seeds, mean, sample std
    and bootstrap 95% CI of the raw score; mean and CI of chance, retest, gap = r − c and retention R.

    MPRT also gets state "cascade" (state_index −1): per seed and image, the mean over states of every
    quantity (R included: the mean R over states, SPEC §4). NaN scores are left out of every statistic.
    """
    resampler = _Resampler(n_boot, seed)
    columns: dict[str, list] = {name: [] for name in SUMMARY_SCHEMA.names}
    for key, group in _groups(_working_table(scores), GROUP_KEYS):
        cube = _cube(group, QUANTITIES)
        finite = np.isfinite(cube)
        intervals = resampler.intervals(cube)
        values = cube[0][finite[0]]
        for name, item in zip(GROUP_KEYS, key):
            columns[name].append(item)
        columns["n"].append(int(values.size))
        columns["n_seeds"].append(int(finite[0].any(axis=1).sum()))
        columns["std"].append(float(values.std(ddof=1)) if values.size > 1 else math.nan)
        for q, name in enumerate(QUANTITIES):
            label = "" if name == "value" else f"{name}_"
            mean = float(cube[q][finite[q]].mean()) if finite[q].any() else math.nan
            low, high = intervals[q] if finite[q].any() else (math.nan, math.nan)
            columns[f"{label}mean"].append(mean)
            columns[f"{label}ci_low"].append(float(low))
            columns[f"{label}ci_high"].append(float(high))
    return pa.table(columns, schema=SUMMARY_SCHEMA)


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
    scores is uninformative at that state on every metric.
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
        else:
            source_gaps = gaps.get((r["model"], r["method"], test.source, r["state_index"]), [])
            verdict, reason = _entropy_verdict(r, source_gaps, rules)
        for name in VERDICT_SCHEMA.names:
            if name in r:
                columns[name].append(r[name])
        columns["scope"].append(scope)
        columns["verdict"].append(verdict)
        columns["reason"].append(reason)
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
    """
    table = _working_table(scores)
    methods = sorted(set(table["method"].to_pylist()))
    pairs = signed_pairs(methods)
    resampler = _Resampler(n_boot, seed)
    per_image: dict[tuple, dict[str, float]] = {}
    n_states: dict[tuple[str, str], int] = {}
    for (model, method, test, state, index, metric), group in _groups(table, GROUP_KEYS):
        if not get_test(test).normalised:
            continue
        if index >= 0:
            n_states[(model, test)] = max(n_states.get((model, test), 0), index + 1)
        cube = _cube(group, ("retention",))[0]
        images = np.unique(group["image_id"].to_numpy(zero_copy_only=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            seed_mean = np.nanmean(cube, axis=0)
        per_image[(model, method, test, state, index, metric)] = dict(zip(images.tolist(), seed_mean.tolist()))
    rows = []
    for (model, method, test, state, index, metric), values in per_image.items():
        scope = get_test(test).scope(state, index, n_states.get((model, test), 0), order)
        if scope is None:
            continue
        for variant, signed in pairs:
            if method != variant or (model, signed, test, state, index, metric) not in per_image:
                continue
            other = per_image[(model, signed, test, state, index, metric)]
            common = sorted(i for i in values if i in other and math.isfinite(values[i]) and math.isfinite(other[i]))
            v = np.array([values[i] for i in common])
            s = np.array([other[i] for i in common])
            d = v - s
            row = {"model": model, "variant": variant, "signed": signed, "test": test, "scope": scope,
                   "state": state, "metric": metric, "n": int(d.size)}
            if d.size:
                low, high = resampler.intervals(d[None, None, :])[0]
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
        row["significant"] = bool(np.isfinite(p) and p < rules.alpha)
    full = [{name: row.get(name, math.nan) for name in COMPARISON_SCHEMA.names} for row in rows]
    return pa.Table.from_pylist(full, schema=COMPARISON_SCHEMA)
