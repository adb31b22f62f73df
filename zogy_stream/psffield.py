"""A PSF that varies linearly across the field, fitted to every PSF star at once.

PSFEx's approach at degree 1: the normalised, re-centred star stamps of
:func:`zogy_stream.stars.estimate_psf` are regressed, pixel by pixel, on the
stars' positions, ``stamp_i(p) = a(p) + b(p) u_i + c(p) v_i``, with
``(u, v)`` the position relative to the stars' mean in units of the image's
half-size.  A tile then takes ``a + b u + c v`` at its centre: its PSF comes
from all the stars of the image, where a stack of the few stars in its own
window is noisy.  The gradient terms are kept only when they are significant
(a chi-square test over the PSF core), so a constant PSF stays the plain
stack; positions are clamped to the range the stars cover (no extrapolation).

Pure arrays in, arrays out; no I/O.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PsfField", "fit_psf_field", "FIELD_MIN_STARS"]

log = logging.getLogger(__name__)

#: fewest PSF stars for a field-varying model (three coefficients per pixel)
FIELD_MIN_STARS = 20
#: outliers of a pixel's regression beyond this many robust sigmas are left out
_CLIP = 4.0
#: the gradient terms are kept when their chi-square over the core exceeds its
#: expectation by this many standard deviations
_SIGNIFICANCE = 5.0


@dataclass(frozen=True, eq=False)
class PsfField:
    """``a + b u + c v``: the PSF at ``u = (x - x0) / scale``, ``v = (y - y0) / scale``.

    ``a`` is the cleaned stack at the stars' mean position; ``b`` and ``c``
    (tapered to zero at the stack's noise radius) its gradients.  Picklable.
    """

    a: np.ndarray = field(repr=False)
    b: np.ndarray = field(repr=False)
    c: np.ndarray = field(repr=False)
    x0: float = 0.0
    y0: float = 0.0
    scale: float = 1.0
    #: the range of the stars' (u, v): evaluation is clamped to it
    u_range: tuple = (0.0, 0.0)
    v_range: tuple = (0.0, 0.0)
    n_stars: int = 0

    @property
    def size(self) -> int:
        return int(self.a.shape[0])

    def at(self, x: float, y: float) -> np.ndarray:
        """The unit-sum PSF at image position ``(x, y)`` (0-based pixels), centred."""
        from .stars import _recentre

        u = float(np.clip((x - self.x0) / self.scale, *self.u_range))
        v = float(np.clip((y - self.y0) / self.scale, *self.v_range))
        psf = np.clip(self.a + u * self.b + v * self.c, 0, None)
        if not psf.sum() > 0:  # (a is the cleaned, unit-sum stack: never empty)
            psf = np.clip(self.a, 0, None)
        psf, _, _ = _recentre(psf / psf.sum(), tolerance=0.02)
        return psf


def _pad_stamps(stamps: np.ndarray, size: int) -> np.ndarray:
    n = stamps.shape[-1]
    if n == size:
        return stamps
    out = np.zeros((len(stamps), size, size))
    h = min(n, size) // 2
    c, cn = size // 2, n // 2
    out[:, c - h:c + h + 1, c - h:c + h + 1] = stamps[:, cn - h:cn + h + 1, cn - h:cn + h + 1]
    return out


def _solve(design: np.ndarray, y: np.ndarray, w: np.ndarray):
    """Weighted least squares per pixel: ``design`` (N, 3), ``y`` and ``w`` (N, P)."""
    m = np.einsum("ip,ij,ik->pjk", w, design, design)
    rhs = np.einsum("ip,ij,ip->pj", w, design, y)
    # singular pixels (every star clipped) fall back to a ridge of the diagonal
    m += 1e-12 * np.trace(m, axis1=1, axis2=2)[:, None, None] * np.eye(3)
    coef = np.linalg.solve(m, rhs[..., None])[..., 0]
    return coef.T, m


def fit_psf_field(stamps, x, y, *, fwhm: float, half_size: float,
                  min_stars: int = FIELD_MIN_STARS) -> PsfField | None:
    """Fit a linearly varying PSF to normalised, centred star stamps.

    Parameters
    ----------
    stamps : array_like, shape (N, n, n)
        The stars' stamps, each normalised to unit flux (as stacked by
        :func:`zogy_stream.stars.estimate_psf`), odd ``n``.
    x, y : array_like, shape (N,)
        The stars' positions in one image frame.
    fwhm : float
        FWHM of the stars in pixels (core of the significance test, wing fit).
    half_size : float
        Half the image's extent in pixels: the unit of ``u`` and ``v``.
    min_stars : int, optional
        Fewest stars for a fit.

    Returns
    -------
    PsfField or None
        None when there are too few stars, they do not span the field, or
        the variation is not significant (the plain stack is then as good).

    Raises
    ------
    InputError
        Shapes that do not agree.
    """
    from .errors import InputError
    from .stars import _clean_wings, wing_taper

    stamps = np.asarray(stamps, np.float64)
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if stamps.ndim != 3 or stamps.shape[1] != stamps.shape[2] or stamps.shape[1] % 2 == 0 \
            or len(x) != len(stamps) or len(y) != len(stamps):
        raise InputError(f"stamps must be (N, n, n) with odd n and x, y of length N; got "
                         f"{stamps.shape}, {x.shape}, {y.shape}")
    n_st, n = len(stamps), stamps.shape[1]
    if n_st < min_stars or not half_size > 0:
        return None
    x0, y0, scale = float(x.mean()), float(y.mean()), float(half_size)
    u, v = (x - x0) / scale, (y - y0) / scale
    # a lever arm of under a tenth of the field cannot show a variation worth a model
    if max(np.ptp(u), np.ptp(v)) < 0.1:
        return None
    design = np.column_stack([np.ones(n_st), u, v])
    flat = stamps.reshape(n_st, -1)
    w = np.ones_like(flat)
    try:
        for _ in range(2):  # clip each pixel's outliers (neighbours, cosmic rays), refit
            coef, m = _solve(design, flat, w)
            resid = flat - design @ coef
            sig = 1.4826 * np.median(np.abs(resid), axis=0)
            sig = np.maximum(sig, 1e-3 * max(float(np.abs(coef[0]).max()), 1e-30))
            w = (np.abs(resid) <= _CLIP * sig).astype(np.float64)
        coef, m = _solve(design, flat, w)
        cov = np.linalg.inv(m)
    except np.linalg.LinAlgError:  # degenerate positions: no gradient can be fitted
        return None
    resid = flat - design @ coef
    dof = np.maximum(w.sum(axis=0) - 3, 1)
    s2 = (w * resid ** 2).sum(axis=0) / dof
    cov = cov * s2[:, None, None]
    a, b, c = (coef[k].reshape(n, n) for k in range(3))
    err = np.sqrt(cov[:, 0, 0]).reshape(n, n)
    eb = np.sqrt(cov[:, 1, 1]).reshape(n, n)
    ec = np.sqrt(cov[:, 2, 2]).reshape(n, n)

    cc = n // 2
    yy, xx = np.indices((n, n))
    r = np.hypot(xx - cc, yy - cc)
    core = r <= max(1.5 * fwhm, 2.0)
    k = int(core.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = float(np.nansum((b[core] / eb[core]) ** 2 + (c[core] / ec[core]) ** 2))
    limit = 2 * k + _SIGNIFICANCE * math.sqrt(4 * k)
    if not chi2 > limit:
        log.debug("PSF variation across the field not significant (chi2 %.0f <= %.0f)",
                  chi2, limit)
        return None
    a_clean, r_cut = _clean_wings(a, err, fwhm)
    taper = wing_taper(n, r_cut)  # the gradients end where the stack's wings do
    total = a_clean.sum()
    if not total > 0:
        return None
    out = PsfField(a_clean / total, taper * b / total, taper * c / total, x0=x0, y0=y0,
                   scale=scale, u_range=(float(u.min()), float(u.max())),
                   v_range=(float(v.min()), float(v.max())), n_stars=n_st)
    log.debug("PSF varies across the field: chi2 %.0f > %.0f over %d core pixels, %d stars",
              chi2, limit, k, n_st)
    return out
