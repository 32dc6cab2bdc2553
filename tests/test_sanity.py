"""saliency.sanity: class sensitivity and MPRT/eMPRT score rows with their chance and retest levels
(SPEC §2, §4); statistics and verdicts are in test_statistics.py.

Oracles: quantus.MPRT, quantus.RandomLogit and quantus.EfficientMPRT, run on the same model and batch
with an explain_func that calls our own ``explain`` (so both sides score identical maps); numpy/scipy
for the entropy. Each oracle test's docstring lists where Quantus's choices differ from ours and how
the comparison was made exact.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import scipy.stats
import skimage.metrics
import torch
from torch import nn

import saliency.randomize as randomize
import saliency.sanity as sanity
from saliency.engine import explain
from saliency.randomize import parameter_layers, randomized_state, state_name
from saliency.sanity import (
    SCORE_SCHEMA, class_sensitivity, discrete_entropy, entropy_rise, parameter_randomization,
    random_other_classes,
)

NUM_CLASSES = 6
SIZE = 16


def tiny_cnn() -> nn.Module:
    """Conv-BN-ReLU-Conv-ReLU-Pool-Linear; registration order = execution order (as Quantus assumes).
    BatchNorm gets non-trivial statistics and affine parameters, like a trained network."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(6 * (SIZE // 2) ** 2, NUM_CLASSES),
    )
    g = torch.Generator().manual_seed(1)
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(4, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def model() -> nn.Module:
    return tiny_cnn()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def _gradient_explain_func(asked: list | None = None):
    """A Quantus explain_func that returns our own ``gradient`` maps (B×1×H×W numpy)."""
    def explain_func(model, inputs, targets, **_):
        if asked is not None:
            asked.append(np.asarray(targets).copy())
        targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        return explain(model, torch.as_tensor(inputs), "gradient", targets)["gradient"].numpy()
    return explain_func


def _rows(table: pa.Table, **where) -> list[dict]:
    return [r for r in table.to_pylist() if all(r[k] == v for k, v in where.items())]


# --------------------------------------------------------------------------------------------- schema
def test_class_sensitivity_schema_counts_and_targets(model, x):
    table = class_sensitivity(model, x, ["gradient", "edge_sobel"], others=("min", "random", "second"),
                              metrics=("ssim", "spearman_abs"), image_ids=["a", "b", "c"],
                              labels=torch.tensor([1, 2, 3]), model_name="tiny")
    assert table.schema == SCORE_SCHEMA
    assert table.num_rows == 3 * 2 * 3 * 2  # images × methods × others × metrics
    logits = model(x).detach()
    ranked = logits.argsort(dim=1, descending=True)
    expected = {"min": logits.argmin(dim=1), "second": ranked[:, 1]}
    for r in table.to_pylist():
        i = "abc".index(r["image_id"])
        assert (r["run_id"], r["shard"], r["model"], r["test"]) == ("", 0, "tiny", "class_sensitivity")
        assert r["label"] == i + 1
        assert r["state_index"] == ("min", "random", "second").index(r["state"])
        if r["state"] in expected:
            assert r["target_class"] == int(expected[r["state"]][i])
        else:
            assert r["target_class"] != int(ranked[i, 0])
        assert math.isfinite(r["value"])


def test_parameter_randomization_schema_counts_and_state_names(model, x):
    x2 = x[:2]
    layers = parameter_layers(model, x2[:1])
    assert layers == ["0", "1", "3", "7"]
    table = parameter_randomization(model, x2, ["gradient", "edge_sobel"], metrics=("ssim", "spearman_abs"))
    assert table.schema == SCORE_SCHEMA
    mprt, emprt = _rows(table, test="mprt"), _rows(table, test="emprt")
    assert len(mprt) == 2 * 2 * 4 * 2 and len(emprt) == 2 * 2 * 4  # images × methods × states (× metrics)
    names = [state_name(k, layer) for k, layer in enumerate(reversed(layers))]  # top-down from the logits
    assert sorted({(r["state_index"], r["state"]) for r in mprt}) == list(enumerate(names))
    assert {r["metric"] for r in emprt} == {"entropy_rise"}
    top = model(x2).argmax(dim=1)
    assert all(r["target_class"] == int(top[int(r["image_id"])]) for r in table.to_pylist())
    assert [r["label"] for r in table.to_pylist()] == [None] * table.num_rows

    bottom_up = parameter_randomization(model, x2, "gradient", order="cascade_bottom_up", metrics="ssim",
                                        emprt=False)
    assert sorted({r["state"] for r in bottom_up.to_pylist()}) == [state_name(k, layer)
                                                                    for k, layer in enumerate(layers)]


def test_chance_is_the_mean_comparison_against_k_partner_images_maps(model):
    """SPEC §4: chance_i = mean over image i's K partners j of similarity(map_i, other map of image j),
    computed here by hand pair by pair; retest = 1 for deterministic methods."""
    from saliency.similarity import similarity

    x = torch.randn(7, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    ids = [f"img{i}" for i in range(7)]
    table = class_sensitivity(model, x, ["gradient"], others=("min",), metrics=("pearson",), image_ids=ids,
                              chance_partners=4, seed=3)
    targets = torch.stack([model(x).argmax(1), model(x).argmin(1)], dim=1)
    maps = explain(model, x, "gradient", targets)["gradient"]
    partners = sanity.chance_partners(ids, 4, seed=3)
    assert partners.shape == (7, 4)
    by_id = {r["image_id"]: r for r in table.to_pylist()}
    for i, image_id in enumerate(ids):
        chosen = partners[i].tolist()
        assert i not in chosen and len(set(chosen)) == 4
        by_hand = [similarity(maps[i:i + 1, 0], maps[j:j + 1, 1], "pearson").item() for j in chosen]
        assert by_id[image_id]["chance"] == pytest.approx(float(np.mean(by_hand)), abs=1e-6)
        assert by_id[image_id]["retest"] == 1.0
    assert all(r["seed"] is None for r in table.to_pylist())
    single = class_sensitivity(model, x[:1], ["gradient"], others=("min",), metrics=("pearson",))
    assert math.isnan(single.column("chance")[0].as_py())  # no other image in the batch


def test_chance_partners_are_seeded_per_image_and_all_others_in_a_small_batch():
    ids = [str(i) for i in range(12)]
    first, again = sanity.chance_partners(ids, 10, seed=0), sanity.chance_partners(ids, 10, seed=0)
    assert torch.equal(first, again) and first.shape == (12, 10)
    assert not torch.equal(first, sanity.chance_partners(ids, 10, seed=1))
    small = sanity.chance_partners(ids[:5], 10, seed=0)  # fewer than K others: all of them
    assert [sorted(row) for row in small.tolist()] == [[j for j in range(5) if j != i] for i in range(5)]
    assert sanity.chance_partners(ids[:1]) is None
    with pytest.raises(ValueError, match="chance_partners must be at least 1"):
        sanity.chance_partners(ids, 0)


def test_a_non_finite_partner_map_is_left_out_of_the_chance_level():
    """An image whose map is not finite loses its own rows; for the others, it is skipped as a partner
    (the mean runs over the remaining partners), not counted as a zero map."""
    from saliency.sanity.base import paired

    maps = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    other = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1))
    partners = torch.tensor([[1, 2], [0, 2], [3, 0], [1, 2]])
    valid = torch.tensor([True, True, False, True])
    _, chance = paired(maps, other, "pearson", partners, valid)
    _, everyone = paired(maps, other, "pearson", partners)
    from saliency.similarity import similarity
    assert chance[0].item() == pytest.approx(similarity(maps[:1], other[1:2], "pearson").item(), abs=1e-6)
    assert chance[2].item() == pytest.approx(everyone[2].item(), abs=1e-6)  # its partners are fine
    assert math.isnan(paired(maps, other, "pearson", torch.tensor([[2], [2], [2], [2]]), valid)[1][0].item())


def test_stochastic_methods_get_a_retest_from_a_second_draw(model, x):
    table = class_sensitivity(model, x, ["smoothgrad", "random", "gradient"], others=("min",),
                              metrics=("pearson",), explain_kwargs={"sg_samples": 4})
    retest = {m: [r["retest"] for r in _rows(table, method=m)] for m in ("smoothgrad", "random", "gradient")}
    assert all(0.3 < v < 1.0 for v in retest["smoothgrad"])  # two noise draws: similar, not equal
    assert all(abs(v) < 0.3 for v in retest["random"])  # two noise maps are unrelated
    assert retest["gradient"] == [1.0, 1.0, 1.0]


def test_randomization_seeds_give_one_row_per_seed_and_distinct_states(model, x):
    one = parameter_randomization(model, x, "gradient", metrics="ssim", emprt=False, randomization_seeds=[7])
    two = parameter_randomization(model, x, "gradient", metrics="ssim", emprt=False, randomization_seeds=[7, 8])
    assert two.num_rows == 2 * one.num_rows and set(two.column("seed").to_pylist()) == {7, 8}
    assert _rows(two, seed=7) == one.to_pylist()  # seed 7's rows do not depend on the other seeds
    assert [r["value"] for r in _rows(two, seed=8)] != [r["value"] for r in one.to_pylist()]
    default = parameter_randomization(model, x, "gradient", metrics="ssim", emprt=False, seed=7)
    assert default.column("value").to_pylist() == one.column("value").to_pylist()


def test_progress_is_told_after_every_explain_call_with_a_total_known_up_front(model, x):
    """A state of a large model on a CPU takes minutes: the caller's bar moves once per state, and its total
    (original maps + seeds × states) is right from the first call, so an ETA can be drawn."""
    calls = []
    table = parameter_randomization(model, x, "gradient", metrics="ssim", randomization_seeds=[7, 8],
                                    progress=lambda done, total: calls.append((done, total)))
    n_states = len(parameter_layers(model, example_input=x[:1]))
    total = 1 + 2 * n_states
    assert calls == [(done, total) for done in range(1, total + 1)]
    assert set(table.column("state_index").to_pylist()) == set(range(n_states))
    subset = []
    parameter_randomization(model, x, "gradient", metrics="ssim", states=[0, 2],
                            progress=lambda done, total: subset.append((done, total)))
    assert subset == [(1, 3), (2, 3), (3, 3)]
    classes = []
    class_sensitivity(model, x, "gradient", metrics="ssim", progress=lambda *call: classes.append(call))
    assert classes == [(1, 1)]  # every class in one explain call


def test_recompute_target_uses_each_states_argmax(model, x):
    table = parameter_randomization(model, x, "gradient", metrics="spearman", target="recompute",
                                    emprt=False)
    layers = parameter_layers(model, x[:1])
    for k in range(len(layers)):
        state_top = randomized_state(model, layers, "cascade_top_down", k)(x).argmax(dim=1).tolist()
        got = [r["target_class"] for r in _rows(table, state_index=k)]
        assert got == state_top


def test_state_subset_equals_the_full_run(model, x):
    full = parameter_randomization(model, x, ["gradient", "random"], metrics=("ssim",))
    part = parameter_randomization(model, x, ["gradient", "random"], metrics=("ssim",), states=[3, 1])
    assert {r["state_index"] for r in part.to_pylist()} == {1, 3}
    assert part.to_pylist() == [r for r in full.to_pylist() if r["state_index"] in (1, 3)]


# --------------------------------------------------------------------------------------------- random class
def test_random_other_class_is_never_top_reproducible_and_covers_all_others():
    top = torch.arange(300) % NUM_CLASSES
    ids = [f"img{i}" for i in range(300)]
    drawn = random_other_classes(top, NUM_CLASSES, seed=3, image_ids=ids)
    assert (drawn != top).all() and drawn.min() >= 0 and drawn.max() < NUM_CLASSES
    assert torch.equal(drawn, random_other_classes(top, NUM_CLASSES, seed=3, image_ids=ids))
    assert not torch.equal(drawn, random_other_classes(top, NUM_CLASSES, seed=4, image_ids=ids))
    for c in range(NUM_CLASSES):  # uniform over the 5 classes other than the top one
        others = drawn[top == c]
        assert set(others.tolist()) == set(range(NUM_CLASSES)) - {c}
    with pytest.raises(ValueError, match="at least 2 classes"):
        random_other_classes(top[:1], 1, 0, ["a"])


def test_class_sensitivity_does_not_depend_on_batch_composition(model, x):
    kwargs = dict(methods=["gradient", "random"], others=("random", "min"), metrics=("spearman",), seed=5)
    whole = class_sensitivity(model, x, image_ids=["a", "b", "c"], **kwargs)
    part = class_sensitivity(model, x[[2, 1]], image_ids=["c", "b"], **kwargs)
    key = lambda r: (r["image_id"], r["method"], r["state"])  # noqa: E731
    whole_rows = {key(r): r for r in whole.to_pylist()}
    for r in part.to_pylist():
        w = whole_rows[key(r)]
        assert r["target_class"] == w["target_class"]
        assert r["value"] == pytest.approx(w["value"], abs=1e-6)


# --------------------------------------------------------------------------------------------- oracles
def test_mprt_equals_quantus_mprt(model, x, monkeypatch):
    """Our cascade top-down MPRT equals quantus.MPRT per layer and image, to 1e-4.

    Where Quantus's choices differ from ours, and how they were matched:
    - Layer list: Quantus takes ``named_modules()`` with ``reset_parameters`` in registration order
      (reversed for top_down); we trace execution order. The model is a Sequential, where both agree,
      and Quantus's layer names equal ours, so its k-th layer is our state k.
    - Seeding: Quantus calls ``torch.manual_seed(seed + 1)`` before every layer's
      ``reset_parameters()`` (the same seed for every layer); we seed each module from (seed, module
      name) under a forked RNG. The test patches ``saliency.randomize._module_seed`` to return
      Quantus's seed + 1, which gives both sides identical randomised weights.
    - BatchNorm: Quantus's reset (``BatchNorm.reset_parameters``) also resets the running statistics,
      so ours runs with ``bn_stats="reset"``.
    - Normalisation: Quantus's default ``normalise_by_max`` divides by the max over the whole batch;
      we normalise per image. Quantus gets ``normalise_axes=(1, 2, 3)`` (per image). Spearman is
      invariant to positive scaling, so this matters only in principle.
    - Similarity: Quantus's default (abs=True, correlation_spearman) is our ``spearman_abs``.
    - Target: Quantus explains the y_batch it is given at every layer; it gets the original top class,
      our ``target="original"``.
    - Averaging: Quantus returns per-image scores per layer (no return_average/last options used).
    """
    quantus = pytest.importorskip("quantus")
    quantus_seed = 42
    top = model(x).argmax(dim=1)
    metric = quantus.MPRT(layer_order="top_down", seed=quantus_seed, disable_warnings=True,
                          normalise_func_kwargs={"normalise_axes": (1, 2, 3)})
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=top.numpy(),
                    explain_func=_gradient_explain_func(), device="cpu")
    assert np.allclose(theirs.pop("original"), 1.0)

    monkeypatch.setattr(randomize, "_module_seed", lambda seed, name: quantus_seed + 1)
    ours = parameter_randomization(model, x, "gradient", order="cascade_top_down", init="reset",
                                   bn_stats="reset", metrics=("spearman_abs",), emprt=False)
    assert len(theirs) == 4
    for k, (layer, scores) in enumerate(theirs.items()):
        got = [r["value"] for r in _rows(ours, state=state_name(k, layer))]
        np.testing.assert_allclose(got, scores, atol=1e-4)
    assert max(abs(s) for scores in theirs.values() for s in scores) < 0.9  # the states do differ


def test_random_class_sensitivity_equals_quantus_random_logit(model, x, monkeypatch):
    """class_sensitivity(others=("random",)) equals quantus.RandomLogit per image, to 1e-4.

    Where Quantus's choices differ from ours, and how they were matched:
    - The random class: Quantus seeds numpy's global RNG once per batch and draws one offset per batch
      position, so an image's class depends on the batch it is in; we draw per image from
      (seed, image id). The test records the classes Quantus asked its explain_func for and patches
      ``saliency.sanity.classes.random_other_classes`` to return them (our own draw is tested separately).
    - Similarity: Quantus's default ``ssim`` runs skimage SSIM on the *flattened* 1-D maps (window 7,
      data range = max − min of the pair); ours is 2-D SSIM, window 5, data range 2 (max_abs maps lie
      in [−1, 1]). Quantus gets a similarity_func that is skimage's 2-D SSIM with those settings.
      Spearman (rank-based, so flattening does not matter) is compared with Quantus's own
      ``correlation_spearman``.
    - Normalisation: Quantus's batch-wide ``normalise_by_max`` is made per image (normalise_axes);
      abs=False (Quantus's default for RandomLogit) keeps the maps signed, as ours.
    - Target: y_batch = the top class, our c_top.
    """
    quantus = pytest.importorskip("quantus")
    top = model(x).argmax(dim=1)

    def ssim_2d(a, b, batched=True, **_):
        return [skimage.metrics.structural_similarity(p.reshape(SIZE, SIZE), q.reshape(SIZE, SIZE),
                                                      win_size=5, data_range=2.0) for p, q in zip(a, b)]

    for similarity_func, our_metric in ((quantus.similarity_func.correlation_spearman, "spearman"),
                                        (ssim_2d, "ssim")):
        asked: list = []
        metric = quantus.RandomLogit(num_classes=NUM_CLASSES, seed=7, similarity_func=similarity_func,
                                     normalise_func_kwargs={"normalise_axes": (1, 2, 3)},
                                     disable_warnings=True)
        theirs = metric(model=model, x_batch=x.numpy(), y_batch=top.numpy(),
                        explain_func=_gradient_explain_func(asked), device="cpu")
        their_classes = torch.as_tensor(asked[-1], dtype=torch.long)
        assert (their_classes != top).all()
        monkeypatch.setattr(sanity.classes, "random_other_classes", lambda *_: their_classes)
        ours = class_sensitivity(model, x, "gradient", others=("random",), metrics=(our_metric,))
        assert [r["target_class"] for r in ours.to_pylist()] == their_classes.tolist()
        np.testing.assert_allclose(ours.column("value").to_pylist(), theirs, atol=1e-4)


def test_emprt_equals_quantus_efficient_mprt(model, x, monkeypatch):
    """The emprt row of the fully randomised state equals quantus.EfficientMPRT per image, to 1e-4.

    Quantus's defaults are used: bottom-up order with skip_layers (only the fully randomised model is
    scored), no normalisation, no abs, ``discrete_entropy`` with 100 bins over each map's own
    min..max. The fully randomised model is matched as in the MPRT test (patched module seed =
    Quantus's seed + 1, bn_stats="reset"); our last bottom-up state is that model.
    """
    quantus = pytest.importorskip("quantus")
    quantus_seed = 42
    top = model(x).argmax(dim=1)
    metric = quantus.EfficientMPRT(seed=quantus_seed, disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=top.numpy(),
                    explain_func=_gradient_explain_func(), device="cpu")
    monkeypatch.setattr(randomize, "_module_seed", lambda seed, name: quantus_seed + 1)
    ours = parameter_randomization(model, x, "gradient", order="cascade_bottom_up", bn_stats="reset",
                                   metrics=("spearman",), states=[3])
    got = [r["value"] for r in _rows(ours, test="emprt")]
    np.testing.assert_allclose(got, theirs, atol=1e-4)


def test_discrete_entropy_equals_numpy_histogram_and_scipy():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(4, SIZE, SIZE, generator=g)
    maps[1] = maps[1].round()                       # many ties
    maps[2] = torch.linspace(-1, 1, SIZE * SIZE).view(SIZE, SIZE)  # values on the bin edges
    maps[3] = 0.5                                   # constant: entropy 0
    expected = [scipy.stats.entropy(np.histogram(m.numpy(), bins=100)[0]) for m in maps]
    np.testing.assert_allclose(discrete_entropy(maps).numpy(), expected, atol=1e-12)
    assert discrete_entropy(maps)[3] == 0
    rise = entropy_rise(maps, maps.flip(0))
    assert math.isnan(rise[3]) and rise[0] == pytest.approx((expected[3] - expected[0]) / expected[0])


def test_the_histograms_of_all_maps_at_once_equal_numpys_row_by_row():
    """discrete_entropy bins every map of a block in one go; each count must be np.histogram's (values on
    edges, ties, constant rows, huge and tiny ranges, whose rows numpy's own path treats specially)."""
    from saliency.sanity.emprt import _histograms

    rng = np.random.default_rng(0)
    cases = [rng.normal(size=(9, 200)), rng.integers(-5, 6, size=(9, 200)).astype(float),
             np.round(rng.normal(size=(9, 200)), 2), np.full((3, 50), 0.7), rng.normal(size=(9, 200)) * 1e-38,
             rng.normal(size=(9, 200)) * 1e25, np.linspace(-1, 1, 9 * 200).reshape(9, 200)]
    tiny = np.finfo(np.float32).tiny
    cases.append(np.array([[0, tiny, 2 * tiny, 3 * tiny], [1, 1 + np.finfo(np.float32).eps, 1, 1], [0, 1, 2, 3]]))
    big = rng.normal(size=(4, 60)).astype(np.float32)
    big[:, 0], big[:, 1] = np.finfo(np.float32).max, -np.finfo(np.float32).max  # range overflows float32
    for rows in [*(c.astype(np.float32) for c in cases), *(c.astype(np.float64) for c in cases), big]:
        for bins in (100, 7, 2):
            with np.errstate(over="ignore", invalid="ignore"):
                expected = np.stack([_histogram_of(row, bins) for row in rows])
            np.testing.assert_array_equal(_histograms(rows, bins), expected)


def _histogram_of(row: np.ndarray, bins: int) -> np.ndarray:
    try:
        return np.histogram(row, bins=bins)[0]
    except ValueError:  # the documented fallback: the affinely rescaled values in float64
        shifted = row.astype(np.float64) - float(row.min())
        return np.histogram(shifted / float(shifted.max()), bins=bins)[0]


# --------------------------------------------------------------------------------------------- properties
def test_controls_and_gradient_behave_as_the_spec_says(model, x):
    methods = ["gradient", "edge_sobel", "random"]
    mprt = parameter_randomization(model, x, methods, metrics=("ssim", "spearman_abs"),
                                   target="recompute")
    cs = class_sensitivity(model, x, methods, others=("min", "random", "second"),
                           metrics=("ssim", "spearman_abs"))
    for table in (mprt, cs):
        sobel = _rows(table, method="edge_sobel")
        assert all(r["value"] == pytest.approx(1.0, abs=1e-6) for r in sobel if r["test"] != "emprt")
        assert all(r["value"] == pytest.approx(0.0, abs=1e-12) for r in sobel if r["test"] == "emprt")
        noise = [r["value"] for r in _rows(table, method="random") if r["test"] != "emprt"]
        assert abs(np.mean(noise)) < 0.15 and max(abs(v) for v in noise) < 0.5
    last_layer = [r["value"] for r in _rows(mprt, method="gradient", state_index=0, metric="spearman_abs")]
    assert max(last_layer) < 0.99


def test_users_model_is_unchanged(model, x):
    model.train()  # train-mode BatchNorm would update its running statistics on any forward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    class_sensitivity(model, x, ["gradient", "random"], metrics=("ssim",))
    parameter_randomization(model, x, ["gradient", "random"], metrics=("ssim",), states=[0, 3])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, message", [
    (lambda m, x: class_sensitivity(m, x, "gradient", others=("max",)), "unknown other class 'max'"),
    (lambda m, x: class_sensitivity(m, x, "gradient", others=()), "others is empty"),
    (lambda m, x: class_sensitivity(m, x, []), "methods is empty"),
    (lambda m, x: class_sensitivity(m, x, "gradient", metrics=("ssmi",)), "unknown metric 'ssmi'"),
    (lambda m, x: class_sensitivity(m, x, "gradient", image_ids=["a"]), "image_ids has 1 entries"),
    (lambda m, x: parameter_randomization(m, x, "gradient", target="best"), "unknown target mode 'best'"),
    (lambda m, x: parameter_randomization(m, x, "gradient", order="sideways"), "unknown order 'sideways'"),
    (lambda m, x: parameter_randomization(m, x, []), "methods is empty"),
    (lambda m, x: parameter_randomization(m, x, "gradient", metrics=()), "metrics is empty"),
    (lambda m, x: parameter_randomization(m, x, "gradient", metrics="pearsn"), "unknown metric 'pearsn'"),
    (lambda m, x: parameter_randomization(m, x, "gradient", states=[4]), r"states \[4\] out of range"),
    (lambda m, x: parameter_randomization(m, x, "gradient", labels=[1]), "labels has 1 entries"),
    (lambda m, x: parameter_randomization(m, x, "gradient", randomization_seeds=[1, 1]), "distinct seeds"),
    (lambda m, x: parameter_randomization(m, x, "gradient", randomization_seeds=[]), "distinct seeds"),
    (lambda m, x: class_sensitivity(m, x, "gradient", others=("min", "min")), "lists a class rule twice"),
    (lambda m, x: class_sensitivity(m, x, ["random", "random"]), r"listed more than once .*\['random'\]"),
    (lambda m, x: parameter_randomization(m, x, ["gradient", "gradient"]), "listed more than once"),
])
def test_bad_input_is_rejected_with_a_clear_message(model, x, call, message):
    with pytest.raises(ValueError, match=message):
        call(model, x)
