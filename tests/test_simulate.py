"""Tests of the scene simulator (zogy_stream.simulate)."""

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from zogy_stream.errors import ConfigError
from zogy_stream.simulate import (
    background_fs, default_psf_size, gaussian_psf, make_scene, moffat_psf, write_scene)

# Nearly noise-free scenes: tiny Poisson noise (huge gain), no read noise, sky of 1 ADU.
QUIET = dict(sky_new=1.0, sky_ref=1.0, read_noise=0.0, gain=1e9, n_transients=0)


def centroid(img):
    y, x = np.indices(img.shape)
    return (img * y).sum() / img.sum(), (img * x).sum() / img.sum()


@pytest.mark.parametrize("make", [gaussian_psf, moffat_psf])
@pytest.mark.parametrize("fwhm, size, offset", [
    (3.0, None, (0.0, 0.0)), (4.0, 25, (0.3, -0.45)), (2.2, 15, (-0.5, 0.2)),
    (6.0, 37, (0.1, 0.4))])
def test_psf_normalised_and_centred(make, fwhm, size, offset):
    psf = make(fwhm, size=size, offset=offset)
    n = default_psf_size(fwhm) if size is None else size
    assert psf.shape == (n, n) and psf.dtype == np.float64
    assert psf.sum() == pytest.approx(1.0, abs=1e-12)
    cy, cx = centroid(psf)
    assert abs(cy - (n // 2 + offset[0])) < 0.01
    assert abs(cx - (n // 2 + offset[1])) < 0.01


def test_psf_width_and_default_size():
    assert default_psf_size(4.0) == 25 and default_psf_size(1.0) == 15
    for fwhm in (2.5, 4.0):
        psf = gaussian_psf(fwhm, oversample=9)
        y, x = np.indices(psf.shape) - psf.shape[0] // 2
        var = (psf * x**2).sum() - 1 / 12  # remove the pixel's own variance
        assert 2 * math.sqrt(2 * math.log(2) * var) == pytest.approx(fwhm, rel=2e-3)
    # Moffat: half maximum at r = fwhm/2 on a finely sampled profile (oversample=1, big fwhm)
    m = moffat_psf(20.0, beta=2.5, oversample=1, size=61)
    assert m[30, 40] / m[30, 30] == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("kwargs, name", [
    (dict(fwhm=0), "fwhm"), (dict(fwhm=3, size=16), "size"),
    (dict(fwhm=3, offset=(1,)), "offset"),
    (dict(fwhm=3, oversample=0), "oversample")])
def test_psf_bad_arguments(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        gaussian_psf(**kwargs)


def test_background_fs():
    p = gaussian_psf(3.0)
    # equal PSFs and noise: F_S = sum(P^2) / (2 sigma^2)  (Parseval)
    assert background_fs(p, p, 10.0, 10.0) == pytest.approx((p**2).sum() / 200, rel=1e-10)
    # noise-free reference: matched-filter S/N of the new image alone
    assert background_fs(p, p, 10.0, 0.0, 2.0) == pytest.approx(4 * (p**2).sum() / 100, rel=1e-10)
    q = moffat_psf(4.0, size=31)  # different sizes are fine
    # F_S is symmetric under swapping the images once the sigmas are expressed per flux unit
    assert background_fs(q, p, 5.0, 7.0, 1.5) == pytest.approx(
        background_fs(p, q, 7.0 / 1.5, 5.0 / 1.5, 1 / 1.5), rel=1e-10)
    assert background_fs(p, p, 0.0, 0.0) == math.inf
    with pytest.raises(ConfigError, match="flux_ratio"):
        background_fs(p, p, 1.0, 1.0, flux_ratio=-1)


def test_scene_types_and_determinism():
    kw = dict(seed=7, n_galaxies=3, fwhm_variation=0.1, psf="moffat", shift=(0.3, -0.2))
    a, b = make_scene((96, 128), **kw), make_scene((96, 128), band=13, **kw)
    for name in ("new", "ref", "new_var", "ref_var"):
        arr = getattr(a, name)
        assert arr.dtype == np.float32 and arr.shape == (96, 128)
        np.testing.assert_array_equal(arr, getattr(b, name))  # band height does not matter
    assert a.new_psf.dtype == np.float64 and a.new_psf.shape == a.ref_psf.shape
    for name in ("transients", "stars", "galaxies"):
        assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    assert set(a.transients.colnames) >= {"x", "y", "flux", "expected_snr"}
    assert len(a.stars) == round(1500 * 96 * 128 / 1e6) and len(a.galaxies) == 3
    c = make_scene((96, 128), **{**kw, "seed": 8})
    assert not np.array_equal(a.new, c.new) and not np.array_equal(a.stars["x"], c.stars["x"])
    with pytest.raises(AttributeError):
        a.new = None  # frozen


@pytest.mark.parametrize("gain, rn, sky_new, sky_ref", [(1.0, 5.0, 1000.0, 1000.0),
                                                        (2.5, 8.0, 300.0, 4000.0)])
def test_blank_scene_noise(gain, rn, sky_new, sky_ref):
    s = make_scene((512, 512), blank=True, gain=gain, read_noise=rn, sky_new=sky_new,
                   sky_ref=sky_ref, seed=3)
    assert len(s.stars) == len(s.transients) == len(s.galaxies) == 0
    for img, var, sky, sig in ((s.new, s.new_var, sky_new, s.meta["sigma_new"]),
                               (s.ref, s.ref_var, sky_ref, s.meta["sigma_ref"])):
        np.testing.assert_allclose(var, sky / gain + (rn / gain) ** 2, rtol=1e-6)
        assert sig == pytest.approx(math.sqrt(sky / gain + (rn / gain) ** 2))
        pull = (img - sky) / np.sqrt(var)
        assert abs(pull.std() - 1) < 0.03 and abs(pull.mean()) < 0.01
    # new and ref noise are independent
    assert abs(np.corrcoef(s.new.ravel(), s.ref.ravel())[0, 1]) < 0.01


def test_transient_flux_in_difference():
    ratio = 1.7
    s = make_scene((256, 256), seed=5, n_transients=12, transient_snr=(20, 60), new_fwhm=3.0,
                   ref_fwhm=3.0, flux_ratio=ratio, sky_new=500.0, sky_ref=1500.0)
    t = s.transients
    fs = background_fs(s.new_psf, s.ref_psf, s.meta["sigma_new"], s.meta["sigma_ref"], ratio)
    np.testing.assert_allclose(t["expected_snr"], t["flux"] * math.sqrt(fs), rtol=1e-12)
    assert np.all((t["expected_snr"] >= 20) & (t["expected_snr"] <= 60))
    assert np.all((t["x"] >= 20) & (t["x"] <= 235) & (t["y"] >= 20) & (t["y"] <= 235))
    diff = (s.new - 500.0) - ratio * (s.ref - 1500.0)
    dvar = s.new_var + ratio**2 * s.ref_var
    h, checked = 10, 0
    for row in t:
        others = np.hypot(t["x"] - row["x"], t["y"] - row["y"])
        if np.sort(others)[1] < 2 * h + 8:
            continue  # another transient in the box
        iy, ix = round(row["y"]), round(row["x"])
        box = np.s_[iy - h:iy + h + 1, ix - h:ix + h + 1]
        pull = (diff[box].sum() - ratio * row["flux"]) / math.sqrt(dvar[box].sum())
        assert abs(pull) < 4.5
        checked += 1
    assert checked >= 5


def test_star_has_psf_shape_at_its_position():
    for psf in ("gaussian", "moffat"):
        for seed in range(20):
            s = make_scene((64, 80), seed=seed, n_stars=1, star_flux=(1e5, 1e5), psf=psf,
                           new_fwhm=2.5, ref_fwhm=2.0, shift=(0.7, -0.4), **QUIET)
            x, y = s.stars["x"][0], s.stars["y"][0]
            n = s.ref_psf.shape[0]
            if n // 2 + 1 < x < 78 - n // 2 and n // 2 + 1 < y < 62 - n // 2:
                break
        make = gaussian_psf if psf == "gaussian" else moffat_psf
        for img, (px, py), fwhm in ((s.ref, (x, y), 2.0), (s.new, (x + 0.7, y - 0.4), 2.5)):
            ix, iy = round(px), round(py)
            expect = 1e5 * make(fwhm, size=n, offset=(py - iy, px - ix))
            cut = img[iy - n // 2:iy + n // 2 + 1, ix - n // 2:ix + n // 2 + 1] - 1.0
            np.testing.assert_allclose(cut, expect, atol=1e-3 * expect.max())
        # the centre PSFs are those of the nominal FWHMs
        np.testing.assert_array_equal(s.ref_psf, make(2.0, size=n))


def test_fwhm_variation_changes_star_widths():
    s = make_scene((300, 300), seed=2, n_stars=40, star_flux=(1e4, 1e5), new_fwhm=4.0,
                   ref_fwhm=4.0, fwhm_variation=0.3, **QUIET)
    xy = np.c_[s.stars["x"], s.stars["y"]]
    widths, where = [], []
    for x, y in xy:
        dist = np.sort(np.hypot(*(xy - (x, y)).T))[1]
        if dist < 30 or min(x, y) < 16 or max(x, y) > 283:
            continue
        iy, ix = round(y), round(x)
        cut = s.ref[iy - 15:iy + 16, ix - 15:ix + 16] - 1.0
        cy, cx = centroid(cut)
        yy, xx = np.indices(cut.shape)
        var = (cut * (xx - cx) ** 2).sum() / cut.sum() - 1 / 12
        widths.append(2 * math.sqrt(2 * math.log(2) * var))
        t = x / 299 + y / 299
        where.append(t)
        assert widths[-1] == pytest.approx(4.0 * (1 + 0.3 * (t - 1)), rel=0.02)
    assert len(widths) >= 6 and max(widths) / min(widths) > 1.2
    assert s.new_psf.shape[0] == default_psf_size(4.0 * 1.3)


@pytest.mark.parametrize("psf", ["gaussian", "moffat"])
def test_elongated_psfs_have_their_axis_ratio_and_angle(psf):
    """An elongated PSF's second moments give the axis ratio and angle asked for (its
    pixel integration rounds it a little), a star in the image has that shape, and
    a circular one (axis ratio 1) is the circular profile, bit for bit."""
    kw = dict(n_stars=1, star_flux=(1e6, 1e6), psf=psf, new_fwhm=4.0, ref_fwhm=3.0, **QUIET)
    s = make_scene((96, 96), seed=3, new_axis_ratio=0.6, new_angle=30.0, ref_axis_ratio=0.8,
                   ref_angle=-70.0, **kw)

    def shape_of(img):
        img = img / img.sum()
        y, x = np.indices(img.shape)
        cy, cx = (img * y).sum(), (img * x).sum()
        xx, yy = (img * (x - cx) ** 2).sum(), (img * (y - cy) ** 2).sum()
        xy = (img * (x - cx) * (y - cy)).sum()
        lo, hi = np.linalg.eigvalsh([[xx, xy], [xy, yy]])
        return math.sqrt(lo / hi), math.degrees(0.5 * math.atan2(2 * xy, xx - yy))

    for psf_img, q, angle in ((s.new_psf, 0.6, 30.0), (s.ref_psf, 0.8, -70.0)):
        got_q, got_angle = shape_of(psf_img)
        assert got_q == pytest.approx(q, abs=0.03 if psf == "gaussian" else 0.06)
        assert got_angle == pytest.approx(angle, abs=1.0)
    x, y = round(s.stars["x"][0]), round(s.stars["y"][0])
    h = s.ref_psf.shape[0] // 2
    if h <= x < 96 - h and h <= y < 96 - h:
        star = s.ref[y - h:y + h + 1, x - h:x + h + 1] - 1.0
        assert shape_of(star)[0] == pytest.approx(0.8, abs=0.06)
    circ = make_scene((64, 64), seed=3, **kw)
    same = make_scene((64, 64), seed=3, new_axis_ratio=1.0, ref_axis_ratio=1.0, new_angle=40.0,
                      **kw)
    assert np.array_equal(circ.new, same.new) and np.array_equal(circ.new_psf, same.new_psf)
    assert s.meta["new_axis_ratio"] == 0.6 and s.meta["ref_angle"] == pytest.approx(-70.0)
    # the default stamp holds the major axis (FWHM 4 / sqrt(0.6))
    assert s.new_psf.shape[0] == default_psf_size(4.0 / math.sqrt(0.6))


def test_sky_gradient_and_the_transients_expected_snr():
    """The sky changes linearly by +-g from pixel (0, 0) to the far corner, in the
    images and their variances, and each transient's flux is set for the noise where
    it is: the same expected S/N needs more flux where the sky is brighter."""
    kw = dict(n_stars=0, n_transients=30, read_noise=0.0, gain=1.0, seed=8)
    s = make_scene((200, 200), sky_gradient=0.3, **kw)
    flat = make_scene((200, 200), **kw)
    assert s.ref_var[0, 0] == pytest.approx(700.0, rel=1e-4)
    assert s.ref_var[-1, -1] == pytest.approx(1300.0, rel=1e-4)
    assert s.new[:20, :20].mean() == pytest.approx(700.0 + 300.0 * 19 / 199, abs=3.0)
    np.testing.assert_array_equal(s.transients["expected_snr"], flat.transients["expected_snr"])
    t = s.transients
    where = t["x"] / 199 + t["y"] / 199  # 0 ... 2; the sky is 1000 x (1 + 0.3 (where - 1))
    factor = np.asarray(t["flux"] / flat.transients["flux"])
    expect = np.sqrt(1.0 + 0.3 * (where - 1.0))  # background-limited: flux ~ sigma
    np.testing.assert_allclose(factor, expect, rtol=0.01)
    assert s.meta["sky_gradient"] == 0.3


def test_saturation_clips_both_images():
    s = make_scene((128, 128), seed=1, saturation=20000.0, star_flux=(1e6, 2e6), n_stars=10)
    for img in (s.new, s.ref):
        assert img.max() == np.float32(20000.0) and (img == np.float32(20000.0)).sum() > 10
    assert s.meta["saturation"] == 20000.0 and s.ref_var.max() > 20000.0  # variance: model


def test_galaxies_same_in_both_images_and_hosts():
    ratio = 2.0
    s = make_scene((200, 200), seed=4, n_stars=0, n_galaxies=6, galaxy_flux=(1e4, 1e4),
                   new_fwhm=3.0, ref_fwhm=3.0, flux_ratio=ratio, **QUIET)
    np.testing.assert_allclose(s.new - 1.0, ratio * (s.ref - 1.0), rtol=1e-4, atol=3e-3)
    assert 0.6 * 6e4 < (s.ref - 1.0).sum() <= 6e4 * 1.0001  # galaxies may leave the field
    t = make_scene((200, 200), seed=4, n_stars=0, n_galaxies=6, n_transients=10).transients
    on = t[t["host"] >= 0]
    assert len(on) == 3
    g = s.galaxies[on["host"]]
    assert np.all(np.hypot(on["x"] - g["x"], on["y"] - g["y"]) < 5 * g["scale"])


@pytest.mark.parametrize("kwargs, name", [
    (dict(shape=(0, 10)), "shape"), (dict(psf="airy"), "psf"),
    (dict(flux_ratio=0), "flux_ratio"),
    (dict(fwhm_variation=1.5), "fwhm_variation"), (dict(gain=-1), "gain"),
    (dict(transient_snr=(10, 5)), "transient_snr"), (dict(shift=(1, 2, 3)), "shift"),
    (dict(n_stars=-3), "n_stars"), (dict(shape=(30, 30), edge=20), "edge"),
    (dict(seed=-1), "seed"), (dict(band=0), "band"), (dict(psf_size=20), "psf_size"),
    (dict(new_axis_ratio=1.2), "new_axis_ratio"), (dict(ref_axis_ratio=0), "ref_axis_ratio"),
    (dict(new_angle="up"), "new_angle"), (dict(ref_angle=True), "ref_angle"),
    (dict(sky_gradient=1.0), "sky_gradient"),
    (dict(sky_gradient="steep"), "sky_gradient")])
def test_make_scene_bad_arguments(kwargs, name):
    kwargs.setdefault("shape", (64, 64))
    with pytest.raises(ConfigError, match=name):
        make_scene(**kwargs)


def test_write_scene_round_trip(tmp_path):
    kw = dict(seed=11, n_galaxies=2, saturation=30000.0, shift=(0.2, 0.1), flux_ratio=1.3)
    paths = write_scene(tmp_path / "out", (80, 112), band=17, **kw)
    paths = write_scene(tmp_path / "out", (80, 112), band=17, **kw)  # overwrites, no append
    s = make_scene((80, 112), **kw)
    assert set(paths) == {"new", "ref", "new_var", "ref_var", "new_psf", "ref_psf", "truth"}
    for name in ("new", "ref", "new_var", "ref_var", "new_psf", "ref_psf"):
        with fits.open(paths[name]) as hdul:
            assert len(hdul) == 1
            data, hdr = hdul[0].data, hdul[0].header
            np.testing.assert_array_equal(data, getattr(s, name))
            assert data.dtype.kind == "f" and data.dtype.itemsize == (8 if "psf" in name else 4)
            assert hdr["GAIN"] == 1.0 and hdr["RDNOISE"] == 5.0 and hdr["SATURATE"] == 30000.0
            assert hdr["FILTER"] == "r"
    with fits.open(paths["new"]) as hdul:
        w = WCS(hdul[0].header)
        assert hdul[0].header["CTYPE1"] == "RA---TAN" and hdul[0].header["CRPIX1"] == 56.5
        ra, dec = w.pixel_to_world_values(55.5, 39.5)  # 0-based centre
        assert ra == pytest.approx(150.0) and dec == pytest.approx(2.0)
        assert abs(w.wcs.cdelt[1] * 3600 - 0.27) < 1e-9
    truth = Table.read(paths["truth"])
    assert truth.colnames == s.transients.colnames
    np.testing.assert_allclose(truth["x"], s.transients["x"])
    np.testing.assert_allclose(truth["flux"], s.transients["flux"])
    assert truth.meta["seed"] == 11 and truth.meta["flux_ratio"] == 1.3
