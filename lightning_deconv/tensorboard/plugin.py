"""The Deconv tab: a TensorBoard plugin that serves the callback's run files, read-only.

It follows TensorBoard's dynamic-plugin example (``tensorboard/examples/plugins/example_basic``): a
:class:`~tensorboard.plugins.base_plugin.TBPlugin` with werkzeug routes under ``/data/plugin/deconv/`` and an
ES module frontend (``static/index.js``, plain JavaScript, served from package data) that TensorBoard loads in
an iframe. The plugin reads the callback's own files, not image summaries, so every firing is there and no
``--samples_per_plugin`` flag is needed. It is registered through the ``tensorboard_plugins`` entry point.

Routes (GET; every parameter an identifier from ``/runs``, never a path):

* ``/runs``: every run (monitor folder) with its layers, their features and the epochs fired.
* ``/matrix?run=&layer=``: per firing, the layer's features with value, source and dead/NaN mark; the
  per-layer charts (CKA to the previous and to the last firing, dead share, drift).
* ``/feature?run=&layer=&feature=``: one feature over every firing, and its latest top k.
* ``/strip?run=&layer=&epoch=&kind=crops|patches``: one firing's column of the matrix as one PNG.
* ``/image?run=&layer=&epoch=&feature=&kind=crop|patch|source|top_crop|top_patch[&rank=]``: one PNG.

Malformed parameters get 400, identifiers the logdir does not hold 404.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from lightning_deconv.tensorboard.store import RunStore
from lightning_deconv.tensorboard.views import BadRequest, NotFound, Views

__all__ = ["PLUGIN_NAME", "DeconvPlugin"]

PLUGIN_NAME = "deconv"
_IMAGE_EXPIRES = 24 * 3600  # seconds a browser may keep a picture whose URL names its file's version


class DeconvPlugin(base_plugin.TBPlugin):
    """TensorBoard's Deconv tab: active when the logdir holds DeconvCallback firing files.

    Example::

        >>> import tempfile
        >>> from tensorboard.plugins.base_plugin import TBContext
        >>> DeconvPlugin(TBContext(logdir=tempfile.mkdtemp())).is_active()
        False
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        super().__init__(context)
        # With --logdir_spec TensorBoard gives no single logdir: the tab then stays inactive.
        self._views = Views(RunStore(context.logdir, threads=1)) if context.logdir else None

    def is_active(self) -> bool:
        """Whether the logdir holds at least one monitor folder with firing files."""
        return self._views is not None and bool(self._views.store.monitors())

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Deconv", disable_reload=True)

    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/index.js": self._serve_index,
            "/runs": self._serve_runs,
            "/matrix": self._serve_matrix,
            "/feature": self._serve_feature,
            "/strip": self._serve_strip,
            "/image": self._serve_image,
        }

    @wrappers.Request.application
    def _serve_index(self, request: wrappers.Request) -> wrappers.Response:
        script = resources.files(__package__).joinpath("static", "index.js").read_bytes()
        return http_util.Respond(request, script, "text/javascript")

    @wrappers.Request.application
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        return self._answer(request, lambda views, args: views.runs())

    @wrappers.Request.application
    def _serve_matrix(self, request: wrappers.Request) -> wrappers.Response:
        return self._answer(request, lambda views, args: views.matrix(args.get("run"), args.get("layer")))

    @wrappers.Request.application
    def _serve_feature(self, request: wrappers.Request) -> wrappers.Response:
        return self._answer(
            request, lambda views, args: views.feature(args.get("run"), args.get("layer"), args.get("feature"))
        )

    @wrappers.Request.application
    def _serve_strip(self, request: wrappers.Request) -> wrappers.Response:
        return self._answer(
            request,
            lambda views, args: views.strip(args.get("run"), args.get("layer"), args.get("epoch"), args.get("kind")),
        )

    @wrappers.Request.application
    def _serve_image(self, request: wrappers.Request) -> wrappers.Response:
        def image(views: Views, args: Any) -> bytes:
            names = ("run", "layer", "epoch", "feature", "kind", "rank")
            return views.image(*(args.get(name) for name in names))

        return self._answer(request, image)

    def _answer(self, request: wrappers.Request, answer) -> wrappers.Response:
        """Run ``answer(views, query)``: JSON for a dict, PNG for bytes; 400/404 as plain text."""
        if self._views is None:
            return http_util.Respond(request, "no single logdir (started with --logdir_spec)", "text/plain", code=404)
        try:
            result = answer(self._views, request.args)
        except BadRequest as error:
            return http_util.Respond(request, str(error), "text/plain", code=400)
        except NotFound as error:
            return http_util.Respond(request, str(error), "text/plain", code=404)
        if isinstance(result, bytes):
            expires = _IMAGE_EXPIRES if request.args.get("v") else 0
            return http_util.Respond(request, result, "image/png", expires=expires)
        return http_util.Respond(request, json.dumps(result, allow_nan=False), "application/json")
