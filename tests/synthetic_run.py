"""Run files of the layout DeconvCallback writes (firing files version 3, top-k files version 2, or the previous
versions 2 and 1), made up without training.

For the Deconv dashboard's tests and its loading benchmark (``scripts/benchmark_dashboard.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_deconv.record import FIRING_FORMAT, atomic_save

TOP_K_FORMAT = "lightning-deconv top-k"


def _box(size: int, image: int, g: torch.Generator) -> list[int]:
    top, left = (int(x) for x in torch.randint(0, image - size + 1, (2,), generator=g))
    return [top, left, top + size, left + size]


def synthetic_firing(
    epoch: int,
    layers: int = 2,
    features: int = 4,
    probe: int = 6,
    image: int = 32,
    name: str = "probe",
    seed: int = 0,
    version: int = 3,
) -> dict:
    """One firing dict of ``version`` (2 saved the projections under ``"projections"``, 3 under ``"images"``):
    layer ``l`` (``"conv<l>"``) has crops of ``7 + 6 l + epoch`` pixels (so sizes
    differ between epochs), feature 0 of the last layer is dead, feature 1 of the first is NaN after epoch 2,
    and the probe images of the sources are kept."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    pixels = torch.randint(0, 256, (probe, 3, image, image), generator=g, dtype=torch.uint8)
    saved, measures, used = {}, {}, set()
    for number in range(layers):
        size = min(image, 7 + 6 * number + epoch)
        source = torch.randint(0, probe, (features,), generator=g)
        boxes = torch.tensor([_box(size, image, g) for _ in range(features)])
        projections = torch.randn(features, 3, image, image, generator=g)
        value = torch.rand(features, generator=g) + 0.1
        if number == layers - 1:
            value[0] = 0.0  # dead
        if number == 0 and epoch == 2 and features > 1:
            value[1] = float("nan")  # diverged
        cut = [(int(s), slice(t, b), slice(x, y)) for s, (t, x, b, y) in zip(source, boxes.tolist(), strict=True)]
        patches = torch.stack([pixels[s, :, rows, cols].float() / 255 for s, rows, cols in cut])
        saved[f"conv{number}"] = {
            "channels": torch.arange(features) * 2 + number,
            "images" if version >= 3 else "projections": projections,
            "crops": torch.stack([projections[f, :, rows, cols] for f, (_, rows, cols) in enumerate(cut)]),
            "patches": patches,
            "source": source,
            "position": torch.randint(0, 8, (features, 2), generator=g),
            "value": value,
            "boxes": boxes,
            "gram": (lambda x: x @ x.T)(torch.randn(probe, 5, generator=g, dtype=torch.float64)),
        }
        used |= set(source.tolist())
        measures[f"deconv/conv{number}/dead"] = float(number == layers - 1) / features
        if epoch > 1:
            measures[f"deconv/conv{number}/cka_previous"] = float(torch.rand((), generator=g))
            measures[f"deconv/conv{number}/drift"] = float(torch.rand((), generator=g))
    index = torch.tensor(sorted(used))
    return {
        "format": FIRING_FORMAT,
        "version": version,
        "epoch": epoch,
        "name": name,
        "settings": {"features_per_layer": features},
        "mode": "max",
        "rule": "deconvnet",
        "measures": measures,
        "layers": saved,
        "probe_images": {"index": index, "pixels": pixels[index]},
    }


def synthetic_top_k(firing: dict, k: int = 9, seed: int = 0, version: int = 2) -> dict:
    """A top-k file dict (as ``save_top_k`` writes) for the layers and channels of ``firing`` (version 1 saved
    the images' indices under ``"index"``, 2 under ``"source"``)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, saved in firing["layers"].items():
        f, size = len(saved["channels"]), saved["crops"].shape[-1]
        layers[name] = {
            "channels": saved["channels"],
            "value": torch.rand(f, k, generator=g).sort(dim=1, descending=True).values,
            "source" if version >= 2 else "index": torch.randint(0, 100, (f, k), generator=g),
            "position": torch.zeros(f, k, 2, dtype=torch.long),
            "map_size": (8, 8),
            "switch": None,
            "crops": torch.randn(f, k, 3, size, size, generator=g),
            "patches": torch.rand(f, k, 3, size, size, generator=g),
            "boxes": torch.zeros(f, k, 4, dtype=torch.long),
        }
    return {"format": TOP_K_FORMAT, "version": version, "epoch": firing["epoch"], "k": k, "layers": layers}


def write_synthetic_run(folder: Path, epochs: int = 3, top_k: int | None = 9, version: int = 3, **sizes) -> list[dict]:
    """Write ``epoch_001.pt`` ... and (with ``top_k``) the last epoch's ``top<k>_epoch_XXX.pt`` into the
    monitor folder ``folder``, firing files of ``version`` (3, or the previous 2 with top-k files of version 1);
    returns the firing dicts."""
    firings = [synthetic_firing(epoch, version=version, **sizes) for epoch in range(1, epochs + 1)]
    for firing in firings:
        atomic_save(firing, Path(folder) / f"epoch_{firing['epoch']:03d}.pt")
    if top_k:
        atomic_save(
            synthetic_top_k(firings[-1], top_k, version=version - 1), Path(folder) / f"top{top_k}_epoch_{epochs:03d}.pt"
        )
    return firings
