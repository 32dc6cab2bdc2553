"""saliency.statistics: normalised retention, two-level bootstrap summaries, verdicts and the paired
pos/abs-vs-signed comparisons (SPEC §4). Oracles: scipy.stats.wilcoxon, a hand-written Holm, numpy."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import scipy.stats
import torch

from saliency.sanity import SCORE_SCHEMA, chance_partners
from saliency.similarity import similarity
from saliency.statistics import (
    CASCADE, COMPARISON_SCHEMA, SUMMARY_SCHEMA, VERDICT_SCHEMA, VerdictRules, comparisons, control_checks,
    holm, rank_biserial, retention, summarize, verdicts,
)


def _row(method="gradient", test="mprt", state="00:fc", state_index=0, metric="ssim", image="0", seed=None,
         value=0.5, chance=0.0, retest=1.0, model="m") -> dict:
    return dict(run_id="", shard=0, image_id=image, label=None, model=model, method=method, test=test,
                state=state, state_index=state_index, seed=seed, target_class=1, metric=metric, value=value,
                chance=chance, retest=retest)


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)


# --------------------------------------------------------------------------------------------- retention
def _scores_of(maps: torch.Tensor, other: torch.Tensor, metric: str = "ssim") -> tuple[np.ndarray, ...]:
    """s, c as saliency.sanity computes them: image i against its own other map and its partner's."""
    partners = chance_partners([str(i) for i in range(maps.shape[0])])
    s = similarity(maps, other, metric).numpy()
    c = np.mean([similarity(maps, other[partners[:, k]], metric).numpy() for k in range(partners.shape[1])],
                axis=0)
    return s, c


def _smooth_maps(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.avg_pool2d(torch.randn(n, 1, 20, 20, generator=g), 5, 1, 2)[:, 0]
    return base


def test_identical_maps_retain_everything():
    maps = _smooth_maps(16, 0)
    s, c = _scores_of(maps, maps.clone())
    np.testing.assert_allclose(retention(s, c, 1.0), 1.0, atol=1e-12)


def test_a_map_equal_to_another_images_map_retains_nothing():
    maps = _smooth_maps(200, 1)
    other = maps.roll(shifts=5, dims=0)  # image i's "other" map is image i−5's map
    s, c = _scores_of(maps, other)
    r = retention(s, c, 1.0)
    rows = [_row(image=f"{i:03d}", value=float(s[i]), chance=float(c[i])) for i in range(200)]
    summary = summarize(_table(rows), n_boot=1000).to_pylist()
    state = [row for row in summary if row["state"] != CASCADE][0]
    assert abs(r.mean()) < 0.1 and state["retention_ci_low"] < 0 < state["retention_ci_high"]


def test_maps_that_ignore_the_image_are_uninformative():
    """The same map for every image (chance = retest = 1), and constant maps (similarity undefined)."""
    pattern = _smooth_maps(1, 2).expand(8, -1, -1)
    s, c = _scores_of(pattern, pattern.clone())
    assert np.allclose(c, 1.0)
    constant = torch.ones(8, 20, 20)
    s2, c2 = _scores_of(constant, constant)
    rows = [_row(method="pattern", image=str(i), value=float(s[i]), chance=float(c[i])) for i in range(8)]
    rows += [_row(method="constant", image=str(i), value=float(s2[i]), chance=float(c2[i])) for i in range(8)]
    table = verdicts(summarize(_table(rows), n_boot=200))
    assert {r["verdict"] for r in table.to_pylist()} == {"uninformative"}


def test_retention_formula_and_undefined_cases():
    np.testing.assert_allclose(retention([0.6, 0.2, 0.5], [0.2, 0.2, 0.5], [1.0, 0.6, 0.5]),
                               [0.5, 0.0, math.nan])
    assert math.isnan(retention(0.3, math.nan, 1.0))


# --------------------------------------------------------------------------------------------- summary
def test_summarize_statistics_nan_handling_and_determinism():
    rng = np.random.default_rng(0)
    values = rng.normal(0.5, 0.2, size=40)
    rows = [_row(image=f"{i:02d}", value=float(v)) for i, v in enumerate(values)]
    rows += [_row(image="nan", value=math.nan), _row(image="null", value=None)]
    rows += [_row(method="constant", image=str(i), value=math.nan) for i in range(2)]
    rows += [_row(method="single", value=0.3, chance=0.1)]
    summary = summarize(_table(rows), n_boot=500, seed=1)
    assert summary.schema == SUMMARY_SCHEMA
    by_method = {r["method"]: r for r in summary.to_pylist() if r["state"] != CASCADE}
    g = by_method["gradient"]
    assert g["n"] == 40 and g["n_seeds"] == 1  # NaN and null are left out and not counted
    assert g["mean"] == pytest.approx(values.mean()) and g["std"] == pytest.approx(values.std(ddof=1))
    assert g["ci_low"] < g["mean"] < g["ci_high"]
    assert g["retention_mean"] == pytest.approx(values.mean())  # c = 0, r = 1: R = s
    assert (g["chance_mean"], g["retest_mean"], g["gap_mean"]) == (0.0, 1.0, 1.0)
    c = by_method["constant"]
    assert c["n"] == 0 and all(math.isnan(c[k]) for k in ("mean", "std", "ci_low", "ci_high"))
    s = by_method["single"]
    assert (s["n"], s["mean"], s["ci_low"], s["ci_high"]) == (1, 0.3, 0.3, 0.3) and math.isnan(s["std"])
    assert s["retention_mean"] == pytest.approx((0.3 - 0.1) / 0.9)

    again = summarize(_table(rows), n_boot=500, seed=1)
    np.testing.assert_equal(again.to_pydict(), summary.to_pydict())  # NaN counts as equal here
    other_seed = [r for r in summarize(_table(rows), n_boot=500, seed=2).to_pylist()
                  if r["method"] == "gradient" and r["state"] != CASCADE][0]
    assert (other_seed["ci_low"], other_seed["ci_high"]) != (g["ci_low"], g["ci_high"])
    alone = [r for r in summarize(_table(rows[:42]), n_boot=500, seed=1).to_pylist() if r["state"] != CASCADE]
    assert alone == [g]  # a group's CI does not depend on the other groups in the table


def test_summary_does_not_depend_on_row_order_or_sharding():
    rng = np.random.default_rng(4)
    rows = [_row(image=f"img{i}", seed=seed, state=f"{k:02d}:l{k}", state_index=k, value=float(rng.random()),
                 chance=float(rng.random() * 0.2)) for i in range(30) for seed in (0, 1) for k in range(3)]
    table = _table(rows)
    shuffled = table.take(rng.permutation(table.num_rows))
    np.testing.assert_equal(summarize(shuffled, n_boot=300, seed=9).to_pydict(),
                            summarize(table, n_boot=300, seed=9).to_pydict())


def test_bootstrap_ci_matches_the_normal_approximation_for_large_n():
    values = np.random.default_rng(3).normal(0.0, 1.0, size=400)
    rows = [_row(image=f"{i:03d}", value=float(v)) for i, v in enumerate(values)]
    r = [r for r in summarize(_table(rows), n_boot=4000).to_pylist() if r["state"] != CASCADE][0]
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert r["ci_low"] == pytest.approx(values.mean() - half_width, abs=0.15 * half_width)
    assert r["ci_high"] == pytest.approx(values.mean() + half_width, abs=0.15 * half_width)


def test_the_ci_covers_seed_variance():
    """Two seeds whose scores differ by a constant offset: resampling seeds widens the CI; one seed's
    CI is the image-level CI."""
    rng = np.random.default_rng(5)
    noise = rng.normal(0, 0.05, size=100)
    rows = [_row(image=f"{i:03d}", seed=seed, value=0.5 + offset + float(noise[i]))
            for seed, offset in ((0, -0.2), (1, 0.2)) for i in range(100)]
    both = [r for r in summarize(_table(rows), n_boot=2000).to_pylist() if r["state"] != CASCADE][0]
    one = [r for r in summarize(_table(rows[:100]), n_boot=2000).to_pylist() if r["state"] != CASCADE][0]
    assert both["n_seeds"] == 2 and both["n"] == 200 and both["mean"] == pytest.approx(0.5 + noise.mean())
    assert both["ci_high"] - both["ci_low"] > 0.3  # the seed offset (±0.2) shows in the CI
    assert one["ci_high"] - one["ci_low"] < 0.03


def test_cascade_is_the_mean_of_the_states_retention():
    rows = [_row(image=i, state=f"{k:02d}:l", state_index=k, seed=0, value=v, chance=c)
            for i, k, v, c in (("a", 0, 0.9, 0.1), ("a", 1, 0.5, 0.5), ("b", 0, 0.7, 0.3), ("b", 1, 0.4, 0.2))]
    summary = summarize(_table(rows), n_boot=100).to_pylist()
    cascade = [r for r in summary if r["state"] == CASCADE][0]
    r_0 = ((0.9 - 0.1) + (0.7 - 0.3)) / ((1 - 0.1) + (1 - 0.3))  # state 0: Σ(s − c)/Σ(r − c)
    r_1 = ((0.5 - 0.5) + (0.4 - 0.2)) / ((1 - 0.5) + (1 - 0.2))
    states = {r["state_index"]: r["retention_mean"] for r in summary}
    assert states[0] == pytest.approx(r_0) and states[1] == pytest.approx(r_1)
    assert cascade["state_index"] == -1 and cascade["retention_mean"] == pytest.approx((r_0 + r_1) / 2)
    assert cascade["retention_ci_low"] <= cascade["retention_mean"] <= cascade["retention_ci_high"]


def test_retention_is_a_ratio_of_means_not_a_mean_of_ratios():
    """SPEC §4. Nine images with a wide gap r − c that keep a quarter of it, one with a tiny gap that keeps
    all of it: the mean of per-image ratios (0.325) is pulled up by the tiny-gap image; the ratio of
    means Σ(s − c)/Σ(r − c) is not (≈ 0.251)."""
    rows = [_row(image=f"wide{i}", state="min", state_index=0, test="class_sensitivity", value=0.25, chance=0.0)
            for i in range(9)]
    rows.append(_row(image="tiny", state="min", state_index=0, test="class_sensitivity", value=1.0, chance=0.99))
    per_image = np.array([0.25] * 9 + [1.0])
    ratio_of_means = (9 * 0.25 + 0.01) / (9 * 1.0 + 0.01)
    r = summarize(_table(rows), n_boot=500).to_pylist()[0]
    assert per_image.mean() == pytest.approx(0.325)
    assert r["retention_mean"] == pytest.approx(ratio_of_means)
    assert r["retention_ci_high"] < 0.3  # the tiny-gap image cannot drag the CI up to the mean of ratios
    verdict = verdicts(summarize(_table(rows), n_boot=500)).to_pylist()[0]
    assert verdict["verdict"] == "pass"


def test_retention_is_per_seed_then_averaged_over_seeds():
    """Seed 0 keeps 0.2 of a gap of 1, seed 1 keeps 0.3 of a gap of 0.1 (a ratio of 0.6 after c): R is
    the mean of the two seeds' ratios, 0.4, not the ratio of the pooled sums."""
    rows = [_row(image=f"i{i}", seed=0, value=0.2, chance=0.0) for i in range(5)]
    rows += [_row(image=f"i{i}", seed=1, value=0.96, chance=0.9) for i in range(5)]
    r = [r for r in summarize(_table(rows), n_boot=400).to_pylist() if r["state"] != CASCADE][0]
    assert r["retention_mean"] == pytest.approx((0.2 + 0.6) / 2)
    assert r["retention_ci_low"] == pytest.approx(0.2) and r["retention_ci_high"] == pytest.approx(0.6)


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="n_boot"):
        summarize(_table([_row()]), n_boot=0)
    with pytest.raises(ValueError, match="lacks columns"):
        summarize(pa.table({"value": [1.0]}))


# --------------------------------------------------------------------------------------------- verdicts
def _summary_row(method, test="class_sensitivity", state="min", state_index=0, metric="ssim", gap=0.8,
                 low=0.1, high=0.3, mean=0.5) -> dict:
    row = {name: math.nan for name in SUMMARY_SCHEMA.names}
    row.update(model="m", method=method, test=test, state=state, state_index=state_index, metric=metric, n=10,
               n_seeds=1, mean=mean, ci_low=low, ci_high=high, gap_mean=gap, retention_mean=(low + high) / 2,
               retention_ci_low=low, retention_ci_high=high)
    return row


def test_verdict_thresholds_are_honoured():
    rows = [_summary_row("passes", low=0.1, high=0.49), _summary_row("fails", low=0.51, high=0.9),
            _summary_row("straddles", low=0.4, high=0.6), _summary_row("flat", gap=0.19, low=0.9, high=1.0),
            _summary_row("undefined", gap=math.nan)]
    table = verdicts(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA))
    assert table.schema == VERDICT_SCHEMA
    got = {r["method"]: r["verdict"] for r in table.to_pylist()}
    assert got == {"passes": "pass", "fails": "fail", "straddles": "inconclusive", "flat": "uninformative",
                   "undefined": "uninformative"}
    strict = verdicts(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA),
                      VerdictRules(retention=0.35, min_gap=0.1))
    got = {r["method"]: r["verdict"] for r in strict.to_pylist()}
    assert got["passes"] == "inconclusive" and got["straddles"] == "fail" and got["flat"] == "fail"


def test_every_retention_verdict_says_whether_it_holds_at_the_thresholds_around_it():
    rows = [_summary_row("firm", low=0.1, high=0.3), _summary_row("near", low=0.2, high=0.45),
            _summary_row("fails_near", low=0.55, high=0.8), _summary_row("flat", gap=0.1, low=0.45, high=0.55)]
    table = {r["method"]: r for r in verdicts(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)).to_pylist()}
    assert (table["firm"]["verdict_at_low"], table["firm"]["verdict_at_high"]) == ("pass", "pass")
    assert not table["firm"]["threshold_sensitive"]
    assert (table["near"]["verdict"], table["near"]["verdict_at_low"]) == ("pass", "inconclusive")
    assert table["near"]["threshold_sensitive"]
    assert (table["fails_near"]["verdict_at_high"], table["fails_near"]["threshold_sensitive"]) == ("inconclusive", True)
    assert not table["flat"]["threshold_sensitive"]  # uninformative at every threshold
    wide = verdicts(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA), VerdictRules(retention_spread=0.25))
    assert {r["method"]: r["threshold_sensitive"] for r in wide.to_pylist()}["firm"]


def test_mprt_verdicts_at_the_head_and_for_the_cascade_emprt_at_the_last_state():
    rows = [_summary_row("g", "mprt", f"{k:02d}:l{k}", k, low=0.1 * k, high=0.1 * k + 0.05) for k in range(4)]
    rows.append(_summary_row("g", "mprt", CASCADE, -1, low=0.6, high=0.7))
    rows += [_summary_row("g", "emprt", f"{k:02d}:l{k}", k, metric="entropy_rise", low=-0.1, high=0.2)
             for k in range(3)]
    rows.append(_summary_row("g", "emprt", "03:l3", 3, metric="entropy_rise", low=0.05, high=0.2))
    summary = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    got = {(r["test"], r["scope"]): (r["state_index"], r["verdict"]) for r in verdicts(summary).to_pylist()}
    assert got == {("mprt", "head"): (0, "pass"), ("mprt", CASCADE): (-1, "fail"), ("emprt", "full"): (3, "pass")}
    bottom_up = {(r["test"], r["scope"]): r["state_index"]
                 for r in verdicts(summary, options={"mprt": {"order": "cascade_bottom_up"}}).to_pylist()}
    assert bottom_up[("mprt", "head")] == 3
    rows[-1] = _summary_row("g", "emprt", "03:l3", 3, metric="entropy_rise", low=-0.2, high=0.0)
    failing = verdicts(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)).to_pylist()
    assert [r["verdict"] for r in failing if r["test"] == "emprt"] == ["fail"]


def test_control_checks_flag_a_control_that_misbehaves():
    rows = [_summary_row("edge_sobel", low=0.9, high=1.0), _summary_row("random", gap=0.0),
            _summary_row("gradient", low=0.6, high=0.7)]
    checks = control_checks(verdicts(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)))
    assert {(c["control"], c["ok"]) for c in checks} == {("edge_sobel", True), ("random", True),
                                                         ("gradient", False)}


# --------------------------------------------------------------------------------------------- comparisons
def test_holm_and_rank_biserial_on_known_values():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, math.nan]), [0.03, 0.06, 0.06, math.nan])
    np.testing.assert_allclose(holm([0.5, 0.2]), [0.5, 0.4])
    assert rank_biserial(np.array([1.0, 2.0, 3.0])) == 1.0
    assert rank_biserial(np.array([-1.0, 2.0, 0.0])) == pytest.approx((2 - 1) / 3)


def test_comparisons_pair_each_variant_with_its_signed_counterpart():
    rng = np.random.default_rng(6)
    rows = []
    for i in range(40):
        base = float(rng.random() * 0.3)
        for method, shift in (("gradcampp", 0.4), ("gradcampp/signed", 0.0), ("gradcam", 0.0),
                              ("gradcam/pos", float(rng.normal(0, 0.05)))):
            rows.append(_row(method=method, test="class_sensitivity", state="min", image=f"{i:02d}",
                             value=base + shift, chance=0.0))
            for seed in (0, 1):
                rows.append(_row(method=method, state="00:fc", state_index=0, seed=seed, image=f"{i:02d}",
                                 value=base + shift, chance=0.0))
    table = comparisons(_table(rows), n_boot=500)
    assert table.schema == COMPARISON_SCHEMA
    got = {(r["variant"], r["signed"], r["test"], r["scope"]): r for r in table.to_pylist()}
    assert set(got) == {(v, s, t, scope) for v, s in (("gradcampp", "gradcampp/signed"), ("gradcam/pos", "gradcam"))
                        for t, scope in (("class_sensitivity", "min"), ("mprt", "head"), ("mprt", CASCADE))}
    pp = got[("gradcampp", "gradcampp/signed", "class_sensitivity", "min")]
    assert pp["n"] == 40 and pp["mean_difference"] == pytest.approx(0.4) and pp["rank_biserial"] == 1.0
    assert pp["significant"] and pp["difference_ci_low"] == pytest.approx(0.4)
    differences = [rows[k]["value"] for k in range(9, len(rows), 12)]  # gradcam/pos class rows
    signed = [rows[k]["value"] for k in range(6, len(rows), 12)]
    oracle = scipy.stats.wilcoxon(np.array(differences) - np.array(signed))
    cam = got[("gradcam/pos", "gradcam", "class_sensitivity", "min")]
    assert cam["p_value"] == pytest.approx(oracle.pvalue) and cam["wilcoxon_statistic"] == oracle.statistic
    np.testing.assert_allclose(table["p_holm"].to_numpy(), holm(table["p_value"].to_numpy()))
    assert not cam["significant"]


# --------------------------------------------------------------------------------------------- streaming
def _study(n_images=60, seeds=(0, 1, 2), states=4, methods=("gradcampp", "gradcampp/signed"), rng_seed=7):
    """Score rows of a small MPRT + class-sensitivity study, with NaN scores sprinkled in."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for i in range(n_images):
        image = f"im{i:03d}"
        for method in methods:
            shift = 0.3 if method == "gradcampp" else 0.0
            rows.append(_row(method=method, test="class_sensitivity", state="min", image=image,
                             value=float(rng.random() * 0.5 + shift), chance=float(rng.random() * 0.2)))
            for seed in seeds:
                for k in range(states):
                    value = math.nan if rng.random() < 0.02 else float(rng.random() * 0.6 + shift)
                    rows.append(_row(method=method, image=image, seed=seed, state=f"{k:02d}:l{k}", state_index=k,
                                     value=value, chance=float(rng.random() * 0.2)))
    return _table(rows)


def _by_image_blocks(table: pa.Table, sizes: list[int]) -> list[pa.Table]:
    """The table split into consecutive blocks of whole images (shards), in a shuffled row order."""
    ids = sorted(set(table["image_id"].to_pylist()))
    blocks, start = [], 0
    for size in sizes:
        chosen = pa.array(ids[start:start + size])
        blocks.append(table.filter(pa.compute.is_in(table["image_id"], chosen)))
        start += size
    assert start == len(ids)
    return blocks


def test_partial_statistics_merged_over_shards_equal_the_whole_table():
    """The accumulator fed shard by shard (two different shard layouts) gives the one-table summary:
    counts exactly, means, std and CIs to rounding (sums in another order); the Poisson weights make the
    CI independent of the layout."""
    from saliency.statistics import ComparisonAccumulator, SummaryAccumulator, curve_lengths

    table = _study()
    whole = summarize(table, n_boot=400, seed=3)
    for sizes in ([20, 20, 20], [7, 31, 1, 21]):
        accumulator = SummaryAccumulator(n_boot=400, seed=3)
        for block in _by_image_blocks(table, sizes):
            accumulator.add(block)
        merged = accumulator.summary()
        assert merged.schema == SUMMARY_SCHEMA and merged.num_rows == whole.num_rows
        for name in SUMMARY_SCHEMA.names:
            ours, theirs = merged[name].to_pylist(), whole[name].to_pylist()
            if isinstance(theirs[0], float):
                np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12, err_msg=name)
            else:
                assert ours == theirs, name
        paired = ComparisonAccumulator(["gradcampp", "gradcampp/signed"], curve_lengths(merged), n_boot=400, seed=3)
        for block in _by_image_blocks(table, sizes):
            paired.add(block)
        expected = comparisons(table, n_boot=400, seed=3)
        got = paired.table()
        assert got.num_rows == expected.num_rows == 3  # class min, MPRT head, MPRT cascade
        for name in COMPARISON_SCHEMA.names:
            ours, theirs = got[name].to_pylist(), expected[name].to_pylist()
            if isinstance(theirs[0], float):
                np.testing.assert_allclose(ours, theirs, rtol=1e-12, err_msg=name)
            else:
                assert ours == theirs, name


def test_summary_statistics_against_numpy_oracles():
    """n, mean and std of the raw scores pooled over seeds and images; R = the mean over seeds of
    Σ(s − c)/Σ(r − c) over the images whose s, c and r are finite."""
    table = _study(n_images=30)
    summary = {(r["method"], r["state"]): r for r in summarize(table, n_boot=200).to_pylist()}
    rows = [r for r in table.to_pylist() if r["method"] == "gradcampp" and r["state"] == "02:l2"]
    values = np.array([r["value"] for r in rows])
    finite = values[np.isfinite(values)]
    got = summary[("gradcampp", "02:l2")]
    assert got["n"] == finite.size and got["n_seeds"] == 3
    assert got["mean"] == pytest.approx(finite.mean(), rel=1e-12)
    assert got["std"] == pytest.approx(finite.std(ddof=1), rel=1e-10)
    per_seed = []
    for seed in sorted({row["seed"] for row in rows}):
        s_, c_ = (np.array([row[k] for row in rows if row["seed"] == seed], dtype=float) for k in ("value", "chance"))
        keep = np.isfinite(s_) & np.isfinite(c_)
        per_seed.append((s_[keep] - c_[keep]).sum() / (1.0 - c_[keep]).sum())
    assert got["retention_mean"] == pytest.approx(np.mean(per_seed), rel=1e-12)
    r = retention(values, [row["chance"] for row in rows], 1.0)
    assert got["retention_mean"] != pytest.approx(np.nanmean(r), rel=1e-3)  # not the mean of ratios


def test_poisson_weights_depend_only_on_the_image_the_resample_and_the_seed():
    from saliency.statistics import image_weights

    a = image_weights(["x", "y", "z"], 4000, seed=1)
    b = image_weights(["z", "x"], 4000, seed=1)
    np.testing.assert_array_equal(a[:, [2, 0]], b)  # same image, same column, whatever the company
    assert not np.array_equal(image_weights(["x"], 4000, seed=2)[:, 0], a[:, 0])
    assert a.mean() == pytest.approx(1.0, abs=0.03) and a.var() == pytest.approx(1.0, abs=0.06)  # Poisson(1)
    assert np.mean(a == 0) == pytest.approx(math.exp(-1), abs=0.01)
