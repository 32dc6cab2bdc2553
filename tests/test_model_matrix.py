"""Issue 18, item 1: the compatibility matrix (benchmarks/model_matrix.py) on a representative subset, and
its checks on models where they must fail, so that an ``ok`` cell means something."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from saliency.models import load_model

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "model_matrix.py"
_spec = importlib.util.spec_from_file_location("model_matrix", _SCRIPT)
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)

#: One method of each kind: a plain gradient, a CAM, a ReLU rule, an LRP rule.
FEW = ["gradient", "gradcam", "guided_backprop", "lrp_zplus"]
RELU_REFUSED, LRP_REFUSED = "refused: guided_backprop: a ReLU backward rule", "refused: LRP cannot cover"


def _small(name: str) -> tuple[nn.Module, int]:
    """The architecture at the smallest input it runs on with a CAM layer larger than 1×1 (a ViT built
    for 32² inputs: 2×2 patches, the same graph; densenet121 at 32², its CAM layer given: 2×2)."""
    if name == "functional_resnet":
        return load_model("models_for_tests:functional_resnet"), 32
    if name == "vit_b_16":
        torch.manual_seed(0)
        model = torchvision.models.vit_b_16(num_classes=10, image_size=32)
        nn.init.normal_(model.heads.head.weight, std=0.01)
        return model, 32
    sizes = {"resnet18": 64, "densenet121": 32, "mobilenet_v3_small": 64, "efficientnet_b0": 64,
             "convnext_tiny": 64, "swin_t": 64, "shufflenet_v2_x0_5": 64}
    return matrix.build(name), sizes[name]


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [
    ("resnet18", ["ok"] * 4),
    ("densenet121", ["ok"] * 4),
    ("functional_resnet", ["ok"] * 4),
    ("mobilenet_v3_small", ["ok", "ok", RELU_REFUSED, LRP_REFUSED]),
    ("efficientnet_b0", ["ok", "ok", RELU_REFUSED, LRP_REFUSED]),
    ("convnext_tiny", ["ok", "ok", RELU_REFUSED, LRP_REFUSED]),
    ("swin_t", ["ok", "ok", RELU_REFUSED, LRP_REFUSED]),  # a channels-last CAM layer
    ("vit_b_16", ["ok", "ok", RELU_REFUSED, LRP_REFUSED]),  # a token CAM layer
    ("shufflenet_v2_x0_5", ["ok", "ok", "ok", "refused: LRP does not conserve relevance on ShuffleNetV2 for lrp_zplus"]),
])
def test_each_cell_is_right_or_refused(name, expected):
    model, size = _small(name)
    layer = "features.denseblock3" if name == "densenet121" else None
    row = matrix.model_row(name, model=model, size=size, only=FEW, layer=layer)
    assert row["size"] == size
    for column, want in zip(FEW, expected):
        assert row["cells"][column].startswith(want), (name, column, row["cells"][column])


class _ExpNet(nn.Module):
    """A soft rectifier written as log(1 + exp(x)): no ReLU rule reaches it, and the library's census does
    not list exp (the matrix's does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.log1p(torch.exp(self.conv(x))).mean((2, 3)))


def _one_sign_net() -> nn.Module:
    """A 1×1 conv with positive weights after a ReLU: every neuron has contributions of one sign, where α2β1
    hands on α·R (nothing for β to take): relevance grows by α at each such layer; z⁺ conserves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight.abs_()
        model[6].weight.abs_()
    return model.eval()


def test_the_checks_can_fail(monkeypatch):
    """A ReLU rule that meets an activation it does not define, and an LRP rule that does not conserve,
    are WRONG, never ok; a CAM at a 1×1 layer too. The library refuses the LRP rule before any compute;
    without that refusal the matrix's own property check finds it."""
    x = torch.rand(2, 3, 8, 8)
    row = matrix.model_row("exp", model=_ExpNet(), size=8, only=["gradient", "guided_backprop"])["cells"]
    assert row["gradient"] == "ok"
    assert row["guided_backprop"] == "WRONG: the rule met nonlinearities it does not define (exp ×1)"
    row = matrix.model_row("one sign", model=_one_sign_net(), size=8, only=["lrp_zplus", "lrp_alpha2beta1"])["cells"]
    assert row["lrp_zplus"] == "ok"
    assert row["lrp_alpha2beta1"].startswith("refused: LRP does not conserve relevance on Sequential for "
                                             "lrp_alpha2beta1 (Σ R / |y_c| = ")
    monkeypatch.setattr(matrix, "check_conservation", lambda *args: None)
    row = matrix.model_row("one sign", model=_one_sign_net(), size=8, only=["lrp_alpha2beta1"])["cells"]
    assert row["lrp_alpha2beta1"].startswith("WRONG: Σ R / |y_c| on a bias-free copy = ")
    ratios = [float(r) for r in row["lrp_alpha2beta1"].rsplit("= ", 1)[1].split(", ")]
    assert all(r > 1.9 for r in ratios), ratios  # α = 2 at each one-signed layer (the head and the 1×1 conv)
    model = nn.Sequential(nn.Conv2d(3, 4, 8), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)).eval()
    targets = torch.zeros(2, 1, dtype=torch.long)
    assert matrix.cells(model, x, targets, ["gradcam"])["gradcam"].startswith("WRONG: the CAM layer's output is (1, 4, 1, 1)")


def test_the_table_renders_counts_and_reasons(tmp_path):
    data = {"models": {"a": {"size": 32, "seconds": 1.0, "cells": {
        "gradient": "ok", "guided_backprop": "refused: guided_backprop: a ReLU backward rule is defined for ReLU only, "
        "and this model also runs GELU ×2 (calls in one forward); …", "lrp_zplus": "WRONG: Σ R / |y_c| = 2, 2"}}}}
    text = matrix.render(data)
    assert "1 architectures, 3 cells: 1 ok, 1 refused, 1 WRONG, 0 ERROR" in text
    assert "refused: ReLU rule: runs GELU ×2" in text and "- a × `lrp_zplus`: WRONG: Σ R / |y_c| = 2, 2" in text
