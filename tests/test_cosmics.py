"""Tests of zogy_stream.cosmics: cosmic rays injected into a synthetic star field."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import erf

from zogy_stream.cosmics import (CosmicsUnavailableError, detect_cosmic_rays, drop_coincident,
                                 sharper_than_psf, sharpness)
from zogy_stream.errors import InputError, ProcessingError

SIG_PER_FWHM = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
GAIN = 2.0          # e-/ADU
READ_NOISE = 5.0    # e-
SKY = 400.0         # ADU
SATURATION = 20000.0  # ADU

needs_astroscrappy = pytest.mark.skipif(importlib.util.find_spec("astroscrappy") is None,
                                        reason="astroscrappy not installed")


def gaussian_stars(shape, xs, ys, fluxes, fwhm):
    """Pixel-integrated Gaussian stars (fluxes in ADU)."""
    img = np.zeros(shape)
    s = np.sqrt(2.0) * fwhm * SIG_PER_FWHM
    ex = np.arange(shape[1]) - 0.5
    ey = np.arange(shape[0]) - 0.5
    for x, y, f in zip(xs, ys, fluxes):
        gx = 0.5 * (erf((ex + 1 - x) / s) - erf((ex - x) / s))
        gy = 0.5 * (erf((ey + 1 - y) / s) - erf((ey - y) / s))
        img += f * gy[:, None] * gx[None, :]
    return img


def psf_array(fwhm, size=15):
    c = size // 2
    return gaussian_stars((size, size), [float(c)], [float(c)], [1.0], fwhm)


def _scene(fwhm, seed=0):
    shape = (256, 256)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    while len(xs) < 30:                      # well-separated stars (no blends)
        x, y = rng.uniform(12, 244, 2)
        if all(np.hypot(x - a, y - b) > 16 for a, b in zip(xs, ys)):
            xs.append(x)
            ys.append(y)
    xs, ys = np.array(xs), np.array(ys)
    flux = 10 ** rng.uniform(3.0, 5.0, len(xs))
    flux[0] = 5e6                            # one saturated star
    clean = gaussian_stars(shape, xs, ys, flux, fwhm) + SKY
    electrons = rng.poisson(clean * GAIN) + rng.normal(0.0, READ_NOISE, shape)
    img = np.minimum(electrons / GAIN, SATURATION)

    hits = []
    while len(hits) < 9:
        x, y = (int(v) for v in rng.integers(8, 244, 2))
        if np.hypot(xs - x, ys - y).min() < 14 or any(
                np.hypot(x - h[0][1], y - h[0][0]) < 8 for h in hits):
            continue
        kind = len(hits) % 3
        if kind == 0:
            pix = [(y, x)]                                   # single pixel
        elif kind == 1:
            pix = [(y, x + i) for i in range(int(rng.integers(2, 5)))]      # horizontal track
        else:
            pix = [(y + i, x + i) for i in range(int(rng.integers(2, 4)))]  # diagonal track
        amp = rng.uniform(300.0, 2000.0)
        for p in pix:
            img[p] += amp
        hits.append(pix)
    return img, xs, ys, flux, hits


@pytest.fixture(scope="module", params=[2.5, 4.0])
def scene(request):
    fwhm = request.param
    img, xs, ys, flux, hits = _scene(fwhm)
    return fwhm, img, xs, ys, flux, hits


def _near_stars(shape, xs, ys, radius):
    yy, xx = np.indices(shape)
    out = np.zeros(shape, bool)
    for x, y in zip(xs, ys):
        out |= np.hypot(xx - x, yy - y) < radius
    return out


@needs_astroscrappy
def test_hits_found_stars_spared(scene):
    fwhm, img, xs, ys, flux, hits = scene
    crmask = detect_cosmic_rays(img, gain=GAIN, read_noise=READ_NOISE, saturation=SATURATION)
    assert crmask.dtype == bool and crmask.shape == img.shape
    for pix in hits:
        found = np.mean([crmask[p] for p in pix])
        assert found >= 0.75, pix
    # nothing flagged on or around the stars (including the saturated one)
    assert not (crmask & _near_stars(img.shape, xs, ys, 2.5 * fwhm)).any()
    # nothing flagged away from the injected hits, beyond L.A.Cosmic's growth into
    # neighbours and our own one-pixel growth
    injected = np.zeros(img.shape, bool)
    for pix in hits:
        for p in pix:
            injected[p] = True
    near = ndimage.binary_dilation(injected, structure=np.ones((3, 3), bool), iterations=2)
    assert (crmask & ~near).sum() == 0
    # the growth: every flagged pixel's 3x3 neighbourhood is flagged too
    bare = detect_cosmic_rays(img, gain=GAIN, read_noise=READ_NOISE, saturation=SATURATION,
                              grow=0)
    assert np.array_equal(crmask, ndimage.binary_dilation(bare, structure=np.ones((3, 3), bool)))
    assert (bare & ~ndimage.binary_dilation(injected, iterations=1)).sum() <= 10


def _sparse_field_with_hits(seed=5, shape=(768, 768)):
    """Few stars (two saturated), 24 hits from single pixels to 24-px tracks, some at
    the image border, and a masked band."""
    rng = np.random.default_rng(seed)
    xs, ys = rng.uniform(5, shape[1] - 5, 25), rng.uniform(5, shape[0] - 5, 25)
    flux = 10 ** rng.uniform(3.0, 5.5, 25)
    flux[:2] = 5e6
    img = gaussian_stars(shape, xs, ys, flux, 3.0) + SKY
    img = np.minimum((rng.poisson(img * GAIN) + rng.normal(0.0, READ_NOISE, shape)) / GAIN,
                     SATURATION)
    for i in range(24):
        y, x = (0, int(rng.integers(0, shape[1]))) if i < 3 else rng.integers(0, shape, 2)
        n, ang = int(rng.integers(1, 25)), rng.uniform(0, np.pi)
        for t in range(n):
            yy, xx = int(y + t * np.sin(ang)), int(x + t * np.cos(ang))
            if 0 <= yy < shape[0] and 0 <= xx < shape[1]:
                img[yy, xx] += rng.uniform(200.0, 3000.0)
    mask = np.zeros(shape, bool)
    mask[300:310, 200:500] = True
    return img, mask


@needs_astroscrappy
@pytest.mark.parametrize("fwhm", [None, 3.0])
def test_windows_give_the_whole_image_result(fwhm, monkeypatch):
    """L.A.Cosmic run only in packed windows around the pixels that can pass its first
    test flags exactly the pixels the whole-image run flags, on less than half the area."""
    import astroscrappy

    img, mask = _sparse_field_with_hits()
    kw = dict(gain=GAIN, read_noise=READ_NOISE, saturation=SATURATION, fwhm=fwhm, mask=mask)
    whole = detect_cosmic_rays(img, windowed=False, **kw)
    calls = []
    real = astroscrappy.detect_cosmics

    def spy(data, **k):
        calls.append(data.shape)
        return real(data, **k)

    monkeypatch.setattr(astroscrappy, "detect_cosmics", spy)
    windowed = detect_cosmic_rays(img, **kw)
    assert len(calls) == 1 and calls[0][0] * calls[0][1] < 0.5 * img.size, calls
    assert whole.sum() > 300  # the hits are there to be found
    assert np.array_equal(windowed, whole)


@needs_astroscrappy
def test_windows_fall_back_to_the_whole_image_when_crowded(monkeypatch):
    import astroscrappy

    rng = np.random.default_rng(3)
    img = SKY + rng.normal(0.0, np.sqrt(SKY / GAIN), (256, 256))
    img[rng.integers(0, 256, 400), rng.integers(0, 256, 400)] += 2000.0  # hits everywhere
    calls = []
    real = astroscrappy.detect_cosmics
    monkeypatch.setattr(astroscrappy, "detect_cosmics",
                        lambda data, **k: calls.append(data.shape) or real(data, **k))
    found = detect_cosmic_rays(img, gain=GAIN, read_noise=READ_NOISE)
    assert calls == [(256 + 16, 256 + 16)]  # the whole (edge-extended) image
    assert found.sum() >= 350


@needs_astroscrappy
@pytest.mark.parametrize("fwhm", [2.5, 4.0])
def test_no_false_hits_on_clean_frames(fwhm):
    """Plain Poisson noise and stars: L.A.Cosmic's Laplacian test alone flags tens of
    noise pixels per megapixel; the peak-significance test keeps none of them."""
    shape = (512, 512)
    rng = np.random.default_rng(7)
    xs, ys = rng.uniform(10, 502, 150), rng.uniform(10, 502, 150)
    flux = 10 ** rng.uniform(2.5, 5.0, 150)
    clean = gaussian_stars(shape, xs, ys, flux, fwhm) + SKY
    img = (rng.poisson(clean * GAIN) + rng.normal(0.0, READ_NOISE, shape)) / GAIN
    raw = detect_cosmic_rays(img, gain=GAIN, read_noise=READ_NOISE, min_significance=0,
                             grow=0)
    assert raw.sum() >= 3  # the Laplacian test alone does fire on noise here
    assert detect_cosmic_rays(img, gain=GAIN, read_noise=READ_NOISE).sum() == 0
    # a real hit in the same frame is still found
    img[200, 300] += 20 * np.sqrt(SKY / GAIN)
    assert detect_cosmic_rays(img, gain=GAIN, read_noise=READ_NOISE)[200, 300]


@needs_astroscrappy
@pytest.mark.parametrize("fwhm", [2.5, 3.5, 5.0])
@pytest.mark.parametrize("flux", [3e4, 1.5e5])
def test_stars_on_the_border_spared(fwhm, flux):
    """Bright stars centred 2-6 px from the image border (cut by it) are not hits;
    hits next to the border and near a corner still are (a hit in the border
    row itself may be missed: the pipeline masks around any border pixel that
    bright anyway).  Without extending the image first, L.A.Cosmic flagged the
    cores of such stars (here 190-390 pixels; a real DECam frame: 38 pixels of
    a FWHM-3.5 star 5 px from the border)."""
    shape = (160, 160)
    rng = np.random.default_rng(11)
    xs = np.array([5.0, 80.0, 154.0, 2.0, 40.0, 120.0, 156.0, 60.0, 100.0])
    ys = np.array([40.0, 3.0, 90.0, 120.0, 156.0, 155.0, 20.0, 60.0, 100.0])
    clean = gaussian_stars(shape, xs, ys, np.full(xs.size, flux), fwhm) + SKY
    img = (rng.poisson(clean * GAIN) + rng.normal(0.0, READ_NOISE, shape)) / GAIN
    stars = _near_stars(shape, xs, ys, 3 * fwhm)
    for fw in (fwhm, None):
        cr = detect_cosmic_rays(img, gain=GAIN, read_noise=READ_NOISE, fwhm=fw)
        assert not (cr & stars).any(), fw
    hit = img.copy()
    hit[1, 100] += 1500.0
    hit[158, 1] += 1500.0
    hit[70, 158] += 1500.0
    cr = detect_cosmic_rays(hit, gain=GAIN, read_noise=READ_NOISE, fwhm=fwhm)
    assert cr[1, 100] and cr[158, 1] and cr[70, 158]
    assert not (cr & stars).any()


@needs_astroscrappy
def test_hit_wings_followed_into_significant_neighbours():
    """A hit whose core L.A.Cosmic flags keeps, in a resampled image, wings that
    the Laplacian test does not flag (a real DECam reference: a 579 ADU track with
    300-400 ADU beside it left S_corr -5 to -9 residuals next to the mask).  They
    are followed up to 3 px while > 3 sigma above the local median; a star the
    hit lies next to is not taken with it."""
    from zogy_stream.cosmics import _follow_wings

    rng = np.random.default_rng(4)
    shape = (60, 60)
    sky = gaussian_stars(shape, [40.0], [30.0], [3e4], 3.5) + SKY
    img = (rng.poisson(sky * GAIN) + rng.normal(0.0, READ_NOISE, shape)) / GAIN
    sigma = np.sqrt(SKY / GAIN)
    core = np.zeros(shape, bool)
    core[20, 20:23] = True                    # the flagged core
    img[20, 20:23] += 40 * sigma
    wing = [(19, 20), (19, 21), (21, 22), (20, 23), (20, 24), (21, 25)]   # its wings
    for y, x in wing:
        img[y, x] += 12 * sigma
    far = (20, 28)                            # 5 px beyond the track: not reached
    img[far] += 12 * sigma
    near_star = np.zeros(shape, bool)
    near_star[30, 34] = True                  # a hit beside the star
    img[30, 34] += 40 * sigma
    clean = img.copy()
    clean[core | near_star] = SKY
    out = _follow_wings(core | near_star, img, clean, GAIN, READ_NOISE)
    assert all(out[p] for p in wing) and (out & (core | near_star)).sum() == 4
    assert not out[far]
    assert out.sum() <= 4 + len(wing) + 3     # a few noise pixels at most
    assert not out[28:33, 38:43].any()        # the star's core stays


@needs_astroscrappy
def test_sky_subtracted_input_and_mask(scene):
    fwhm, img, xs, ys, flux, hits = scene
    ref = detect_cosmic_rays(img, gain=GAIN, read_noise=READ_NOISE, saturation=SATURATION)
    sub = (img - SKY).astype(">f4")                     # big-endian, sky-subtracted
    again = detect_cosmic_rays(sub, gain=GAIN, read_noise=READ_NOISE, sky=SKY,
                               saturation=SATURATION)
    assert (again != ref).sum() <= 2
    mask = np.zeros(img.shape, bool)
    y0, x0 = hits[0][0]
    mask[y0, x0] = True
    masked = detect_cosmic_rays(img, gain=GAIN, read_noise=READ_NOISE, mask=mask,
                                saturation=SATURATION)
    assert not masked[y0, x0]


def test_sharper_than_psf(scene):
    fwhm, img, xs, ys, flux, hits = scene
    psf = psf_array(fwhm)
    h = 7
    n_star = 0
    for x, y, f in zip(xs[1:], ys[1:], flux[1:]):
        ix, iy = int(round(x)), int(round(y))
        if h <= ix < img.shape[1] - h and h <= iy < img.shape[0] - h:
            stamp = img[iy - h:iy + h + 1, ix - h:ix + h + 1]
            assert not sharper_than_psf(stamp, psf), (x, y, f, sharpness(stamp, psf))
            n_star += 1
    assert n_star >= 20
    for pix in hits:
        iy, ix = pix[len(pix) // 2]
        stamp = img[iy - h:iy + h + 1, ix - h:ix + h + 1]
        assert sharper_than_psf(stamp, psf), (pix, sharpness(stamp, psf))


def test_sharpness_values():
    psf = psf_array(3.0, 21)
    star = psf_array(3.0, 21) * 1e4 + 50.0
    assert sharpness(star, psf) == pytest.approx(0.0, abs=0.02)
    spike = np.full((21, 21), 50.0)
    spike[10, 10] += 1e3
    assert sharpness(spike, psf) == pytest.approx(1.0, abs=0.02)
    broad = psf_array(5.0, 21)
    assert sharpness(broad, psf) < 0.0
    assert not sharper_than_psf(np.zeros((21, 21)), psf)   # nothing to fit
    assert sharper_than_psf(spike, psf, noise=5.0)
    assert not sharper_than_psf(spike, psf, noise=500.0)    # not significant
    assert not sharper_than_psf(star, psf, noise=1.0)
    with pytest.raises(InputError, match="noise"):
        sharper_than_psf(star, psf, noise=-1.0)
    with pytest.raises(InputError, match="odd"):
        sharpness(np.zeros((20, 20)), psf)
    with pytest.raises(InputError, match="NaN"):
        sharpness(np.full((21, 21), np.nan), psf)


def test_sharpness_test_reused_across_stamps():
    """One test object (the PSF's work done once, as the catalogue does per tile) gives
    every stamp the answer a fresh ``sharper_than_psf`` gives, in any order."""
    from zogy_stream.cosmics import _SharpnessTest, _validate

    psf = psf_array(3.0, 21)
    rng = np.random.default_rng(5)
    stamps = []
    for k in range(40):
        s = rng.normal(0.0, 5.0, (21, 21)) + psf * rng.uniform(200, 3e3)
        if k % 2:
            s[10 + k % 3 - 1, 10] += rng.uniform(100, 2000)  # a hit on the star
        stamps.append(s)
    test = _SharpnessTest(_validate(stamps[0], psf, None)[1], 21)
    got = [test(_validate(s, test.psf, None)[0]) for s in stamps[::-1]][::-1]
    want = [sharper_than_psf(s, psf) for s in stamps]
    assert got == want and 5 < sum(want) < 35  # both answers occur
    with pytest.raises(ValueError, match="side 21"):
        test(np.zeros((15, 15)))


def test_missing_astroscrappy(monkeypatch):
    monkeypatch.setitem(sys.modules, "astroscrappy", None)   # makes the import fail
    with pytest.raises(CosmicsUnavailableError, match="pip install astroscrappy") as info:
        detect_cosmic_rays(np.zeros((32, 32)))
    assert isinstance(info.value, ProcessingError) and isinstance(info.value, ImportError)


@needs_astroscrappy
def test_bad_arguments():
    img = np.zeros((32, 32))
    with pytest.raises(InputError, match="gain"):
        detect_cosmic_rays(img, gain=0.0)
    with pytest.raises(InputError, match="mask"):
        detect_cosmic_rays(img, mask=np.zeros((3, 3), bool))
    with pytest.raises(InputError, match="2-D"):
        detect_cosmic_rays(np.zeros(10))
    with pytest.raises(InputError, match="grow"):
        detect_cosmic_rays(img, grow=-1)


def _undersampled_pair(fwhm=1.8, seed=11, shape=(512, 512)):
    """Two exposures of one undersampled star field, hits (pixels, 2x2 blocks, tracks)
    in the first only; returns (a, b, hits mask, psf)."""
    rng = np.random.default_rng(seed)
    n = 200
    xs, ys = rng.uniform(8, shape[1] - 8, n), rng.uniform(8, shape[0] - 8, n)
    flux = 10 ** rng.uniform(3.0, 5.0, n)
    clean = gaussian_stars(shape, xs, ys, flux, fwhm) + SKY
    a, b = ((rng.poisson(clean * GAIN) + rng.normal(0.0, READ_NOISE, shape)) / GAIN
            for _ in range(2))
    hits = np.zeros(shape, bool)
    kinds = ([(0, 0)], [(0, 0), (0, 1), (1, 0), (1, 1)], [(0, 0), (0, 1), (0, 2)])
    for k in range(60):
        y, x = rng.integers(4, shape[0] - 4, 2)
        for dy, dx in kinds[k % 3]:
            a[y + dy, x + dx] += rng.uniform(500.0, 3000.0)
            hits[y + dy, x + dx] = True
    return a, b, hits, clean, psf_array(fwhm)


@needs_astroscrappy
def test_psf_spares_undersampled_stars_and_keeps_hits():
    """At FWHM 1.8 px L.A.Cosmic's median filter flags star cores; with the PSF the
    groups shaped like it are dropped, the hits kept."""
    a, b, hits, clean, psf = _undersampled_pair()
    stars = ndimage.binary_dilation(clean > SKY + 20 * np.sqrt(SKY / GAIN), iterations=2)
    plain = detect_cosmic_rays(b, gain=GAIN, read_noise=READ_NOISE)
    assert (plain & stars).sum() > 20  # the hazard: cores of a hit-free frame flagged
    assert not (detect_cosmic_rays(b, gain=GAIN, read_noise=READ_NOISE, psf=psf) & stars).any()
    found = detect_cosmic_rays(a, gain=GAIN, read_noise=READ_NOISE, psf=psf)
    assert found[hits].mean() > 0.9
    with pytest.raises(InputError):
        detect_cosmic_rays(b, gain=GAIN, read_noise=READ_NOISE, psf=np.ones((4, 4)))


@needs_astroscrappy
def test_drop_coincident_keeps_hits_off_the_other_images_sources():
    a, b, hits, clean, _ = _undersampled_pair()
    plain = detect_cosmic_rays(a, gain=GAIN, read_noise=READ_NOISE)
    stars = ndimage.binary_dilation(clean > SKY + 20 * np.sqrt(SKY / GAIN), iterations=2)
    assert (plain & stars & ~hits).sum() > 20
    kept = drop_coincident(plain, b)
    assert (kept & stars & ~ndimage.binary_dilation(hits, iterations=3)).sum() == 0
    off_stars = hits & ~ndimage.binary_dilation(stars, iterations=3)
    assert kept[off_stars].mean() > 0.95
    with pytest.raises(InputError, match="shape"):
        drop_coincident(plain, b[:-1])


def test_sharpness_test_many_matches_one_by_one():
    """The batched test of a tile's stamps gives each stamp the verdict it gets
    alone (no stamp's numbers leak into another's): stars, single-pixel hits and
    sources narrower than the PSF, faint to bright, for narrow and broad PSFs."""
    from zogy_stream.cosmics import _SharpnessTest, _validate

    rng = np.random.default_rng(11)
    for fwhm in (1.6, 3.0, 6.0):
        side = 31
        test = _SharpnessTest(_validate(np.zeros((side, side)), psf_array(fwhm, side),
                                        None)[1], side)
        c = side // 2
        stamps = []
        for k in range(90):
            x, y = c + rng.uniform(-0.6, 0.6, 2)
            flux = 10 ** rng.uniform(1.5, 4.0)
            kind = k % 3
            if kind == 0:
                img = gaussian_stars((side, side), [x], [y], [flux], fwhm)
            elif kind == 1:
                img = np.zeros((side, side))
                img[c, c] = flux / 5
            else:
                img = gaussian_stars((side, side), [x], [y], [flux], 0.5 * fwhm)
            stamps.append(img + rng.normal(0.0, rng.uniform(1.0, 10.0), img.shape))
        one = np.array([test(s) for s in stamps])
        many = test.many(np.array(stamps))
        assert 10 < one.sum() < 80  # both verdicts occur
        np.testing.assert_array_equal(many, one)
    assert test.many(np.zeros((0, side, side))).shape == (0,)
    with pytest.raises(ValueError, match=f"side {side}"):
        test.many(np.zeros((2, side - 2, side - 2)))


def test_hot_pixel_candidate_flagged_sharp():
    """Through the pipeline (cosmic-ray masking off): a single hot pixel in NEW is
    a candidate flagged sharp, a real (PSF-shaped) transient is not."""
    from zogy_stream import stream
    from zogy_stream.products import FLAG_SHARP

    rng = np.random.default_rng(2)
    shape, fwhm = (200, 200), 3.0
    ref = gaussian_stars(shape, [50.3, 150.2], [60.7, 140.1], [2e4, 3e4], fwhm)
    new = ref + gaussian_stars(shape, [100.4], [80.6], [3000.0], fwhm)
    new[150, 60] += 400.0  # a hot pixel: ~13 sigma at its peak in S_corr
    new = new + rng.normal(0.0, 5.0, shape) + 100
    ref = ref + rng.normal(0.0, 5.0, shape) + 100
    psf = psf_array(fwhm, 21)
    cands = [r.candidates for r in stream(new.astype(np.float32), ref.astype(np.float32),
                                          new_psf=psf, ref_psf=psf, flux_ratio=1.0,
                                          cosmic_rays="off", wisdom=False)]
    from astropy.table import vstack

    tab = vstack([c for c in cands if len(c)])
    pos = tab[tab["sign"] > 0]
    d_hot = np.hypot(pos["x"] - 60, pos["y"] - 150)
    d_real = np.hypot(pos["x"] - 100.4, pos["y"] - 80.6)
    hot, real = pos[np.argmin(d_hot)], pos[np.argmin(d_real)]
    assert min(d_hot) < 1.5 and min(d_real) < 1.5
    assert hot["sharp"] and hot["flags"] & FLAG_SHARP
    assert not real["sharp"] and not real["flags"] & FLAG_SHARP
