"""``explain``: many methods and many targets from as few passes as possible.

Each call builds a ``Context`` that caches the passes (``saliency.passes``) its methods ask for, so
gradient, input×gradient and every CAM variant share one forward and one backward. The methods
(``saliency.methods``) compute maps from a context; this module only resolves ids and options.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Hashable, Sequence

import torch
from torch import Tensor, nn

from saliency.checks import check_input, normalize_targets
from saliency.layers import (FindingTrace, Trace, cam_layout, check_layer, default_cam_layer, other_activations,
                             trace_forward)
from saliency.methods import get_method
from saliency.options import PROPAGATION_POLICIES, Options, make_options, signature_with_options
from saliency.passes import Pass, ReLURule, chunk_images, evaluation, forward_logits, run_pass
from saliency.prefix import FrozenPrefix, PerturbedPrefixes
from saliency.reshape import reduce_channels

__all__ = ["PROPAGATION_POLICIES", "Options", "cam_layer", "check_relu_rules", "explain"]


def cam_layer(model: nn.Module, x: Tensor, methods: Sequence[str], layer: str | None = None,
              trace: Trace | None = None) -> str | None:
    """The CAM layer ``explain`` uses for ``methods`` on ``x``: ``layer`` (checked), else
    ``default_cam_layer`` (from ``trace`` where given); ``layer`` unchanged when no method needs one.
    Resolve it once for many calls."""
    if not any(get_method(m).needs_layer for m in methods):
        return layer
    layer = default_cam_layer(model, x, trace) if layer is None else layer
    check_layer(model, layer)
    return layer


def cam_layer_and_layout(model: nn.Module, x: Tensor, methods: Sequence[str], layer: str | None = None,
                         layout: str | None = None) -> tuple[str | None, str | None]:
    """``cam_layer`` and, where a method needs the layer, its ``cam_layout`` unless given: one traced
    forward for both, none when both are given."""
    if not any(get_method(m).needs_layer for m in methods):
        return layer, layout
    trace = trace_forward(model, x) if layer is None and layout is None else None
    layer = cam_layer(model, x, methods, layer, trace)
    return layer, cam_layout(model, x, layer, trace) if layout is None else layout


#: Families ``propagation="pos"`` does not reach (LRP refuses it; the controls ignore the model).
_OWN_BACKWARD_FAMILIES = ("lrp", "control")


def check_relu_rules(model: nn.Module, x: Tensor, methods: Sequence[str], propagation: str = "signed") -> None:
    """Refuse, before any map is computed, a ReLU backward rule (guided backprop, deconvnet, RectGrad,
    ``propagation="pos"``) on a model that also runs other activations (GELU, SiLU, Hardswish, ReLU6, …):
    no rule is defined for them, so the map would be mostly a plain gradient (SPEC §1.3)."""
    resolved = [get_method(m) for m in methods]
    users = [m.id for m in resolved if m.relu_backward]
    if propagation == "pos":
        users += [f"{m.id} with propagation='pos'" for m in resolved
                  if not m.relu_backward and m.family not in _OWN_BACKWARD_FAMILIES]
    if not users:
        return
    found = other_activations(model, x)
    if found:
        listed = ", ".join(f"{name} ×{count}" for name, count in found.items())
        raise ValueError(f"{', '.join(users)}: a ReLU backward rule is defined for ReLU only, and this model also "
                         f"runs {listed} (calls in one forward); the rule would be skipped there and the map be "
                         f"mostly a plain gradient, so it is refused. Drop these methods for this model")


# --------------------------------------------------------------------------------------------- context
class Context:
    """One explain call: the inputs, the options, and the passes shared between methods (cached)."""

    def __init__(self, model: nn.Module, x: Tensor, targets: Tensor, options: Options,
                 needs_layer: bool, bias_reductions: dict, prefix: FrozenPrefix | None = None,
                 perturbed: PerturbedPrefixes | None = None):
        """``needs_layer`` with ``options.layer`` None: the shared pass finds the layer in its own forward."""
        self.model, self.x, self.targets, self.options, self.prefix = model, x, targets, options, prefix
        self.perturbed = perturbed
        self._needs_layer, self._bias_reductions = needs_layer, bias_reductions
        self._passes: dict[tuple, Pass] = {}
        self._derived: dict[Hashable, object] = {}

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
            find = self._needs_layer and self.options.layer is None
            self._passes[key] = run_pass(
                self.model, self.x, self.targets,
                layer=self.options.layer if self._needs_layer else None,
                layout=self.options.layer_layout or "channels_first",
                find_layer=FindingTrace(self.options.layer_layout) if find else None,
                bias_layers=bool(self._bias_reductions), bias_reductions=self._bias_reductions or None,
                positive=self.positive_propagation, prefix=self.prefix)
        return self._passes[key]

    def derived(self, key: Hashable, compute):
        """``compute(self)``, once per call: intermediate results that several method ids share
        (GradCAM++'s α, FullGrad's per-layer sums), so each extra variant costs only its own last step."""
        if key not in self._derived:
            self._derived[key] = compute(self)
        return self._derived[key]

    def rule_pass(self, rule: ReLURule) -> Pass:
        """Input gradients under a modified ReLU backward (guided backprop, deconvnet, rectgrad)."""
        key = ("rule", rule)
        if key not in self._passes:
            self._passes[key] = run_pass(self.model, self.x, self.targets, rule=rule,
                                         positive=self.positive_propagation, prefix=self.prefix)
        return self._passes[key]

    def gradients_at(self, inputs: Tensor, repeats: int, name: str = "perturbed") -> Tensor:
        """Input gradients at ``repeats`` perturbed copies of the batch, laid out (repeats·B)×C×H×W
        with the copy index outermost; returns repeats×B×T×C×H×W.

        Chunked by ``internal_batch_size`` images, by default ``chunk_images``. With ``perturbed``
        records (MPRT states), each chunk ``(name, start)`` takes its unchanged calls from its record."""
        batch = self.x.shape[0]
        targets = self.targets.repeat(repeats, 1)
        chunk = self.options.internal_batch_size or chunk_images(inputs[0])
        grads = []
        for start in range(0, inputs.shape[0], chunk):
            part = inputs[start:start + chunk]
            prefix = None if self.perturbed is None else self.perturbed.get((name, start), part)
            p = run_pass(self.model, part, targets[start:start + chunk],
                         positive=self.positive_propagation, prefix=prefix)
            grads.append(p.input_grad)
        return torch.cat(grads).reshape(repeats, batch, *grads[0].shape[1:])


# --------------------------------------------------------------------------------------------- explain
def explain(model: nn.Module, x: Tensor, methods: str | Sequence[str], targets=None, layer: str | None = None, *,
            prefix: FrozenPrefix | None = None, perturbed: PerturbedPrefixes | None = None,
            **options) -> dict[str, Tensor]:
    """Saliency maps of ``model`` for ``x`` (B×C×H×W) and ``targets`` (B or B×T; None = top class).

    Returns {method id: float32 B×T×H×W} — raw and signed, at input resolution, on x's device
    (B×T×C×H×W for input-space methods when ``channel_reduction="none"``; CAM-style maps then get C=1).
    Methods that need the same forward/backward share it. The model is left unchanged.
    ``options``: the fields of ``saliency.options.Options`` (each with its default and help there:
    ``layer_layout``, ``channel_reduction``, ``propagation``, ``relu_map``, ``seed``, ``ig_steps``,
    ``ig_baseline``, ``sg_samples``, ``sg_noise``, ``rectgrad_q``, ``fullgrad_scaling``,
    ``internal_batch_size``). ``prefix``: a ``FrozenPrefix`` of the original model on this ``x``; passes
    on x take the calls below the first changed module from it instead of running them (MPRT states);
    ``perturbed``: the same for the inputs integrated gradients and SmoothGrad build from x.
    """
    method_ids = [methods] if isinstance(methods, str) else list(methods)
    if not method_ids:
        raise ValueError("methods is empty; see saliency.available_methods()")
    duplicates = sorted({m for m in method_ids if method_ids.count(m) > 1})
    if duplicates:
        raise ValueError(f"method ids listed more than once: {duplicates}")
    resolved = [get_method(m) for m in method_ids]
    checked = make_options(layer=layer, **options)
    check_input(model, x)
    check_relu_rules(model, x, method_ids, checked.propagation)
    needs_layer = any(m.needs_layer for m in resolved)
    layer_layout = checked.layer_layout
    if layer is not None or prefix is not None:  # else the shared pass finds the layer in its own forward
        layer, layer_layout = cam_layer_and_layout(model, x, method_ids, layer, layer_layout)
    with evaluation(model):
        if targets is None:
            targets = forward_logits(model, x).argmax(dim=1)
        target_matrix = normalize_targets(targets, x.shape[0], x.device)
        checked = replace(checked, layer=layer, layer_layout=layer_layout)
        reductions = dict(m.bias_reduction(checked) for m in resolved if m.needs_biases)
        ctx = Context(model, x, target_matrix, checked, needs_layer, reductions, prefix, perturbed)
        for method in resolved:
            method.prepare(ctx)
        maps: dict[str, Tensor] = {}
        for method_id, method in zip(method_ids, resolved):
            result = method.compute(ctx)
            if result.dim() == 5:
                result = reduce_channels(result, checked.channel_reduction)
            elif checked.channel_reduction == "none":
                result = result.unsqueeze(2)
            maps[method_id] = result.detach().to(torch.float32)
    return maps


explain.__signature__ = signature_with_options(explain, "prefix")  # help(explain) lists every option
