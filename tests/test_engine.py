"""Properties of the engine and the methods: completeness, conservation, sharing, hygiene, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import saliency
from saliency.methods.cam import fullgrad_completeness
from saliency.methods.gradient import integrated_gradients_delta
from models_for_tests import (SmallCNN, assert_model_untouched, resnet18, small_cnn, state_snapshot,
                              without_inplace)

SHARED = ["gradient", "input_x_gradient"] + [f"{m}/{p}" for m in ("gradcam", "gradcampp", "fullgrad")
                                            for p in ("signed", "pos", "abs", "neg")]


@pytest.fixture(scope="module")
def small():
    model = small_cnn()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model, x


def test_every_method_gives_raw_maps_of_the_contract_shape(small):
    model, x = small
    targets = torch.tensor([[0, 1], [2, 3], [4, 0]])
    maps = saliency.explain(model, x, saliency.available_methods(), targets, ig_steps=4, sg_samples=3)
    assert set(maps) == set(saliency.available_methods())
    for method_id, m in maps.items():
        assert m.shape == (3, 2, 16, 16) and m.dtype == torch.float32, method_id
        assert torch.isfinite(m).all(), method_id
    assert (maps["gradient"] < 0).any()  # raw and signed: no normalisation, no ReLU
    assert (maps["gradcam"] < 0).any()


def test_method_table_lists_every_id_once_with_published_defaults():
    table = {row["id"]: row for row in saliency.method_table()}
    assert list(table) == saliency.available_methods()
    assert table["gradcam"]["policy"] == "signed" and table["gradcam"]["default"]
    assert table["gradcampp"]["policy"] == "pos" and table["fullgrad"]["policy"] == "abs"
    assert not table["gradcampp/signed"]["default"]
    for family, name in [("cam", "gradcampp"), ("cam", "fullgrad"), ("cam", "gradcam")]:
        for policy in ("signed", "pos", "abs", "neg"):
            assert table[f"{name}/{policy}"]["family"] == family
    for required in ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop",
                     "deconvnet", "rectgrad", "rectgrad/abs", "lrp_epsilon", "lrp_zplus", "lrp_alpha2beta1",
                     "lrp_epsilon_plus_flat", "edge_sobel", "random"]:
        assert required in table


def test_bare_ids_equal_their_policy_variant_except_fullgrads_published_psi(small):
    model, x = small
    maps = saliency.explain(model, x, ["gradcam", "gradcam/signed", "gradcampp", "gradcampp/pos",
                                       "fullgrad", "fullgrad/abs"], torch.tensor([1, 2, 3]))
    assert torch.equal(maps["gradcam"], maps["gradcam/signed"])
    assert torch.equal(maps["gradcampp"], maps["gradcampp/pos"])
    assert not torch.allclose(maps["fullgrad"], maps["fullgrad/abs"])  # min-max vs sign-preserving ψ


def test_signed_counterparts_pair_the_papers_variants():
    from saliency.methods import PAPER_METHODS, signed_pairs

    pairs = dict(signed_pairs(PAPER_METHODS))
    assert pairs == {"gradcam/pos": "gradcam", "gradcam/abs": "gradcam", "gradcampp": "gradcampp/signed",
                     "gradcampp/abs": "gradcampp/signed", "fullgrad/pos": "fullgrad/signed",
                     "fullgrad/abs": "fullgrad/signed", "guided_backprop": "gradient",
                     "rectgrad": "rectgrad/abs", "lrp_zplus": "lrp_epsilon"}
    assert "gradcampp/pos" not in PAPER_METHODS and "gradcam/signed" not in PAPER_METHODS
    table = {row["id"]: row for row in saliency.method_table()}
    assert [m for m in table if table[m]["stochastic"]] == ["smoothgrad", "random"]


# ------------------------------------------------------------------------------ CAM layer and variants
@pytest.mark.parametrize("name,size,layer", [("resnet18", 64, "layer4"), ("vgg16", 64, "features"),
                                             ("alexnet", 96, "features")])
def test_default_cam_layer_is_the_rectified_output_of_the_last_block(name, size, layer):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    assert saliency.default_cam_layer(model, x) == layer
    methods = ["gradcam", "gradcampp", "gradcampp/signed"]
    default = saliency.explain(model, x, methods, torch.tensor([1, 2]))
    explicit = saliency.explain(model, x, methods, torch.tensor([1, 2]), layer=layer)
    for m in methods:
        assert torch.equal(default[m], explicit[m]), m


def test_default_cam_layer_of_flat_and_nested_models():
    flat = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 3))
    assert saliency.default_cam_layer(flat, torch.randn(1, 1, 16, 16)) == "2"  # its pool, after the ReLU
    global_pool = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(4, 3))
    assert saliency.default_cam_layer(global_pool, torch.randn(1, 1, 16, 16)) == "1"  # 1×1 is no map
    assert saliency.default_cam_layer(small_cnn(), torch.randn(1, 3, 16, 16)) == "conv3"  # nothing follows
    with pytest.raises(ValueError, match="runs no nn.Conv2d"):
        saliency.default_cam_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(1, 4))


def test_gradcampp_alpha_is_finite_and_policies_are_defined_under_large_negative_gradients():
    """With g³ the published denominator 2g² + ΣA·g³ vanishes at g = −2/ΣA; with |g|³ it cannot."""
    from saliency.methods.cam import gradcampp_alpha

    act = torch.full((1, 1, 2, 2), 0.25)  # ΣA = 1: the g³ form has its pole at g = −2
    grad = torch.tensor([-2.0, -50.0, 3.0, 0.0]).view(1, 1, 1, 2, 2)
    alpha = gradcampp_alpha(act, grad)
    assert torch.isfinite(alpha).all()
    g = grad.flatten()
    expected = g**2 / (2 * g**2 + g.abs()**3 + 1e-6)
    expected[g == 0] = 0
    torch.testing.assert_close(alpha.flatten(), expected)
    assert alpha.flatten()[2] == pytest.approx(9 / (18 + 27 + 1e-6))  # g > 0: the published α

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    with torch.no_grad():
        model[3].weight.mul_(-200)  # large negative gradients at the CAM layer
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    policies = ["gradcampp/signed", "gradcampp/pos", "gradcampp/abs", "gradcampp/neg"]
    maps = saliency.explain(model, x, policies, torch.tensor([0, 1]))
    assert all(torch.isfinite(maps[p]).all() for p in policies)
    torch.testing.assert_close(maps["gradcampp/signed"], maps["gradcampp/pos"] + maps["gradcampp/neg"])


def test_fullgrad_variants_are_sign_preserving_and_tell_images_apart():
    """ψ = φ(v)/max|φ(v)|: zero stays zero, so signed maps of different images are not near-identical
    (min-max made them nearly constant: SSIM 0.958 between different digits)."""
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    maps = saliency.explain(model, x, ["fullgrad/signed", "fullgrad/pos", "fullgrad/neg", "fullgrad"],
                            torch.tensor([1, 1]))
    signed = maps["fullgrad/signed"][:, 0]
    assert saliency.similarity(signed[:1], signed[1:], "ssim").item() < 0.5
    assert (maps["fullgrad/pos"] >= 0).all() and (maps["fullgrad/neg"] <= 0).all()
    assert (signed < 0).any() and (signed > 0).any()


# ------------------------------------------------------------------------------ completeness
@pytest.mark.parametrize("batchnorm", [False, True])
def test_fullgrad_completeness(batchnorm):
    model = small_cnn(batchnorm=batchnorm)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    logits, total = fullgrad_completeness(model, x, torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4]]))
    assert torch.allclose(total, logits, rtol=1e-4, atol=1e-5 * logits.abs().max())


def test_fullgrad_completeness_on_resnet18():
    model = resnet18()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    logits, total = fullgrad_completeness(model, x, torch.tensor([4]))
    assert torch.allclose(total, logits, rtol=1e-4, atol=1e-4 * logits.abs().max())


def test_fullgrad_reads_biases_at_call_time(small):
    model, x = small
    before = saliency.explain(model, x, "fullgrad/signed", torch.tensor([0, 1, 2]))["fullgrad/signed"]
    changed = small_cnn()
    with torch.no_grad():
        changed.conv2.bias.add_(torch.linspace(-1, 1, 16))
    after = saliency.explain(changed, x, "fullgrad/signed", torch.tensor([0, 1, 2]))["fullgrad/signed"]
    assert not torch.allclose(before, after)


def test_lrp_epsilon_conserves_the_logit_on_a_bias_free_net():
    model = small_cnn(bias=False, batchnorm=False)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[0, 2], [1, 3], [4, 4]])
    for method in ["lrp_epsilon", "lrp_zplus"]:
        relevance = saliency.explain(model, x, method, targets)[method]
        logits = model(x).gather(1, targets)
        sums = relevance.flatten(2).sum(dim=2)
        if method == "lrp_epsilon":
            assert torch.allclose(sums, logits, rtol=1e-4, atol=1e-5)
        else:  # z+ starts from |y_c| and conserves only where positive contributions exist at every layer
            positive = logits > 0
            assert torch.allclose(sums[positive], logits[positive], rtol=1e-3, atol=1e-5)


def test_positive_only_lrp_starts_from_the_absolute_logit():
    """SPEC §1.3: z⁺ and α2β1 start from |y_c|, so the least-likely class (y_c < 0) is not scored as a
    sign flip of the top class's map; ε keeps y_c (and so equals input × gradient)."""
    model = small_cnn(bias=False, batchnorm=False)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    logits = model(x).detach()
    targets = torch.stack([logits.argmax(1), logits.argmin(1)], dim=1)
    assert (logits.gather(1, targets)[:, 1] < 0).all()
    maps = saliency.explain(model, x, ["lrp_zplus", "lrp_alpha2beta1", "lrp_epsilon"], targets)
    zplus = maps["lrp_zplus"]
    assert (zplus[:, 0] >= 0).all() and (zplus[:, 1] >= 0).all() and (zplus[:, 1] > 0).any()
    alpha_beta = maps["lrp_alpha2beta1"].flatten(2).sum(2)  # α − β = 1: conserves |y_c| on this net
    torch.testing.assert_close(alpha_beta, logits.gather(1, targets).abs(), rtol=1e-3, atol=1e-5)
    epsilon = maps["lrp_epsilon"].flatten(2).sum(2)
    torch.testing.assert_close(epsilon, logits.gather(1, targets), rtol=1e-4, atol=1e-5)


def test_integrated_gradients_completeness_delta_shrinks_with_steps(small):
    model, x = small
    targets = torch.tensor([0, 1, 2])
    deltas = []
    for steps in (4, 64):
        ig = saliency.explain(model, x, "integrated_gradients", targets, ig_steps=steps)["integrated_gradients"]
        deltas.append(integrated_gradients_delta(model, x, targets, ig).abs().max())
    assert deltas[1] < deltas[0]
    logits = model(x).gather(1, targets[:, None])
    assert deltas[1] < 0.05 * logits.abs().max()


# ------------------------------------------------------------------------------ propagation
def test_gradient_with_positive_propagation_is_guided_backprop(small):
    model, x = small
    targets = torch.tensor([1, 2, 3])
    gbp = saliency.explain(model, x, "guided_backprop", targets)["guided_backprop"]
    pos = saliency.explain(model, x, "gradient", targets, propagation="pos")["gradient"]
    plain = saliency.explain(model, x, "gradient", targets)["gradient"]
    assert torch.allclose(gbp, pos, atol=1e-7)
    assert not torch.allclose(gbp, plain)


def test_rectgrad_maps_get_sparser_with_a_higher_percentile(small):
    model, x = small
    targets = torch.tensor([1, 2, 3])
    zeros = [float((saliency.explain(model, x, "rectgrad", targets, rectgrad_q=q)["rectgrad"] == 0)
                   .float().mean()) for q in (50.0, 99.0)]
    assert zeros[1] > zeros[0]


def test_policies_differ_where_gradients_are_negative(small):
    model, x = small
    maps = saliency.explain(model, x, ["gradcampp/signed", "gradcampp/pos", "gradcam/pos", "gradcam/neg"],
                            torch.tensor([0, 1, 2]), layer="conv3")
    assert not torch.allclose(maps["gradcampp/signed"], maps["gradcampp/pos"])
    assert not torch.allclose(maps["gradcam/pos"], maps["gradcam/neg"])


# ------------------------------------------------------------------------------ sharing and batching
def test_t_targets_in_one_call_equal_t_separate_calls(small):
    model, x = small
    methods = SHARED + ["guided_backprop", "rectgrad", "lrp_epsilon", "integrated_gradients", "smoothgrad",
                        "random", "edge_sobel"]
    targets = torch.tensor([[0, 1, 4], [2, 3, 0], [4, 4, 1]])
    together = saliency.explain(model, x, methods, targets, ig_steps=4, sg_samples=3)
    for t in range(3):
        alone = saliency.explain(model, x, methods, targets[:, t], ig_steps=4, sg_samples=3)
        for m in methods:
            assert torch.allclose(together[m][:, t], alone[m][:, 0], rtol=1e-4, atol=1e-6), (m, t)


def test_batch_of_b_equals_b_single_calls(small):
    model, x = small
    methods = SHARED + ["guided_backprop", "deconvnet", "rectgrad", "lrp_zplus", "smoothgrad", "random"]
    targets = torch.tensor([[0, 1], [2, 3], [4, 0]])
    batch = saliency.explain(model, x, methods, targets, sg_samples=3)
    for b in range(3):
        single = saliency.explain(model, x[b:b + 1], methods, targets[b:b + 1], sg_samples=3)
        for m in methods:
            assert torch.allclose(batch[m][b], single[m][0], rtol=1e-4, atol=1e-6), (m, b)


def test_inplace_and_reused_relus_give_the_same_maps_as_distinct_out_of_place_ones():
    model = resnet18()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    methods = ["gradient", "gradcam", "fullgrad", "guided_backprop", "rectgrad", "lrp_epsilon"]
    a = saliency.explain(model, x, methods, torch.tensor([1, 2]))
    b = saliency.explain(without_inplace(model), x, methods, torch.tensor([1, 2]))
    for m in methods:
        assert torch.allclose(a[m], b[m], atol=1e-6), m


def test_results_are_deterministic(small):
    model, x = small
    methods = ["smoothgrad", "random", "rectgrad", "fullgrad"]
    first = saliency.explain(model, x, methods, torch.tensor([0, 1, 2]), seed=3, sg_samples=4)
    again = saliency.explain(model, x, methods, torch.tensor([0, 1, 2]), seed=3, sg_samples=4)
    other = saliency.explain(model, x, ["smoothgrad", "random"], torch.tensor([0, 1, 2]), seed=4, sg_samples=4)
    for m in methods:
        assert torch.equal(first[m], again[m]), m
    assert not torch.equal(first["smoothgrad"], other["smoothgrad"])
    assert not torch.equal(first["random"], other["random"])


def test_random_control_changes_with_target_and_model(small):
    model, x = small
    maps = saliency.explain(model, x, "random", torch.tensor([[0, 1]] * 3))["random"]
    assert not torch.allclose(maps[:, 0], maps[:, 1])
    changed = small_cnn()
    with torch.no_grad():
        changed.fc2.weight.mul_(-1)
    other = saliency.explain(changed, x, "random", torch.tensor([[0, 1]] * 3))["random"]
    assert not torch.allclose(maps, other)


def test_edge_sobel_equals_skimage_and_ignores_the_model(small):
    from skimage.filters import sobel

    model, x = small
    maps = saliency.explain(model, x, "edge_sobel", torch.tensor([[0, 1]] * 3), channel_reduction="none")
    edges = maps["edge_sobel"]
    for b in range(3):
        for c in range(3):
            expected = torch.from_numpy(sobel(x[b, c].double().numpy())).float()
            assert torch.allclose(edges[b, 0, c], expected, atol=1e-5)
    assert torch.equal(edges[:, 0], edges[:, 1])


@pytest.mark.parametrize("reduction", ["sum", "abs_sum", "abs_max", "none"])
def test_channel_reduction(small, reduction):
    model, x = small
    t = torch.tensor([0, 1, 2])
    raw = saliency.explain(model, x, ["gradient", "gradcam"], t, channel_reduction="none")
    out = saliency.explain(model, x, ["gradient", "gradcam"], t, channel_reduction=reduction)
    expected = {"sum": raw["gradient"].sum(2), "abs_sum": raw["gradient"].abs().sum(2),
                "abs_max": raw["gradient"].abs().amax(2), "none": raw["gradient"]}[reduction]
    assert torch.allclose(out["gradient"], expected)
    assert raw["gradcam"].shape == (3, 1, 1, 16, 16)


def test_relu_map_option_only_clips_cams(small):
    model, x = small
    t = torch.tensor([0, 1, 2])
    plain = saliency.explain(model, x, ["gradcam", "gradient"], t)
    clipped = saliency.explain(model, x, ["gradcam", "gradient"], t, relu_map=True)
    assert torch.allclose(clipped["gradcam"], plain["gradcam"].clamp_min(0))
    assert torch.equal(clipped["gradient"], plain["gradient"])


def test_default_targets_are_the_top_class(small):
    model, x = small
    top = model(x).argmax(1)
    assert torch.equal(saliency.explain(model, x, "gradient")["gradient"],
                       saliency.explain(model, x, "gradient", top)["gradient"])


# ------------------------------------------------------------------------------ hygiene
def test_model_unchanged_and_hook_free_after_success():
    model = resnet18().train()
    snapshot = state_snapshot(model)
    saliency.explain(model, torch.randn(2, 3, 32, 32), saliency.available_methods(), torch.tensor([1, 2]),
                     ig_steps=2, sg_samples=2)
    assert_model_untouched(model, snapshot, training=True)
    assert all(p.grad is None for p in model.parameters())


class Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_model_unchanged_and_hook_free_after_an_error():
    model = small_cnn()
    model.fc1 = nn.Sequential(model.fc1, Exploding()).eval()
    snapshot = state_snapshot(model)
    for methods in (["gradient", "gradcam", "fullgrad"], ["guided_backprop"], ["lrp_zplus"],
                    ["integrated_gradients"]):
        with pytest.raises(RuntimeError, match="boom"):
            saliency.explain(model, torch.randn(2, 3, 16, 16), methods, torch.tensor([0, 1]))
        assert_model_untouched(model, snapshot)


def test_model_unchanged_after_a_bad_target_error(small):
    model, x = small
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError):
        saliency.explain(model, x, ["gradcam", "fullgrad"], torch.tensor([0, 1, 99]))
    assert_model_untouched(model, snapshot)


# ------------------------------------------------------------------------------ bad input
def test_unknown_method_lists_valid_ids(small):
    model, x = small
    with pytest.raises(ValueError, match=r"unknown saliency method 'gradcam\+\+'.*gradcampp/signed"):
        saliency.explain(model, x, ["gradient", "gradcam++"], torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("layer,message", [("conv9", "unknown layer 'conv9'.*conv3"),
                                           ("fc1", "layer 'fc1' is a Linear, not a convolutional")])
def test_bad_layer(small, layer, message):
    model, x = small
    with pytest.raises(ValueError, match=message):
        saliency.explain(model, x, "gradcam", torch.tensor([0, 1, 2]), layer=layer)


@pytest.mark.parametrize("targets,message", [
    (torch.tensor([0, 1, 5]), r"class indices in \[0, 4\].*to 5"),
    (torch.tensor([0, -1, 2]), r"class indices in \[0, 4\]"),
    (torch.tensor([0, 1]), "targets must have shape B or B×T with B = 3"),
    (torch.zeros(3, 1, 1, dtype=torch.long), "targets must have shape"),
    (torch.tensor([0.0, 1.0, 2.0]), "integer class indices"),
])
def test_bad_targets(small, targets, message):
    model, x = small
    with pytest.raises(ValueError, match=message):
        saliency.explain(model, x, ["gradient", "lrp_epsilon"], targets)


@pytest.mark.parametrize("x,message", [
    (torch.randn(3, 16, 16), "4 dimensions B×C×H×W"),
    (torch.randn(2, 1, 16, 16), "x has 1 channels but the model's first convolution expects 3"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.long), "float tensor"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.float64), r"x is torch.float64 but the model's parameters are "
                                                     r"torch.float32; convert one of them"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.float16), "x is torch.float16"),
])
def test_bad_x(small, x, message):
    model, _ = small
    with pytest.raises(ValueError, match=message):
        saliency.explain(model, x, "gradient", torch.tensor([0, 1]))


def test_non_finite_logits(small):
    model, x = small
    x = x.clone()
    x[1] *= 1e20  # finite pixels whose logits overflow below (NaN pixels are refused earlier: test_bad_inputs)

    class Amplify(nn.Module):
        def forward(self, logits):
            return logits * 1e30

    with pytest.raises(ValueError, match=r"non-finite logits .* images \[1\]"):
        saliency.explain(nn.Sequential(model, Amplify()), x, ["gradient", "gradcam"], torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("kwargs,message", [
    ({"channel_reduction": "mean"}, "unknown channel_reduction 'mean'; allowed: sum, abs_sum"),
    ({"propagation": "abs"}, "unknown propagation 'abs'; allowed: signed, pos"),
    ({"rectgrad_q": 120}, "rectgrad_q must be ≥ 0 and ≤ 100, got 120"),
    ({"ig_steps": 0}, "ig_steps must be ≥ 1, got 0"),
    ({"sg_noise": 0.0}, "sg_noise must be > 0, got 0.0"),
    ({"internal_batch_size": 0}, "internal_batch_size must be ≥ 1, got 0"),
    ({"layer_layout": "rows"}, "unknown layer_layout 'rows'"),
])
def test_bad_options(small, kwargs, message):
    """Every option is checked from its one definition (saliency.options), before any pass."""
    model, x = small
    with pytest.raises(ValueError, match=message):
        saliency.explain(model, x, "gradient", torch.tensor([0, 1, 2]), **kwargs)


def test_an_unknown_option_is_named_with_the_valid_ones(small):
    model, x = small
    with pytest.raises(TypeError, match=r"unknown explain option\(s\) 'ig_step'; valid: .*ig_steps"):
        saliency.explain(model, x, "gradient", ig_step=4)


def test_the_options_have_one_definition_that_explain_and_the_config_follow():
    """issue 21: explain's keywords and the methods config section are derived from Options' fields."""
    import dataclasses
    import inspect

    from saliency.options import Options
    from tasks.config import MethodsConfig

    fields = {f.name: f for f in dataclasses.fields(Options)}
    parameters = inspect.signature(saliency.explain).parameters
    assert all(parameters[name].default == f.default for name, f in fields.items())
    configured = {name: f for name, f in fields.items() if f.metadata["config"]}
    assert set(MethodsConfig.model_fields) == {"ids"} | set(configured)
    for name, f in configured.items():
        assert MethodsConfig.model_fields[name].default == f.default
        assert MethodsConfig.model_fields[name].description == f.metadata["help"]
    assert MethodsConfig().explain_kwargs() == {name: f.default for name, f in configured.items()}


def test_empty_methods(small):
    model, x = small
    with pytest.raises(ValueError, match="methods is empty"):
        saliency.explain(model, x, [], torch.tensor([0, 1, 2]))


def test_duplicate_method_ids(small):
    model, x = small
    with pytest.raises(ValueError, match=r"listed more than once: \['gradient'\]"):
        saliency.explain(model, x, ["gradient", "gradcam", "gradient"], torch.tensor([0, 1, 2]))


def test_cam_on_a_model_without_convolutions():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        saliency.explain(model, torch.randn(2, 3, 2, 2), "gradcam", torch.tensor([0, 1]))


def test_vmap_and_looped_backward_agree(small):
    from saliency.passes import evaluation, run_pass

    model, x = small
    targets = torch.tensor([[0, 1, 2], [3, 4, 0], [1, 1, 1]])
    with evaluation(model):
        batched = run_pass(model, x, targets, layer="conv2", bias_layers=True, batched=True)
        looped = run_pass(model, x, targets, layer="conv2", bias_layers=True, batched=False)
    assert torch.allclose(batched.input_grad, looped.input_grad, atol=1e-7)
    assert torch.allclose(batched.layer_grad, looped.layer_grad, atol=1e-7)
    assert len(batched.bias_terms) == len(looped.bias_terms) == 5  # conv1, bn1, conv2, bn2, conv3


def _fullgrad_reductions():
    from functools import partial

    from saliency.methods.base import min_max
    from saliency.methods.cam import _scaled_channel_sum, _sign_parts, min_max_per_layer

    return {"sign parts": _sign_parts,
            "abs, per layer": partial(_scaled_channel_sum, policy="abs", scale=min_max_per_layer),
            "pos, per channel": partial(_scaled_channel_sum, policy="pos", scale=min_max)}


def _assert_reduced_like_whole(whole, reduced, reductions, exact=True):
    from saliency.passes import bias_term

    assert reduced.bias_terms == []  # no layer's gradient is kept
    for key, reduce in reductions.items():
        expected = [reduce(bias_term(bias, grad)) for bias, grad in whole.bias_terms]
        assert len(reduced.bias_reduced[key]) == len(expected) > 0, key
        for got, want in zip(reduced.bias_reduced[key], expected):
            for a, b in zip(got, want):
                if exact:
                    assert torch.equal(a, b), key
                else:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bias_reductions_run_in_the_backward_and_equal_reducing_the_kept_gradients(monkeypatch):
    """FullGrad's per-layer reductions run in tensor hooks as the looped backward produces each gradient, in
    chunks of images: the same bits as reducing the whole kept gradients afterwards; the vmap path reduces
    its kept gradients (to tolerance); recorded MPRT states (a prefix) give the same bits as whole passes."""
    from saliency import passes
    from saliency.passes import bias_term, evaluation, run_pass
    from saliency.prefix import FrozenPrefix
    from saliency.randomize import parameter_layers, states_in_place

    monkeypatch.setattr(passes, "REDUCTION_CHUNK", 40_000)  # several chunks of the 16×32×32 terms
    model, reductions = resnet18(), _fullgrad_reductions()
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8], [9, 0]])
    with evaluation(model):
        whole = run_pass(model, x, targets, layer="layer4", bias_layers=True)
        assert len(whole.bias_terms) == 20  # resnet18's BatchNorms (its convolutions have no bias)
        _assert_reduced_like_whole(whole, run_pass(model, x, targets, layer="layer4", bias_layers=True,
                                                   bias_reductions=reductions), reductions)
        _assert_reduced_like_whole(whole, run_pass(model, x, targets, layer="layer4", bias_layers=True,
                                                   bias_reductions=reductions, batched=True), reductions, exact=False)
    prefix = FrozenPrefix(model, x)
    for _, k, state in states_in_place(model, parameter_layers(model, x[:1]), "cascade_top_down", [0, 5, 20], [0]):
        whole = run_pass(state, x, targets, layer="layer4", bias_layers=True)
        reduced = run_pass(state, x, targets, layer="layer4", bias_layers=True, bias_reductions=reductions,
                           prefix=prefix)
        _assert_reduced_like_whole(whole, reduced, reductions)
    assert prefix.disabled is None


class ConstantBranch(nn.Module):
    """A BatchNorm on a learned constant: its output does not depend on x, so the backward from the logits
    to x never reaches it, yet its bias term belongs to FullGrad's sum."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)
        self.constant = nn.Parameter(torch.randn(1, 4, 8, 8))
        self.bn.running_mean.normal_()
        self.bn.bias.data.normal_()

    def forward(self, x):
        return self.head((self.conv(x) + self.bn(self.constant)).relu().mean(dim=(2, 3)))


def test_a_bias_layer_off_the_inputs_path_is_reduced_too():
    from saliency.passes import bias_term, evaluation, run_pass

    model, reductions = ConstantBranch().eval(), _fullgrad_reductions()
    x, targets = torch.randn(3, 3, 8, 8), torch.tensor([[0, 1], [1, 2], [2, 0]])
    with evaluation(model):
        whole = run_pass(model, x, targets, bias_layers=True)
        reduced = run_pass(model, x, targets, bias_layers=True, bias_reductions=reductions)
    assert len(whole.bias_terms) == 2  # the conv's bias and the constant branch's BatchNorm
    for key, reduce in reductions.items():
        assert len(reduced.bias_reduced[key]) == 2
        for got, (bias, grad) in zip(reduced.bias_reduced[key], whole.bias_terms):
            assert all(torch.equal(a, b) for a, b in zip(got, reduce(bias_term(bias, grad))))


def test_explain_finds_the_cam_layer_and_its_layout_in_the_batchs_own_forward():
    from saliency.engine import cam_layer_and_layout

    model, calls = resnet18(), []
    handle = model.register_forward_pre_hook(lambda _m, inputs: calls.append(inputs[0].shape[0]))
    try:
        x, targets = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
        found = saliency.explain(model, x, SHARED, targets)
        assert calls == [4]  # no trace of its own: the batch's one forward finds the layer (issue 21)
        calls.clear()
        layer, layout = cam_layer_and_layout(model, x, SHARED)
        assert (layer, layout) == ("layer4.1.conv2", "channels_first")  # at 32² every block of layer4 is 1×1
        calls.clear()
        given = saliency.explain(model, x, SHARED, targets, layer=layer, layer_layout=layout)
        assert calls == [4]
        calls.clear()
        saliency.explain(model, x, SHARED, targets, layer=layer)
        assert calls == [1, 4]  # the layout of a given layer: one image traced
    finally:
        handle.remove()
    for method_id in SHARED:
        assert torch.equal(found[method_id], given[method_id]), method_id


def _torchvision_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    if name == "vit":
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                     hidden_dim=16, mlp_dim=16, num_classes=7)
        return model.eval(), torch.randn(2, 3, 32, 32)
    return getattr(torchvision.models, name)(num_classes=7).eval(), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name", ["vgg11", "mobilenet_v3_small", "densenet121", "convnext_tiny", "vit"])
def test_the_layer_found_in_the_pass_is_the_traced_one_and_its_maps_equal_the_given_layers(name):
    """The layer found in the pass's own forward (the batch, with gradients) is the one a one-image trace
    finds, with the same layout, and every CAM map is bit-identical to the layer given."""
    from saliency.engine import cam_layer_and_layout
    from saliency.layers import FindingTrace
    from saliency.passes import evaluation, run_pass

    model, x = _torchvision_model(name)
    snapshot = state_snapshot(model)
    methods = [m for m in SHARED if not (name == "vit" and m.startswith("fullgrad"))]
    targets = torch.tensor([[1, 2], [3, 4]])
    layer, layout = cam_layer_and_layout(model, x, methods)
    with evaluation(model):
        p = run_pass(model, x, targets, find_layer=FindingTrace())
    assert (p.layer, p.layout) == (layer, layout)
    found = saliency.explain(model, x, methods, targets)
    given = saliency.explain(model, x, methods, targets, layer=layer, layer_layout=layout)
    for method_id in methods:
        assert torch.equal(found[method_id], given[method_id]), method_id
    assert_model_untouched(model, snapshot)


class ScaledInPlace(nn.Module):
    """A conv whose output is changed in place after its call: its gradient must be taken before that."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        y.mul_(2.0)
        return self.head(y.amax(dim=(2, 3)))


def test_a_found_layer_changed_in_place_is_captured_by_a_second_pass():
    model, calls = ScaledInPlace().eval(), []
    x, targets = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    handle = model.register_forward_pre_hook(lambda _m, inputs: calls.append(inputs[0].shape[0]))
    try:
        found = saliency.explain(model, x, ["gradcam/signed", "gradcampp/abs"], targets)
        assert calls == [3, 3]  # the found layer's output was overwritten: the pass runs again, layer named
    finally:
        handle.remove()
    given = saliency.explain(model, x, ["gradcam/signed", "gradcampp/abs"], targets, layer="conv",
                             layer_layout="channels_first")
    for method_id, m in found.items():
        assert torch.equal(m, given[method_id]) and m.abs().sum() > 0, method_id
    with torch.no_grad():  # the gradient is that of the conv's own output: twice the scaled one's
        act = model.conv(x)
    grad = torch.autograd.functional.jacobian(lambda a: model.head((2 * a).amax(dim=(2, 3)))[:, 0].sum(), act)
    expected = (grad[0].mean(dim=(-2, -1))[:, None, None] * act[0]).sum(0)
    assert torch.allclose(found["gradcam/signed"][0, 0], expected, atol=1e-6)


def test_a_model_without_a_convolution_is_refused_when_the_pass_looks_for_its_layer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    with pytest.raises(ValueError, match="CAM methods need a convolutional layer, and the model runs no nn.Conv2d"):
        saliency.explain(model, torch.randn(2, 3, 2, 2), ["gradient", "gradcam"], torch.tensor([0, 1]))
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn", "alexnet"])
def test_every_method_runs_on_torchvision_cnns(name):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=7).eval()
    if hasattr(model, "classifier"):  # narrow the 4096-wide dense layers: same structure, faster test
        features = next(m for m in model.classifier if isinstance(m, nn.Linear)).in_features
        model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(features, 32), nn.ReLU(inplace=True),
                                         nn.Linear(32, 7)).eval()
    snapshot = state_snapshot(model)
    x = torch.randn(1, 3, 64, 64)
    maps = saliency.explain(model, x, saliency.available_methods(), torch.tensor([[1, 2]]),
                            ig_steps=2, sg_samples=2)
    for method_id, m in maps.items():
        assert m.shape == (1, 2, 64, 64) and torch.isfinite(m).all(), method_id
    assert_model_untouched(model, snapshot)


def test_paper_methods_are_registered():
    from saliency.methods import PAPER_METHODS

    assert set(PAPER_METHODS) <= set(saliency.available_methods())
    assert {"gradcampp/signed", "fullgrad/signed", "rectgrad/abs", "edge_sobel", "random"} <= set(PAPER_METHODS)


class InPlaceStyle(SmallCNN):
    """The same network written with explicit in-place relu_ calls whose return values are ignored."""

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x.relu_()
        x = self.pool(x)
        x = self.bn2(self.conv2(x))
        torch.relu_(x)
        x = self.pool(x)
        x = self.conv3(x)
        nn.functional.relu_(x)
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(nn.functional.relu(self.fc1(x)))


def test_explicit_in_place_relu_calls_are_routed_too(small):
    model, x = small
    twin = InPlaceStyle()
    twin.load_state_dict(model.state_dict())
    twin.eval()
    methods = ["gradient", "input_x_gradient", "guided_backprop", "deconvnet", "rectgrad", "gradcam"]
    targets = torch.tensor([0, 1, 2])
    ours = saliency.explain(model, x, methods, targets, layer="conv2")
    theirs = saliency.explain(twin, x, methods, targets, layer="conv2")
    for m in methods:
        assert torch.allclose(ours[m], theirs[m], atol=1e-6), m


def test_internal_batching_does_not_change_results(small):
    model, x = small
    t = torch.tensor([[0, 1], [2, 3], [4, 0]])
    auto = saliency.explain(model, x, ["integrated_gradients", "smoothgrad"], t, ig_steps=5, sg_samples=4)
    odd = saliency.explain(model, x, ["integrated_gradients", "smoothgrad"], t, ig_steps=5, sg_samples=4,
                           internal_batch_size=4)
    for m in auto:
        assert torch.allclose(auto[m], odd[m], atol=1e-6), m
    with pytest.raises(ValueError, match="internal_batch_size must be ≥ 1"):
        saliency.explain(model, x, "smoothgrad", t, internal_batch_size=0)
