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


def test_alexnet_stem_config_is_the_demo_with_alexnets_first_layer():
    import yaml

    demo, alexnet = (yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()) for name in ("demo", "demo_alexnet_stem"))
    assert alexnet["model"].pop("stem") == "alexnet"
    assert alexnet["trainer"]["logger"]["init_args"].pop("name") == "demo_alexnet_stem"
    demo["trainer"]["logger"]["init_args"].pop("name")
    assert alexnet == demo  # everything else the same


def test_alexnet_stem_config_builds_alexnets_first_layer_with_valid_maps():
    cli = DeconvCLI(["--config", str(CONFIGS / "demo_alexnet_stem.yaml")], run=False)
    features = cli.model.model.features
    assert features.conv1.kernel_size == (11, 11) and features.conv1.stride == (4, 4)
    assert features.conv2.stride == (1, 1)  # AlexNet's conv2: the total stride from pool2 on stays 16
    with torch.no_grad():
        assert cli.model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def _tiny_run(tmp_path: Path, seed: int) -> Path:
    import lightning.pytorch as L
    from helpers import dataset, module_class
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path, name=f"seed{seed}"),
        callbacks=[DeconvCallback(probe=dataset(8, 3).tensors[0], features_per_layer=3, epochs=(1,))],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module_class(L)())
    return Path(trainer.log_dir)


def test_figure6_sets_two_runs_side_by_side(tmp_path, capsys):
    from lightning_deconv.analysis.spectrum import filter_spectrum
    from lightning_deconv.paper.figure6 import figure6, last_firing, measures_text

    first, second = _tiny_run(tmp_path, 0), _tiny_run(tmp_path, 1)
    capsys.readouterr()
    main(["figure6", str(first), str(second), "-o", str(tmp_path / "figure6.png"), "--dpi", "60"])
    assert "Wrote" in capsys.readouterr().out
    with Image.open(tmp_path / "figure6.png") as image:
        width, height = image.size
    assert width == pytest.approx(2 * 4.6 * 60, abs=2) and height == pytest.approx(9 * 60, abs=2)  # two columns
    firing = last_firing(first)
    assert firing["epoch"] == 2  # the last firing (at the end of training)
    weight = firing["filters"]["weight"]
    assert firing["filters"]["name"] == "net.0" and weight.shape == (8, 3, 5, 5)
    text = measures_text(firing, "net.6")
    low, mid, high = filter_spectrum(weight).mean(dim=0).tolist()
    assert f"low {low:.2f} / mid {mid:.2f} / high {high:.2f}" in text and "5x5" in text
    assert f"aliasing of net.6: {firing['measures']['deconv/net.6/aliasing']:.4f}" in text
    assert f"net.3 {firing['measures']['deconv/net.3/dead']:.2f}" in text
    with pytest.raises(RecordError, match="tracked no layer"):
        figure6([first, second], tmp_path / "x.png", layer="net.9")
    path = find_firings(second)[-1]
    torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "filters"}, path)
    with pytest.raises(RecordError, match=r"holds no first-layer filters.*measures=True"):
        figure6([first, second], tmp_path / "x.png")
