"""ZFNet, the network of Zeiler & Fergus (ECCV 2014, Fig. 3), with a width multiplier for CPU-sized runs.

Layout as torchvision's AlexNet: ``features`` (five conv stages, named ``conv1`` ... ``pool5``) and
``classifier`` (fc6, fc7 with dropout, then the C-way layer). At 224x224 input the feature maps are
110, 55, 26, 13, 13, 13 and 6 pixels wide, as in the paper.

``stem="alexnet"`` puts back what the paper changed (Sec. 5, Fig. 6): AlexNet's first layer, 11x11 filters
at stride 4 (padding 2, as torchvision's AlexNet), with AlexNet's stride-1 conv2 (5x5, padding 2). The fix
moved a factor 2 of stride from conv1 to conv2, so with the conv2 of its own network each stem keeps the
total stride of 16 from pool2 on, and every later layer is the same (a 64 px input gives maps of 15, 8, 8,
4, 4, 4, 4 and 1 pixels instead of ZFNet's 30, 15, 6, 3, 3, 3, 3 and 1, with the same pool5 and classifier).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["STEMS", "ZFNet", "zfnet"]

# First layer (kernel, stride, padding) and conv2 (stride, padding) of each stem.
STEMS = {"zfnet": ((7, 2, 1), (2, 0)), "alexnet": ((11, 4, 2), (1, 2))}


def _norm() -> nn.Module:
    # The paper's "contrast normalization across feature maps", in AlexNet's form.
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)


class ZFNet(nn.Module):
    """ZFNet (Zeiler & Fergus 2014, Fig. 3).

    Args:
        num_classes: size of the output layer (1000 for ImageNet).
        width: multiplier on every layer's channel count (1.0 is the paper's 96-256-384-384-256-4096-4096).
        input_size: side of the square input; the classifier is sized to the resulting pool5 map.
        dropout: dropout probability before fc6 and fc7 (the paper: 0.5).
        stem: ``"zfnet"`` (conv1 7x7 at stride 2, conv2 at stride 2: the paper's fix) or ``"alexnet"`` (conv1
            11x11 at stride 4, conv2 at stride 1: what it fixed); everything else is the same.

    Example::

        >>> model = ZFNet(num_classes=10, width=0.25, input_size=96)
        >>> model(torch.rand(2, 3, 96, 96)).shape
        torch.Size([2, 10])
        >>> ZFNet(num_classes=10, width=0.25, input_size=64, stem="alexnet").features.conv1
        Conv2d(3, 24, kernel_size=(11, 11), stride=(4, 4), padding=(2, 2))
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        input_size: int = 224,
        dropout: float = 0.5,
        stem: str = "zfnet",
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"`stem` must be one of {sorted(STEMS)}, got {stem!r}.")
        (k1, s1, p1), (s2, p2) = STEMS[stem]
        if num_classes < 1 or width <= 0 or not 0 <= dropout < 1:
            raise ValueError(
                f"Need num_classes >= 1, width > 0, 0 <= dropout < 1; got {num_classes}, {width}, {dropout}."
            )
        c1, c2, c3, c4, c5 = (max(1, round(c * width)) for c in (96, 256, 384, 384, 256))
        fc = max(1, round(4096 * width))
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, c1, k1, stride=s1, padding=p1),
                relu1=nn.ReLU(inplace=True),
                pool1=nn.MaxPool2d(3, stride=2, padding=1),
                norm1=_norm(),
                conv2=nn.Conv2d(c1, c2, 5, stride=s2, padding=p2),
                relu2=nn.ReLU(inplace=True),
                pool2=nn.MaxPool2d(3, stride=2, padding=1),
                norm2=_norm(),
                conv3=nn.Conv2d(c2, c3, 3, padding=1),
                relu3=nn.ReLU(inplace=True),
                conv4=nn.Conv2d(c3, c4, 3, padding=1),
                relu4=nn.ReLU(inplace=True),
                conv5=nn.Conv2d(c4, c5, 3, padding=1),
                relu5=nn.ReLU(inplace=True),
                pool5=nn.MaxPool2d(3, stride=2),
            )
        )
        try:
            with torch.no_grad():
                side = self.features(torch.zeros(1, 3, input_size, input_size)).shape[-1]
        except RuntimeError as error:
            raise ValueError(f"input_size={input_size} is too small for ZFNet.") from error
        self.classifier = nn.Sequential(
            OrderedDict(
                drop6=nn.Dropout(dropout),
                fc6=nn.Linear(c5 * side * side, fc),
                relu6=nn.ReLU(inplace=True),
                drop7=nn.Dropout(dropout),
                fc7=nn.Linear(fc, fc),
                relu7=nn.ReLU(inplace=True),
                fc8=nn.Linear(fc, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def zfnet(
    num_classes: int = 1000, width: float = 1.0, input_size: int = 224, dropout: float = 0.5, stem: str = "zfnet"
) -> ZFNet:
    """Build a :class:`ZFNet` (the paper's network at ``width=1.0, input_size=224``)."""
    return ZFNet(num_classes=num_classes, width=width, input_size=input_size, dropout=dropout, stem=stem)
