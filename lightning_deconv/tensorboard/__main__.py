"""``python -m lightning_deconv.tensorboard --logdir runs``: TensorBoard with the Deconv tab, installed or not.

Takes TensorBoard's own arguments. The tab is added to the plugins TensorBoard finds unless the
``tensorboard_plugins`` entry point already brought it (an installed package: plain ``tensorboard`` works too).
"""

from __future__ import annotations

import sys

from lightning_deconv.tensorboard.plugin import PLUGIN_NAME, DeconvPlugin


def main(argv: list[str] | None = None) -> int:
    """Run TensorBoard (blocking) with the Deconv tab; returns its exit status."""
    from tensorboard import default, program

    plugins = default.get_plugins()
    if not any(getattr(plugin, "plugin_name", None) == PLUGIN_NAME for plugin in plugins):
        plugins.append(DeconvPlugin)
    board = program.TensorBoard(plugins=plugins)
    board.configure(argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    return board.main()


if __name__ == "__main__":
    sys.exit(main())
