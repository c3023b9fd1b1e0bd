"""Rebuild Figure 4 of Zeiler & Fergus (2014) from a run trained with DeconvCallback.

    python scripts/reproduce_figure4.py runs/demo/version_0 -o figure4.png

Same as ``lightning-deconv figure4``; see :mod:`lightning_deconv.paper.figure4`.
"""

from lightning_deconv.paper.figure4 import main

if __name__ == "__main__":
    main()
