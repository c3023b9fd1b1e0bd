"""How fast the Deconv tab loads a run: 5 layers x 64 features x 8 epochs of made-up version-2 files.

Starts one TensorBoard with the tab (``python -m lightning_deconv.tensorboard``) on loopback over copies of
the same run, then per round, interleaved:

* **baseline**: ``torch.load(weights_only=True)`` of every file of one copy (the least any reader pays);
* **cold**: what the page fetches for a copy the server has not read yet (written just before): ``/runs``,
  then for every layer its ``/matrix`` and every firing's crop and patch strips, then one feature's ``/feature`` and its
  pictures (every epoch's crop and patch, the source image, the top 9 crops and patches), images 6 at a
  time as a browser does;
* **warm**: the same again (answers cached per file version).

Prints the minimum of each over the rounds, their spread, and cold / baseline. The target is cold < 2 s.

Example::

    python scripts/benchmark_dashboard.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tensorboard_screenshot import free_port  # scripts/ is on the path when this script runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_run import write_synthetic_run

SIZES = {"layers": 5, "features": 64, "probe": 16, "image": 64}
EPOCHS = 8


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def load_page(base: str, run: str) -> int:
    """Fetch what the tab shows of ``run`` (every layer's matrix, one feature's panel); returns bytes read."""
    route = f"{base}/data/plugin/deconv"
    query = urllib.parse.urlencode
    runs = {r["run"]: r for r in json.loads(_get(f"{route}/runs"))["runs"]}
    listing = runs[run]
    with ThreadPoolExecutor(6) as pool:
        matrices = list(
            pool.map(
                lambda layer: json.loads(_get(f"{route}/matrix?{query({'run': run, 'layer': layer})}")),
                listing["layers"],
            )
        )
        urls = [
            f"{route}/strip?{query({'run': run, 'layer': m['layer'], 'epoch': c['epoch'], 'kind': kind})}"
            for m in matrices
            for c in m["columns"]
            for kind in ("crops", "patches")
        ]
        layer = matrices[0]["layer"]
        feature = matrices[0]["features"][1]
        story = json.loads(_get(f"{route}/feature?{query({'run': run, 'layer': layer, 'feature': feature})}"))
        one = {"run": run, "layer": layer, "feature": feature}
        urls += [
            f"{route}/image?{query({**one, 'epoch': h['epoch'], 'kind': k})}"
            for h in story["history"]
            for k in ("crop", "patch")
        ]
        urls.append(f"{route}/image?{query({**one, 'epoch': story['history'][-1]['epoch'], 'kind': 'source'})}")
        top = story["top_k"]
        urls += [
            f"{route}/image?{query({**one, 'epoch': top['epoch'], 'kind': k, 'rank': j})}"
            for j in range(top["k"])
            for k in ("top_crop", "top_patch")
        ]
        return sum(len(b) for b in pool.map(_get, urls))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as folder:
        logdir = Path(folder)
        runs = [f"copy{i}/version_0/deconv/probe" for i in range(2 * args.rounds)]
        write_synthetic_run(logdir / runs[0], epochs=EPOCHS, top_k=9, **SIZES)
        size = sum(p.stat().st_size for p in logdir.rglob("*.pt")) / 2**20
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "lightning_deconv.tensorboard", "--logdir", folder, "--port", str(port)]
        server = subprocess.Popen(
            [*command, "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if json.loads(_get(f"{base}/data/plugins_listing")).get("deconv", {}).get("enabled"):
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("error: TensorBoard did not serve the Deconv tab")
                time.sleep(0.5)
            times: dict[str, list[float]] = {"baseline": [], "cold": [], "warm": []}
            for i in range(args.rounds):
                # Each round's two copies appear now, so that /runs (which reads every run once) reads only
                # them: cold is one run read for the first time (the files themselves in the page cache, as
                # for the baseline).
                for run in runs[2 * i : 2 * i + 2]:
                    if not (logdir / run).exists():
                        write_synthetic_run(logdir / run, epochs=EPOCHS, top_k=9, **SIZES)
                time.sleep(2.5)  # the plugin lists the logdir again after 2 s
                load_page(base, runs[2 * i])  # reads the baseline's copy too, outside the timings
                start = time.perf_counter()
                for path in sorted((logdir / runs[2 * i]).glob("*.pt")):
                    torch.load(path, map_location="cpu", weights_only=True)
                times["baseline"].append(time.perf_counter() - start)
                for kind in ("cold", "warm"):
                    start = time.perf_counter()
                    read = load_page(base, runs[2 * i + 1])
                    times[kind].append(time.perf_counter() - start)
        finally:
            server.terminate()
            server.wait(timeout=20)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}")
    print(
        f"run: {SIZES['layers']} layers x {SIZES['features']} features x {EPOCHS} epochs, {SIZES['image']}px probe "
        f"images, top 9; {size:.1f} MiB of files; page fetches {read / 2**20:.2f} MiB"
    )
    for kind, values in times.items():
        print(
            f"{kind:>8}: min {min(values):.3f} s, spread {max(values) - min(values):.3f} s; "
            f"rounds: {[round(v, 3) for v in values]}"
        )
    print(
        f"cold / baseline: {min(times['cold']) / min(times['baseline']):.2f}x; "
        f"target cold < 2 s: {'met' if min(times['cold']) < 2 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
