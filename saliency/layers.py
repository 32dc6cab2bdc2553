"""What a model runs, found by tracing one forward of one image: the default CAM layer and the layout
of its output, and the activations other than ReLU that a ReLU backward rule would meet (SPEC §1.2–1.3)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from saliency.checks import run_model
from saliency.passes import ReLURouting, evaluation
from saliency.reshape import grid_side

#: Nonlinearities a ReLU backward rule does not define (SPEC §1.3): a forward that meets them would
#: differentiate them as usual, so a "guided" map would be mostly a plain gradient.
_OTHER_ACTIVATIONS = {
    F.gelu: "GELU", F.silu: "SiLU", F.hardswish: "Hardswish", F.mish: "Mish", F.hardtanh: "Hardtanh/ReLU6",
    F.hardtanh_: "Hardtanh/ReLU6", F.relu6: "ReLU6", F.elu: "ELU", F.elu_: "ELU", F.selu: "SELU",
    F.celu: "CELU", F.leaky_relu: "LeakyReLU", F.leaky_relu_: "LeakyReLU", F.rrelu: "RReLU", F.prelu: "PReLU",
    F.glu: "GLU", F.softplus: "Softplus", F.softsign: "Softsign", F.logsigmoid: "LogSigmoid",
    F.hardsigmoid: "Hardsigmoid", torch.sigmoid: "sigmoid", Tensor.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid",
    Tensor.sigmoid_: "sigmoid", torch.tanh: "tanh", Tensor.tanh: "tanh", torch.tanh_: "tanh", Tensor.tanh_: "tanh",
    F.softmax: "softmax", torch.softmax: "softmax", Tensor.softmax: "softmax",
    # a ReLU written as clamp(min=0) or maximum(x, 0), a hand-written GELU's erf: nonlinearities the rule
    # would differentiate as usual just the same
    torch.clamp: "clamp", Tensor.clamp: "clamp", torch.clamp_: "clamp", Tensor.clamp_: "clamp",
    torch.clamp_min: "clamp", Tensor.clamp_min: "clamp", torch.clamp_min_: "clamp", Tensor.clamp_min_: "clamp",
    torch.clip: "clamp", Tensor.clip: "clamp", torch.maximum: "maximum", Tensor.maximum: "maximum",
    torch.minimum: "minimum", Tensor.minimum: "minimum", F.threshold: "threshold", F.threshold_: "threshold",
    torch.abs: "abs", Tensor.abs: "abs", torch.erf: "erf", Tensor.erf: "erf",
}


class _ActivationCensus(TorchFunctionMode):
    """Counts the calls of ``_OTHER_ACTIVATIONS`` in a forward (modules and functional calls alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _OTHER_ACTIVATIONS.get(func)
        if name is not None:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def other_activations(model: nn.Module, x: Tensor) -> dict[str, int]:
    """{activation: calls} of the nonlinearities other than ReLU that one forward of ``x[:1]`` runs."""
    census = _ActivationCensus()
    with torch.no_grad(), evaluation(model), census:
        run_model(model, x[:1])
    return dict(sorted(census.counts.items()))


def _traced_forward(model: nn.Module, example_input: Tensor, handles: list) -> None:
    """One no-grad eval-mode forward of the first image with the given hooks, removed afterwards."""
    try:
        with torch.no_grad(), evaluation(model), ReLURouting():
            run_model(model, example_input[:1])
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Trace:
    """What one forward of one image ran: every module call (not the model's own) in finishing order, with
    its output's shape (or type name), and where each ``nn.MultiheadAttention`` call started. One trace
    serves both ``default_cam_layer`` and ``cam_layout``."""

    names: list[str] = field(default_factory=list)
    outputs: list[tuple[int, ...] | str] = field(default_factory=list)
    attention_starts: list[int] = field(default_factory=list)  # positions in ``names`` when each started

    def spatial(self, i: int) -> bool:
        """Is call i's output B×K×h×w with h·w > 1?"""
        shape = self.outputs[i]
        return isinstance(shape, tuple) and len(shape) == 4 and shape[-2] * shape[-1] > 1

    def tokens(self, i: int) -> bool:
        """Is call i's output a grid of tokens B×N×K (N = g², or g² + 1 with a class token)?"""
        shape = self.outputs[i]
        return isinstance(shape, tuple) and len(shape) == 3 and grid_side(shape[1]) is not None


def _recording_hooks(model: nn.Module, trace: Trace, keep=None) -> list:
    """Hooks that append every module call (not the model's own) to ``trace``; ``keep(name, module, output)``,
    where given, also sees each call."""
    def record(name: str):
        def hook(module, _inputs, output):
            trace.names.append(name)
            trace.outputs.append(tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__)
            if keep is not None:
                keep(name, module, output)
        return hook

    modules = {name: m for name, m in model.named_modules() if name}
    handles = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    handles += [m.register_forward_pre_hook(lambda *_: trace.attention_starts.append(len(trace.names)))
                for m in modules.values() if isinstance(m, nn.MultiheadAttention)]
    return handles


def trace_forward(model: nn.Module, example_input: Tensor) -> Trace:
    """Every module call of one forward of ``example_input[:1]`` (no gradients, eval mode, hooks removed)."""
    trace = Trace()
    _traced_forward(model, example_input, _recording_hooks(model, trace))
    return trace


class FindingTrace:
    """Finds the CAM layer and its layout in a pass's own forward (``saliency.passes.LayerFinder``), so that
    ``explain`` needs no forward of its own to find them (issue 21: a one-image trace cost 0.1–0.2× of a
    batch-8 pass of resnet18).

    The forward is traced as ``trace_forward`` traces one image, and the last output of every call that
    could still become the layer is kept: without a transformer's attention, nothing that finished before
    the latest ``nn.Conv2d`` call can (``default_cam_layer``'s rule), so those are let go as the forward runs.
    The layer's output is handed back only if nothing changed it in place after its call (its version is
    unchanged); otherwise the pass is run again with the layer named."""

    def __init__(self, layout: str | None = None):
        self.layout = layout
        self.trace = Trace()
        self._outputs: dict[str, tuple[Tensor, int]] = {}
        self._prune = True

    def attach(self, model: nn.Module) -> list:
        self._prune = not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        return _recording_hooks(model, self.trace, self._keep)

    def _keep(self, name: str, module: nn.Module, output) -> None:
        if self._prune and isinstance(module, nn.Conv2d):
            self._outputs.clear()
        if isinstance(output, Tensor):
            self._outputs[name] = (output, output._version)

    def found(self, model: nn.Module, x: Tensor) -> tuple[str, str, Tensor | None]:
        """(layer, layout, its output in this forward, or None where it was changed in place since)."""
        layer = default_cam_layer(model, x, self.trace)
        check_layer(model, layer)
        layout = self.layout or cam_layout(model, x, layer, self.trace)
        output, version = self._outputs.get(layer, (None, None))
        self._outputs.clear()
        return layer, layout, output if output is not None and output._version == version else None


def default_cam_layer(model: nn.Module, example_input: Tensor, trace: Trace | None = None) -> str:
    """The rectified output of the last convolutional block (SPEC §1.2), found by tracing one forward
    (``trace``: one already taken of this model and input).

    Rule: take the last executed ``nn.Conv2d``; among the modules that contain it (not the model
    itself), the outermost whose output is B×K×h×w with h·w > 1 (torchvision ResNet ``layer4``,
    VGG/AlexNet ``features``, the reference models' ``features``/``layer3``). When the conv sits directly
    in the model (a flat Sequential), the last module run after it with such an output (its ReLU or
    pool). Never the conv's own pre-BatchNorm/pre-ReLU output unless nothing follows it. A transformer
    (``nn.MultiheadAttention`` modules run): the token output that feeds its last attention (ViT: the last
    block's ``ln_1``, pytorch-grad-cam's documented choice — after it only the class token reaches the
    classifier, so patch tokens get no gradient).
    """
    trace = trace_forward(model, example_input) if trace is None else trace
    modules = dict(model.named_modules())
    calls = range(len(trace.names))
    starts = trace.attention_starts
    feeding = [i for i in calls if trace.tokens(i) and starts and i < starts[-1]]
    if feeding:
        return trace.names[max(feeding)]
    conv_calls = [i for i in calls if isinstance(modules[trace.names[i]], nn.Conv2d)]
    if not conv_calls:
        raise ValueError("CAM methods need a convolutional layer, and the model runs no nn.Conv2d; "
                         "pass layer=<module name>")
    last = conv_calls[-1]
    conv = trace.names[last]
    last_call = {trace.names[i]: i for i in calls if trace.spatial(i)}
    parts = conv.split(".")
    for depth in range(1, len(parts)):
        ancestor = ".".join(parts[:depth])
        if last_call.get(ancestor, -1) > last:
            return ancestor
    after = [trace.names[i] for i in calls[last + 1:] if trace.spatial(i)]
    return after[-1] if after else conv


def cam_layout(model: nn.Module, example_input: Tensor, layer: str, trace: Trace | None = None) -> str:
    """The layout of ``layer``'s output (``LAYER_LAYOUTS``), from one traced forward (``trace``: one already
    taken): 3-D outputs whose N is g² (+1) are tokens; a 4-D output is channels-first when its last two
    sizes fit in the input (1×1 included) and its channels do not, channels-last when the reverse holds
    (h·w > 1); when both fit, channels-last only if the last module run inside the layer works on the last
    axis (LayerNorm, Linear). Anything else is refused, naming the layer."""
    trace = trace_forward(model, example_input) if trace is None else trace
    modules = dict(model.named_modules())
    leaves = {name for name, m in modules[layer].named_modules(prefix=layer) if not list(m.children())}
    shape = next((trace.outputs[i] for i in reversed(range(len(trace.names))) if trace.names[i] == layer), None)
    last = next((modules[name] for name in reversed(trace.names) if name in leaves), None)
    height, width = example_input.shape[-2:]
    if isinstance(shape, tuple) and len(shape) == 3 and grid_side(shape[1]) is not None:
        return "tokens"
    if isinstance(shape, tuple) and len(shape) == 4:
        _, a, b, c = shape
        first = b <= height and c <= width
        channels_last = a * b > 1 and a <= height and b <= width
        if channels_last and (not first or isinstance(last, (nn.LayerNorm, nn.Linear))):
            return "channels_last"
        if first:
            return "channels_first"
    raise ValueError(f"the layout of the output of layer {layer!r}, {shape}, cannot be established (channels-first "
                     f"B×K×h×w, channels-last B×h×w×K or B×tokens×K); pass another layer (config: model.layer) "
                     f"or declare its layout (layer_layout)")


def check_layer(model: nn.Module, layer: str) -> None:
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise ValueError(f"unknown layer {layer!r}; convolutional layers of this model: "
                         f"{', '.join(convs[-8:])}{' …' if len(convs) > 8 else ''}")
    if isinstance(modules[layer], (nn.Linear, nn.BatchNorm1d, nn.Flatten, nn.Dropout)):
        raise ValueError(f"layer {layer!r} is a {type(modules[layer]).__name__}, not a convolutional "
                         f"layer; CAM methods need a layer whose output is B×K×h×w")


