"""Seeded simulator of new/reference image pairs for tests, demos and benchmarks.

A scene is a pair of images of the same field: the reference and the new image share the
same stars and galaxies (the new one scaled by ``flux_ratio``, optionally misregistered by a
sub-pixel ``shift`` and seen through a different PSF), and only the new image contains the
transients.  Both images include the sky and Gaussian noise with the variance of the model,
``model/gain + (read_noise/gain)**2``.

Everything is rendered row band by row band (:func:`_render_band`), so the in-memory
:func:`make_scene` and the flat-memory :func:`write_scene` share one code path and give the
same pixels.  The noise of every image row comes from its own random stream, seeded from
``(seed, image, row)``, so the output does not depend on the band height either.

Conventions: arrays are indexed ``[y, x]``; catalogue positions are 0-based pixel
coordinates with ``x`` the column; fluxes are in ADU of the reference image (the new image
holds ``flux_ratio * flux``).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numba import njit

from .errors import ConfigError

__all__ = [
    "gaussian_psf",
    "moffat_psf",
    "background_fs",
    "Scene",
    "make_scene",
    "write_scene",
    "default_psf_size",
]

_KINDS = {"gaussian": 0, "moffat": 1}
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_GALAXY_RADII = 7.0  # galaxy stamps extend this many scale lengths from the centre


# --------------------------------------------------------------------------- argument checks
def _check(ok, name, value, requirement):
    if not ok:
        raise ConfigError(f"{name} must be {requirement}, got {value!r}")


def _positive(name, value, *, allow_zero=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    _check(math.isfinite(v) and (v >= 0 if allow_zero else v > 0), name, value,
           "a finite number " + (">= 0" if allow_zero else "> 0"))
    return v


def _count(name, value, *, minimum=0):
    _check(isinstance(value, (int, np.integer)) and not isinstance(value, bool)
           and value >= minimum, name, value, f"an integer >= {minimum}")
    return int(value)


def _pair(name, value):
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair of numbers, got {value!r}") from None
    _check(math.isfinite(a) and math.isfinite(b), name, value, "a pair of finite numbers")
    return a, b


def _range(name, value):
    lo, hi = _pair(name, value)
    _check(0 < lo <= hi, name, value, "a pair (low, high) with 0 < low <= high")
    return lo, hi


def default_psf_size(fwhm):
    """Default side of a PSF stamp: the odd integer at or above ``6 * fwhm``, at least 15."""
    return max(15, int(math.ceil(6.0 * fwhm)) | 1)


# --------------------------------------------------------------------------- PSF stamps
@njit(cache=True, nogil=True)
def _stamp(kind, fwhm, beta, dy, dx, oversample, out):
    """Pixel-integrated unit-sum profile centred at ``(size//2 + dy, size//2 + dx)`` into ``out``.

    Each pixel is the mean of ``oversample**2`` samples on a regular sub-grid; the Gaussian is
    separable, so it is built from two 1-D profiles (identical to the 2-D sum up to rounding).
    """
    size = out.shape[0]
    c = size // 2
    n = oversample
    if kind == 0:
        sigma = fwhm / 2.3548200450309493
        py = np.zeros(size)
        px = np.zeros(size)
        for i in range(size):
            for k in range(n):
                u = i - c + (k + 0.5) / n - 0.5
                py[i] += math.exp(-0.5 * ((u - dy) / sigma) ** 2)
                px[i] += math.exp(-0.5 * ((u - dx) / sigma) ** 2)
        py /= py.sum()
        px /= px.sum()
        for i in range(size):
            for j in range(size):
                out[i, j] = py[i] * px[j]
    else:
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        u2 = np.empty(size * n)  # squared sub-sample coordinates in units of alpha
        v2 = np.empty(size * n)
        for i in range(size):
            for k in range(n):
                w = i - c + (k + 0.5) / n - 0.5
                u2[i * n + k] = ((w - dx) / alpha) ** 2
                v2[i * n + k] = ((w - dy) / alpha) ** 2
        ib = int(beta)  # integer and half-integer beta avoid the (slow) general pow
        half = beta - ib == 0.5
        general = beta != ib and not half
        total = 0.0
        for i in range(size):
            for j in range(size):
                s = 0.0
                for k in range(i * n, i * n + n):
                    for m in range(j * n, j * n + n):
                        t = 1.0 / (1.0 + u2[m] + v2[k])
                        if general:
                            s += t**beta
                        elif half:
                            s += t**ib * math.sqrt(t)
                        else:
                            s += t**ib
                out[i, j] = s
                total += s
        out /= total


@njit(cache=True, nogil=True)
def _elliptical(profile, scale_a, scale_b, beta, theta, dy, dx, oversample, out):
    """Unit-sum, pixel-averaged elliptical profile centred at ``size//2 + (dy, dx)``.

    ``r`` is the elliptical radius with scales ``scale_a`` along the major axis (at
    angle ``theta`` from +x) and ``scale_b`` along the minor one; ``profile`` 0 is a
    Gaussian ``exp(-r^2 / 2)``, 1 a Moffat ``(1 + r^2)^-beta``, 2 an exponential disc
    ``exp(-r)``.  Each pixel is the mean of ``oversample**2`` sub-samples.
    """
    size = out.shape[0]
    c = size // 2
    n = oversample
    ct, st = math.cos(theta), math.sin(theta)
    ia2, ib2 = 1.0 / (scale_a * scale_a), 1.0 / (scale_b * scale_b)
    total = 0.0
    for i in range(size):
        for j in range(size):
            s = 0.0
            for k in range(n):
                v = i - c + (k + 0.5) / n - 0.5 - dy
                for m in range(n):
                    u = j - c + (m + 0.5) / n - 0.5 - dx
                    a = u * ct + v * st
                    b = v * ct - u * st
                    r2 = a * a * ia2 + b * b * ib2
                    if profile == 0:
                        s += math.exp(-0.5 * r2)
                    elif profile == 1:
                        s += (1.0 + r2) ** -beta
                    else:
                        s += math.exp(-math.sqrt(r2))
            out[i, j] = s
            total += s
    out /= total


@njit(cache=True, nogil=True)
def _stamp_elliptical(kind, fwhm, beta, q, theta, dy, dx, oversample, out):
    """As :func:`_stamp`, elongated: axis ratio ``q`` (minor / major, <= 1), major axis
    at angle ``theta`` (radians) from +x, and FWHM ``fwhm / sqrt(q)`` along the major
    axis and ``fwhm * sqrt(q)`` along the minor one (the area of the circular profile)."""
    if kind == 0:
        scale = fwhm / 2.3548200450309493
    else:
        scale = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    root = math.sqrt(q)
    _elliptical(kind, scale / root, scale * root, beta, theta, dy, dx, oversample, out)


@njit(cache=True, nogil=True)
def _stamp_any(kind, fwhm, beta, q, theta, dy, dx, oversample, out):
    """:func:`_stamp` when ``q == 1`` (circular), else :func:`_stamp_elliptical`."""
    if q == 1.0:
        _stamp(kind, fwhm, beta, dy, dx, oversample, out)
    else:
        _stamp_elliptical(kind, fwhm, beta, q, theta, dy, dx, oversample, out)


def _psf(kind, fwhm, beta, size, offset, oversample):
    fwhm = _positive("fwhm", fwhm)
    beta = _positive("beta", beta)
    _check(beta > 1.0, "beta", beta, "> 1")
    size = default_psf_size(fwhm) if size is None else _count("size", size, minimum=1)
    _check(size % 2 == 1, "size", size, "odd")
    dy, dx = _pair("offset", offset)
    oversample = _count("oversample", oversample, minimum=1)
    out = np.empty((size, size))
    _stamp(_KINDS[kind], fwhm, beta, dy, dx, oversample, out)
    return out


def gaussian_psf(fwhm, *, size=None, offset=(0.0, 0.0), oversample=5):
    """Pixel-integrated circular Gaussian PSF on an odd square grid.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum in pixels.
    size : int, optional
        Odd side of the stamp; default :func:`default_psf_size` (about 6 FWHM, at least 15).
    offset : (float, float), optional
        Sub-pixel shift ``(offset_y, offset_x)`` of the profile centre from the central pixel
        ``size//2``, in array order ``[y, x]``.
    oversample : int, optional
        Sub-samples per pixel and axis used to integrate the profile over each pixel.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float64 array with unit sum.  A star rendered by the simulator at an
        integer position has exactly this shape (times its flux).
    """
    return _psf("gaussian", fwhm, 3.0, size, offset, oversample)


def moffat_psf(fwhm, *, beta=3.0, size=None, offset=(0.0, 0.0), oversample=5):
    """Pixel-integrated circular Moffat PSF ``(1 + r²/a²)**-beta`` on an odd square grid.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum in pixels.
    beta : float, optional
        Moffat power index (> 1); smaller means broader wings.
    size, offset, oversample
        As in :func:`gaussian_psf`.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float64 array with unit sum (the wings beyond the stamp are dropped).
    """
    return _psf("moffat", fwhm, beta, size, offset, oversample)


def background_fs(new_psf, ref_psf, sigma_new, sigma_ref, flux_ratio=1.0):
    """Background-only ZOGY flux normalisation ``F_S`` (paper eq. 42, with ``F_r = 1``).

    Parameters
    ----------
    new_psf, ref_psf : numpy.ndarray
        Unit-sum PSF stamps with odd sides (they may differ in size).
    sigma_new, sigma_ref : float
        Background noise standard deviation of each image in ADU.
    flux_ratio : float, optional
        ``F_n``, the flux of a source in the new image per unit flux in the reference.

    Returns
    -------
    float
        ``F_S``; a point source of reference flux ``f`` is detected in ``S`` with
        signal-to-noise ``f * sqrt(F_S)``.  Infinite if both sigmas are zero.
    """
    sn = _positive("sigma_new", sigma_new, allow_zero=True)
    sr = _positive("sigma_ref", sigma_ref, allow_zero=True)
    fn = _positive("flux_ratio", flux_ratio)
    psfs = [np.asarray(p, dtype=float) for p in (new_psf, ref_psf)]
    for name, p in zip(("new_psf", "ref_psf"), psfs):
        _check(p.ndim == 2 and p.shape[0] % 2 == 1 and p.shape[1] % 2 == 1,
               name, p.shape, "a 2-D array with odd sides")
    if sn == 0 and sr == 0:
        return math.inf  # noise-free images: any source has infinite S/N
    pad = max(64, *(max(p.shape) for p in psfs))
    pn, pr = (np.abs(np.fft.fft2(_centre_at_origin(p, pad))) ** 2 for p in psfs)
    delta = sn**2 * pr + sr**2 * fn**2 * pn
    num = fn**2 * pn * pr
    ratio = np.divide(num, delta, out=np.zeros_like(num), where=delta > 0)
    return float(ratio.mean())


def _centre_at_origin(psf, pad):
    out = np.zeros((pad, pad))
    out[: psf.shape[0], : psf.shape[1]] = psf
    return np.roll(out, (-(psf.shape[0] // 2), -(psf.shape[1] // 2)), axis=(0, 1))


# --------------------------------------------------------------------------- rendering kernels
@njit(cache=True, nogil=True)
def _add_points(band, y0, xs, ys, fluxes, fwhms, kind, beta, oversample, stamp, q=1.0,
                theta=0.0):
    """Add point sources (sorted by y) whose stamps overlap ``band`` (rows ``y0`` ...);
    ``q``, ``theta``: the PSF's axis ratio and major-axis angle (:func:`_stamp_any`)."""
    size = stamp.shape[0]
    h = size // 2
    nrows, ncols = band.shape
    for s in range(xs.size):
        ix = int(math.floor(xs[s] + 0.5))
        iy = int(math.floor(ys[s] + 0.5))
        if iy + h < y0 or iy - h >= y0 + nrows or ix + h < 0 or ix - h >= ncols:
            continue
        _stamp_any(kind, fwhms[s], beta, q, theta, ys[s] - iy, xs[s] - ix, oversample, stamp)
        for i in range(size):
            r = iy - h + i - y0
            if r < 0 or r >= nrows:
                continue
            for j in range(size):
                c = ix - h + j
                if 0 <= c < ncols:
                    band[r, c] += fluxes[s] * stamp[i, j]


@njit(cache=True, nogil=True)
def _disc(scale, q, theta, dy, dx, oversample, out):
    """Unit-sum, pixel-averaged elliptical exponential disc centred at ``size//2 + (dy, dx)``."""
    _elliptical(2, scale, q * scale, 1.0, theta, dy, dx, oversample, out)


def _fft_convolve(a, b):
    """Full linear convolution of two real 2-D arrays (odd sides keep the centre central)."""
    shape = [sa + sb - 1 for sa, sb in zip(a.shape, b.shape)]
    fa = np.fft.rfft2(a, shape)
    return np.fft.irfft2(fa * np.fft.rfft2(b, shape), shape)


# --------------------------------------------------------------------------- scene plan
class _Galaxy(NamedTuple):
    iy: int  # central pixel
    ix: int
    dy: float  # sub-pixel offset of the centre
    dx: float
    scale: float
    q: float
    theta: float
    flux: float  # in this image's ADU
    fwhm: float  # local PSF FWHM


@dataclass(frozen=True, eq=False)
class _Image:
    """Everything needed to render one image of the pair, band by band."""

    stream: int  # noise stream id
    sky: float
    sky_gradient: float  # fractional sky change, as fwhm_variation's
    xs: np.ndarray  # point sources, sorted by y
    ys: np.ndarray
    fluxes: np.ndarray
    fwhms: np.ndarray
    galaxies: list[_Galaxy]
    q: float = 1.0  # PSF axis ratio
    theta: float = 0.0  # PSF major-axis angle from +x, radians


@dataclass(frozen=True, eq=False)
class _Plan:
    shape: tuple
    seed: int
    kind: int
    beta: float
    size: int
    oversample: int
    gain: float
    read_noise: float
    saturation: float | None
    new: _Image
    ref: _Image


@dataclass(frozen=True, eq=False)
class Scene:
    """A simulated new/reference pair with its truth.

    Attributes
    ----------
    new, ref : numpy.ndarray
        float32 images in ADU, sky included.
    new_var, ref_var : numpy.ndarray
        float32 true (noise-free model) per-pixel variances in ADU².
    new_psf, ref_psf : numpy.ndarray
        float64 unit-sum PSFs at the image centre (same odd shape for both images).
    transients : astropy.table.Table
        ``x, y`` (0-based, new-image pixels), ``flux`` (reference ADU; the new image holds
        ``flux_new = flux_ratio * flux``), ``expected_snr = flux * sqrt(F_S)``, ``fwhm``
        (local new FWHM) and ``host`` (row in ``galaxies`` or -1).
    stars : astropy.table.Table
        ``x, y`` in the reference image (the new image has them at ``x + dx, y + dy``) and
        ``flux`` in reference ADU.
    galaxies : astropy.table.Table
        ``x, y, flux, scale, q, theta``: elliptical exponential discs (scale length and
        axis ratio before PSF convolution, ``theta`` the major-axis angle from +x); may be empty.
    meta : dict
        ``sky_new, sky_ref, gain, read_noise, flux_ratio, sigma_new, sigma_ref, saturation,
        shift, seed`` plus ``fs, psf, beta, new_fwhm, ref_fwhm, fwhm_variation``.
    """

    new: np.ndarray
    ref: np.ndarray
    new_var: np.ndarray
    ref_var: np.ndarray
    new_psf: np.ndarray
    ref_psf: np.ndarray
    transients: Table
    stars: Table
    galaxies: Table
    meta: dict


def _plan(shape, *, seed=0, n_stars=None, star_density=1500.0, star_flux=(5.0, 5e5),
          n_transients=20, transient_snr=(5.0, 50.0), n_galaxies=0, galaxy_flux=(1e3, 1e5),
          new_fwhm=4.0, ref_fwhm=3.0, psf="gaussian", beta=3.0, fwhm_variation=0.0,
          psf_size=None, oversample=5, flux_ratio=1.0, sky_new=1000.0, sky_ref=1000.0,
          gain=1.0, read_noise=5.0, saturation=None, shift=(0.0, 0.0), edge=20,
          transient_on_galaxy_fraction=0.3, blank=False, new_axis_ratio=1.0,
          ref_axis_ratio=1.0, new_angle=0.0, ref_angle=0.0, sky_gradient=0.0):
    """Validate the options, draw the catalogues and return ``(plan, tables, meta, psfs)``."""
    try:
        ny, nx = (int(s) for s in shape)
        ok = len(shape) == 2 and ny == shape[0] and nx == shape[1] and ny > 0 and nx > 0
    except (TypeError, ValueError):
        ok = False
    _check(ok, "shape", shape, "a pair of positive integers (ny, nx)")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy)
    seed = _count("seed", seed)
    _check(psf in _KINDS, "psf", psf, f"one of {sorted(_KINDS)}")
    beta = _positive("beta", beta)
    _check(beta > 1, "beta", beta, "> 1")
    new_fwhm, ref_fwhm = _positive("new_fwhm", new_fwhm), _positive("ref_fwhm", ref_fwhm)
    var = _positive("fwhm_variation", fwhm_variation, allow_zero=True)
    _check(var < 1, "fwhm_variation", fwhm_variation, "< 1")
    oversample = _count("oversample", oversample, minimum=1)
    flux_ratio = _positive("flux_ratio", flux_ratio)
    sky_new, sky_ref = (_positive(n, v, allow_zero=True)
                        for n, v in (("sky_new", sky_new), ("sky_ref", sky_ref)))
    gain = _positive("gain", gain)
    read_noise = _positive("read_noise", read_noise, allow_zero=True)
    if saturation is not None:
        saturation = _positive("saturation", saturation)
    dx, dy = _pair("shift", shift)
    axis = {}
    for name, q, angle in (("new", new_axis_ratio, new_angle), ("ref", ref_axis_ratio, ref_angle)):
        q = _positive(f"{name}_axis_ratio", q)
        _check(q <= 1, f"{name}_axis_ratio", q, "<= 1 (minor over major axis)")
        _check(isinstance(angle, (int, float, np.integer, np.floating))
               and not isinstance(angle, (bool, np.bool_)) and math.isfinite(angle), f"{name}_angle", angle, "a finite number of degrees")
        axis[name] = (q, math.radians(float(angle)))
    try:
        grad = float(sky_gradient)
    except (TypeError, ValueError):
        grad = math.nan
    _check(abs(grad) < 1, "sky_gradient", sky_gradient, "a number between -1 and 1 (exclusive)")
    widest = max(new_fwhm / math.sqrt(axis["new"][0]), ref_fwhm / math.sqrt(axis["ref"][0]))
    size = (default_psf_size(widest * (1 + var)) if psf_size is None
            else _count("psf_size", psf_size, minimum=1))
    _check(size % 2 == 1, "psf_size", psf_size, "odd")
    edge = _count("edge", edge)
    lo_snr, hi_snr = _range("transient_snr", transient_snr)
    star_flux, galaxy_flux = _range("star_flux", star_flux), _range("galaxy_flux", galaxy_flux)
    frac = _positive("transient_on_galaxy_fraction", transient_on_galaxy_fraction,
                     allow_zero=True)
    _check(frac <= 1, "transient_on_galaxy_fraction", frac, "<= 1")
    if n_stars is None:
        n_stars = int(round(_positive("star_density", star_density, allow_zero=True)
                            * ny * nx / 1e6))
    n_stars, n_transients, n_galaxies = (
        0 if blank else _count(n, v) for n, v in
        (("n_stars", n_stars), ("n_transients", n_transients), ("n_galaxies", n_galaxies)))
    _check(n_transients == 0 or min(ny, nx) > 2 * edge, "edge", edge,
           f"smaller than half the image side {min(ny, nx)} when transients are requested")

    kind = _KINDS[psf]
    sigma_new = math.sqrt(sky_new / gain + (read_noise / gain) ** 2)
    sigma_ref = math.sqrt(sky_ref / gain + (read_noise / gain) ** 2)

    def local_fwhm(fwhm, x, y):  # linear from (1 - var) at pixel (0, 0) to (1 + var) far corner
        t = np.asarray(x) / max(nx - 1, 1) + np.asarray(y) / max(ny - 1, 1)
        return fwhm * (1.0 + var * (t - 1.0))

    centre_x, centre_y = (nx - 1) / 2, (ny - 1) / 2
    psfs = {}
    for name, fwhm in (("new", new_fwhm), ("ref", ref_fwhm)):
        psfs[name] = np.empty((size, size))
        _stamp_any(kind, float(local_fwhm(fwhm, centre_x, centre_y)), beta, *axis[name],
                   0.0, 0.0, oversample, psfs[name])
    fs = background_fs(psfs["new"], psfs["ref"], sigma_new, sigma_ref, flux_ratio)

    def rng(k):  # independent catalogue streams: changing one count leaves the others alone
        return np.random.default_rng([seed, 0, k])

    # stars: uniform positions, power-law fluxes N(>F) ~ F**-1.5 between star_flux bounds
    r = rng(0)
    sx, sy = r.uniform(-0.5, nx - 0.5, n_stars), r.uniform(-0.5, ny - 0.5, n_stars)
    g = 1.5
    lo, hi = star_flux
    sflux = lo * (1 - r.random(n_stars) * (1 - (lo / hi) ** g)) ** (-1 / g)
    stars = Table({"x": sx, "y": sy, "flux": sflux})

    r = rng(1)
    galaxies = Table({
        "x": r.uniform(-0.5, nx - 0.5, n_galaxies), "y": r.uniform(-0.5, ny - 0.5, n_galaxies),
        "flux": np.exp(r.uniform(*np.log(galaxy_flux), n_galaxies)),
        "scale": r.uniform(2.0, 8.0, n_galaxies), "q": r.uniform(0.3, 1.0, n_galaxies),
        "theta": r.uniform(0.0, np.pi, n_galaxies)})

    r = rng(2)
    snr = np.exp(r.uniform(math.log(lo_snr), math.log(hi_snr), n_transients))
    tx = r.uniform(edge, nx - 1 - edge, n_transients)
    ty = r.uniform(edge, ny - 1 - edge, n_transients)
    host = np.full(n_transients, -1)
    inside = np.flatnonzero((galaxies["x"] >= edge) & (galaxies["x"] <= nx - 1 - edge)
                            & (galaxies["y"] >= edge) & (galaxies["y"] <= ny - 1 - edge))
    n_host = int(round(frac * n_transients)) if inside.size else 0
    if n_host:
        host[:n_host] = r.choice(inside, n_host)
        g_ = galaxies[host[:n_host]]
        off = r.normal(size=(2, n_host)) * np.asarray(g_["scale"])
        tx[:n_host] = np.clip(g_["x"] + dx + off[0], edge, nx - 1 - edge)
        ty[:n_host] = np.clip(g_["y"] + dy + off[1], edge, ny - 1 - edge)
    if grad:  # the expected S/N holds for the sky (and noise) where each transient is
        def local_sigma(sky, x, y):
            t = x / max(nx - 1, 1) + y / max(ny - 1, 1)
            return math.sqrt(sky * (1.0 + grad * (t - 1.0)) / gain + (read_noise / gain) ** 2)

        fs_at = np.array([background_fs(psfs["new"], psfs["ref"], local_sigma(sky_new, x, y),
                                        local_sigma(sky_ref, x, y), flux_ratio)
                          for x, y in zip(tx, ty)])
        tflux = snr / np.sqrt(fs_at)
    else:
        tflux = snr / math.sqrt(fs)
    transients = Table({"x": tx, "y": ty, "flux": tflux, "flux_new": flux_ratio * tflux,
                        "expected_snr": snr, "fwhm": local_fwhm(new_fwhm, tx, ty),
                        "host": host})

    def image(which, stream, sky, fwhm, px, py, pflux, gx, gy, gscale):
        order = np.argsort(py, kind="stable")
        gals = []
        for x, y, row in zip(gx, gy, galaxies):
            ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
            gals.append(_Galaxy(iy, ix, y - iy, x - ix, row["scale"], row["q"], row["theta"],
                                row["flux"] * gscale, float(local_fwhm(fwhm, x, y))))
        return _Image(stream, sky, grad, *(np.ascontiguousarray(a[order], dtype=float) for a in
                      (px, py, pflux, local_fwhm(fwhm, px, py))), gals, *axis[which])

    plan = _Plan(
        (ny, nx), seed, kind, beta, size, oversample, gain, read_noise, saturation,
        new=image("new", 1, sky_new, new_fwhm, np.concatenate([sx + dx, tx]),
                  np.concatenate([sy + dy, ty]), flux_ratio * np.concatenate([sflux, tflux]),
                  galaxies["x"] + dx, galaxies["y"] + dy, flux_ratio),
        ref=image("ref", 2, sky_ref, ref_fwhm, sx, sy, sflux, galaxies["x"], galaxies["y"], 1.0))
    meta = dict(sky_new=sky_new, sky_ref=sky_ref, gain=gain, read_noise=read_noise,
                flux_ratio=flux_ratio, sigma_new=sigma_new, sigma_ref=sigma_ref,
                saturation=saturation, shift=(dx, dy), seed=seed, fs=fs, psf=psf, beta=beta,
                new_fwhm=new_fwhm, ref_fwhm=ref_fwhm, fwhm_variation=var,
                new_axis_ratio=axis["new"][0], ref_axis_ratio=axis["ref"][0],
                new_angle=math.degrees(axis["new"][1]), ref_angle=math.degrees(axis["ref"][1]),
                sky_gradient=grad)
    return plan, (transients, stars, galaxies), meta, psfs


def _galaxy_stamp(plan, img, gal):
    """Unit-sum exponential disc convolved with ``img``'s local PSF, centred on its central
    pixel."""
    disc = np.empty((2 * int(math.ceil(_GALAXY_RADII * gal.scale)) + 1,) * 2)
    _disc(gal.scale, gal.q, gal.theta, gal.dy, gal.dx, plan.oversample, disc)
    psf = np.empty((plan.size, plan.size))
    _stamp_any(plan.kind, gal.fwhm, plan.beta, img.q, img.theta, 0.0, 0.0, plan.oversample, psf)
    return _fft_convolve(disc, psf)


def _render_band(plan, img, y0, y1):
    """Return the float32 image and true variance of rows ``y0:y1`` of one image."""
    ny, nx = plan.shape
    if img.sky_gradient:  # linear from (1 - g) at pixel (0, 0) to (1 + g) at the far corner
        t = (np.arange(y0, y1)[:, None] / max(ny - 1, 1) + np.arange(nx) / max(nx - 1, 1))
        model = (img.sky * (1.0 + img.sky_gradient * (t - 1.0))).astype(np.float32)
    else:
        model = np.full((y1 - y0, nx), img.sky, dtype=np.float32)
    h = plan.size // 2
    # point sources are sorted by y: select those whose stamp can reach the band
    iy = np.floor(img.ys + 0.5)
    a, b = np.searchsorted(iy, [y0 - h, y1 + h])
    _add_points(model, y0, img.xs[a:b], img.ys[a:b], img.fluxes[a:b], img.fwhms[a:b],
                plan.kind, plan.beta, plan.oversample, np.empty((plan.size, plan.size)),
                img.q, img.theta)
    for gal in img.galaxies:
        giy, gix = gal.iy, gal.ix
        gh = int(math.ceil(_GALAXY_RADII * gal.scale)) + h
        if giy + gh < y0 or giy - gh >= y1 or gix + gh < 0 or gix - gh >= nx:
            continue
        stamp = _galaxy_stamp(plan, img, gal)
        r0, r1 = max(giy - gh, y0), min(giy + gh + 1, y1)
        c0, c1 = max(gix - gh, 0), min(gix + gh + 1, nx)
        model[r0 - y0:r1 - y0, c0:c1] += (gal.flux * stamp[r0 - giy + gh:r1 - giy + gh,
                                                        c0 - gix + gh:c1 - gix + gh])
    var = model / np.float32(plan.gain)
    var += np.float32((plan.read_noise / plan.gain) ** 2)
    for r in range(y1 - y0):  # one noise stream per row: independent of the band height
        z = np.random.default_rng([plan.seed, img.stream, y0 + r]).standard_normal(
            nx, dtype=np.float32)
        model[r] += np.sqrt(var[r]) * z
    if plan.saturation is not None:
        np.minimum(model, np.float32(plan.saturation), out=model)
    return model, var


def _bands(plan, band):
    """Yield ``(y0, y1, {"new": (image, var), "ref": (image, var)})`` band after band.

    The two images of a band are rendered in two threads (the kernels release the GIL).
    """
    band = _count("band", band, minimum=1)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for y0 in range(0, plan.shape[0], band):
            y1 = min(y0 + band, plan.shape[0])
            futures = {k: pool.submit(_render_band, plan, getattr(plan, k), y0, y1)
                       for k in ("new", "ref")}
            yield y0, y1, {k: f.result() for k, f in futures.items()}


# --------------------------------------------------------------------------- public API
def make_scene(shape=(512, 512), *, seed=0, band=1024, **options):
    """Simulate a new/reference image pair in memory.

    Parameters
    ----------
    shape : (int, int), optional
        Image shape ``(ny, nx)``.
    seed : int, optional
        Seed of every random stream; the same arguments always give the same scene.
    band : int, optional
        Rows rendered at a time (memory only: the output does not depend on it).
    n_stars : int, optional
        Number of stars; default ``star_density`` (1500) per million pixels.
    star_density : float, optional
        Stars per million pixels when ``n_stars`` is None.
    star_flux : (float, float), optional
        Range of the power-law (``N(>F) ~ F**-1.5``) star fluxes in reference ADU,
        default ``(5, 5e5)``.
    n_transients : int, optional
        Number of transients (new image only), default 20.
    transient_snr : (float, float), optional
        Range of the log-uniform expected ZOGY S/N ``flux * sqrt(F_S)``, default ``(5, 50)``;
        ``F_S`` is :func:`background_fs` of the centre PSFs.
    n_galaxies : int, optional
        Number of elliptical exponential-disc galaxies (scale 2-8 px), default 0.
    galaxy_flux : (float, float), optional
        Range of the log-uniform galaxy fluxes in reference ADU, default ``(1e3, 1e5)``.
    new_fwhm, ref_fwhm : float, optional
        PSF FWHM in pixels at the image centre, default 4 and 3.
    psf : {"gaussian", "moffat"}, optional
        PSF profile; ``beta`` (default 3) is the Moffat index.
    fwhm_variation : float, optional
        Fractional linear change of the FWHM across the field: ``x (1 - v)`` at pixel (0, 0),
        ``x 1`` at the centre and ``x (1 + v)`` at the far corner.  Default 0.
    psf_size : int, optional
        Odd stamp side of every source and of the returned PSFs; default about 6 times the
        largest FWHM in the field (at least 15).
    oversample : int, optional
        Sub-samples per pixel and axis of the pixel integration, default 5.
    flux_ratio : float, optional
        Flux of a source in the new image per unit reference flux, default 1.
    sky_new, sky_ref : float, optional
        Sky level in ADU, default 1000.
    gain, read_noise : float, optional
        Gain in e-/ADU (default 1) and read noise in e- (default 5).
    saturation : float, optional
        If set, pixel values above it are clipped to it in both images.
    shift : (float, float), optional
        Misregistration ``(dx, dy)`` in pixels of the stars and galaxies in the new image.
    edge : int, optional
        Minimum distance of transients from the border, default 20.
    transient_on_galaxy_fraction : float, optional
        Fraction of transients placed near a galaxy centre when galaxies exist, default 0.3.
    blank : bool, optional
        If True, no stars, galaxies or transients: sky and noise only.
    new_axis_ratio, ref_axis_ratio : float, optional
        Each PSF's axis ratio (minor over major, in (0, 1]), default 1 (circular); an
        elongated PSF keeps the area of the circular one: FWHM ``fwhm / sqrt(q)`` along its
        major axis and ``fwhm * sqrt(q)`` along the minor one.
    new_angle, ref_angle : float, optional
        Each PSF's major-axis angle from +x in degrees, default 0.
    sky_gradient : float, optional
        Fractional linear change of each sky level across the field, as ``fwhm_variation``
        (``x (1 - g)`` at pixel (0, 0), ``x (1 + g)`` at the far corner); ``|g| < 1``,
        default 0.  Transients' ``expected_snr`` then holds for the sky where each one is.

    Returns
    -------
    Scene

    Raises
    ------
    zogy_stream.errors.ConfigError
        If an option is out of range.
    """
    plan, (transients, stars, galaxies), meta, psfs = _plan(shape, seed=seed, **options)
    out = {k: np.empty(plan.shape, dtype=np.float32) for k in ("new", "ref", "new_var", "ref_var")}
    for y0, y1, bands in _bands(plan, band):
        for name, (image, var) in bands.items():
            out[name][y0:y1], out[name + "_var"][y0:y1] = image, var
    return Scene(**out, new_psf=psfs["new"], ref_psf=psfs["ref"], transients=transients,
                 stars=stars, galaxies=galaxies, meta=meta)


def _header(plan, meta, *, kind, filter_name, bitpix=-32, shape=None):
    ny, nx = plan.shape if shape is None else shape
    hdr = fits.Header()
    hdr["SIMPLE"] = True
    hdr["BITPIX"] = bitpix
    hdr["NAXIS"] = 2
    hdr["NAXIS1"] = nx
    hdr["NAXIS2"] = ny
    hdr["EXTEND"] = True
    hdr["GAIN"] = (meta["gain"], "[e-/ADU] detector gain")
    hdr["RDNOISE"] = (meta["read_noise"], "[e-] read noise")
    if meta["saturation"] is not None:
        hdr["SATURATE"] = (meta["saturation"], "[ADU] saturation level")
    hdr["FILTER"] = filter_name
    hdr["IMAGETYP"] = (kind, "zogy_stream.simulate product")
    hdr["SIMSEED"] = (meta["seed"], "simulation seed")
    if shape is None:  # images: add a simple TAN WCS centred on the frame
        hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
        hdr["CUNIT1"], hdr["CUNIT2"] = "deg", "deg"
        hdr["CRPIX1"], hdr["CRPIX2"] = (nx + 1) / 2, (ny + 1) / 2
        hdr["CRVAL1"], hdr["CRVAL2"] = 150.0, 2.0
        hdr["CDELT1"], hdr["CDELT2"] = -0.27 / 3600, 0.27 / 3600
    which = kind.split("_")[0]
    hdr["SKYLEVEL"] = (meta[f"sky_{which}"], "[ADU] simulated sky level")
    hdr["FWHM"] = (meta[f"{which}_fwhm"], "[pix] PSF FWHM at the centre")
    hdr["FLXRATIO"] = (meta["flux_ratio"] if which == "new" else 1.0, "flux scale vs reference")
    hdr["BUNIT"] = "adu2" if kind.endswith("var") else "adu"
    return hdr


def write_scene(outdir, shape, *, seed=0, band=1024, filter="r", **options):
    """Simulate a scene straight to FITS files with flat memory use.

    The images are rendered ``band`` rows at a time and streamed to disk, so the memory
    needed is a few bands, whatever the image size; the pixels are identical to those of
    :func:`make_scene` with the same arguments.

    Parameters
    ----------
    outdir : str or path-like
        Output directory, created if needed; existing files of the same names are replaced.
    shape : (int, int)
        Image shape ``(ny, nx)``.
    seed : int, optional
        Random seed.
    band : int, optional
        Rows rendered at a time.
    filter : str, optional
        Value of the FILTER keyword.
    **options
        Any other keyword of :func:`make_scene`.

    Returns
    -------
    dict of str to pathlib.Path
        Paths of ``new, ref, new_var, ref_var`` (float32 images with GAIN, RDNOISE, FILTER,
        SATURATE if set, and a TAN WCS), ``new_psf, ref_psf`` (float64 centre PSFs) and
        ``truth`` (``truth.ecsv``, the transients table with the scene meta).
    """
    plan, (transients, _, _), meta, psfs = _plan(shape, seed=seed, **options)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    names = ("new", "ref", "new_var", "ref_var", "new_psf", "ref_psf")
    paths = {k: outdir / f"{k}.fits" for k in names}
    paths["truth"] = outdir / "truth.ecsv"
    for p in paths.values():  # StreamingHDU appends to existing files
        p.unlink(missing_ok=True)
    for name in ("new_psf", "ref_psf"):
        hdr = _header(plan, meta, kind=name, filter_name=filter, bitpix=-64,
                      shape=psfs[name[:3]].shape)
        fits.PrimaryHDU(psfs[name[:3]], header=hdr).writeto(paths[name])
    streams = {k: fits.StreamingHDU(os.fspath(paths[k]),
                                    _header(plan, meta, kind=k, filter_name=filter))
               for k in names[:4]}
    try:
        for _, _, bands in _bands(plan, band):
            for name, (image, var) in bands.items():
                for key, data in ((name, image), (name + "_var", var)):
                    for r in range(0, data.shape[0], 64):  # small byte-swapped copies
                        streams[key].write(data[r:r + 64])
            del bands, image, var, data
    finally:
        for s in streams.values():
            s.close()
    truth = transients.copy()
    truth.meta.update({k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()})
    truth.meta["shape"] = list(plan.shape)
    truth.write(paths["truth"], format="ascii.ecsv", overwrite=True)
    return paths
