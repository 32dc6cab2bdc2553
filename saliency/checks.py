"""Checks of a call's inputs before any pass: autograd available, dtype, rank, channels and finite
pixels of x; targets and logits; and the model's forward with torch's shape errors reworded."""
from __future__ import annotations

import torch
from torch import Tensor, nn

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


class InputShapeError(ValueError, RuntimeError):
    """The model cannot take inputs of this shape (a ValueError, and still the RuntimeError torch raised)."""


_SHAPE_WORDS = ("shape", "size", "channels")


def run_model(model: nn.Module, x: Tensor) -> Tensor:
    """model(x), with torch's shape errors turned into a message that names the input's size (the
    model's other errors pass unchanged)."""
    try:
        return model(x)
    except RuntimeError as error:
        if not any(word in str(error) for word in _SHAPE_WORDS):
            raise
        size = "×".join(map(str, x.shape[1:]))
        raise InputShapeError(f"the model cannot run on images of size {size} (C×H×W) ({error}); is this the "
                         "input size, channels and device the model expects?") from error


def check_input(model: nn.Module, x: Tensor) -> None:
    """Refuse what would reach torch's own errors or give meaningless maps: no autograd, wrong dtype,
    rank or channels, non-finite pixels."""
    if torch.is_inference_mode_enabled():
        raise ValueError("saliency maps need autograd, which torch.inference_mode() switches off: call "
                         "explain outside it (torch.no_grad() is fine)")
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
    bad = (~torch.isfinite(x)).flatten(1).any(dim=1)
    if bad.any():
        raise ValueError(f"x has NaN/Inf pixels in images {bad.nonzero().flatten().tolist()}; no maps were "
                         "computed")


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
