"""Compare the Fig. 6 measures of two or more runs (e.g. the demo and its AlexNet-stem twin), from their files.

    python scripts/compare_figure6.py runs/demo runs/demo_alexnet_stem [--layer model.features.pool2] [--epoch N]

Prints one Markdown table: per run, at its last firing (or the one after epoch N), the first layer's band
shares (and the mid share over that of white-noise filters of the same size, since the DFT grid depends on the
kernel), the largest filter RMS, the dead shares, and the chosen layer's aliasing as logged (on the run's own
stride lattice) and recomputed on common lattices of period 2 and 4, each beside the white-noise share of that lattice.
"""

from __future__ import annotations

import argparse

import torch

from lightning_deconv.analysis.spectrum import aliasing, filter_spectrum
from lightning_deconv.paper.figure6 import last_firing
from lightning_deconv.record import find_firings, read_firings, saved_field


def noise_shares(kernel: tuple[int, int], samples: int = 4000) -> torch.Tensor:
    """Mean band shares of white-noise filters of this size (a seeded draw)."""
    weight = torch.randn(samples, 3, *kernel, generator=torch.Generator().manual_seed(0))
    return filter_spectrum(weight).mean(dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--layer", default="model.features.pool2")
    parser.add_argument("--epoch", type=int, help="the firing to compare (default: each run's last)")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        if args.epoch is None:
            firing = last_firing(run)
        else:
            firing = next(f for f in read_firings(find_firings(run)) if f["epoch"] == args.epoch)
        weight = firing["filters"]["weight"]
        low, mid, high = filter_spectrum(weight).nanmean(dim=0).tolist()
        noise_mid = noise_shares(tuple(weight.shape[-2:]))[1].item()
        rms = weight.flatten(1).pow(2).mean(dim=1).sqrt()
        logged = firing["measures"]
        dead = {n.split(".")[-1]: logged[f"deconv/{n}/dead"] for n in firing["layers"]}
        projections = saved_field(firing["layers"][args.layer], "images")
        side = projections.shape[-1]
        common = {p: aliasing(projections, p).nanmean().item() for p in (2, 4)}
        rows.append(
            [
                str(run),
                str(firing["epoch"]),
                "x".join(map(str, weight.shape[-2:])),
                f"{low:.3f} / {mid:.3f} / {high:.3f}",
                f"{mid / noise_mid:.2f}",
                f"{rms.max():.3f} (median {rms.median():.3f})",
                ", ".join(f"{k} {v:.2f}" for k, v in dead.items()),
                f"{logged[f'deconv/{args.layer}/aliasing']:.4f}",
                ", ".join(f"p{p}: {v:.4f} (noise {(p * p - 1) / (side * side - 1):.4f})" for p, v in common.items()),
            ]
        )
    head = ["run", "epoch", "conv1", "spectrum low / mid / high", "mid / noise's", "filter RMS max", "dead"]
    head += [f"aliasing of {args.layer.split('.')[-1]} (own stride)", "aliasing on lattices of period 2, 4"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
