"""Tests of zogy_stream.psfex against PSFEx-format files written here."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from zogy_stream.errors import InputError
from zogy_stream.psfex import PsfexModel, read_psfex
from zogy_stream.stars import measure_psf

SIG0 = 1.6          # Gaussian sigma at the field centre (pixels)
DSIG_X = 0.3        # d sigma_x / d u  (u = scaled x)
DSIG_Y = 0.15       # d sigma_y / d v
ZERO = (1024.5, 2048.5)   # POLZERO1/2 (1-based)
SCALE = (2048.0, 4096.0)  # POLSCAL1/2


def _gauss(x, y, sx, sy):
    return np.exp(-0.5 * (x / sx) ** 2 - 0.5 * (y / sy) ** 2) / (2 * np.pi * sx * sy)


def _dgauss_dsx(x, y, sx, sy):
    return _gauss(x, y, sx, sy) * (x * x / sx ** 3 - 1.0 / sx)


def _dgauss_dsy(x, y, sx, sy):
    return _gauss(x, y, sx, sy) * (y * y / sy ** 3 - 1.0 / sy)


def _basis_functions(degree):
    """Analytic basis functions f_k(x, y) (x, y pixel offsets) in PSFEx term order."""
    g0 = lambda x, y: _gauss(x, y, SIG0, SIG0)  # noqa: E731
    dx = lambda x, y: DSIG_X * _dgauss_dsx(x, y, SIG0, SIG0)  # noqa: E731
    dy = lambda x, y: DSIG_Y * _dgauss_dsy(x, y, SIG0, SIG0)  # noqa: E731
    zero = lambda x, y: 0.0 * x  # noqa: E731
    if degree == 1:   # terms 1, u, v
        return [g0, dx, dy]
    if degree == 2:   # terms 1, u, u^2, v, u v, v^2: width_x grows with u^2, width_y with v
        return [g0, zero, dx, dy, zero, zero]
    raise ValueError(degree)


def _truth_widths(degree, x, y):
    u = (x + 1 - ZERO[0]) / SCALE[0]
    v = (y + 1 - ZERO[1]) / SCALE[1]
    tu = u if degree == 1 else u * u
    # moments of G + t dG/dsigma: sigma^2 + 2 t sigma
    return (np.sqrt(SIG0 ** 2 + 2 * tu * DSIG_X * SIG0),
            np.sqrt(SIG0 ** 2 + 2 * v * DSIG_Y * SIG0))


def write_psfex(path, *, samp, degree=1, n_samples=None, shift=(0.0, 0.0), header_edits=None,
                mask_shape=None):
    """Write a PSFEx-format .psf file with analytic Gaussian basis images."""
    funcs = _basis_functions(degree)
    if n_samples is None:
        n_samples = int(np.ceil(16.0 / samp)) | 1
    c = n_samples // 2
    off = (np.arange(n_samples) - c) * samp
    yy, xx = np.meshgrid(off, off, indexing="ij")
    basis = np.array([f(xx - shift[0], yy - shift[1]) for f in funcs], dtype=np.float32)
    basis *= samp * samp  # PSFEx-like flux scaling (irrelevant after normalisation)
    if mask_shape is not None:
        basis = np.zeros(mask_shape, dtype=np.float32)
    ncoeff, ny, nx = basis.shape
    col = fits.Column(name="PSF_MASK", format=f"{basis.size}E", dim=f"({nx}, {ny}, {ncoeff})",
                      array=basis[None])
    hdu = fits.BinTableHDU.from_columns([col], name="PSF_DATA")
    h = hdu.header
    h["LOADED"] = 500
    h["ACCEPTED"] = 480
    h["CHI2"] = 1.1
    h["POLNAXIS"] = 2
    h["POLGRP1"] = 1
    h["POLNAME1"] = "X_IMAGE"
    h["POLZERO1"] = ZERO[0]
    h["POLSCAL1"] = SCALE[0]
    h["POLGRP2"] = 1
    h["POLNAME2"] = "Y_IMAGE"
    h["POLZERO2"] = ZERO[1]
    h["POLSCAL2"] = SCALE[1]
    h["POLNGRP"] = 1
    h["POLDEG1"] = degree
    h["PSF_FWHM"] = 2.3548 * SIG0
    h["PSF_SAMP"] = samp
    h["PSFNAXIS"] = 3
    h["PSFAXIS1"] = n_samples
    h["PSFAXIS2"] = n_samples
    h["PSFAXIS3"] = len(funcs)
    for k, v in (header_edits or {}).items():
        if v is None:
            del h[k]
        else:
            h[k] = v
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, overwrite=True)
    return path


def _moments(psf):
    n = psf.shape[0]
    d = np.arange(n) - n // 2
    p = psf / psf.sum()
    mx = (p.sum(axis=0) * d).sum()
    my = (p.sum(axis=1) * d).sum()
    sx = np.sqrt((p.sum(axis=0) * (d - mx) ** 2).sum())
    sy = np.sqrt((p.sum(axis=1) * (d - my) ** 2).sum())
    return mx, my, sx, sy


def _truth_image(degree, x, y, size):
    u = (x + 1 - ZERO[0]) / SCALE[0]
    v = (y + 1 - ZERO[1]) / SCALE[1]
    terms = [u ** i * v ** j for j in range(degree + 1) for i in range(degree + 1 - j)]
    d = np.arange(size) - size // 2
    yy, xx = np.meshgrid(d.astype(float), d.astype(float), indexing="ij")
    img = sum(t * f(xx, yy) for t, f in zip(terms, _basis_functions(degree)))
    return img / img.sum()


POSITIONS = [(0.0, 0.0), (1023.5, 2047.5), (2047.0, 0.0), (0.0, 4095.0), (1500.2, 3000.7)]


@pytest.mark.parametrize("samp", [0.5, 1.0, 0.8])
def test_evaluate_matches_analytic_truth(tmp_path, samp):
    model = read_psfex(write_psfex(tmp_path / "model.psf", samp=samp))
    assert isinstance(model, PsfexModel)
    assert model.ncoeff == 3 and model.degree == 1 and model.sampling == samp
    assert model.names == ("X_IMAGE", "Y_IMAGE")
    for x, y in POSITIONS:
        psf = model.evaluate(x, y, size=21)
        assert psf.shape == (21, 21) and psf.dtype == np.float64
        assert psf.sum() == pytest.approx(1.0, abs=1e-12)
        mx, my, sx, sy = _moments(psf)
        tx, ty = _truth_widths(1, x, y)
        assert abs(mx) < 0.05 and abs(my) < 0.05
        assert sx == pytest.approx(tx, rel=0.02)   # FWHM = 2.3548 sigma: same 2 %
        assert sy == pytest.approx(ty, rel=0.02)
        truth = _truth_image(1, x, y, 21)
        assert np.abs(psf - truth).sum() < 0.02
        fwhm, xc, yc = measure_psf(psf)
        fwhm_true, _, _ = measure_psf(truth)
        assert fwhm == pytest.approx(fwhm_true, rel=0.02)
        assert abs(xc - 10) < 0.05 and abs(yc - 10) < 0.05


def test_width_varies_linearly_in_x(tmp_path):
    model = read_psfex(write_psfex(tmp_path / "m.psf", samp=0.5))
    y = ZERO[1] - 1
    widths = [_moments(model.evaluate(x, y, size=21))[2] ** 2 for x in (0.0, 1023.5, 2047.0)]
    # sigma_x^2 = SIG0^2 + 2 u DSIG_X SIG0 is linear in x
    assert widths[0] < widths[1] < widths[2]
    assert widths[1] == pytest.approx(0.5 * (widths[0] + widths[2]), rel=1e-3)


def test_one_based_coordinates(tmp_path):
    """At 0-based (POLZERO1 - 1, POLZERO2 - 1) all non-constant terms vanish."""
    model = read_psfex(write_psfex(tmp_path / "m.psf", samp=1.0))
    np.testing.assert_allclose(model.coefficients(ZERO[0] - 1, ZERO[1] - 1), [1, 0, 0],
                               atol=1e-15)
    psf = model.evaluate(ZERO[0] - 1, ZERO[1] - 1, size=15)
    _, _, sx, sy = _moments(psf)
    assert sx == pytest.approx(sy, rel=1e-6)


def test_term_order_degree_two(tmp_path):
    """PSFEx order 1, u, u^2, v, uv, v^2: x width follows u^2, y width follows v."""
    model = read_psfex(write_psfex(tmp_path / "m2.psf", samp=0.5, degree=2))
    assert model.ncoeff == 6
    for x, y in POSITIONS:
        _, _, sx, sy = _moments(model.evaluate(x, y, size=21))
        tx, ty = _truth_widths(2, x, y)
        assert sx == pytest.approx(tx, rel=0.02)
        assert sy == pytest.approx(ty, rel=0.02)


def test_default_size_and_odd_size(tmp_path):
    model = read_psfex(write_psfex(tmp_path / "m.psf", samp=0.5, n_samples=33))
    assert model.default_size == 17           # 33 samples x 0.5 px = 16.5 px -> 17
    psf = model.evaluate(100.0, 100.0)
    assert psf.shape == (17, 17)
    small = model.evaluate(100.0, 100.0, size=9)
    assert small.shape == (9, 9) and small.sum() == pytest.approx(1.0)
    with pytest.raises(InputError, match="odd"):
        model.evaluate(100.0, 100.0, size=10)
    with pytest.raises(InputError):
        model.evaluate(np.nan, 1.0)


def test_off_centre_model_is_recentred(tmp_path):
    model = read_psfex(write_psfex(tmp_path / "m.psf", samp=0.5, shift=(0.45, -0.3)))
    psf = model.evaluate(1023.5, 2047.5, size=21)
    mx, my, _, _ = _moments(psf)
    assert abs(mx) < 0.05 and abs(my) < 0.05
    # a small offset (< 0.2 px) is left alone
    model = read_psfex(write_psfex(tmp_path / "m2.psf", samp=0.5, shift=(0.1, 0.0)))
    mx, _, _, _ = _moments(model.evaluate(1023.5, 2047.5, size=21))
    assert mx == pytest.approx(0.1, abs=0.02)


def test_model_is_immutable(tmp_path):
    model = read_psfex(write_psfex(tmp_path / "m.psf", samp=1.0))
    with pytest.raises(ValueError):
        model.basis[0, 0, 0] = 1.0
    with pytest.raises(AttributeError):
        model.sampling = 2.0


def test_not_fits(tmp_path):
    p = tmp_path / "model.psf"
    p.write_text("this is not a FITS file\n" * 200)
    with pytest.raises(InputError, match="not a readable FITS"):
        read_psfex(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_psfex(tmp_path / "nope.psf")


def test_no_psf_data(tmp_path):
    p = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(p)
    with pytest.raises(InputError, match="PSF_DATA"):
        read_psfex(p)


@pytest.mark.parametrize("key", ["POLSCAL1", "PSF_SAMP", "PSFAXIS3", "POLDEG1", "POLNAXIS"])
def test_missing_keyword(tmp_path, key):
    p = write_psfex(tmp_path / "m.psf", samp=1.0, header_edits={key: None})
    with pytest.raises(InputError, match=key):
        read_psfex(p)


def test_wrong_mask_shape(tmp_path):
    # header says 3 terms of 25x25 but the column holds 2 x 25 x 25
    p = write_psfex(tmp_path / "m.psf", samp=1.0, n_samples=25, mask_shape=(2, 25, 25))
    with pytest.raises(InputError, match="PSF_MASK"):
        read_psfex(p)
    # inconsistent polynomial: degree 2 needs 6 terms
    p = write_psfex(tmp_path / "m2.psf", samp=1.0, header_edits={"POLDEG1": 2})
    with pytest.raises(InputError, match="PSFAXIS3"):
        read_psfex(p)


def test_unsupported_variables(tmp_path):
    p = write_psfex(tmp_path / "m.psf", samp=1.0, header_edits={"POLNAME2": "MAG_AUTO"})
    with pytest.raises(InputError, match="POLNAME2"):
        read_psfex(p)
