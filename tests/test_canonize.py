"""Issue 18, item 2: LRP for any traceable CNN through one graph canonizer (saliency.canonize).

Conservation, Σ_i R_i = y_c (|y_c| for z⁺), holds only where no layer adds a constant, so it is measured
on bias-free copies (``bias_free``: conv/linear biases, BatchNorm running mean and β zero). Small inputs
at random init keep the file short; every model goes through ``saliency.explain``'s LRP path."""
from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

import saliency
from models_for_tests import assert_model_untouched, mixed_activations, small_cnn, state_snapshot
from saliency.canonize import canonize
from saliency.methods.lrp import bias_free, lrp_relevance
from saliency.models import load_model


def _torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10).eval()


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm running variances of the data, as after training: at random init the activations of a
    deep net can shrink to ~1e-10 (mobilenet_v2 at 32²: 3×3 depthwise convs on 1×1 maps), where LRP's
    ε = 1e-6 takes all the relevance and conservation measures the scale, not the canonizer."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: the batch's own statistics
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _conservation(model: nn.Module, size: int) -> dict[str, torch.Tensor]:
    """Σ R / y_c per image for ε, and Σ R / |y_c| for z⁺, at the top class of two seeded images."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = bias_free(_calibrated(model, x))
    with torch.no_grad():
        logits = model(x)
    targets = logits.argmax(1, keepdim=True)
    y = logits.gather(1, targets)[:, 0]
    canonical = canonize(model, x)
    return {rule: lrp_relevance(model, x, targets, rule, canonical)[:, 0].sum((1, 2, 3))
            / (y.abs() if rule == "lrp_zplus" else y) for rule in ("lrp_epsilon", "lrp_zplus")}


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [
    ("resnet18", 32), ("resnet50", 32), ("densenet121", 64), ("mobilenet_v2", 32),
    ("cifar_resnet20", 32), ("models_for_tests:functional_resnet", 32)])
def test_relevance_is_conserved_on_bias_free_copies(name, size):
    """Within 1% for ε and z⁺. Measured Σ R / y_c (ε; z⁺ within 0.0002 of it or better): resnet18 0.99994,
    resnet50 0.9998, densenet121 0.99995, mobilenet_v2 0.9993 / 1.0014 (z⁺ 1.0002 / 1.0019),
    cifar_resnet20 0.99996, the functional ResNet 0.99996. densenet121 at 64² averages 2×2 values at its
    head: the functional average pool must share relevance in proportion (the gradient's equal shares
    gave 1.08 y_c)."""
    model = _torchvision(name) if ":" not in name and name != "cifar_resnet20" else load_model(name)
    ratios = _conservation(model, size)
    for rule, ratio in ratios.items():
        assert ((ratio - 1).abs() < 0.01).all(), (name, rule, ratio.tolist())


def test_the_functional_resnet_is_canonized_from_its_graph():
    """Option-A shortcuts with F.pad, ``out + shortcut``, ``out += x``, ``view(size(0), -1)``: every BN merged,
    every residual sum a zennit Sum, the function unchanged, and no class-based choice involved."""
    from zennit.layer import Sum

    model = load_model("models_for_tests:functional_resnet")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    canonical = canonize(model, x)
    assert sum(isinstance(m, Sum) for m in canonical.modules()) == 6
    merged = [m for m in canonical.modules() if isinstance(m, nn.Conv2d)]
    assert len(merged) == 13 and all(m.bias is not None for m in merged)
    assert not any(node.target in ("add", "add_") or getattr(node.target, "__name__", "") in ("add", "iadd")
                   for node in canonical.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(canonical(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_merged_batchnorm_leaves_the_function_exact_at_a_large_eps():
    """zennit's MergeBatchNorm leaves the BatchNorm computing x/√(1 + eps): at inception_v3's eps = 1e-3
    its ~28 BatchNorms in depth lost 1.4% of y_c (Σ R / y_c = 0.986 in the model matrix). Ours takes the
    merged BatchNorm out of the graph: the canonized model computes the model's logits, and relevance
    sums to y_c at an eps of 1e-2."""
    model = small_cnn()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-2
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = bias_free(model)
    canonical = canonize(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in canonical.modules())
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(canonical(x), logits, rtol=1e-6, atol=1e-6)
    targets = logits.argmax(1, keepdim=True)
    y = logits.gather(1, targets)[:, 0]
    for rule in ("lrp_epsilon", "lrp_zplus"):
        ratio = lrp_relevance(model, x, targets, rule, canonical)[:, 0].sum((1, 2, 3)) / (
            y.abs() if rule == "lrp_zplus" else y)
        assert ((ratio - 1).abs() < 1e-4).all(), (rule, ratio.tolist())


def test_the_users_model_is_unchanged_and_keeps_no_hooks():
    model = load_model("models_for_tests:functional_resnet")
    snapshot = state_snapshot(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = saliency.explain(model, x, ["lrp_epsilon", "lrp_zplus"])
    assert all(torch.isfinite(m).all() for m in maps.values())
    assert_model_untouched(model, snapshot)


def test_uncovered_layers_are_refused_naming_the_nodes_before_any_map():
    model = mixed_activations()
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as error:
        saliency.explain(model, x, ["gradient", "lrp_epsilon"])
    message = str(error.value)
    assert message.startswith("LRP cannot cover MixedActivations: no rule conserves relevance at 2 graph node(s) "
                              "(call_module GELU ×1, call_function silu ×1): ")
    assert "node 'act1' (call_module GELU)" in message and "node 'silu' (call_function silu)" in message
    assert "Refused before any compute" in message


@pytest.mark.slow
def test_vit_b_16_is_refused_naming_its_nodes():
    """The issue saw "hook 'backward' has returned an incorrect number of values" from inside zennit."""
    model = _torchvision("vit_b_16")
    with pytest.raises(ValueError, match=r"LRP cannot cover VisionTransformer: .*node '[a-z0-9_]+' "
                                         r"\(call_module (LayerNorm|MultiheadAttention|GELU)\)"):
        saliency.explain(model, torch.randn(1, 3, 224, 224), "lrp_zplus")


def test_a_model_fx_cannot_trace_is_refused_with_the_reason():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            out = self.conv(x)
            if out.sum() > 0:  # control flow on a value: no graph
                out = -out
            return out.flatten(1)

    with pytest.raises(ValueError, match=r"torch.fx cannot trace DataDependent \(TraceError: .*\); refused"):
        saliency.explain(DataDependent().eval(), torch.randn(1, 1, 6, 6), "lrp_epsilon", torch.tensor([0]))


def test_a_shared_module_gets_one_copy_per_call_and_batchnorm_after_a_concatenation_is_affine():
    """zennit keeps one state per module, so a module called twice is copied; a BatchNorm no conv alone
    feeds (after torch.cat) is the per-channel affine layer it computes."""
    from saliency.canonize import Affine

    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3, bias=False)

        def forward(self, x):
            a = torch.relu(self.conv(x))
            b = torch.relu(self.conv(a))  # the same conv again
            out = torch.relu(self.bn(torch.cat([a, b], 1)))
            return self.fc(out.mean((2, 3)))

    torch.manual_seed(0)
    model = Concat().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 2.0)
    x = torch.rand(2, 2, 6, 6)
    canonical = canonize(model, x)
    assert sum(isinstance(m, nn.Conv2d) for m in canonical.modules()) == 2
    assert sum(isinstance(m, Affine) for m in canonical.modules()) == 1
    with torch.no_grad():
        torch.testing.assert_close(canonical(x), model(x))
    y = model(x)[:, 0].detach()
    relevance = lrp_relevance(model, x, torch.zeros(2, 1, dtype=torch.long), "lrp_epsilon")[:, 0]
    torch.testing.assert_close(relevance.sum((1, 2, 3)), y, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("layer, found", [
    (nn.Hardtanh(-1.0, 1.0), "call_module Hardtanh (not from 0, unlike ReLU6)"),
    (nn.BatchNorm2d(2, track_running_stats=False), "call_module BatchNorm2d without running statistics"),
    (lambda x: x * 2.0, "call_function mul"),
    (lambda x: x + 1.0, "call_function add of a tensor and a constant"),
    (lambda x: x.sum(1, keepdim=True).expand_as(x), "call_method sum"),  # expand_as is covered
])
def test_what_no_rule_conserves_is_refused(layer, found):
    """A Hardtanh that saturates below 0 (unlike ReLU6), BatchNorm on batch statistics, scaling, a
    constant offset (a bias no rule covers), and a sum over channels (its gradient copies relevance)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.layer = layer if isinstance(layer, nn.Module) else None
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            out = self.conv(x)
            out = self.layer(out) if self.layer is not None else layer(out)
            return self.fc(torch.relu(out).mean((2, 3)))

    with pytest.raises(ValueError, match=r"LRP cannot cover Net: no rule conserves relevance at 1 graph node"
                                         rf".*\({re.escape(found)}"):
        canonize(Net().eval(), torch.rand(2, 1, 6, 6))


def test_a_padded_average_pool_that_keeps_the_shape_still_shares_in_proportion():
    """inception_v3's ``F.avg_pool2d(x, 3, 1, 1)`` keeps the shape, yet averages: taken for an identity and
    left to the gradient, it lost the shares of the padding and gave relevance to zeros (Σ R = 0.52 |y_c|
    under z⁺ on the whole bias-free net, 0.90 y_c after the pool alone)."""

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
            self.fc = nn.Linear(4, 3, bias=False)

        def forward(self, x):
            out = torch.nn.functional.avg_pool2d(torch.relu(self.conv(x)), 3, 1, 1)
            return self.fc(out.mean((2, 3)))

    torch.manual_seed(0)
    model = Pooled().eval()
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    targets = torch.zeros(2, 1, dtype=torch.long)
    y = model(x)[:, 0].detach()
    for rule, start in (("lrp_epsilon", y), ("lrp_zplus", y.abs())):
        relevance = lrp_relevance(model, x, targets, rule)[:, 0].sum((1, 2, 3))
        torch.testing.assert_close(relevance, start, rtol=1e-3, atol=1e-6)


def test_chunk_and_split_route_relevance_as_shufflenet_needs():
    """ShuffleNet halves its channels with ``chunk``: each value goes to one part, so the sum is kept."""

    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
            self.branch = nn.Conv2d(2, 2, 1, bias=False)
            self.fc = nn.Linear(4, 3, bias=False)

        def forward(self, x):
            left, right = torch.relu(self.conv(x)).chunk(2, dim=1)
            right = torch.relu(self.branch(right))
            out = torch.cat(torch.split(torch.cat([left, right], 1), 2, dim=1), 1)
            return self.fc(out.mean((2, 3)))

    torch.manual_seed(0)
    model = Halves().eval()
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    targets = torch.zeros(2, 1, dtype=torch.long)
    y = model(x)[:, 0].detach()
    for rule, start in (("lrp_epsilon", y), ("lrp_zplus", y.abs())):
        relevance = lrp_relevance(model, x, targets, rule)[:, 0].sum((1, 2, 3))
        torch.testing.assert_close(relevance, start, rtol=1e-3, atol=1e-6)


def test_a_rule_that_does_not_conserve_on_this_model_is_refused_with_its_ratio():
    """z⁺ on a depthwise conv that feeds the next layer without a ReLU (ShuffleNet's pattern: 0.36 of |y_c|
    left in the model matrix) loses the relevance its negative outputs receive; ε conserves there."""
    from models_for_tests import depthwise_without_relu
    from saliency.methods.lrp import check_conservation

    model = depthwise_without_relu()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    snapshot = state_snapshot(model)
    check_conservation(model, x, ["lrp_epsilon"])
    with pytest.raises(ValueError, match=r"^LRP does not conserve relevance on DepthwiseWithoutReLU for lrp_zplus "
                                         r"\(Σ R / \|y_c\| = 0(\.0+\d*)?(e-\d+)?, 0(\.0+\d*)?(e-\d+)?, allowed \[0.9, 1.1\]\), "
                                         r"measured on a bias-free copy at the model's top class of 2 image\(s\)"):
        check_conservation(model, x, ["lrp_epsilon", "lrp_zplus"])
    assert_model_untouched(model, snapshot)
