"""What a saliency method is, and the gradient-handling policies φ of SPEC §1."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable

from torch import Tensor

from saliency.choices import choice_error

if TYPE_CHECKING:
    from saliency.engine import Context
    from saliency.passes import BiasReduction

POLICIES = ("signed", "pos", "abs", "neg")


def apply_policy(values: Tensor, policy: str) -> Tensor:
    """φ: signed = identity, pos = ReLU, abs = |·|, neg = −ReLU(−·)."""
    if policy == "signed":
        return values
    if policy == "pos":
        return values.clamp_min(0)
    if policy == "abs":
        return values.abs()
    if policy == "neg":
        return values.clamp_max(0)
    raise choice_error("gradient policy", policy, POLICIES)


@dataclass(frozen=True)
class Method:
    """A saliency method: ``compute(ctx)`` returns B×T×C×H×W (input space) or B×T×H×W maps.

    ``needs_layer``/``needs_biases`` tell the engine what the shared pass must capture so that one
    forward and one backward serve every method of the call; a method that needs biases says, by
    ``bias_reduction``, what it keeps of each bias term. ``stochastic`` methods depend on the
    ``seed`` (their retest level is two draws, SPEC §4). ``signed_counterpart`` names the method this
    one differs from only by keeping positive (or absolute) signal: the paper's paired comparison.
    """

    id: str
    family: str
    policy: str | None = None
    default: bool = True
    needs_layer: bool = False
    needs_biases: bool = False
    stochastic: bool = False
    signed_counterpart: str | None = None
    relu_backward: bool = False  # its rule replaces the backward at ReLUs (refused where other activations run)

    def prepare(self, ctx: "Context") -> None:
        """Refuse (ValueError), before any map of the call is computed, what this method cannot do on
        ctx's model; nothing by default."""

    def compute(self, ctx: "Context") -> Tensor:  # pragma: no cover - every method overrides it
        raise NotImplementedError

    def bias_reduction(self, options) -> tuple[Hashable, "BiasReduction"]:
        """(key, reduction) for ``saliency.passes.run_pass``'s ``bias_reductions``, where ``needs_biases``."""
        raise NotImplementedError(f"{self.id} needs biases but says nothing of what it keeps of them")


def min_max(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Rescale each map (over its last two dims) to [0, 1], as FullGrad's ψ (eps as pytorch-grad-cam)."""
    shifted = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return shifted / (eps + shifted.amax(dim=(-2, -1), keepdim=True))


MAX_ABS_EPS = 1e-12


def max_abs(values: Tensor, dims: tuple[int, ...], eps: float = MAX_ABS_EPS) -> Tensor:
    """Divide by max|·| over ``dims``: sign-preserving rescaling where zero stays zero (all-zero stays 0)."""
    scale = values.abs().amax(dim=dims, keepdim=True)
    return values / scale.clamp_min(eps)
