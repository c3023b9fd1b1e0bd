r"""Image classifier: ZFNet trained as Zeiler & Fergus trained it, as a LightningModule.

The paper (Sec. 3) trains with stochastic gradient descent, learning rate :math:`10^{-2}`, momentum 0.9,
dropout 0.5 in the fully connected layers, and lowers the learning rate by hand when the validation
error plateaus (here: optionally, a ``StepLR`` every ``lr_step_epochs`` epochs). The filter
renormalisation of Sec. 3 is a separate callback, :class:`~lightning_deconv.paper.clipping.FilterRMSClip`.

Initialisation departs from the paper where it must. The paper draws every weight at the scale
:math:`10^{-2}`, which in a net without batch norm shrinks the signal at every layer, so that in a
CPU-sized run the first layer barely learns. ``init="he"`` keeps the paper's draw for conv1 only, so
its filters start as faint noise that learning soon outgrows (Fig. 6 of the paper shows what they become),
and gives every other layer He-normal weights (He et al. 2015) so that conv1 receives a strong gradient
from the first step; biases start at zero and the output layer small. ``init="torch"`` keeps PyTorch's
defaults.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_deconv.paper.models import ZFNet

__all__ = ["ImageClassifier"]


@torch.no_grad()
def _he_init(model: ZFNet, first_std: float = 1e-2, last_std: float = 1e-2) -> None:
    """He-normal weights and zero biases; conv1 and the output layer from N(0, std^2)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    nn.init.normal_(model.features.conv1.weight, std=first_std)
    nn.init.normal_(model.classifier.fc8.weight, std=last_std)


class ImageClassifier(LightningModule):
    """ZFNet with cross-entropy, top-1 accuracy and the paper's SGD.

    Logs ``train/loss``, ``train/acc``, ``val/loss`` and ``val/acc`` (the last on the progress bar).

    Args:
        num_classes: number of classes.
        width: ZFNet's channel multiplier (1.0 is the paper's network).
        input_size: side of the square input images.
        dropout: dropout probability before fc6 and fc7.
        lr: SGD learning rate (the paper: ``1e-2``).
        momentum: SGD momentum (the paper: ``0.9``).
        weight_decay: L2 penalty.
        lr_step_epochs: if set, multiply the learning rate by ``lr_gamma`` every this many epochs.
        lr_gamma: the factor of that step.
        init: ``"he"``: conv1 from N(0, 1e-2) as in the paper, He-normal elsewhere (see the module
            docstring); ``"torch"``: PyTorch's default initialisation.
        stem: ZFNet's first layer (``"zfnet"``: 7x7 at stride 2) or AlexNet's (``"alexnet"``: 11x11 at stride
            4, with a stride-1 conv2), see :class:`~lightning_deconv.paper.models.ZFNet`.

    Raises:
        ValueError: if ``num_classes < 2``, ``lr <= 0``, ``lr_step_epochs < 1``, ``init`` is unknown or the
            model arguments are invalid.

    Example::

        >>> model = ImageClassifier(num_classes=10, width=0.25, input_size=64)
        >>> model(model.example_input_array).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        input_size: int = 224,
        dropout: float = 0.5,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_step_epochs: int | None = None,
        lr_gamma: float = 0.1,
        init: Literal["he", "torch"] = "he",
        stem: Literal["zfnet", "alexnet"] = "zfnet",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2, got {num_classes}.")
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got {lr}.")
        if lr_step_epochs is not None and lr_step_epochs < 1:
            raise ValueError(f"`lr_step_epochs` must be None or >= 1, got {lr_step_epochs}.")
        if init not in ("he", "torch"):
            raise ValueError(f"`init` must be 'he' or 'torch', got {init!r}.")
        self.save_hyperparameters()
        self.model = ZFNet(num_classes=num_classes, width=width, input_size=input_size, dropout=dropout, stem=stem)
        if init == "he":
            _he_init(self.model)
        # Top-1 accuracy over all samples ("micro"), not torchmetrics' default per-class mean.
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.example_input_array = torch.zeros(2, 3, input_size, input_size)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]`` of images ``[N, 3, input_size, input_size]``."""
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.lr_step_epochs is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.lr_step_epochs, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
