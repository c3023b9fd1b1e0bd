"""Figure 2's top k per feature against brute force, for every kind of data, merged shards, memory and errors."""

from __future__ import annotations

import copy
import functools
import gc
import weakref

import pytest
import torch
from helpers import zf_shaped
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import lightning_deconv.maxima as search
from lightning_deconv import Projector, TopK, deconvolve, find_maxima, merge_top_k
from lightning_deconv.analysis.top_k import project_top_k, top_k
from lightning_deconv.analysis.top_k_files import load_top_k, save_top_k
from lightning_deconv.paper.figure2 import figure2, find_top_k, main
from lightning_deconv.record import RecordError
from lightning_deconv.render import top_k_grid

# Layers of the ZF-shaped net: pool1 (switches), relu2, pool2 (switches, ceil mode), relu4, pool5 (2 x 1 map).
FEATURES = {"2": [0, 3, 7], "4": [1, 6], "5": [2, 15], "9": [0, 5, 20], "12": [4, 9]}
N, K = 23, 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets run fastest on one thread, and then do not wait on cores that other processes hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net() -> nn.Sequential:
    torch.manual_seed(0)
    return zf_shaped().double().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(N, 3, 97, 91, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@functools.lru_cache(maxsize=8)
def outputs(net: nn.Sequential, images: torch.Tensor) -> list[torch.Tensor]:
    """Every module's output on every image, by plain NCHW forward (copies: later in-place ReLUs cannot
    touch them)."""
    found, x = [], images.clone()
    with torch.no_grad():
        for module in net:
            x = module(x)
            found.append(x.clone())
    return found


def brute_force(net: nn.Sequential, images: torch.Tensor, layer: str, channels: list[int], k: int):
    """Per channel, each image's maximum over positions, sorted descending with the earlier image first among
    equals. Returns ``(index, value, position)`` lists per channel and the layer's activations."""
    acts = outputs(net, images)[int(layer)]
    out = []
    for channel in channels:
        value, flat = acts[:, channel].flatten(1).max(dim=1)
        order = sorted(range(len(images)), key=lambda i: (-value[i].item(), i))[:k]
        width = acts.shape[-1]
        out.append(([*order], value[order].tolist(), [(int(flat[i]) // width, int(flat[i]) % width) for i in order]))
    return out, acts


def assert_brute_force(net, images, found: dict[str, TopK], k=K, features=FEATURES):
    assert list(found) == list(features)
    for layer, channels in features.items():
        want, acts = brute_force(net, images, layer, channels, k)
        top = found[layer]
        assert top.channels.tolist() == channels and top.map_size == tuple(acts.shape[-2:])
        assert top.value.shape == top.source.shape == (len(channels), min(k, len(images)))
        for row, (index, value, position) in enumerate(want):
            assert top.source[row].tolist() == index
            assert top.value[row].tolist() == pytest.approx(value, rel=1e-9)
            assert [tuple(p) for p in top.position[row].tolist()] == position
        # the positions really hold the reported values
        c = torch.tensor(channels).unsqueeze(1)
        held = acts[top.source, c, top.position[..., 0], top.position[..., 1]]
        torch.testing.assert_close(held, top.value, rtol=1e-9, atol=0)
        pool = net[int(layer)]
        if isinstance(pool, nn.MaxPool2d):  # the switch is where in the pooling's input the maximum came from
            before = outputs(net, images)[int(layer) - 1]
            at = before[top.source, c, top.switch[..., 0], top.switch[..., 1]]
            torch.testing.assert_close(at, top.value, rtol=1e-9, atol=0)
        else:
            assert top.switch is None


class DictItems(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"label": i % 3, "image": self.images[i]}


class Stream(IterableDataset):
    """Yields the images in a fixed shuffled order; records each yielded item so tests can watch it die."""

    def __init__(self, images: torch.Tensor, order: list[int]) -> None:
        self.images, self.order = images, order
        self.yielded: list[weakref.ref] = []
        self.alive_at_yield: list[int] = []

    def __iter__(self):
        for i in self.order:
            self.alive_at_yield.append(sum(ref() is not None for ref in self.yielded))
            item = self.images[i].clone()
            self.yielded.append(weakref.ref(item))
            yield item, i


def stream_order() -> list[int]:
    return torch.randperm(N, generator=torch.Generator().manual_seed(5)).tolist()


@pytest.mark.parametrize(
    "kind", ["tensor", "tensor_dataset", "dict_dataset", "loader_tuples", "loader_dicts", "iterable"]
)
def test_equals_brute_force(net, images, kind):
    """Exactly the brute-force ranking for every kind of data; batch size 4 does not divide 23."""
    if kind == "tensor":
        data, seen = images, images
    elif kind == "tensor_dataset":
        data, seen = TensorDataset(images, torch.arange(N)), images
    elif kind == "dict_dataset":
        data, seen = DictItems(images), images
    elif kind == "loader_tuples":
        data, seen = DataLoader(TensorDataset(images, torch.arange(N)), batch_size=4), images
    elif kind == "loader_dicts":
        data, seen = DataLoader(DictItems(images), batch_size=4), images
    else:
        order = stream_order()
        data, seen = Stream(images, order), images[order]  # indices count in the stream's order
    found = top_k(net, data, FEATURES, k=K, batch_size=4)
    assert_brute_force(net, seen, found)
    kept = kind.startswith("loader") or kind == "iterable"
    for top in found.values():  # loaders and streams keep the chosen images; indexable data does not
        assert (top.images is not None) == kept
        if kept:
            assert torch.equal(top.images, seen[top.source])


@pytest.mark.parametrize("held_bytes", [1, 5_000, 2**30], ids=["each batch", "every few batches", "at the end"])
def test_copies_held_over_batches_give_the_same_top_k(net, images, monkeypatch, held_bytes):
    """The hooks hold copies of the tracked channels and take their top k once they hold a budget of bytes: taken
    after each batch, every few batches (each layer at its own times) or once at the end, and merged every two
    takes, the ranking is the brute force's, ties included."""
    monkeypatch.setattr(search, "_HELD_BYTES", held_bytes)
    monkeypatch.setattr(search, "_MERGE_EVERY", 2)
    takes, take = [], search._Running._take

    def counted(running: search._Running, name: str) -> None:
        takes.append(len(running.held[name]))
        take(running, name)

    monkeypatch.setattr(search._Running, "_take", counted)
    waiting, after_batch = [], search._Running.after_batch

    def merged(running: search._Running) -> None:
        after_batch(running)
        waiting.append(max(len(parts) for parts in running.pending.values()))

    monkeypatch.setattr(search._Running, "after_batch", merged)
    assert_brute_force(net, images, top_k(net, images, FEATURES, k=K, batch_size=4))
    held, batches = [n for n in takes if n], -(-N // 4)  # batches per take (the end may find none left)
    assert sum(held) == batches * len(FEATURES)
    backwards = dict(reversed(FEATURES.items()))  # the first layer takes least often
    assert_brute_force(net, images, top_k(net, images, backwards, k=K, batch_size=4), features=backwards)
    assert max(waiting) < 2  # no layer's takes wait unmerged past _MERGE_EVERY, whichever layer comes first
    if held_bytes == 1:
        assert max(held) == 1
    elif held_bytes == 2**30:
        assert held == [batches] * len(FEATURES)
    else:
        assert 1 < max(held) < batches and len(set(held)) > 1
    blank = torch.zeros(11, 3, 97, 91, dtype=torch.float64)  # equal everywhere: images 0..k-1, position (0, 0)
    for top in top_k(net, blank, FEATURES, k=4, batch_size=3).values():
        assert top.source.tolist() == [[0, 1, 2, 3]] * len(top.channels) and (top.position == 0).all()


def test_shuffled_loader_counts_in_the_order_it_yields(net, images):
    def loader() -> DataLoader:
        ds = TensorDataset(images, torch.arange(N))
        return DataLoader(ds, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(3))

    seen = torch.cat([batch[0] for batch in loader()])
    found = top_k(net, loader(), FEATURES, k=K)
    assert_brute_force(net, seen, found)
    assert all(torch.equal(top.images, seen[top.source]) for top in found.values())


def test_ties_go_to_the_earlier_image_and_position(net):
    """Blank images give the same value at every position of every image: images 0..k-1, position (0, 0)."""
    blank = torch.zeros(11, 3, 97, 91, dtype=torch.float64)
    found = top_k(net, blank, FEATURES, k=4, batch_size=3)
    for top in found.values():
        assert top.source.tolist() == [[0, 1, 2, 3]] * len(top.channels)
        assert (top.position == 0).all()
    # duplicated images in different batches: the copy seen first ranks first
    images = torch.randn(6, 3, 97, 91, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    twice = torch.cat([images, images])
    found = top_k(net, twice, {"9": [0, 5]}, k=12, batch_size=1)
    for row in found["9"].source.tolist():
        assert all(row.index(i) < row.index(i + 6) for i in range(6))


def test_merge_of_shards_equals_the_whole(net, images):
    whole = top_k(net, images, FEATURES, k=K, batch_size=5)
    # contiguous halves, with offsets
    halves = [top_k(net, images[:9], FEATURES, k=K), top_k(net, images[9:], FEATURES, k=K)]
    merged = merge_top_k(halves, offsets=[0, 9])
    # DistributedSampler-style shards: rank r takes r, r + 3, ...; the shards are padded with image 0 and 1
    order = torch.cat([torch.arange(N), torch.tensor([0])])
    shards = [order[r::3] for r in range(3)]
    parts = [top_k(net, images[shard], FEATURES, k=K, batch_size=2) for shard in shards]
    interleaved = merge_top_k(parts, offsets=shards)
    for layer, want in whole.items():
        for got in (merged[layer], interleaved[layer]):
            assert torch.equal(got.source, want.source) and torch.equal(got.position, want.position)
            torch.testing.assert_close(got.value, want.value, rtol=1e-9, atol=0)
            assert (got.switch is None) == (want.switch is None)
            assert got.switch is None or torch.equal(got.switch, want.switch)
    # with global indices already applied, and kept images travel along
    kept = [{n: t.reindexed(shard) for n, t in p.items()} for p, shard in zip(parts, shards, strict=True)]
    kept = [{n: TopK(**{**t.__dict__, "images": images[t.source]}) for n, t in p.items()} for p in kept]
    again = merge_top_k(kept)
    for layer, want in whole.items():
        assert torch.equal(again[layer].source, want.source)
        assert torch.equal(again[layer].images, images[want.source])


def test_fewer_images_than_k_gives_all_of_them(net, images):
    found = top_k(net, images[:3], FEATURES, k=9)
    assert_brute_force(net, images[:3], found, k=3)
    assert all(top.k == 3 for top in found.values())
    assert merge_top_k([found, found])["9"].k == 3  # the same 3 images twice are still 3 images


def test_max_batches_scans_a_prefix(net, images):
    found = top_k(net, DataLoader(TensorDataset(images), batch_size=4), FEATURES, k=K, max_batches=3)
    assert_brute_force(net, images[:12], found)


def test_memory_does_not_grow_with_the_data(net, images):
    """Only the running top k and one batch are held: each streamed item dies within two batches, and the
    results are [F, k] whatever the number of images."""
    order = list(range(N)) * 4  # 92 images
    stream = Stream(images, order)
    found = top_k(net, stream, FEATURES, k=K, batch_size=4)
    assert max(stream.alive_at_yield) <= 2 * 4
    gc.collect()
    assert sum(ref() is not None for ref in stream.yielded) == 0  # kept images are copies, not the items
    for top in found.values():
        assert top.source.shape == (len(top.channels), K) and top.images.shape[:2] == (len(top.channels), K)


def test_no_side_effects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 4, 3))
    model.train()
    before = copy.deepcopy(model.state_dict())
    loader = DataLoader(TensorDataset(torch.randn(10, 3, 12, 12)), batch_size=4, shuffle=True)
    rng = torch.get_rng_state()
    top_k(model, loader, {"3": [0, 1], "4": [2]}, k=3)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"k": 0}, ValueError, "`k` must be at least 1"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be at least 1"),
        ({"max_batches": 0}, ValueError, "`max_batches` must be at least 1"),
        ({"layers": {"nope": [0]}}, ValueError, "Unknown layer 'nope'"),
        ({"layers": {"2": []}}, ValueError, "No channels given"),
        ({"layers": {"2": [8]}}, ValueError, "out of range"),
        ({"data": torch.zeros(0, 3, 97, 91)}, ValueError, "holds no images"),
        ({"data": DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8)))}, ValueError, "holds no images"),
        ({"data": torch.zeros(2, 1, 97, 91)}, ValueError, "channels"),
        ({"data": [1, 2]}, TypeError, "Expected a Tensor, a Dataset or a DataLoader"),
    ],
)
def test_clear_errors(net, images, kwargs, error, message):
    args = {"data": images[:2], "layers": {"2": [0]}, **kwargs}
    with pytest.raises(error, match=message):
        top_k(net, **args)


def test_merge_errors(net, images):
    a = top_k(net, images[:3], {"2": [0]}, k=2)
    b = top_k(net, images[:3], {"2": [1]}, k=2)
    with pytest.raises(ValueError, match="same layers with the same channels"):
        merge_top_k([a, b])
    with pytest.raises(ValueError, match="one offset per part"):
        merge_top_k([a, a], offsets=[0])
    with pytest.raises(ValueError, match="at least one part"):
        merge_top_k([])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kept", [False, True])
def test_projections_equal_deconvolve_on_the_same_image(net, images, kept):
    """Row f * k + j is deconvolve(model, that image, layer, [channel]), from the data by index or from the
    images top_k kept of a shuffled stream."""
    features = {"2": [0, 3], "9": [0, 5], "12": [4, 9]}
    order = stream_order()
    data, seen = (Stream(images, order), images[order]) if kept else (images, images)
    top = top_k(net, data, features, k=3, batch_size=4)
    projected = project_top_k(net, top, data=None if kept else images)
    for layer, t in top.items():
        p = projected[layer]
        assert p.images.shape == (len(t.channels) * t.k, *images.shape[1:])
        assert p.channels.tolist() == t.channels.repeat_interleave(t.k).tolist()
        for row, (f, j) in enumerate((f, j) for f in range(len(t.channels)) for j in range(t.k)):
            i = int(t.source[f, j])
            want = deconvolve(net, seen[i : i + 1], {layer: [int(t.channels[f])]})[layer]
            assert want.position[0].tolist() == t.position[f, j].tolist()
            assert want.value[0].item() == pytest.approx(t.value[f, j].item(), rel=1e-6)
            assert want.images.abs().max() > 0
            assert rel_err(p.images[row], want.images[0]) < 1e-5


def test_a_plan_can_be_reused_and_k_1_is_find_maxima(net, images):
    features = {"5": [2, 15], "12": [4, 9]}
    top = top_k(net, images, features, k=1, batch_size=7)
    found = find_maxima(net, images, features)
    for layer, t in top.items():
        assert torch.equal(t.source, found[layer].source) and torch.equal(t.position, found[layer].position)
        assert torch.equal(t.switch, found[layer].switch) and torch.equal(t.value, found[layer].value)
    plan = Projector(net, features, input_size=images.shape[1:])
    again = project_top_k(plan, top, data=images)
    assert all(torch.equal(again[n].images, p.images) for n, p in project_top_k(net, top, data=images).items())
    with pytest.raises(ValueError, match="mode='max'"):
        project_top_k(Projector(net, features, input_size=images.shape[1:], mode="map"), top, data=images)
    with pytest.raises(TypeError, match="positional"):  # every option is keyword-only
        top_k(net, images, features, 1)


def test_projection_needs_the_images(net, images):
    top = top_k(net, images, {"2": [0]}, k=2)
    with pytest.raises(ValueError, match="keep_images=True"):
        project_top_k(net, top)


def test_top_k_grid_puts_each_feature_beside_its_patches():
    crops = torch.zeros(2, 9, 1, 4, 4)
    crops[1, 4] = 1.0  # feature 1, its 5th strongest: the centre of its 3 x 3 block
    patches = torch.rand(2, 9, 1, 4, 4)
    grid = top_k_grid(crops, patches, min_cell=8, padding=1, gap=6)
    block = 3 * 8 + 4 * 1
    assert grid.shape == (3, 2 * (block + 6) + 6, 2 * block + 6 + 2 * 6)
    top, left = 6 + (block + 6) + 1 + 8 + 1, 6 + 1 + 8 + 1  # feature 1, row 1, column 1
    assert (grid[:, top : top + 8, left : left + 8] == 1.0).all()  # normalised: the peak is white
    assert (grid[:, 6 + 1 : 6 + 9, 6 + 1 : 6 + 9] == 0.5).all()  # zero projection: mid-grey
    four = top_k_grid(torch.randn(3, 4, 3, 5, 5), None, min_cell=5, padding=1)
    assert four.shape[1:] == (3 * (2 * 5 + 3 + 6) + 6, 2 * 5 + 3 + 2 * 6)  # 2 x 2 blocks, no patches


def test_saved_results_draw_figure2(tmp_path, net, images):
    features = {"2": [0, 3, 7], "9": [0, 5], "12": [4]}
    top = top_k(net, images, features, k=9, batch_size=8)
    projected = project_top_k(net, top, data=images)
    run = tmp_path / "run" / "version_0"
    folder = run / "deconv" / "evolution"
    path = save_top_k(folder, 3, top, projected)
    assert path == folder / "top9_epoch_003.pt"
    saved = load_top_k(path)
    assert saved.epoch == 3 and list(saved.top) == list(features)
    for layer, t in top.items():
        got, p = saved.top[layer], projected[layer]
        for field in ("channels", "value", "source", "position", "switch"):
            want = getattr(t, field)
            assert want is None if getattr(got, field) is None else torch.equal(getattr(got, field), want)
        assert got.map_size == t.map_size and got.images is None
        assert torch.equal(saved.crops[layer].flatten(0, 1), p.crops)
        assert torch.equal(saved.patches[layer].flatten(0, 1), p.patches)
        assert saved.boxes[layer].shape == (len(t.channels), 9, 4)
    # a file of version 1 (the image's index saved as "index") reads the same
    raw = torch.load(path, weights_only=True)
    old = {**raw, "version": 1, "layers": {}}
    for layer, fields in raw["layers"].items():
        old["layers"][layer] = {("index" if name == "source" else name): value for name, value in fields.items()}
    torch.save(old, tmp_path / "old.pt")
    for layer, t in load_top_k(tmp_path / "old.pt").top.items():
        assert torch.equal(t.source, top[layer].source) and torch.equal(t.value, top[layer].value)
    save_top_k(folder, 12, top, projected)
    assert list(find_top_k(tmp_path)) == [3, 12]
    out = figure2(tmp_path, tmp_path / "figure2.png")
    with Image.open(out) as picture:
        width, height = picture.size
    assert width > height > 400  # three layers side by side, up to three features of 3 x 3 down
    main([str(run), "-o", str(tmp_path / "one.png"), "--layers", "9", "--epoch", "3", "--features", "1"])
    with Image.open(tmp_path / "one.png") as picture:
        assert picture.size[0] < width and picture.size[1] < height
    with pytest.raises(ValueError, match="epochs \\[3, 12\\]"):
        figure2(run, tmp_path / "x.png", epoch=5)
    with pytest.raises(ValueError, match="tracked no layer"):
        figure2(run, tmp_path / "x.png", layers=["7"])
    with pytest.raises(RecordError, match="no such folder"):
        find_top_k(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordError, match="no DeconvCallback files"):
        find_top_k(tmp_path / "empty")
    with pytest.raises(ValueError, match="not those of its top k"):
        save_top_k(folder, 4, top, {**projected, "2": projected["9"]})
