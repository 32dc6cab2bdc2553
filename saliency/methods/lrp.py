"""Layer-wise relevance propagation through zennit (SPEC §1.3).

Rules are zennit's; how LRP sees the model is ``saliency.canonize``: a private, traced copy whose
BatchNorms are merged into their convolutions and whose residual sums split relevance, chosen from the
model's graph (never its class); a model with layers no rule covers is refused before any compute. The
relevance at the logits starts as y_c (not 1), so for a bias-free network under ε the input relevance
sums to the logit; the positive-only rules (z⁺, α2β1) start from |y_c| (SPEC §1.3): their map's sign is
only sign(y_c), and the least-likely class always has y_c < 0, so a class change would otherwise score
as a sign flip.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saliency.canonize import Affine, Mean, canonize
from saliency.methods.base import Method
from saliency.passes import forward_logits

EPSILON = 1e-6


def composite(name: str):
    """The zennit composite for one of our LRP ids. A BatchNorm that no convolution alone feeds (as after
    DenseNet's concatenations), canonized to ``Affine``, gets the ε rule of the affine layer it is, in
    every composite (zennit passes relevance through a BatchNorm whole, shift or not); a mean gets
    zennit's rule for average pools."""
    from zennit import composites, rules, types

    extra = [(Affine, rules.Epsilon(epsilon=EPSILON)), (Mean, rules.Norm(stabilizer=EPSILON))]
    if name == "lrp_epsilon_plus_flat":
        return composites.EpsilonPlusFlat(epsilon=EPSILON, layer_map=extra)
    layer_rule = {"lrp_epsilon": lambda: rules.Epsilon(epsilon=EPSILON),
                  "lrp_zplus": rules.ZPlus,
                  "lrp_alpha2beta1": lambda: rules.AlphaBeta(alpha=2.0, beta=1.0)}[name]
    layer_map = extra + composites.layer_map_base() + [(types.Convolution, layer_rule()),
                                                       (torch.nn.Linear, layer_rule())]
    return composites.LayerMapComposite(layer_map=layer_map)


#: Rules whose relevance starts from |y_c| instead of y_c (positive-only propagation).
FROM_ABSOLUTE_LOGIT = ("lrp_zplus", "lrp_alpha2beta1")


def lrp_relevance(model: nn.Module, x: Tensor, targets: Tensor, name: str,
                  canonical: nn.Module | None = None) -> Tensor:
    """Input relevance B×T×C×H×W for targets B×T, starting from R = y_c at the target logit
    (|y_c| for ``FROM_ABSOLUTE_LOGIT``); ``canonical``: ``canonize(model, x)`` if already made."""
    clone = canonize(model, x) if canonical is None else canonical
    comp = composite(name)
    inputs = x.detach().requires_grad_(True)
    with torch.enable_grad(), comp.context(clone) as modified:
        logits = modified(inputs)
        relevance = []
        for t in range(targets.shape[1]):
            start = torch.zeros_like(logits)
            logit = logits.gather(1, targets[:, t:t + 1]).detach()
            start.scatter_(1, targets[:, t:t + 1], logit.abs() if name in FROM_ABSOLUTE_LOGIT else logit)
            (grad,) = torch.autograd.grad(logits, inputs, grad_outputs=start,
                                          retain_graph=t + 1 < targets.shape[1])
            relevance.append(grad)
    return torch.stack(relevance, dim=1)


def bias_free(model: nn.Module) -> nn.Module:
    """A copy in which no layer adds a constant: conv and linear biases 0, BatchNorm running mean and β 0
    (its scale γ/√(σ² + ε) stays). LRP's conservation, Σ R = y_c, holds only on such a copy."""
    clone = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in clone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.running_mean is not None:
                    module.running_mean.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and module.bias is not None:
                module.bias.zero_()
    return clone


#: The Σ R / y_c (|y_c| for ``FROM_ABSOLUTE_LOGIT``) a rule must keep on a bias-free copy. ε conserves on
#: every graph LRP covers, up to its stabiliser: within 1% (more is a canonizer bug). z⁺ (and ε+flat, z⁺ on
#: convolutions) loses the relevance of neurons that receive some and have no positive contribution: a few
#: percent on narrow residual nets (the trained reference ResNet's digits: 0.98–1.013), two thirds on
#: ShuffleNet; bounds [0.9, 1.1]. α2β1 creates relevance at neurons with contributions of one sign (α = 2
#: times theirs, in zennit too: the trained reference CNN 1.00–1.14, the reference ResNet 0.83–1.93);
#: bounds [1/2, 2], the factor of one such layer. Beyond them the map is mostly relevance the rule lost or
#: created (MobileNetV2 α2β1 8.8). The bounds past ε's are our choice, not the literature's.
CONSERVATION_BOUNDS = {"lrp_zplus": (0.9, 1.1), "lrp_epsilon_plus_flat": (0.9, 1.1), "lrp_alpha2beta1": (0.5, 2.0)}


def conservation_bounds(name: str) -> tuple[float, float]:
    """The (low, high) bounds of ``CONSERVATION_BOUNDS`` for an LRP id; ε's 1% for any rule not listed."""
    return CONSERVATION_BOUNDS.get(name, (0.99, 1.01))


def conservation_ratios(model: nn.Module, x: Tensor, targets: Tensor, methods: list[str]
                        ) -> tuple[dict[str, Tensor], Tensor]:
    """({rule: Σ R / y_c per image}, measurable): on a bias-free copy at ``targets`` (B×1), |y_c| for
    ``FROM_ABSOLUTE_LOGIT``, one LRP pass per rule over one canonized copy; ``measurable`` is False where
    y_c is ~0 next to the copy's largest logit (no ratio to read)."""
    free = bias_free(model)
    with torch.no_grad():
        logits = free(x)
    y = logits.gather(1, targets)[:, 0]
    canonical = canonize(free, x)
    ratios = {name: lrp_relevance(free, x, targets, name, canonical)[:, 0].flatten(1).sum(dim=1)
              / (y.abs() if name in FROM_ABSOLUTE_LOGIT else y) for name in methods}
    return ratios, y.abs() > 1e-6 * logits.abs().amax(dim=1)


def check_conservation(model: nn.Module, x: Tensor, methods: list[str]) -> None:
    """Refuse, before any map, an LRP rule that does not conserve relevance on this model: on a bias-free
    copy, at the model's top class of each image of ``x``, Σ R / y_c must lie within ``conservation_bounds``. Why
    it can fail on a model LRP covers: z⁺ loses the relevance a neuron receives when it has no positive
    contribution (a depthwise convolution that feeds the next layer without a ReLU, as in ShuffleNet:
    0.35 of |y_c| left); α2β1 creates it where a neuron has no negative one (depthwise convolutions after
    a ReLU: 6–9× in MobileNetV2 and MnasNet). ``methods``: LRP ids. Costs one LRP pass per rule on a copy;
    the pipeline's planner runs it on the first image (``explain`` does not). A model with layers no rule
    covers is refused here too (by ``canonize``, with its own message)."""
    if not methods:
        return
    targets = forward_logits(model, x).argmax(dim=1, keepdim=True)  # the class a run explains, not the copy's
    ratios, measurable = conservation_ratios(model, x, targets, methods)
    failed = []
    for name in methods:
        ratio = ratios[name][measurable]
        low, high = conservation_bounds(name)
        if not ((ratio >= low) & (ratio <= high)).all():
            failed.append(f"{name} (Σ R / {'|y_c|' if name in FROM_ABSOLUTE_LOGIT else 'y_c'} = "
                          f"{', '.join(f'{float(r):.3g}' for r in ratio)}, allowed [{low:g}, {high:g}])")
    if failed:
        raise ValueError(
            f"LRP does not conserve relevance on {type(model).__name__} for {'; '.join(failed)}, measured on a "
            f"bias-free copy at the model's top class of {x.shape[0]} image(s): the rule loses relevance at neurons that "
            f"receive some but have no positive contribution (z⁺; e.g. a depthwise convolution feeding the next "
            f"layer without a ReLU) or creates it where it finds no negative one (α2β1). Refused before any "
            f"compute; drop these methods for this model")


def _canonical(ctx) -> nn.Module:
    return canonize(ctx.model, ctx.x)


@dataclass(frozen=True)
class LRP(Method):
    def prepare(self, ctx) -> None:
        """The model's canonical graph, made once per call for every LRP id; refuses what it cannot cover."""
        if ctx.positive_propagation:
            raise ValueError(f"{self.id} has its own propagation rules; propagation='pos' applies to "
                             f"gradient-based methods only")
        ctx.derived("lrp_canonical", _canonical)

    def compute(self, ctx) -> Tensor:
        self.prepare(ctx)
        return lrp_relevance(ctx.model, ctx.x, ctx.targets, self.id, ctx.derived("lrp_canonical", _canonical))
