"""The evolution grids as a user sees them: a real TensorBoard server, read back through its HTTP API.

The other callback tests read the event files directly; this one checks the whole path (callback ->
``TensorBoardLogger`` -> event file -> ``tensorboard`` -> images plugin -> PNG) on loopback only.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from helpers import dataset, module_class
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from lightning_deconv import DeconvCallback

READY_TIMEOUT = 60.0  # seconds for TensorBoard to start and load the event files


def _free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _get_json(url: str) -> Any:
    return json.loads(_get(url))


class Server:
    """A running ``tensorboard`` process: its base URL and its output, for failure messages."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def wait_for_tags(self, run: str, wanted: set[str]) -> dict[str, Any]:
        """Poll the images plugin until ``run`` lists every tag in ``wanted``: TensorBoard answers HTTP
        before its data server has read the event files, so an early answer can lack the run."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tensorboard exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                tags = _get_json(f"{self.url}/data/plugin/images/tags").get(run, {})
            except (urllib.error.URLError, ConnectionError):  # not listening yet
                tags = {}
            if wanted <= tags.keys():
                return tags
            time.sleep(0.25)
        pytest.fail(f"tensorboard did not list {sorted(wanted)} within {READY_TIMEOUT}s:\n{self.log.read_text()}")


@pytest.fixture
def tensorboard(tmp_path: Path) -> Iterator[Callable[[Path], Server]]:
    """Start ``tensorboard --logdir <dir>`` on a free loopback port; the server is always stopped."""
    started: list[subprocess.Popen] = []

    def start(logdir: Path) -> Server:
        port = _free_port()
        log = tmp_path / "tensorboard.log"
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)]
        command += ["--host", "127.0.0.1", "--samples_per_plugin", "images=100"]
        with open(log, "w") as out:
            started.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
        return Server(started[-1], f"http://127.0.0.1:{port}", log)

    try:
        yield start
    finally:
        for process in started:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_evolution_grids_served_by_tensorboard(tmp_path, tensorboard):
    """Each layer's latest evolution grid comes back from TensorBoard's images plugin pixel for pixel."""
    callback = DeconvCallback(probe=dataset(12, 7).tensors[0], features_per_layer=3, epochs=(1, 2))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[callback],
        logger=TensorBoardLogger(tmp_path / "logs", name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module_class(L)())
    run = Path(trainer.log_dir).relative_to(tmp_path / "logs").as_posix()  # "run/version_0"
    wanted = {f"deconv/{layer}/evolution" for layer in callback.features}
    assert len(wanted) == 2

    server = tensorboard(tmp_path / "logs")
    server.wait_for_tags(run, wanted)
    for layer in callback.features:
        query = urllib.parse.urlencode({"run": run, "tag": f"deconv/{layer}/evolution"})
        entries = _get_json(f"{server.url}/data/plugin/images/images?{query}")
        assert [entry["step"] for entry in entries] == [1, 2]  # global_step = epoch
        latest = max(entries, key=lambda entry: entry["step"])
        # "query" is a ready-made query string ("blob_key=..."), not a bare key
        png = _get(f"{server.url}/data/plugin/images/individualImage?{latest['query']}")
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG"
        grid = callback.evolution(layer)  # [3, H, W] in [0, 1], both epochs' columns
        assert image.size == (grid.shape[2], grid.shape[1])
        # the pixels too: add_image stores a float image as uint8(clip(x * 255)), PNG is lossless
        served = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(served, (grid * 255).clamp(0, 255).to(torch.uint8))
