"""The pass machinery: one forward and one batched backward, with hooks and a ReLU backward rule.

All hook handling of a pass lives here (``saliency.layers``' one-image traces remove theirs too). The user's model is only ever touched through forward hooks that are
removed in ``finally`` and through the train/eval flags, which are restored in ``finally``: after a
pass returns or raises, the model is bit-identical and hook-free. ReLUs are routed through a
``TorchFunctionMode`` instead of module hooks, so in-place ReLUs, ReLU modules reused within one
forward (torchvision's Bottleneck) and functional ``F.relu`` calls are all handled the same way. The
rules themselves (guided backprop, deconvnet, RectGrad) are code in ``saliency.methods.propagation``;
this module knows only the plain gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from saliency.checks import check_logits, check_targets, run_model
from saliency.prefix import ForwardDiffers, FrozenPrefix, answered, check_calls
from saliency.reshape import as_channels_first

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


class ReLURouting(TorchFunctionMode):
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


# --------------------------------------------------------------------------------------------- passes
@dataclass
class Pass:
    """What one forward + batched backward produced. Gradients carry a target axis T after the batch."""

    logits: Tensor                       # B×classes
    input_grad: Tensor                   # B×T×C×H×W
    layer_act: Tensor | None = None      # B×K×h×w
    layer_grad: Tensor | None = None     # B×T×K×h×w
    bias_terms: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (bias K, grad B×T×K×h×w)
    bias_reduced: dict[Hashable, list[tuple[Tensor, ...]]] = field(default_factory=dict)  # key → per layer call
    layer: str | None = None             # the CAM layer, and how its output is laid out
    layout: str | None = None


class LayerFinder(Protocol):
    """Finds the CAM layer in a pass's own forward (``saliency.layers.FindingTrace``): ``attach`` hooks the
    model (the pass removes the handles); after the forward, ``found`` says the layer, its layout, and its
    output in this forward (None where that output cannot be differentiated: the pass then runs again with
    the layer named)."""

    def attach(self, model: nn.Module) -> list: ...

    def found(self, model: nn.Module, x: Tensor) -> tuple[str, str, Tensor | None]: ...


#: What a method keeps of each bias term b ⊙ ∇_b y (B×T×K×h×w): a few tensors B×T×… per term. A function of
#: each image's term alone, so it can be computed image chunk by image chunk while the backward runs.
BiasReduction = Callable[[Tensor], tuple[Tensor, ...]]

#: Values of one bias term reduced at a time on CPU: chunks of whole images stay in the cache (resnet18's 20
#: BatchNorm terms, batch 8, 2 targets, FullGrad's four sign parts: 37 ms whole, 29 ms per target, 24 ms in
#: chunks of 1 M values, 38 ms of 256 k; results bit-identical)
REDUCTION_CHUNK = 1_000_000


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
             layout: str = "channels_first", bias_reductions: Mapping[Hashable, BiasReduction] | None = None,
             find_layer: LayerFinder | None = None) -> Pass:
    """One forward and one backward for all targets, capturing what the methods asked for.

    ``targets`` is B×T. ``rule``/``positive`` set the ReLU backward (SPEC §1.3). ``layout``: how the CAM
    layer's output is laid out (``LAYER_LAYOUTS``); its activation and gradient come back B×K×h×w. The model must be in
    eval mode already (``explain`` takes care of it). ``batched`` picks vmap over the T targets
    (default: on accelerators) or one backward per target over the retained graph (default on CPU).
    Custom ReLU rules always loop: their autograd Function has no vmap rule. ``prefix``: module calls
    that finish before the first call of a module changed from the prefix's model are taken from its
    recorded forward instead of run (``saliency.prefix``); the result is the same. A forward that does
    not run as the recorded one did switches the prefix off (logged) and the pass is run whole.
    ``find_layer`` (instead of ``layer``, without ``prefix``): the CAM layer and its layout are found in this
    pass's own forward, and said in the result's ``layer`` and ``layout``.

    The bias layers' terms b ⊙ ∇_b y come back whole as ``bias_terms``, or, with ``bias_reductions``, only
    what each reduction keeps of them, as ``bias_reduced[key]`` (one tuple per layer call): on the looped
    backward the reductions run in tensor hooks as each gradient is produced, in chunks of images, so no
    layer's gradient outlives its step of the backward (FullGrad's memory and time: issue 21).
    """
    options = {"bias_layers": bias_layers, "linear_biases": linear_biases, "rule": rule,
               "positive": positive, "batched": batched, "bias_reductions": bias_reductions}
    if find_layer is not None:
        if layer is not None or prefix is not None:
            raise ValueError("find_layer finds the layer in the pass's own forward: give it without layer and prefix")
        try:
            return _run_pass(model, x, targets, prefix=None, layer=None, layout=layout, finder=find_layer, **options)
        except _ChangedInPlace as changed:  # its output was overwritten after the call: capture a copy instead
            layer, layout = changed.layer, changed.layout
    options.update(layer=layer, layout=layout, finder=None)
    if prefix is not None:
        try:
            return _run_pass(model, x, targets, prefix=prefix, **options)
        except ForwardDiffers as error:
            prefix.disable(str(error))
    return _run_pass(model, x, targets, prefix=None, **options)


class _ChangedInPlace(Exception):
    """The found layer's output was changed in place after its call (its gradient would be that of the
    changed tensor)."""

    def __init__(self, layer: str, layout: str):
        super().__init__(layer)
        self.layer, self.layout = layer, layout


def _run_pass(model: nn.Module, x: Tensor, targets: Tensor, *, layer: str | None, bias_layers: bool,
              linear_biases: bool, rule: ReLURule, positive: bool, batched: bool | None,
              prefix: FrozenPrefix | None, layout: str,
              bias_reductions: Mapping[Hashable, BiasReduction] | None, finder: LayerFinder | None) -> Pass:
    if batched is None:
        batched = x.device.type != "cpu" and rule == GRADIENT and not positive
    captured: dict[str, Tensor] = {}
    bias_calls: list[tuple[Tensor, Tensor]] = []
    handles = []
    kinds = (BIAS_LAYER_TYPES if bias_layers else ()) + ((nn.Linear,) if linear_biases else ())
    # plain input gradients need no routing: the model's own (in-place) ReLUs are faster
    plain = rule == GRADIENT and not positive and layer is None and finder is None and not kinds
    routing = (lambda: contextlib.nullcontext()) if plain else (lambda: ReLURouting(rule, positive))

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
        if finder is not None:
            handles += finder.attach(model)
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
            if finder is not None:
                layer, layout, act = finder.found(model, x)
                if act is None:
                    raise _ChangedInPlace(layer, layout)
                captured["act"] = act
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
            reduced_in_hooks = _hook_reductions(bias_calls, inputs, bias_reductions, batched, handles)
            materialised = [i for i in range(len(bias_calls)) if i not in reduced_in_hooks]
            inputs += [bias_calls[i][1] for i in materialised]
            keep = reuse is not None  # the recorded graph serves the next pass too
            if batched:
                grads = _batched_grad(selected, inputs, keep)
            else:
                grads = _looped_grad(selected, inputs, keep)
    finally:
        for handle in handles:
            handle.remove()
    result = Pass(logits=logits.detach(), input_grad=grads[0], layer=layer, layout=layout if layer else None)
    rest = grads[1:]
    if layer is not None:
        result.layer_act = as_channels_first(captured["act"].detach(), layout)
        result.layer_grad = as_channels_first(rest[0], layout)
        rest = rest[1:]
    grads_of = dict(zip(materialised, rest))
    if bias_reductions is None:
        result.bias_terms = [(bias_calls[i][0], g) for i, g in grads_of.items() if g is not None]
        return result
    result.bias_reduced = {key: [] for key in bias_reductions}
    for i, (bias, _) in enumerate(bias_calls):
        if i in reduced_in_hooks:
            per_target = reduced_in_hooks[i]
            if not per_target:  # the hook never ran: no gradient reached this layer
                continue
            kept = {key: tuple(torch.cat(parts, dim=1) for parts in zip(*(r[key] for r in per_target)))
                    for key in bias_reductions}
        elif grads_of[i] is None:
            continue
        else:
            term = bias_term(bias, grads_of[i])
            kept = {key: reduce(term) for key, reduce in bias_reductions.items()}
        for key, parts in kept.items():
            result.bias_reduced[key].append(parts)
    return result


def bias_term(bias: Tensor, grad: Tensor) -> Tensor:
    """b ⊙ ∇_b y for a bias of K channels and its layer's gradient B×T×K×…"""
    return bias.view((1, 1, -1) + (1,) * (grad.dim() - 3)) * grad


def _hook_reductions(bias_calls: list[tuple[Tensor, Tensor]], inputs: list[Tensor],
                     reductions: Mapping[Hashable, BiasReduction] | None, batched: bool,
                     handles: list) -> dict[int, list[dict[Hashable, tuple[Tensor, ...]]]]:
    """Register a tensor hook on each bias layer output that reduces its gradient, target by target, as
    the looped backward produces it; {call index: the per-target results, filled by the backward}.

    Only outputs on the backward's way to ``inputs`` get a hook (a hook elsewhere would never run); the
    rest, and every output of a vmap-batched backward (hooks there see batched tensors), are
    differentiated as inputs and reduced afterwards, with the same result."""
    if reductions is None or batched or not bias_calls:
        return {}
    on_path = _reaches(bias_calls, inputs)
    sinks: dict[int, list] = {}
    for i, (bias, output) in enumerate(bias_calls):
        if on_path[i]:
            sinks[i] = []
            handles.append(output.register_hook(_reducing_hook(bias, reductions, sinks[i])))
    return sinks


def _reducing_hook(bias: Tensor, reductions: Mapping[Hashable, BiasReduction], sink: list):
    def hook(grad: Tensor) -> None:
        grad = grad.unsqueeze(1)  # one target: B×1×K×…
        per_image = max(1, grad[0].numel())
        step = max(1, REDUCTION_CHUNK // per_image) if grad.device.type == "cpu" else grad.shape[0]
        chunks = []
        for start in range(0, grad.shape[0], step):
            term = bias_term(bias, grad[start:start + step])
            chunks.append({key: reduce(term) for key, reduce in reductions.items()})
        sink.append({key: tuple(torch.cat(parts) for parts in zip(*(c[key] for c in chunks)))
                     for key in reductions})
    return hook


def _reaches(bias_calls: list[tuple[Tensor, Tensor]], inputs: list[Tensor]) -> list[bool]:
    """For each bias layer output: does the autograd graph lead from it to one of ``inputs``?"""
    targets = {torch.autograd.graph.get_gradient_edge(t).node for t in inputs}
    known: dict = {}

    def reaches(start) -> bool:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in known and not expanded:
                continue
            if expanded:
                known[node] = node in targets or any(known.get(n, False) for n, _ in node.next_functions
                                                     if n is not None)
                continue
            stack.append((node, True))
            stack += [(n, False) for n, _ in node.next_functions if n is not None and n not in known]
        return known[start]

    return [output.grad_fn is not None and reaches(output.grad_fn) for _, output in bias_calls]


def _looped_grad(outputs: Tensor, inputs: list[Tensor], keep_graph: bool = False) -> list[Tensor]:
    """One backward per target column over the same graph (freed after the last unless ``keep_graph``),
    stacked B×T×…"""
    last = outputs.shape[1] - 1
    per_target = [torch.autograd.grad(outputs[:, t].sum(), inputs, retain_graph=keep_graph or t < last,
                                      allow_unused=True)
                  for t in range(outputs.shape[1])]
    return [None if per_target[0][i] is None else torch.stack([p[i] for p in per_target], dim=1)
            for i in range(len(inputs))]


def chunk_images(image: Tensor) -> int:
    """Images per pass when many inputs are run in chunks (IG's path, SmoothGrad's noise, deletion's
    steps). On CPU about 1.2 M input values, at most 128 images, where small chunks measured fastest
    (resnet18 at 224², IG 32 steps × 8 images: 6.9 s in chunks of 8, 9.1 s of 32, 11 s of 64; reference
    CNN at 28²: 0.79 s in chunks of 128, 1.1 s of 256, 1.7 s of 1024; its forward alone on 2400 digits:
    0.37 s in chunks of 128, 0.55 s of 512, 1.1 s whole); on accelerators 32 M values, at most 1024."""
    budget, most = (1_200_000, 128) if image.device.type == "cpu" else (32_000_000, 1024)
    return min(most, max(1, budget // image.numel()))


def forward_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits without gradients, in eval mode (for choosing targets)."""
    with torch.no_grad(), evaluation(model), ReLURouting():
        logits = run_model(model, x)
    check_logits(logits)
    return logits
