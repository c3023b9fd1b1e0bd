"""The Deconv tab (lightning_deconv.tensorboard): what its routes answer, what they refuse, and the page itself.

The first tests call the views directly on made-up run files (``synthetic_run``). The rest share one
TensorBoard server (``python -m lightning_deconv.tensorboard``, i.e. TensorBoard's own main with the plugin
added) over a small real run trained here, plus a made-up version-2 run and traps (hostile and half-written
files, symlinks out of the logdir); the browser test drives headless Chromium through the DevTools protocol.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_run import synthetic_firing, write_synthetic_run

from lightning_deconv.analysis.settling import cka_from_grams
from lightning_deconv.tensorboard import store as store_module
from lightning_deconv.tensorboard.store import RunStore
from lightning_deconv.tensorboard.views import BadRequest, NotFound, Views

ROOT = Path(__file__).resolve().parents[1]
RUN = "exp/version_0/deconv/probe"  # the made-up version-3 run's id: its monitor folder under the logdir
SECRET = "secret-token-outside-the-logdir"


def _symmetric(x: torch.Tensor) -> np.ndarray:
    """Each picture to uint8 HWC with zero at mid-grey and its largest magnitude at 0 or 255 (the grids' rule),
    written out here rather than taken from lightning_deconv.render."""
    scale = x.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return ((x / (2 * scale) + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


class _Hostile:
    """Unpickling this would run code (create a file): a weights_only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _traps(logdir: Path, outside: Path) -> None:
    """Files the dashboard must skip or never reach: hostile, truncated, foreign, half-written, symlinked out."""
    folder = logdir / "exp/version_0/deconv/probe"
    torch.save({"epoch": 7, "layers": {}, "x": _Hostile(outside / "pwned")}, folder / "epoch_007.pt")
    (folder / "epoch_008.pt").write_bytes((folder / "epoch_001.pt").read_bytes()[:1000])  # cut short
    torch.save({"weights": torch.zeros(3)}, folder / "epoch_009.pt")  # some other torch file
    (folder / ".epoch_010.pt.abc.tmp").write_bytes(b"being written")
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text(SECRET)
    write_synthetic_run(outside / "deconv", epochs=1, top_k=None, name=SECRET)
    (logdir / "linked/version_0").mkdir(parents=True)
    (logdir / "linked/version_0/deconv").symlink_to(outside / "deconv", target_is_directory=True)  # a folder out
    (folder / "epoch_011.pt").symlink_to(outside / "deconv/epoch_001.pt")  # a file out
    (folder / "epoch_012.pt").symlink_to(outside / "secret.txt")


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, list[dict]]:
    firings = write_synthetic_run(tmp_path / "logs" / RUN, epochs=3, top_k=9)
    return tmp_path / "logs", firings


def test_views_match_the_files(synthetic):
    """Listing, matrix, feature and pictures say what the files hold, computed here independently."""
    logdir, firings = synthetic
    views = Views(RunStore(logdir))
    (run,) = views.runs()["runs"]
    assert run["run"] == RUN and run["version"] == 3 and run["name"] == "probe"
    assert run["epochs"] == [1, 2, 3] and run["top_k_epochs"] == [3] and run["skipped"] == []
    for layer, saved in firings[0]["layers"].items():
        assert run["layers"][layer] == {"features": saved["channels"].tolist(), "epochs": [1, 2, 3]}

    matrix = views.matrix(RUN, "conv1")
    assert [c["epoch"] for c in matrix["columns"]] == [1, 2, 3]
    for column, firing in zip(matrix["columns"], firings, strict=True):
        saved = firing["layers"]["conv1"]
        assert column["size"] == list(saved["crops"].shape[-2:])  # crops grow from epoch to epoch
        assert column["value"] == pytest.approx(saved["value"].tolist())
        assert column["source"] == saved["source"].tolist()
        assert column["mark"] == ["dead" if v <= 0 else None for v in saved["value"].tolist()]
        strip = _png(views.strip(RUN, "conv1", str(firing["epoch"]), "crops"))
        assert np.array_equal(strip, np.concatenate(_symmetric(saved["crops"])))
    nan = views.matrix(RUN, "conv0")["columns"][1]  # epoch 2
    assert nan["mark"][1] == "NaN" and nan["value"][1] is None and nan["mark"][0] is None
    last = firings[-1]["layers"]["conv1"]["gram"]
    expected = {f["epoch"]: cka_from_grams(f["layers"]["conv1"]["gram"], last) for f in firings}
    assert dict(matrix["charts"]["cka_last"]) == pytest.approx(expected)
    assert dict(matrix["charts"]["drift"]) == pytest.approx(
        {f["epoch"]: f["measures"]["deconv/conv1/drift"] for f in firings[1:]}
    )

    feature = views.feature(RUN, "conv1", "3")  # channel 3 is row 1 of conv1
    assert [h["epoch"] for h in feature["history"]] == [1, 2, 3]
    assert [h["box"] for h in feature["history"]] == [f["layers"]["conv1"]["boxes"][1].tolist() for f in firings]
    assert feature["top_k"]["epoch"] == 3 and feature["top_k"]["k"] == 9

    crop = _png(views.image(RUN, "conv1", "2", "3", "crop"))
    assert np.array_equal(crop, _symmetric(firings[1]["layers"]["conv1"]["crops"][1:2])[0])
    # the source probe image: its pixels, with a red frame on the receptive-field box
    saved, probe = firings[1]["layers"]["conv1"], firings[1]["probe_images"]
    pixels = probe["pixels"][probe["index"].tolist().index(int(saved["source"][1]))].permute(1, 2, 0).numpy()
    shown = _png(views.image(RUN, "conv1", "2", "3", "source"))
    top, left, bottom, right = saved["boxes"][1].tolist()
    frame = np.zeros(shown.shape[:2], dtype=bool)
    frame[top:bottom, left:right] = True
    frame[top + 1 : bottom - 1, left + 1 : right - 1] = False
    assert np.array_equal(shown[~frame], pixels[~frame]) and (shown[frame] == [230, 30, 30]).all()
    top_crop = _png(views.image(RUN, "conv1", "3", "3", "top_crop", "8"))
    assert top_crop.shape[:2] == tuple(firings[-1]["layers"]["conv1"]["crops"].shape[-2:])


def _without_versions(found: Any) -> Any:
    """The routes' answers without the files' version stamps (modification time and size)."""
    if isinstance(found, dict):
        return {k: _without_versions(v) for k, v in found.items() if k != "version"}
    if isinstance(found, (list, tuple)):
        return [_without_versions(v) for v in found]
    return found


def test_files_of_the_previous_version_read_the_same(tmp_path):
    """Firing files of version 2 ("projections") and top-k files of version 1 ("index") show as the current ones
    (the same made-up values saved under the new names), in the dashboard and in Figure 4."""
    from lightning_deconv.paper.figure4 import figure4

    shown, drawn = {}, {}
    for version in (2, 3):
        logdir = tmp_path / f"v{version}"
        firings = write_synthetic_run(logdir / RUN, epochs=3, top_k=9, version=version)
        views = Views(RunStore(logdir))
        assert views.runs()["runs"][0]["version"] == version
        feature = views.feature(RUN, "conv1", "3")
        saved = torch.load(logdir / RUN / "top9_epoch_003.pt", weights_only=True)["layers"]["conv1"]
        assert feature["top_k"]["source"] == saved["source" if version == 3 else "index"][1].tolist()
        matrix = views.matrix(RUN, "conv0")
        shown[version] = _without_versions((matrix, feature)), views.strip(RUN, "conv0", "2", "crops")
        drawn[version] = np.asarray(Image.open(figure4(logdir / RUN, tmp_path / f"f{version}.png")).convert("RGB"))
        assert len(firings) == 3
    assert shown[2] == shown[3]
    assert np.array_equal(drawn[2], drawn[3])


def test_each_file_is_read_once_per_version(synthetic, monkeypatch):
    """A file is loaded once, and again only after it changes (modification time or size)."""
    logdir, _ = synthetic
    loads: list[Path] = []
    real = store_module.load_record
    monkeypatch.setattr(store_module, "load_record", lambda path, fmt=None: (loads.append(path), real(path, fmt))[1])
    views = Views(RunStore(logdir, rescan_seconds=0))
    views.runs(), views.matrix(RUN, "conv0"), views.feature(RUN, "conv0", "2"), views.runs()
    assert sorted(p.name for p in loads) == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt", "top9_epoch_003.pt"]
    path = logdir / RUN / "epoch_002.pt"
    torch.save(synthetic_firing(2, seed=5), path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = views.matrix(RUN, "conv1")
    assert [p.name for p in loads[4:]] == ["epoch_002.pt"]
    assert changed["columns"][1]["value"] == pytest.approx(
        synthetic_firing(2, seed=5)["layers"]["conv1"]["value"].tolist()
    )


def test_new_firings_appear(tmp_path):
    """Live: a firing written after the first listing is listed once the logdir is listed again."""
    folder = tmp_path / RUN
    write_synthetic_run(folder, epochs=2, top_k=None)
    views = Views(RunStore(tmp_path, rescan_seconds=0))
    assert views.runs()["runs"][0]["epochs"] == [1, 2]
    write_synthetic_run(folder, epochs=3, top_k=9)
    (run,) = views.runs()["runs"]
    assert run["epochs"] == [1, 2, 3] and run["top_k_epochs"] == [3]
    assert [c["epoch"] for c in views.matrix(RUN, "conv0")["columns"]] == [1, 2, 3]


def test_unreadable_files_are_skipped_and_nothing_is_run(synthetic, tmp_path, caplog):
    """Hostile, truncated, foreign, temporary and symlinked-out files are left out, with a warning, never an
    error; the hostile file's code never runs."""
    logdir, _ = synthetic
    _traps(logdir, tmp_path / "outside")
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        (run,) = Views(RunStore(logdir)).runs()["runs"]  # the symlinked-out folder is not a run
    assert run["epochs"] == [1, 2, 3]
    assert run["skipped"] == ["epoch_007.pt", "epoch_008.pt", "epoch_009.pt"]
    assert not (tmp_path / "outside/pwned").exists()
    warned = caplog.text
    assert "epoch_007.pt" in warned and "epoch_011.pt" in warned and "points outside the logdir" in warned


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("..", "conv0", "1", "1", "crop"), NotFound),
        ((f"{RUN}/..", "conv0", "1", "1", "crop"), NotFound),
        ((f"{RUN}/../probe", "conv0", "1", "1", "crop"), NotFound),
        (("/etc", "conv0", "1", "1", "crop"), NotFound),
        (("%2e%2e", "conv0", "1", "1", "crop"), NotFound),
        ((RUN, "../conv0", "1", "1", "crop"), NotFound),
        ((RUN, "conv0", "../1", "1", "crop"), BadRequest),
        ((RUN, "conv0", "1.0", "1", "crop"), BadRequest),
        ((RUN, "conv0", "-1", "1", "crop"), BadRequest),
        ((RUN, "conv0", None, "1", "crop"), BadRequest),
        ((RUN, "conv0", "4", "0", "crop"), NotFound),  # no such firing
        ((RUN, "conv0", "1", "1", "crop"), NotFound),  # channel 1 is not tracked in conv0
        ((RUN, "conv0", "1", "0", "../../etc/passwd"), BadRequest),
        ((RUN, "conv0", "3", "0", "top_crop", "9"), NotFound),  # beyond the top 9
        ((RUN, "conv0", "2", "0", "top_crop", "0"), NotFound),  # no top-k file after epoch 2
    ],
)
def test_identifiers_only(synthetic, args, error):
    """Runs, layers, epochs, features and kinds are looked up, never used as paths: 400 or 404 otherwise."""
    with pytest.raises(error):
        Views(RunStore(synthetic[0])).image(*args)


def test_plugin_is_declared_as_an_entry_point_with_its_script():
    """pyproject.toml registers the plugin for TensorBoard and ships its ES module in the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from tensorboard.plugins.base_plugin import TBContext

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["tensorboard_plugins"]["deconv"]
    module, name = target.split(":")
    plugin = getattr(__import__(module, fromlist=[name]), name)
    metadata = plugin(TBContext(logdir="")).frontend_metadata()
    assert plugin.plugin_name == "deconv" and metadata.tab_name == "Deconv" and metadata.es_module_path == "/index.js"
    shipped = project["tool"]["setuptools"]["package-data"][module]
    assert any((ROOT / module.replace(".", "/")).glob(pattern) for pattern in shipped)


# --- one TensorBoard server over a real run ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (symlinks not followed) with its size and modification time."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


class Board:
    """The running server: its base URL, and the logdir with what the run holds."""

    def __init__(self, url: str, logdir: Path, real: str, features: dict[str, list[int]], tree: dict) -> None:
        self.url, self.logdir, self.real, self.features, self.tree = url, logdir, real, features, tree

    def get(self, route: str, **params: Any) -> bytes:
        with urllib.request.urlopen(f"{self.url}/data/plugin/deconv/{route}?{urllib.parse.urlencode(params)}") as r:
            return r.read()

    def json(self, route: str, **params: Any) -> Any:
        return json.loads(self.get(route, **params))


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Iterator[Board]:
    """A small real run (3 firings, 2 layers, top 9) beside a made-up version-2 run and traps, served by one
    TensorBoard on loopback for the whole module."""
    import lightning.pytorch as L
    from helpers import dataset, module_class
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_deconv import DeconvCallback

    base = tmp_path_factory.mktemp("dashboard")
    logdir = base / "logs"
    callback = DeconvCallback(probe=dataset(12, 7).tensors[0], features_per_layer=3, epochs=(1, 2, 3), top_k=9)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[callback],
        logger=TensorBoardLogger(logdir, name="real"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module_class(L)())
    # the callback's monitor folder: <log_dir>/deconv/<name> (or <log_dir>/deconv for versions before 0.2)
    folder = getattr(callback, "folder", Path(trainer.log_dir) / "deconv")
    real = Path(folder).resolve().relative_to(logdir.resolve()).as_posix()
    write_synthetic_run(logdir / RUN, epochs=3, top_k=9)
    _traps(logdir, base / "outside")
    features = {layer: [int(c) for c in channels] for layer, channels in callback.features.items()}
    tree = _tree(logdir)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lightning_deconv.tensorboard", "--logdir", str(logdir), "--port", str(port)]
    command += ["--host", "127.0.0.1"]
    log = base / "tensorboard.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5) as response:
                    if json.loads(response.read()).get("deconv", {}).get("enabled"):
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve the Deconv tab:\n{log.read_text()}")
            time.sleep(0.3)
        yield Board(url, logdir, real, features, tree)
    finally:
        process.terminate()
        try:
            process.wait(timeout=3)  # TensorBoard may ignore SIGTERM while serving; it holds nothing to save
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_runs_route_lists_the_real_run(board):
    """Every layer the callback tracked, its features and every firing, and the top-k file, from /runs."""
    runs = {run["run"]: run for run in board.json("runs")["runs"]}
    assert set(runs) == {board.real, RUN}  # not the folder symlinked out of the logdir
    real = runs[board.real]
    assert real["epochs"] == [1, 2, 3] and real["top_k_epochs"] == [3]
    assert {layer: entry["features"] for layer, entry in real["layers"].items()} == board.features
    assert all(entry["epochs"] == [1, 2, 3] for entry in real["layers"].values())
    assert runs[RUN]["skipped"] == ["epoch_007.pt", "epoch_008.pt", "epoch_009.pt"]


def test_matrix_feature_and_image_routes(board):
    """The routes answer what the callback's files hold (read here with torch.load)."""
    layer, channels = next(iter(board.features.items()))
    raw = torch.load(board.logdir / board.real / "epoch_002.pt", weights_only=True)
    saved = raw["layers"][layer]
    matrix = board.json("matrix", run=board.real, layer=layer)
    column = matrix["columns"][1]
    assert column["epoch"] == 2 and column["features"] == channels
    assert column["value"] == pytest.approx(saved["value"].tolist())
    strip = _png(board.get("strip", run=board.real, layer=layer, epoch=2, kind="patches"))
    assert strip.shape[:2] == (len(channels) * saved["patches"].shape[-2], saved["patches"].shape[-1])
    story = board.json("feature", run=board.real, layer=layer, feature=channels[-1])
    assert [h["source"] for h in story["history"]][1] == int(saved["source"][-1])
    assert story["top_k"]["k"] == 9
    assert story["history"][1]["has_source_image"] == ("probe_images" in raw)  # version 2 files keep them
    top = _png(board.get("image", run=board.real, layer=layer, epoch=3, feature=channels[0], kind="top_patch", rank=8))
    top_file = torch.load(board.logdir / board.real / "top9_epoch_003.pt", weights_only=True)
    assert top.shape[:2] == tuple(top_file["layers"][layer]["patches"].shape[-2:])


def _raw(board: Board, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (no client-side normalisation or encoding)."""
    host, port = board.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "target",
    [
        "/data/plugin/deconv/../../../../etc/passwd",
        "/data/plugin/deconv/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/data/plugin/deconv/%252e%252e/%252e%252e/etc/passwd",
        "/data/plugin/deconv/index.js/../../outside/secret.txt",
        "/data/plugin/deconv/image?run=..&layer=conv0&epoch=1&feature=0&kind=crop",
        "/data/plugin/deconv/image?run=../../outside&layer=conv0&epoch=1&feature=0&kind=crop",
        "/data/plugin/deconv/image?run=%2e%2e%2f%2e%2e%2foutside&layer=conv0&epoch=1&feature=0&kind=crop",
        "/data/plugin/deconv/image?run=%252e%252e%252foutside&layer=conv0&epoch=1&feature=0&kind=crop",
        "/data/plugin/deconv/image?run=/etc&layer=passwd&epoch=1&feature=0&kind=crop",
        "/data/plugin/deconv/image?run=linked/version_0/deconv&layer=conv0&epoch=1&feature=0&kind=crop",
        f"/data/plugin/deconv/image?run={RUN}&layer=conv0&epoch=11&feature=0&kind=crop",  # symlinked file
        f"/data/plugin/deconv/image?run={RUN}&layer=conv0&epoch=12&feature=0&kind=crop",
        f"/data/plugin/deconv/strip?run={RUN}&layer=conv0&epoch=..%2f..%2f1&kind=crops",
        f"/data/plugin/deconv/strip?run={RUN}&layer=conv0&epoch=1&kind=..%2f..%2fsecret.txt",
        f"/data/plugin/deconv/matrix?run={RUN}/../../../../outside&layer=conv0",
        "/data/plugin/deconv/feature?run=%2Fetc&layer=conv0&feature=0",
    ],
)
def test_traversal_gets_400_or_404(board, target):
    """Paths, encoded and doubly encoded dots, absolute paths and symlinks out of the logdir reach nothing."""
    status, body = _raw(board, target)
    assert status in (400, 404), (status, body[:200])
    assert SECRET.encode() not in body


def test_tab_in_headless_chromium(board):
    """The Deconv tab in a real browser: every epoch of every layer in the matrix, dead features marked, and
    a click on a feature opens its panel with every epoch and its top 9."""
    from browser import Chromium, missing

    if reason := missing():
        pytest.skip(reason)
    frame = "document.querySelector('iframe[src*=\"name=deconv\"]').contentDocument"
    with Chromium() as page:
        page.go(f"{board.url}/#deconv")
        page.wait_for(f"(() => {{ try {{ return {frame}.querySelectorAll('.cell').length }} catch {{ return 0 }} }})()")
        for run in board.json("runs")["runs"]:
            for layer, entry in run["layers"].items():
                pick = f"""(async () => {{
                    const d = {frame}, w = d.defaultView;
                    await w.deconvDashboard.pick({{run: {json.dumps(run["run"])}, layer: {json.dumps(layer)}}});
                    return [...d.querySelectorAll('.grid[data-layer={json.dumps(layer)}] .cell')]
                        .map((c) => [Number(c.dataset.feature), Number(c.dataset.epoch), c.querySelector('.mark') ?
                                     c.querySelector('.mark').textContent : 'image']);
                }})()"""
                cells = page.evaluate(pick)
                shown = {(f, e) for f, e, _ in cells}
                assert shown == {(f, e) for f in entry["features"] for e in entry["epochs"]}, (run["run"], layer)
                matrix = board.json("matrix", run=run["run"], layer=layer)
                marks = {
                    (f, c["epoch"]): m for c in matrix["columns"] for f, m in zip(c["features"], c["mark"], strict=True)
                }
                assert {(f, e): m for f, e, m in cells} == {k: m or "image" for k, m in marks.items()}
        # click the last feature's first firing of the last layer shown, as a user would
        layer, entry = list(run["layers"].items())[-1]
        feature, epoch = entry["features"][-1], entry["epochs"][0]
        page.evaluate(f'{frame}.querySelector(\'.cell[data-feature="{feature}"][data-epoch="{epoch}"]\').click()')
        panel = page.wait_for(
            f"""(() => {{ const p = {frame}.querySelector('#panel[data-feature="{feature}"][data-epoch="{epoch}"]');
                const images = p ? [...p.querySelectorAll('img')] : [];
                return p && images.length && images.every((i) => i.complete && i.naturalWidth > 0) &&
                    {{figures: p.querySelectorAll('.epochs figure').length, top: p.querySelectorAll('.topk img').length,
                      title: p.querySelector('h3').textContent}};
            }})()"""
        )
        assert panel == {"figures": len(entry["epochs"]), "top": 18, "title": f"{layer} · feature {feature}"}


def test_nothing_written(board):
    """Serving (all the tests above, run first in this module) wrote, moved or touched nothing in the logdir."""
    assert _tree(board.logdir) == board.tree
