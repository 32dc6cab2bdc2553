"""Propagation family (SPEC §1.3): methods that change the backward signal at every ReLU.

Each method is a ReLU backward rule (``saliency.passes.ReLURule``) applied by the engine's ReLU
routing. Guided Backprop and Deconvnet pass only positive signal backwards ("positive propagation");
RectGrad keeps only the units whose a·R exceeds a per-image, per-layer percentile and, as the authors'
reference implementation (DeepExplain ``RectifiedGradient``) does, returns the rectified gradient
multiplied by the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saliency.methods.base import Method
from saliency.passes import ReLURule


@dataclass(frozen=True)
class GuidedRule:
    """Guided Backprop: the ReLU derivative, and only positive incoming signal."""

    def backward(self, out: Tensor, grad: Tensor) -> Tensor:
        return grad.clamp_min(0) * (out > 0)


@dataclass(frozen=True)
class DeconvnetRule:
    """Deconvnet: the ReLU applied to the backward signal, whatever the forward activation."""

    def backward(self, out: Tensor, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


def row_percentile(values: Tensor, q: float) -> Tensor:
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


@dataclass(frozen=True)
class RectGradRule:
    """Kim et al. 2019 reference (DeepExplain ``RectifiedGradient.nonlinearity_grad_override``):
    a·R = ReLU output × incoming gradient, thresholded strictly at its per-image ``q``-th percentile;
    R passes unchanged where a·R > τ (no extra ReLU-derivative factor), zero elsewhere.
    ``absolute`` thresholds |a·R| instead (the non-positive control)."""

    q: float = 98.0
    absolute: bool = False

    def backward(self, out: Tensor, grad: Tensor) -> Tensor:
        score = out * grad
        if self.absolute:
            score = score.abs()
        return torch.where(score > row_percentile(score, self.q), grad, torch.zeros_like(grad))


@dataclass(frozen=True)
class PropagationMethod(Method):
    """Input gradient under a ReLU backward rule; ``times_input``: input ⊙ that gradient instead."""

    times_input: bool = False
    relu_backward: bool = True

    def relu_rule(self, ctx) -> ReLURule:  # pragma: no cover - every method overrides it
        raise NotImplementedError

    def compute(self, ctx) -> Tensor:
        grad = ctx.rule_pass(self.relu_rule(ctx)).input_grad
        return ctx.x.unsqueeze(1) * grad if self.times_input else grad


@dataclass(frozen=True)
class GuidedBackprop(PropagationMethod):
    def relu_rule(self, ctx) -> ReLURule:
        return GuidedRule()


@dataclass(frozen=True)
class Deconvnet(PropagationMethod):
    def relu_rule(self, ctx) -> ReLURule:
        return DeconvnetRule()


@dataclass(frozen=True)
class RectGrad(PropagationMethod):
    """RectGrad at ``rectgrad_q`` (an explain option); ``absolute`` = the |a·R| control."""

    absolute: bool = False

    def relu_rule(self, ctx) -> ReLURule:
        return RectGradRule(q=ctx.options.rectgrad_q, absolute=self.absolute)
