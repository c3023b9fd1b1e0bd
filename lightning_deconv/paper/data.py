"""Data: ImageNet-style folders, and an offline default built from photographs that ship with the wheels.

``ImageFolderDataModule`` reads the usual ``root/train/<class>/*`` and ``root/val/<class>/*`` layout with
the standard augmentation (random resized crop and flip for training; resize and centre crop for
validation), as Zeiler & Fergus trained on ImageNet.

``ExemplarDataModule`` needs no download. It takes the colour photographs bundled inside scikit-image
and scikit-learn and turns them into the surrogate task of Exemplar-CNN (Dosovitskiy et al., NIPS 2014):
every photograph is its own class, and a training sample is a crop of it at a random position and
scale, randomly flipped and colour-jittered. Telling the photographs apart from small crops needs edges,
colours and textures, which is what the first layers should learn to detect.

Both expose ``num_classes`` and ``probe_dataset()``: a fixed set of images, always transformed the same
way, on which a monitoring callback can look for each feature's strongest activation epoch after epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PHOTOS", "ExemplarDataModule", "ImageFolderDataModule"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
LAYOUT = "Expected an ImageNet-style layout: <root>/train/<class>/<image> and <root>/val/<class>/<image>."


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


# Colour photographs stored inside the installed wheels (no pooch download): one class each.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}

# Photos are stored with their shorter side at this multiple of the input size, so that the smallest crop
# (``min_scale`` of that side, 1/4 by default) is resized without upsampling and stays sharp.
_PHOTO_SCALE = 4


@functools.cache
def _decode(name: str) -> Tensor:
    """The photograph ``name`` as a ``[3, H, W]`` uint8 tensor, decoded once per process."""
    return torch.from_numpy(np.array(PHOTOS[name]()[..., :3])).permute(2, 0, 1).contiguous()


def _normalize(image: Tensor) -> Tensor:
    """uint8 ``[3, H, W]`` to float32 normalised with the ImageNet mean and std."""
    return TF.normalize(image.float().div_(255), list(IMAGENET_MEAN), list(IMAGENET_STD))


def _crop_box(height: int, width: int, min_scale: float, generator: torch.Generator | None) -> tuple[int, ...]:
    """A random square ``(top, left, side)`` whose side is ``min_scale`` to 1 times the shorter side."""
    short = min(height, width)
    low = max(1, round(min_scale * short))
    side = int(torch.randint(low, short + 1, (1,), generator=generator))
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
    return top, left, side


def _crop(photo: Tensor, box: Sequence[int], size: int) -> Tensor:
    top, left, side = box
    return TF.resize(photo[:, top : top + side, left : left + side], [size, size], antialias=True)


class _RandomCrops(Dataset):
    """``length`` fresh augmented crops; sample ``i`` belongs to class ``i % len(photos)``.

    Randomness comes from torch's global RNG, which ``seed_everything`` seeds in the main process and
    DataLoader seeds per worker, so an epoch is reproducible.
    """

    def __init__(self, photos: Sequence[Tensor], length: int, size: int, min_scale: float) -> None:
        self.photos, self.length, self.size, self.min_scale = photos, length, size, min_scale
        self.jitter = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = index % len(self.photos)
        photo = self.photos[label]
        image = _crop(photo, _crop_box(*photo.shape[1:], self.min_scale, None), self.size)
        if torch.rand(()) < 0.5:
            image = TF.horizontal_flip(image)
        return _normalize(self.jitter(image)), label


class _FixedCrops(Dataset):
    """Crops drawn once with a seeded generator, no flips or jitter: the same images on every access."""

    def __init__(self, photos: Sequence[Tensor], per_class: int, size: int, min_scale: float, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        images, labels = [], []
        for label, photo in enumerate(photos):
            height, width = photo.shape[1:]
            short = min(height, width)
            # The first crop of each class is the central square of the whole photograph.
            boxes = [((height - short) // 2, (width - short) // 2, short)]
            boxes += [_crop_box(height, width, min_scale, generator) for _ in range(per_class - 1)]
            images += [_crop(photo, box, size) for box in boxes]
            labels += [label] * per_class
        self.images = torch.stack(images)
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return _normalize(self.images[index]), int(self.labels[index])


class ExemplarDataModule(LightningDataModule):
    """Exemplar-CNN's surrogate task (Dosovitskiy et al. 2014) on the photographs bundled with the wheels.

    Each photograph of :data:`PHOTOS` is one class. Training samples are crops at a random position and
    scale (``min_scale`` to 1 times the photo's shorter side), flipped and colour-jittered, resized to
    ``input_size``; an epoch has ``samples_per_epoch`` of them, the same number per class. Validation
    uses ``val_per_class`` crops per class drawn once from ``seed`` (no flips, no jitter), so it is the
    same set in every run; ``probe_dataset()`` returns that fixed set.

    Args:
        input_size: side of the square crops fed to the network.
        batch_size: images per batch.
        samples_per_epoch: training crops per epoch.
        val_per_class: fixed validation crops per photograph.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: seed of the validation crops; training randomness follows torch's global RNG
            (seed it with ``seed_everything``).
        photos: names of the photographs to use (default: all of :data:`PHOTOS`).
        min_scale: smallest crop side, as a fraction of the photograph's shorter side.

    Raises:
        ValueError: if a size or count is not positive, ``min_scale`` is not in ``(0, 1]``, or a photo name
            is unknown (the message lists the available ones).

    Example::

        >>> data = ExemplarDataModule(input_size=64, samples_per_epoch=640, val_per_class=8)
        >>> data.setup("fit")
        >>> images, labels = next(iter(data.train_dataloader()))
        >>> images.shape, data.num_classes
        (torch.Size([64, 3, 64, 64]), 10)
    """

    def __init__(
        self,
        input_size: int = 64,
        batch_size: int = 64,
        samples_per_epoch: int = 4096,
        val_per_class: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        photos: list[str] | None = None,
        min_scale: float = 0.25,
    ) -> None:
        super().__init__()
        for name, value in dict(
            input_size=input_size, batch_size=batch_size, samples_per_epoch=samples_per_epoch
        ).items():
            if value < 1:
                raise ValueError(f"`{name}` must be at least 1, got {value}.")
        if val_per_class < 1 or num_workers < 0:
            raise ValueError(f"Need val_per_class >= 1 and num_workers >= 0, got {val_per_class}, {num_workers}.")
        if not 0 < min_scale <= 1:
            raise ValueError(f"`min_scale` must be in (0, 1], got {min_scale}.")
        photos = list(PHOTOS) if photos is None else list(photos)
        unknown = [name for name in photos if name not in PHOTOS]
        if unknown or len(photos) < 2:
            raise ValueError(f"Need at least two photos from {sorted(PHOTOS)}; got {photos} (unknown: {unknown}).")
        self.save_hyperparameters()
        self.classes = photos
        self._photos: list[Tensor] | None = None
        self._val: _FixedCrops | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes: one per photograph."""
        return len(self.classes)

    def _resized_photos(self) -> list[Tensor]:
        if self._photos is None:
            side = _PHOTO_SCALE * self.hparams.input_size
            self._photos = [TF.resize(_decode(name), side, antialias=True) for name in self.classes]
        return self._photos

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self._val is None:
            self._val = _FixedCrops(self._resized_photos(), hp.val_per_class, hp.input_size, hp.min_scale, hp.seed)

    def probe_dataset(self) -> Dataset:
        """The fixed validation crops (the first of each class is the whole photograph)."""
        self.setup()
        return self._val

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        train = _RandomCrops(self._resized_photos(), hp.samples_per_epoch, hp.input_size, hp.min_scale)
        return DataLoader(
            train,
            batch_size=hp.batch_size,
            shuffle=True,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._val, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)


def _class_folders(split: Path) -> list[str]:
    """The class folders of one split, checking that each holds at least one image."""
    if not split.is_dir():
        raise FileNotFoundError(f"Missing folder {split}. {LAYOUT}")
    classes = sorted(entry.name for entry in split.iterdir() if entry.is_dir())
    if not classes:
        raise ValueError(f"Folder {split} holds no class folders. {LAYOUT}")
    empty = [c for c in classes if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (split / c).iterdir())]
    if empty:
        raise ValueError(
            f"Class folder(s) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} in {split} hold no "
            f"images (allowed extensions: {', '.join(IMG_EXTENSIONS)}). {LAYOUT}"
        )
    return classes


class ImageFolderDataModule(LightningDataModule):
    """ImageNet-style folders with the standard augmentation.

    Training: ``RandomResizedCrop(input_size)`` and a horizontal flip. Validation (and the probe set):
    ``Resize(input_size * 256 / 224)`` then ``CenterCrop(input_size)``. Both normalise with the ImageNet
    mean and std.

    Args:
        root: folder holding ``train/<class>/*`` and ``val/<class>/*``, with the same class folders.
        input_size: side of the square crops fed to the network.
        batch_size: images per batch (the paper: 128).
        num_workers: DataLoader worker processes.

    Raises:
        FileNotFoundError: from ``setup()`` (or ``num_classes``) if ``root/train`` or ``root/val`` is missing.
        ValueError: from ``setup()`` if a split has no class folders, a class folder has no images, or the
            two splits' classes differ.

    Example::

        >>> data = ImageFolderDataModule("/data/imagenet", input_size=224, batch_size=128)  # doctest: +SKIP
        >>> data.setup("fit"); data.num_classes  # doctest: +SKIP
        1000
    """

    def __init__(self, root: str, input_size: int = 224, batch_size: int = 128, num_workers: int = 4) -> None:
        super().__init__()
        if input_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"Need input_size >= 1, batch_size >= 1, num_workers >= 0; got {input_size}, {batch_size}, "
                f"{num_workers}."
            )
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        normalize = [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
        self.train_transform = v2.Compose(
            [v2.RandomResizedCrop(input_size, antialias=True), v2.RandomHorizontalFlip(), *normalize]
        )
        self.val_transform = v2.Compose(
            [v2.Resize(int(input_size * 256 / 224), antialias=True), v2.CenterCrop(input_size), *normalize]
        )
        self.train_set: ImageFolder | None = None
        self.val_set: ImageFolder | None = None

    @property
    def num_classes(self) -> int:
        """Number of class folders in ``root/train``."""
        return len(self.train_set.classes) if self.train_set is not None else len(_class_folders(self.root / "train"))

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            train, val = _class_folders(self.root / "train"), _class_folders(self.root / "val")
            if train != val:
                missing, extra = sorted(set(train) - set(val)), sorted(set(val) - set(train))
                raise ValueError(
                    f"{self.root}/train and {self.root}/val must hold the same class folders; val lacks "
                    f"{missing[:5]} and has extra {extra[:5]}."
                )
            self.val_set = ImageFolder(str(self.root / "val"), transform=self.val_transform)
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = ImageFolder(str(self.root / "train"), transform=self.train_transform)

    def probe_dataset(self) -> Dataset:
        """The validation set with its deterministic transforms."""
        self.setup("validate")
        return self.val_set

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
