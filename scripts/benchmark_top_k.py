"""Benchmark: what Figure 2's top-k scan costs, against one plain forward pass of the same images.

For a model and N images, ``top_k`` (k=9, ``--features`` channels in each of conv1..conv5: ``pool1, pool2,
relu3, relu4, pool5``) against the unavoidable work: one forward pass of the same N images, in the same
batches, to the deepest layer (no_grad, eval), with the model as is (NCHW) and channels-last; the faster of
the two is the limit. ``top_k`` is timed twice: as for a tensor (images fetched back by index later) and
with ``keep_images=True``, as for a loader (each chosen image copied as it is chosen), both as ratios to
the fastest forward, in the median and round by round. Timings are interleaved (``timed`` from
``scripts/benchmark.py``: a warm-up round, then ``--repeats`` rounds in which the four take turns), so
machine drift moves them alike. Then the peak
memory (RSS) of a scan over a loader of lazily made images, for two N, each in a fresh process: it must
stay flat, since only the running top k (and the k chosen images per feature) and one batch are held.

Two models: the full ZFNet at 224x224 (random weights, 1000 classes) and the demo's (width 0.5, 64x64).
Prints a Markdown table and writes JSON with the machine, torch version and settings.

Usage::

    python scripts/benchmark_top_k.py --threads 2
    python scripts/benchmark_top_k.py --threads 2 --only demo --skip-memory --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import cpu_name, peak_rss_mb, rss_mb, seconds, timed, write_report

from lightning_deconv.analysis.top_k import top_k
from lightning_deconv.layers import eval_mode, resolve_layers, run_until
from lightning_deconv.paper.models import ZFNet
from lightning_deconv.selection import choose_features

LAYERS = ("features.pool1", "features.pool2", "features.relu3", "features.relu4", "features.pool5")


class NoiseImages(Dataset):
    """``n`` images made on demand (seeded by index), so the data itself takes no memory."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(i)), 0


def plain_forward(model: nn.Module, images: Tensor, batch_size: int, channels_last: bool) -> Callable[[], None]:
    """One forward of ``images`` in batches to the deepest layer, nothing kept: the limit."""
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    target = resolve_layers(model, [LAYERS[-1]])
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def run() -> None:
        with torch.no_grad(), eval_mode(model):
            for batch in images.split(batch_size):
                run_until(model, batch.contiguous(memory_format=layout), target, lambda *_: None)

    return run


def features_of(model: nn.Module, count: int) -> dict[str, list[int]]:
    modules = dict(model.named_modules())
    return {
        name: choose_features(modules[name.replace("pool", "conv").replace("relu", "conv")].out_channels, count, i)
        for i, name in enumerate(LAYERS)
    }


def scan_cost(model: nn.Module, n: int, size: int, features: dict, batch_size: int, repeats: int) -> dict:
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    times = timed(
        {
            "as_is": plain_forward(model, images, batch_size, channels_last=False),
            "cl": plain_forward(model, images, batch_size, channels_last=True),
            "top_k": lambda: top_k(model, images, features, k=9, batch_size=batch_size),
            "top_k_kept": lambda: top_k(model, images, features, k=9, batch_size=batch_size, keep_images=True),
        },
        repeats,
        torch.device("cpu"),
    )
    limit = min(times["as_is"], times["cl"], key=lambda t: t["median"])
    fastest = [min(a, b) for a, b in zip(times["as_is"]["rounds"], times["cl"]["rounds"], strict=True)]
    return {
        "images": n,
        "forward_as_is_s": times["as_is"],
        "forward_channels_last_s": times["cl"],
        "limit_s": limit,
        "top_k_s": times["top_k"],
        "top_k_kept_s": times["top_k_kept"],
        "ratio": times["top_k"]["median"] / limit["median"],
        "ratio_kept": times["top_k_kept"]["median"] / limit["median"],
        "ratio_by_round": [t / f for t, f in zip(times["top_k"]["rounds"], fastest, strict=True)],
        "ratio_kept_by_round": [t / f for t, f in zip(times["top_k_kept"]["rounds"], fastest, strict=True)],
        "per_image_ms": 1000 * times["top_k"]["median"] / n,
    }


MODELS = {  # name: (ZFNet arguments, image side)
    "full ZFNet, 224 px": ({"num_classes": 1000}, 224),
    "demo ZFNet (width 0.5), 64 px": ({"num_classes": 10, "width": 0.5, "input_size": 64}, 64),
}


def memory_child(setup: str, n: int, features: int, batch_size: int) -> dict:
    """In a fresh process: the peak RSS of one scan of ``n`` lazily made images through a loader (images
    kept), the RSS just before it, and the size of the result."""
    arguments, size = MODELS[setup]
    torch.manual_seed(0)
    model = ZFNet(**arguments).eval()
    loader = DataLoader(NoiseImages(n, size), batch_size=batch_size)
    before = rss_mb()
    found = top_k(model, loader, features_of(model, features), k=9)
    held = [t for top in found.values() for t in (top.value, top.source, top.position, top.switch, top.images)]
    result = sum(t.nbytes for t in held if t is not None) / 2**20
    return {"before_mb": before, "peak_mb": peak_rss_mb(), "result_mb": result}


def scan_memory(setup: str, counts: list[int], features: int, batch_size: int, threads: int) -> dict:
    """Peak RSS of a scan for each N, each in its own process so that every N starts from the same state."""
    found = {}
    for n in counts:
        command = [sys.executable, __file__, "--memory-child", setup, str(n), "--features", str(features)]
        command += ["--batch-size", str(batch_size), "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        found[n] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--features", type=int, default=8, help="channels per layer")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-images", type=int, default=512, help="N for the full ZFNet at 224 px")
    parser.add_argument("--demo-images", type=int, default=4096, help="N for the demo ZFNet at 64 px")
    parser.add_argument("--full-memory", type=int, nargs=2, default=(256, 1024), help="two N for the memory check")
    parser.add_argument("--demo-memory", type=int, nargs=2, default=(512, 4096))
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--only", choices=["full", "demo"], help="only the full-size or only the demo ZFNet")
    parser.add_argument("--output", default="runs/benchmark_top_k.json")
    parser.add_argument("--memory-child", nargs=2, metavar=("SETUP", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        setup, n = args.memory_child
        print(json.dumps(memory_child(setup, int(n), args.features, args.batch_size)))
        return
    torch.manual_seed(0)
    report: dict = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": cpu_name(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {**vars(args), "k": 9, "layers": list(LAYERS)},
    }
    print(f"# top_k benchmark on {report['machine']}", flush=True)
    sizes = dict(zip(MODELS, [(args.full_images, args.full_memory), (args.demo_images, args.demo_memory)], strict=True))
    setups = [name for name in MODELS if args.only is None or name.startswith(args.only)]
    for name in setups:
        arguments, side = MODELS[name]
        model = ZFNet(**arguments).eval()
        n, memory = sizes[name]
        result = scan_cost(model, n, side, features_of(model, args.features), args.batch_size, args.repeats)
        if not args.skip_memory:
            threads = torch.get_num_threads()
            result["memory"] = scan_memory(name, list(memory), args.features, args.batch_size, threads)
        report[name] = result
        print(name, json.dumps(result, indent=1), flush=True)
    write_report(args.output, report)
    print(table(report, setups))


def table(report: dict, setups: list[str]) -> str:
    rows = ["| measure | " + " | ".join(setups) + " |", "| --- |" + " --- |" * len(setups)]
    results = [report[s] for s in setups]

    def row(label: str, cell: Callable[[dict], str]) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")

    row("images N", lambda r: str(r["images"]))
    row("plain forward to pool5, NCHW", lambda r: seconds(r["forward_as_is_s"], 2))
    row("plain forward to pool5, channels-last", lambda r: seconds(r["forward_channels_last_s"], 2))
    row("`top_k`, k=9, 5 layers x 8 features", lambda r: seconds(r["top_k_s"], 2))
    row(
        "**`top_k` / fastest plain forward** (target <= 1.1x; by round)",
        lambda r: f"**{r['ratio']:.2f}x** ({', '.join(f'{x:.2f}' for x in r['ratio_by_round'])})",
    )
    row("`top_k(..., keep_images=True)` (as for a loader)", lambda r: seconds(r["top_k_kept_s"], 2))
    row(
        "**the same / fastest plain forward** (by round)",
        lambda r: f"**{r['ratio_kept']:.2f}x** ({', '.join(f'{x:.2f}' for x in r['ratio_kept_by_round'])})",
    )
    if any("memory" not in r for r in results):
        return "\n".join(rows)
    row(
        "peak RSS of a scan over a loader (fresh process each), by N",
        lambda r: ", ".join(f"N={n}: {m['peak_mb']:.0f} MiB" for n, m in r["memory"].items()),
    )
    row(
        "RSS before the scan (model loaded)",
        lambda r: ", ".join(f"{m['before_mb']:.0f} MiB" for m in r["memory"].values()),
    )
    row(
        "the result (top 9 with the images kept), by N",
        lambda r: ", ".join(f"{m['result_mb']:.1f} MiB" for m in r["memory"].values()),
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
