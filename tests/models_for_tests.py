"""Small seeded models shared by the tests."""
from __future__ import annotations

import copy
import os

import torch
import torchvision
from torch import nn


def resnet18(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes)
    _randomise_batchnorm(model)
    return model.eval()


def vgg16(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vgg16(num_classes=num_classes)
    return model.eval()


def vgg11_bn(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(num_classes=num_classes)
    _randomise_batchnorm(model)
    return model.eval()


def _randomise_batchnorm(model: nn.Module) -> None:
    """Give BatchNorm non-trivial statistics and affine parameters, like a trained network."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


class SmallCNN(nn.Module):
    """VGG-style with BatchNorm, in-place ReLUs, a reused ReLU module and a functional relu."""

    def __init__(self, channels: int = 3, classes: int = 5, bias: bool = True, batchnorm: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1, bias=bias)
        self.bn1 = norm(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=bias)
        self.bn2 = norm(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=bias)
        self.relu = nn.ReLU(inplace=True)  # reused twice below
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32, bias=bias)
        self.fc2 = nn.Linear(32, classes, bias=bias)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.conv3(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(nn.functional.relu(self.fc1(x)))


def small_cnn(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN(**kw)
    _randomise_batchnorm(model)
    return model.eval()


def untrained_cnn(num_classes: int = 10) -> nn.Module:
    """For `model.name=models_for_tests:untrained_cnn`: a digit-sized CNN with torch's random
    initialisation, unseeded (a factory that loads no weights)."""
    return SmallCNN(channels=1, classes=num_classes).eval()


def untrained_rgb_cnn(num_classes: int = 2) -> nn.Module:
    """The same for RGB images (an image folder): `model.name=models_for_tests:untrained_rgb_cnn`."""
    return SmallCNN(channels=3, classes=num_classes).eval()


def without_inplace(model: nn.Module) -> nn.Module:
    """A copy whose ReLU modules are out-of-place and distinct per call site (what hook-based
    libraries such as captum and pytorch-grad-cam need to give correct answers)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return clone


def state_snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_model_untouched(model: nn.Module, snapshot: dict, training: bool = False) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module
        assert not module._backward_hooks and not getattr(module, "_backward_pre_hooks", {}), module
        assert module.training == training


class _CancellingBlock(nn.Module):
    """relu(x + conv(x)) where the 1×1 conv computes [x0 − x1, x1 − x0]: zero whenever both channels
    are equal, so LRP-ε divides its relevance by ε at every block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).view(2, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv(x))


class DeepResidual(nn.Module):
    """A deep residual net whose forward and gradients are finite, and whose LRP-ε relevance overflowed
    float32 while its residual sums copied relevance (×2/ε per block, as on deep CIFAR ResNets no
    class-based canonizer knew); with saliency.canonize's sums it is finite and conserved."""

    def __init__(self, depth: int = 12, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 2, 1, bias=False)
        with torch.no_grad():
            self.stem.weight.fill_(1.0)  # both channels equal
        self.blocks = nn.Sequential(*[_CancellingBlock() for _ in range(depth)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def deep_residual() -> nn.Module:
    torch.manual_seed(0)
    return DeepResidual().eval()


def twin_file() -> str:
    """A twin's weights file for data randomisation, for tests that count, store or aggregate its rows but do
    not read its verdict: a seeded random reference CNN (the project's twin is trained meanwhile by the
    suite's warm-up, tests/conftest.py; tests/test_data_randomization.py checks it)."""
    import tempfile
    from pathlib import Path

    from saliency.models import reference_cnn

    path = Path(tempfile.gettempdir()) / f"saliency-test-twin-{os.getpid()}.pt"
    if not path.is_file():
        torch.manual_seed(1)
        torch.save(reference_cnn().state_dict(), path)
    return str(path)


def count_explain_calls(monkeypatch) -> list[int]:
    """Count the explain calls of saliency.sanity's runner: a one-item list, incremented per call."""
    import saliency.sanity.runner as runner

    calls = [0]
    real = runner.explain

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "explain", counted)
    return calls


class _BrokenBackward(torch.autograd.Function):
    """Identity forward; a backward that records the call in a file and raises (a model bug that every
    image and every retry would hit)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, count_file: str) -> torch.Tensor:
        ctx.count_file = count_file
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with open(ctx.count_file, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        raise ValueError("this model's backward is broken\n(a second line that must not be printed)")


class BrokenBackward(nn.Module):
    def __init__(self, count_file: str, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, num_classes))
        self.count_file = count_file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_BrokenBackward.apply(torch.relu(self.conv(x)), self.count_file))


def broken_backward(num_classes: int = 10) -> nn.Module:
    """For `model.name=models_for_tests:broken_backward`: every backward call is appended to the file
    $SALIENCY_TEST_COUNT_FILE, then raises ValueError."""
    torch.manual_seed(0)
    return BrokenBackward(os.environ["SALIENCY_TEST_COUNT_FILE"], num_classes).eval()


class MixedActivations(nn.Module):
    """A small CNN whose nonlinearities are GELU (module), SiLU (functional) and ReLU6, beside one ReLU:
    what a ReLU backward rule must refuse (SPEC §1.3)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act3 = nn.ReLU6()
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = torch.nn.functional.silu(self.conv2(x))
        return self.head(self.act3(x))


def mixed_activations(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return MixedActivations(num_classes=num_classes).eval()


class DepthwiseWithoutReLU(nn.Module):
    """ShuffleNet's pattern at its plainest: a depthwise conv feeds a 1×1 conv without a ReLU between.
    Both have negative weights, so every depthwise output is negative (its inputs come from a ReLU) and
    still receives z⁺ relevance (x⁻·w⁻ > 0 at the 1×1 conv), but has no positive contribution of its own:
    z⁺ loses it all there. ε conserves."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1, bias=False)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.pointwise = nn.Conv2d(4, 4, 1, bias=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes, bias=False))
        with torch.no_grad():
            self.depthwise.weight.copy_(-self.depthwise.weight.abs())
            self.pointwise.weight.copy_(-self.pointwise.weight.abs())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.pointwise(self.depthwise(torch.relu(self.conv(x))))))


def depthwise_without_relu(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return DepthwiseWithoutReLU(num_classes=num_classes).eval()


class _FunctionalBlock(nn.Module):
    """A CIFAR BasicBlock as users write it: functional ReLUs, the residual sum as ``out + shortcut`` or
    ``out += identity``, and an option-A shortcut (subsample, zero-pad the new channels with F.pad)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, in_place_sum: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2
        self.stride, self.in_place_sum = stride, in_place_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.in_place_sum:
            out += x
            return nn.functional.relu(out)
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = nn.functional.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return nn.functional.relu(out + shortcut)


class FunctionalResNet(nn.Module):
    """A small CIFAR ResNet (16-32-64 channels, two blocks per stage) with functional residual sums and
    option-A shortcuts, its head written with ``view(x.size(0), -1)``: what no class-based canonizer knows."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(_FunctionalBlock(16, 16, in_place_sum=True), _FunctionalBlock(16, 16),
                                    _FunctionalBlock(16, 32, 2), _FunctionalBlock(32, 32, in_place_sum=True),
                                    _FunctionalBlock(32, 64, 2), _FunctionalBlock(64, 64))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(nn.functional.relu(self.bn1(self.conv1(x))))
        out = nn.functional.adaptive_avg_pool2d(out, 1)
        return self.fc(out.view(out.size(0), -1))


def functional_resnet(num_classes: int = 10) -> nn.Module:
    """For `model.name=models_for_tests:functional_resnet`."""
    torch.manual_seed(0)
    model = FunctionalResNet(num_classes)
    _randomise_batchnorm(model)
    return model.eval()


class NanGradient(nn.Module):
    """Finite logits, NaN input gradients: |z| written as √(z²) on a channel whose conv weights are zero,
    so z = 0 and d√u/du = ∞ times 2z = 0 is NaN, which the conv's backward carries to every pixel."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight[1].zero_()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sqrt(self.conv(x) ** 2))


def nan_gradient(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return NanGradient(num_classes=num_classes).eval()
