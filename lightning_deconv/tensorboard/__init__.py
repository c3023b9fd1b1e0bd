"""The Deconv tab for TensorBoard: browse every tracked feature of a run across its firings.

``tensorboard --logdir runs`` shows it once the package is installed (entry point ``tensorboard_plugins``).
"""

from lightning_deconv.tensorboard.plugin import PLUGIN_NAME, DeconvPlugin

__all__ = ["PLUGIN_NAME", "DeconvPlugin"]
