"""The command line: LightningCLI configs, and Figure 4 rebuilt from a run's files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_deconv.callback import DeconvCallback
from lightning_deconv.paper.cli import CONFIGS, DeconvCLI, main
from lightning_deconv.paper.figure4 import figure4
from lightning_deconv.record import RecordError, find_firings


def test_demo_config_trains_and_figure4_is_rebuilt_from_the_run(tmp_path, capsys):
    cli = DeconvCLI(
        [
            "fit",
            "--config", str(CONFIGS / "demo.yaml"),
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.samples_per_epoch=128",
            "--data.init_args.val_per_class=2",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10  # linked from the data
    assert cli.model.hparams.input_size == 64
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, DeconvCallback))
    assert list(callback.features) == [f"model.features.{n}" for n in ("pool1", "pool2", "relu3", "relu4", "pool5")]
    run = Path(cli.trainer.log_dir)
    assert [p.name for p in find_firings(tmp_path)] == ["epoch_001.pt", "epoch_002.pt"]
    capsys.readouterr()

    main(["figure4", str(run), "-o", str(tmp_path / "figure4.png")])
    assert "Wrote" in capsys.readouterr().out
    with Image.open(tmp_path / "figure4.png") as image:
        width, height = image.size
    assert width > height > 500  # five blocks side by side, eight features down
    one_layer = figure4(run, tmp_path / "layer1.png", layers=["model.features.pool1"])
    with Image.open(one_layer) as image:
        assert image.size[0] < width
    with pytest.raises(RecordError, match="tracked no layer"):
        figure4(run, tmp_path / "x.png", layers=["model.features.conv9"])


def test_figure4_without_firings_says_where_to_point(tmp_path):
    with pytest.raises(RecordError, match="no DeconvCallback files"):
        find_firings(tmp_path)


def test_imagenet_config_is_the_papers_setting(tmp_path):
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / label / "a.png")
    cli = DeconvCLI(["--config", str(CONFIGS / "zfnet_imagenet.yaml"), "--data.init_args.root", str(tmp_path)],
                    run=False)  # fmt: skip
    model = cli.model.model
    assert model.features.conv1.out_channels == 96 and model.features.conv1.kernel_size == (7, 7)
    assert model.classifier.fc8.out_features == 2  # linked from the folders
    assert cli.trainer.max_epochs == 70 and cli.datamodule.hparams.batch_size == 128
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, DeconvCallback))
    assert callback.epochs == (1, 2, 5, 10, 20, 30, 40, 64)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 2)
