"""Numba kernels against plain NumPy/SciPy reference implementations."""
import numpy as np
from scipy import ndimage

from zogy_stream import _numba as nk
from zogy_stream.masks import MaskBit
from zogy_stream.engine import _BLANK_STEP, _blank_sky
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


def _grow_reference(mask, radius, a, b, thr_a, thr_b):
    """``_grow_mask`` spelt out with SciPy: seeds as in ``_seed``, square dilation."""
    B = lambda bit: (mask & bit) != 0  # noqa: E731
    bad_new, bad_ref = B(nk.BAD_NEW), B(nk.BAD_REF)
    hard = B(nk.SATURATED) | B(nk.USER)
    both = bad_new & bad_ref & ~hard
    gap_next = np.zeros(mask.shape, bool)  # a 4-neighbour bad in both images
    gap_next[1:] |= both[:-1]
    gap_next[:-1] |= both[1:]
    gap_next[:, 1:] |= both[:, :-1]
    gap_next[:, :-1] |= both[:, 1:]
    clean = ~(hard | bad_new | bad_ref | B(nk.OUTSIDE))
    seed = hard | ((bad_new | bad_ref) & ~both) | (clean & gap_next & ((a > thr_a) | (b > thr_b)))
    near = ndimage.binary_dilation(seed, np.ones((2 * radius + 1,) * 2, bool)) if radius else seed
    grown = near & ~(bad_new | bad_ref | hard)
    return mask | np.where(grown, np.uint8(nk.NEAR), np.uint8(0))


def _grow(mask, radius, a, b, thr):
    out = np.empty_like(mask)
    nk._grow_mask(mask, radius, np.empty_like(mask), out, a, b, thr, thr)
    return out


def test_grow_mask_matches_dilation():
    """Seeds far apart (most rows copied), near the edges, in clusters; every kind of seed."""
    rng = np.random.default_rng(11)
    shape = (140, 203)
    a = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[0, 5] = nk.SATURATED           # first row, grows into rows 0..r only
    mask[70, 202] = nk.USER             # last column
    mask[139, 100] = nk.BAD_NEW         # last row, bad in one image
    mask[30:34, 40:44] = nk.BAD_NEW | nk.BAD_REF  # a common gap cutting a source
    a[30:36, 44:47] = 40.0
    mask[100:105, 150] = nk.BAD_REF
    mask[:, :3] |= nk.OUTSIDE           # OUTSIDE neither seeds nor grows
    for radius in (0, 1, 4, 12):
        got = _grow(mask, radius, a, b, 5.0)
        want = _grow_reference(mask, radius, a, b, 5.0, 5.0)
        np.testing.assert_array_equal(got, want, err_msg=f"radius {radius}")
    got = _grow(mask, 4, a, b, 5.0)
    assert got[55, 100] == 0 and got[4, 5] & nk.NEAR and not got[5 + 4, 5] & nk.NEAR


def test_grow_mask_without_seeds_copies_the_mask():
    mask = np.zeros((64, 80), np.uint8)
    mask[:, 70:] = nk.OUTSIDE
    mask[10, 10] = MaskBit.COSMIC  # not a seed
    z = np.zeros(mask.shape, np.float32)
    np.testing.assert_array_equal(_grow(mask, 6, z, z, 5.0), mask)


def test_dilate_disk_matches_scipy():
    """The source mask's disk dilation equals scipy's binary_dilation with the disk
    structure, for fractional and whole radii, sources at the borders and images
    narrower than the disk."""
    rng = np.random.default_rng(5)
    for shape in ((97, 131), (40, 7), (5, 60)):
        seg = (rng.random(shape) < 0.01).astype(np.int32) * rng.integers(1, 9, shape)
        seg[0, 0] = seg[-1, -1] = seg[0, -1] = 3
        for radius in (0.5, 1.0, 1.5, 2.9, 4.0, 6.3, 9.0):
            r = int(np.ceil(radius))
            yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
            want = ndimage.binary_dilation(seg > 0, structure=(xx * xx + yy * yy) <= radius ** 2)
            got = np.empty(shape, bool)
            nk._dilate_disk(seg, radius, got)
            np.testing.assert_array_equal(got, want, err_msg=f"{shape} r={radius}")
    got = np.ones((20, 30), bool)
    nk._dilate_disk(np.zeros((20, 30), np.int32), 3.0, got)
    assert not got.any()


def _finish_reference(planes, y0, y1, x0, x1, split, has_var, var_const, sx2, sy2, e2, inv_fs):
    """Eqs. 25-33 and 41-42 assembled in float64 with np.roll (periodic gradients)."""
    p = planes.astype(np.float64)
    sl = (slice(y0, y1), slice(x0, x1))
    s = p[1] - p[2] if split else p[1]
    v = p[3 if split else 2] if has_var else np.full(p[0].shape, var_const)
    vtot = v.copy()
    if split and (sx2 > 0 or sy2 > 0):
        for q in (p[1], p[2]):
            gx = 0.5 * (np.roll(q, -1, axis=1) - np.roll(q, 1, axis=1))
            gy = 0.5 * (np.roll(q, -1, axis=0) - np.roll(q, 1, axis=0))
            vtot += sx2 * gx ** 2 + sy2 * gy ** 2
    if split and e2 > 0:
        m = np.minimum(p[1], p[2])
        vtot += np.where(m > 0, e2 * m * m, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scorr = np.where(vtot > 0, s / np.sqrt(vtot), 0.0)
    return (p[0][sl], s[sl], scorr[sl], s[sl] * inv_fs, np.sqrt(np.maximum(v, 0))[sl] * inv_fs)


def test_finish_matches_float64_reference():
    """The float32 assembly pass is within a few float32 ulps of a float64 one,
    for every combination of options, with the region on the planes' borders
    (periodic neighbours) and inside them."""
    rng = np.random.default_rng(7)
    ny, nx = 37, 41
    for split in (False, True):
        for has_var in (False, True):
            planes = rng.normal(size=(4, ny, nx)).astype(np.float32)
            planes[1:3] *= 30.0  # bright sources: the model-error term matters
            vi = 3 if split else 2
            planes[vi] = np.abs(planes[vi]) + 0.5
            for e2, sig2 in ((0.0, 0.0), (0.01, 0.0), (0.0, 0.04), (0.02, 0.09)):
                for y0, y1, x0, x1 in ((0, ny, 0, nx), (5, 30, 3, 38)):
                    outs = [np.empty((y1 - y0, x1 - x0), np.float32) for _ in range(5)]
                    nk._finish(planes, y0, y1, x0, x1, split, has_var, 2.5, sig2, 0.5 * sig2,
                               e2, 0.25, *outs)
                    ref = _finish_reference(planes, y0, y1, x0, x1, split, has_var, 2.5, sig2,
                                            0.5 * sig2, e2, 0.25)
                    for got, want in zip(outs, ref):
                        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
