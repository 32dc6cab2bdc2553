"""Plain gradient family (SPEC §1.1): gradient, input×gradient, integrated gradients, SmoothGrad."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saliency.methods.base import Method
from saliency.checks import normalize_targets
from saliency.passes import evaluation


@dataclass(frozen=True)
class Gradient(Method):
    def compute(self, ctx) -> Tensor:
        return ctx.shared_pass().input_grad


@dataclass(frozen=True)
class InputXGradient(Method):
    def compute(self, ctx) -> Tensor:
        return ctx.x.unsqueeze(1) * ctx.shared_pass().input_grad


@dataclass(frozen=True)
class IntegratedGradients(Method):
    """(x − x̄) ⊙ mean_k ∇y(x̄ + k/m (x − x̄)), k = 1..m (right Riemann sum)."""

    def compute(self, ctx) -> Tensor:
        steps = ctx.options.ig_steps
        baseline = ctx.options.ig_baseline
        baseline = torch.zeros_like(ctx.x) if baseline is None else torch.as_tensor(
            baseline, dtype=ctx.x.dtype, device=ctx.x.device).expand_as(ctx.x)
        alphas = torch.linspace(1 / steps, 1, steps).tolist()
        path = torch.stack([baseline + a * (ctx.x - baseline) for a in alphas])  # m×B×C×H×W
        grads = ctx.gradients_at(path.flatten(0, 1), steps, "integrated_gradients")
        return (ctx.x - baseline).unsqueeze(1) * grads.mean(dim=0)


def integrated_gradients_delta(model, x: Tensor, targets: Tensor, attributions: Tensor,
                               baseline: Tensor | float | None = None) -> Tensor:
    """Completeness gap Σ IG − (y(x) − y(x̄)) per image and target (B×T); attributions B×T×…"""
    baseline = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline).to(x).expand_as(x)
    t = normalize_targets(targets, x.shape[0], x.device)
    with torch.no_grad(), evaluation(model):
        gap = model(x).gather(1, t) - model(baseline).gather(1, t)
    return attributions.flatten(2).sum(dim=2) - gap


@dataclass(frozen=True)
class SmoothGrad(Method):
    """mean_n ∇y(x + ε_n), ε_n ~ N(0, σ²), σ = noise·(max x − min x) per image.

    The n noise patterns are drawn once from ``seed`` and shared by all images of the batch (each
    scaled by its own σ), so an image's map does not depend on the batch it came in.
    """

    def compute(self, ctx) -> Tensor:
        n = ctx.options.sg_samples
        if n < 1:
            raise ValueError(f"sg_samples must be ≥ 1, got {n}")
        x = ctx.x
        generator = torch.Generator().manual_seed(ctx.options.seed)
        noise = torch.randn((n, 1, *x.shape[1:]), generator=generator).to(x)
        flat = x.flatten(1)
        sigma = ctx.options.sg_noise * (flat.amax(dim=1) - flat.amin(dim=1))
        noisy = x.unsqueeze(0) + noise * sigma.view(1, -1, 1, 1, 1)
        return ctx.gradients_at(noisy.flatten(0, 1), n, "smoothgrad").mean(dim=0)
