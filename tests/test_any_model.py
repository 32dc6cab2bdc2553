"""A user's own model (issue 18): every method is right on it or refused before any compute, naming why.

Here: ReLU backward rules (guided backprop, deconvnet, RectGrad, ``propagation="pos"``) on models that run
other activations, refused with the activation types and their counts (SPEC §1.3)."""
from __future__ import annotations

import pytest
import torch
import torchvision

import saliency
from models_for_tests import assert_model_untouched, mixed_activations, state_snapshot
from saliency.layers import other_activations

RULES = ["guided_backprop", "deconvnet", "rectgrad", "rectgrad/abs"]


@pytest.mark.parametrize("method", RULES)
def test_a_relu_rule_on_other_activations_is_refused_naming_them(method):
    model = mixed_activations()
    snapshot = state_snapshot(model)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as error:
        saliency.explain(model, x, ["gradient", method])
    message = str(error.value)
    assert message.startswith(f"{method}: a ReLU backward rule is defined for ReLU only")
    assert "GELU ×1, Hardtanh/ReLU6 ×1, SiLU ×1" in message and "refused" in message
    assert_model_untouched(model, snapshot)


def test_positive_propagation_is_refused_there_too_but_plain_gradients_run():
    model = mixed_activations()
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"gradient with propagation='pos', gradcam with propagation='pos': a ReLU"):
        saliency.explain(model, x, ["gradient", "gradcam", "edge_sobel"], propagation="pos", layer="conv2")
    maps = saliency.explain(model, x, ["gradient", "gradcam"], layer="conv2")
    assert all(torch.isfinite(m).all() for m in maps.values())
    with pytest.raises(ValueError, match=r"LRP cannot cover MixedActivations: .*node 'act1' \(call_module GELU\)"):
        saliency.explain(model, x, ["gradient", "lrp_epsilon"])  # no LRP rule for GELU and SiLU either


class _HandWritten(torch.nn.Module):
    """A ReLU written as clamp(min=0), another as maximum(x, 0), and GELU written with erf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).clamp(min=0)
        x = torch.maximum(x - 0.1, torch.zeros_like(x))
        x = 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
        return self.head(x.mean((2, 3)))


def test_the_census_sees_modules_and_functional_calls_and_nothing_on_relu_nets():
    assert other_activations(mixed_activations(), torch.zeros(1, 1, 8, 8)) == {
        "GELU": 1, "Hardtanh/ReLU6": 1, "SiLU": 1}
    with pytest.raises(ValueError, match=r"guided_backprop: a ReLU backward rule .* also runs clamp ×1, erf ×1, "
                                         r"maximum ×1 "):
        saliency.explain(_HandWritten().eval(), torch.randn(1, 1, 8, 8), "guided_backprop")
    resnet = torchvision.models.resnet18(num_classes=4).eval()
    assert other_activations(resnet, torch.zeros(1, 3, 32, 32)) == {}
    maps = saliency.explain(resnet, torch.randn(1, 3, 32, 32), ["guided_backprop"], [[0, 1]])
    assert maps["guided_backprop"].shape == (1, 2, 32, 32)


@pytest.mark.parametrize("name, found", [
    ("efficientnet_b0", "SiLU ×49, sigmoid ×16"),
    ("mobilenet_v3_small", "Hardsigmoid ×9, Hardswish ×19"),
    ("convnext_tiny", "GELU ×18"),
])
def test_torchvision_models_with_other_activations_are_refused(name, found):
    model = getattr(torchvision.models, name)(num_classes=5).eval()
    with pytest.raises(ValueError, match=f"this model also runs {found} "):
        saliency.explain(model, torch.randn(1, 3, 64, 64), "guided_backprop")


def test_the_pipeline_refuses_a_relu_rule_before_any_shard(prefect_server, tmp_path):
    """The planner runs the same check on the first image, before Ray starts: one error naming the field."""
    from flows.sanity_check import sanity_check
    from tasks.config import ConfigError
    from test_pipeline import tiny

    config = tiny(model={"name": "models_for_tests:mixed_activations"},
                  methods={"ids": ["gradient", "guided_backprop"]})
    with pytest.raises(ConfigError, match=r"config field `methods.ids`: guided_backprop: a ReLU backward rule .* "
                                          r"also runs GELU ×1, Hardtanh/ReLU6 ×1, SiLU ×1"):
        sanity_check(config=config, out=str(tmp_path))
    assert not any(tmp_path.rglob("*.parquet"))


def test_the_pipeline_refuses_lrp_on_uncovered_layers_before_any_shard(prefect_server, tmp_path):
    from flows.sanity_check import sanity_check
    from tasks.config import ConfigError
    from test_pipeline import tiny

    config = tiny(model={"name": "models_for_tests:mixed_activations"}, methods={"ids": ["gradient", "lrp_epsilon"]})
    with pytest.raises(ConfigError, match=r"config field `methods.ids`: LRP cannot cover MixedActivations: .*"
                                          r"node 'act1' \(call_module GELU\)"):
        sanity_check(config=config, out=str(tmp_path))
    assert not any(tmp_path.rglob("*.parquet"))


def test_the_pipeline_refuses_a_rule_that_does_not_conserve_before_any_shard(prefect_server, tmp_path):
    from flows.sanity_check import sanity_check
    from tasks.config import ConfigError
    from test_pipeline import tiny

    config = tiny(model={"name": "models_for_tests:depthwise_without_relu"},
                  methods={"ids": ["gradient", "lrp_epsilon", "lrp_zplus"]})
    with pytest.raises(ConfigError, match=r"config field `methods.ids`: LRP does not conserve relevance on "
                                          r"DepthwiseWithoutReLU for lrp_zplus \(Σ R / \|y_c\| = "):
        sanity_check(config=config, out=str(tmp_path))
    assert not any(tmp_path.rglob("*.parquet"))


class _HugeGradient(torch.nn.Module):
    """Finite logits, finite float32 input gradients of ±2e38: their range (4e38) overflows float32."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 3, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.stack([torch.tensor([1.0, -1.0] * 32), torch.tensor([-1.0, 1.0] * 32),
                                                  torch.tensor([1.0, 1.0, -1.0, -1.0] * 16)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) * 2e38


def test_extreme_finite_maps_are_scored_not_lost():
    """Issue 18, item 5: eMPRT's histogram took np.histogram's "Too many bins for data range" on a finite
    map whose range overflows float32, and the whole call was lost. Now every row comes back, and the
    entropy equals that of the same map scaled down (histogram bins are scale- and shift-invariant)."""
    from saliency.sanity import discrete_entropy, parameter_randomization

    huge = torch.tensor([[[-2e38, 0.0, 2e38, 1e37]]])
    torch.testing.assert_close(discrete_entropy(huge), discrete_entropy(huge / 1e30))
    model = _HugeGradient().eval()
    x = torch.rand(3, 1, 8, 8) * 1e-3
    maps = saliency.explain(model, x, "gradient")["gradient"]
    assert torch.isfinite(maps).all() and (maps.amax() - maps.amin()).isinf()
    table = parameter_randomization(model, x, "gradient", metrics=("ssim", "spearman_abs"))
    emprt = [r for r in table.to_pylist() if r["test"] == "emprt"]
    assert table.num_rows == 3 * (1 * 2 + 1) and len(emprt) == 3  # one state (the linear layer)
    assert all(r["value"] == r["value"] for r in emprt)  # finite, not NaN


def test_the_library_says_how_many_maps_failed_and_returns_the_rest():
    from models_for_tests import nan_gradient
    from saliency.sanity import parameter_randomization
    from saliency.sanity.runner import NonFiniteMapsWarning

    x = torch.rand(2, 1, 8, 8)
    with pytest.warns(NonFiniteMapsWarning, match=r"maps were not finite and their rows are left out \(gradient: "):
        table = parameter_randomization(nan_gradient(), x, ["gradient", "edge_sobel"], emprt=False)
    assert set(table["method"].to_pylist()) == {"edge_sobel"} and table.num_rows > 0


# ------------------------------------------------------------------------ CAM layers that are not channels-first
def _vit_reshape(tensor, height=14, width=14):  # pytorch-grad-cam's docs (vision transformers)
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def _swin_reshape(tensor):  # torchvision's Swin blocks are already B×h×w×C
    return tensor.permute(0, 3, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name, layer, layout, reshape", [
    ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", "tokens", _vit_reshape),
    ("swin_t", "features", "channels_last", _swin_reshape),
])
@pytest.mark.parametrize("method, cam_name", [("gradcam", "GradCAM")])  # GradCAM++ reads the same layer
def test_token_and_channels_last_layers_agree_with_pytorch_grad_cam(name, layer, layout, reshape, method, cam_name):
    """Issue 18, item 4: the default CAM layer of a ViT is the input of its last attention (not the patch
    embedding), and of torchvision's Swin its B×h×w×C features, permuted; both equal pytorch-grad-cam
    with the reshape_transform its documentation gives for these models."""
    import numpy as np
    import pytorch_grad_cam
    import torch.nn.functional as F
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from saliency.layers import cam_layout

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=6).eval()
    if name == "vit_b_16":  # torchvision initialises the ViT head to zeros: every gradient would be 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert saliency.default_cam_layer(model, x) == layer and cam_layout(model, x, layer) == layout
    targets = torch.tensor([3])
    ours = saliency.explain(model, x, method, targets)[method][:, 0]
    module = dict(model.named_modules())[layer]
    cam = getattr(pytorch_grad_cam, cam_name)(model=model, target_layers=[module], reshape_transform=reshape)
    try:
        cam_targets = [ClassifierOutputTarget(3)]
        outputs = cam.activations_and_grads(x)
        model.zero_grad()
        sum(t(o) for t, o in zip(cam_targets, outputs)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = torch.from_numpy(cam.get_cam_image(x, module, cam_targets, acts, grads))
    finally:
        cam.activations_and_grads.release()
    theirs = F.interpolate(raw[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    pearson = np.corrcoef(ours.flatten().double().numpy(), theirs.flatten().double().numpy())[0, 1]
    assert pearson >= 0.999


def test_a_layer_whose_layout_cannot_be_established_is_refused_naming_it():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten(2), torch.nn.Identity(),
                                torch.nn.Flatten(1), torch.nn.Linear(168, 3)).eval()
    x = torch.randn(2, 1, 10, 9)
    with pytest.raises(ValueError, match=r"the layout of the output of layer '2', \(1, 3, 56\), cannot be established .*"
                                         r"\(config: model.layer\)"):
        saliency.explain(model, x, "gradcam", layer="2")
    declared = saliency.explain(model, x, "gradcam", layer="0", layer_layout="channels_first")
    assert declared["gradcam"].shape == (2, 1, 10, 9)


def test_a_pipeline_config_can_declare_the_cam_layers_layout():
    from tasks.config import load_config

    declared = load_config({"model": {"name": "vit_b_16", "layer": "encoder.ln", "layer_layout": "tokens"}})
    assert declared.sanity_settings().explain_kwargs["layer_layout"] == "tokens"
    assert "layer_layout" not in load_config({}).sanity_settings().explain_kwargs  # found from the shape


# ------------------------------------------------------------------------------- the user's path end to end
@pytest.mark.slow
def test_a_users_functional_resnet_with_its_weights_file_runs_end_to_end(prefect_server, ray_local, tmp_path):
    """Issue 18, item 6: a CIFAR ResNet as users write it (functional residual sums, option-A shortcuts),
    loaded through ``package.module:factory`` with a local weights file, on 16 shipped CIFAR-10 images with
    every default method id and one seed (MPRT block by block, to keep the suite short): verdicts for every method, no failure rows, and LRP conserving
    on a bias-free copy of the very model the run loaded (the run's maps carry BatchNorm's biases)."""
    from flows.sanity_check import sanity_check
    from models_for_tests import functional_resnet
    from saliency.data import load_dataset
    from saliency.methods.lrp import bias_free, lrp_relevance
    from saliency.models import load_model
    from tasks.config import Config
    from tasks.manifest import read_manifest
    from tasks.plan import weights_digest
    from tasks.storage import RunDir

    torch.manual_seed(1)  # other weights than the factory's own, so that the file must be read
    trained = functional_resnet()
    for parameter in trained.parameters():
        parameter.data.add_(torch.randn_like(parameter) * 0.05)
    weights = tmp_path / "users_resnet.pt"
    torch.save(trained.state_dict(), weights)
    config = {"model": {"name": "models_for_tests:functional_resnet", "weights": str(weights)},
              "data": {"dataset": "cifar10_sample", "limit": 16}, "randomization": {"seeds": [0], "granularity": "block"},
              "storage": {"report": False}, "tracking": {"enabled": False}}
    outcome = sanity_check(config=config, out=str(tmp_path / "out"))

    directory = RunDir(outcome["run_dir"])
    assert read_manifest(directory).weights_sha256 == weights_digest(trained)
    assert outcome["stats"]["failures"] == 0 and directory.read_parts("failures") is None
    verdicts = directory.read_table("verdicts.parquet").to_pylist()
    default_ids = Config().methods.ids
    for test in ("class_sensitivity", "mprt", "emprt"):
        assert {r["method"] for r in verdicts if r["test"] == test} == set(default_ids), test
    assert all(r["verdict"] for r in verdicts)

    model = bias_free(load_model("models_for_tests:functional_resnet", weights=weights))
    x = torch.stack([load_dataset("cifar10_sample", limit=2)[i].image for i in range(2)])
    with torch.no_grad():
        logits = model(x)
    targets = logits.argmax(1, keepdim=True)
    y = logits.gather(1, targets)[:, 0]
    for rule in ("lrp_epsilon", "lrp_zplus"):
        relevance = lrp_relevance(model, x, targets, rule)[:, 0].sum((1, 2, 3))
        ratio = relevance / (y if rule == "lrp_epsilon" else y.abs())
        assert ((ratio - 1).abs() < 0.01).all(), (rule, ratio.tolist())
