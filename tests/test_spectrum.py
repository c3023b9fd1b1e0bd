"""The Fig. 6 measures on inputs whose spectra are known in closed form, and the diagnosis they feed."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from lightning_deconv import aliasing, filter_spectrum
from lightning_deconv.analysis.diagnosis import Diagnosis, FiringMeasures, measure_firing
from lightning_deconv.analysis.spectrum import BAND_EDGES

LOW, HIGH = BAND_EDGES


def grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(size, dtype=torch.float64)
    return rows[:, None].expand(size, size), rows[None, :].expand(size, size)


def band_of(radius: float) -> int:
    return 0 if radius < LOW else 1 if radius < HIGH else 2


def signed(k: int, size: int) -> float:
    """Bin ``k`` of a ``size``-point DFT in cycles per pixel, in [-1/2, 1/2)."""
    return (k if 2 * k < size else k - size) / size


@pytest.mark.parametrize("size", [3, 5, 7, 11])
def test_a_constant_filter_is_all_low(size):
    weight = torch.randn(4, 3, 1, 1).expand(4, 3, size, size)  # each filter constant, channels differ
    assert torch.equal(filter_spectrum(weight), torch.tensor([[1.0, 0.0, 0.0]]).expand(4, 3))


@pytest.mark.parametrize("size", [2, 4, 8, 10])
def test_a_checkerboard_is_all_high(size):
    rows, cols = grid(size)
    board = (-1.0) ** (rows + cols)
    weight = torch.stack([board, -2 * board, 0.5 * board]).expand(2, 3, size, size).float()
    assert torch.equal(filter_spectrum(weight), torch.tensor([[0.0, 0.0, 1.0]]).expand(2, 3))


@pytest.mark.parametrize(("size", "u", "v"), [(7, 1, 0), (7, 1, 1), (7, 2, 1), (7, 3, 3), (11, 1, 1), (11, 3, 2),
                                              (11, 5, 0), (8, 2, 0), (8, 4, 4), (9, 2, 2)])  # fmt: skip
def test_a_single_frequency_lands_in_its_band(size, u, v):
    rows, cols = grid(size)
    wave = torch.cos(2 * math.pi * (u * rows + v * cols) / size + 0.3)
    radius = math.hypot(signed(u, size), signed(v, size))
    want = torch.zeros(3, dtype=torch.float64)
    want[band_of(radius)] = 1.0
    got = filter_spectrum(wave.expand(1, 3, size, size))[0]
    assert torch.allclose(got, want, atol=1e-12), (radius, got)


def test_mixtures_split_by_energy_and_channels_add():
    # A constant c plus a cosine of amplitude b at a non-Nyquist bin: energies c^2 n^2 and b^2 n^2 / 2.
    size, c, b = 9, 0.7, 1.3
    rows, cols = grid(size)
    wave = b * torch.cos(2 * math.pi * (4 * rows + 3 * cols) / size)  # radius 5/9: high
    mixed = filter_spectrum((c + wave).expand(1, 1, size, size))[0]
    low = c**2 / (c**2 + b**2 / 2)
    assert torch.allclose(mixed, torch.tensor([low, 0.0, 1 - low], dtype=torch.float64), atol=1e-12)
    # The channels' powers add: a flat channel with the energy of a high one gives half and half.
    flat = torch.full((size, size), (b**2 / 2) ** 0.5)
    halves = filter_spectrum(torch.stack([flat, wave.float()])[None])[0]
    assert torch.allclose(halves, torch.tensor([0.5, 0.0, 0.5]), atol=1e-6)


def test_a_zero_filter_has_no_spectrum_and_bad_input_is_named():
    assert filter_spectrum(torch.zeros(2, 3, 5, 5)).isnan().all()
    with pytest.raises(ValueError, match=r"\[O, C, kh, kw\]"):
        filter_spectrum(torch.ones(3, 5, 5))
    with pytest.raises(ValueError, match="0 < low <= high"):
        filter_spectrum(torch.ones(1, 1, 5, 5), edges=(0.3, 0.2))


@pytest.mark.parametrize(("period", "size"), [(2, 32), (4, 64), ((2, 4), 40), (3, 31)])
def test_an_image_that_repeats_with_the_period_is_all_aliasing(period, size):
    rows, cols = (period, period) if isinstance(period, int) else period
    g = torch.Generator().manual_seed(0)
    tile = torch.rand(5, 3, rows, cols, generator=g)
    images = tile.repeat(1, 1, -(-size // rows), -(-size // cols))[..., :size, :size]
    got = aliasing(images, period)
    assert torch.allclose(got, torch.ones(5), atol=1e-6)


def test_a_smooth_blob_has_no_aliasing_and_a_constant_has_none_to_share():
    rows, cols = grid(64)
    blob = torch.exp(-((rows - 30) ** 2 + (cols - 37) ** 2) / (2 * 6.0**2))
    got = aliasing(blob.expand(1, 3, 64, 64).float(), 4)
    assert 0 <= got.item() < 1e-9
    assert aliasing(torch.ones(2, 3, 16, 16), 4).isnan().all()
    with pytest.raises(ValueError, match="smaller than the period"):
        aliasing(torch.rand(1, 1, 3, 8), 4)


def test_a_periodic_pattern_on_a_smooth_image_shows_its_share():
    # A smooth image plus a stride pattern: the share is the pattern's non-DC energy over the total non-DC.
    rows, cols = grid(64)
    smooth = torch.cos(2 * math.pi * 3 * rows / 64)  # 3/64 cycles per pixel: off the lattice of period 4
    pattern = 0.5 * torch.cos(2 * math.pi * rows / 4) * torch.cos(2 * math.pi * cols / 4)  # on it
    got = aliasing((smooth + pattern)[None, None], 4).item()
    smooth_energy, pattern_energy = 64 * 64 / 2, 0.25 * 64 * 64 / 4
    assert got == pytest.approx(pattern_energy / (smooth_energy + pattern_energy), abs=1e-9)


@pytest.mark.parametrize(("period", "height", "width"), [(4, 64, 64), (2, 32, 48), ((4, 2), 40, 24)])
def test_white_noise_has_the_lattice_share_of_the_frequencies(period, height, width):
    rows, cols = (period, period) if isinstance(period, int) else period
    # Count, by brute force over the DFT's frequencies, those that are multiples of 1/period on both axes.
    on_lattice = sum(
        1
        for u in range(height)
        for v in range(width)
        if (u, v) != (0, 0) and (u * rows / height).is_integer() and (v * cols / width).is_integer()
    )
    share = on_lattice / (height * width - 1)  # every non-DC bin of white noise has the same expected power
    noise = torch.randn(1000, 1, height, width, generator=torch.Generator().manual_seed(0))
    got = aliasing(noise, period)
    assert got.mean().item() == pytest.approx(share, rel=0.05)
    assert (got >= 0).all() and (got <= 1).all()


def test_measure_firing_and_the_diagnosis():
    weight = torch.ones(6, 3, 11, 11)  # all low: no mid frequencies
    weight[0] *= 5.0  # RMS 5: dominates
    lattice = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)).repeat(3, 1, 16, 16)
    smooth = torch.ones(3, 3, 64, 64)
    smooth[..., 10:40, 10:40] += 1.0
    smooth[1] = float("nan")  # a diverged feature is left out of the mean
    found = measure_firing("conv1", weight, {"pool1": smooth, "pool2": lattice}, (4, 4), {"pool1": 0.1, "pool2": 0.5})
    assert found.spectrum == (1.0, 0.0, 0.0) and found.filter_rms == pytest.approx(5.0)
    assert found.aliasing["pool2"] == pytest.approx(1.0, abs=1e-6)
    assert found.aliasing["pool1"] == pytest.approx(aliasing(smooth[[0, 2]], 4).mean().item())
    assert set(found.scalars()) == {
        "deconv/conv1/spectrum/low",
        "deconv/conv1/spectrum/mid",
        "deconv/conv1/spectrum/high",
        "deconv/pool1/aliasing",
        "deconv/pool2/aliasing",
    }
    diagnosis = Diagnosis()
    lines = diagnosis.check(found, epoch=2)
    said = {(line.split(": ")[1], line.split(": ")[2].split(" ")[0]) for line in lines}
    assert said == {("conv1", "mean"), ("conv1", "largest"), ("pool2", "aliasing"), ("pool2", "dead")}
    assert all("\n" not in line and "Remedy" in line for line in lines)
    spectrum = next(line for line in lines if "mid-frequency" in line)
    assert "0.000 < 0.2" in spectrum and "7x7 at stride 2" in spectrum
    assert "renormalise" in next(line for line in lines if "RMS" in line)
    assert "4x4 stride lattice" in next(line for line in lines if "aliasing" in line)
    assert "lower learning rate" in next(line for line in lines if "dead" in line)
    assert diagnosis.check(found, epoch=3) == []  # once per condition and layer per run
    copy = pickle.loads(pickle.dumps(diagnosis))
    assert copy.warned == diagnosis.warned
    diagnosis.reset()
    assert len(diagnosis.check(found, epoch=1)) == 4
    healthy = FiringMeasures("conv1", (0.2, 0.5, 0.3), 0.05, {"pool2": 0.01}, (2, 2), {"pool2": 0.0})
    assert Diagnosis().check(healthy, epoch=1) == []
