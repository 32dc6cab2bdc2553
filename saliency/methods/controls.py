"""Model-independent controls (SPEC §1.4): the floor (edges) and the ceiling (noise) of the tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from saliency.methods.base import Method
from saliency.seeds import model_fingerprint, stable_seed

_SOBEL = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4.0


def sobel_magnitude(x: Tensor) -> Tensor:
    """Per-channel Sobel gradient magnitude, equal to skimage.filters.sobel (reflect borders)."""
    batch, channels = x.shape[:2]
    flat = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (1, 1, 1, 1), mode="replicate")
    kernel = _SOBEL.to(x)
    horizontal = F.conv2d(flat, kernel.T.reshape(1, 1, 3, 3))
    vertical = F.conv2d(flat, kernel.reshape(1, 1, 3, 3))
    magnitude = torch.sqrt((horizontal**2 + vertical**2) / 2)
    return magnitude.reshape(batch, channels, *x.shape[-2:])


@dataclass(frozen=True)
class EdgeSobel(Method):
    """Adebayo et al.'s edge detector: must fail every sanity test."""

    def compute(self, ctx) -> Tensor:
        edges = sobel_magnitude(ctx.x.detach())
        return edges.unsqueeze(1).expand(-1, ctx.targets.shape[1], -1, -1, -1)


@dataclass(frozen=True)
class RandomMap(Method):
    """Seeded Gaussian noise, a fresh pattern for every (image, target, model state): must pass every
    sanity test, and shows what an uninformative map scores. The seed mixes ``seed`` with the image's
    bytes, the target and a fingerprint of the model's weights, so maps are reproducible and do not
    depend on the batch they came in."""

    def compute(self, ctx) -> Tensor:
        model_key = model_fingerprint(ctx.model)
        maps = torch.empty((*ctx.targets.shape, *ctx.size))
        for b in range(ctx.x.shape[0]):
            image_key = stable_seed(ctx.x[b])
            for t in range(ctx.targets.shape[1]):
                seed = stable_seed(ctx.options.seed, image_key, int(ctx.targets[b, t]), model_key)
                maps[b, t] = torch.randn(ctx.size, generator=torch.Generator().manual_seed(seed))
        return maps.to(ctx.x.device)
