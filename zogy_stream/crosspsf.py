"""One image's PSF from the other's, fitted to matched sources of any shape.

A static source -- star or galaxy -- appears as ``G (x) P_n`` in the new image
and ``G (x) P_r`` in the reference (each times its image's flux scale), so the
cross-convolved images agree on it whatever ``G`` is::

    N (x) P_r  =  (F_n / F_r) * R (x) P_n          (ZOGY's cross-convolution identity)

With one PSF known (given, or stacked from the stars of its image), the other
is the profile that makes the two sides agree on the sources both images
show.  This is the fallback for an image without usable stars of its own: a
sparse field whose brightest sources are galaxies, or one whose stars are
all saturated.  A Moffat profile fitted to the "stars" of such an image fits
a galaxy (FWHM 17.6 px for a true 3.0 px in the demo scene), while the
galaxies themselves, seen through both PSFs, pin the FWHM down.

The unknown PSF is a circular Moffat profile of the known one's ``beta``; its
FWHM is found on a grid.  For every source (stamp ``s``) and trial FWHM the
amplitude ``f_s`` is fitted, and the residual energy, less what the noise of
both stamps (background and source variance, carried through the two
convolutions) puts into it, is summed over the sources in units of that
noise: a chi-square excess, so bright sources weigh more.  Sources whose own
best FWHM is an outlier (a transient on a host galaxy, a blend) are dropped
and the sum minimised again.  Pure functions on plain arrays; the stamps are
cut by the caller (:func:`cut_stamps`).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError, ProcessingError
from .psf import psf_to_origin

__all__ = ["cut_stamps", "fit_cross_psf"]

#: fewest sources the FWHM is fitted to
MIN_SOURCES = 3
#: trial FWHMs (log-spaced) between the bounds
N_GRID = 48
#: per-source best FWHMs further than this many robust sigmas (in log FWHM) from their
#: median are dropped, but never those within this relative distance
CLIP_SIGMA = 3.0
CLIP_FLOOR = 0.05


def cut_stamps(known, unknown, var_known, var_unknown, x, y, *, half: int, pad: int,
               bad=None):
    """Stamps of the sources at ``(x, y)`` in both (background-subtracted) images.

    Each stamp is ``2 * (half + pad) + 1`` pixels square, centred on the
    nearest pixel; sources whose stamp leaves the image, or holds a bad or
    non-finite pixel in either image, are skipped.

    Parameters
    ----------
    known, unknown : ndarray, 2-D
        The background-subtracted images whose PSF is known and to be fitted.
    var_known, var_unknown : ndarray, 2-D
        Their per-pixel variances (background and source noise).
    x, y : array_like
        Source positions (0-based pixels, ``x`` the column).
    half : int
        Half-side of the part of the stamp the fit compares.
    pad : int
        Margin around it for the convolutions (at least the larger PSF's half-side).
    bad : ndarray of bool, optional
        Pixels that may not be used (either image).

    Returns
    -------
    k, u, vk, vu : ndarray, shape (n, L, L)
        Stamps of both images and the sums of their variances over the compared part
        (``vk`` and ``vu`` have shape (n,)).
    used : ndarray of int
        Indices into ``x``/``y`` of the stamps returned.

    Raises
    ------
    InputError
        Images of different shapes, or negative ``half`` / ``pad``.
    """
    known = np.asarray(known)
    unknown = np.asarray(unknown)
    if known.ndim != 2 or known.shape != unknown.shape or np.shape(var_known) != known.shape \
            or np.shape(var_unknown) != known.shape:
        raise InputError("known, unknown and their variances must be 2-D arrays of one shape")
    if half < 1 or pad < 0:
        raise InputError(f"half={half!r} must be >= 1 and pad={pad!r} >= 0")
    ny, nx = known.shape
    h = int(half) + int(pad)
    cx = np.rint(np.asarray(x, np.float64))
    cy = np.rint(np.asarray(y, np.float64))
    ks, us, vks, vus, used = [], [], [], [], []
    for i, (xi, yi) in enumerate(zip(cx, cy)):
        if not (np.isfinite(xi) and np.isfinite(yi)):
            continue
        xi, yi = int(xi), int(yi)
        if xi - h < 0 or yi - h < 0 or xi + h >= nx or yi + h >= ny:
            continue
        sl = np.s_[yi - h:yi + h + 1, xi - h:xi + h + 1]
        core = np.s_[yi - half:yi + half + 1, xi - half:xi + half + 1]
        k, u = known[sl], unknown[sl]
        if (bad is not None and bad[sl].any()) or not (np.isfinite(k).all()
                                                       and np.isfinite(u).all()):
            continue
        vk, vu = float(np.sum(var_known[core])), float(np.sum(var_unknown[core]))
        if not (vk > 0 and vu > 0):
            continue
        ks.append(k.astype(np.float64))
        us.append(u.astype(np.float64))
        vks.append(vk)
        vus.append(vu)
        used.append(i)
    side = 2 * h + 1
    if not used:
        z = np.zeros((0, side, side))
        return z, z.copy(), np.zeros(0), np.zeros(0), np.zeros(0, np.intp)
    return (np.stack(ks), np.stack(us), np.asarray(vks), np.asarray(vus),
            np.asarray(used, np.intp))


def _kernel_ft(psf: np.ndarray, n: int) -> np.ndarray:
    """rFFT of ``psf`` zero-padded to ``n x n`` with its centre pixel moved to (0, 0)."""
    return np.fft.rfft2(psf_to_origin(psf, (n, n)))


def _parabola_min(x: np.ndarray, y: np.ndarray, i: int) -> float:
    """Abscissa of the minimum of the parabola through grid points i-1, i, i+1."""
    if i <= 0 or i >= len(x) - 1:
        return float(x[i])
    y0, y1, y2 = y[i - 1], y[i], y[i + 1]
    den = y0 - 2.0 * y1 + y2
    if not den > 0:
        return float(x[i])
    step = 0.5 * (y0 - y2) / den
    return float(x[i] + np.clip(step, -1.0, 1.0) * (x[i + 1] - x[i]))


def fit_cross_psf(known, unknown, var_known, var_unknown, psf_known, *, half: int,
                  beta: float, fwhm_bounds: tuple[float, float], size: int,
                  min_sources: int = MIN_SOURCES) -> dict:
    """FWHM of the unknown image's PSF from stamps of sources both images show.

    Parameters
    ----------
    known, unknown : ndarray, shape (n, L, L)
        Background-subtracted stamps from :func:`cut_stamps`, centred on the sources.
    var_known, var_unknown : ndarray, shape (n,)
        Sum of each stamp's per-pixel variance over its central ``2 * half + 1`` square.
    psf_known : ndarray, 2-D
        The known image's PSF (odd square, unit sum), at most ``L - 2 * half`` wide.
    half : int
        Half-side of the compared central part of each stamp.
    beta : float
        Moffat ``beta`` of the fitted profile (> 1), usually the known PSF's.
    fwhm_bounds : (float, float)
        Smallest and largest FWHM (px) tried.
    size : int
        Odd side of the trial profiles (at most ``L - 2 * half``).
    min_sources : int, optional
        Fewest sources kept after the outlier cut.

    Returns
    -------
    dict
        ``fwhm`` (px), ``fwhm_err`` (px, from the scatter of the sources' own best
        FWHMs), ``n_sources`` (kept), ``n_rejected``, ``chi2`` (excess per kept source at
        the minimum), ``per_source`` (each source's best FWHM, NaN where it has none) and
        ``kept`` (bool per source).

    Raises
    ------
    InputError
        Inconsistent shapes or options.
    ProcessingError
        Fewer than ``min_sources`` usable sources, or a minimum on a bound of the
        FWHM range (the profile is not constrained there).
    """
    from .stars import moffat_image

    known = np.asarray(known, np.float64)
    unknown = np.asarray(unknown, np.float64)
    if known.ndim != 3 or known.shape != unknown.shape or known.shape[1] != known.shape[2]:
        raise InputError("known and unknown must be stacks of square stamps of one shape")
    n, L = known.shape[0], known.shape[1]
    lo, hi = (float(v) for v in fwhm_bounds)
    if not 0 < lo < hi:
        raise InputError(f"fwhm_bounds={fwhm_bounds!r} must be (low, high) with 0 < low < high")
    if not (isinstance(size, (int, np.integer)) and size % 2 == 1
            and size <= L - 2 * half and psf_known.shape[0] <= L - 2 * half):
        raise InputError(f"size={size!r} and the known PSF ({psf_known.shape[0]} px) must be "
                         f"odd and fit the stamp margin ({L - 2 * half} px)")
    if not beta > 1:
        raise InputError(f"beta={beta!r} must be > 1")
    if n < min_sources:
        raise ProcessingError(f"{n} matched source(s) with clean stamps, need {min_sources}")
    c0, c1 = L // 2 - half, L // 2 + half + 1
    pk = np.asarray(psf_known, np.float64) / np.sum(psf_known)
    # fixed side: the unknown image seen through the known PSF
    a = np.fft.irfft2(np.fft.rfft2(unknown) * _kernel_ft(pk, L), s=(L, L))[:, c0:c1, c0:c1]
    a = a.reshape(n, -1)
    aa = np.einsum("ij,ij->i", a, a)
    noise_a = np.asarray(var_unknown, np.float64) * float(np.sum(pk * pk))
    var_k = np.asarray(var_known, np.float64)
    kf = np.fft.rfft2(known)
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), N_GRID))
    chi = np.empty((N_GRID, n))
    for g, fw in enumerate(grid):
        pu = moffat_image(float(fw), float(beta), int(size))
        b = np.fft.irfft2(kf * _kernel_ft(pu, L), s=(L, L))[:, c0:c1, c0:c1].reshape(n, -1)
        ab = np.einsum("ij,ij->i", a, b)
        bb = np.einsum("ij,ij->i", b, b)
        f = ab / np.where(bb > 0, bb, np.inf)
        resid = aa - f * ab  # |a - f b|^2 at the best amplitude
        noise = noise_a + f * f * var_k * float(np.sum(pu * pu))
        chi[g] = (resid - noise) / noise_a  # excess over the noise, in noise units
    lg = np.log(grid)
    own = np.full(n, np.nan)
    for s in range(n):
        i = int(np.argmin(chi[:, s]))
        if 0 < i < N_GRID - 1:
            own[s] = _parabola_min(lg, chi[:, s], i)
    ok = np.isfinite(own)
    if ok.sum() < min_sources:
        raise ProcessingError(f"only {int(ok.sum())} of {n} matched sources constrain the "
                              f"FWHM within {lo:.2f}-{hi:.2f} px, need {min_sources}")
    med = float(np.median(own[ok]))
    spread = 1.4826 * float(np.median(np.abs(own[ok] - med)))
    kept = ok & (np.abs(own - med) <= max(CLIP_SIGMA * spread, CLIP_FLOOR))
    if kept.sum() < min_sources:
        raise ProcessingError(f"the {n} matched sources disagree on the FWHM (only "
                              f"{int(kept.sum())} consistent, need {min_sources})")
    total = chi[:, kept].sum(axis=1)
    i = int(np.argmin(total))
    if i == 0 or i == N_GRID - 1:
        raise ProcessingError(f"the FWHM is not constrained within {lo:.2f}-{hi:.2f} px "
                              "(best fit on a bound)")
    fwhm = math.exp(_parabola_min(lg, total, i))
    m = int(kept.sum())
    scatter = 1.4826 * float(np.median(np.abs(own[kept] - np.median(own[kept]))))
    err = fwhm * 1.2533 * scatter / math.sqrt(m)
    return dict(fwhm=fwhm, fwhm_err=err, n_sources=m, n_rejected=int(n - m),
                chi2=float(total[i]) / m, per_source=np.exp(own), kept=kept)
