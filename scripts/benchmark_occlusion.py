"""Benchmark: the occlusion probability map (paper Fig. 7d) against ``captum.attr.Occlusion``.

Both slide the same grey square (same patch, stride, fill) over the same images and score the same target
classes; Captum runs at each of ``--ppe`` (its ``perturbations_per_eval``) and its fastest is the baseline.
``occlusion`` runs twice: incremental (the default: each occluded pass on the square's cones) and with
``incremental=False`` (every occluded image through the whole model, our full re-inference). Timing is
``timed()`` of ``scripts/benchmark.py``: a warm-up round, then rounds in which the functions take turns, so
the ratios (of the fastest round of each) hold on a machine whose speed drifts. The outputs are checked:
Captum's attribution of a pixel is the mean, over the squares covering it, of the drop in probability from
the unoccluded image, which is computed here from our map and compared; the incremental maps against the
full ones. The MAC limit is the conv and FC multiply-accumulates of a full pass over those of the exact
cones (``Cones.macs_per_position``); the speed-up over full re-inference is reported as a fraction of it.

Settings (``--settings``): full ZFNet at 224 px with patch 48, stride 16, 2 images (``zf48``) and patch 16,
stride 8, 1 image (``zf16``), the default; the demo's half-width ZFNet at 64 px (patch 16, stride 4) and
patch 64, stride 32 (``demo``, ``full``). Random weights (the output layer's scaled up, so that the
probabilities vary and the check of the outputs means something), eval mode. The image size minus the patch
is a multiple of the stride in all: Captum then places its squares exactly where :func:`occlusion` does
(otherwise it adds a last, partial square).

Usage::

    python scripts/benchmark_occlusion.py --threads 2 --repeats 2 --ppe 16 64   # table + runs/benchmark_occlusion.json
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from benchmark import cpu_name, seconds, timed, write_report  # scripts/ is on the path when this script runs
from captum.attr import Occlusion as CaptumOcclusion

from lightning_deconv.analysis.cones import Cones
from lightning_deconv.analysis.occlusion import default_batch_size, occlusion
from lightning_deconv.paper.models import ZFNet

SETTINGS = {
    "demo": {"width": 0.5, "size": 64, "images": 8, "patch": 16, "stride": 4},
    "full": {"width": 1.0, "size": 224, "images": 2, "patch": 64, "stride": 32},
    "zf48": {"width": 1.0, "size": 224, "images": 2, "patch": 48, "stride": 16},
    "zf16": {"width": 1.0, "size": 224, "images": 1, "patch": 16, "stride": 8},
}


def captum_map(captum: CaptumOcclusion, images: torch.Tensor, patch: int, stride: int, targets, ppe: int):
    channels = images.shape[1]
    return captum.attribute(
        images,
        sliding_window_shapes=(channels, patch, patch),
        strides=(channels, stride, stride),
        baselines=0.0,
        target=targets,
        perturbations_per_eval=ppe,
    )


def as_captum_attribution(model: torch.nn.Module, images: torch.Tensor, probability, targets, patch, stride):
    """Captum's attribution from our map: per pixel, the mean over covering squares of p(unoccluded) - p."""
    with torch.no_grad():
        unoccluded = model(images).softmax(dim=1)[torch.arange(len(images)), targets]
    drop = (unoccluded[:, None, None] - probability.double()).flatten(1)  # [N, h*w]
    size = tuple(images.shape[-2:])
    columns = drop[:, None, :].expand(-1, patch * patch, -1)
    total = F.fold(columns, size, patch, stride=stride)
    count = F.fold(torch.ones_like(columns), size, patch, stride=stride)
    return (total / count).expand(-1, images.shape[1], -1, -1)


def mac_limit(model: torch.nn.Module, setting: dict) -> dict:
    """Multiply-accumulates of conv and FC layers per occluded image: a full pass, and the exact cones."""
    size = setting["size"]
    with torch.no_grad(), Cones.recording(model, torch.zeros(1, 3, size, size)) as cones:
        model(cones.images)
    full, cone = cones.macs_per_position(setting["patch"], setting["stride"])
    return {"full_macs": full, "cone_macs": cone, "limit": full / cone}


def compare(setting: dict, ppes: list[int], repeats: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = ZFNet(num_classes=10 if setting["size"] == 64 else 1000, width=setting["width"], input_size=setting["size"])
    with torch.no_grad():  # random ZFNets give nearly uniform probabilities: sharpen them, so the check means something
        model.classifier.fc8.weight.mul_(300)
    model.eval()
    images = torch.randn(setting["images"], 3, setting["size"], setting["size"])
    patch, stride = setting["patch"], setting["stride"]
    ours = occlusion(model, images, patch=patch, stride=stride)
    targets = ours.targets
    captum = CaptumOcclusion(lambda x: model(x).softmax(dim=1))

    last: dict[str, object] = {}  # the outputs of the timed calls, checked after timing

    def keep(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        return lambda: last.__setitem__(name, fn())

    fns: dict[str, Callable[[], object]] = {
        "ours": keep("ours", lambda: occlusion(model, images, patch=patch, stride=stride, targets=targets)),
        "ours_full": keep(
            "full", lambda: occlusion(model, images, patch=patch, stride=stride, targets=targets, incremental=False)
        ),
    }
    for ppe in ppes:
        fns[f"captum_ppe{ppe}"] = keep(
            "captum", lambda ppe=ppe: captum_map(captum, images, patch, stride, targets, ppe)
        )
    times = timed(fns, repeats, torch.device("cpu"))
    best = min(ppes, key=lambda ppe: times[f"captum_ppe{ppe}"]["min"])

    # Outputs: Captum's attribution against the one our map implies; the incremental maps against the full ones.
    want = last["captum"].double()
    got = as_captum_attribution(model, images, last["ours"].probability, targets, patch, stride)
    difference = float((got - want).abs().max())
    full = last["full"]
    limit = mac_limit(model, setting)
    speedup = times["ours_full"]["min"] / times["ours"]["min"]
    return {
        "setting": {**setting, "positions": list(ours.probability.shape[1:]), "batch_size": default_batch_size(images)},
        "occluded_images": int(ours.probability.numel()),
        "times": times,
        "captum_best_ppe": best,
        "ratio": times[f"captum_ppe{best}"]["min"] / times["ours"]["min"],
        "ratio_full_vs_captum": times[f"captum_ppe{best}"]["min"] / times["ours_full"]["min"],
        "speedup_over_full": speedup,
        **limit,
        "fraction_of_limit": speedup / limit["limit"],
        "incremental_vs_full_max_abs_probability": float((ours.probability - full.probability).abs().max()),
        "labels_equal": bool(torch.equal(ours.label, full.label)),
        "max_abs_difference_of_attribution": difference,
        "largest_attribution": float(want.abs().max()),
        "relative_difference": difference / float(want.abs().max()),
        "probability_range": [float(ours.probability.min()), float(ours.probability.max())],
    }


def table(report: dict) -> str:
    header = (
        "| setting | occlusion() | full re-inference | Captum, best ppe | vs Captum | vs full | MAC limit | "
        "of the limit | outputs: max rel. difference |"
    )
    lines = [header, "| --- " * 9 + "|"]
    for name, r in report["results"].items():
        s = r["setting"]
        label = (
            f"{name}: ZFNet x{s['width']} at {s['size']} px, {s['images']} images, patch {s['patch']}, "
            f"stride {s['stride']} ({r['occluded_images']} occluded images)"
        )
        best = r["times"][f"captum_ppe{r['captum_best_ppe']}"]
        lines.append(
            f"| {label} | {seconds(r['times']['ours'], 2, 'min')} | {seconds(r['times']['ours_full'], 2, 'min')} | "
            f"{seconds(best, 2, 'min')} (ppe {r['captum_best_ppe']}) | **{r['ratio']:.2f}x** | "
            f"**{r['speedup_over_full']:.2f}x** | {r['limit']:.2f}x | {r['fraction_of_limit']:.2f} | "
            f"{r['relative_difference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppe", type=int, nargs="+", default=[1, 8, 32, 64, 128], help="Captum's values to try")
    parser.add_argument("--settings", nargs="+", default=["zf48", "zf16"], choices=list(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/benchmark_occlusion.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "python": platform.python_version()},
        "torch": torch.__version__,
        "ppe_tried": args.ppe,
        "repeats": args.repeats,
        "results": {},
    }
    for name in args.settings:
        report["results"][name] = compare(SETTINGS[name], args.ppe, args.repeats, args.seed)
        print(json.dumps(report["results"][name], indent=1), flush=True)
    print(table(report))
    write_report(args.output, report)


if __name__ == "__main__":
    main()
