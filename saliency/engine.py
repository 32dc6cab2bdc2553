"""One forward, one batched backward, many methods and many targets.

All hook handling lives here. The user's model is only ever touched through forward hooks that are
removed in ``finally`` and through the train/eval flags, which are restored in ``finally``: after
``explain`` returns or raises, the model is bit-identical and hook-free. ReLUs are routed through a
``TorchFunctionMode`` instead of module hooks, so in-place ReLUs, ReLU modules reused within one
forward (torchvision's Bottleneck) and functional ``F.relu`` calls are all handled the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

CHANNEL_REDUCTIONS = ("sum", "abs_sum", "abs_max", "none")
PROPAGATION_POLICIES = ("signed", "pos")
BIAS_LAYER_TYPES = (nn.Conv2d, nn.BatchNorm2d)


# --------------------------------------------------------------------------------------------- ReLU rules
def _row_percentile(values: Tensor, q: float) -> Tensor:
    """Per-sample q-th percentile over all but the first dim, as the RectGrad reference computes it:
    ``tf.contrib.distributions.percentile``'s default "nearest" interpolation, i.e. the element at
    index round((d − 1)·(1 − q/100)) (float64, round half to even, clipped to [0, d − 1]) of the row
    sorted in descending order. Always an element of the row; no interpolation (≠ numpy's "linear",
    and ≠ numpy's "nearest" where the rounding hits a tie)."""
    flat = values.flatten(1)
    d = flat.shape[1]
    index = min(max(int(round((d - 1) * (1.0 - float(q) / 100.0))), 0), d - 1)  # round: half to even
    # descending index i is ascending index d − 1 − i; kthvalue counts from 1
    tau = flat.kthvalue(d - index, dim=1).values
    return tau.view(-1, *([1] * (values.dim() - 1)))


def _relu_backward(rule: str, out: Tensor, grad: Tensor, q: float) -> Tensor:
    """The backward signal through a ReLU under a propagation rule (SPEC §1.3); ``out`` = ReLU output."""
    if rule == "gradient":
        return grad * (out > 0)
    if rule == "guided_backprop":
        return grad.clamp_min(0) * (out > 0)
    if rule == "deconvnet":
        return grad.clamp_min(0)
    if rule in ("rectgrad", "rectgrad_abs"):
        # Kim et al. 2019 reference (DeepExplain RectifiedGradient.nonlinearity_grad_override):
        # a·R = ReLU output × incoming gradient, thresholded strictly at its per-image percentile;
        # R passes unchanged where a·R > τ (no extra ReLU-derivative factor), zero elsewhere.
        score = out * grad
        if rule == "rectgrad_abs":  # non-positive control: threshold |a·R| instead
            score = score.abs()
        return torch.where(score > _row_percentile(score, q), grad, torch.zeros_like(grad))
    raise ValueError(f"unknown ReLU rule {rule!r}")


class _RuleReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rule: str, positive: bool, q: float) -> Tensor:  # type: ignore[override]
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        ctx.rule, ctx.positive, ctx.q = rule, positive, q
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        grad_in = _relu_backward(ctx.rule, out, grad, ctx.q)
        if ctx.positive:
            grad_in = grad_in.clamp_min(0)
        return grad_in, None, None, None


_RELU_FUNCS = {F.relu, torch.relu, Tensor.relu}
_INPLACE_RELU_FUNCS = {F.relu_, torch.relu_, Tensor.relu_}


class _ReLURouting(TorchFunctionMode):
    """Routes every ReLU call (modules, F.relu, torch.relu, Tensor.relu) through one place: makes it
    out-of-place, so captured tensors keep their values and gradients, and, when a rule is given,
    gives it that rule's backward. ``F.relu(x, inplace=True)`` (what ``nn.ReLU(inplace=True)`` calls)
    returns a new tensor, as its callers use the return value; explicit ``relu_`` calls write the
    result back with a differentiable ``copy_``, so code that ignores the return value still works."""

    def __init__(self, rule: str = "gradient", positive: bool = False, q: float = 98.0):
        super().__init__()
        self.rule, self.positive, self.q = rule, positive, q

    def _relu(self, x: Tensor) -> Tensor:
        if self.rule == "gradient" and not self.positive:
            return torch.relu(x)
        return _RuleReLU.apply(x, self.rule, self.positive, self.q)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_FUNCS:
            return self._relu(args[0])
        if func in _INPLACE_RELU_FUNCS:
            return args[0].copy_(self._relu(args[0]))
        return func(*args, **(kwargs or {}))


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


def _batched_grad(outputs: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """Gradients of each column of ``outputs`` (B×T) w.r.t. ``inputs``, stacked as B×T×…: one
    backward with T batched grad_outputs (vmap); one backward per target where vmap cannot batch.

    On CPU the per-target loop over the retained graph measured faster (resnet18, B=8, T=2, 224²:
    0.33–0.39 s looped vs 0.40–0.54 s batched), so ``run_pass`` batches only on accelerators."""
    batch, num_targets = outputs.shape
    if num_targets == 1:
        return _looped_grad(outputs, inputs)
    eye = torch.eye(num_targets, dtype=outputs.dtype, device=outputs.device)
    grad_outputs = eye[:, None, :].expand(num_targets, batch, num_targets)
    try:
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
    except RuntimeError:  # an op without a vmap rule: one backward per target instead
        return _looped_grad(outputs, inputs)
    return [None if g is None else g.transpose(0, 1) for g in grads]


def run_pass(model: nn.Module, x: Tensor, targets: Tensor, *, layer: str | None = None,
             bias_layers: bool = False, linear_biases: bool = False, rule: str = "gradient",
             positive: bool = False, rectgrad_q: float = 98.0, batched: bool | None = None) -> Pass:
    """One forward and one backward for all targets, capturing what the methods asked for.

    ``targets`` is B×T. ``rule``/``positive`` set the ReLU backward (SPEC §1.3). The model must be in
    eval mode already (``explain`` takes care of it). ``batched`` picks vmap over the T targets
    (default: on accelerators) or one backward per target over the retained graph (default on CPU).
    Custom ReLU rules always loop: their autograd Function has no vmap rule.
    """
    if batched is None:
        batched = x.device.type != "cpu" and rule == "gradient" and not positive
    captured: dict[str, Tensor] = {}
    bias_calls: list[tuple[Tensor, Tensor]] = []
    handles = []

    def capture_layer(_module, _inputs, output):
        if not isinstance(output, Tensor):
            raise ValueError(f"layer {layer!r} returns {type(output).__name__}, not a tensor")
        captured["act"] = output
        return output.clone()  # later in-place ops act on the copy, never on what we differentiate

    def capture_bias(module, _inputs, output):
        bias = implicit_bias(module)
        if bias is not None and isinstance(output, Tensor):
            bias_calls.append((bias, output))

    try:
        if layer is not None:
            handles.append(dict(model.named_modules())[layer].register_forward_hook(capture_layer))
        kinds = (BIAS_LAYER_TYPES if bias_layers else ()) + ((nn.Linear,) if linear_biases else ())
        if kinds:
            for module in model.modules():
                if isinstance(module, kinds):
                    handles.append(module.register_forward_hook(capture_bias))
        x = x.detach().requires_grad_(True)
        # plain input gradients need no routing: the model's own (in-place) ReLUs are faster
        plain = rule == "gradient" and not positive and layer is None and not handles
        routing = contextlib.nullcontext() if plain else _ReLURouting(rule, positive, rectgrad_q)
        with torch.enable_grad(), routing:
            logits = model(x)
            check_logits(logits)
            check_targets(targets, logits.shape[1], x.shape[0])
            selected = logits.gather(1, targets)
            inputs = [x]
            if layer is not None:
                act = captured.get("act")
                if act is None or act.dim() != 4:
                    shape = None if act is None else tuple(act.shape)
                    raise ValueError(f"layer {layer!r} gives output of shape {shape}; CAM methods need "
                                     f"a convolutional layer whose output is B×K×h×w")
                inputs.append(act)
            inputs += [out for _, out in bias_calls]
            if batched:
                grads = _batched_grad(selected, inputs)
            else:
                grads = _looped_grad(selected, inputs)
    finally:
        for handle in handles:
            handle.remove()
    result = Pass(logits=logits.detach(), input_grad=grads[0])
    rest = grads[1:]
    if layer is not None:
        result.layer_act, result.layer_grad = captured["act"].detach(), rest[0]
        rest = rest[1:]
    result.bias_terms = [(bias, g) for (bias, _), g in zip(bias_calls, rest) if g is not None]
    return result


def _looped_grad(outputs: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """One backward per target column over the same graph (freed after the last), stacked B×T×…"""
    last = outputs.shape[1] - 1
    per_target = [torch.autograd.grad(outputs[:, t].sum(), inputs, retain_graph=t < last, allow_unused=True)
                  for t in range(outputs.shape[1])]
    return [None if per_target[0][i] is None else torch.stack([p[i] for p in per_target], dim=1)
            for i in range(len(inputs))]


def forward_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits without gradients, in eval mode (for choosing targets)."""
    with torch.no_grad(), evaluation(model), _ReLURouting():
        logits = model(x)
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


def check_input(model: nn.Module, x: Tensor) -> None:
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
    pool). Never the conv's own pre-BatchNorm/pre-ReLU output unless nothing follows it.
    """
    modules = {name: m for name, m in model.named_modules() if name}
    calls: list[tuple[str, bool]] = []  # (module name, output is B×K×h×w with h·w > 1), in finishing order

    def record(name: str):
        def hook(_module, _inputs, output):
            spatial = isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1
            calls.append((name, spatial))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    try:
        with torch.no_grad(), evaluation(model), _ReLURouting():
            model(example_input[:1])
    finally:
        for handle in handles:
            handle.remove()
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


def cam_layer(model: nn.Module, x: Tensor, methods: Sequence[str], layer: str | None = None) -> str | None:
    """The CAM layer ``explain`` uses for ``methods`` on ``x``: ``layer`` (checked), else
    ``default_cam_layer``; ``layer`` unchanged when no method needs one. Resolve it once for many calls."""
    from saliency.methods import get_method  # the methods import this module

    if not any(get_method(m).needs_layer for m in methods):
        return layer
    layer = default_cam_layer(model, x) if layer is None else layer
    check_layer(model, layer)
    return layer


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
    raise ValueError(f"unknown channel_reduction {how!r}; allowed: {', '.join(CHANNEL_REDUCTIONS)}")


# --------------------------------------------------------------------------------------------- context
@dataclass
class Options:
    layer: str | None = None
    channel_reduction: str = "sum"
    propagation: str = "signed"
    relu_map: bool = False
    seed: int = 0
    ig_steps: int = 32
    ig_baseline: Tensor | float | None = None
    sg_samples: int = 16
    sg_noise: float = 0.15
    rectgrad_q: float = 98.0
    internal_batch_size: int | None = None


class Context:
    """One explain call: the inputs, the options, and the passes shared between methods (cached)."""

    def __init__(self, model: nn.Module, x: Tensor, targets: Tensor, options: Options,
                 needs_layer: bool, needs_biases: bool):
        self.model, self.x, self.targets, self.options = model, x, targets, options
        self._needs_layer, self._needs_biases = needs_layer, needs_biases
        self._passes: dict[tuple, Pass] = {}

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.x.shape[-2:])  # type: ignore[return-value]

    @property
    def positive_propagation(self) -> bool:
        return self.options.propagation == "pos"

    def shared_pass(self) -> Pass:
        """The plain-gradient pass that serves gradient, input×gradient and every CAM variant."""
        key = ("shared",)
        if key not in self._passes:
            self._passes[key] = run_pass(
                self.model, self.x, self.targets,
                layer=self.options.layer if self._needs_layer else None,
                bias_layers=self._needs_biases, positive=self.positive_propagation,
                rectgrad_q=self.options.rectgrad_q)
        return self._passes[key]

    def rule_pass(self, rule: str) -> Pass:
        """Input gradients under a modified ReLU backward (guided backprop, deconvnet, rectgrad)."""
        key = ("rule", rule)
        if key not in self._passes:
            self._passes[key] = run_pass(self.model, self.x, self.targets, rule=rule,
                                         positive=self.positive_propagation,
                                         rectgrad_q=self.options.rectgrad_q)
        return self._passes[key]

    def gradients_at(self, inputs: Tensor, repeats: int) -> Tensor:
        """Input gradients at ``repeats`` perturbed copies of the batch, laid out (repeats·B)×C×H×W
        with the copy index outermost; returns repeats×B×T×C×H×W.

        Chunked by ``internal_batch_size`` images. Default on CPU: about 1.2 M input values per chunk,
        at most 128 images, where small chunks measured fastest (resnet18 at 224², IG 32 steps × 8
        images: 6.9 s in chunks of 8, 9.1 s of 32, 11 s of 64; reference CNN at 28²: 0.79 s in chunks
        of 128, 1.1 s of 256, 1.7 s of 1024); on accelerators 32 M values, at most 1024 images."""
        batch = self.x.shape[0]
        targets = self.targets.repeat(repeats, 1)
        budget, most = (1_200_000, 128) if inputs.device.type == "cpu" else (32_000_000, 1024)
        chunk = self.options.internal_batch_size or min(most, max(1, budget // inputs[0].numel()))
        grads = []
        for start in range(0, inputs.shape[0], chunk):
            p = run_pass(self.model, inputs[start:start + chunk], targets[start:start + chunk],
                         positive=self.positive_propagation)
            grads.append(p.input_grad)
        return torch.cat(grads).reshape(repeats, batch, *grads[0].shape[1:])


# --------------------------------------------------------------------------------------------- explain
def explain(model: nn.Module, x: Tensor, methods: str | Sequence[str], targets=None,
            layer: str | None = None, *, channel_reduction: str = "sum", propagation: str = "signed",
            relu_map: bool = False, seed: int = 0, ig_steps: int = 32, ig_baseline=None,
            sg_samples: int = 16, sg_noise: float = 0.15, rectgrad_q: float = 98.0,
            internal_batch_size: int | None = None) -> dict[str, Tensor]:
    """Saliency maps of ``model`` for ``x`` (B×C×H×W) and ``targets`` (B or B×T; None = top class).

    Returns {method id: float32 B×T×H×W} — raw and signed, at input resolution, on x's device
    (B×T×C×H×W for input-space methods when ``channel_reduction="none"``; CAM-style maps then get C=1).
    Methods that need the same forward/backward share it. The model is left unchanged.
    Options: ``layer`` (CAM layer, default ``default_cam_layer``: the rectified output of the last
    convolutional block), ``propagation`` ("pos" = only positive
    signal back through every ReLU), ``relu_map`` (final ReLU on CAMs), ``seed`` (SmoothGrad noise,
    random control), ``ig_steps``/``ig_baseline``, ``sg_samples``/``sg_noise`` (σ as a fraction of
    each image's range), ``rectgrad_q`` (percentile), ``internal_batch_size`` (images per chunk for
    IG/SmoothGrad; None = automatic).
    """
    from saliency.methods import get_method  # the methods import this module

    method_ids = [methods] if isinstance(methods, str) else list(methods)
    if not method_ids:
        raise ValueError("methods is empty; see saliency.available_methods()")
    duplicates = sorted({m for m in method_ids if method_ids.count(m) > 1})
    if duplicates:
        raise ValueError(f"method ids listed more than once: {duplicates}")
    resolved = [get_method(m) for m in method_ids]
    if channel_reduction not in CHANNEL_REDUCTIONS:
        raise ValueError(f"unknown channel_reduction {channel_reduction!r}; allowed: "
                         f"{', '.join(CHANNEL_REDUCTIONS)}")
    if propagation not in PROPAGATION_POLICIES:
        raise ValueError(f"unknown propagation {propagation!r}; allowed: {', '.join(PROPAGATION_POLICIES)}")
    if internal_batch_size is not None and internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be ≥ 1 (or None for automatic), got {internal_batch_size}")
    if not 0.0 <= rectgrad_q <= 100.0:
        raise ValueError(f"rectgrad_q must be a percentile in [0, 100], got {rectgrad_q}")
    check_input(model, x)
    layer = cam_layer(model, x, method_ids, layer)
    needs_layer = any(m.needs_layer for m in resolved)
    with evaluation(model):
        if targets is None:
            targets = forward_logits(model, x).argmax(dim=1)
        target_matrix = normalize_targets(targets, x.shape[0], x.device)
        options = Options(layer=layer, channel_reduction=channel_reduction, propagation=propagation,
                          relu_map=relu_map, seed=seed, ig_steps=ig_steps, ig_baseline=ig_baseline,
                          sg_samples=sg_samples, sg_noise=sg_noise, rectgrad_q=rectgrad_q,
                          internal_batch_size=internal_batch_size)
        ctx = Context(model, x, target_matrix, options, needs_layer,
                      any(m.needs_biases for m in resolved))
        maps: dict[str, Tensor] = {}
        for method_id, method in zip(method_ids, resolved):
            result = method.compute(ctx)
            if result.dim() == 5:
                result = reduce_channels(result, channel_reduction)
            elif channel_reduction == "none":
                result = result.unsqueeze(2)
            maps[method_id] = result.detach().to(torch.float32)
    return maps


