"""Mesh background: cell statistics from a regular subsample, against the truth."""
import math

import numpy as np
import pytest
from astropy.io import fits

from zogy_stream.background import _TRUNC, MeshBackground, _clipped_stats
from zogy_stream.fitsio import ImageReader

SIGMA = 7.0


def _sky(shape, seed=3):
    """A sloped sky with a broad bump, Gaussian noise and bright point sources."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    sky = 500.0 + 0.02 * xx - 0.01 * yy + 30.0 * np.exp(-((xx - 300) ** 2 + (yy - 200) ** 2)
                                                        / (2 * 150.0 ** 2))
    img = sky + rng.normal(0.0, SIGMA, shape)
    for y, x in rng.integers(5, min(shape) - 5, (60, 2)):  # stars: clipped away
        img[y - 2:y + 3, x - 2:x + 3] += 2000.0
    return img.astype(np.float32), sky


@pytest.mark.parametrize("cell, step", [(64, 1), (128, 1), (256, 2), (512, 4)])
def test_subsample_step(cell, step):
    img, _ = _sky((64, 64))
    assert MeshBackground(ImageReader(img), cell=cell).step == step


@pytest.mark.parametrize("source", ["array", "fits"])
def test_cells_match_truth_and_full_resolution(tmp_path, source):
    shape, cell = (768, 1024), 256
    img, sky = _sky(shape)
    if source == "fits":
        path = tmp_path / "sky.fits"
        fits.PrimaryHDU(img.astype(">f4")).writeto(path)
        src = str(path)
    else:
        src = img
    mesh = MeshBackground(ImageReader(src), cell=cell)
    assert mesh.step == 2
    mesh.warm(shape[0])  # nothing computed yet: the first cell row
    for i in range(shape[0] // cell):
        mesh.mesh(mesh_box(i, cell, shape))
    assert np.all(np.isfinite(mesh._bkg)) and np.all(np.isfinite(mesh._rms))
    # one subsampled cell (128^2 pixels) is good to ~sigma/128; allow 5x that
    # for the truth and for the full-resolution statistics of the same cell
    tol = 5 * SIGMA / 128
    for i in range(shape[0] // cell):
        for j in range(shape[1] // cell):
            sl = np.s_[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
            assert abs(mesh._bkg[i, j] - sky[sl].mean()) < tol + 0.01 * SIGMA
            full, std, n = _clipped_stats(img, sl[0].start, sl[0].stop, sl[1].start,
                                          sl[1].stop, 1, math.inf, 3.0, 8)
            assert n > 0.9 * cell * cell
            assert abs(mesh._bkg[i, j] - full) < tol
            # the cell rms includes the sky's own variation across the cell
            assert mesh._rms[i, j] == pytest.approx(std / _TRUNC, rel=0.03)
            assert SIGMA * 0.97 < mesh._rms[i, j] < math.hypot(SIGMA, sky[sl].std()) * 1.1


def mesh_box(i, cell, shape):
    from zogy_stream.tiles import Box

    return Box(i * cell, min((i + 1) * cell, shape[0]), 0, shape[1])


def test_block_stats_match_per_block_clipped_stats():
    """One pass over all 4 x 4 blocks (histograms binned around the whole array's
    median) gives each block's clipped std as _clipped_stats on that block alone
    (within 0.3 %), the whole one as well; masked and NaN pixels are left out and
    a block with too few pixels reports none."""
    from zogy_stream.background import CLIP, _clipped_stats_blocks

    rng = np.random.default_rng(11)
    img = rng.normal(0.3, 1.0, (342, 350)).astype(np.float32)
    img[:, 175:] *= 1.5  # blocks differ: the right half is noisier
    img[rng.random(img.shape) < 0.002] = 80.0  # sources, clipped away
    good = rng.random(img.shape) > 0.2
    img[5, 5] = np.nan
    good[:85, :87] = False  # block (0, 0) fully masked
    good[:85, 87:175] = rng.random((85, 88)) > 0.999  # block (0, 1): < 16 pixels
    masked = np.where(good, img, np.float32(np.nan))
    out = np.empty((17, 3))
    _clipped_stats_blocks(img, good, 4, 4, CLIP, 8, out)
    ny, nx = img.shape
    boxes = [(0, ny, 0, nx)] + [(i * ny // 4, (i + 1) * ny // 4, j * nx // 4, (j + 1) * nx // 4)
                                for i in range(4) for j in range(4)]
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        mean, std, n = _clipped_stats(masked, y0, y1, x0, x1, 1, np.inf, CLIP, 8)
        if k in (1, 2):
            assert out[k, 2] == 0 and out[k, 1] == 0, k
            continue
        assert std > 0 and out[k, 2] > 1000
        assert abs(out[k, 1] / std - 1) < 3e-3, (k, out[k], std)
        assert abs(out[k, 0] - mean) < 3e-3 * std
        assert abs(out[k, 2] / n - 1) < 2e-3
    assert out[7, 1] > 1.3 * out[5, 1]  # block (1, 2), in the noisier half, against (1, 0)


def test_above_matches_nonzero():
    from zogy_stream import _numba as nk

    rng = np.random.default_rng(2)
    img = rng.normal(size=(130, 170)).astype(np.float32)
    img[rng.random(img.shape) < 0.01] = np.nan
    for level in (-10.0, 0.5, 2.5, 100.0):
        ys, xs = nk._above(img, level, 3, 120, 7, 160)
        wy, wx = np.nonzero(img[3:120, 7:160] > level)
        np.testing.assert_array_equal(ys, wy + 3)
        np.testing.assert_array_equal(xs, wx + 7)


def test_own_median_equals_numpy():
    """The compiled median (quickselect) is np.median exactly: odd and even
    sizes, ties, sorted and reversed input."""
    from zogy_stream.background import _median_inplace

    rng = np.random.default_rng(0)
    for t in range(3000):
        n = int(rng.integers(1, 200))
        a = [rng.normal(size=n), rng.integers(0, 4, size=n).astype(float),
             np.sort(rng.normal(size=n)), np.sort(rng.normal(size=n))[::-1].copy()][t % 4]
        assert _median_inplace(a.copy(), n) == np.median(a)
    a = np.array([3.0, 1.0, 2.0, 9.0, 7.0])
    assert _median_inplace(a, 4) == 2.5  # only the first n values count
