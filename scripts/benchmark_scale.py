"""Benchmark: one firing and one top-k scan of ``DeconvCallback`` on a ResNet-50 at 224 px, against training.

Where the time goes at ImageNet sizes. Two parts, on a torchvision ResNet-50 (``weights=None``: random
initialisation, nothing downloaded) and **synthetic images** (random normal 3x224x224; item ``i`` of the data
is image ``i % 512`` of a fixed bank, so making the data costs nothing; random labels of 1000 classes; the
probe: its own random images):

1. **A real ``Trainer.fit``** of one epoch of a small LightningModule wrapping the ResNet-50 (cross-entropy,
   SGD with momentum), ``--steps`` training batches of ``--batch-size``, a validation loader of ``--images``
   images, and ``DeconvCallback(probe=<--probe images>, layers="auto", features_per_layer=--features,
   epochs=(1,), top_k=--k, top_k_epochs=(1,))``: on ResNet-50 ``"auto"`` picks the stem (``net.maxpool``)
   and ``net.layer1 .. net.layer4``. The callback records the firing's seconds (``firing_seconds``: maxima,
   projections, crops, measures, grids, files, logging) and the top-k scan's (``top_k_seconds``: the scan over
   the validation set, the projections of the ``F x k`` activations, grids, files); a timing callback records
   each training step (forward, backward, optimiser step; the first, warm-up, step is left out) and the
   validation pass over the same images the scan reads. Ratios are to the median training step and to that
   validation pass.
2. **The firing broken down on the public functions** a user calls, timed interleaved with ``timed()`` of
   ``scripts/benchmark.py`` (a warm-up round, then ``--repeats`` rounds; min, median, max): the plan
   (``Projector(...)``, made once at fit start by the callback), the maxima pass (``plan.maxima(probe,
   summaries=True)``: one forward of the probe with the channel peaks and Gram matrices the measures use),
   the projections (``plan.project``), the crops and assembly alone (``Projection.assemble`` on projected images),
   one training step, and the two halves of a top-k scan: ``top_k`` over the probe (the scan's cost per
   image) and ``project_top_k`` of its ``F x k`` activations; with ``--one-call`` also a plain forward of the
   probe and the one-call ``deconvolve(model, probe, features)``.

With ``--device cuda --amp`` the training step and the validation pass run in float16 autocast (Lightning's
``16-mixed``); the firing and the scan run as the callback runs them, in the model's float32.

Usage::

    python scripts/benchmark_scale.py --threads 2                     # 256-image probe, 5,000 images, batch 32
    python scripts/benchmark_scale.py --probe 16 --images 48 --batch-size 8 --features 4 --steps 2  # to try it
    python scripts/benchmark_scale.py --device cuda --amp --batch-size 64
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import cpu_name, peak_rss_mb, timed, write_report

from lightning_deconv import DeconvCallback, Projection, Projector, deconvolve, project_top_k, top_k

SIZE = 224


class Synthetic(Dataset):
    """``size`` items ``(image, label)``: image ``i % len(bank)`` of a bank of random images, a random label."""

    def __init__(self, size: int, bank: torch.Tensor, seed: int = 1) -> None:
        self.size, self.bank = size, bank
        self.labels = torch.randint(0, 1000, (size,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bank[index % len(self.bank)], self.labels[index]


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.resnet50(weights=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class Clock(L.Callback):
    """Seconds of each training step (forward, backward, optimiser step) and of each validation pass."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.steps, self.validation = device, [], []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(self._now() - self._start)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start = self._now()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.validation.append(self._now() - self._start)


def fit(args: argparse.Namespace, bank: torch.Tensor, probe: torch.Tensor, device: torch.device) -> dict:
    """Part 1: one epoch of ``Trainer.fit`` with the callback firing and scanning once."""
    torch.manual_seed(0)
    model = Classifier()
    train = DataLoader(Synthetic(args.steps * args.batch_size, bank, seed=2), batch_size=args.batch_size)
    val = DataLoader(Synthetic(args.images, bank), batch_size=args.batch_size)
    monitor = DeconvCallback(
        probe=probe,
        layers="auto",
        features_per_layer=args.features,
        epochs=(1,),
        fire_at_end=False,
        batch_size=args.batch_size,
        top_k=args.k,
        top_k_epochs=(1,),
        strict=True,  # a failing firing raises instead of being timed
    )
    clock = Clock(device)
    precision = ("16-mixed" if device.type == "cuda" else "bf16-mixed") if args.amp else "32-true"
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_epochs=1,
            limit_train_batches=args.steps,
            num_sanity_val_steps=0,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision=precision,
            callbacks=[clock, monitor],  # the clock's step ends before the callback fires (last batch)
            default_root_dir=root,
            logger=L.loggers.TensorBoardLogger(root),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        start = time.perf_counter()
        trainer.fit(model, train, val)
        total = time.perf_counter() - start
    step = statistics.median(clock.steps[1:] or clock.steps)
    validation = clock.validation[-1]
    firing, top = monitor.firing_seconds[1], monitor.top_k_seconds[1]
    return {
        "precision": precision,
        "layers": {layer: len(channels) for layer, channels in monitor.features.items()},
        "fit_seconds": total,
        "training_steps": clock.steps,
        "training_step": step,
        "validation_pass": validation,
        "firing": firing,
        "firing_measures": monitor.measure_seconds[1],
        "top_k": top,
        "firing_per_step": firing / step,
        "firing_per_validation": firing / validation,
        "top_k_per_step": top / step,
        "top_k_per_validation": top / validation,
        "features": {layer: list(channels) for layer, channels in monitor.features.items()},
    }


def breakdown(args: argparse.Namespace, probe: torch.Tensor, features: dict, device: torch.device) -> dict:
    """Part 2: the firing's parts on the public functions, interleaved, with a training step and a forward."""
    torch.manual_seed(0)
    model = Classifier().to(device).eval()
    trained = copy.deepcopy(model).train()  # the training step changes weights: its own copy
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-3, momentum=0.9)
    batch = probe[: args.batch_size].to(device)
    labels = torch.randint(0, 1000, (len(batch),), device=device)
    probe = probe.to(device)
    autocast = torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)

    def step() -> None:
        with autocast if args.amp else torch.enable_grad():
            loss = F.cross_entropy(trained(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(net: torch.nn.Module = model, layout: torch.memory_format = torch.contiguous_format) -> None:
        with torch.no_grad(), autocast if args.amp else torch.no_grad():
            for part in probe.split(args.batch_size):
                net(part.contiguous(memory_format=layout))

    start = time.perf_counter()
    plan = Projector(model, features, input_size=(3, SIZE, SIZE), batch_size=args.batch_size)
    plan_seconds = time.perf_counter() - start
    found = plan.maxima(probe, summaries=True)
    projected = plan.project(probe, found)
    top = top_k(model, probe, features, k=args.k, batch_size=args.batch_size)
    fns = {
        "training_step": step,
        "maxima": lambda: plan.maxima(probe, summaries=True),
        "project": lambda: plan.project(probe, found),
        "finish": lambda: [
            Projection.assemble(plan.layers[layer], p.images, found[layer], probe) for layer, p in projected.items()
        ],
        "top_k_scan": lambda: top_k(model, probe, features, k=args.k, batch_size=args.batch_size),
        "project_top_k": lambda: project_top_k(plan, top, data=probe),
    }
    if args.one_call:
        fns["forward"] = forward
        fns["forward_cl"] = lambda: forward(channels_last, torch.channels_last)
        fns["deconvolve"] = lambda: deconvolve(model, probe, features, batch_size=args.batch_size)
    times = timed(fns, args.repeats, device)
    return {"plan": plan_seconds, "times": times, "plan_description": plan.describe()}


def report(result: dict) -> str:
    s, f, b = result["settings"], result["fit"], result["breakdown"]["times"]
    step, validation = f["training_step"], f["validation_pass"]
    lines = [
        f"ResNet-50 at {SIZE} px, {result['machine']}, torch {result['torch']}, {f['precision']}; probe "
        f"{s['probe']} images, {sum(f['layers'].values())} features ({', '.join(f['layers'])}), top-{s['k']} over "
        f"{s['images']} images, batch {s['batch_size']}",
        "",
        "| measure | seconds | per training step | per validation pass |",
        "| --- | --- | --- | --- |",
    ]

    def row(label: str, seconds: float) -> None:
        lines.append(f"| {label} | {seconds:.2f} | {seconds / step:.2f}x | {seconds / validation:.3f}x |")

    row(f"training step, batch {s['batch_size']} (median of {len(f['training_steps']) - 1})", step)
    row(f"validation pass over {s['images']} images", validation)
    row("**firing** (`DeconvCallback.firing_seconds`)", f["firing"])
    row("  of which the measures (`measure_seconds`)", f["firing_measures"])
    row(f"**top-{s['k']} scan** (`top_k_seconds`)", f["top_k"])
    lines += ["", "Public functions, interleaved (min, median, max over rounds):", ""]
    lines += ["| part | seconds | per training step |", "| --- | --- | --- |"]
    tstep = b["training_step"]["min"]
    lines.append(f"| `Projector(...)` (once per fit) | {result['breakdown']['plan']:.2f} | - |")
    for name, label in (
        ("training_step", "one training step (its own copy)"),
        ("forward", f"plain forward of the {s['probe']} probe images"),
        ("forward_cl", "the same forward, model and images channels-last"),
        ("maxima", "maxima pass (`plan.maxima(probe, summaries=True)`)"),
        ("project", "projections with crops (`plan.project`)"),
        ("finish", "crops and assembly alone (`Projection.assemble`)"),
        ("deconvolve", "one call, `deconvolve(model, probe, features)`"),
        ("top_k_scan", f"`top_k` over the {s['probe']} probe images"),
        ("project_top_k", "`project_top_k` of the F x k activations"),
    ):
        if name not in b:
            continue
        t = b[name]
        lines.append(f"| {label} | {t['min']:.2f} ({t['median']:.2f}, {t['max']:.2f}) | {t['min'] / tstep:.2f}x |")
    if "forward" in b:
        fastest = min(b["forward"]["min"], b["forward_cl"]["min"])
        ratio = b["top_k_scan"]["min"] / fastest
        lines.append(f"\n`top_k` / the fastest plain forward of the same images: {ratio:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", type=int, default=256, help="probe images")
    parser.add_argument("--images", type=int, default=5000, help="validation images (the top-k scan's)")
    parser.add_argument("--features", type=int, default=16, help="features per layer")
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="training steps in the fit (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision for training and validation")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the public-function breakdown")
    parser.add_argument(
        "--one-call", action="store_true", help="also time plain forwards (NCHW, channels-last) and `deconvolve`"
    )
    parser.add_argument("--output", default="runs/benchmark_scale.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bank = torch.randn(512, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(args.probe, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    result = {"machine": machine, "python": platform.python_version(), "torch": torch.__version__}
    result["settings"] = vars(args)
    result["fit"] = fit(args, bank, probe, device)
    print(json.dumps({k: v for k, v in result["fit"].items() if k != "features"}, indent=1), flush=True)
    result["breakdown"] = breakdown(args, probe, result["fit"]["features"], device)
    result["peak_rss_mib"] = peak_rss_mb()
    print(json.dumps(result["breakdown"], indent=1), flush=True)
    print(report(result))
    write_report(args.output, result)


if __name__ == "__main__":
    main()
