"""CIFAR-10 ResNet-20 (He et al. 2016, 6n+2 layers, n = 3) with option-A shortcuts, written after
akamaster/pytorch_resnet_cifar10, whose trained weights ship in ``saliency/assets`` (NOTICE.md there).

The architecture keeps the author's parameter names and functional ReLUs (``F.relu``), so his
state_dict loads strictly; the global average pool is a module (``nn.AdaptiveAvgPool2d``, the same
numbers as the author's ``F.avg_pool2d``) so that LRP can give it zennit's pooling rule.

LRP sees it as any other model (``saliency.canonize``, from its graph): every BatchNorm merged into
its convolution, each block's ``out + shortcut`` a relevance-splitting sum; the option-A shortcut
(subsample, zero-pad channels) and the functional ReLUs need no rule: they route each value to at most
one place, and relevance at a switched-off ReLU is already zero.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saliency.assets import read_asset

CIFAR_RESNET20 = "cifar_resnet20"
WEIGHTS_ASSET = "cifar_resnet20.th"
#: The author's input normalisation (ImageNet statistics, as his training script uses; not CIFAR's own).
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class BasicBlock(nn.Module):
    """conv3×3-bn-relu-conv3×3-bn, plus the shortcut, then ReLU. Where the shape changes the shortcut
    is option A: keep every second pixel and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if stride != 1 or in_planes != planes else None

    def shortcut(self, x: Tensor) -> Tensor:
        if self.pad is None:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv3×3(3→16)-bn-relu, three stages of BasicBlocks at 16, 32, 64 channels (32², 16², 8²), global
    average pooling and ``linear``; the author's initialisation (Kaiming normal for conv and linear)."""

    def __init__(self, num_blocks: tuple[int, int, int] = (3, 3, 3), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(16, 32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(32, 64, num_blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def cifar_resnet20() -> CifarResNet:
    """ResNet-20 for 3×32×32 CIFAR-10 images (10 logits) with random initialisation."""
    return CifarResNet((3, 3, 3))


def load_cifar_resnet20(weights: str | Path | None = None) -> CifarResNet:
    """ResNet-20 in eval mode with the shipped weights (sha256 checked) or a ``weights`` file: the
    author's checkpoint format or a plain state_dict, read with ``weights_only=True``, loaded strictly."""
    model = cifar_resnet20()
    if weights is None:
        source, data = f"shipped {WEIGHTS_ASSET}", read_asset(WEIGHTS_ASSET)
    else:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"weights file {str(path)!r} does not exist")
        source, data = f"weights file {str(path)!r}", path.read_bytes()
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, truncated files, disallowed objects
        raise ValueError(f"cannot read {source} as a state_dict (torch.load weights_only=True): "
                         f"{error}") from error
    state = _state_dict(checkpoint, source)
    _check_keys(model, state, source)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_keys(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """A short ValueError for missing or unexpected keys and shape mismatches (load_state_dict's own
    message lists all 97 keys)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    problems = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches (file vs model)", mismatched)) if items]
    if problems:
        raise ValueError(f"{source} does not match {CIFAR_RESNET20}: " + "; ".join(problems))


def _state_dict(checkpoint: object, source: str) -> dict[str, Tensor]:
    """The author's ``{"best_prec1", "state_dict"}`` with DataParallel's ``module.`` prefix, or a plain
    state_dict, as a state_dict of this module's names."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"{source} does not hold a state_dict (name -> tensor)")
    if checkpoint and all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    # Files saved before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked; BatchNorm's own loader fills
    # it in for such files, which it recognises by the missing version metadata of a fresh dict.
    return dict(checkpoint)


__all__ = ["BasicBlock", "CIFAR_CLASSES", "CIFAR_MEAN", "CIFAR_RESNET20", "CIFAR_STD", "CifarResNet",
           "cifar_resnet20", "load_cifar_resnet20"]
