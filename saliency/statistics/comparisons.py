"""The paper's paired comparisons (SPEC §4): each pos/abs variant against its signed counterpart, per image
(seed-mean R), Wilcoxon signed-rank with Holm correction, rank-biserial effect size and a bootstrap CI of
the mean difference; ``ComparisonAccumulator`` builds them one shard at a time."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saliency.methods import signed_pairs
from saliency.sanity import get_test, sanity_tests
from saliency.statistics.bootstrap import _check_n_boot, _percentile_interval, _runs, image_weights
from saliency.statistics.retention import GROUP_KEYS, _working_table
from saliency.statistics.verdicts import VerdictRules

COMPARISON_SCHEMA = pa.schema([
    ("model", pa.string()), ("variant", pa.string()), ("signed", pa.string()), ("test", pa.string()),
    ("scope", pa.string()), ("state", pa.string()), ("metric", pa.string()), ("n", pa.int64()),
    ("variant_retention", pa.float64()), ("signed_retention", pa.float64()), ("mean_difference", pa.float64()),
    ("difference_ci_low", pa.float64()), ("difference_ci_high", pa.float64()),
    ("wilcoxon_statistic", pa.float64()), ("p_value", pa.float64()), ("p_holm", pa.float64()),
    ("rank_biserial", pa.float64()), ("significant", pa.bool_()),
])



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
    from scipy.stats import rankdata  # imported where used: see ComparisonAccumulator.table

    ranks = rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def comparisons(scores: pa.Table, options: Mapping[str, Any] | None = None, n_boot: int = 1000, seed: int = 0,
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
    accumulator = ComparisonAccumulator(methods, curve_lengths(table), options, n_boot, seed, rules)
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
                 options: Mapping[str, Any] | None = None, n_boot: int = 1000, seed: int = 0,
                 rules: VerdictRules = VerdictRules()) -> None:
        _check_n_boot(n_boot)
        self.pairs = signed_pairs(sorted(methods))
        self.methods = sorted({m for pair in self.pairs for m in pair})  # read only these rows
        self.n_states, self.n_boot, self.seed, self.rules = n_states, n_boot, seed, rules
        self.options = dict(options or {})
        self._images: dict[tuple, list[np.ndarray]] = {}  # (model, method, test, state, index, metric) → codes
        self._codes: dict[str, int] = {}  # image id → code (one string per image, not one per value)
        self._values: dict[tuple, list[np.ndarray]] = {}  # … → seed-mean R per image

    def _scope(self, model: str, test: str, state: str, index: int) -> str | None:
        declared = get_test(test)
        return declared.scope(state, index, self.n_states.get((model, test), 0), declared.state_options(self.options))

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
            if self._scope(model, test, state, index) is None:
                continue
            # copies, not views: a view would keep this part's rows of every state alive
            self._images.setdefault(key, []).append(ids[bounds[k]:bounds[k + 1]].copy())
            self._values.setdefault(key, []).append(values[bounds[k]:bounds[k + 1]].copy())

    def _per_image(self, key: tuple, names: list[str]) -> dict[str, float]:
        codes = np.concatenate(self._images[key]).tolist()
        return dict(zip((names[c] for c in codes), np.concatenate(self._values[key]).tolist()))

    def table(self) -> pa.Table:
        """The comparison table (COMPARISON_SCHEMA) of everything added."""
        # scipy.stats is imported here and in rank_biserial, not at the top: it takes about 1 s, and every
        # Ray worker imports this package (through the run's config) without ever comparing
        from scipy.stats import wilcoxon

        rows = []
        names = list(self._codes)  # code → image id (dicts keep insertion order)
        for key in sorted(self._values):
            model, method, test, state, index, metric = key
            scope = self._scope(model, test, state, index)
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
                        result = wilcoxon(d)
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
