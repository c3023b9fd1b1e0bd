"""The public API: every name in ``lightning_deconv.__all__`` is importable from the package and documented."""

import inspect

import lightning_deconv


def test_every_public_name_is_importable_and_documented():
    for name in lightning_deconv.__all__:
        obj = getattr(lightning_deconv, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
    assert lightning_deconv.top_k.__module__ == "lightning_deconv.analysis.top_k"  # the function, not the module


def test_the_api_reference_is_up_to_date():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "api_reference.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
