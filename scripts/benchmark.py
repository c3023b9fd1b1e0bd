"""Benchmark: what the public ``deconvolve`` call and a DeconvCallback firing cost, against the limit and Captum.

Plain PyTorch timing: a warm-up, then ``--repeats`` rounds in which the compared functions take turns; the
median and the spread (min..max) are reported, always as ratios against a baseline measured in the same
run; the call's ratio to the limit also round by round and as the fastest round of each (the least disturbed
on shared cores). Prints a Markdown table and writes JSON with the torch version, thread count and device.

1. The public call vs the limit: ``deconvolve(model, probe, {5 layers: --features channels})`` on the
   full-size ZFNet at 224x224 (random weights, its ReLUs in place as built; ``--relu-not-in-place`` as Captum
   needs them), conv1..conv5. The unavoidable work is one plain forward of the probe to the deepest layer (the
   fastest of NCHW, channels-last and channels-last in the plan's passes is the limit). The call builds its
   plan (geometry, the windows check), finds every maximum and projects them all. Beside the limit, not in it:
   the same cut forward with the plan's own CPU ops (``kernels.FastCPUOps``, whose LRN is far faster than the
   stock one), which is what the call's maxima pass runs, so the call against it is what its hooks and
   projections cost.
2. Beyond the forward vs Captum: the call's cost beyond that forward against
   ``captum.attr.NeuronDeconvolution`` (on a copy of the model with its ReLUs out of place, as Captum's
   backward hooks need), one ``attribute`` call per feature on the image holding its maximum
   (outputs checked equal up to the seed's scale); and one single-layer call vs Captum for that layer. Both
   ratios are also given round by round (each round against its own fastest forward) with the worst round,
   since a target met only in the median is not met in every run.
3. Cost of monitoring: ``configs/demo.yaml`` trained with the callback; its firings' total time as a share
   of the training time, the peak extra memory of a firing (RSS on CPU, CUDA allocator on GPU) and the
   memory after each firing (it must stay flat).
4. Scaling: a firing (a kept plan, as the callback runs it) as the probe grows and as the features grow.

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

from lightning_deconv import Projector, choose_features, deconvolve, find_maxima
from lightning_deconv.layers import eval_mode, resolve_layers, run_until
from lightning_deconv.paper.models import ZFNet
from lightning_deconv.plan import _SURVEYS
from lightning_deconv.stages import auto_layers, trace

ROOT = Path(__file__).resolve().parents[1]


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Median, min and max seconds of each of ``fns`` over ``repeats`` rounds, after one warm-up round, and the
    median of the page faults each round took (the process's minor faults: pages the kernel zero-filled for it).

    The functions take turns within each round, so a machine that speeds up or slows down during the run
    (shared or throttled cores) moves every figure alike and leaves their ratios intact.
    """

    def once(fn: Callable[[], object]) -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        faults = minor_faults()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, minor_faults() - faults

    for fn in fns.values():
        once(fn)
    runs: dict[str, list[float]] = {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, taken = once(fn)
            runs[name].append(seconds)
            faults[name].append(taken)
    return {
        name: {
            "median": statistics.median(r),
            "min": min(r),
            "max": max(r),
            "rounds": r,
            "page_faults_median": statistics.median(faults[name]),
        }
        for name, r in runs.items()
    }


def minor_faults() -> int:
    """The minor page faults this process has taken so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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


def zfnet_features(model: torch.nn.Module, count: int) -> dict[str, list[int]]:
    """The paper's five layers (auto-detected) with ``count`` seeded random channels each."""
    seen = trace(model, torch.zeros(1, 3, 224, 224, device=next(model.parameters()).device))
    layers = auto_layers(model, seen)
    return {layer: choose_features(seen.shapes[layer][1], count, seed=i) for i, layer in enumerate(layers)}


def plain_forward(model: torch.nn.Module, probe: torch.Tensor, layer: str, amp: bool = False) -> Callable[[], None]:
    target = resolve_layers(model, [layer])
    device_type = probe.device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16 if device_type == "cpu" else torch.float16, enabled=amp)

    def run() -> None:
        with torch.no_grad(), eval_mode(model), autocast:
            run_until(model, probe, target, lambda *_: None)

    return run


def fast_ops_forward(model: torch.nn.Module, images: torch.Tensor, layer: str) -> Callable[[], None]:
    """The forward the call's maxima pass runs, without its hooks: the plan's CPU ops (``kernels.FastCPUOps``:
    channels-last, the faster local response normalisation), not a plain forward, so it is not in the limit."""
    from lightning_deconv.kernels import FastCPUOps

    target = resolve_layers(model, [layer])

    def run() -> None:
        fast = FastCPUOps(images.device)
        with torch.no_grad(), eval_mode(model), fast:
            run_until(model, fast.prepare(images), target, lambda *_: None)

    return run


def captum_loop(model: torch.nn.Module, probe: torch.Tensor, maxima: dict) -> Callable[[], dict[str, torch.Tensor]]:
    """Captum's way to the same projections: one ``NeuronDeconvolution.attribute`` per feature."""
    from captum.attr import NeuronDeconvolution

    modules = dict(model.named_modules())

    def run() -> dict[str, torch.Tensor]:
        out = {}
        with eval_mode(model):
            for layer, found in maxima.items():
                deconv = NeuronDeconvolution(model, modules[layer])
                rows = [
                    deconv.attribute(probe[s : s + 1], neuron_selector=(int(c), int(p[0]), int(p[1])))
                    for c, s, p in zip(found.channels, found.source[:, 0], found.position[:, 0], strict=True)
                ]
                out[layer] = torch.cat(rows).detach().float().cpu()
        return out

    return run


def public_call(model, probe, features, repeats, device, amp) -> dict:
    """``deconvolve(model, probe, {layer: channels})`` against the plain forward and Captum's loop."""
    # The call and the forwards run the model as built (in-place ReLUs, as ZFNet, AlexNet, VGG and ResNet have
    # them); Captum runs a copy without, as it must: its backward hooks cannot follow in-place ReLUs.
    for_captum = copy.deepcopy(model)
    for module in for_captum.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    wanted = zfnet_features(model, features)
    layers = list(wanted)
    deepest, single = layers[-1], layers[-1]
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    probe_cl = probe.contiguous(memory_format=torch.channels_last)
    with eval_mode(model):
        maxima = find_maxima(model, probe, wanted)
    ours = deconvolve(model, probe, wanted)
    theirs = captum_loop(for_captum, probe, maxima)()
    errors = []
    for layer in layers:
        want = theirs[layer] * maxima[layer].value.view(-1, 1, 1, 1).cpu()
        errors.append(float((ours[layer].images.cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    # The forward in the passes the plan cuts on CPU (kernels.CPU_PASS_BYTES), the fastest way found to run it.
    per_pass = Projector(model, wanted, input_size=probe.shape[1:]).images_per_pass(len(probe))
    cut = [plain_forward(channels_last, chunk, deepest, amp) for chunk in probe_cl.split(per_pass)]

    def cold_call() -> object:  # as a first call on the model: its survey made anew
        _SURVEYS.pop(model, None)
        return deconvolve(model, probe, wanted)

    fast_ops = [fast_ops_forward(model, chunk, deepest) for chunk in probe.split(per_pass)]
    fns = {
        "forward_as_is": plain_forward(model, probe, deepest, amp),
        "forward_channels_last": plain_forward(channels_last, probe_cl, deepest, amp),
        "forward_cut": lambda: [run() for run in cut],
        "forward_fast_ops": lambda: [run() for run in fast_ops],
        "deconvolve": lambda: deconvolve(model, probe, wanted),
        "deconvolve_first": cold_call,
        "captum": captum_loop(for_captum, probe, maxima),
        "deconvolve_single": lambda: deconvolve(model, probe, {single: wanted[single]}),
        "captum_single": captum_loop(for_captum, probe, {single: maxima[single]}),
    }
    t = timed(fns, repeats, device)
    forwards = ("forward_as_is", "forward_channels_last", "forward_cut")
    limit = min(t[name]["median"] for name in forwards)
    one_pass = min(t[name]["median"] for name in forwards[:2])
    beyond = t["deconvolve"]["median"] - limit
    beyond_single = t["deconvolve_single"]["median"] - limit
    # Round by round: each against the fastest forward of its own round (the functions took turns).
    fastest = [min(times) for times in zip(*(t[name]["rounds"] for name in forwards), strict=True)]
    call_ratios = [call / f for call, f in zip(t["deconvolve"]["rounds"], fastest, strict=True)]
    captum_ratios = [
        captum / (call - f) if call > f else float("inf")
        for captum, call, f in zip(t["captum"]["rounds"], t["deconvolve"]["rounds"], fastest, strict=True)
    ]
    return {
        "layers": layers,
        "features_per_layer": features,
        "probe": len(probe),
        "times_s": t,
        "limit_s": limit,
        "images_per_pass": per_pass,
        "ratio_to_limit": t["deconvolve"]["median"] / limit,
        # The fastest round of the call against the fastest round of any forward: the least disturbed of each.
        "ratio_of_fastest": t["deconvolve"]["min"] / min(t[name]["min"] for name in forwards),
        "ratio_to_one_pass_forward": t["deconvolve"]["median"] / one_pass,
        "ratio_to_fast_ops_forward": t["deconvolve"]["median"] / t["forward_fast_ops"]["median"],
        "first_call_ratio_to_limit": t["deconvolve_first"]["median"] / limit,
        "beyond_forward_s": beyond,
        "captum_over_beyond": t["captum"]["median"] / beyond if beyond > 0 else float("inf"),
        "ratio_to_limit_by_round": call_ratios,
        "captum_over_beyond_by_round": captum_ratios,
        "worst_round": {"ratio_to_limit": max(call_ratios), "captum_over_beyond": min(captum_ratios)},
        "single_layer": single,
        "single_ratio_to_limit": t["deconvolve_single"]["median"] / limit,
        "single_captum_over_beyond": t["captum_single"]["median"] / beyond_single if beyond_single > 0 else None,
        "single_captum_over_call": t["captum_single"]["median"] / t["deconvolve_single"]["median"],
        "max_rel_error_vs_captum": max(errors),
        "windows": {
            k: None if v.windows is None else list(v.windows.size)
            for k, v in Projector(model, wanted, input_size=probe.shape[1:]).layers.items()
        },
    }


def memory_across_firings(model, probe, features, firings, device) -> dict:
    plan = Projector(model, zfnet_features(model, features), input_size=probe.shape[1:])
    plan(probe)  # warm-up: allocator pools and oneDNN primitives
    after, peaks = [], []
    for _ in range(firings):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            before = rss_mb()
        plan(probe)
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
        plan = Projector(model, zfnet_features(model, k), input_size=probe.shape[1:])
        return timed({"firing": lambda: plan(probe)}, repeats, device)["firing"]["median"]

    return {
        "probe": {n: one(n, base_features) for n in probes},
        "features": {k: one(base_probe, k) for k in features},
    }


def demo_cost(config: Path, measures: bool) -> dict:
    """Train the demo config in a fresh process (the callback's ``measures`` on or off); the callback's time (its
    firings with their occlusion maps, and the top-k scan) against the whole fit."""
    import yaml

    settings = yaml.safe_load(config.read_text())
    for callback in settings["trainer"]["callbacks"]:
        if callback["class_path"].endswith("DeconvCallback"):
            callback["init_args"]["measures"] = measures
    out = ROOT / "runs" / "benchmark_demo"
    out.mkdir(parents=True, exist_ok=True)
    variant = out / f"demo_measures_{'on' if measures else 'off'}.yaml"
    variant.write_text(yaml.safe_dump(settings))
    code = f"""
import json, time, sys
from lightning_deconv.paper.cli import DeconvCLI
start = time.perf_counter()
cli = DeconvCLI(args=["fit", "--config", {str(variant)!r}, "--trainer.logger.init_args.save_dir", {str(out)!r}])
total = time.perf_counter() - start
cb = [c for c in cli.trainer.callbacks if type(c).__name__ == "DeconvCallback"][0]
print("BENCH", json.dumps({{"fit_s": total, "firing_s": list(cb.firing_seconds.values()),
    "measure_s": list(cb.measure_seconds.values()), "top_k_s": list(cb.top_k_seconds.values()),
    "log_dir": cli.trainer.log_dir}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in done.stdout.splitlines() if x.startswith("BENCH ")]
    if done.returncode or not line:
        raise RuntimeError(f"demo run failed:\n{done.stderr[-3000:]}")
    result = json.loads(line[0][6:])
    result["share"] = (sum(result["firing_s"]) + sum(result["top_k_s"])) / result["fit_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="time the plain-forward limit under autocast too")
    parser.add_argument("--probe", type=int, default=32)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-demo", action="store_true", help="skip the demo training runs (part 3)")
    parser.add_argument("--only-demo", action="store_true", help="only the demo training runs (part 3)")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument(
        "--relu-not-in-place",
        action="store_true",
        help="run every ReLU out of place, for the call and the forwards too (Captum always runs a copy so)",
    )
    parser.add_argument("--output", default="runs/benchmark.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ZFNet(num_classes=1000).to(device).eval()
    for module in model.modules() if args.relu_not_in_place else ():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
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
    if not args.only_demo:
        report["public_call"] = public_call(model, probe, args.features, args.repeats, device, amp=False)
        print(json.dumps(report["public_call"], indent=1), flush=True)
        if args.amp:
            report["public_call_amp"] = public_call(model, probe, args.features, args.repeats, device, amp=True)
        report["memory"] = memory_across_firings(model, probe, args.features, 4, device)
        print(json.dumps(report["memory"], indent=1), flush=True)
    if not args.skip_scaling and not args.only_demo:
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
        for measures in (True, False):
            report[f"demo_measures_{'on' if measures else 'off'}"] = demo_cost(ROOT / "configs" / "demo.yaml", measures)
            print(json.dumps(report[f"demo_measures_{'on' if measures else 'off'}"], indent=1), flush=True)
    write_report(args.output, report)
    print(table(report))


def write_report(path: str | Path, report: dict) -> None:
    """Write a benchmark's results as JSON (the folder made if needed), atomically, and say where."""
    from lightning_deconv.record import atomic_write

    atomic_write(path, lambda file: file.write(json.dumps(report, indent=1).encode()))
    print(f"Wrote {path}")


def seconds(t: dict[str, float], digits: int = 3, lead: str = "median") -> str:
    """A timing of :func:`timed`: ``"median s (min..max)"``, or with ``lead="min"`` ``"fastest s (median, max)"``."""
    if lead == "min":
        return f"{t['min']:.{digits}f} s ({t['median']:.{digits}f}, {t['max']:.{digits}f})"
    return f"{t['median']:.{digits}f} s ({t['min']:.{digits}f}..{t['max']:.{digits}f})"


def table(report: dict) -> str:
    rows = ["| measure | value |", "| --- | --- |"]
    if "public_call" in report:
        rows += _call_rows(report)
    if "scaling" in report:
        s = report["scaling"]
        rows.append("| firing vs probe size | " + ", ".join(f"{n}: {t:.2f}s" for n, t in s["probe"].items()) + " |")
        rows.append(
            "| firing vs features/layer | " + ", ".join(f"{k}: {t:.2f}s" for k, t in s["features"].items()) + " |"
        )
    for name, label in (("demo_measures_on", "with the measures"), ("demo_measures_off", "without the measures")):
        if name in report:
            d = report[name]
            rows.append(
                f"| **demo: monitoring share of training, {label}** (target < 5%) | **{100 * d['share']:.1f}%** "
                f"({sum(d['firing_s']) + sum(d['top_k_s']):.1f} s of {d['fit_s']:.0f} s; top-k scan "
                f"{sum(d['top_k_s']):.1f} s) |"
            )
    return "\n".join(rows)


def _ratios(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}x" for v in values)


def _call_rows(report: dict) -> list[str]:
    c = report["public_call"]
    t = c["times_s"]
    n, layers, per = c["probe"], c["layers"], c["features_per_layer"]
    return [
        f"| plain forward of {n} probe images to {layers[-1]}, model as is (NCHW) | {seconds(t['forward_as_is'])} |",
        f"| the same forward, channels-last | {seconds(t['forward_channels_last'])} |",
        f"| the same forward, channels-last, {c['images_per_pass']} images a pass | {seconds(t['forward_cut'])} |",
        f"| `deconvolve(model, probe, {{{len(layers)} layers: {per} channels}})` | {seconds(t['deconvolve'])} |",
        f"| **public call / fastest forward** (target <= 1.2x) | **{c['ratio_to_limit']:.2f}x** (rounds: "
        f"{_ratios(c['ratio_to_limit_by_round'])}; worst {c['worst_round']['ratio_to_limit']:.2f}x; "
        f"fastest round of each {c['ratio_of_fastest']:.2f}x) |",
        f"| public call / fastest one-pass forward | {c['ratio_to_one_pass_forward']:.2f}x |",
        f"| page faults a round, median: the call, the cut forward | {t['deconvolve']['page_faults_median']:.0f}, "
        f"{t['forward_cut']['page_faults_median']:.0f} |",
        f"| the cut forward with the plan's own CPU ops (`FastCPUOps`: its LRN), no hooks (not a plain forward) | "
        f"{seconds(t['forward_fast_ops'])}: the call is {c['ratio_to_fast_ops_forward']:.2f}x it |",
        f"| first call on the model (survey made anew) | {seconds(t['deconvolve_first'])} "
        f"({c['first_call_ratio_to_limit']:.2f}x the fastest forward) |",
        f"| Captum `NeuronDeconvolution`, one `attribute` per feature ({len(layers) * per}) | {seconds(t['captum'])} |",
        f"| **Captum / the call's cost beyond the forward** (target >= 10x; max rel. difference "
        f"{c['max_rel_error_vs_captum']:.1e}) | **{c['captum_over_beyond']:.1f}x** (rounds: "
        f"{_ratios(c['captum_over_beyond_by_round'], 1)}; worst {c['worst_round']['captum_over_beyond']:.1f}x) |",
        f"| single layer `deconvolve(model, probe, {{{c['single_layer']!r}: {per} channels}})` | "
        f"{seconds(t['deconvolve_single'])} ({c['single_ratio_to_limit']:.2f}x the forward) |",
        f"| Captum for that layer's {per} features | {seconds(t['captum_single'])}: "
        f"{c['single_captum_over_call']:.1f}x the whole call, "
        + (
            f"{c['single_captum_over_beyond']:.1f}x its cost beyond the forward |"
            if c["single_captum_over_beyond"] is not None
            else "the call costs no more than the forward |"
        ),
        f"| peak extra memory of a firing (kept plan) | {report['memory']['peak_extra_mb']:.0f} MiB |",
        "| memory after firings 1..4 | "
        + ", ".join(f"{m:.0f}" for m in report["memory"]["memory_after_each_mb"])
        + " MiB |",
    ]


if __name__ == "__main__":
    main()
