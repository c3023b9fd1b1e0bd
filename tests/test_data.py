"""The offline Exemplar-CNN data and the ImageNet-style folder data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_deconv.paper.data import PHOTOS, ExemplarDataModule, ImageFolderDataModule


def test_exemplar_classes_shapes_and_fixed_validation():
    data = ExemplarDataModule(input_size=32, batch_size=10, samples_per_epoch=20, val_per_class=3)
    assert data.num_classes == len(PHOTOS) == 10
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.float32
    assert len(data.train_dataloader()) == 2
    assert labels.min() >= 0 and labels.max() < 10
    # Normalised: roughly centred, not in [0, 1].
    assert images.min() < 0 < images.max()

    val = data.val_dataloader().dataset
    assert len(val) == 30 and sorted(val.labels.tolist()) == sorted(list(range(10)) * 3)
    again = ExemplarDataModule(input_size=32, val_per_class=3)
    probe, other = data.probe_dataset(), again.probe_dataset()
    assert all(torch.equal(probe[i][0], other[i][0]) and probe[i][1] == other[i][1] for i in range(30))
    assert torch.equal(probe[4][0], probe[4][0])
    reseeded = ExemplarDataModule(input_size=32, val_per_class=3, seed=1).probe_dataset()
    assert not torch.equal(probe[1][0], reseeded[1][0])


def test_exemplar_training_crops_are_random_but_reproducible():
    data = ExemplarDataModule(input_size=32, samples_per_epoch=8, photos=["astronaut", "coffee"])
    assert data.num_classes == 2
    train = data.train_dataloader().dataset
    torch.manual_seed(0)
    first = [train[i] for i in range(4)]
    second = [train[i] for i in range(4)]
    assert [label for _, label in first] == [0, 1, 0, 1]
    assert all(not torch.equal(a, b) for (a, _), (b, _) in zip(first, second, strict=True))
    torch.manual_seed(0)
    assert all(torch.equal(a, train[i][0]) for i, (a, _) in enumerate(first))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"photos": ["astronaut", "lena"]}, "lena"), ({"min_scale": 0.0}, "min_scale"), ({"input_size": 0}, "input_size")],
)
def test_exemplar_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExemplarDataModule(**kwargs)


def make_tree(root, splits=("train", "val"), classes=("ant", "bee"), per_class=2):
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_loads_an_imagenet_layout(tmp_path):
    make_tree(tmp_path)
    data = ImageFolderDataModule(str(tmp_path), input_size=32, batch_size=4, num_workers=0)
    assert data.num_classes == 2
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and sorted(labels.tolist()) == [0, 0, 1, 1]
    probe = data.probe_dataset()
    assert len(probe) == 4 and torch.equal(probe[3][0], probe[3][0]) and probe[3][1] == 1
    val_images, _ = next(iter(data.val_dataloader()))
    assert val_images.shape == (4, 3, 32, 32)


def test_image_folder_errors_name_the_folder_and_the_layout(tmp_path):
    make_tree(tmp_path, splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"val.*Expected an ImageNet-style layout"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match=r"val holds no class folders"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
    (tmp_path / "val" / "ant").mkdir()
    with pytest.raises(ValueError, match=r"ant in .*val hold no images"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
    (tmp_path / "val" / "ant" / "0.png").write_bytes((tmp_path / "train" / "ant" / "0.png").read_bytes())
    with pytest.raises(ValueError, match=r"same class folders.*bee"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
