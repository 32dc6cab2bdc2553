"""Normalised retention R = (s − c)/(r − c) per score row, and the working table the summaries and the
paired comparisons read (SPEC §4): per-image R, gap = r − c and excess = s − c."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saliency.sanity import CASCADE, CASCADE_INDEX, SCORE_SCHEMA, sanity_tests

GROUP_KEYS = ("model", "method", "test", "state", "state_index", "metric")
#: Summed per group, seed and resample. gap = r − c and excess = s − c are taken over the rows where s, c
#: and r are all finite, so that R = Σ excess / Σ gap compares the same images.
QUANTITIES = ("value", "chance", "retest", "gap", "excess")
_GAP, _EXCESS = QUANTITIES.index("gap"), QUANTITIES.index("excess")

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
