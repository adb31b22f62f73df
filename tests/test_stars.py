"""Tests of zogy_stream.stars on synthetic star fields (and real DECam data if present)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from scipy.special import erf

from zogy_stream.errors import InputError, ProcessingError
from zogy_stream.stars import (astrometric_sigma, background_maps, estimate_psf, find_stars,
                               fit_flux_ratio, fit_psf_model, match_stars, measure_psf,
                               psf_photometry, registration_offset)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIG_PER_FWHM = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


# ---------------------------------------------------------------------------------------------
# synthetic scenes: pixel-integrated Gaussian / Moffat stars at sub-pixel positions
# ---------------------------------------------------------------------------------------------
def star_stamp(x, y, fwhm, kind="gauss", beta=3.0, half=None, osamp=5):
    """Unit-flux pixel-integrated profile around (x, y); returns (x0, y0, stamp)."""
    if half is None:
        half = int(np.ceil(4 * fwhm))
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    px = np.arange(ix - half, ix + half + 1)
    py = np.arange(iy - half, iy + half + 1)
    if kind == "gauss":
        s = np.sqrt(2.0) * fwhm * SIG_PER_FWHM
        ex, ey = px - 0.5 - x, py - 0.5 - y
        gx = 0.5 * (erf((ex + 1) / s) - erf(ex / s))
        gy = 0.5 * (erf((ey + 1) / s) - erf(ey / s))
        return ix - half, iy - half, gy[:, None] * gx[None, :]
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    sub = (np.arange(osamp) + 0.5) / osamp - 0.5
    fx = (px[:, None] + sub[None, :]).ravel() - x
    fy = (py[:, None] + sub[None, :]).ravel() - y
    r2 = fy[:, None] ** 2 + fx[None, :] ** 2
    prof = (beta - 1) / (np.pi * alpha ** 2) * (1 + r2 / alpha ** 2) ** (-beta)
    n = len(px)
    return ix - half, iy - half, prof.reshape(n, osamp, n, osamp).mean(axis=(1, 3))


def render(shape, xs, ys, fluxes, fwhm, kind="gauss", beta=3.0):
    img = np.zeros(shape)
    ny, nx = shape
    for x, y, f in zip(xs, ys, fluxes):
        x0, y0, st = star_stamp(x, y, fwhm, kind, beta)
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + st.shape[0], ny), min(x0 + st.shape[1], nx)
        if yb > ya and xb > xa:
            img[ya:yb, xa:xb] += f * st[ya - y0:yb - y0, xa - x0:xb - x0]
    return img


def true_psf(size, fwhm, kind="gauss", beta=3.0):
    c = size // 2
    _, _, st = star_stamp(float(c), float(c), fwhm, kind, beta, half=c)
    return st / st.sum()


def star_field(seed, shape=(1024, 1024), n=700, flux=(10 ** 3.7, 10 ** 5.3)):
    rng = np.random.default_rng(seed)
    xs = rng.uniform(10, shape[1] - 10, n)
    ys = rng.uniform(10, shape[0] - 10, n)
    fl = 10 ** rng.uniform(np.log10(flux[0]), np.log10(flux[1]), n)
    return rng, xs, ys, fl


# ---------------------------------------------------------------------------------------------
# PSF recovery
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,fwhm,seed", [("gauss", 3.0, 1), ("moffat", 4.0, 2),
                                             ("gauss", 2.2, 3)])
def test_estimate_psf_recovers_truth(kind, fwhm, seed):
    shape = (768, 768)
    rng, xs, ys, fl = star_field(seed, shape, n=350)
    img = render(shape, xs, ys, fl, fwhm, kind) + 150.0
    img = rng.poisson(img).astype(np.float32)  # float32 input, gain 1
    psf, info = estimate_psf(img, gain=1.0)

    n = psf.shape[0]
    assert psf.dtype == np.float64 and psf.ndim == 2 and psf.shape[1] == n and n % 2 == 1
    assert psf.sum() == pytest.approx(1.0, abs=1e-12)
    assert 15 <= n <= 63
    assert info["n_stars"] >= 50
    truth = true_psf(n, fwhm, kind)
    f_true, _, _ = measure_psf(truth)
    assert info["fwhm"] == pytest.approx(f_true, rel=0.05)
    xc, yc = info["centroid"]
    assert abs(xc - n // 2) < 0.05 and abs(yc - n // 2) < 0.05
    # independent check of the centre: first moment of the core
    yy, xx = np.indices(psf.shape) - n // 2
    core = np.hypot(xx, yy) <= fwhm
    assert abs((psf[core] * xx[core]).sum() / psf[core].sum()) < 0.05
    assert abs((psf[core] * yy[core]).sum() / psf[core].sum()) < 0.05
    assert np.abs(psf - truth).sum() < 0.03
    assert psf.min() >= 0.0


def test_background_maps_shared_by_catalogue_and_psf():
    """Maps measured once give the catalogue and PSF each would measure for itself."""
    shape = (400, 400)
    rng, xs, ys, fl = star_field(8, shape, n=80, flux=(2e4, 2e5))
    yy, xx = np.indices(shape)
    sky = 100.0 + 0.05 * xx + 20.0 * np.exp(-((yy - 200.0) ** 2) / 2e4)  # not flat
    img = (rng.normal(0.0, 5.0, shape) + sky + render(shape, xs, ys, fl, 3.5)).astype(">f4")
    back, rms = background_maps(img, threshold=5.0)
    assert back.shape == rms.shape == shape
    assert np.median(np.abs(back - sky)) < 1.0 and np.median(rms) == pytest.approx(5.0, rel=0.05)
    own = find_stars(img, threshold=5.0)
    shared = find_stars(img, threshold=5.0, background=back, rms=rms)
    assert len(own) == len(shared) >= 60
    for col in ("x", "y", "flux", "snr", "fwhm", "star_like", "isolated"):
        assert np.array_equal(np.asarray(own[col]), np.asarray(shared[col])), col
    psf_own, _ = estimate_psf(img, size=21, stars=own, threshold=5.0)
    psf_shared, _ = estimate_psf(img, size=21, stars=shared, background=back, rms=rms)
    assert np.array_equal(psf_own, psf_shared)
    with pytest.raises(InputError):
        background_maps(np.zeros(10))


def test_estimate_psf_size_and_min_stars():
    shape = (400, 400)
    rng, xs, ys, fl = star_field(5, shape, n=60, flux=(2e4, 2e5))
    img = rng.normal(100.0, 5.0, shape) + render(shape, xs, ys, fl, 3.5)
    psf, info = estimate_psf(img, size=25)
    assert psf.shape == (25, 25) and info["size"] == 25
    with pytest.raises(InputError, match="odd"):
        estimate_psf(img, size=24)
    with pytest.raises(ProcessingError, match="min_stars"):
        estimate_psf(img, min_stars=500)


def test_estimate_psf_no_stars():
    img = np.random.default_rng(0).normal(100.0, 10.0, (256, 256))
    cat = find_stars(img)
    assert len(cat) == 0 and "flux" in cat.colnames
    with pytest.raises(ProcessingError, match="PSF stars"):
        estimate_psf(img)


# ---------------------------------------------------------------------------------------------
# flux ratio and astrometric noise
# ---------------------------------------------------------------------------------------------
def _pair(seed, sigma_ast, ratio=1.3):
    shape = (1024, 1024)
    rng, xs, ys, fl = star_field(seed, shape)
    ref = rng.poisson(render(shape, xs, ys, fl, 3.0, "gauss") + 200.0).astype(float)
    ox = rng.normal(0.0, sigma_ast, len(xs))
    oy = rng.normal(0.0, sigma_ast, len(xs))
    new = render(shape, xs + ox, ys + oy, ratio * fl, 4.0, "moffat", beta=3.0) + 300.0
    new = rng.poisson(new).astype(float)
    return find_stars(new, gain=1.0), find_stars(ref, gain=1.0)


@pytest.fixture(scope="module")
def misregistered_pair():
    return _pair(11, 0.05)


def test_flux_ratio(misregistered_pair):
    cat_new, cat_ref = misregistered_pair
    ratio, err, n_used = fit_flux_ratio(cat_new, cat_ref)
    assert ratio == pytest.approx(1.3, rel=0.02)
    assert 0 < err < 0.01
    assert n_used >= 100
    swapped, _, _ = fit_flux_ratio(cat_ref, cat_new)
    assert swapped == pytest.approx(1.0 / ratio, rel=0.01)


def test_flux_ratio_rejects_outliers(misregistered_pair):
    cat_new, cat_ref = misregistered_pair
    bad = cat_new.copy()
    ia, _ = match_stars(cat_new, cat_ref)
    hit = ia[::10]                       # 10 % of the matched stars become "variables"
    bad["flux"][hit] *= 3.0
    ratio, _, n_used = fit_flux_ratio(bad, cat_ref)
    assert ratio == pytest.approx(1.3, rel=0.02)
    assert n_used < fit_flux_ratio(cat_new, cat_ref)[2]


def test_astrometric_sigma(misregistered_pair):
    cat_new, cat_ref = misregistered_pair
    sx, sy, n_used = astrometric_sigma(cat_new, cat_ref)
    assert n_used >= 200
    assert sx == pytest.approx(0.05, rel=0.3)
    assert sy == pytest.approx(0.05, rel=0.3)
    # not the median offset: a common shift changes nothing
    shifted = cat_new.copy()
    shifted["x"] += 0.4
    shifted["y"] -= 0.25
    sx2, sy2, _ = astrometric_sigma(shifted, cat_ref)
    assert sx2 == pytest.approx(sx, rel=1e-3) and sy2 == pytest.approx(sy, rel=1e-3)


def test_astrometric_sigma_zero_when_registered():
    cat_new, cat_ref = _pair(12, 0.0)
    sx, sy, _ = astrometric_sigma(cat_new, cat_ref)
    assert sx < 0.015 and sy < 0.015


def test_too_few_matches(misregistered_pair):
    cat_new, cat_ref = misregistered_pair
    far = cat_new.copy()
    far["x"] += 50.0
    with pytest.raises(ProcessingError, match="matched"):
        fit_flux_ratio(far, cat_ref)
    with pytest.raises(ProcessingError, match="matched"):
        astrometric_sigma(far, cat_ref)
    empty = cat_new[:0]
    with pytest.raises(ProcessingError):
        fit_flux_ratio(empty, cat_ref)
    with pytest.raises(InputError, match="flux"):
        fit_flux_ratio(Table({"x": [1.0], "y": [2.0]}), cat_ref)


def test_registration_offset(misregistered_pair):
    """The mean offset of matched stars (a residual shift), with an honest error."""
    cat_new, cat_ref = misregistered_pair
    dx0, dy0, ex, ey, n = registration_offset(cat_new, cat_ref)
    assert n >= 200 and 0 < ex < 0.01 and 0 < ey < 0.01
    assert abs(dx0) < 4 * ex and abs(dy0) < 4 * ey   # simulated without a shift
    shifted = cat_new.copy()
    shifted["x"] += 0.13
    shifted["y"] -= 0.07
    dx, dy, _, _, _ = registration_offset(shifted, cat_ref)
    assert dx - dx0 == pytest.approx(0.13, abs=1e-3) and dy - dy0 == pytest.approx(-0.07, abs=1e-3)


def test_flux_ratio_robust_to_bright_outliers(misregistered_pair):
    """Few stars, and the three brightest (best-weighted) are not stars of constant flux
    (galaxies, variables, blends): they must be rejected, not drag the weighted fit."""
    cat_new, cat_ref = misregistered_pair
    ia, ib = match_stars(cat_new, cat_ref)
    for seed in range(5):
        sel = np.random.default_rng(seed).choice(len(ia), 20, replace=False)
        a, b = cat_new[ia[sel]], cat_ref[ib[sel]]
        top = np.argsort(-np.asarray(b["flux"]))[:3]
        bad = a.copy()
        bad["flux"][top] *= [1.3, 1.8, 1.5]
        assert fit_flux_ratio(bad, b)[0] == pytest.approx(fit_flux_ratio(a, b)[0], rel=0.01)


def test_psf_photometry_unbiased_and_errors():
    """PSF fluxes with the true PSF: unbiased, with errors that match the scatter."""
    shape = (600, 600)
    rng = np.random.default_rng(21)
    g = np.arange(40)
    xs = 40 + (g % 8) * 70 + rng.uniform(-0.5, 0.5, 40)
    ys = 40 + (g // 8) * 100 + rng.uniform(-0.5, 0.5, 40)
    fl = np.full(40, 5000.0)
    img = render(shape, xs, ys, fl, 3.5) + 400.0
    img = rng.poisson(img).astype(float)            # gain 1: sky noise 20
    psf = true_psf(21, 3.5)
    f, e, ok = psf_photometry(img, xs, ys, psf, rms=20.0, gain=1.0)
    assert ok.all()
    z = (f - 5000.0) / e
    assert abs(np.mean(f) / 5000.0 - 1) < 3 * np.std(f) / 5000.0 / np.sqrt(40) + 0.003
    assert 0.7 < np.std(z) < 1.3
    # a source whose stamp leaves the image is not measured
    f2, _, ok2 = psf_photometry(img, [3.0], [300.0], psf, rms=20.0)
    assert not ok2[0] and np.isnan(f2[0])
    with pytest.raises(InputError, match="odd"):
        psf_photometry(img, xs, ys, np.ones((4, 4)), rms=20.0)


@pytest.mark.parametrize("n_stars", [1, 3])
def test_fit_psf_model_from_few_stars(n_stars):
    """With too few stars to stack, a Moffat fitted to one or three recovers the PSF."""
    shape = (256, 256)
    rng = np.random.default_rng(8)
    xs = np.array([70.3, 180.6, 120.2])[:n_stars]
    ys = np.array([80.7, 150.2, 200.5])[:n_stars]
    img = rng.normal(200.0, 8.0, shape) + render(shape, xs, ys, [4e4] * n_stars, 4.5, "moffat",
                                                  beta=3.0)
    cat = find_stars(img)
    with pytest.raises(ProcessingError):
        estimate_psf(img, stars=cat)                 # the stack needs 5
    psf, info = fit_psf_model(img, stars=cat)
    assert info["n_stars"] == n_stars
    assert info["fwhm"] == pytest.approx(4.5, rel=0.05)
    assert info["beta"] == pytest.approx(3.0, rel=0.25)
    truth = true_psf(psf.shape[0], 4.5, "moffat", beta=3.0)
    assert np.abs(psf - truth).sum() < 0.03
    with pytest.raises(ProcessingError, match="no bright"):
        fit_psf_model(rng.normal(200.0, 8.0, shape), stars=cat[:0])


def test_fit_psf_model_with_beta_given():
    """A faint star's beta is noise; given the beta, the FWHM alone is fitted."""
    shape = (200, 200)
    rng = np.random.default_rng(12)
    img = rng.normal(200.0, 8.0, shape) + render(shape, [100.4], [90.6], [3e3], 3.0, "gauss")
    cat = find_stars(img)
    _, free = fit_psf_model(img, stars=cat, snr_min=7.0)
    psf, fixed = fit_psf_model(img, stars=cat, snr_min=7.0, beta=40.0)
    assert fixed["beta"] == 40.0 and fixed["n_stars"] == free["n_stars"] == 1
    assert fixed["fwhm"] == pytest.approx(3.0, rel=0.08)
    truth = true_psf(psf.shape[0], 3.0, "gauss")
    assert np.abs(psf - truth).sum() < 0.05
    with pytest.raises(InputError, match="beta must be in"):
        fit_psf_model(img, stars=cat, snr_min=7.0, beta=0.5)


# ---------------------------------------------------------------------------------------------
# catalogue details
# ---------------------------------------------------------------------------------------------
def test_find_stars_classification():
    shape = (300, 300)
    rng = np.random.default_rng(4)
    img = rng.normal(1000.0, 10.0, shape)
    stars = [(50.3, 60.7), (150.2, 150.9), (220.6, 80.1), (240.0, 230.0), (243.5, 233.0),
             (80.0, 240.0)]
    fl = [5e4, 6e4, 4e4, 5e4, 5e4, 4e6]          # the last one saturates
    img += render(shape, [s[0] for s in stars], [s[1] for s in stars], fl, 3.0)
    # an extended galaxy
    yy, xx = np.indices(shape)
    img += 3e4 * np.exp(-0.5 * (((xx - 120.0) / 6.0) ** 2 + ((yy - 230.0) / 4.0) ** 2)) \
        / (2 * np.pi * 24)
    # a cosmic-ray hit
    img[40, 200] += 3000.0
    saturation = 15000.0
    img = np.minimum(img, saturation)
    big_endian = img.astype(">f8")

    cat = find_stars(big_endian, saturation=saturation)
    assert set(cat.colnames) >= {"x", "y", "flux", "flux_err", "fwhm", "peak", "flag",
                                 "isolated", "saturated", "star_like", "x_err", "y_err"}

    def row(x, y):
        d = np.hypot(cat["x"] - x, cat["y"] - y)
        assert d.min() < 1.0, (x, y)
        return cat[int(np.argmin(d))]

    for x, y in stars[:3]:
        r = row(x, y)
        assert r["star_like"] and r["isolated"] and not r["saturated"]
        assert abs(r["x"] - x) < 0.05 and abs(r["y"] - y) < 0.05
        assert r["fwhm"] == pytest.approx(3.0, rel=0.15)
    assert not row(240.0, 230.0)["isolated"] and not row(243.5, 233.0)["isolated"]
    sat = np.hypot(cat["x"] - 80.0, cat["y"] - 240.0) < 8
    assert sat.any() and cat["saturated"][sat].all() and not cat["star_like"][sat].any()
    assert not row(120.0, 230.0)["star_like"]
    assert not row(200.0, 40.0)["star_like"]
    assert cat.meta["fwhm"] == pytest.approx(3.1, rel=0.1)


def test_find_stars_centroid_errors_predict_the_scatter():
    """The windowed centroids' errors (ERRX2WIN, background plus the sources' Poisson
    noise when the gain is known) match the scatter of the centroids over 40 noise
    realisations of the same stars; without the gain the bright stars' errors fall
    far short, so the Poisson term is what makes them right.  The catalogue's
    ``background_rms`` is the median of its noise map."""
    shape = (256, 256)
    xs = np.array([40.3, 120.7, 200.2, 70.6, 180.1, 130.4])
    ys = np.array([50.2, 60.8, 45.5, 180.3, 200.9, 130.6])
    fl = np.array([2e4, 5e4, 1e5, 3e5, 1e4, 6e4])
    gain, sky, rn = 2.0, 400.0, 5.0
    model = sky + render(shape, xs, ys, fl, 3.0)
    sigma = np.sqrt(model / gain + (rn / gain) ** 2)
    rng = np.random.default_rng(7)
    pos, err, err_nogain = [], [], []
    for _ in range(40):
        img = (model + rng.normal(0.0, 1.0, shape) * sigma).astype(np.float32)
        back, rms = background_maps(img)
        for g, out in ((gain, err), (None, err_nogain)):
            cat = find_stars(img, gain=g, background=back, rms=rms)
            d = np.hypot(cat["x"][None, :] - xs[:, None], cat["y"][None, :] - ys[:, None])
            assert (d.min(axis=1) < 1.0).all()
            j = d.argmin(axis=1)
            out.append(np.column_stack([cat["x_err"][j], cat["y_err"][j]]))
            if g is not None:
                pos.append(np.column_stack([cat["x"][j], cat["y"][j]]))
                assert cat.meta["background_rms"] == pytest.approx(float(np.median(rms)))
    scatter = np.array(pos).std(axis=0)
    ratio = np.median(np.array(err), axis=0) / scatter
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio  # 40 draws: ~11 % per std
    assert abs(np.exp(np.mean(np.log(ratio))) - 1.0) < 0.1
    short = np.median(np.array(err_nogain), axis=0) / scatter
    assert short[3].max() < 0.4  # the brightest star: Poisson-dominated


def test_find_stars_nan_and_mask():
    shape = (200, 200)
    rng = np.random.default_rng(6)
    img = rng.normal(100.0, 5.0, shape) + render(shape, [60.2, 140.7], [70.4, 130.1],
                                                  [2e4, 2e4], 3.0)
    img[10:20, 10:20] = np.nan
    mask = np.zeros(shape, bool)
    mask[125:135, 135:145] = True  # covers the second star
    cat = find_stars(img, mask=mask)
    assert np.all(np.isfinite(cat["flux"]))
    assert np.hypot(cat["x"] - 60.2, cat["y"] - 70.4).min() < 0.1
    assert np.hypot(cat["x"] - 140.7, cat["y"] - 130.1).min() > 3
    with pytest.raises(InputError, match="mask"):
        find_stars(img, mask=np.zeros((10, 10), bool))
    with pytest.raises(InputError, match="2-D"):
        find_stars(np.zeros((3, 10, 10)))
    with pytest.raises(InputError, match="background"):
        find_stars(img, background=np.zeros((5, 5)))


def test_match_stars_one_to_one():
    a = Table({"x": [10.0, 10.5, 50.0, 90.0], "y": [10.0, 10.2, 50.0, 90.0]})
    b = np.array([[10.1, 10.1], [50.5, 49.6], [200.0, 200.0]])
    ia, ib = match_stars(a, b, radius=2.0)
    assert list(zip(ia, ib)) == [(0, 0), (2, 1)]
    ia, ib = match_stars(a, b, radius=0.5)
    assert list(zip(ia, ib)) == [(0, 0)]
    ia, ib = match_stars(a[:0], b)
    assert len(ia) == 0 and len(ib) == 0


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "decam_n6" / "DEC-OBS04a.mini.fits").exists(),
                    reason="../shared/data/decam_n6 not available")
def test_estimate_psf_decam():
    from astropy.io import fits

    path = DATA / "decam_n6" / "DEC-OBS04a.mini.fits"
    with fits.open(path) as hdul:
        data = hdul[0].data.astype(np.float64)  # big-endian float64 -> native
        hdr = hdul[0].header
    saturation = hdr.get("ESATUR", hdr["SATURATE"])  # the cut-out is sky-subtracted
    psf, info = estimate_psf(data, saturation=saturation, gain=hdr["GAIN"], min_stars=3)
    assert info["n_stars"] >= 3
    assert info["fwhm"] == pytest.approx(hdr["FWHM"], rel=0.2)
    n = psf.shape[0]
    assert n % 2 == 1 and psf.sum() == pytest.approx(1.0)
    assert abs(info["centroid"][0] - n // 2) < 0.1 and abs(info["centroid"][1] - n // 2) < 0.1


# ---------------------------------------------------------------------------------------------
# PSF-fit flux bias of the estimated PSF (wing treatment)
# ---------------------------------------------------------------------------------------------
def test_estimated_narrow_psf_gives_unbiased_psf_fluxes():
    """A stack of 20-30 FWHM-3 stars must not lose wing light.

    PSF-fit fluxes with the estimate ``P`` of a star whose true PSF is ``T``
    scale by ``sum(P T) / sum(P P)``. Zeroing the stack's wings beyond the
    noise radius (5 px here) made that 0.983-0.993 on these scenes (mean
    0.989); the fitted wing model gives 0.998-1.005.
    """
    from zogy_stream.simulate import make_scene

    biases = []
    for seed in (1, 2, 3, 4):
        sc = make_scene((1024, 1024), seed=seed, n_transients=0, new_fwhm=3.0, ref_fwhm=3.0,
                        star_flux=(300, 3e5), star_density=2000, saturation=60000)
        psf, info = estimate_psf(sc.ref, saturation=60000, snr_min=15.0, min_stars=10)
        assert info["n_stars"] >= 15
        n, m = psf.shape[0], sc.ref_psf.shape[0]
        t = sc.ref_psf[(m - n) // 2:(m + n) // 2, (m - n) // 2:(m + n) // 2]
        t = t / t.sum()
        assert psf.min() >= 0.0 and psf.sum() == pytest.approx(1.0)
        biases.append(np.sum(psf * t) / np.sum(psf * psf))
    assert np.mean(biases) == pytest.approx(1.0, abs=0.005), biases
    assert np.all(np.abs(np.array(biases) - 1.0) < 0.012), biases


# ---------------------------------------------------------------------------------------------
# fields with few stars and more galaxies
# ---------------------------------------------------------------------------------------------
def _galaxies(shape, xs, ys, fluxes, sizes, q=0.8):
    """Elliptical Gaussian 'galaxies' (FWHM ``sizes`` along the major axis)."""
    yy, xx = np.indices(shape)
    img = np.zeros(shape)
    for x, y, f, w in zip(xs, ys, fluxes, sizes):
        sx, sy = w * SIG_PER_FWHM, q * w * SIG_PER_FWHM
        img += f * np.exp(-0.5 * (((xx - x) / sx) ** 2 + ((yy - y) / sy) ** 2)) \
            / (2 * np.pi * sx * sy)
    return img


def test_stellar_locus_with_more_galaxies_than_stars():
    """Five stars and twelve brighter galaxies: the stellar locus is the stars' FWHM
    (the median of all sources, used before, was a galaxy's: the galaxies passed as
    stars and the stars failed the cut)."""
    shape = (512, 512)
    rng = np.random.default_rng(7)
    img = rng.normal(500.0, 8.0, shape)
    sx, sy = rng.uniform(30, 480, 5), rng.uniform(30, 480, 5)
    img += render(shape, sx, sy, rng.uniform(1.5e4, 4e4, 5), 3.0)
    gx, gy = rng.uniform(30, 480, 12), rng.uniform(30, 480, 12)
    img += _galaxies(shape, gx, gy, rng.uniform(5e4, 2e5, 12), rng.uniform(7.0, 14.0, 12))
    cat = find_stars(img)
    assert cat.meta["fwhm"] == pytest.approx(3.0, rel=0.15)
    for x, y in zip(sx, sy):
        d = np.hypot(cat["x"] - x, cat["y"] - y)
        if d.min() < 1 and cat["isolated"][np.argmin(d)]:
            assert cat["star_like"][np.argmin(d)]
    for x, y in zip(gx, gy):
        d = np.hypot(cat["x"] - x, cat["y"] - y)
        assert d.min() > 2 or not cat["star_like"][np.argmin(d)]


def test_cross_convolved_photometry_of_galaxies():
    """Galaxies under a broad (new) and a narrow (reference) PSF: after the cross
    convolution the ratio of their fluxes in one aperture is F_n/F_r; PSF fits with
    each image's own PSF (right for stars) give ratios off by far more."""
    from zogy_stream.stars import cross_convolved_photometry

    shape, ratio = (384, 384), 1.3
    rng = np.random.default_rng(3)
    xs, ys = rng.uniform(40, 344, 10), rng.uniform(40, 344, 10)
    fl, size = rng.uniform(3e4, 1e5, 10), rng.uniform(4.0, 10.0, 10)
    psf_n, psf_r = true_psf(31, 4.5), true_psf(31, 2.5)
    from scipy.signal import fftconvolve

    sky = _galaxies(shape, xs, ys, fl, size)
    new = ratio * fftconvolve(sky, psf_n, mode="same") + rng.normal(0, 2.0, shape)
    ref = fftconvolve(sky, psf_r, mode="same") + rng.normal(0, 2.0, shape)
    xy = np.column_stack([xs, ys])
    radius = 1.5 * np.hypot(size, 4.5)
    fn, en, fr, er, ok = cross_convolved_photometry(new, ref, psf_n, psf_r, xy, xy, radius,
                                                    rms_new=2.0, rms_ref=2.0)
    assert ok.all() and np.all(en > 0) and np.all(er > 0)
    assert np.allclose(fn / fr, ratio, rtol=0.01)
    pn, _, _ = psf_photometry(new, xs, ys, psf_n, rms=2.0)
    pr, _, _ = psf_photometry(ref, xs, ys, psf_r, rms=2.0)
    assert np.median(np.abs(pn / pr / ratio - 1)) > 0.1
    # an aperture over the edge, or over a masked pixel, is not measured
    mask = np.zeros(shape, bool)
    mask[int(ys[0]), int(xs[0])] = True
    edge = xy.copy()
    edge[1] = (5.0, 200.0)
    *_, ok2 = cross_convolved_photometry(new, ref, psf_n, psf_r, edge, edge, radius,
                                         rms_new=2.0, rms_ref=2.0, mask_ref=mask)
    assert not ok2[0] and not ok2[1] and ok2[2:].all()
    # cosmic-ray hits (2x2 blocks, grown by a pixel) on the sources' outskirts: as a
    # mask they would exclude every aperture; filled from their neighbours, the
    # fluxes stay right.  A hit within a source's FWHM of its centre still excludes it
    hit = new.copy()
    holes = np.zeros(shape, bool)
    for k, (x, y) in enumerate(xy):
        cy, cx = int(round(y)) + (1 if k == 0 else 9), int(round(x)) + (0 if k == 0 else 6)
        hit[cy:cy + 2, cx:cx + 2] += 3000.0
        holes[cy - 1:cy + 3, cx - 1:cx + 3] = True
    *_, ok3 = cross_convolved_photometry(hit, ref, psf_n, psf_r, xy, xy, radius,
                                         rms_new=2.0, rms_ref=2.0, mask_new=holes)
    assert not ok3.any()
    fh, _, fr3, _, ok4 = cross_convolved_photometry(hit, ref, psf_n, psf_r, xy, xy, radius,
                                                    rms_new=2.0, rms_ref=2.0, fill_new=holes)
    assert not ok4[0] and ok4[1:].all()
    assert np.allclose(fh[1:] / fr3[1:], ratio, rtol=0.01), fh[1:] / fr3[1:] / ratio
    with pytest.raises(InputError, match="one shape"):
        cross_convolved_photometry(new, ref[:-1], psf_n, psf_r, xy, xy, radius,
                                   rms_new=2.0, rms_ref=2.0)


def _galaxy_pair(rng, xs, ys, fl, size, ratio, psf_n, psf_r, shape, rms=2.0):
    from scipy.signal import fftconvolve

    sky = _galaxies(shape, xs, ys, fl, size)
    new = ratio * fftconvolve(sky, psf_n, mode="same") + rng.normal(0, rms, shape)
    ref = fftconvolve(sky, psf_r, mode="same") + rng.normal(0, rms, shape)
    return new, ref


def test_transients_on_galaxies_change_their_inner_and_outer_ratios():
    """Ten galaxies under two PSFs, F_n/F_r = 1.3.  A transient of 15 % of its host's
    flux near one's centre and one 6 px from another's change the ratios of the inner
    aperture and of the annulus around it differently, and only these two are
    flagged; a variable star (its whole light changed) and the clean galaxies are
    not.  The two contaminated galaxies' full-aperture ratios are 8-20 % high.  With a
    model of REF's PSF that is off, the comparison with the galaxies' median quotient
    of the two ratios still singles out the two."""
    from conftest import add_source
    from zogy_stream.stars import contaminated_sources, cross_convolved_photometry

    shape, ratio = (384, 384), 1.3
    rng = np.random.default_rng(5)
    g = np.arange(10)
    xs, ys = 40 + 33 * g, 40 + 33 * ((3 * g) % 10)
    xs, ys = xs.astype(float) + 0.3, ys.astype(float) - 0.2
    fl, size = np.full(10, 4e4), rng.uniform(8.0, 12.0, 10)
    psf_n, psf_r = true_psf(31, 4.5), true_psf(31, 2.5)
    new, ref = _galaxy_pair(rng, xs, ys, fl, size, ratio, psf_n, psf_r, shape)
    add_source(new, psf_n, 0.15 * ratio * fl[0], int(round(ys[0])) + 1, int(round(xs[0])) + 1)
    add_source(new, psf_n, 0.15 * ratio * fl[1], int(round(ys[1])) + 6, int(round(xs[1])))
    # a variable star: 2e4 in REF, 1.5 x 1.3 x 2e4 in NEW
    add_source(ref, psf_r, 2e4, 330, 60)
    add_source(new, psf_n, 1.5 * ratio * 2e4, 330, 60)
    xy = np.column_stack([np.r_[xs, 60.0], np.r_[ys, 330.0]])
    fwhm_c = np.hypot(4.5, 2.5)
    fn, en, fr, er, ok, sums = cross_convolved_photometry(
        new, ref, psf_n, psf_r, xy, xy, 1.5 * fwhm_c, rms_new=2.0, rms_ref=2.0,
        inner=0.8 * fwhm_c)
    assert ok.all() and sums.shape == (11, 8)
    r = fn / fr / ratio - 1
    assert 0.08 < r[1] < r[0] < 0.25 and np.all(np.abs(r[2:10]) < 0.01), r
    flagged = contaminated_sources(fn, fr, sums)
    assert flagged.tolist() == [True, True] + [False] * 9
    # a model of REF's PSF too broad (FWHM 3.5 for 2.5): every galaxy's inner part
    # now has a lower ratio than its annulus; against 1, clean galaxies would be
    # flagged too; against the galaxies' median quotient, only the two
    gal = slice(0, 10)
    fn, _, fr, _, ok, sums = cross_convolved_photometry(
        new, ref, psf_n, true_psf(31, 3.5), xy[gal], xy[gal], 1.5 * fwhm_c,
        rms_new=2.0, rms_ref=2.0, inner=0.8 * fwhm_c)
    assert contaminated_sources(fn, fr, sums, relative=False)[2:].sum() >= 3
    assert contaminated_sources(fn, fr, sums).tolist() == [True, True] + [False] * 8
    # without the inner apertures the call keeps its five results
    assert len(cross_convolved_photometry(new, ref, psf_n, psf_r, xy, xy, 1.5 * fwhm_c,
                                          rms_new=2.0, rms_ref=2.0)) == 5
    with pytest.raises(InputError, match="inner"):
        cross_convolved_photometry(new, ref, psf_n, psf_r, xy, xy, 5.0, rms_new=2.0,
                                   rms_ref=2.0, inner=6.0)


def test_inner_aperture_noise_forms_predict_the_scatter():
    """The noise covariances of the inner and full aperture sums of a convolved image
    (returned with ``inner``) match those of 150 noise realisations within 25 %, for
    a noise map as for a constant (measured with 300: 0.98-1.24); a plain aperture
    sum's variance (sigma^2 x area) would overstate the inner one's by far (the
    convolution smooths the noise), and clean galaxies are not flagged over 40
    realisations."""
    from zogy_stream.stars import contaminated_sources, cross_convolved_photometry

    shape = (200, 200)
    psf_n, psf_r = true_psf(25, 4.0), true_psf(25, 3.0)
    xy = np.array([[60.2, 70.7], [140.5, 60.1], [100.0, 140.0]])
    rad, inner = 7.5, 4.0
    rms_map = np.full(shape, 2.0)
    rms_map[:, 100:] = 3.0  # the second and part of the third aperture: noisier
    sums, full = [], []
    rng = np.random.default_rng(11)
    flags = 0
    for k in range(150):
        new = rng.normal(0.0, 1.0, shape) * rms_map
        ref = rng.normal(0.0, 2.0, shape)
        fn, _, fr, _, ok, q = cross_convolved_photometry(
            new, ref, psf_n, psf_r, xy, xy, rad, rms_new=rms_map, rms_ref=2.0, inner=inner)
        sums.append(q[:, [0, 4]])
        full.append(np.column_stack([fn, fr]))
        if k >= 40:
            continue
        # clean galaxies on this noise: none flagged
        gn, gr = _galaxy_pair(rng, xy[:, 0], xy[:, 1], np.full(3, 2e4), np.full(3, 10.0), 1.2,
                              psf_n, psf_r, shape)
        gfn, _, gfr, _, _, gq = cross_convolved_photometry(
            gn, gr, psf_n, psf_r, xy, xy, rad, rms_new=2.0, rms_ref=2.0, inner=inner)
        flags += int(contaminated_sources(gfn, gfr, gq).sum())
    assert flags <= 2
    sums, full = np.array(sums), np.array(full)
    for img, cols in ((0, slice(1, 4)), (1, slice(5, 8))):
        ii, io, oo = q[:, cols].T
        emp_ii = sums[:, :, img].var(axis=0)
        emp_oo = full[:, :, img].var(axis=0)
        emp_io = np.mean((sums[:, :, img] - sums[:, :, img].mean(0))
                         * (full[:, :, img] - full[:, :, img].mean(0)), axis=0)
        for emp, pred in ((emp_ii, ii), (emp_oo, oo), (emp_io, io)):
            assert np.all(np.abs(emp / pred - 1) < 0.25), emp / pred
    # the noisier map is seen: the second source's inner variance is ~(3/2)^2 the first's
    assert q[1, 1] / q[0, 1] == pytest.approx(2.25, rel=0.05)
    assert np.all(q[:, 5] < 0.8 * 4.0 * np.pi * inner ** 2)


def test_convolve_same_matches_scipy_signal():
    """The cross-convolution's FFT convolution gives fftconvolve's 'same' output."""
    from scipy.signal import fftconvolve

    from zogy_stream.stars import _convolve_same

    rng = np.random.default_rng(3)
    for shape, ks in (((64, 50), (7, 7)), ((33, 81), (11, 5)), ((40, 40), (1, 1))):
        img = rng.normal(size=shape).astype(np.float32)
        ker = rng.random(ks).astype(np.float32)
        got = _convolve_same(img, ker)
        assert got.shape == img.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, fftconvolve(img, ker, mode="same"), rtol=0,
                                   atol=2e-6 * np.abs(got).max())
