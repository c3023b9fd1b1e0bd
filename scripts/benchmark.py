"""Benchmark: what a DeconvCallback firing costs, against the physical limit and against Captum.

Plain PyTorch timing: a warm-up, then ``--repeats`` runs; the median and the spread (min..max) are
reported, always as ratios against a baseline measured in the same run. Prints a Markdown table and writes
JSON with the torch version, thread count and device beside the figures.

1. A whole firing vs the limit: full-size ZFNet at 224x224 (random weights), conv1..conv5 with
   ``--features`` tracked features each. The unavoidable work is one plain forward of the probe set to the
   deepest tracked layer; a firing finds every tracked feature's maximum, then projects all of them.
2. Projection vs Captum: given the maxima, our batched projections against
   ``captum.attr.NeuronDeconvolution``, one ``attribute`` call per feature on the image holding its maximum
   (outputs checked equal up to the seed's scale).
3. Cost of monitoring: ``configs/demo.yaml`` trained with the callback; its firings' total time as a share
   of the training time, and the peak extra memory of a firing (RSS on CPU, CUDA allocator on GPU) and the
   memory after each firing (it must stay flat).
4. Scaling: a firing's time as the probe grows and as the features per layer grow.

Usage::

    python scripts/benchmark.py                     # everything, CPU
    python scripts/benchmark.py --skip-demo --device cuda --amp
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_deconv.callback import DeconvCallback
from lightning_deconv.engine import project
from lightning_deconv.layers import eval_mode, resolve_layers, run_until
from lightning_deconv.paper.models import ZFNet
from lightning_deconv.selection import find_maxima

ROOT = Path(__file__).resolve().parents[1]


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Median, min and max seconds of each of ``fns`` over ``repeats`` rounds, after one warm-up round.

    The functions take turns within each round, so a machine that speeds up or slows down during the run
    (shared or throttled cores) moves every figure alike and leaves their ratios intact.
    """

    def once(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():
        once(fn)
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(once(fn))
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r)} for name, r in runs.items()}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def rss_mb() -> float:
    """Resident memory of this process now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # Linux: writing 5 to clear_refs resets the peak-RSS counter
        Path("/proc/self/clear_refs").write_text("5")


def setup_callback(model: torch.nn.Module, probe: torch.Tensor, features: int) -> DeconvCallback:
    callback = DeconvCallback(probe=probe.cpu(), features_per_layer=features)
    callback.setup(trainer=None, pl_module=model, stage="fit")
    return callback


def plain_forward(model: torch.nn.Module, probe: torch.Tensor, layer: str) -> Callable[[], None]:
    target = resolve_layers(model, [layer])

    def run() -> None:
        with torch.no_grad(), eval_mode(model):
            run_until(model, probe, target, lambda *_: None)

    return run


def firing_vs_limit(model, probe, features, repeats, device, amp) -> dict:
    """A firing against one plain forward of the probe to the deepest layer, in the model's own layout and
    channels-last (the faster of the two is the limit: the firing itself runs channels-last on CPU)."""
    callback = setup_callback(model, probe, features)
    deepest = list(callback.features)[-1]
    as_is = plain_forward(model, probe, deepest)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    as_cl = plain_forward(channels_last, probe.contiguous(memory_format=torch.channels_last), deepest)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16, enabled=amp)

    def as_is_amp() -> None:
        with autocast:
            as_is()

    def as_cl_amp() -> None:
        with autocast:
            as_cl()

    times = timed({"as_is": as_is_amp, "cl": as_cl_amp, "fire": lambda: callback.snapshot(model)}, repeats, device)
    t_as_is, t_cl, t_fire = times["as_is"], times["cl"], times["fire"]
    t_limit = min(t_as_is, t_cl, key=lambda t: t["median"])
    return {
        "layers": list(callback.features),
        "features_per_layer": features,
        "probe": len(probe),
        "forward_as_is_s": t_as_is,
        "forward_channels_last_s": t_cl,
        "limit_s": t_limit,
        "firing_s": t_fire,
        "ratio": t_fire["median"] / t_limit["median"],
        "ratio_to_forward_as_is": t_fire["median"] / t_as_is["median"],
        "windows": {k: None if v is None else list(v.size) for k, v in callback._windows.items()},
    }


def projection_vs_captum(model, probe, features, repeats, device) -> dict:
    from captum.attr import NeuronDeconvolution

    for module in model.modules():  # Captum's backward hooks cannot follow in-place ReLUs
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    callback = setup_callback(model, probe, features)
    with eval_mode(model):
        maxima = find_maxima(model, probe, callback.features)
    modules = dict(model.named_modules())

    def ours() -> dict[str, torch.Tensor]:
        return {
            layer: project(model, probe, layer, found, field=callback._windows[layer])
            for layer, found in maxima.items()
        }

    def captum() -> dict[str, torch.Tensor]:
        out = {}
        with eval_mode(model):
            for layer, found in maxima.items():
                deconv = NeuronDeconvolution(model, modules[layer])
                rows = [
                    deconv.attribute(probe[s : s + 1], neuron_selector=(int(c), int(p[0]), int(p[1])))
                    for c, s, p in zip(found.channels, found.source, found.position, strict=True)
                ]
                out[layer] = torch.cat(rows).detach().float().cpu()
        return out

    mine, theirs = ours(), captum()
    errors = []
    for layer, found in maxima.items():
        want = theirs[layer] * found.value.view(-1, 1, 1, 1)
        errors.append(float((mine[layer].cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    times = timed({"ours": ours, "captum": captum}, repeats, device)
    t_ours, t_captum = times["ours"], times["captum"]
    return {
        "ours_s": t_ours,
        "captum_s": t_captum,
        "speedup": t_captum["median"] / t_ours["median"],
        "max_rel_error": max(errors),
    }


def memory_across_firings(model, probe, features, firings, device) -> dict:
    callback = setup_callback(model, probe, features)
    callback.snapshot(model)  # warm-up: allocator pools and oneDNN primitives
    after, peaks = [], []
    for _ in range(firings):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            before = rss_mb()
        callback.snapshot(model)
        if device.type == "cuda":
            peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
            after.append(torch.cuda.memory_allocated() / 2**20)
        else:
            peaks.append(peak_rss_mb() - before)
            after.append(rss_mb())
    return {"peak_extra_mb": max(peaks), "memory_after_each_mb": after}


def scaling(model, device, repeats, probes, features, base_probe, base_features) -> dict:
    def one(n, k):
        probe = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(n)).to(device)
        callback = setup_callback(model, probe, k)
        return timed({"firing": lambda: callback.snapshot(model)}, repeats, device)["firing"]["median"]

    return {
        "probe": {n: one(n, base_features) for n in probes},
        "features": {k: one(base_probe, k) for k in features},
    }


def demo_cost(config: Path) -> dict:
    """Train the demo config in a fresh process; compare the callback's firing time to the whole fit."""
    out = ROOT / "runs" / "benchmark_demo"
    code = f"""
import json, time, sys
from lightning_deconv.paper.cli import DeconvCLI
start = time.perf_counter()
cli = DeconvCLI(args=["fit", "--config", {str(config)!r}, "--trainer.logger.init_args.save_dir", {str(out)!r}])
total = time.perf_counter() - start
cb = [c for c in cli.trainer.callbacks if type(c).__name__ == "DeconvCallback"][0]
firings = list(cb.firing_seconds.values())
print("BENCH", json.dumps({{"fit_s": total, "firing_s": firings, "log_dir": cli.trainer.log_dir}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in done.stdout.splitlines() if x.startswith("BENCH ")]
    if done.returncode or not line:
        raise RuntimeError(f"demo run failed:\n{done.stderr[-3000:]}")
    result = json.loads(line[0][6:])
    result["share"] = sum(result["firing_s"]) / result["fit_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="time the plain-forward limit under autocast too")
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-demo", action="store_true", help="skip the demo training run (part 3)")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-captum", action="store_true")
    parser.add_argument("--output", default="runs/benchmark.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ZFNet(num_classes=1000).to(device).eval()
    probe = torch.randn(args.probe, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    report: dict = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cpu_count": __import__("os").cpu_count(),
            "python": platform.python_version(),
        },
        "settings": vars(args),
    }
    print(f"# lightning-deconv benchmark on {report['machine']}", flush=True)
    report["firing"] = firing_vs_limit(model, probe, args.features, args.repeats, device, amp=False)
    if args.amp:
        report["firing_amp_limit"] = firing_vs_limit(model, probe, args.features, args.repeats, device, amp=True)
    print(json.dumps(report["firing"], indent=1), flush=True)
    report["memory"] = memory_across_firings(model, probe, args.features, 4, device)
    print(json.dumps(report["memory"], indent=1), flush=True)
    if not args.skip_captum:
        report["captum"] = projection_vs_captum(
            ZFNet(num_classes=1000).to(device).eval(), probe, args.features, args.repeats, device
        )
        print(json.dumps(report["captum"], indent=1), flush=True)
    if not args.skip_scaling:
        report["scaling"] = scaling(
            model,
            device,
            max(1, args.repeats // 2),
            (16, 32, 64, 128, 256),
            (4, 8, 16, 32, 64),
            args.probe,
            args.features,
        )
        print(json.dumps(report["scaling"], indent=1), flush=True)
    if not args.skip_demo:
        report["demo"] = demo_cost(ROOT / "configs" / "demo.yaml")
        print(json.dumps(report["demo"], indent=1), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(table(report))


def _seconds(t: dict[str, float]) -> str:
    return f"{t['median']:.3f} s ({t['min']:.3f}..{t['max']:.3f})"


def table(report: dict) -> str:
    f = report["firing"]
    rows = [
        "| measure | value |",
        "| --- | --- |",
        f"| plain forward of {f['probe']} probe images to {f['layers'][-1]}, model as is (NCHW) | "
        f"{_seconds(f['forward_as_is_s'])} |",
        f"| the same forward, channels-last | {_seconds(f['forward_channels_last_s'])} |",
        f"| whole firing, {f['features_per_layer']} features x {len(f['layers'])} layers | {_seconds(f['firing_s'])} |",
        f"| **firing / limit** (the faster forward) | **{f['ratio']:.2f}x** "
        f"({f['ratio_to_forward_as_is']:.2f}x of the forward as is) |",
        f"| peak extra memory of a firing | {report['memory']['peak_extra_mb']:.0f} MiB |",
        "| memory after firings 1..4 | "
        + ", ".join(f"{m:.0f}" for m in report["memory"]["memory_after_each_mb"])
        + " MiB |",
    ]
    if "captum" in report:
        c = report["captum"]
        rows += [
            f"| projections, ours | {_seconds(c['ours_s'])} |",
            f"| projections, Captum NeuronDeconvolution per feature | {_seconds(c['captum_s'])} |",
            f"| **speed-up over Captum** (max rel. difference {c['max_rel_error']:.1e}) | **{c['speedup']:.1f}x** |",
        ]
    if "scaling" in report:
        s = report["scaling"]
        rows.append("| firing vs probe size | " + ", ".join(f"{n}: {t:.2f}s" for n, t in s["probe"].items()) + " |")
        rows.append(
            "| firing vs features/layer | " + ", ".join(f"{k}: {t:.2f}s" for k, t in s["features"].items()) + " |"
        )
    if "demo" in report:
        d = report["demo"]
        rows.append(
            f"| **demo: monitoring share of training** | **{100 * d['share']:.1f}%** "
            f"({sum(d['firing_s']):.1f} s of {d['fit_s']:.0f} s) |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
