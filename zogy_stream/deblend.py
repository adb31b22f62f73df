"""Blended transients: one S_corr peak, two point sources, told apart in S.

Two transients closer than the width of S_corr (two events on one host
galaxy, a supernova beside a variable nucleus) give a single S_corr peak: its
position lies between them and its FLUX is nearly their sum.

D's noise is white with unit variance on background-limited sky (eq. 13), a
point source of flux ``alpha`` (reference units, those of FLUX) is
``alpha F_D P_D`` in it (eqs. 14-15), and S is ``F_D`` times D correlated with
P_D (eq. 17).  So for point sources at positions p, q the least-squares
amplitudes in D follow from S alone: with ``b = (S(p), S(q)) / F_D`` and
``G = [[A(0), A(p - q)], [A(p - q), A(0)]]`` (A: P_D's autocorrelation) they are
``G^-1 b``, the fit removes ``b^T G^-1 b`` from D's chi^2 (one source at p:
``b_p^2 / A(0)``), and ``G^-1`` is their covariance at fixed positions (the
errors reported free the positions too: :func:`_pair_variances`).  No image
is fitted: a search over pixel pairs and a sub-pixel refinement on S,
interpolated (:func:`zogy_stream._numba._blend_fit`), take ~0.1 ms a
candidate for a FWHM of 4 px and ~0.5 ms for 7 px (window half sizes 5 and 8).

A candidate becomes two when the pair removes at least the threshold squared
more chi^2 than one source, each source alone is as significant as a
detection must be (its flux over its error on the scale of S_corr), both have
the candidate's sign, they are at least a pixel and 0.55 FWHM apart (and not
pressed against that limit), and the pair leaves noise: no residual of S
beyond :data:`RESID_NSIGMA` (a star's residual or a cosmic ray is described
neither by one point source nor by two).
"""
from __future__ import annotations

import logging
import math

import numpy as np
from astropy.table import Table, vstack

from . import _numba as nk
from .errors import InputError
from .psf import psf_fwhm

__all__ = ["blend_radius", "psf_autocorrelation", "split_blends", "MIN_SEPARATION",
           "MIN_SEPARATION_FWHM", "LIMIT_MARGIN", "RESID_NSIGMA", "SHAPE_PRECISION"]

log = logging.getLogger(__name__)

#: Sources closer than this (pixels) are one: no split.
MIN_SEPARATION = 1.0
#: ... nor closer than this fraction of P_D's FWHM: a bright source whose PSF model
#: is a little too narrow is fitted better by two sources half a FWHM apart (on the
#: undersampled accuracy scenes, 9 single transients of S/N 26-35 split 0.49-0.59
#: FWHM apart; of the 69 true pairs split, all but one were >= 0.59 FWHM apart).
MIN_SEPARATION_FWHM = 0.55
#: A pair whose refined separation ends within this many pixels of the closest
#: allowed is pressed against that limit: one source that the model wants broader
#: (on those scenes such "pairs" ended 0.01-0.1 px from it), not two.
LIMIT_MARGIN = 0.25
#: The pair must leave S within this many sigma of its model over the window.
RESID_NSIGMA = 4.0
#: Border (pixels) that S must have beyond the searched window (interpolation).
PAD = 2
#: The pair must also gain this fraction of the single source's chi^2 (its S/N^2):
#: S interpolated between pixels and a P_D estimated from stars describe a bright
#: source to about this precision, and two sources a pixel apart can fit what one
#: leaves (a lone source at S/N 120 otherwise splits half the time).
SHAPE_PRECISION = 0.01


def blend_radius(fwhm: float) -> int:
    """Half size of the window searched for a pair: the PSF's FWHM plus a pixel.

    Raises
    ------
    InputError
        ``fwhm`` not positive and finite.
    """
    if not (math.isfinite(fwhm) and fwhm > 0):
        raise InputError(f"fwhm must be positive, got {fwhm}")
    return int(round(fwhm)) + 1


def psf_autocorrelation(psf: np.ndarray, radius: int) -> np.ndarray:
    """P_D (unit sum) correlated with itself at offsets up to ``2 radius + PAD``, centred.

    Raises
    ------
    InputError
        ``psf`` is not a 2-D odd square stamp with a positive finite sum.
    """
    from scipy import fft

    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
        raise InputError(f"psf must be a square stamp of odd size, got shape {psf.shape}")
    total = float(psf.sum())
    if not (math.isfinite(total) and total > 0):
        raise InputError("psf must have a positive finite sum")
    h = psf.shape[0] // 2
    half = 2 * int(radius) + PAD
    m = fft.next_fast_len(2 * (2 * h + half) + 2, real=True)  # no wrap-around
    grid = np.zeros((m, m))
    idx = np.arange(-h, h + 1) % m
    grid[np.ix_(idx, idx)] = psf / total
    spec = np.fft.rfft2(grid)
    full = np.fft.irfft2(spec.real ** 2 + spec.imag ** 2, s=(m, m))
    idx = np.arange(-half, half + 1) % m
    return np.ascontiguousarray(full[np.ix_(idx, idx)])


def _pair_variances(acorr: np.ndarray, dy: float, dx: float, amp0: float,
                    amp1: float) -> np.ndarray:
    """Variances of the two amplitudes for unit white noise, with both positions free.

    The Fisher matrix of (a_0, a_1, p_0, p_1) for ``a_k P(x - p_k)`` is made of the
    autocorrelation A of P and its derivatives at the separation ``p_0 - p_1 =
    (dy, dx)`` and at 0: ``<P_k, P_l> = A``, ``<P_k, d P_l> = A'``,
    ``<d P_k, d P_l> = -A''``, times the amplitudes for each position derivative.
    Close pairs trade flux between them as they move: at 3 px for a FWHM of
    4 px the amplitudes' errors are ~1.7 times those at fixed positions.
    """
    c = acorr.shape[0] // 2
    h = 0.1

    def at(y, x):
        return nk._bicubic(acorr, c + y, c + x)

    def derivs(y, x):
        v = at(y, x)
        g = np.array([(at(y + h, x) - at(y - h, x)) / (2 * h),
                      (at(y, x + h) - at(y, x - h)) / (2 * h)])
        hyy = (at(y + h, x) - 2 * v + at(y - h, x)) / h ** 2
        hxx = (at(y, x + h) - 2 * v + at(y, x - h)) / h ** 2
        hxy = (at(y + h, x + h) - at(y + h, x - h) - at(y - h, x + h)
               + at(y - h, x - h)) / (4 * h * h)
        return v, g, np.array([[hyy, hxy], [hxy, hxx]])

    a00, _, h00 = derivs(0.0, 0.0)
    a01, g01, h01 = derivs(dy, dx)
    fisher = np.zeros((6, 6))
    # amplitudes
    fisher[0, 0] = fisher[1, 1] = a00
    fisher[0, 1] = fisher[1, 0] = a01
    # amplitude k with position l (<P(x - p_k), d/dp_l a_l P(x - p_l)>)
    fisher[0, 4:6] = fisher[4:6, 0] = -amp1 * g01
    fisher[1, 2:4] = fisher[2:4, 1] = amp0 * g01   # A'(p_1 - p_0) = -A'(p_0 - p_1)
    # positions
    fisher[2:4, 2:4] = -amp0 * amp0 * h00
    fisher[4:6, 4:6] = -amp1 * amp1 * h00
    fisher[2:4, 4:6] = -amp0 * amp1 * h01
    fisher[4:6, 2:4] = -amp0 * amp1 * h01.T
    try:
        cov = np.linalg.inv(fisher)
    except np.linalg.LinAlgError:
        return np.array([np.inf, np.inf])
    var = np.diag(cov)[:2]
    return np.where(var > 0, var, np.inf)


def split_blends(cands: Table, s, psf_d: np.ndarray, f_d: float, *,
                 origin: tuple[int, int], radius: int, threshold: float,
                 mask: np.ndarray | None = None, exclude: int = 0,
                 acorr: np.ndarray | None = None) -> Table:
    """Replace candidates that are two point sources by the two.

    Parameters
    ----------
    cands : Table
        Candidates of one tile (:func:`~zogy_stream.catalog.find_candidates`),
        with ``x``, ``y`` (image pixels), ``x_peak``, ``y_peak``, ``scorr``,
        ``flux``, ``flux_err``, ``sign``.
    s : ndarray or sliceable
        S (eq. 17) on an area whose ``[0, 0]`` is image pixel ``origin`` (row,
        col), reaching ``radius + PAD`` pixels beyond every candidate's peak to
        be examined (the others are kept as they are); anything with ``shape``
        whose 2-D slices are arrays (only the candidates' windows are read).
    psf_d : ndarray
        P_D, a centred odd stamp (eq. 14).
    f_d : float
        F_D (eq. 15).
    radius : int
        Half size of the window searched around each S_corr peak
        (:func:`blend_radius`).
    threshold : float
        The detection threshold on |S_corr|: each source of a pair must reach it.
    mask : ndarray of int, optional
        Bit flags on ``s``'s pixels (MASK); a window with a pixel of
        ``mask & exclude`` set is left alone.
    exclude : int, optional
        The bits that make a pixel unfit (default none).
    acorr : ndarray, optional
        :func:`psf_autocorrelation` of ``psf_d`` for ``radius``, if already made.

    Returns
    -------
    Table
        ``cands`` itself or a new table, with a ``blend`` column (0: one
        source; the two rows of a split pair carry the same number, unique
        within the table), a split candidate's row replaced by two: ``x``, ``y`` fitted, ``flux`` =
        amplitude / F_D, ``flux_err`` its error scaled to the candidate's
        FLUX_ERR, ``scorr`` flux over error on the scale of the candidate's
        S_corr.  ``x_peak``, ``y_peak`` and the other columns stay the peak's.

    Raises
    ------
    InputError
        ``f_d`` not positive, ``radius`` below 1 or ``mask`` not of ``s``'s shape.
    """
    n = len(cands)
    out = cands
    out["blend"] = np.zeros(n, np.int32)
    sc_all = np.asarray(out["scorr"], float) if n else np.zeros(0)
    todo = np.nonzero(np.abs(sc_all) >= math.sqrt(2.0) * threshold)[0]
    if todo.size == 0:  # two sources each at the threshold add up to more than this
        return out
    if not (math.isfinite(f_d) and f_d > 0):
        raise InputError(f"f_d must be positive, got {f_d}")
    if int(radius) < 1:
        raise InputError(f"radius must be >= 1, got {radius}")
    r = int(radius)
    shape = tuple(s.shape)
    if mask is not None and np.shape(mask) != shape:
        raise InputError(f"mask must have the shape of s {shape}, got {np.shape(mask)}")
    if acorr is None:
        acorr = psf_autocorrelation(psf_d, r)
    a0 = float(acorr[acorr.shape[0] // 2, acorr.shape[1] // 2])
    min_sep = max(MIN_SEPARATION, MIN_SEPARATION_FWHM * psf_fwhm(np.asarray(psf_d, float)))
    cx, cy = np.asarray(out["x"], float), np.asarray(out["y"], float)
    ypk = np.asarray(out["y_peak"], np.int64) - origin[0]
    xpk = np.asarray(out["x_peak"], np.int64) - origin[1]
    sgn = np.asarray(out["sign"], float)
    fl, fe = np.asarray(out["flux"], float), np.asarray(out["flux_err"], float)
    rows, group = [], 0
    thr2 = float(threshold) ** 2
    e = r + PAD
    for k in todo.tolist():
        sc = float(sc_all[k])
        i, j = int(ypk[k]), int(xpk[k])
        if i - e < 0 or j - e < 0 or i + e + 1 > shape[0] or j + e + 1 > shape[1]:
            continue
        if mask is not None and (mask[i - r:i + r + 1, j - r:j + r + 1] & exclude).any():
            continue  # masked pixels in the window: keep the candidate as found
        # another candidate within reach of the window: its light is in it, and a
        # second source could be that; leave both as found
        near = (cx - (j + origin[1])) ** 2 + (cy - (i + origin[0])) ** 2 <= (2 * r + 1) ** 2
        if int(near.sum()) > 1:
            continue
        sign, flux, err = float(sgn[k]), float(fl[k]), float(fe[k])
        if not (err > 0 and flux != 0 and math.isfinite(flux) and math.isfinite(err)):
            continue
        win = s[i - e:i + e + 1, j - e:j + e + 1]
        win = np.ascontiguousarray(win, dtype=np.float64) / f_d
        # D's noise there relative to unit (source noise, the S_corr noise factor):
        # a lone source's amplitude error is 1/sqrt(A0) in unit noise; never taken
        # below 1 (a noise factor < 1 would make splitting easier: not trusted)
        kappa = max(err * f_d * math.sqrt(a0), 1.0)
        corr = sc / (flux / err)  # S_corr against FLUX/FLUX_ERR (astrometric, model terms)
        g1, g2, y0, x0, y1, x1, amp0, amp1, resid = nk._blend_fit(win, e, e, r, sign, acorr,
                                                                   min_sep ** 2)
        if (g2 < 0 or (g2 - g1) / kappa ** 2 < thr2 + SHAPE_PRECISION * g1 / kappa ** 2
                or resid / kappa > RESID_NSIGMA
                or math.hypot(y1 - y0, x1 - x0) < min_sep + LIMIT_MARGIN):
            continue
        amps = np.array([amp0, amp1])
        errs = np.sqrt(_pair_variances(acorr, y0 - y1, x0 - x1, amp0, amp1)) * kappa
        snr = amps / errs * abs(corr)
        if not np.all(snr >= threshold):
            continue
        group += 1
        for c, (yy, xx) in enumerate(((y0, x0), (y1, x1))):
            row = {name: out[name][k] for name in out.colnames}
            row.update(x=float(xx - e + j + origin[1]), y=float(yy - e + i + origin[0]),
                       flux=float(sign * amps[c] / f_d), flux_err=float(errs[c] / f_d),
                       scorr=float(sign * snr[c]), blend=group)
            rows.append((k, row))
        log.debug("candidate at (%.1f, %.1f), S_corr %.1f: two sources %.1f px apart, "
                  "S/N %.1f and %.1f; chi2 gain %.1f over one (kappa %.2f, residual %.1f, "
                  "closest allowed %.2f px)", cx[k], cy[k], sc, math.hypot(y1 - y0, x1 - x0),
                  snr[0], snr[1], (g2 - g1) / kappa ** 2, kappa, resid / kappa, min_sep)
    if not rows:
        return out
    split = sorted({k for k, _ in rows})
    keep = out[np.setdiff1d(np.arange(n), split)]
    new = Table(rows=[[row[c] for c in out.colnames] for _, row in rows], names=out.colnames,
                dtype=[out[c].dtype for c in out.colnames])
    res = vstack([keep, new], metadata_conflicts="silent")
    res.meta = out.meta
    return res
