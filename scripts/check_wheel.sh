#!/usr/bin/env bash
# Build the wheel, install it into a clean venv and fire the callback once with each Lightning flavour alone;
# then install the `paper` extra and run the demo's CLI from a folder outside the clone (configs ship inside).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
wheel="$(ls "$work"/dist/lightning_deconv-*.whl)"
"$python" -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
$pip install --quiet torch==2.14.1 torchvision==0.29.1  # the builds this machine serves
$pip install --quiet "$wheel"
unwanted="$($pip list --format=freeze | grep -iE '^(lightning|matplotlib|jsonargparse|scikit-image|scikit-learn)==' || true)"
if [ -n "$unwanted" ]; then echo "the library pulled packages it does not need: $unwanted"; exit 1; fi
cd "$work"  # nothing of the clone on the path from here on
"$work/venv/bin/python" "$repo/scripts/smoke_install.py" "$work/standalone"  # pytorch_lightning alone
$pip install --quiet "lightning>=2.2"
$pip uninstall --quiet --yes pytorch-lightning
if "$work/venv/bin/python" -c "import pytorch_lightning" 2>/dev/null; then echo "pytorch_lightning is importable"; exit 1; fi
"$work/venv/bin/python" "$repo/scripts/smoke_install.py" "$work/lightning"  # lightning alone
$pip install --quiet "${wheel}[paper]"
"$work/venv/bin/lightning-deconv" demo --trainer.max_epochs=1 --data.init_args.samples_per_epoch=64 \
    --data.init_args.val_per_class=2 --trainer.enable_progress_bar=false >"$work/demo.log" 2>&1 \
    || { tail -30 "$work/demo.log"; exit 1; }
tail -1 "$work/demo.log"
ls "$work"/figure4.png "$work"/figure2.png >/dev/null
echo "check_wheel: the wheel installs lean, fires with each Lightning flavour alone, and runs the demo from $work"
