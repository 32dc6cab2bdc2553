"""Aggregation family (SPEC §1.2): GradCAM, GradCAM++ and FullGrad, each under every policy φ.

The policy is where "positive aggregation" happens: GradCAM++ (φ = pos) and FullGrad (φ = abs)
keep only positive or absolute layer gradients. All variants read the same shared pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Hashable

import torch
from torch import Tensor

from saliency.choices import check_choice
from saliency.methods.base import MAX_ABS_EPS, POLICIES, Method, apply_policy, min_max
from saliency.checks import normalize_targets
from saliency.passes import BiasReduction, bias_term, evaluation, run_pass
from saliency.reshape import upsample

GRADCAMPP_EPS = 1e-6


def _weighted_sum(weights: Tensor, act: Tensor) -> Tensor:
    """Σ_k w_k A^k: weights B×T×K, activations B×K×h×w → B×T×h×w."""
    return torch.einsum("btk,bkhw->bthw", weights, act)


def _finish(ctx, cam: Tensor) -> Tensor:
    cam = upsample(cam, ctx.size)
    return cam.clamp_min(0) if ctx.options.relu_map else cam


@dataclass(frozen=True)
class GradCAM(Method):
    """w_k = mean_ij φ(g^k_ij)."""

    needs_layer: bool = True

    def compute(self, ctx) -> Tensor:
        p = ctx.shared_pass()
        weights = apply_policy(p.layer_grad, self.policy).mean(dim=(-2, -1))
        return _finish(ctx, _weighted_sum(weights, p.layer_act))


def gradcampp_alpha(act: Tensor, grad: Tensor) -> Tensor:
    """Closed-form GradCAM++ coefficients α = g² / (2g² + Σ_ab A_ab·|g|³ + ε), 0 where g = 0.

    With |g|³ (SPEC §1.2) α is finite for every policy (g³ has a pole at g = −2/ΣA); where g > 0 it is
    the published α. act B×K×h×w, grad B×T×K×h×w → α B×T×K×h×w."""
    g2 = grad * grad
    act_sum = act.sum(dim=(-2, -1), keepdim=True).unsqueeze(1)
    alpha = g2 / (2 * g2 + act_sum * g2 * grad.abs() + GRADCAMPP_EPS)
    return torch.where(grad != 0, alpha, torch.zeros_like(alpha))


@dataclass(frozen=True)
class GradCAMPlusPlus(Method):
    """w_k = Σ_ij α^k_ij φ(g^k_ij)."""

    needs_layer: bool = True

    def compute(self, ctx) -> Tensor:
        p = ctx.shared_pass()
        alpha = ctx.derived("gradcampp_alpha", lambda c: gradcampp_alpha(p.layer_act, p.layer_grad))
        weights = (alpha * apply_policy(p.layer_grad, self.policy)).sum(dim=(-2, -1))
        return _finish(ctx, _weighted_sum(weights, p.layer_act))


@dataclass(frozen=True)
class FullGrad(Method):
    """ψ(x ⊙ ∇_x y) + Σ_layers Σ_channels ψ(b ⊙ ∇_b y), then upsampling.

    ``sign_preserving=False`` (the published id): ψ = φ then min-max per (image, target, layer) over
    C×H×W, as the authors' code (idiap/fullgrad-saliency, ``_postProcess``, eps 1e-6); the option
    ``fullgrad_scaling="channel"`` min-maxes per channel instead, as pytorch-grad-cam (another map: on
    the CIFAR ResNet-20 class-min R 0.52 against the authors' 0.37). ``True`` (the ``fullgrad/<φ>`` variants, SPEC §1.2): ψ(v) = φ(v)/max|φ(v)| per
    (image, target, layer) over C×H×W, so zero stays zero (min-max turns the zeros of signed terms
    into mid-level offsets that make every map nearly constant). Biases are those of every Conv2d and
    BatchNorm2d (folded), read at call time.

    Cost: each layer's term is reduced to its channel sum (and what ψ needs) by the pass itself, as the
    backward produces its gradient (``bias_reduction``), so no layer's B×T×K×h×w gradient is kept; as
    upsampling is linear, the layers of one resolution are summed before one upsampling per resolution.
    The four sign-preserving variants share one reduction (``_sign_parts``): Σ_k φ(v) and max|φ(v)| of
    every φ follow from the channel sums of v⁺ and v⁻ and from max v and min v, so adding variants costs
    almost nothing.
    """

    needs_biases: bool = True
    sign_preserving: bool = False

    def bias_reduction(self, options) -> tuple[Hashable, BiasReduction]:
        """(key, reduction) of each term v = b ⊙ ∇_b y (B×T×K×h×w) for ``passes.run_pass``: what this
        variant keeps of it (variants with the same key share it)."""
        if self.sign_preserving:
            return "fullgrad_sign_parts", _sign_parts
        scaling = options.fullgrad_scaling
        return ("fullgrad", self.policy, scaling), partial(_scaled_channel_sum, policy=self.policy,
                                                           scale=min_max if scaling == "channel" else min_max_per_layer)

    def compute(self, ctx) -> Tensor:
        p = ctx.shared_pass()
        key, reduce = self.bias_reduction(ctx.options)
        terms = [ctx.derived(("fullgrad input term", key), lambda c: reduce(c.x.unsqueeze(1) * p.input_grad))]
        terms += p.bias_reduced[key]
        if self.sign_preserving:
            terms = [_policy_sum(parts, self.policy) for parts in terms]
        else:
            terms = [channel_sum for (channel_sum,) in terms]
        by_size: dict[tuple[int, int], Tensor] = {}
        for term in terms:
            size = tuple(term.shape[-2:])
            by_size[size] = term if size not in by_size else by_size[size] + term
        total = sum(upsample(term, ctx.size) for term in by_size.values())
        return _finish(ctx, total)


FULLGRAD_SCALINGS = ("layer", "channel")


def min_max_per_layer(values: Tensor, eps: float = 1e-6) -> Tensor:
    """Rescale each (image, target) term B×T×C×h×w to [0, 1] over C×h×w, as the FullGrad authors'
    ``_postProcess`` does (min subtracted, then divided by max + eps)."""
    shifted = values - values.amin(dim=(-3, -2, -1), keepdim=True)
    return shifted / (eps + shifted.amax(dim=(-3, -2, -1), keepdim=True))


def _scaled_channel_sum(values: Tensor, policy: str, scale) -> tuple[Tensor]:
    """Σ_k ψ(v) of the published FullGrad: φ, then ``scale`` (min-max per layer or per channel)."""
    return (scale(apply_policy(values, policy)).sum(dim=2),)


def _sign_parts(values: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Of a FullGrad term v (the input's x ⊙ ∇_x y or a layer's b ⊙ ∇_b y), B×T×K×h×w: the channel
    sums of v⁺ = max(v, 0) and v⁻ = min(v, 0) (B×T×h×w) and max v, min v over K×h×w (B×T)."""
    flat = values.flatten(2)
    return values.clamp_min(0).sum(dim=2), values.clamp_max(0).sum(dim=2), flat.amax(dim=2), flat.amin(dim=2)


def _policy_sum(parts: tuple[Tensor, Tensor, Tensor, Tensor], policy: str) -> Tensor:
    """Σ_k ψ(v) with ψ(v) = φ(v)/max|φ(v)| (``max_abs``), from ``_sign_parts``."""
    positive, negative, highest, lowest = parts
    if policy == "signed":
        total, scale = positive + negative, torch.maximum(highest, -lowest)
    elif policy == "pos":
        total, scale = positive, highest.clamp_min(0)
    elif policy == "abs":
        total, scale = positive - negative, torch.maximum(highest, -lowest)
    else:
        check_choice("gradient policy", policy, POLICIES)
        total, scale = negative, (-lowest).clamp_min(0)
    return total / scale.clamp_min(MAX_ABS_EPS)[..., None, None]


def fullgrad_completeness(model, x: Tensor, targets) -> tuple[Tensor, Tensor]:
    """(y_c, Σ x⊙∇_x y_c + Σ b⊙∇_b y_c) per image and target, the raw terms of FullGrad with every
    bias included (conv, folded BatchNorm and Linear). Equal for piecewise-linear ReLU networks."""
    t = normalize_targets(targets, x.shape[0], x.device)
    with evaluation(model):
        p = run_pass(model, x, t, bias_layers=True, linear_biases=True)
    total = (x.unsqueeze(1) * p.input_grad).flatten(2).sum(dim=2)
    for bias, grad in p.bias_terms:
        total = total + bias_term(bias, grad).flatten(2).sum(dim=2)
    return p.logits.gather(1, t), total
