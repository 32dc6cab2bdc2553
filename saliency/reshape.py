"""Tensor layouts and sizes: a CAM layer's output made channels-first, maps upsampled to the input,
input-space maps reduced over their colour channels."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from saliency.choices import choice_error

CHANNEL_REDUCTIONS = ("sum", "abs_sum", "abs_max", "none")
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
    side = grid_side(tokens)
    if side is None:
        raise ValueError(f"{tokens} tokens are not a square grid of patches (with or without a class token)")
    grid = values[..., tokens - side * side:, :]
    return grid.reshape(*values.shape[:-2], side, side, values.shape[-1]).movedim(-1, -3)


def grid_side(tokens: int) -> int | None:
    for patches in (tokens, tokens - 1):
        side = math.isqrt(max(patches, 0))
        if side > 1 and side * side == patches:
            return side
    return None


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
