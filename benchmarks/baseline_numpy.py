"""A plain whole-image NumPy implementation of ZOGY (the baseline a user would write).

Straight from the paper's equations, float64, full complex FFTs, no tiling,
no caching.  The benchmarks time it against zogy_stream, and the tests use it
as an independent oracle for the tiled, float32, fused-kernel path.
Inputs are background-subtracted and treated as periodic.
"""
from __future__ import annotations

import numpy as np


def _to_origin(psf: np.ndarray, shape) -> np.ndarray:
    out = np.zeros(shape)
    out[: psf.shape[0], : psf.shape[1]] = psf / psf.sum()
    return np.roll(out, (-(psf.shape[0] // 2), -(psf.shape[1] // 2)), axis=(0, 1))


def zogy_numpy(new, ref, new_psf, ref_psf, sigma_new, sigma_ref, *, new_var=None, ref_var=None,
               flux_ratio=1.0, astrometric_sigma=(0.0, 0.0)) -> dict:
    """Return D, S, S_corr, FLUX, FLUX_ERR, F_S for a whole image pair."""
    fft2, ifft2 = np.fft.fft2, np.fft.ifft2
    shape = new.shape
    fn, fr = flux_ratio, 1.0
    pn = fft2(_to_origin(new_psf, shape))
    pr = fft2(_to_origin(ref_psf, shape))
    nh, rh = fft2(new), fft2(ref)
    delta = sigma_new ** 2 * fr ** 2 * np.abs(pr) ** 2 + sigma_ref ** 2 * fn ** 2 * np.abs(pn) ** 2
    delta = np.where(delta > 0, delta, np.inf)
    d = ifft2((fr * pr * nh - fn * pn * rh) / np.sqrt(delta)).real                    # (13)
    kn = fn * fr ** 2 * np.conj(pn) * np.abs(pr) ** 2 / delta                         # (29)
    kr = fr * fn ** 2 * np.conj(pr) * np.abs(pn) ** 2 / delta                         # (28)
    s_n = ifft2(kn * nh).real
    s_r = ifft2(kr * rh).real
    s = s_n - s_r                                                                     # (12)
    f_s = (fn ** 2 * fr ** 2 * np.abs(pn) ** 2 * np.abs(pr) ** 2 / delta).sum() / new.size  # (42)
    vn = np.full(shape, sigma_new ** 2) if new_var is None else new_var
    vr = np.full(shape, sigma_ref ** 2) if ref_var is None else ref_var
    kn_x = ifft2(kn).real
    kr_x = ifft2(kr).real
    v_sn = ifft2(fft2(vn) * fft2(kn_x ** 2)).real                                     # (26)
    v_sr = ifft2(fft2(vr) * fft2(kr_x ** 2)).real                                     # (27)
    sx, sy = astrometric_sigma
    gy_n, gx_n = np.gradient(s_n)  # np.gradient returns (d/dy, d/dx)
    gy_r, gx_r = np.gradient(s_r)
    v_ast = sx ** 2 * (gx_n ** 2 + gx_r ** 2) + sy ** 2 * (gy_n ** 2 + gy_r ** 2)     # (30-33)
    scorr = s / np.sqrt(v_sn + v_sr + v_ast)                                          # (25)
    return dict(d=d, s=s, scorr=scorr, flux=s / f_s, flux_err=np.sqrt(v_sn + v_sr) / f_s,
                f_s=f_s)
