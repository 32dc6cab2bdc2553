"""The second reference architecture: a small torchvision ResNet for the bundled MNIST digits.

Its own module, so that only a process that builds it imports torchvision (``saliency.models`` builds it
through ``reference_resnet`` and hands out the class on first use).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock


class ReferenceResNet(ResNet):
    """A small torchvision ResNet for 1×28×28 digits: stem conv3x3-bn-relu (no max-pool), three stages
    of torchvision ``BasicBlock``s at 28², 14² and 7² (the first block of a stage strides by 2 and
    projects the shortcut with conv1x1-bn), global average pooling and ``fc``.

    It is a ``torchvision.models.ResNet`` with torchvision's attribute names (``conv1, bn1, relu,
    layer1..layer3, avgpool, fc``) and blocks built by ResNet's own ``_make_layer``, so code that
    recognises ResNets (zennit's ResNetCanonizer, block-wise randomisation) treats it as one. As in
    torchvision, ReLUs are in-place and each block reuses its ReLU module twice. There is no
    ``maxpool`` or ``layer4``: ``forward`` is this class's own.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: tuple[int, ...] = (16, 32, 64), blocks: tuple[int, ...] = (1, 1, 1)) -> None:
        if len(widths) != 3 or len(blocks) != 3:
            raise ValueError(f"ReferenceResNet has three stages, got widths={widths}, blocks={blocks}")
        # ResNet.__init__ would build the ImageNet stem and four 64–512-channel stages; set the state
        # that ResNet._make_layer reads instead and build the small network with it.
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(BasicBlock, widths[0], blocks[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2] * BasicBlock.expansion, num_classes)
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
