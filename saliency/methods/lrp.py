"""Layer-wise relevance propagation through zennit (SPEC §1.3).

Rules and canonizers are zennit's: BatchNorm is merged into the preceding convolution and ResNet
residual sums become explicit modules that split relevance. The relevance at the logits starts as
y_c (not 1), so for a bias-free network under ε the input relevance sums to the logit; the
positive-only rules (z⁺, α2β1) start from |y_c| (SPEC §1.3): their map's sign is only sign(y_c), and
the least-likely class always has y_c < 0, so a class change would otherwise score as a sign flip.
Everything runs on a private copy: zennit's canonizers edit the model they are given.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saliency.cifar import CifarResNet, CifarResNetCanonizer
from saliency.methods.base import Method

EPSILON = 1e-6


def composite(name: str, canonizers: list):
    """The zennit composite for one of our LRP ids."""
    from zennit import composites, rules, types

    if name == "lrp_epsilon_plus_flat":
        return composites.EpsilonPlusFlat(epsilon=EPSILON, canonizers=canonizers)
    layer_rule = {"lrp_epsilon": lambda: rules.Epsilon(epsilon=EPSILON),
                  "lrp_zplus": rules.ZPlus,
                  "lrp_alpha2beta1": lambda: rules.AlphaBeta(alpha=2.0, beta=1.0)}[name]
    layer_map = composites.layer_map_base() + [(types.Convolution, layer_rule()),
                                               (torch.nn.Linear, layer_rule())]
    return composites.LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


def canonizers_for(model: nn.Module) -> list:
    """zennit's canonizer for torchvision ResNets and VGGs, ours for the CIFAR ResNet (option-A
    shortcuts, which zennit does not know), generic BatchNorm merging otherwise."""
    from torchvision.models import VGG, ResNet
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if isinstance(model, CifarResNet):
        return [CifarResNetCanonizer()]
    if isinstance(model, ResNet):
        return [ResNetCanonizer()]
    if isinstance(model, VGG):
        return [VGGCanonizer()]
    return [SequentialMergeBatchNorm()]


def private_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode with out-of-place ReLUs (zennit hooks modules; in-place outputs break them)."""
    clone = copy.deepcopy(model).eval()
    for module in clone.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return clone


#: Rules whose relevance starts from |y_c| instead of y_c (positive-only propagation).
FROM_ABSOLUTE_LOGIT = ("lrp_zplus", "lrp_alpha2beta1")


def lrp_relevance(model: nn.Module, x: Tensor, targets: Tensor, name: str) -> Tensor:
    """Input relevance B×T×C×H×W for targets B×T, starting from R = y_c at the target logit
    (|y_c| for ``FROM_ABSOLUTE_LOGIT``)."""
    clone = private_copy(model)
    comp = composite(name, canonizers_for(clone))
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


@dataclass(frozen=True)
class LRP(Method):
    def compute(self, ctx) -> Tensor:
        if ctx.positive_propagation:
            raise ValueError(f"{self.id} has its own propagation rules; propagation='pos' applies to "
                             f"gradient-based methods only")
        return lrp_relevance(ctx.model, ctx.x, ctx.targets, self.id)
