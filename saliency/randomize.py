"""Model parameter randomisation states for MPRT (SPEC §2.2).

The layer list is found by tracing one forward pass, because the order in which modules are
registered need not be the order in which they run. Every state is built on a deep copy from
(seed, layer) alone, so a worker can build state k without building states 0..k-1, and the same
layer receives the same random values in every state and on every worker. The user's model and
the global random number generators are never touched.
"""
from __future__ import annotations

import copy
import logging
import re
import sys
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from saliency.choices import check_choice
from saliency.seeds import stable_seed

ORDERS = ("cascade_top_down", "cascade_bottom_up", "independent")
GRANULARITIES = ("module", "block")
INITS = ("reset", "normal")
BN_STATS = ("keep", "reset")

DEFAULT_SPATIAL_SIZE = 224  # every torchvision classifier accepts 224 pixels per side

_SLICE_NAME = re.compile(r"^(.*)\[(\d+):(\d+)\]$")
logger = logging.getLogger(__name__)


def state_name(k: int, layer: str) -> str:
    """Name of randomisation state k, e.g. "03:layer4.1.conv2"; sorts in state order."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"state index k must be a non-negative int, got {k!r}")
    return f"{k:02d}:{layer}"


def parameter_layers(
    model: nn.Module, example_input: Tensor | None = None, granularity: str = "module"
) -> list[str]:
    """Names of the randomisable layers in forward-execution order.

    granularity "module": every module with parameters of its own, once, at its first call.
    Modules with parameters that the forward never calls are left out. The root module's own
    parameters are named "" (PyTorch's name for the root).
    granularity "block": ResNet BasicBlock/Bottleneck blocks; VGG feature stages named
    "features[start:stop]" (the conv/bn/relu run up to and including its MaxPool); any other module
    of a ResNet or VGG (stem conv1 and bn1, fc, classifier) by its child of the network; in any
    other model, by its top-level child. A unit is placed where its first module runs.

    example_input defaults to one sample sized from the first registered layer: 1×C×224×224 for a
    Conv2d with C input channels (224 per spatial side for Conv1d/Conv3d as well), 1×F for a Linear
    with F input features, on the device and dtype of the model's first parameter. The trace runs
    on a deep copy in eval mode without gradients, so the model is left as it was.
    """
    check_choice("granularity", granularity, GRANULARITIES)
    executed = _trace_parameter_modules(model, example_input)
    if granularity == "module":
        return executed
    unit_of = _block_units(model)
    return list(dict.fromkeys(unit_of(name) for name in executed))


def randomized_state(
    model: nn.Module,
    layers: list[str],
    order: str,
    k: int,
    init: str = "reset",
    seed: int = 0,
    bn_stats: str = "reset",
    sigma: float = 0.01,
) -> nn.Module:
    """State k on its own: an eval-mode deep copy of model with the layers of state k randomised.

    layers is the execution-order list from parameter_layers. States are counted from the logits
    for cascade_top_down and independent (state 0 is the layer nearest the logits) and from the
    input for cascade_bottom_up. Cascades randomise states 0..k cumulatively; independent
    randomises only the layer of state k.

    init "reset" calls each module's own reset_parameters(); "normal" draws every parameter of the
    module (weights and biases, BatchNorm's included) from N(0, sigma²). Each module is seeded from
    (seed, module name) by a stable hash and its values are drawn on the CPU, so they do not depend
    on the state, the worker or the device. bn_stats "reset" (default) calls reset_running_stats() on
    the randomised norm layers: mean 0, variance 1, as Quantus's reset_parameters() leaves them;
    "keep" leaves running statistics (all buffers) as trained, which makes activations explode down
    a cascade (SPEC §2.2).
    A listed layer owns the parameter modules in its subtree that no deeper listed layer owns.
    """
    _check_options(order, init, bn_stats, seed, sigma)
    owned = _owned_modules(model, layers)
    ordered = state_layers(layers, order)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(ordered):
        raise ValueError(f"state index k must be an int in [0, {len(ordered) - 1}], got {k!r}")
    chosen = ordered[: k + 1] if order.startswith("cascade") else [ordered[k]]
    state = copy.deepcopy(model)
    for layer in chosen:
        _randomize_layer(state, owned[layer], init, seed, bn_stats, sigma)
    return state.eval()


def randomization_states(
    model: nn.Module,
    order: str = "cascade_top_down",
    granularity: str = "module",
    init: str = "reset",
    seed: int = 0,
    bn_stats: str = "reset",
    sigma: float = 0.01,
    example_input: Tensor | None = None,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield (state name, model) for every state, in the order described in randomized_state.

    Each yielded model is its own eval-mode deep copy, equal bit for bit to randomized_state(k);
    the iterator holds at most one working copy besides the one it yields. Options are checked
    here, before the first state is built.
    """
    _check_options(order, init, bn_stats, seed, sigma)
    layers = parameter_layers(model, example_input, granularity)
    owned = _owned_modules(model, layers)
    logger.info("randomisation layers (%s, execution order): %s", granularity, layers)
    return _iterate_states(model, state_layers(layers, order), owned, order, init, seed,
                           bn_stats, sigma)


def states_in_place(
    model: nn.Module,
    layers: list[str],
    order: str,
    states: list[int],
    seeds: list[int],
    init: str = "reset",
    bn_stats: str = "reset",
    sigma: float = 0.01,
) -> Iterator[tuple[int, int, nn.Module]]:
    """Yield (seed, k, model) for every seed and every state k of ``states`` (ascending), all on one
    eval-mode working copy changed in place: each yielded model equals ``randomized_state(k, seed)``
    bit for bit but is valid only until the next step (copy it to keep it).

    Why: a deep copy per state and re-randomising states 0..k−1 for every k cost more than the
    explanations on resnet18 (41 states). A cascade adds one layer per step; an independent state
    randomises its layer and puts the trained values back afterwards; a new seed starts again from
    the trained values. The user's model is never touched.
    """
    _check_options(order, init, bn_stats, 0, sigma)
    owned = _owned_modules(model, layers)
    ordered = state_layers(layers, order)
    chosen = sorted(set(states))
    if any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(ordered) for k in chosen):
        raise ValueError(f"state indices must be ints in [0, {len(ordered) - 1}], got {states!r}")
    for seed in seeds:
        _check_options(order, init, bn_stats, seed, sigma)
    working = copy.deepcopy(model).eval()
    cascade = order.startswith("cascade")
    for seed in seeds:
        done = 0  # cascade: layers ordered[:done] are randomised
        for k in chosen:
            steps = ordered[done:k + 1] if cascade else [ordered[k]]
            for layer in steps:
                _randomize_layer(working, owned[layer], init, seed, bn_stats, sigma)
            done = k + 1
            yield seed, k, working
            if not cascade:
                _restore(working, model, owned[ordered[k]])
        _restore(working, model, [name for layer in ordered[:done] for name in owned[layer]]
                 if cascade else [])


@torch.no_grad()
def _restore(working: nn.Module, model: nn.Module, module_names: list[str]) -> None:
    """Put the trained parameters and buffers of ``module_names`` back into the working copy."""
    for name in module_names:
        source, target = model.get_submodule(name), working.get_submodule(name)
        for key, value in source.named_parameters(recurse=False):
            getattr(target, key).copy_(value)
        for key, value in source.named_buffers(recurse=False):
            getattr(target, key).copy_(value)


def _iterate_states(model, ordered, owned, order, init, seed, bn_stats, sigma):
    # A cascade grows one working copy layer by layer: every layer's values depend only on
    # (seed, module name), so this equals building each state from scratch.
    cascade = order.startswith("cascade")
    working = copy.deepcopy(model) if cascade else None
    for k, layer in enumerate(ordered):
        state = working if cascade else copy.deepcopy(model)
        _randomize_layer(state, owned[layer], init, seed, bn_stats, sigma)
        yield state_name(k, layer), (copy.deepcopy(state) if cascade else state).eval()


def _check_options(order: str, init: str, bn_stats: str, seed: int, sigma: float) -> None:
    check_choice("order", order, ORDERS)
    check_choice("init", init, INITS)
    check_choice("bn_stats", bn_stats, BN_STATS)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(sigma, (int, float)) or not 0 < sigma < float("inf"):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")


def state_layers(layers: list[str], order: str) -> list[str]:
    """The layer randomised at each state k, in state order — the one place this order is decided:
    top-down and independent count from the logits, bottom-up from the input."""
    check_choice("order", order, ORDERS)
    return list(reversed(layers)) if order != "cascade_bottom_up" else list(layers)


def state_names(layers: list[str], order: str) -> list[str]:
    """MPRT state names ("03:layer4.1.conv2") in state order."""
    return [state_name(k, layer) for k, layer in enumerate(state_layers(layers, order))]


def _has_own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _parameter_module_names(model: nn.Module) -> list[str]:
    names = [name for name, module in model.named_modules() if _has_own_parameters(module)]
    if not names:
        raise ValueError(f"model {type(model).__name__} has no parameters to randomise")
    return names


def _default_example_input(model: nn.Module) -> Tensor:
    first = next(model.parameters())
    like = {"dtype": first.dtype, "device": first.device}
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            spatial = (DEFAULT_SPATIAL_SIZE,) * len(module.kernel_size)
            return torch.zeros(1, module.in_channels, *spatial, **like)
        if isinstance(module, nn.Linear):
            return torch.zeros(1, module.in_features, **like)
    raise ValueError(
        f"cannot build an example input for {type(model).__name__}: it has no Conv or Linear "
        "layer; pass example_input"
    )


def _trace_parameter_modules(model: nn.Module, example_input: Tensor | None) -> list[str]:
    """Run one forward on a deep copy and record parameter modules at their first call."""
    candidates = set(_parameter_module_names(model))
    if example_input is None:
        example_input = _default_example_input(model)
    tracer = copy.deepcopy(model).eval()
    executed: dict[str, None] = {}
    handles = []
    for name, module in tracer.named_modules():
        if name in candidates:
            handles.append(module.register_forward_pre_hook(
                lambda _module, _inputs, name=name: executed.setdefault(name)))
    try:
        with torch.no_grad():
            tracer(example_input)
    except Exception as error:
        raise ValueError(
            f"could not trace {type(model).__name__} with an example input of shape "
            f"{tuple(example_input.shape)}: {error}; pass a suitable example_input"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    if not executed:
        raise ValueError(f"the forward of {type(model).__name__} calls no module with parameters")
    return list(executed)


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _vgg_stages(features_name: str, features: nn.Module) -> list[tuple[str, int, int]]:
    """(features name, start, stop) per stage; a stage ends with its MaxPool."""
    stages, start = [], 0
    children = list(features.children())
    for index, child in enumerate(children):
        if isinstance(child, nn.MaxPool2d) or index == len(children) - 1:
            stages.append((features_name, start, index + 1))
            start = index + 1
    return stages


def _loaded(module: str, *names: str) -> tuple[type, ...]:
    """torchvision.models.<module>'s classes ``names`` if that module is loaded, else none: a model built
    from them has loaded it, and a process whose models do not need torchvision is spared its import
    (about 2 s: it imports torch._dynamo)."""
    loaded = sys.modules.get(f"torchvision.models.{module}")
    return () if loaded is None else tuple(getattr(loaded, name) for name in names)


def _block_units(model: nn.Module):
    """Return a function mapping a module name to the name of its block unit."""
    modules = dict(model.named_modules())
    block_types, vgg = _loaded("resnet", "BasicBlock", "Bottleneck"), _loaded("vgg", "VGG")
    blocks = [name for name, m in modules.items() if isinstance(m, block_types)]
    networks = [name for name, m in modules.items() if isinstance(m, _loaded("resnet", "ResNet") + vgg)]
    stages = [stage for name in networks if isinstance(modules[name], vgg)
              for stage in _vgg_stages(_join(name, "features"), modules[name].features)]

    def unit_of(name: str) -> str:
        for block in blocks:
            if _within(name, block):
                return block
        for features, start, stop in stages:
            if any(_within(name, _join(features, str(i))) for i in range(start, stop)):
                return f"{features}[{start}:{stop}]"
        for network in sorted(networks, key=len, reverse=True):
            if _within(name, network) and name != network:
                return _join(network, name[len(network):].lstrip(".").split(".")[0])
        return name.split(".")[0]

    return unit_of


def _layer_members(model: nn.Module, layer: str) -> tuple[list[str], int]:
    """Module prefixes a layer name covers and its depth (deeper layers win overlaps)."""
    match = _SLICE_NAME.match(layer)
    base = match.group(1) if match else layer
    try:
        container = model.get_submodule(base)
    except AttributeError:
        raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}; "
                         "take layer names from parameter_layers") from None
    depth = 0 if base == "" else base.count(".") + 1
    if not match:
        return [layer], depth
    start, stop = int(match.group(2)), int(match.group(3))
    if not isinstance(container, nn.Sequential) or not 0 <= start < stop <= len(container):
        raise ValueError(f"layer {layer!r} is not a slice of a Sequential of "
                         f"{type(model).__name__}; take layer names from parameter_layers")
    return [_join(base, str(i)) for i in range(start, stop)], depth + 1


def _owned_modules(model: nn.Module, layers: list[str]) -> dict[str, list[str]]:
    """Assign each parameter module to the deepest listed layer that contains it."""
    if not layers:
        raise ValueError("layers is empty; take layer names from parameter_layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers contains duplicates: {layers}")
    members = {layer: _layer_members(model, layer) for layer in layers}
    owned: dict[str, list[str]] = {layer: [] for layer in layers}
    for name in _parameter_module_names(model):
        containing = [(depth, layer) for layer, (prefixes, depth) in members.items()
                      if any(_within(name, prefix) for prefix in prefixes)]
        if containing:
            owned[max(containing, key=lambda pair: pair[0])[1]].append(name)
    for layer, names in owned.items():
        if not names:
            raise ValueError(f"layer {layer!r} has no parameters of its own to randomise")
    return owned


def _module_seed(seed: int, module_name: str) -> int:
    """Stable across processes and machines (unlike Python's salted hash())."""
    return stable_seed(seed, module_name)


@torch.no_grad()
def _randomize_layer(model: nn.Module, module_names: list[str], init: str, seed: int,
                     bn_stats: str, sigma: float) -> None:
    for name in module_names:
        module = model.get_submodule(name)
        buffers = {key: b.clone() for key, b in module.named_buffers(recurse=False)}
        if init == "reset":
            _reset_module(module, name, _module_seed(seed, name))
        else:
            generator = torch.Generator().manual_seed(_module_seed(seed, name))
            for parameter in module.parameters(recurse=False):
                values = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.copy_(values * sigma)
        if bn_stats == "keep":
            for key, value in buffers.items():
                getattr(module, key).copy_(value)
        elif hasattr(module, "reset_running_stats"):
            module.reset_running_stats()


def _reset_module(module: nn.Module, name: str, module_seed: int) -> None:
    """reset_parameters() on the CPU under a forked, seeded CPU generator."""
    if not callable(getattr(module, "reset_parameters", None)):
        raise ValueError(f"module {name!r} ({type(module).__name__}) has parameters but no "
                         "reset_parameters(); use init='normal'")
    devices = {t.device for t in module.parameters()} | {t.device for t in module.buffers()}
    if len(devices) != 1:
        raise ValueError(f"module {name!r} spans several devices {sorted(map(str, devices))}; "
                         "randomise it on one device")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(module_seed)
        module.to("cpu")
        module.reset_parameters()
        module.to(devices.pop())
