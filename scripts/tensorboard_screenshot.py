"""Screenshot TensorBoard's Images tab for a run: the deconv evolution grids as a user would see them.

Starts ``tensorboard`` on a free loopback port (with ``--samples_per_plugin images=100``, as the callback
recommends), waits until it serves the run's images, opens ``http://127.0.0.1:<port>/#images`` in headless
Chromium with the tag filter set (by default to ``evolution``), saves a PNG, and stops TensorBoard.
``--dashboard timeseries`` shoots the Time Series tab instead, ``--dashboard deconv`` the Deconv tab
(TensorBoard started as ``python -m lightning_deconv.tensorboard``, so that the tab is there even where the
package's entry point is not installed).

Needs Chromium (Debian: ``apt-get install chromium``). Nothing listens beyond 127.0.0.1.

Example::

    python scripts/tensorboard_screenshot.py runs/demo -o docs/tensorboard.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # runs as root in containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no calls home: loopback only
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_tags(url: str) -> dict[str, dict]:
    """``{run: {tag: info}}`` from the images plugin; empty while the server is not answering yet."""
    try:
        with urllib.request.urlopen(f"{url}/data/plugin/images/tags", timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
        return {}


def deconv_runs(url: str) -> list:
    """The Deconv tab's runs; empty while the server is not answering yet."""
    try:
        with urllib.request.urlopen(f"{url}/data/plugin/deconv/runs", timeout=30) as response:
            return json.loads(response.read())["runs"]
    except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
        return []


@contextmanager
def tensorboard(logdir: Path, timeout: float, deconv: bool = False) -> Iterator[str]:
    """Run TensorBoard on ``logdir`` until the block ends; yields its base URL once it serves images.

    Raises:
        RuntimeError: if TensorBoard exits, or lists no images within ``timeout`` seconds.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    main = "lightning_deconv.tensorboard" if deconv else "tensorboard.main"
    command = [sys.executable, "-m", main, "--logdir", str(logdir), "--port", str(port)]
    command += ["--host", "127.0.0.1", "--samples_per_plugin", "images=100"]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            # TensorBoard answers HTTP before its data server has read the event files: wait for images.
            while not (deconv_runs(url) if deconv else any(image_tags(url).values())):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    why = f"exited with {process.returncode}" if process.poll() is not None else "listed no images"
                    raise RuntimeError(f"TensorBoard {why} (after {timeout:.0f}s at most):\n{log.read()}")
                time.sleep(0.25)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def find_browser(name: str | None) -> str:
    """The Chromium executable to use, or exit with install instructions."""
    for candidate in [name] if name else BROWSERS:
        path = shutil.which(candidate)
        if path:
            return path
    sys.exit(
        f"error: no Chromium found (looked for {name or ', '.join(BROWSERS)}). Install it, e.g. on Debian/Ubuntu\n"
        "  sudo apt-get install -y chromium\n"
        "or pass --browser /path/to/chromium."
    )


def screenshot(browser: str, url: str, output: Path, width: int, height: int, wait_ms: int) -> None:
    """Load ``url`` in headless Chromium and save the window as ``output``.

    ``--virtual-time-budget`` lets the page's timers and requests run for ``wait_ms`` of virtual time before
    the shot: the dashboard fetches the image list and then each image asynchronously.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)  # so a failed run cannot leave an old screenshot looking fresh
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        command += [f"--virtual-time-budget={wait_ms}", f"--screenshot={output.resolve()}", url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120 + wait_ms / 1000)
    if done.returncode != 0 or not output.exists():
        raise RuntimeError(f"Chromium failed ({done.returncode}):\n{done.stderr[-3000:]}")


def dashboard_url(base: str, dashboard: str, tag_filter: str) -> str:
    """The page to shoot. The legacy Images tab keeps its filter in the fragment (``#images&tagFilter=``),
    the Time Series tab in the query string (``/?tagFilter=...#timeseries``)."""
    if dashboard == "deconv":
        return f"{base}/#deconv"
    if dashboard == "timeseries":
        query = f"?{urllib.parse.urlencode({'tagFilter': tag_filter})}" if tag_filter else ""
        return f"{base}/{query}#timeseries"
    return f"{base}/#images" + (f"&tagFilter={urllib.parse.quote(tag_filter)}" if tag_filter else "")


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, serve ``logdir`` with TensorBoard, and screenshot its Images tab."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Needs Chromium on PATH.")
    parser.add_argument("logdir", type=Path, help="TensorBoard log directory (a run, or a folder of runs)")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("tensorboard.png"), help="PNG to write (default: %(default)s)"
    )
    parser.add_argument(
        "--tag-filter",
        default="evolution",
        help="regular expression for TensorBoard's tag filter box ('' shows every image tag; default: %(default)s)",
    )
    parser.add_argument(
        "--dashboard",
        choices=("images", "timeseries", "deconv"),
        default="images",
        help="'images': the Images tab, large cards (wide grids may be cut at the card's edge); 'timeseries': "
        "smaller cards that fit each grid whole; 'deconv': the Deconv tab (default: %(default)s)",
    )
    parser.add_argument("--width", type=int, default=1400, help="window width in pixels (default: %(default)s)")
    parser.add_argument("--height", type=int, default=1000, help="window height in pixels (default: %(default)s)")
    parser.add_argument(
        "--wait", type=float, default=15.0, help="seconds of page time before the shot (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for TensorBoard to load (default: %(default)s)"
    )
    parser.add_argument("--browser", help=f"Chromium executable (default: the first of {', '.join(BROWSERS)})")
    args = parser.parse_args(argv)

    if not args.logdir.is_dir():
        parser.error(f"{args.logdir} is not a directory")
    browser = find_browser(args.browser)  # before starting TensorBoard: fail fast
    try:
        with tensorboard(args.logdir, args.timeout, deconv=args.dashboard == "deconv") as base:
            url = dashboard_url(base, args.dashboard, args.tag_filter)
            screenshot(browser, url, args.output, args.width, args.height, int(args.wait * 1000))
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.output} ({args.output.stat().st_size // 1024} KiB) from {url}")


if __name__ == "__main__":
    main()
