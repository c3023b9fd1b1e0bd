"""The record a run keeps: every column whatever the crop sizes, atomic files that survive SIGKILL, instances
that never collide, memory and checkpoints that do not grow with the firings, explicit resumes, clean CLI errors."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torchvision
from helpers import Classifier, RectifiedFunctionalPooling, fit, images
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_deconv import DeconvCallback
from lightning_deconv.paper.cli import main
from lightning_deconv.paper.figure4 import figure4
from lightning_deconv.record import RecordError, find_firings, load_record, read_firings
from lightning_deconv.render import PAD_COLOUR, evolution_grid
from lightning_deconv.stages import auto_layers, trace

HERE = Path(__file__).parent
FOUR = (1, 2, 3, 4)


def test_grid_lays_out_crops_of_different_sizes_padded_not_resized():
    small, large = torch.randn(2, 3, 5, 3), torch.randn(2, 3, 7, 9)
    grid = evolution_grid([small, large], ["ep 1", "ep 2"], min_cell=1, padding=0)
    header = 18  # the label strip
    assert grid.shape == (3, header + 2 * 7, 2 * 9)
    cell = grid[:, header : header + 7, :9]  # feature 0, epoch 1: the 5x3 crop centred in 7x9
    pad = torch.tensor(PAD_COLOUR).view(3, 1, 1)
    assert torch.allclose(cell[:, 0], pad.expand(3, 1, 9)[:, 0]) and torch.allclose(cell[:, :, :3], pad.expand(3, 7, 3))
    from lightning_deconv.render import normalize

    assert torch.allclose(cell[:, 1:6, 3:6], normalize(small)[0])  # its pixels untouched


def test_support_crops_that_change_size_keep_every_column(tmp_path):
    """F.max_pool2d in forward: fields unknown, crops cut to each firing's support, whose size changes."""
    L.seed_everything(0, verbose=False)
    callback = DeconvCallback(
        probe=images(8)[0], features_per_layer=4, layers=["net.relu2", "net.relu3"], epochs=FOUR, crop="support"
    )
    data = DataLoader(TensorDataset(*images(16)), batch_size=4)
    fit(tmp_path, Classifier(RectifiedFunctionalPooling, lr=0.5), callback, train=data, max_epochs=4)
    sizes = {e: tuple(c["crops"].shape[-2:]) for e, c in callback.history["net.relu2"].items()}
    assert len(set(sizes.values())) > 1, sizes  # the case that lost every later column
    for layer in callback.features:
        assert sorted(callback.history[layer]) == list(FOUR)
    files = read_firings(find_firings(tmp_path))
    assert [f["epoch"] for f in files] == list(FOUR)
    assert [tuple(f["layers"]["net.relu2"]["crops"].shape[-2:]) for f in files] == list(sizes.values())  # as computed
    figure4(tmp_path, tmp_path / "figure4.png")  # the figure draws them all too


def test_crop_none_and_a_crop_changed_on_resume(tmp_path):
    kwargs = {"probe": images(8)[0], "features_per_layer": 2, "epochs": (1, 2)}
    first = DeconvCallback(**kwargs, crop="none", name="watch")
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[first, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Classifier(), DataLoader(TensorDataset(*images()), batch_size=8))
    assert first.history["net.6"][1]["crops"].shape[-1] == 32  # whole images
    second = DeconvCallback(**kwargs, crop="receptive_field", name="watch")
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[second],
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with pytest.warns(UserWarning, match=r"crop 'none' -> 'receptive_field'.*start afresh") as caught:
        trainer.fit(
            Classifier(), DataLoader(TensorDataset(*images()), batch_size=8), ckpt_path=tmp_path / "ckpt/last.ckpt"
        )
    assert sum("other settings" in str(w.message) for w in caught) == 1
    assert {e for h in second.history.values() for e in h} == {2}  # never a column of the other crop
    assert all(c["crops"].shape[-1] < 32 for h in second.history.values() for c in h.values())


def test_efficientnet_b0_keeps_every_column():
    """Squeeze-excitation blocks: no traceable field, support crops of changing sizes, auto layers by stage."""
    model = torchvision.models.efficientnet_b0(num_classes=4)
    seen = trace(model.eval(), torch.rand(1, 3, 32, 32))
    assert auto_layers(model, seen) == [f"features.{i}" for i in (1, 2, 3, 5, 8)]


def test_efficientnet_b0_fit(tmp_path):
    L.seed_everything(0, verbose=False)
    callback = DeconvCallback(probe=images(4)[0], features_per_layer=2, epochs=FOUR, strict=True)
    build = lambda: torchvision.models.efficientnet_b0(num_classes=4)  # noqa: E731
    data = DataLoader(TensorDataset(*images(8)), batch_size=8)
    fit(tmp_path, Classifier(build, lr=0.1), callback, train=data, max_epochs=4)
    assert list(callback.features) == [f"net.features.{i}" for i in (1, 2, 3, 5, 8)]
    for layer in callback.features:
        assert sorted(callback.history[layer]) == list(FOUR), layer
        assert callback.evolution(layer).shape[0] == 3


@pytest.mark.parametrize(
    "build, expected",
    [
        (torchvision.models.mobilenet_v2, [f"features.{i}" for i in (1, 3, 6, 13, 18)]),
        (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False),
         ["conv1", "conv3", "inception3b", "inception4e", "inception5b"]),
        (torchvision.models.densenet121,
         ["features.pool0"] + [f"features.denseblock{i}" for i in (1, 2, 3, 4)]),
        (torchvision.models.vgg11, [f"features.{i}" for i in (2, 5, 10, 15, 20)]),
        (torchvision.models.resnet18, ["maxpool", "layer1", "layer2", "layer3", "layer4"]),
    ],
)  # fmt: skip
def test_auto_layers_one_per_resolution_stage(build, expected):
    model = build().eval()
    seen = trace(model, torch.rand(1, 3, 64, 64))
    chosen = auto_layers(model, seen)
    assert chosen == expected
    sizes = [tuple(seen.shapes[name][-2:]) for name in chosen]
    assert len(chosen) <= 6 and sizes == sorted(sizes, reverse=True)


def test_two_instances_never_collide(tmp_path):
    """Same epochs, settings that differ only in features_per_layer: each its own folder and state."""
    probe = images(8)[0]
    wide, narrow = (DeconvCallback(probe=probe, features_per_layer=n, epochs=(1, 2)) for n in (4, 2))
    named = DeconvCallback(probe=probe, features_per_layer=2, epochs=(2,), name="late")
    assert len({wide.state_key, narrow.state_key, named.state_key}) == 3
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[wide, narrow, named],
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(), DataLoader(TensorDataset(*images()), batch_size=8))
    folders = {c.folder for c in (wide, narrow, named)}
    assert len(folders) == 3 and named.folder.name == "late"
    for callback, count, epochs in ((wide, 4, [1, 2]), (narrow, 2, [1, 2]), (named, 2, [2])):
        files = read_firings(find_firings(tmp_path, callback.monitor_name))
        assert [f["epoch"] for f in files] == epochs
        assert all(len(f["layers"]["net.6"]["channels"]) == count for f in files)
    with pytest.raises(RecordError, match=r"several monitors.*--name"):
        find_firings(Path(trainer.log_dir))
    main(["figure4", str(trainer.log_dir), "--name", "late", "-o", str(tmp_path / "late.png")])


def test_memory_and_checkpoint_keep_only_what_the_next_firing_needs(tmp_path):
    callback = DeconvCallback(probe=images(8)[0], features_per_layer=2, epochs=FOUR)
    fit(tmp_path, Classifier(), callback, max_epochs=4)
    state = callback.state_dict()
    for layer, columns in state["history"].items():
        assert sorted(columns) == list(FOUR)
        assert all(set(c) == {"crops", "patches", "marks", "source"} and c["patches"] is None for c in columns.values())
        last = load_record(callback.folder / "epoch_004.pt")["layers"][layer]["gram"]
        assert torch.equal(state["grams"][layer], last)  # one Gram per layer: the last firing's
    buffer = io.BytesIO()
    torch.save(state, buffer)
    grid = sum(c["crops"].numel() * 4 for columns in state["history"].values() for c in columns.values())
    fixed = state["probe"].numel() * 4 + sum(g.numel() * 8 for g in state["grams"].values())
    assert buffer.tell() < fixed + grid + 64_000  # the probe, one Gram per layer, the crops, and little else


def test_resume_with_other_settings_says_so_and_starts_afresh(tmp_path):
    probe = images(8)[0]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)

    def trainer(callbacks, epochs):
        return L.Trainer(
            max_epochs=epochs,
            callbacks=callbacks,
            logger=TensorBoardLogger(tmp_path, name="run"),
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )

    data = DataLoader(TensorDataset(*images()), batch_size=8)
    first = DeconvCallback(probe=probe, features_per_layer=4, epochs=(1, 2, 3))
    trainer([first, ckpt], 2).fit(Classifier(), data)
    again = DeconvCallback(probe=probe, features_per_layer=2, epochs=(1, 2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([again], 3).fit(Classifier(), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    said = [str(w.message) for w in caught if "other settings" in str(w.message)]
    assert len(said) == 1 and "features_per_layer 4 -> 2" in said[0] and "start afresh" in said[0]
    assert all(len(c) == 2 for c in again.features.values()) and {e for h in again.history.values() for e in h} == {3}
    # the same settings with a new schedule keep the history, and say what changed
    kept = DeconvCallback(probe=probe, features_per_layer=4, epochs=(1, 2, 3, 4))
    with pytest.warns(UserWarning, match=r"epochs \(1, 2, 3\) -> \(1, 2, 3, 4\).*history is kept"):
        trainer([kept], 4).fit(Classifier(), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert sorted(kept.history["net.6"]) == [1, 2, 3, 4]


def _run(args: list[str], out: Path, kill_when_writing: bool = False) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, str(HERE / "kill_fit.py"), str(out), *args], env=env)
    if not kill_when_writing:
        assert process.wait(timeout=240) == 0
        return
    deadline = time.monotonic() + 240
    while not (out / "writing").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the fit ended before it wrote the file"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    (out / "writing").unlink()


@pytest.mark.parametrize("killed", ["epoch_002.pt", "epoch_003.pt"])  # a scheduled firing; the end-of-training one
def test_sigkill_while_a_firing_file_is_written_loses_nothing(tmp_path, killed):
    _run([killed], tmp_path, kill_when_writing=True)
    first = tmp_path / "run" / "version_0" / "deconv"
    (folder,) = first.iterdir()
    assert not (folder / killed).exists()  # the old file or none, never half of one
    assert [p.name for p in folder.glob(".*.tmp")]  # the cut temporary file
    _run(["--resume"], tmp_path)  # resumes from the last checkpoint into a new logger version
    resumed = tmp_path / "run" / "version_1" / "deconv" / folder.name
    assert sorted(p.name for p in resumed.glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    assert not list(resumed.glob(".*.tmp"))
    assert [f["epoch"] for f in read_firings(find_firings(tmp_path))] == [1, 2, 3]  # the newest version, whole
    figure4(tmp_path, tmp_path / "figure4.png")


def test_figure_commands_skip_bad_files_and_errors_are_one_line(tmp_path, capsys):
    callback = DeconvCallback(probe=images(8)[0], features_per_layer=2, epochs=(1, 2, 3))
    fit(tmp_path, Classifier(), callback, max_epochs=3)
    folder = callback.folder
    (folder / "epoch_002.pt").write_bytes((folder / "epoch_002.pt").read_bytes()[:1000])  # truncated

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"epoch": 4, "layers": Payload()}, folder / "epoch_004.pt")  # hostile: runs a command if unpickled
    capsys.readouterr()
    main(["figure4", str(tmp_path), "-o", str(tmp_path / "f.png")])
    err = capsys.readouterr().err
    assert "skipped" in err and "epoch_002.pt: is truncated or corrupt" in err
    assert "epoch_004.pt: holds objects other than tensors, so it was not loaded" in err
    assert "weights_only=False" not in err and not (tmp_path / "pwned").exists()
    for bad in ("epoch_001.pt", "epoch_003.pt"):
        (folder / bad).write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exit_:
        main(["settling", str(tmp_path), "-o", str(tmp_path / "s.png")])
    message = str(exit_.value)
    assert message.startswith(f"lightning-deconv: {folder}: none of its files could be read. ") and "\n" not in message
    with pytest.raises(RecordError):  # --debug: the exception itself, with its traceback
        main(["settling", str(tmp_path), "-o", str(tmp_path / "s.png"), "--debug"])
    with pytest.raises(SystemExit, match=r"^lightning-deconv: .*nothing: no such folder\. "):
        main(["figure2", str(tmp_path / "nothing")])


def test_fast_dev_run_prints_no_tensorboard_command_without_a_log_dir(tmp_path, capsys):
    callback = DeconvCallback(probe=images(8)[0], features_per_layer=2, epochs=(1,))
    trainer = L.Trainer(
        fast_dev_run=True, callbacks=[callback], logger=TensorBoardLogger(tmp_path), enable_progress_bar=False
    )
    trainer.fit(Classifier(), DataLoader(TensorDataset(*images()), batch_size=8))
    assert sorted(callback.history["net.6"]) == [1]
    assert "--logdir None" not in capsys.readouterr().out


def test_a_firing_whose_file_cannot_be_written_leaves_no_trace(tmp_path, monkeypatch):
    """Whole or not at all: the disk fills up while epoch 2's grid is written, after its firing file; no column,
    no file, no scalars for epoch 2, a warning, and the next firing is whole."""
    import lightning_deconv.record as record

    write = record.atomic_write
    written = []

    def failing(path, writer):
        written.append(Path(path).name)
        if written[-2:] == ["epoch_002.pt", "net.3_evolution.png"]:
            raise OSError(28, "No space left on device")
        return write(path, writer)

    monkeypatch.setattr(record, "atomic_write", failing)
    callback = DeconvCallback(probe=images(8)[0], features_per_layer=2, epochs=(1, 2, 3))
    with pytest.warns(UserWarning, match="firing after epoch 2 failed and was skipped.*No space left"):
        trainer = L.Trainer(
            max_epochs=3,
            callbacks=[callback],
            logger=TensorBoardLogger(tmp_path, name="run"),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(Classifier(), DataLoader(TensorDataset(*images()), batch_size=8))
    assert all(sorted(h) == [1, 3] for h in callback.history.values())
    assert sorted(p.name for p in callback.folder.glob("*.pt")) == ["epoch_001.pt", "epoch_003.pt"]
    assert not list(callback.folder.glob(".*.tmp"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("deconv/seconds")] == [1, 3]
