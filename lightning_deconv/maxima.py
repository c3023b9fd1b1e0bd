"""The strongest activations: for some features of some layers, the ``k`` images where each fires most.

Zeiler & Fergus (2014) project, per feature, its strongest activation over a probe set (Sec. 4, Fig. 4) or
its 9 strongest over the validation data, each in a different image (Fig. 2). Both are one search: each
image counts once per feature, at its largest activation of it (the first position in row-major order among
equal values), and images are ranked by that value, the earlier image first among equal values. With
``k = 1`` it is the paper's single maximum (:func:`find_maxima`); :func:`~lightning_deconv.analysis.top_k.top_k`
runs it over a whole dataset. Both give a :class:`TopK` per layer, which the engine
(:class:`~lightning_deconv.engine.Projector`) projects row by row.

The search runs one forward pass per batch, stopped at the deepest layer, for all layers at once, and keeps
per feature only a running top ``k``: the layer's forward hook copies its tracked channels (and its pooling's
input's, for the switches); once a layer's copies hold a few MiB, their ``[F, B]`` per-image maxima are cut to
those images' own top ``k`` (with the switches), and those are merged into the running ``[F, k]`` after the
batch (where images are kept) or every few takes, so memory is ``O(F * k)`` plus one batch and the copies.
Where the images are kept, each chosen image is copied once, when it is chosen, and dropped when no top ``k``
holds it any more; the ``[F, k, C, H, W]`` tensor is laid out once, at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lightning_deconv.kernels import FastCPUOps, one_thread, plain_ops
from lightning_deconv.layers import bound_forward, check_images, eval_mode, run_until, uncompiled
from lightning_deconv.probe import untouched_rng
from lightning_deconv.selection import check_channels, resolve_features

__all__ = ["TopK", "find_maxima", "image_maxima", "merge_top_k", "pooling_switches", "scan"]

LayerChannels = Mapping[str | nn.Module, Sequence[int] | Tensor]


@dataclass(frozen=True)
class TopK:
    """The ``k`` strongest activations of each of ``F`` tracked channels of one layer, each in a different image.

    Row ``f`` is channel ``channels[f]``; its columns are the images with the largest activation of that
    channel, strongest first, the earlier image first among equal values. :func:`find_maxima` gives ``k = 1``
    (the paper's single maximum per feature), :func:`~lightning_deconv.analysis.top_k.top_k` any ``k``.

    Attributes:
        channels: ``[F]`` the tracked channels.
        value: ``[F, k]`` descending: each image's largest activation of the channel (half precision lifted to
            float32; float64 for float64 models).
        source: ``[F, k]`` the image's index in the images or data searched (counted over every image scanned).
        position: ``[F, k, 2]`` (row, col) of that activation in the layer's output map (its first position
            in row-major order if the image reaches the value at several).
        map_size: ``(H, W)`` of the layer's output map.
        switch: for a max-pooling layer, ``[F, k, 2]`` the (row, col) in the pooling's input that each
            maximum was taken from (the paper's switch, as the pooling picked it); ``None`` otherwise.
        images: ``[F, k, C, H, W]`` the images themselves, as the data gave them, when the search kept them
            (data that cannot be indexed again: loaders and iterable datasets); ``None`` otherwise.
        peaks: with ``summaries=True``, ``[C]`` the maximum of *every* channel of the layer over the images
            (``<= 0``: a dead feature); ``None`` otherwise.
        gram: with ``summaries=True``, ``[N, N]`` float64 Gram matrix of the layer's activations flattened per
            image (what linear CKA needs; see :mod:`lightning_deconv.analysis.settling`); ``None`` otherwise.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> found = find_maxima(net, torch.rand(5, 3, 16, 16), {"1": [0, 2, 7]})["1"]
        >>> found.k, found.take([0, 2]).channels.tolist(), found.source.shape
        (1, [0, 7], torch.Size([3, 1]))
    """

    channels: Tensor
    value: Tensor
    source: Tensor
    position: Tensor
    map_size: tuple[int, int]
    switch: Tensor | None = None
    images: Tensor | None = None
    peaks: Tensor | None = None
    gram: Tensor | None = None

    @property
    def k(self) -> int:
        """How many images each row holds (fewer than asked for if the data had fewer)."""
        return self.value.shape[1]

    def take(self, rows: Tensor | Sequence[int]) -> TopK:
        """The features ``rows`` only (e.g. one process's share); the layer-wide ``peaks`` and ``gram`` stay."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return replace(
            self,
            channels=self.channels[rows],
            **{name: _rows(getattr(self, name), rows) for name in _PER_IMAGE},
        )

    def columns(self, order: Tensor) -> TopK:
        """The columns ``order [F, k']`` of every per-image field (e.g. the best ``k'`` of more candidates)."""

        def pick(tensor: Tensor | None) -> Tensor | None:
            if tensor is None:
                return None
            at = order.reshape(*order.shape, *[1] * (tensor.dim() - 2)).expand(*order.shape, *tensor.shape[2:])
            return tensor.gather(1, at)

        return replace(self, **{name: pick(getattr(self, name)) for name in _PER_IMAGE})

    def reindexed(self, mapping: int | Tensor) -> TopK:
        """The same, with ``source`` moved to a larger dataset: ``source + mapping`` for an offset, or
        ``mapping[source]`` for a tensor of global indices (e.g. a ``DistributedSampler``'s indices of a rank).
        """
        source = self.source + mapping if isinstance(mapping, int) else torch.as_tensor(mapping)[self.source]
        return replace(self, source=source)

    @staticmethod
    def side_by_side(parts: Sequence[TopK]) -> TopK:
        """The parts' columns side by side (``switch`` and ``images`` only if every part has them; the
        layer-wide ``peaks`` and ``gram`` of the parts' different images are not combined)."""

        def cat(name: str) -> Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if any(t is None for t in tensors) else torch.cat(tensors, dim=1)

        return TopK(parts[0].channels, map_size=parts[0].map_size, **{name: cat(name) for name in _PER_IMAGE})

    def best(self, k: int) -> TopK:
        """The best ``k`` columns of each row: the larger value first, then the smaller source; a source met
        twice in a row counts once (its first column). Fewer than ``k`` if fewer are distinct."""
        return self.columns(_best(self.value, self.source, k))


_PER_IMAGE = ("value", "source", "position", "switch", "images")


def _rows(tensor: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if tensor is None else tensor[rows]


def _best(value: Tensor, source: Tensor, k: int) -> Tensor:
    """Per row, the columns of the best ``k`` candidates (see :meth:`TopK.best`)."""
    order = source.argsort(dim=1, stable=True)
    ordered = source.gather(1, order)
    repeat = torch.zeros_like(ordered, dtype=torch.uint8)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    # Stable sorts compose: by source, then by value descending, then repeats last.
    by_value = value.gather(1, order).argsort(dim=1, descending=True, stable=True)
    order, repeat = order.gather(1, by_value), repeat.gather(1, by_value)
    order = order.gather(1, repeat.argsort(dim=1, stable=True))
    distinct = int((1 - repeat).sum(dim=1).min()) if len(repeat) else 0
    return order[:, : min(k, distinct)]


def image_maxima(name: str, activation: Tensor, channels: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel and image, the largest value over positions (first one wins ties), on the CPU.

    Returns:
        ``value [K, N]`` (half precision lifted to float32) and its ``position [K, N, 2]`` (row, col).
    """
    check_channels(name, channels, activation.shape[1])
    return _position_maxima(_select_channels(activation.detach(), channels))


def _select_channels(maps: Tensor, channels: Tensor) -> Tensor:
    """``[N, K, H, W]`` a copy of ``maps``' ``channels``, channels-last where ``maps`` are."""
    channels = channels.to(maps.device)
    if maps.is_contiguous(memory_format=torch.channels_last) and not maps.is_contiguous():
        # [N, H*W, C] is a view here: pick the channels from each pixel's row rather than gather strided maps.
        n, c, h, w = maps.shape
        picked = maps.permute(0, 2, 3, 1).reshape(n, h * w, c).index_select(2, channels)
        return picked.view(n, h, w, len(channels)).permute(0, 3, 1, 2)
    return maps.index_select(1, channels)


def _position_maxima(maps: Tensor) -> tuple[Tensor, Tensor]:
    """``image_maxima`` of every channel of ``maps`` ``[N, K, H, W]``."""
    n, k, h, w = maps.shape
    if maps.is_contiguous(memory_format=torch.channels_last) and not maps.is_contiguous():
        value, flat = maps.permute(0, 2, 3, 1).reshape(n, h * w, k).max(dim=1)
    else:
        value, flat = maps.reshape(n, k, h * w).max(dim=2)
    # The maximum is exact in any precision: lifting it afterwards gives the same value.
    value, flat = value.t().to(torch.promote_types(maps.dtype, torch.float32)).cpu(), flat.t().cpu()
    return value, torch.stack([flat // w, flat % w], dim=2)


def pooling_switches(
    pool: nn.MaxPool2d, pool_input: Tensor, channels: Tensor, source: Tensor, position: Tensor
) -> Tensor:
    """``[K, 2]`` where in ``pool``'s input the maximum of each row (channel, image ``source`` of
    ``pool_input``, ``position`` in the output) came from, as ``pool`` itself picks it: the pooling runs again
    on each row's window only (its taps inside the map, in the same order), not on whole maps; the rows whose
    windows have as many taps inside the map run as one batch."""
    kernel, stride, padding, dilation = (
        _pair(value) for value in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding, pool.dilation)
    )
    maps, sizes = pool_input.detach(), pool_input.shape[-2:]
    spans = [
        [_taps(at[axis] * stride[axis] - padding[axis], kernel[axis], dilation[axis], sizes[axis]) for axis in (0, 1)]
        for at in position.tolist()
    ]
    groups: dict[tuple[int, int], list[int]] = {}  # rows by how many taps of their window lie in the map
    for row, (rows, cols) in enumerate(spans):
        groups.setdefault((len(range(*rows.indices(sizes[0]))), len(range(*cols.indices(sizes[1])))), []).append(row)
    switches, steps = torch.empty(len(spans), 2, dtype=torch.long), torch.tensor(dilation)
    for (height, width), members in groups.items():
        corner = torch.tensor([[spans[m][0].start, spans[m][1].start] for m in members])
        ys, xs = (corner[:, axis, None] + torch.arange(n) * dilation[axis] for axis, n in enumerate((height, width)))
        image, channel, ys, xs = (t.to(maps.device) for t in (source[members], channels[members], ys, xs))
        window = maps[image[:, None, None], channel[:, None, None], ys[:, :, None], xs[:, None, :]]  # [R, h, w]
        index = F.max_pool2d(window[:, None], (height, width), return_indices=True)[1].flatten().cpu()
        switches[members] = corner + torch.stack([index // width, index % width], dim=1) * steps
    return switches


def _taps(start: int, kernel: int, dilation: int, size: int) -> slice:
    """The taps of a pooling window starting at ``start`` (padding included) that lie inside ``[0, size)``."""
    first = max(0, (dilation - 1 - start) // dilation)
    last = min(kernel - 1, (size - 1 - start) // dilation)
    return slice(start + first * dilation, start + last * dilation + 1, dilation)


class _Running:
    """The running top k of every layer. Each layer's forward hook copies the tracked channels of its output (and
    of its max-pooling's input, for the switches): a copy no later in-place op can change, and small. The copies
    wait there, several batches' worth, until they hold :data:`_HELD_BYTES` (or the images must be merged): then
    the batches' own top k are cut from them in one go (:meth:`_take`), not batch by batch in the hooks, where the
    same bookkeeping runs several times as long (its code and data out of the caches, between two convolutions).
    Those are merged into the running top k after the batch where images are kept (so that the images no top k
    holds any more can be dropped), else every :data:`_MERGE_EVERY` takes and at the end.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        channels: dict[str, Tensor],
        k: int,
        keep: bool,
        summaries: bool,
        switches: Collection[str],
    ) -> None:
        self.modules, self.channels, self.k, self.keep, self.summaries = modules, channels, k, keep, summaries
        self.switches = switches
        self.best: dict[str, TopK] = {}
        self.pending: dict[str, list[TopK]] = {name: [] for name in modules}  # batches' own top k, not merged yet
        self.values: dict[str, Tensor] = {}  # pooling layers: the running top k's values alone, from the takes
        self.seen = 0
        self.batch: Tensor | None = None  # the images of the batch being scanned, as the data gave them
        self.kept: dict[int, Tensor] = {}  # with ``keep``: a copy of each image some running top k holds, by source
        self.peaks: dict[str, list[Tensor]] = {name: [] for name in modules}
        self.flat: dict[str, list[Tensor]] = {name: [] for name in modules}
        # Per layer, the copies not taken yet: (first source, tracked output channels, pooling input's or None).
        self.held: dict[str, list[tuple[int, Tensor, Tensor | None]]] = {name: [] for name in modules}
        self.held_bytes: dict[str, int] = dict.fromkeys(modules, 0)

    def __call__(self, name: str, activation: Tensor, layer_input: Tensor | None) -> None:
        channels = self.channels[name]
        check_channels(name, channels, activation.shape[1])
        pooling = (
            name in self.switches
            and isinstance(self.modules[name], nn.MaxPool2d)
            and isinstance(layer_input, Tensor)
            and layer_input.dim() == 4
        )
        with plain_ops():  # small ops: no round trips through the pass's modes (kernels.plain_ops)
            if self.summaries:  # the whole layer, here, before a later in-place op can change it
                self.peaks[name].append(activation.amax(dim=(0, 2, 3)).float().cpu())
                self.flat[name].append(activation.flatten(1).double().cpu())
            maps = _select_channels(activation.detach(), channels)
            pool_input = _select_channels(layer_input.detach(), channels) if pooling else None
        self.held[name].append((self.seen, maps, pool_input))
        self.held_bytes[name] += sum(t.numel() * t.element_size() for t in (maps, pool_input) if t is not None)
        if self.held_bytes[name] >= _HELD_BYTES:
            self._take(name)

    def _take(self, name: str) -> None:
        """The held batches' own top k of layer ``name`` into ``pending``."""
        held, self.held[name], self.held_bytes[name] = self.held[name], [], 0
        if not held:
            return
        maps = torch.cat([m for _, m, _ in held]) if len(held) > 1 else held[0][1]
        pool_input = None
        if held[0][2] is not None:
            pool_input = torch.cat([p for _, _, p in held]) if len(held) > 1 else held[0][2]
        # Small ops on one thread (kernels.one_thread) but for a pass over large maps.
        with plain_ops(), one_thread(maps.device) if maps.numel() < _SMALL_MAP else contextlib.nullcontext():
            value, position = _position_maxima(maps)  # [F, B], [F, B, 2]
        with plain_ops(), one_thread(maps.device):
            self.pending[name].append(self._batch_best(name, value, position, maps.shape[-2:], pool_input, held[0][0]))

    def _batch_best(
        self,
        name: str,
        value: Tensor,
        position: Tensor,
        map_size: torch.Size,
        pool_input: Tensor | None,
        first: int,
    ) -> TopK:
        """The own top k of images ``first, first + 1, ...`` (their maxima ``value`` at ``position`` in maps of
        ``map_size``; ``pool_input``: the pooling input's tracked channels, for the switches)."""
        channels = self.channels[name]
        f, b = value.shape
        # A stable sort by value alone ranks the batch's images as _best does: their sources ascend.
        order = value.argsort(dim=1, descending=True, stable=True)[:, : self.k]
        source = torch.arange(first, first + b).expand(f, b)
        best = TopK(channels, value, source, position, tuple(map_size)).columns(order)
        if pool_input is not None:
            # A candidate no better than the k-th best of the earlier images can never enter the top k (ties go
            # to the earlier image): its switch is never needed.
            contender = ~(best.value <= self._bar(name, best.value))
            switch = torch.zeros(*order.shape, 2, dtype=torch.long)
            if contender.any():
                rows = torch.arange(f)[:, None].expand_as(order)[contender]  # the feature's map in pool_input
                switch[contender] = pooling_switches(
                    self.modules[name], pool_input, rows, order[contender], best.position[contender]
                )
            best = replace(best, switch=switch)
        return best

    def _bar(self, name: str, value: Tensor) -> Tensor:
        """``[F, 1]`` the k-th best value of each feature before these images (``-inf`` while fewer than k images
        were seen); then takes in their own top k ``value``."""
        earlier = self.values.get(name)
        known = value if earlier is None else torch.cat([earlier, value], dim=1)
        self.values[name] = known.topk(min(self.k, known.shape[1]), dim=1).values
        if earlier is None or earlier.shape[1] < self.k:
            return torch.full((len(value), 1), -torch.inf, dtype=value.dtype)
        return earlier[:, -1:]

    def after_batch(self) -> None:
        """Count the batch; where images are kept, take and merge now, copy each newly chosen image once (so that
        the batch itself is not held) and drop the images no running top k holds any more."""
        first, self.seen = self.seen, self.seen + len(self.batch)
        if not self.keep:
            if max(len(parts) for parts in self.pending.values()) >= _MERGE_EVERY:  # layers take at their own times
                self._merge()
            return
        for name in self.held:
            self._take(name)
        self._merge()
        held = set(torch.cat([top.source.flatten() for top in self.best.values()]).tolist())
        for source in held - self.kept.keys():
            self.kept[source] = self.batch[source - first].clone()
        self.kept = {source: image for source, image in self.kept.items() if source in held}

    def _merge(self) -> None:
        """Merge the batches' own top k into the running top k (on the CPU, on one thread: small ops, see
        kernels.one_thread)."""
        with one_thread("cpu"):
            for name, parts in self.pending.items():
                if parts:
                    previous = [self.best[name]] if name in self.best else []
                    # The candidates' sources ascend among equal values (the running best, then each batch's own
                    # in order), so a stable sort by value alone ranks them as _best does.
                    candidates = TopK.side_by_side(previous + parts)
                    order = candidates.value.argsort(dim=1, descending=True, stable=True)[:, : self.k]
                    self.best[name] = candidates.columns(order)
                    parts.clear()

    def result(self) -> dict[str, TopK]:
        for name in self.held:
            self._take(name)
        self._merge()
        found = {}
        for name in self.modules:  # in the order asked for, not the order of the layers' first takes
            top = self.best[name]
            if self.keep:
                images = torch.stack([self.kept[source] for source in top.source.flatten().tolist()])
                top = replace(top, images=images.view(*top.source.shape, *images.shape[1:]))
            if self.summaries:
                x = torch.cat(self.flat[name])
                top = replace(top, peaks=torch.stack(self.peaks[name]).amax(dim=0), gram=x @ x.T)
            found[name] = top
        return found


_SMALL_MAP = 2**19  # values of the maps taken at once, below which their bookkeeping runs on one thread
_MERGE_EVERY = 16  # takes whose own top k wait to be merged, at most (without kept images)
_HELD_BYTES = 2**22  # bytes of a layer's copies held before their top k are taken


@torch.no_grad()
def scan(
    model: nn.Module,
    batches: Iterable[Tensor],
    layers: LayerChannels,
    k: int,
    *,
    keep_images: bool = False,
    state: Mapping[str, Tensor] | None = None,
    summaries: bool = False,
    ops: FastCPUOps | None = None,
    switches: Collection[str] | None = None,
) -> dict[str, TopK]:
    """The top ``k`` of every layer's listed channels over ``batches`` of images (the one search behind
    :func:`find_maxima` and :func:`~lightning_deconv.analysis.top_k.top_k`), with the switches of the max-pooling
    layers named in ``switches`` (default: of every max-pooling layer).

    The model runs in eval mode, compiled code eagerly, without consuming random numbers, with ``state``
    replacing some of its tensors by name; on CPU channels-last (:class:`~lightning_deconv.kernels.FastCPUOps`:
    ``ops``, or its own; one shared with the projections that follow lays each filter out once for both).

    Raises:
        ValueError: unknown layers, empty or out-of-range channels, no images, images that do not fit the model.
    """
    model = uncompiled(model)  # hooks must see every op: compiled code runs eagerly here
    modules, channels = resolve_features(model, layers)
    pools = [name for name, module in modules.items() if isinstance(module, nn.MaxPool2d)]
    running = _Running(modules, channels, k, keep_images, summaries, pools if switches is None else switches)
    reference = next(model.parameters(), None)
    forward = bound_forward(model, state)
    fast = ops or FastCPUOps(reference.device if reference is not None else "cpu")
    with eval_mode(model), untouched_rng(), torch.compiler.set_stance("force_eager"):
        for batch in batches:
            if not len(batch):  # an empty tensor still splits into one empty batch
                continue
            check_images(model, batch)
            x = batch if reference is None else batch.to(reference.device, reference.dtype)
            running.batch = batch
            with fast:
                run_until(forward, fast.prepare(x), modules, running)
            running.after_batch()
    if not running.seen:
        raise ValueError("The data holds no images: give at least one.")
    return running.result()


def find_maxima(
    model: nn.Module,
    images: Tensor,
    layers: LayerChannels,
    *,
    batch_size: int | None = None,
    state: Mapping[str, Tensor] | None = None,
    summaries: bool = False,
) -> dict[str, TopK]:
    """For each layer and each of its listed channels, the strongest activation over ``images`` (``k = 1``).

    One forward pass per batch of ``batch_size`` images (default: all at once) serves every layer, and it
    stops at the deepest one; it runs as :func:`scan` does (eval mode, no side effects). For max-pooling
    layers it also records each maximum's switch. With ``summaries``, the same pass also gives each layer's
    ``peaks`` and ``gram`` (see :class:`TopK`).

    Args:
        model: any ``nn.Module`` taking ``images``.
        images: ``[N, C, H, W]`` images as the model expects them.
        layers: ``{layer: channels}``, layers by name (as in ``model.named_modules()``) or module.
        batch_size: images per forward pass (default: all at once).
        state: tensors used instead of the model's own, by name (e.g. rank 0's BatchNorm statistics).
        summaries: also compute each layer's ``peaks`` and ``gram``.

    Returns:
        ``{layer name: TopK}`` with ``k = 1``.

    Raises:
        ValueError: unknown layer, empty or out-of-range channels, images that do not fit the model.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> found = find_maxima(net, torch.rand(5, 3, 16, 16), {"1": [0, 7], "2": [3]})
        >>> found["1"].source.shape, found["2"].position.shape
        (torch.Size([2, 1]), torch.Size([1, 1, 2]))
    """
    check_images(model, images)
    batches = images.split(batch_size or max(1, len(images)))
    return scan(model, batches, layers, 1, state=state, summaries=summaries)


def merge_top_k(
    parts: Sequence[Mapping[str, TopK]], *, offsets: Sequence[int | Tensor] | None = None, k: int | None = None
) -> dict[str, TopK]:
    """The top ``k`` of the whole from the top ``k`` of its shards (e.g. every DDP rank's own).

    Equal to :func:`~lightning_deconv.analysis.top_k.top_k` over all shards' images at once, when every
    part's sources are global: give ``offsets``, per part an int added to its sources (a contiguous shard
    starting there) or a tensor of global indices (``mapping[local index]``, e.g.
    ``torch.tensor(list(distributed_sampler))``). An image held by several parts (a ``DistributedSampler``
    pads its shards with repeats) counts once.

    Args:
        parts: per shard, ``{layer: TopK}`` with the same layers and channels.
        offsets: per shard, how its sources map to global ones (default: they already are global).
        k: images per channel (default: the largest ``k`` of the parts).

    Returns:
        ``{layer: TopK}`` without ``peaks`` and ``gram`` (the shards' images differ).

    Raises:
        ValueError: no parts, parts with other layers or channels, or not as many offsets as parts.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> images = torch.rand(10, 3, 8, 8)
        >>> halves = [find_maxima(net, images[:6], {"1": [0, 2]}), find_maxima(net, images[6:], {"1": [0, 2]})]
        >>> merged = merge_top_k(halves, offsets=[0, 6])
        >>> torch.equal(merged["1"].source, find_maxima(net, images, {"1": [0, 2]})["1"].source)
        True
    """
    if not parts:
        raise ValueError("Nothing to merge: give at least one part.")
    if offsets is not None and len(offsets) != len(parts):
        raise ValueError(f"Give one offset per part: {len(offsets)} offsets for {len(parts)} parts.")
    if offsets is not None:
        parts = [{name: top.reindexed(o) for name, top in part.items()} for part, o in zip(parts, offsets, strict=True)]
    merged = {}
    for name, first in parts[0].items():
        same = [part.get(name) for part in parts]
        if any(top is None or not torch.equal(top.channels, first.channels) for top in same) or any(
            len(part) != len(parts[0]) for part in parts
        ):
            raise ValueError("Every part must hold the same layers with the same channels.")
        merged[name] = TopK.side_by_side(same).best(k or max(top.k for top in same))
    return merged
