"""A PSF fitted through the other image's PSF on sources of any shape (crosspsf)."""
import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.signal import fftconvolve

from conftest import gaussian
from zogy_stream.crosspsf import cut_stamps, fit_cross_psf
from zogy_stream.errors import InputError, ProcessingError
from zogy_stream.simulate import gaussian_psf


def _galaxy(n, scale, axis_ratio, angle, dy, dx):
    """Exponential disc of unit flux on an ``n x n`` grid."""
    y, x = np.mgrid[:n, :n] - n // 2
    y, x = y - dy, x - dx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, (-s * x + c * y) / axis_ratio
    g = np.exp(-np.hypot(u, v) / scale)
    return g / g.sum()


def _pair_field(rng, *, fwhm_k, fwhm_u, n_src=16, noise=5.0, transient_in=None):
    """Two background-subtracted images of galaxies only, seen through two Gaussian PSFs;
    a point source added to the known image on source ``transient_in``."""
    side = 96 * 5
    k_img = np.zeros((side, side))
    u_img = np.zeros((side, side))
    # pixel-integrated, as the fitted Moffat profiles are
    pk, pu = gaussian_psf(fwhm_k, size=41), gaussian_psf(fwhm_u, size=41)
    xs, ys = [], []
    for i in range(n_src):
        gy, gx = divmod(i, 4)
        cy, cx = 60 + 110 * gy, 60 + 110 * gx
        gal = _galaxy(41, rng.uniform(1.5, 4.0), rng.uniform(0.4, 1.0), rng.uniform(0, np.pi),
                      *rng.uniform(-0.5, 0.5, 2))
        flux = rng.uniform(2e4, 8e4)
        k_img[cy - 40:cy + 41, cx - 40:cx + 41] += 1.2 * flux * fftconvolve(gal, pk)
        u_img[cy - 40:cy + 41, cx - 40:cx + 41] += flux * fftconvolve(gal, pu)
        if i == transient_in:
            k_img[cy - 20:cy + 21, cx - 20:cx + 21] += 0.5 * flux * pk
        xs.append(cx)
        ys.append(cy)
    k_img += rng.normal(0, noise, k_img.shape)
    u_img += rng.normal(0, noise, u_img.shape)
    var = np.full(k_img.shape, noise ** 2)
    return k_img, u_img, var, np.array(xs, float), np.array(ys, float), pk


@pytest.mark.parametrize("fwhm_k, fwhm_u", [(4.0, 2.5), (2.5, 4.0), (3.0, 3.0)])
def test_fwhm_recovered_from_galaxies_alone(fwhm_k, fwhm_u):
    """No star anywhere: 16 exponential discs seen through both PSFs pin the unknown
    FWHM down (a sharper, a broader and an equal PSF)."""
    rng = np.random.default_rng(1)
    k_img, u_img, var, x, y, pk = _pair_field(rng, fwhm_k=fwhm_k, fwhm_u=fwhm_u)
    half, size = 12, 41
    k, u, vk, vu, used = cut_stamps(k_img, u_img, var, var, x, y, half=half, pad=20)
    assert len(used) == 16
    fit = fit_cross_psf(k, u, vk, vu, pk, half=half, beta=200.0, fwhm_bounds=(0.6, 9.0),
                        size=size)
    assert fit["fwhm"] == pytest.approx(fwhm_u, rel=0.04), fit
    assert 0 < fit["fwhm_err"] < 0.1 * fwhm_u
    assert fit["n_sources"] >= 14


def test_a_host_with_a_transient_is_rejected():
    """A point source on one galaxy of the known image only (a transient on its host) is
    an outlier of the per-source FWHMs and left out."""
    rng = np.random.default_rng(2)
    k_img, u_img, var, x, y, pk = _pair_field(rng, fwhm_k=4.0, fwhm_u=2.5, transient_in=5)
    k, u, vk, vu, used = cut_stamps(k_img, u_img, var, var, x, y, half=12, pad=20)
    fit = fit_cross_psf(k, u, vk, vu, pk, half=12, beta=200.0, fwhm_bounds=(0.6, 9.0),
                        size=41)
    assert not fit["kept"][5]
    assert fit["fwhm"] == pytest.approx(2.5, rel=0.04), fit


def test_cut_stamps_skips_edges_and_bad_pixels():
    img = np.ones((60, 60))
    bad = np.zeros((60, 60), bool)
    bad[30, 45] = True
    k, u, vk, vu, used = cut_stamps(img, img, img, img, [5.0, 30.0, 45.0, 30.2],
                                    [30.0, 30.0, 30.0, 29.6], half=4, pad=5, bad=bad)
    assert list(used) == [1, 3]  # 0 leaves the image, 2 holds a bad pixel
    assert k.shape == (2, 19, 19)
    assert list(vk) == [81.0, 81.0]


def test_errors():
    rng = np.random.default_rng(3)
    k_img, u_img, var, x, y, pk = _pair_field(rng, fwhm_k=4.0, fwhm_u=2.5, n_src=2)
    k, u, vk, vu, _ = cut_stamps(k_img, u_img, var, var, x, y, half=12, pad=20)
    with pytest.raises(ProcessingError, match="2 matched source"):
        fit_cross_psf(k, u, vk, vu, pk, half=12, beta=200.0, fwhm_bounds=(0.6, 9.0), size=41)
    with pytest.raises(InputError, match="fwhm_bounds"):
        fit_cross_psf(k, u, vk, vu, pk, half=12, beta=200.0, fwhm_bounds=(3.0, 2.0), size=41)
    with pytest.raises(InputError, match="size"):
        fit_cross_psf(k, u, vk, vu, pk, half=12, beta=200.0, fwhm_bounds=(0.6, 9.0), size=42)
    with pytest.raises(InputError, match="one shape"):
        cut_stamps(k_img, u_img[:-1], var, var, x, y, half=12, pad=20)


def test_moffat_fallback_broader_than_the_sharp_sources_is_refused():
    """A region whose only "stars" are two round galaxies (FWHM 10 px) while three compact
    sources (not usable PSF stars: blended pairs) show the PSF is ~3 px: a Moffat fitted to
    the galaxies is refused, not used as a 10 px PSF."""
    from conftest import add_source
    from zogy_stream import calibrate as cb
    from zogy_stream.stars import background_maps, find_stars
    from zogy_stream.tiles import Box

    img = np.random.default_rng(4).normal(100.0, 5.0, (256, 256))
    for y, x in ((70, 70), (180, 170)):
        add_source(img, gaussian(10.0, 61), 2e5, y, x)
    for y, x in ((40, 200), (200, 40), (128, 128)):  # compact pairs 4 px apart
        add_source(img, gaussian(3.0, 21), 2e4, y, x)
        add_source(img, gaussian(3.0, 21), 2e4, y, x + 4)
    img = img.astype(np.float32)
    back, rms = background_maps(img, threshold=5.0)
    cat = find_stars(img, gain=1.0, threshold=5.0, background=back, rms=rms)
    cat["star_like"] = np.asarray(cat["fwhm"]) > 8  # the locus fell on the galaxies
    assert cat["star_like"].sum() == 2
    assert cb._sharp_fwhm(cat) < 5.0
    region = cb.RegionStars(Box(0, 256, 0, 256), img, cat, back=back, rms=rms)
    with pytest.raises(ProcessingError, match="cannot estimate the PSF of REF"):
        cb._model_psf_source([region], "REF", sat=None, psf_size=None, local=False)


@pytest.fixture(scope="module")
def star_poor(tmp_path_factory):
    """A 1024^2 pair like the demo scene: 1500 faint stars per Mpix (fluxes 5-5e5 ADU,
    N(>F) ~ F^-1.5), so REF's brightest sources are its 64 galaxies."""
    from zogy_stream.simulate import write_scene

    d = tmp_path_factory.mktemp("star_poor")
    paths = write_scene(d, (1024, 1024), seed=1, n_transients=20, n_galaxies=64,
                        new_fwhm=4.0, ref_fwhm=3.0, flux_ratio=1.0, transient_snr=(5, 60))
    return d, paths


def test_star_poor_reference_fitted_through_the_new_psf(star_poor, caplog):
    """NEW's PSF given, REF's not, and REF has no usable star: REF's PSF is fitted through
    NEW's on the galaxies both show (a Moffat fitted to REF's "stars" had FWHM 17.6 px for
    a true 3.0 px in the 2048^2 demo scene).  The subtraction then meets the targets."""
    from zogy_stream.demo import score_scene
    from zogy_stream.pipeline import subtract

    d, p = star_poor
    with caplog.at_level(logging.INFO, logger="zogy_stream"):
        s = subtract(p["new"], p["ref"], d / "out.fits", new_psf=p["new_psf"],
                     catalog=d / "out.ecsv", wisdom=False)
    assert "PSF fitted through NEW's PSF" in caplog.text
    with fits.open(s.out) as hl:
        h = hl[0].header
        assert h["RPSFSRC"] == "auto" and h["RPSFHOW"] == "cross"
        assert h["NPSFHOW"] == "given"
        assert abs(h["FLUXRAT"] - 1.0) < 0.02
        sc = score_scene(Table.read(p["truth"]), Table.read(s.catalog), hl["SCORR"].data,
                         hl["MASK"].data)
    assert sc["recovered"] >= 0.9 * sc["expected"], sc
    assert sc["false"] <= 8, sc
    assert abs(sc["std"] - 1.0) < 0.15, sc
    assert 0.92 <= sc["flux"] <= 1.08, sc


def test_star_poor_reference_psf_width(star_poor):
    """The fitted REF PSF's FWHM is the truth's within 10 %."""
    from zogy_stream.options import Options
    from zogy_stream.pipeline import Inputs, plan_run
    from zogy_stream.psf import psf_fwhm

    _, p = star_poor
    plan = plan_run(Inputs(new=p["new"], ref=p["ref"], new_psf=p["new_psf"]),
                    Options(wisdom=False))
    src = plan.psf_sources[1]
    assert src.method == "cross"
    true_ref = fits.getdata(p["ref_psf"])
    assert psf_fwhm(src.psf) == pytest.approx(psf_fwhm(true_ref), rel=0.10)


def test_which_psfs_are_fitted_through_the_other(monkeypatch):
    """A missing PSF, or a Moffat of 1-2 stars or of faint stars, is fitted through the
    other image's; a Moffat of 3+ stars of S/N >= 20 is kept; a Moffat donor serves only
    a missing PSF; with neither PSF the original error stands."""
    from zogy_stream import calibrate as cb

    psf = gaussian_psf(3.0, size=15)
    calls = []

    def fake(label, regions_u, regions_k, known, **kw):
        calls.append((label, known.label))
        return cb.PsfSource(label, "auto", psf, psf, method="cross")

    monkeypatch.setattr(cb, "cross_psf_source", fake)
    given = cb.PsfSource("NEW", "image", psf, psf)
    strong = cb.PsfSource("REF", "auto", psf, psf, moffat=(3.0, 50.0, 3, 20.0), method="moffat")
    weak_n = cb.PsfSource("REF", "auto", psf, psf, moffat=(3.0, 50.0, 2, 20.0), method="moffat")
    faint = cb.PsfSource("REF", "auto", psf, psf, moffat=(3.0, 50.0, 5, 10.0), method="moffat")
    regions = [object()]
    fill = cb.fill_psfs_through_other
    assert fill(given, strong, regions, regions)[1] is strong
    assert fill(given, weak_n, regions, regions)[1].method == "cross"
    assert fill(given, faint, regions, regions)[1].method == "cross"
    assert fill(given, None, regions, regions)[1].method == "cross"
    assert calls == [("REF", "NEW")] * 3
    moffat_new = cb.PsfSource("NEW", "auto", psf, psf, moffat=(4.0, 50.0, 1, 20.0),
                              method="moffat")
    assert fill(moffat_new, None, regions, regions)[1].method == "cross"  # nothing else
    assert fill(moffat_new, weak_n, regions, regions)[1] is weak_n  # Moffat through Moffat: no
    assert len(calls) == 4
    err = ProcessingError("cannot estimate the PSF of NEW: only 0 usable stars; give --new-psf")
    with pytest.raises(ProcessingError, match="only 0 usable stars; give --new-psf"):
        fill(None, None, regions, regions, errors=(err, None))


def test_fitted_through_an_even_oblong_given_psf(star_poor):
    """A given PSF image may be even-sized and oblong; the fit embeds it on an odd square
    grid (it crashed on a shape mismatch before) and still finds REF's width."""
    from zogy_stream.options import Options
    from zogy_stream.pipeline import Inputs, plan_run
    from zogy_stream.psf import psf_fwhm

    _, p = star_poor
    true_new = fits.getdata(p["new_psf"])
    c = true_new.shape[0] // 2
    assert c >= 12
    oblong = np.ascontiguousarray(true_new[c - 10:c + 10, c - 12:c + 12])  # 20 x 24
    plan = plan_run(Inputs(new=p["new"], ref=p["ref"], new_psf=oblong), Options(wisdom=False))
    src = plan.psf_sources[1]
    assert src.method == "cross"
    assert psf_fwhm(src.psf) == pytest.approx(psf_fwhm(fits.getdata(p["ref_psf"])), rel=0.10)
