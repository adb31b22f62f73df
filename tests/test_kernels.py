"""Numba kernels against plain NumPy/SciPy reference implementations."""
import numpy as np
from scipy import ndimage

from zogy_stream import _numba as nk
from zogy_stream.pipeline import _BLANK_STEP, _blank_sky
from zogy_stream.tiles import Box


def _blank_reference(a, b, thr_a, thr_b, grown, region, core, radius, step):
    sl = region.slices
    src = (a[sl] > thr_a) | (b[sl] > thr_b)
    near = ndimage.maximum_filter(src.view(np.uint8), size=2 * radius + 1, mode="constant") > 0
    blank = ~near & (grown[sl] == 0)
    cy, cx = core.y0 - region.y0, core.x0 - region.x0
    return blank[cy:cy + core.shape[0]:step, cx:cx + core.shape[1]:step]


def test_blank_samples_match_dilation():
    rng = np.random.default_rng(3)
    shape = (97, 131)
    a = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    a[rng.random(shape) < 0.002] = 50.0  # sparse "sources"
    b[rng.random(shape) < 0.002] = 50.0
    grown = (rng.random(shape) < 0.01).astype(np.uint8)
    bb = 3
    core = Box(10, 85, 12, 120)
    region = core.grow(bb)
    got = _blank_sky(np.stack([a, b]), region, core, grown, 1.0, 1.0, bb)
    want = _blank_reference(a, b, 5.0, 5.0, grown, region, core, 2 * bb, _BLANK_STEP)
    assert got.shape == want.shape
    assert 0.1 < want.mean() < 0.9  # both outcomes occur
    np.testing.assert_array_equal(got, want)
