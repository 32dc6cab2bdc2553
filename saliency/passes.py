"""The pass machinery: one forward and one batched backward, with hooks and a ReLU backward rule.

All hook handling lives here. The user's model is only ever touched through forward hooks that are
removed in ``finally`` and through the train/eval flags, which are restored in ``finally``: after a
pass returns or raises, the model is bit-identical and hook-free. ReLUs are routed through a
``TorchFunctionMode`` instead of module hooks, so in-place ReLUs, ReLU modules reused within one
forward (torchvision's Bottleneck) and functional ``F.relu`` calls are all handled the same way. The
rules themselves (guided backprop, deconvnet, RectGrad) are code in ``saliency.methods.propagation``;
this module knows only the plain gradient.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from saliency.choices import choice_error
from saliency.prefix import ForwardDiffers, FrozenPrefix, answered, check_calls

CHANNEL_REDUCTIONS = ("sum", "abs_sum", "abs_max", "none")
BIAS_LAYER_TYPES = (nn.Conv2d, nn.BatchNorm2d)


# --------------------------------------------------------------------------------------------- ReLU rules
class ReLURule(Protocol):
    """A ReLU backward rule (SPEC §1.3): the signal passed to a ReLU's input, given its output ``out``
    and the incoming signal ``grad``. Rules are hashable values, so passes can be cached per rule."""

    def backward(self, out: Tensor, grad: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class GradientRule:
    """The ReLU's true derivative: the plain gradient."""

    def backward(self, out: Tensor, grad: Tensor) -> Tensor:
        return grad * (out > 0)


GRADIENT = GradientRule()


class _RuleReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rule: ReLURule, positive: bool) -> Tensor:  # type: ignore[override]
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        ctx.rule, ctx.positive = rule, positive
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        grad_in = ctx.rule.backward(out, grad)
        if ctx.positive:
            grad_in = grad_in.clamp_min(0)
        return grad_in, None, None


_RELU_FUNCS = {F.relu, torch.relu, Tensor.relu}
_INPLACE_RELU_FUNCS = {F.relu_, torch.relu_, Tensor.relu_}


class _ReLURouting(TorchFunctionMode):
    """Routes every ReLU call (modules, F.relu, torch.relu, Tensor.relu) through one place: makes it
    out-of-place, so captured tensors keep their values and gradients, and, when a rule is given,
    gives it that rule's backward. ``F.relu(x, inplace=True)`` (what ``nn.ReLU(inplace=True)`` calls)
    returns a new tensor, as its callers use the return value; explicit ``relu_`` calls write the
    result back with a differentiable ``copy_``, so code that ignores the return value still works."""

    def __init__(self, rule: ReLURule = GRADIENT, positive: bool = False):
        super().__init__()
        self.rule, self.positive = rule, positive

    def _relu(self, x: Tensor) -> Tensor:
        if self.rule == GRADIENT and not self.positive:
            return torch.relu(x)
        return _RuleReLU.apply(x, self.rule, self.positive)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_FUNCS:
            return self._relu(args[0])
        if func in _INPLACE_RELU_FUNCS:
            return args[0].copy_(self._relu(args[0]))
        return func(*args, **(kwargs or {}))


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


# --------------------------------------------------------------------------------------------- passes
@dataclass
class Pass:
    """What one forward + batched backward produced. Gradients carry a target axis T after the batch."""

    logits: Tensor                       # B×classes
    input_grad: Tensor                   # B×T×C×H×W
    layer_act: Tensor | None = None      # B×K×h×w
    layer_grad: Tensor | None = None     # B×T×K×h×w
    bias_terms: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (bias K, grad B×T×K×h×w)


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (saliency explains the inference model; train-mode BatchNorm would also
    update running statistics) and restore every module's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def implicit_bias(module: nn.Module) -> Tensor | None:
    """The bias a layer adds, read now (randomised models change it): a conv's own bias, or
    BatchNorm in eval mode folded to β − γ·μ/√(σ²+ε)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None:
            return None  # batch statistics: not an affine map, so no implicit bias
        scale = torch.rsqrt(module.running_var + module.eps)
        weight = module.weight if module.weight is not None else torch.ones_like(scale)
        bias = module.bias if module.bias is not None else torch.zeros_like(scale)
        return (bias - module.running_mean * weight * scale).detach()
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, Tensor) else None


def _batched_grad(outputs: Tensor, inputs: list[Tensor], keep_graph: bool = False) -> list[Tensor]:
    """Gradients of each column of ``outputs`` (B×T) w.r.t. ``inputs``, stacked as B×T×…: one
    backward with T batched grad_outputs (vmap); one backward per target where vmap cannot batch.

    On CPU the per-target loop over the retained graph measured faster (resnet18, B=8, T=2, 224²:
    0.33–0.39 s looped vs 0.40–0.54 s batched), so ``run_pass`` batches only on accelerators."""
    batch, num_targets = outputs.shape
    if num_targets == 1:
        return _looped_grad(outputs, inputs, keep_graph)
    eye = torch.eye(num_targets, dtype=outputs.dtype, device=outputs.device)
    grad_outputs = eye[:, None, :].expand(num_targets, batch, num_targets)
    try:
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
    except RuntimeError:  # an op without a vmap rule: one backward per target instead
        return _looped_grad(outputs, inputs, keep_graph)
    return [None if g is None else g.transpose(0, 1) for g in grads]


def run_pass(model: nn.Module, x: Tensor, targets: Tensor, *, layer: str | None = None,
             bias_layers: bool = False, linear_biases: bool = False, rule: ReLURule = GRADIENT,
             positive: bool = False, batched: bool | None = None, prefix: FrozenPrefix | None = None,
             layout: str = "channels_first") -> Pass:
    """One forward and one backward for all targets, capturing what the methods asked for.

    ``targets`` is B×T. ``rule``/``positive`` set the ReLU backward (SPEC §1.3). ``layout``: how the CAM
    layer's output is laid out (``LAYER_LAYOUTS``); its activation and gradient come back B×K×h×w. The model must be in
    eval mode already (``explain`` takes care of it). ``batched`` picks vmap over the T targets
    (default: on accelerators) or one backward per target over the retained graph (default on CPU).
    Custom ReLU rules always loop: their autograd Function has no vmap rule. ``prefix``: module calls
    that finish before the first call of a module changed from the prefix's model are taken from its
    recorded forward instead of run (``saliency.prefix``); the result is the same. A forward that does
    not run as the recorded one did switches the prefix off (logged) and the pass is run whole.
    """
    options = {"layer": layer, "bias_layers": bias_layers, "linear_biases": linear_biases, "rule": rule,
               "positive": positive, "batched": batched, "layout": layout}
    if prefix is not None:
        try:
            return _run_pass(model, x, targets, prefix=prefix, **options)
        except ForwardDiffers as error:
            prefix.disable(str(error))
    return _run_pass(model, x, targets, prefix=None, **options)


def _run_pass(model: nn.Module, x: Tensor, targets: Tensor, *, layer: str | None, bias_layers: bool,
              linear_biases: bool, rule: ReLURule, positive: bool, batched: bool | None,
              prefix: FrozenPrefix | None, layout: str) -> Pass:
    if batched is None:
        batched = x.device.type != "cpu" and rule == GRADIENT and not positive
    captured: dict[str, Tensor] = {}
    bias_calls: list[tuple[Tensor, Tensor]] = []
    handles = []
    kinds = (BIAS_LAYER_TYPES if bias_layers else ()) + ((nn.Linear,) if linear_biases else ())
    # plain input gradients need no routing: the model's own (in-place) ReLUs are faster
    plain = rule == GRADIENT and not positive and layer is None and not kinds
    routing = (lambda: contextlib.nullcontext()) if plain else (lambda: _ReLURouting(rule, positive))

    def forward(model: nn.Module, x: Tensor) -> Tensor:  # as this pass runs it; recorded by the prefix
        with evaluation(model), routing():
            return run_model(model, x)

    reuse = None if prefix is None else prefix.plan(model, x, forward, (rule, positive, plain), layer)

    def capture_layer(_module, _inputs, output):
        if not isinstance(output, Tensor):
            raise ValueError(f"layer {layer!r} returns {type(output).__name__}, not a tensor")
        captured["act"] = output
        return output.clone()  # later in-place ops act on the copy, never on what we differentiate

    def capture_bias(name):
        def hook(module, _inputs, output):
            if reuse is not None and name in reuse.answering:  # a recorded call: its bias is added below
                reuse.answering.discard(name)
                return
            bias = implicit_bias(module)
            if bias is not None and isinstance(output, Tensor):
                bias_calls.append((bias, output))
        return hook

    try:
        if layer is not None:
            handles.append(dict(model.named_modules())[layer].register_forward_hook(capture_layer))
        if kinds:
            for name, module in model.named_modules():
                if isinstance(module, kinds):
                    handles.append(module.register_forward_hook(capture_bias(name)))
        if reuse is not None:  # the recorded calls' biases first: they finished first
            x = reuse.x
            modules = dict(model.named_modules())
            bias_calls += [(bias, call.output) for call in reuse.covered if isinstance(modules[call.name], kinds)
                           and (bias := implicit_bias(modules[call.name])) is not None]
        else:
            x = (x.clone() if x.is_inference() else x).detach().requires_grad_(True)
        with torch.enable_grad(), routing():
            with answered(model, reuse) as calls:
                try:
                    logits = run_model(model, x)
                except Exception as error:  # re-run whole: a real error of the model comes back from there
                    if reuse is None:
                        raise
                    raise ForwardDiffers(f"the forward failed with recorded answers: {error}") from error
            check_calls(reuse, calls)
            if reuse is not None and reuse.layer_output is not None:  # the CAM layer was answered
                captured["act"] = reuse.layer_output
            check_logits(logits)
            check_targets(targets, logits.shape[1], x.shape[0])
            selected = logits.gather(1, targets)
            inputs = [x]
            if layer is not None:
                act = captured.get("act")
                if act is None or as_channels_first(act, layout).dim() != 4:
                    shape = None if act is None else tuple(act.shape)
                    raise ValueError(f"layer {layer!r} gives output of shape {shape}; CAM methods need "
                                     f"a layer whose output is B×K×h×w (or B×h×w×K, or B×tokens×K)")
                inputs.append(act)
            inputs += [out for _, out in bias_calls]
            keep = reuse is not None  # the recorded graph serves the next pass too
            if batched:
                grads = _batched_grad(selected, inputs, keep)
            else:
                grads = _looped_grad(selected, inputs, keep)
    finally:
        for handle in handles:
            handle.remove()
    result = Pass(logits=logits.detach(), input_grad=grads[0])
    rest = grads[1:]
    if layer is not None:
        result.layer_act = as_channels_first(captured["act"].detach(), layout)
        result.layer_grad = as_channels_first(rest[0], layout)
        rest = rest[1:]
    result.bias_terms = [(bias, g) for (bias, _), g in zip(bias_calls, rest) if g is not None]
    return result


def _looped_grad(outputs: Tensor, inputs: list[Tensor], keep_graph: bool = False) -> list[Tensor]:
    """One backward per target column over the same graph (freed after the last unless ``keep_graph``),
    stacked B×T×…"""
    last = outputs.shape[1] - 1
    per_target = [torch.autograd.grad(outputs[:, t].sum(), inputs, retain_graph=keep_graph or t < last,
                                      allow_unused=True)
                  for t in range(outputs.shape[1])]
    return [None if per_target[0][i] is None else torch.stack([p[i] for p in per_target], dim=1)
            for i in range(len(inputs))]


def forward_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits without gradients, in eval mode (for choosing targets)."""
    with torch.no_grad(), evaluation(model), _ReLURouting():
        logits = run_model(model, x)
    check_logits(logits)
    return logits


# --------------------------------------------------------------------------------------------- checks
def check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape B×classes, got {shape}")
    bad = (~torch.isfinite(logits)).any(dim=1)
    if bad.any():
        raise ValueError(f"the model produced non-finite logits (NaN/inf) for images "
                         f"{bad.nonzero().flatten().tolist()}; no maps were computed")


def check_targets(targets: Tensor, num_classes: int, batch: int) -> None:
    if targets.shape[0] != batch:
        raise ValueError(f"targets has {targets.shape[0]} rows but x has {batch} images")
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets must be class indices in [0, {num_classes - 1}], "
                         f"got values from {int(targets.min())} to {int(targets.max())}")


def _input_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return None


class InputShapeError(ValueError, RuntimeError):
    """The model cannot take inputs of this shape (a ValueError, and still the RuntimeError torch raised)."""


_SHAPE_WORDS = ("shape", "size", "channels")


def _traced_forward(model: nn.Module, example_input: Tensor, handles: list) -> None:
    """One no-grad eval-mode forward of the first image with the given hooks, removed afterwards."""
    try:
        with torch.no_grad(), evaluation(model), _ReLURouting():
            run_model(model, example_input[:1])
    finally:
        for handle in handles:
            handle.remove()


def run_model(model: nn.Module, x: Tensor) -> Tensor:
    """model(x), with torch's shape errors turned into a message that names the input's size (the
    model's other errors pass unchanged)."""
    try:
        return model(x)
    except RuntimeError as error:
        if not any(word in str(error) for word in _SHAPE_WORDS):
            raise
        size = "×".join(map(str, x.shape[1:]))
        raise InputShapeError(f"the model cannot run on images of size {size} (C×H×W) ({error}); is this the "
                         "input size, channels and device the model expects?") from error


def check_input(model: nn.Module, x: Tensor) -> None:
    """Refuse what would reach torch's own errors or give meaningless maps: no autograd, wrong dtype,
    rank or channels, non-finite pixels."""
    if torch.is_inference_mode_enabled():
        raise ValueError("saliency maps need autograd, which torch.inference_mode() switches off: call "
                         "explain outside it (torch.no_grad() is fine)")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor B×C×H×W, got {getattr(x, 'dtype', type(x).__name__)}")
    first = next(model.parameters(), None)
    if first is not None and x.dtype != first.dtype:
        raise ValueError(f"x is {x.dtype} but the model's parameters are {first.dtype}; convert one of them "
                         f"(e.g. x.to({first.dtype}))")
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dimensions B×C×H×W, got shape {tuple(x.shape)}")
    channels = _input_channels(model)
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"x has {x.shape[1]} channels but the model's first convolution expects "
                         f"{channels}")
    bad = (~torch.isfinite(x)).flatten(1).any(dim=1)
    if bad.any():
        raise ValueError(f"x has NaN/Inf pixels in images {bad.nonzero().flatten().tolist()}; no maps were "
                         "computed")


def normalize_targets(targets, batch: int, device: torch.device) -> Tensor:
    """B or B×T class indices → LongTensor B×T."""
    t = torch.as_tensor(targets, device=device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != batch or t.shape[1] == 0:
        raise ValueError(f"targets must have shape B or B×T with B = {batch} and T ≥ 1, "
                         f"got {tuple(t.shape)}")
    return t.long()


def default_cam_layer(model: nn.Module, example_input: Tensor) -> str:
    """The rectified output of the last convolutional block (SPEC §1.2), found by tracing one forward.

    Rule: take the last executed ``nn.Conv2d``; among the modules that contain it (not the model
    itself), the outermost whose output is B×K×h×w with h·w > 1 (torchvision ResNet ``layer4``,
    VGG/AlexNet ``features``, the reference models' ``features``/``layer3``). When the conv sits directly
    in the model (a flat Sequential), the last module run after it with such an output (its ReLU or
    pool). Never the conv's own pre-BatchNorm/pre-ReLU output unless nothing follows it. A transformer
    (``nn.MultiheadAttention`` modules run): the token output that feeds its last attention (ViT: the last
    block's ``ln_1``, pytorch-grad-cam's documented choice — after it only the class token reaches the
    classifier, so patch tokens get no gradient).
    """
    modules = {name: m for name, m in model.named_modules() if name}
    calls: list[tuple[str, bool]] = []  # (module name, output is B×K×h×w with h·w > 1), in finishing order
    tokens: set[int] = set()  # positions in ``calls`` of outputs that are a grid of tokens
    attention_starts: list[int] = []

    def record(name: str):
        def hook(_module, _inputs, output):
            spatial = isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1
            if isinstance(output, Tensor) and output.dim() == 3 and _grid_side(output.shape[1]) is not None:
                tokens.add(len(calls))
            calls.append((name, spatial))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    handles += [m.register_forward_pre_hook(lambda *_: attention_starts.append(len(calls)))
                for m in modules.values() if isinstance(m, nn.MultiheadAttention)]
    _traced_forward(model, example_input, handles)
    feeding = [i for i in tokens if attention_starts and i < attention_starts[-1]]
    if feeding:
        return calls[max(feeding)][0]
    conv_calls = [i for i, (name, _) in enumerate(calls) if isinstance(modules[name], nn.Conv2d)]
    if not conv_calls:
        raise ValueError("CAM methods need a convolutional layer, and the model runs no nn.Conv2d; "
                         "pass layer=<module name>")
    last = conv_calls[-1]
    conv = calls[last][0]
    last_call = {name: i for i, (name, spatial) in enumerate(calls) if spatial}
    parts = conv.split(".")
    for depth in range(1, len(parts)):
        ancestor = ".".join(parts[:depth])
        if last_call.get(ancestor, -1) > last:
            return ancestor
    after = [name for name, spatial in calls[last + 1:] if spatial]
    return after[-1] if after else conv


LAYER_LAYOUTS = ("channels_first", "channels_last", "tokens")
"""How a CAM layer's output is laid out: B×K×h×w (CNNs), B×h×w×K (torchvision's Swin), or B×N×K tokens
of a g×g patch grid, N = g² or g² + 1 with a class token first (ViT)."""


def as_channels_first(values: Tensor, layout: str) -> Tensor:
    """…×K×h×w from a layer output (or its gradient, with a target axis after the batch) in ``layout``:
    channels-last is permuted; tokens drop the class token (when N = g² + 1) and become a g×g grid, as
    pytorch-grad-cam's documented ``reshape_transform`` for ViT and Swin does."""
    if layout == "channels_first":
        return values
    if layout == "channels_last":
        return values.movedim(-1, -3)
    tokens = values.shape[-2]
    side = _grid_side(tokens)
    if side is None:
        raise ValueError(f"{tokens} tokens are not a square grid of patches (with or without a class token)")
    grid = values[..., tokens - side * side:, :]
    return grid.reshape(*values.shape[:-2], side, side, values.shape[-1]).movedim(-1, -3)


def _grid_side(tokens: int) -> int | None:
    for patches in (tokens, tokens - 1):
        side = math.isqrt(max(patches, 0))
        if side > 1 and side * side == patches:
            return side
    return None


def cam_layout(model: nn.Module, example_input: Tensor, layer: str) -> str:
    """The layout of ``layer``'s output (``LAYER_LAYOUTS``), from one traced forward: 3-D outputs whose
    N is g² (+1) are tokens; a 4-D output is channels-first when its last two sizes fit in the input
    (1×1 included) and its channels do not, channels-last when the reverse holds (h·w > 1); when both fit,
    channels-last only if
    the last module run inside the layer works on the last axis (LayerNorm, Linear). Anything else is
    refused, naming the layer."""
    module = dict(model.named_modules())[layer]
    seen: dict[str, object] = {}

    def leaf(child, _inputs, _output):
        seen["last"] = child

    def output(_module, _inputs, out):
        seen["shape"] = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__

    handles = [m.register_forward_hook(leaf) for m in module.modules() if not list(m.children())]
    handles.append(module.register_forward_hook(output))
    _traced_forward(model, example_input, handles)
    shape, (height, width) = seen.get("shape"), example_input.shape[-2:]
    if isinstance(shape, tuple) and len(shape) == 3 and _grid_side(shape[1]) is not None:
        return "tokens"
    if isinstance(shape, tuple) and len(shape) == 4:
        _, a, b, c = shape
        first = b <= height and c <= width
        last = a * b > 1 and a <= height and b <= width
        if last and (not first or isinstance(seen.get("last"), (nn.LayerNorm, nn.Linear))):
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


# --------------------------------------------------------------------------------------------- helpers
def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of …×h×w maps to size (half-pixel centres, like cv2.resize)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=size, mode="bilinear",
                        align_corners=False)
    return out.reshape(*lead, *size)


def reduce_channels(maps: Tensor, how: str) -> Tensor:
    """B×T×C×H×W → B×T×H×W (or kept, for "none")."""
    if how == "sum":
        return maps.sum(dim=2)
    if how == "abs_sum":
        return maps.abs().sum(dim=2)
    if how == "abs_max":
        return maps.abs().amax(dim=2)
    if how == "none":
        return maps
    raise choice_error("channel_reduction", how, CHANNEL_REDUCTIONS)
