"""Layer discovery and seeded randomisation states (SPEC §2.2)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from saliency.randomize import (
    ORDERS,
    parameter_layers,
    randomization_states,
    randomized_state,
    state_name,
    states_in_place,
)

SMALL_INPUT = torch.zeros(1, 3, 8, 8)
RESNET_INPUT = torch.zeros(1, 3, 64, 64)


def _pretend_trained(model: nn.Module) -> nn.Module:
    """Move every parameter and running statistic away from its initial value."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.fill_(0.3)
                module.running_var.fill_(2.0)
                module.num_batches_tracked.fill_(7)
    return model


def small_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    return _pretend_trained(net)


SMALL_LAYERS = ["0", "1", "3.0", "3.1", "6"]


def resnet18_execution_order() -> list[str]:
    """torchvision's BasicBlock runs conv1, bn1, conv2, bn2 and only then its downsample."""
    order = ["conv1", "bn1"]
    for stage in (1, 2, 3, 4):
        for block in (0, 1):
            prefix = f"layer{stage}.{block}"
            order += [f"{prefix}.conv1", f"{prefix}.bn1", f"{prefix}.conv2", f"{prefix}.bn2"]
            if stage > 1 and block == 0:
                order += [f"{prefix}.downsample.0", f"{prefix}.downsample.1"]
    return order + ["fc"]


def changed_modules(original: nn.Module, state: nn.Module) -> set[str]:
    """Names of the modules owning a parameter that differs between the two models."""
    before = dict(original.named_parameters())
    changed = set()
    for name, parameter in state.named_parameters():
        if not torch.equal(parameter, before[name]):
            changed.add(name.rpartition(".")[0])
    return changed


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def snapshot(model: nn.Module) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def expected_changed(layers: list[str], order: str, k: int) -> set[str]:
    ordered = layers[::-1] if order != "cascade_bottom_up" else layers
    return set(ordered[: k + 1]) if order.startswith("cascade") else {ordered[k]}


# --- layer discovery ------------------------------------------------------------------------------

def test_resnet18_layers_follow_the_traced_execution_order():
    model = torchvision.models.resnet18(weights=None)
    layers = parameter_layers(model, RESNET_INPUT)
    assert layers == resnet18_execution_order()
    assert layers.index("layer2.0.downsample.0") == layers.index("layer2.0.bn2") + 1


def test_trace_follows_the_forward_not_the_registration_order():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 4)
            self.early = nn.Linear(4, 4)

        def forward(self, x):
            x = F.relu(self.early(x))
            x = self.early(x)  # called twice: listed once, at its first call
            return self.late(x)

    model = Reordered()
    registered = [name for name, _ in model.named_modules() if name]
    assert registered == ["late", "unused", "early"]
    assert parameter_layers(model, torch.zeros(1, 4)) == ["early", "late"]


def test_default_example_input_is_built_from_the_first_layer():
    assert parameter_layers(torchvision.models.resnet18(weights=None)) == resnet18_execution_order()
    mlp = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    assert parameter_layers(mlp) == ["0", "2"]


def test_tracing_leaves_the_model_and_its_mode_alone():
    model = small_net().train()
    before = snapshot(model)
    parameter_layers(model, torch.randn(2, 3, 8, 8))
    assert model.training
    assert_same_tensors(model.state_dict(), before)  # no BatchNorm statistics updated
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_block_units_of_resnet18():
    model = torchvision.models.resnet18(weights=None)
    assert parameter_layers(model, RESNET_INPUT, "block") == [
        "conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
        "layer3.0", "layer3.1", "layer4.0", "layer4.1", "fc",
    ]


def test_block_units_of_vgg16_are_feature_stages_and_the_classifier():
    model = torchvision.models.vgg16(weights=None)
    assert parameter_layers(model, torch.zeros(1, 3, 32, 32), "block") == [
        "features[0:5]", "features[5:10]", "features[10:17]", "features[17:24]",
        "features[24:31]", "classifier",
    ]


def test_block_units_of_other_models_are_top_level_children():
    assert parameter_layers(small_net(), SMALL_INPUT, "block") == ["0", "1", "3", "6"]


def test_block_units_of_a_wrapped_resnet_are_named_inside_the_network():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), torchvision.models.resnet18(weights=None))
    units = parameter_layers(model, RESNET_INPUT, "block")
    assert units[:5] == ["0", "1.conv1", "1.bn1", "1.layer1.0", "1.layer1.1"]
    assert units[-1] == "1.fc" and len(units) == 12


# --- states ---------------------------------------------------------------------------------------

def test_resnet18_top_down_states_leave_the_user_model_untouched():
    model = torchvision.models.resnet18(weights=None).train()
    before = snapshot(model)
    rng_before = torch.get_rng_state()
    names = []
    for name, state in randomization_states(model, example_input=RESNET_INPUT):
        assert state is not model and not state.training
        names.append(name)
    assert names[:3] == ["00:fc", "01:layer4.1.bn2", "02:layer4.1.conv2"]
    assert names == [state_name(k, layer)
                     for k, layer in enumerate(reversed(resnet18_execution_order()))]
    assert len(names) == 41 and names[-1] == "40:conv1"
    assert model.training
    assert_same_tensors(model.state_dict(), before)
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("init", ["reset", "normal"])
def test_each_state_changes_exactly_its_layers(order, init):
    model = small_net()
    states = list(randomization_states(model, order, init=init, example_input=SMALL_INPUT, bn_stats="keep"))
    assert len(states) == len(SMALL_LAYERS)
    for k, (_, state) in enumerate(states):  # kept together: no state aliases another
        assert changed_modules(model, state) == expected_changed(SMALL_LAYERS, order, k)
        assert_same_tensors(dict(state.named_buffers()), dict(model.named_buffers()))  # kept statistics


def test_block_state_changes_the_whole_block():
    model = _pretend_trained(torchvision.models.resnet18(weights=None))
    blocks = parameter_layers(model, RESNET_INPUT, "block")
    state = randomized_state(model, blocks, "independent", k=1)
    assert changed_modules(model, state) == {
        name for name in resnet18_execution_order() if name.startswith("layer4.1.")}


def test_a_layer_owns_its_subtree_except_deeper_listed_layers():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x * self.scale)

    model = nn.Sequential(Scaled(), nn.Linear(4, 2))
    module_layers = parameter_layers(model, torch.zeros(1, 4))
    assert module_layers == ["0", "0.inner", "1"]
    alone = randomized_state(model, module_layers, "cascade_bottom_up", 0, init="normal")
    assert changed_modules(model, alone) == {"0"}
    blocks = parameter_layers(model, torch.zeros(1, 4), "block")
    whole = randomized_state(model, blocks, "cascade_bottom_up", 0, init="normal")
    assert changed_modules(model, whole) == {"0", "0.inner"}


def test_slice_layer_names_cover_their_part_of_a_sequential():
    model = nn.Sequential(small_net())
    state = randomized_state(model, ["0[0:2]", "0[2:7]"], "cascade_bottom_up", 0)
    assert changed_modules(model, state) == {"0.0", "0.1"}


# --- reproducibility ------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
def test_state_built_alone_equals_the_iterated_state(order):
    model = small_net()
    for k, (name, state) in enumerate(
            randomization_states(model, order, seed=5, example_input=SMALL_INPUT)):
        alone = randomized_state(model, SMALL_LAYERS, order, k, seed=5)
        assert name.startswith(f"{k:02d}:")
        assert_same_tensors(alone.state_dict(), state.state_dict())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("init,bn_stats", [("reset", "keep"), ("normal", "reset")])
def test_states_built_in_place_equal_the_states_built_alone(order, init, bn_stats):
    """One working copy, changed in place across states and seeds, gives each state bit for bit
    (a subset of states, two seeds: the second seed starts again from the trained values)."""
    model = _pretend_trained(small_net()).train()
    before = snapshot(model)
    seen = []
    for seed, k, state in states_in_place(model, SMALL_LAYERS, order, [3, 1, 4], [7, 2], init=init,
                                          bn_stats=bn_stats):
        alone = randomized_state(model, SMALL_LAYERS, order, k, init=init, seed=seed, bn_stats=bn_stats)
        assert_same_tensors(alone.state_dict(), state.state_dict())
        assert state is not model and not state.training
        seen.append((seed, k))
    assert seen == [(7, 1), (7, 3), (7, 4), (2, 1), (2, 3), (2, 4)]
    assert model.training
    assert_same_tensors(model.state_dict(), before)


def test_resnet18_state_built_alone_equals_the_iterated_state():
    model = torchvision.models.resnet18(weights=None)
    states = randomization_states(model, "cascade_top_down", example_input=RESNET_INPUT)
    for _ in range(3):
        name, state = next(states)
    assert name == "02:layer4.1.conv2"
    alone = randomized_state(model, resnet18_execution_order(), "cascade_top_down", 2)
    assert_same_tensors(alone.state_dict(), state.state_dict())


@pytest.mark.parametrize("init", ["reset", "normal"])
def test_same_seed_same_state_and_other_seed_other_state(init):
    model = small_net()
    first = randomized_state(model, SMALL_LAYERS, "cascade_bottom_up", 4, init=init, seed=1)
    again = randomized_state(model, SMALL_LAYERS, "cascade_bottom_up", 4, init=init, seed=1)
    other = randomized_state(model, SMALL_LAYERS, "cascade_bottom_up", 4, init=init, seed=2)
    assert_same_tensors(first.state_dict(), again.state_dict())
    assert not torch.equal(first[0].weight, other[0].weight)
    assert not torch.equal(first[6].weight, other[6].weight)


@pytest.mark.parametrize("init", ["reset", "normal"])
def test_a_layer_gets_the_same_values_in_cascade_and_independent_states(init):
    model = small_net()
    for k, layer in enumerate(reversed(SMALL_LAYERS)):
        cascade = randomized_state(model, SMALL_LAYERS, "cascade_top_down", k, init=init)
        independent = randomized_state(model, SMALL_LAYERS, "independent", k, init=init)
        assert_same_tensors(cascade.get_submodule(layer).state_dict(),
                            independent.get_submodule(layer).state_dict())


def test_a_module_gets_the_same_values_at_module_and_block_granularity():
    model = small_net()
    by_block = randomized_state(model, ["0", "1", "3", "6"], "independent", 1)  # unit "3"
    by_module = randomized_state(model, SMALL_LAYERS, "cascade_top_down", 2)  # 6, 3.1, 3.0
    assert_same_tensors(by_block[3].state_dict(), by_module[3].state_dict())


def test_same_shaped_layers_get_different_values():
    model = small_net()
    state = randomized_state(model, SMALL_LAYERS, "cascade_bottom_up", 4, init="normal")
    assert state[1].weight.shape == state[3][1].weight.shape
    assert not torch.equal(state[1].weight, state[3][1].weight)


def test_values_do_not_depend_on_the_process(tmp_path):
    """Another interpreter with another string-hash salt builds the same state (a worker)."""
    script = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from saliency.randomize import randomized_state\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))\n"
        "torch.save(model.state_dict(), sys.argv[1] + '/model.pt')\n"
        "for init in ('reset', 'normal'):\n"
        "    state = randomized_state(model, ['0', '1'], 'cascade_bottom_up', 1,\n"
        "                             init=init, seed=3)\n"
        "    torch.save(state.state_dict(), sys.argv[1] + f'/{init}.pt')\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env,
                   cwd=Path(__file__).resolve().parents[1])
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    for init in ("reset", "normal"):
        state = randomized_state(model, ["0", "1"], "cascade_bottom_up", 1, init=init, seed=3)
        assert_same_tensors(state.state_dict(),
                            torch.load(tmp_path / f"{init}.pt", weights_only=True))


def test_randomisation_never_disturbs_the_global_generator():
    model = small_net()
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    randomized_state(model, SMALL_LAYERS, "cascade_bottom_up", 4, init="reset")
    randomized_state(model, SMALL_LAYERS, "cascade_bottom_up", 4, init="normal")
    assert torch.equal(torch.rand(3), expected)


# --- init and BatchNorm statistics ----------------------------------------------------------------

def test_normal_init_draws_every_parameter_with_sigma():
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(64, 2))
    state = randomized_state(model, ["0", "2"], "cascade_bottom_up", 0, init="normal", sigma=0.05)
    weight = state[0].weight
    assert weight.std().item() == pytest.approx(0.05, rel=0.03)
    assert abs(weight.mean().item()) < 0.002
    assert state[0].bias.abs().max().item() < 0.05 * 5
    assert not torch.equal(state[0].bias, model[0].bias)


@pytest.mark.parametrize("init", ["reset", "normal"])
def test_bn_stats_keep_leaves_running_statistics_and_reset_resets_them(init):
    model = small_net()
    kept = randomized_state(model, SMALL_LAYERS, "independent", 3, init=init, bn_stats="keep")
    reset = randomized_state(model, SMALL_LAYERS, "independent", 3, init=init, bn_stats="reset")
    assert torch.equal(kept[1].running_mean, model[1].running_mean)
    assert torch.equal(kept[1].running_var, model[1].running_var)
    assert kept[1].num_batches_tracked.item() == 7
    assert torch.equal(reset[1].running_mean, torch.zeros(8))
    assert torch.equal(reset[1].running_var, torch.ones(8))
    assert reset[1].num_batches_tracked.item() == 0
    assert torch.equal(reset[3][1].running_mean, model[3][1].running_mean)  # not randomised
    assert torch.equal(kept[1].weight, reset[1].weight)


def test_default_randomisation_leaves_a_batchnorm_as_its_own_reset_parameters_does():
    """SPEC §2.2: bn_stats="reset" by default — what Quantus's randomisation (the module's
    reset_parameters(), which resets running statistics too) leaves: mean 0, var 1, γ 1, β 0."""
    model = small_net()
    state = randomized_state(model, SMALL_LAYERS, "independent", 3)  # defaults: init reset, bn_stats reset
    quantus_like = copy.deepcopy(model[1])
    quantus_like.reset_parameters()
    assert not torch.equal(model[1].running_var, torch.ones(8))  # the trained statistics differ
    for name, tensor in quantus_like.state_dict().items():
        assert torch.equal(state[1].state_dict()[name], tensor), name


def test_reset_init_uses_the_modules_own_reset_parameters():
    model = small_net()
    state = randomized_state(model, SMALL_LAYERS, "cascade_bottom_up", 1, init="reset")
    assert torch.equal(state[1].weight, torch.ones(8))  # BatchNorm's reset: weight 1, bias 0
    assert torch.equal(state[1].bias, torch.zeros(8))
    bound = 1 / (3 * 3 * 3) ** 0.5  # Conv2d's kaiming-uniform bound, a = sqrt(5)
    assert state[0].weight.abs().max().item() <= bound


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, allowed", [
    ("order", "sideways", "cascade_top_down, cascade_bottom_up, independent"),
    ("granularity", "neuron", "module, block"),
    ("init", "uniform", "reset, normal"),
    ("bn_stats", "freeze", "keep, reset"),
])
def test_unknown_options_name_the_allowed_values(option, value, allowed):
    with pytest.raises(ValueError, match=f"unknown {option} '{value}'; allowed: {allowed}"):
        randomization_states(small_net(), example_input=SMALL_INPUT, **{option: value})


def test_bad_inputs_get_clear_messages():
    model = small_net()
    with pytest.raises(ValueError, match="has no parameters to randomise"):
        parameter_layers(nn.Sequential(nn.ReLU()), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="pass a suitable example_input"):
        parameter_layers(model, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="no Conv or Linear layer; pass example_input"):
        parameter_layers(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 4\], got 5"):
        randomized_state(model, SMALL_LAYERS, "independent", 5)
    with pytest.raises(ValueError, match="layer 'head' is not a module of Sequential"):
        randomized_state(model, ["0", "head"], "independent", 0)
    with pytest.raises(ValueError, match="layer '2' has no parameters of its own"):
        randomized_state(model, ["0", "2"], "independent", 0)
    with pytest.raises(ValueError, match="sigma must be a positive finite number, got 0"):
        randomized_state(model, SMALL_LAYERS, "independent", 0, init="normal", sigma=0)
    with pytest.raises(ValueError, match="seed must be an int, got 1.5"):
        randomized_state(model, SMALL_LAYERS, "independent", 0, seed=1.5)
    with pytest.raises(ValueError, match="state index k must be a non-negative int, got -1"):
        state_name(-1, "fc")


def test_reset_init_needs_reset_parameters():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(Scale(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"module '0' \(Scale\) has parameters but no "
                                         r"reset_parameters\(\); use init='normal'"):
        randomized_state(model, ["0", "1"], "cascade_bottom_up", 0, init="reset")
    state = randomized_state(model, ["0", "1"], "cascade_bottom_up", 0, init="normal")
    assert changed_modules(model, state) == {"0"}
