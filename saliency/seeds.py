"""Stable seeds: the same on every process and machine (unlike Python's salted ``hash()``), so that any
worker can rebuild any random draw from the run's seed and the thing it belongs to."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn


def stable_seed(*parts: Tensor | int | float | str) -> int:
    """A 63-bit seed from plain values (by repr) and tensors (by their float64 bytes)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, Tensor):
            h.update(part.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little") >> 1


def model_fingerprint(model: nn.Module) -> int:
    """Changes whenever a parameter or buffer changes (randomised states), cheap to compute."""
    sums = [t.detach().double().sum().reshape(1) for t in model.state_dict().values() if t.is_floating_point()]
    return stable_seed(torch.cat(sums) if sums else torch.zeros(1))
