"""Propagation family (SPEC §1.3): methods that change the backward signal at every ReLU.

Guided Backprop and Deconvnet pass only positive signal backwards ("positive propagation");
RectGrad keeps only the units whose a·R exceeds a per-image, per-layer percentile.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saliency.methods.base import Method


@dataclass(frozen=True)
class ReLURuleMethod(Method):
    """Input gradient under a ReLU backward rule: guided_backprop, deconvnet, rectgrad, rectgrad_abs."""

    rule: str = "gradient"

    def compute(self, ctx) -> Tensor:
        return ctx.rule_pass(self.rule).input_grad
