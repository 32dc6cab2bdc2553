"""Reuse of the unchanged forward below randomised layers (saliency.prefix): same maps, less forward."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from saliency import available_methods
from saliency.engine import explain
from saliency.prefix import FrozenPrefix, PerturbedPrefixes
from saliency.randomize import parameter_layers, randomized_state, states_in_place
from saliency.sanity import Settings, run_sanity
from tests.models_for_tests import assert_model_untouched, resnet18, small_cnn, state_snapshot

# every method whose passes run on x itself (IG and SmoothGrad run on inputs built from x: PerturbedPrefixes)
ON_X = [m for m in available_methods() if not m.startswith(("integrated_gradients", "smoothgrad"))]
PERTURBED = ["integrated_gradients", "smoothgrad"]


def _max_difference(a: dict, b: dict) -> dict[str, float]:
    return {m: (a[m] - b[m]).abs().max().item() for m in a}


def _with_negated(model: nn.Module, parameter: str) -> nn.Module:
    """A copy of ``model`` whose ``parameter`` (a dotted name) is negated: one changed module."""
    state = copy.deepcopy(model)
    with torch.no_grad():
        state.get_parameter(parameter).neg_()
    return state


@pytest.mark.parametrize("order", ["cascade_top_down", "independent", "cascade_bottom_up"])
def test_maps_with_the_prefix_equal_maps_without_it_bit_for_bit(order):
    model, x = resnet18(), torch.randn(2, 3, 32, 32)
    top = model(x).argmax(1)[:, None]
    layers = parameter_layers(model, x[:1])
    prefix = FrozenPrefix(model, x)
    states = [0, 1, 2, 3, 9, 20, 40]  # head, a block's BN after its in-place residual add, deep, stem
    for _, k, state in states_in_place(model, layers, order, states, [0, 3], bn_stats="reset"):
        plain = explain(state, x, ON_X, top)
        reused = explain(state, x, ON_X, top, prefix=prefix)
        assert _max_difference(plain, reused) == dict.fromkeys(ON_X, 0.0), (order, k)


@pytest.mark.parametrize("order", ["cascade_top_down", "cascade_bottom_up"])
def test_integrated_gradients_and_smoothgrad_with_recorded_inputs_equal_them_without_bit_for_bit(order):
    """Their path and noisy inputs are the same in every MPRT state: recorded once per chunk of
    ``internal_batch_size`` images, the maps are the very same; a budget too small for a record leaves
    the chunks beyond it to run whole, with the same maps."""
    model, x = resnet18(), torch.randn(3, 3, 32, 32)
    top = model(x).argmax(1)[:, None]
    layers = parameter_layers(model, x[:1])
    options = {"ig_steps": 4, "sg_samples": 3, "internal_batch_size": 4}
    prefix = FrozenPrefix(model, x)
    perturbed = PerturbedPrefixes(prefix, budget=1 << 30)
    small = PerturbedPrefixes(FrozenPrefix(model, x), budget=1)  # room for one record only
    explain(model, x, PERTURBED, top, prefix=prefix, perturbed=perturbed, **options)  # the original: records
    for _, k, state in states_in_place(model, layers, order, [0, 1, 9, 40], [0], bn_stats="reset"):
        plain = explain(state, x, PERTURBED, top, **options)
        reused = explain(state, x, PERTURBED, top, prefix=prefix, perturbed=perturbed, **options)
        limited = explain(state, x, PERTURBED, top, prefix=small.batch, perturbed=small, **options)
        assert _max_difference(plain, reused) == dict.fromkeys(PERTURBED, 0.0), (order, k)
        assert _max_difference(plain, limited) == dict.fromkeys(PERTURBED, 0.0), (order, k)
    assert len(perturbed._prefixes) == 3 + 3  # 12 path images and 9 noisy ones in chunks of 4
    assert len(small._prefixes) == 1 and perturbed.used > 0


def test_recorded_perturbed_inputs_skip_the_unchanged_calls():
    model, x = resnet18(), torch.randn(2, 3, 32, 32)
    head = randomized_state(model, parameter_layers(model, x[:1]), "cascade_top_down", 0)  # fc only
    calls = {"layer1.0.conv1": 0, "fc": 0}
    for name in calls:
        head.get_submodule(name).register_forward_pre_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    prefix = FrozenPrefix(model, x)
    perturbed = PerturbedPrefixes(prefix, budget=1 << 30)
    options = {"ig_steps": 4, "internal_batch_size": 4}
    explain(model, x, "integrated_gradients", 0, prefix=prefix, perturbed=perturbed, **options)
    explain(head, x, "integrated_gradients", 0, prefix=prefix, perturbed=perturbed, **options)
    assert calls == {"layer1.0.conv1": 0, "fc": 2}  # 8 path images in 2 chunks: only the head ran
    explain(head, x, "integrated_gradients", 0, **options)
    assert calls == {"layer1.0.conv1": 2, "fc": 4}


def test_the_reused_calls_do_not_run_and_the_changed_ones_do():
    model, x = resnet18(), torch.randn(2, 3, 32, 32)
    layers = parameter_layers(model, x[:1])
    head = randomized_state(model, layers, "cascade_top_down", 0)  # fc only
    calls = {"layer1.0.conv1": 0, "layer4.1.conv2": 0, "fc": 0}
    for name in calls:
        head.get_submodule(name).register_forward_pre_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    explain(head, x, "gradient", targets=0, prefix=FrozenPrefix(model, x))
    assert calls == {"layer1.0.conv1": 0, "layer4.1.conv2": 0, "fc": 1}
    explain(head, x, "gradient", targets=0)
    assert calls == {"layer1.0.conv1": 1, "layer4.1.conv2": 1, "fc": 2}


def test_the_original_model_is_answered_whole_and_left_as_it_was():
    model, x = small_cnn(), torch.randn(3, 3, 16, 16)
    snapshot = state_snapshot(model)
    prefix = FrozenPrefix(model, x)
    state = copy.deepcopy(model)
    maps = explain(state, x, ["gradient", "gradcam", "fullgrad/abs", "guided_backprop"], prefix=prefix)
    plain = explain(model, x, ["gradient", "gradcam", "fullgrad/abs", "guided_backprop"])
    assert _max_difference(maps, plain) == dict.fromkeys(maps, 0.0)
    assert_model_untouched(model, snapshot)
    assert_model_untouched(state, snapshot)
    for module in state.modules():
        assert "forward" not in module.__dict__, module  # the stubs are gone


def test_a_shared_relu_module_and_in_place_ops_keep_their_answers_across_many_passes():
    model, x = small_cnn(), torch.randn(3, 3, 16, 16)  # one ReLU module called twice, in place
    layers = parameter_layers(model, x[:1])
    prefix = FrozenPrefix(model, x)
    for _ in range(2):  # the record must survive being used: a second round gives the same maps
        for _, k, state in states_in_place(model, layers, "cascade_top_down", list(range(len(layers))), [0]):
            assert _max_difference(explain(state, x, ON_X, prefix=prefix), explain(state, x, ON_X)) \
                == dict.fromkeys(ON_X, 0.0), k


def test_a_prefix_is_used_only_where_it_holds():
    model, x = small_cnn(), torch.randn(3, 3, 16, 16)
    prefix = FrozenPrefix(model, x)
    other_x = torch.randn(3, 3, 16, 16)
    assert prefix.plan(model, other_x, nn.Module.__call__, ("k",)) is None
    maps = explain(model, other_x, "gradient", prefix=prefix)["gradient"]
    assert torch.equal(maps, explain(model, other_x, "gradient")["gradient"])
    other = small_cnn(classes=4)  # another head: everything below it is reused
    assert torch.equal(explain(other, x, "gradient", targets=0, prefix=prefix)["gradient"],
                       explain(other, x, "gradient", targets=0)["gradient"])


def test_a_model_changed_after_its_prefix_was_made_is_refused():
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    prefix = FrozenPrefix(model, x)
    with torch.no_grad():
        model.conv1.weight.mul_(2)
    with pytest.raises(ValueError, match="changed after the prefix was made"):
        explain(model, x, "gradient", prefix=prefix)


class _ParameterDependentLoop(nn.Module):
    """Calls ``body`` once or twice depending on the head's weights: a forward whose module calls
    change with the parameters, which the recorded calls cannot answer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = self.body(x)
        if self.head.weight.sum() < 0:
            h = self.body(h)
        return self.head(h.mean(dim=(2, 3)))


def test_a_forward_that_calls_modules_differently_switches_the_reuse_off_and_stays_right(caplog):
    torch.manual_seed(0)
    model, x = _ParameterDependentLoop().eval(), torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        model.head.weight.abs_()
    state = _with_negated(model, "head.weight")
    prefix = FrozenPrefix(model, x)
    reused = explain(state, x, "gradient", targets=0, prefix=prefix)["gradient"]
    assert torch.equal(reused, explain(state, x, "gradient", targets=0)["gradient"])
    assert "forward reuse switched off" in caplog.text and "calls made, recorded: {'body': (2, 1)}" in caplog.text
    assert prefix.disabled and prefix.plan(model, x, nn.Module.__call__, ("k",)) is None


def test_a_module_that_changes_its_input_in_place_where_the_original_did_not_is_caught(caplog):
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    state = copy.deepcopy(model)
    state.bn1 = nn.Identity()  # so the in-place ReLU after it changes conv1's output, unlike the original
    prefix = FrozenPrefix(model, x)
    assert torch.equal(explain(state, x, "gradient", targets=0, prefix=prefix)["gradient"],
                       explain(state, x, "gradient", targets=0)["gradient"])
    assert prefix.disabled is None  # refused up front, not caught after the fact


def test_mprt_rows_are_the_same_with_the_reuse_as_from_states_built_alone():
    model, x = small_cnn(), torch.randn(4, 3, 16, 16)
    settings = Settings(methods=["gradient", "gradcam/abs", "fullgrad/signed"], tests=["mprt"],
                        metrics=["spearman_abs"], options={"mprt": {"bn_stats": "reset"}})
    table = run_sanity(model, x, settings).to_pydict()
    layers = parameter_layers(model, x[:1])
    top = model(x).argmax(1)[:, None]
    original = explain(model, x, settings.methods, top)
    from saliency.similarity import similarity
    for k in range(len(layers)):
        state = randomized_state(model, layers, "cascade_top_down", k, bn_stats="reset")
        maps = explain(state, x, settings.methods, top)
        for method in settings.methods:
            expected = similarity(original[method][:, 0], maps[method][:, 0], "spearman_abs").tolist()
            got = [s for s, m, st, test in zip(table["value"], table["method"], table["state_index"], table["test"])
                   if m == method and st == k and test == "mprt"]
            assert got == pytest.approx(expected, abs=1e-12), (method, k)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h.relu_()  # changes bn's output in place
        return h * 2


class _InPlaceAfterTheCamLayer(nn.Module):
    """The CAM layer's output is changed in place by its caller, inside a block whose own output is
    untouched: the block can be answered for the plain gradient, but not when the CAM layer is ``bn``."""

    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(x).mean(dim=(2, 3)))


def test_a_cam_layer_changed_in_place_by_its_caller_is_recomputed():
    torch.manual_seed(0)
    model, x = _InPlaceAfterTheCamLayer().eval(), torch.randn(2, 3, 8, 8)
    state = _with_negated(model, "head.weight")
    methods = ["gradcam", "gradcampp/abs", "fullgrad/signed", "gradient"]
    prefix = FrozenPrefix(model, x)
    for layer in ("block.bn", "block.conv", "block"):
        reused = explain(state, x, methods, targets=1, layer=layer, prefix=prefix)
        plain = explain(state, x, methods, targets=1, layer=layer)
        assert _max_difference(reused, plain) == dict.fromkeys(methods, 0.0), layer


class _CamLayerCalledTwice(nn.Module):
    """``conv`` runs before and after ``mid``: when only ``mid`` changes, its first call is answered from the
    record and its second runs; CAM methods read the last call, which must be the live one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.mid = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        h = self.conv(torch.relu(self.mid(self.conv(x))))
        return self.head(h.mean(dim=(2, 3)))


def test_a_cam_layer_called_twice_is_read_at_its_last_call_when_only_the_first_is_answered():
    torch.manual_seed(0)
    model, x = _CamLayerCalledTwice().eval(), torch.randn(2, 3, 8, 8)
    state = _with_negated(model, "mid.weight")
    methods = ["gradcam", "gradcampp/abs", "fullgrad/signed"]
    reused = explain(state, x, methods, targets=1, layer="conv", prefix=FrozenPrefix(model, x))
    assert _max_difference(reused, explain(state, x, methods, targets=1, layer="conv")) == dict.fromkeys(methods, 0.0)
