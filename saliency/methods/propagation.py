"""Propagation family (SPEC §1.3): methods that change the backward signal at every ReLU.

Guided Backprop and Deconvnet pass only positive signal backwards ("positive propagation");
RectGrad keeps only the units whose a·R exceeds a per-image, per-layer percentile and, as the
authors' reference implementation (DeepExplain ``RectifiedGradient``) does, returns the rectified
gradient multiplied by the input.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saliency.methods.base import Method


@dataclass(frozen=True)
class ReLURuleMethod(Method):
    """Input gradient under a ReLU backward rule: guided_backprop, deconvnet, rectgrad, rectgrad_abs.

    ``times_input``: return input ⊙ that gradient (RectGrad's attribution) instead of the gradient.
    """

    rule: str = "gradient"
    times_input: bool = False

    def compute(self, ctx) -> Tensor:
        grad = ctx.rule_pass(self.rule).input_grad
        return ctx.x.unsqueeze(1) * grad if self.times_input else grad
