"""Tile geometry: FFT-friendly sizes and a tiling that covers every pixel once."""
import itertools

import numpy as np
import pytest

from zogy_stream.tiles import Box, TileGrid, fft_size


def _smooth(n):
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


# ------------------------------------------------------------------ fft_size
def test_fft_size_is_the_smallest_even_smooth_size():
    smooth_even = [m for m in range(1, 5000) if m % 2 == 0 and _smooth(m)]
    for n in range(1, 4097):
        m = fft_size(n)
        assert m >= n, n
        assert m % 2 == 0, (n, m)
        assert _smooth(m), (n, m)
        # minimal: no even 2^a 3^b 5^c 7^d size lies in [n, m)
        best = next(k for k in smooth_even if k >= n)
        assert m == best, (n, m, best)


@pytest.mark.parametrize("n, expected", [(1, 2), (2, 2), (11, 12), (13, 14), (17, 18),
                                         (127, 128), (129, 140), (1000, 1000), (1025, 1050),
                                         (1100, 1120), (2049, 2058)])
def test_fft_size_known_values(n, expected):
    assert fft_size(n) == expected


def test_fft_size_not_blindly_power_of_two():
    assert fft_size(1100) < 2048
    assert fft_size(1500) == 1500  # 2^2 3 5^3
    assert fft_size(1025) == 1050


def test_fft_size_odd_allowed():
    for n in range(1, 2000):
        m = fft_size(n, even=False)
        assert m >= n and _smooth(m)
        assert all(not _smooth(k) for k in range(n, m))


def test_fft_size_rejects_nonpositive():
    with pytest.raises(ValueError):
        fft_size(0)


# ------------------------------------------------------------------ TileGrid
SHAPES = [(256, 256), (300, 517), (1000, 64), (17, 23), (100, 100), (129, 128), (1, 40),
          (40, 1), (1024, 1025)]
CORES = [16, 64, 128, 256, 1024]
MARGINS = [0, 1, 7, 16, 33]


def _grids():
    for shape, core, margin in itertools.product(SHAPES, CORES, MARGINS):
        yield TileGrid(shape, core, margin)


def test_cores_partition_the_image():
    for grid in _grids():
        ny, nx = grid.shape
        count = np.zeros((ny, nx), dtype=np.int32)
        tiles = list(grid)
        assert len(tiles) == len(grid)
        for t in tiles:
            c = t.core
            assert 0 <= c.y0 < c.y1 <= ny and 0 <= c.x0 < c.x1 <= nx, (grid, t)
            count[c.slices] += 1
        assert np.all(count == 1), (grid, np.unique(count))


def test_windows_share_the_padded_size_and_contain_the_grown_core():
    for grid in _grids():
        ny, nx = grid.shape
        wy, wx = grid.size
        assert wy % 2 == 0 and wx % 2 == 0 and _smooth(wy) and _smooth(wx)
        for t in grid:
            assert t.window.shape == grid.size, (grid, t)
            g = t.core.grow(grid.margin)
            w = t.window
            assert w.y0 <= g.y0 and g.y1 <= w.y1 and w.x0 <= g.x0 and g.x1 <= w.x1, (grid, t)
            # valid = window intersected with the image
            v = t.valid
            assert v == Box(max(w.y0, 0), min(w.y1, ny), max(w.x0, 0), min(w.x1, nx)), (grid, t)
            assert v.y1 > v.y0 and v.x1 > v.x0
            # positions inside the window array
            ciw, viw = t.core_in_window, t.valid_in_window
            assert ciw.shape == t.core.shape and viw.shape == v.shape
            assert ciw == Box(t.core.y0 - w.y0, t.core.y1 - w.y0, t.core.x0 - w.x0, t.core.x1 - w.x0)
            assert 0 <= viw.y0 and viw.y1 <= wy and 0 <= viw.x0 and viw.x1 <= wx
            assert viw.y0 <= ciw.y0 and ciw.y1 <= viw.y1 and viw.x0 <= ciw.x0 and ciw.x1 <= viw.x1


def test_window_indexing_round_trip():
    """Pixels cut with valid_in_window from a padded array are the image's pixels."""
    rng = np.random.default_rng(1)
    img = rng.normal(size=(150, 230))
    grid = TileGrid(img.shape, 64, 9)
    for t in grid:
        padded = np.full(grid.size, np.nan)
        padded[t.valid_in_window.slices] = img[t.valid.slices]
        np.testing.assert_array_equal(padded[t.core_in_window.slices], img[t.core.slices])
        assert np.isnan(padded).sum() == padded.size - t.valid.shape[0] * t.valid.shape[1]


def test_image_smaller_than_core_is_one_tile():
    grid = TileGrid((40, 70), 1024, 12)
    tiles = list(grid)
    assert len(tiles) == 1
    t = tiles[0]
    assert t.core == Box(0, 40, 0, 70)
    assert grid.size == (fft_size(40 + 24), fft_size(70 + 24))
    assert t.valid == Box(0, 40, 0, 70)


def test_tile_indices_and_rows_cols():
    grid = TileGrid((300, 517), 128, 10)
    rows, cols = grid.n_tiles
    assert (rows, cols) == (3, 5)
    for i, t in enumerate(grid):
        assert t.index == i == t.row * cols + t.col
        assert grid.tile(t.row, t.col) == t


def test_invalid_grids_rejected():
    with pytest.raises(ValueError):
        TileGrid((0, 10), 64, 4)
    with pytest.raises(ValueError):
        TileGrid((10, 10), 8, 4)
    with pytest.raises(ValueError):
        TileGrid((10, 10), 64, -1)
