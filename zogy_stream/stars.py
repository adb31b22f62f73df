"""Star catalogues and the quantities ZOGY estimates from stars.

Everything here works on one tile or on one whole image:

* :func:`find_stars` -- detection, windowed centroids, aperture photometry and
  star/galaxy/cosmic-ray classification with `sep`;
* :func:`estimate_psf` -- an empirical PSF stacked from bright, isolated,
  unsaturated stars; :func:`fit_psf_model` -- a Moffat fitted to the few
  stars there are when a stack is not possible;
* :func:`psf_photometry` -- PSF-fit fluxes at known positions;
* :func:`match_stars`, :func:`fit_flux_ratio`, :func:`astrometric_sigma`,
  :func:`registration_offset` -- the flux ratio ``F_n / F_r``, the
  registration noise ``(sigma_x, sigma_y)`` and the residual mean offset from
  two catalogues of the same field;
* :func:`measure_psf` -- FWHM and centroid of a PSF array.

Coordinates are 0-based pixels with the centre of pixel ``[0, 0]`` at
``(x, y) = (0, 0)``; ``x`` is the column, ``y`` the row (sep's convention).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import sep
from astropy.stats import mad_std, sigma_clip, sigma_clipped_stats
from astropy.table import Table
from scipy import ndimage

# scipy.optimize and scipy.spatial are imported where used: together ~0.1 s of
# start-up that a run with PSFs given (which only measures them) never needs.

from .errors import InputError, ProcessingError

__all__ = [
    "background_maps",
    "find_stars",
    "estimate_psf",
    "match_stars",
    "fit_flux_ratio",
    "astrometric_sigma",
    "registration_offset",
    "psf_photometry",
    "contaminated_sources",
    "cross_convolved_photometry",
    "fit_psf_model",
    "moffat_image",
    "measure_psf",
    "psf_star_mask",
]

log = logging.getLogger(__name__)

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))  # 2.3548
#: sep flags that make a source unusable for PSF, photometry or astrometry.
_BAD_FLAGS = sep.OBJ_TRUNC | sep.APER_TRUNC | sep.APER_HASMASKED | sep.APER_ALLMASKED \
    | sep.APER_NONPOSITIVE | sep.OBJ_SINGU
_CATALOG_COLUMNS = ("x", "y", "x_err", "y_err", "flux", "flux_err", "snr", "fwhm", "a", "b",
                    "theta", "ellipticity", "peak", "npix", "flag", "isolated", "saturated",
                    "star_like")


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------
def _as_image(image, name: str = "image") -> np.ndarray:
    """Return ``image`` as a C-contiguous native-endian float32/float64 2-D array."""
    arr = np.asarray(image)
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"{name} must be a non-empty 2-D array (got shape {arr.shape}); "
                         "pass one image plane")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or arr.dtype == np.bool_):
        raise InputError(f"{name} has dtype {arr.dtype}; pass a real-valued (float or integer) "
                         "array")
    dtype = np.float32 if arr.dtype.kind == "f" and arr.dtype.itemsize == 4 else np.float64
    # also converts big-endian FITS data to native byte order
    return np.ascontiguousarray(arr, dtype=dtype)


def _as_plane(value, shape, name: str, *, positive: bool = False):
    """A scalar or an array of ``shape`` as float (scalar) or native float array."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = float(arr)
        if not np.isfinite(v) or (positive and v <= 0):
            raise InputError(f"{name}={v!r} must be a finite{' positive' if positive else ''} "
                             "number or an array of the image shape")
        return v
    if arr.shape != tuple(shape):
        raise InputError(f"{name} has shape {arr.shape} but the image has {tuple(shape)}; "
                         "pass a scalar or an array of the image shape")
    return np.ascontiguousarray(arr, dtype=np.float32 if arr.dtype == np.float32 else np.float64)


def _as_mask(mask, shape) -> np.ndarray | None:
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.shape != tuple(shape):
        raise InputError(f"mask has shape {arr.shape} but the image has {tuple(shape)}; "
                         "pass a boolean array of the image shape (True = bad)")
    return arr.astype(bool, copy=False)


def _check_number(name, value, *, minimum=None, integer=False):
    try:
        ok = np.isfinite(value) and (minimum is None or value >= minimum)
        if integer:
            ok = ok and int(value) == value
    except TypeError:
        ok = False
    if not ok:
        what = "an integer" if integer else "a number"
        bound = f" >= {minimum}" if minimum is not None else ""
        raise InputError(f"{name}={value!r} is invalid; pass {what}{bound}")


class _Prepared:
    """Background-subtracted image, bad-pixel masks and noise of one image."""

    __slots__ = ("sub", "bad", "sat", "rms", "back", "_rms_scalar")

    def __init__(self, sub, bad, sat, rms, back):
        self.sub, self.bad, self.sat, self.rms, self.back = sub, bad, sat, rms, back
        self._rms_scalar = None

    @property
    def rms_scalar(self) -> float:
        """The median noise, computed when first asked for (only the catalogue uses it:
        the median of a tile's noise map takes ~8 ms, and most callers never need it)."""
        if self._rms_scalar is None:
            rms = self.rms
            self._rms_scalar = float(rms) if np.ndim(rms) == 0 else float(np.median(rms))
        return self._rms_scalar


def _sep_background(data, bad):
    ny, nx = data.shape
    try:
        return sep.Background(data, mask=bad, bw=min(64, nx), bh=min(64, ny), fw=3, fh=3)
    except Exception as exc:  # sep raises plain Exceptions
        raise ProcessingError(f"sep could not estimate the background: {exc}") from exc


def _source_mask(data, bkg, bad, sat, threshold):
    """Pixels of detected sources, dilated by a disk of radius ~1 FWHM (or None)."""
    sub = data - bkg.back()
    sub[bad & ~sat] = 0.0
    objs, seg = _extract(sub, threshold, bkg.rms(), bad, 5, segmentation=True)
    if len(objs) == 0:
        return None
    bright = objs["flux"] >= np.median(objs["flux"])
    rh, _ = sep.flux_radius(sub, objs["x"][bright], objs["y"][bright],
                            np.clip(6.0 * objs["a"][bright], 4.0, 60.0), 0.5, mask=bad)
    rh = rh[np.isfinite(rh) & (rh > 0)]
    radius = float(np.clip(2.0 * np.median(rh), 1.5, 30.0)) if len(rh) else 3.0
    from . import _numba as nk

    out = np.empty(seg.shape, dtype=bool)
    nk._dilate_disk(seg, radius, out)  # scipy's binary_dilation with the disk, 3x faster
    return out


def _prepare(image, *, background, rms, saturation, mask, mask_sources=False,
             threshold=10.0) -> _Prepared:
    data = _as_image(image)
    shape = data.shape
    background = _as_plane(background, shape, "background")
    rms = _as_plane(rms, shape, "rms", positive=True)
    user_mask = _as_mask(mask, shape)

    finite = np.isfinite(data)
    bad = ~finite
    if user_mask is not None:
        bad |= user_mask
    if saturation is not None:
        _check_number("saturation", saturation)
        with np.errstate(invalid="ignore"):
            sat = finite & (data >= saturation)
        bad |= sat
    else:
        sat = np.zeros(shape, dtype=bool)
    if not finite.all():
        data = np.where(finite, data, 0).astype(data.dtype, copy=False)
    if bad.all():
        raise ProcessingError("every pixel of the image is masked, NaN or saturated; "
                              "check the mask and the saturation level")

    if background is None or rms is None:
        bkg = _sep_background(data, bad)
        if mask_sources:
            # second pass with the sources masked: star light biases the mesh modes
            srcmask = _source_mask(data, bkg, bad, sat, threshold)
            if srcmask is not None:
                srcmask |= bad
                if srcmask.mean() < 0.8:
                    bkg = _sep_background(data, srcmask)
                else:
                    log.warning("sources cover %.0f%% of the image; background estimated "
                                "without masking them", 100 * srcmask.mean())
        if background is None:
            background = bkg.back()
        if rms is None:
            rms = bkg.rms()
            if not np.all(np.isfinite(rms)) or np.any(rms <= 0):
                good = np.isfinite(rms) & (rms > 0)
                if not good.any():
                    raise ProcessingError("the background noise of the image is zero or "
                                          "undefined; pass rms= explicitly")
                rms = np.where(good, rms, np.median(rms[good])).astype(rms.dtype)
    sub = data - background
    sub[bad & ~sat] = 0.0
    sub = np.ascontiguousarray(sub)
    return _Prepared(sub, bad, sat, rms, background)


# ----------------------------------------------------------------------------------------------
# detection and measurement
# ----------------------------------------------------------------------------------------------
def _extract(sub, threshold, rms, bad, minarea, segmentation=False):
    kwargs = dict(err=rms, mask=bad, minarea=minarea, deblend_cont=0.005,
                  segmentation_map=segmentation)
    try:
        return sep.extract(sub, threshold, **kwargs)
    except Exception as exc:  # sep signals buffer overflows with a plain Exception
        if "buffer full" not in str(exc):
            raise ProcessingError(f"sep.extract failed: {exc}") from exc
    # Crowded or large image: sep's active-pixel stack (a process-wide setting) overflowed.
    old = sep.get_extract_pixstack()
    new = max(old * 10, sub.size // 4)
    log.warning("sep pixel stack (%d) overflowed; raising it to %d for this process", old, new)
    sep.set_extract_pixstack(new)
    try:
        return sep.extract(sub, threshold, **kwargs)
    except Exception as exc:
        raise ProcessingError(f"sep.extract failed even with a pixel stack of {new}: {exc}; "
                              "raise threshold= or process the image in tiles") from exc


def _window_errors(sub, rms, bad, x, y, sig, gain=None, budget=4_000_000):
    """Positional errors of windowed centroids (Source Extractor's ERRX2WIN formula).

    ``err_x^2 = 4 sum(w^2 var (x - xc)^2) / (sum(w I))^2`` with the Gaussian window
    ``w`` of sigma ``sig`` truncated at ``4 sig``; the same for ``y``.  The pixel
    variance is ``rms^2`` plus, with ``gain``, the source's Poisson term
    ``max(sub, 0) / gain``, evaluated in the windows only.
    """
    n = len(x)
    ex = np.full(n, np.nan)
    ey = np.full(n, np.nan)
    if n == 0:
        return ex, ey
    ny, nx = sub.shape
    halves = np.ceil(4.0 * sig).astype(np.intp)
    chunks = []  # (indices, half): stars with the same box size, <= budget pixels per chunk
    for half in np.unique(halves):
        members = np.nonzero(halves == half)[0]
        step = max(1, budget // (2 * int(half) + 1) ** 2)
        chunks += [(members[i:i + step], int(half)) for i in range(0, len(members), step)]
    for sl, half in chunks:
        off = np.arange(-half, half + 1)
        cx = np.rint(x[sl]).astype(np.intp)
        cy = np.rint(y[sl]).astype(np.intp)
        xx = cx[:, None, None] + off[None, None, :]
        yy = cy[:, None, None] + off[None, :, None]
        inside = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
        xi = np.clip(xx, 0, nx - 1)
        yi = np.clip(yy, 0, ny - 1)
        img = sub[yi, xi].astype(np.float64)
        if np.ndim(rms) == 2:
            v = np.asarray(rms[yi, xi], np.float64) ** 2
        else:
            v = np.full(img.shape, float(rms) * float(rms))
        if gain is not None:
            v = v + np.clip(sub[yi, xi], 0, None) / gain
        good = inside & ~bad[yi, xi]
        ddx = xx - x[sl, None, None]
        ddy = yy - y[sl, None, None]
        r2 = ddx * ddx + ddy * ddy
        sg = sig[sl, None, None]
        w = np.exp(-0.5 * r2 / (sg * sg)) * ((r2 < 16.0 * sg * sg) & good)
        norm = np.sum(w * img, axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            ex[sl] = np.sqrt(4.0 * np.sum(w * w * v * ddx * ddx, axis=(1, 2))) / np.abs(norm)
            ey[sl] = np.sqrt(4.0 * np.sum(w * w * v * ddy * ddy, axis=(1, 2))) / np.abs(norm)
    ex[~np.isfinite(ex)] = np.nan
    ey[~np.isfinite(ey)] = np.nan
    return ex, ey


#: half-width of the FWHM window in which point sources are counted (a factor)
_LOCUS_WINDOW = 1.25
#: sources sharper than this (px) are not candidates for the stellar locus: a hot
#: pixel or a one-pixel cosmic-ray hit measures ~0.8 px
_LOCUS_MIN_FWHM = 1.2


def _stellar_locus(fwhm, snr, ok) -> float:
    """Typical FWHM of point sources.

    Point sources share one FWHM and are the sharpest sources but for
    cosmic rays and hot pixels (below ``_LOCUS_MIN_FWHM``), while galaxies
    spread over larger ones.  The locus is found in the sharpest FWHM window
    of +-25 % that holds at least half as many well-measured sources as the
    densest one (and 3), then it is the clipped median of the sources in it
    (the bright ones when there are 5).  A plain median of all sources would
    follow the galaxies in a field with few stars, and every size derived
    from it (apertures, PSF stamps, the star/galaxy cut) with them.
    """
    sel = ok & np.isfinite(fwhm) & (fwhm >= _LOCUS_MIN_FWHM)
    if not sel.any():
        sel = ok & np.isfinite(fwhm) & (fwhm > 0)
    if not sel.any():
        return float("nan")
    lf = np.sort(np.log(fwhm[sel]))
    w = np.log(_LOCUS_WINDOW)
    counts = np.searchsorted(lf, lf + 2 * w, side="right") - np.arange(len(lf))
    enough = counts >= min(counts.max(), max(3, 0.5 * counts.max()))
    i = int(np.argmax(enough))  # the sharpest window dense enough
    i = i + int(np.argmax(counts[i:i + counts[i]]))  # its best-filled neighbour
    lo, hi = lf[i], lf[i + counts[i] - 1]
    lg = np.log(np.where(sel, fwhm, 1.0))
    sel &= (lg >= lo) & (lg <= hi)
    bright = sel & (snr >= 20)
    if bright.sum() >= 5:
        sel = bright
    vals = fwhm[sel]
    if len(vals) < 3:
        return float(np.median(vals))
    _, med, _ = sigma_clipped_stats(vals, sigma=2.5, maxiters=10)
    return float(med)


def _measure(prep: _Prepared, *, threshold, gain, minarea, isolation_radius) -> Table:
    sub, bad, rms = prep.sub, prep.bad, prep.rms
    objs = _extract(sub, threshold, rms, bad, minarea)
    n = len(objs)
    log.debug("sep found %d sources above %.3g sigma", n, threshold)
    if n == 0:
        tab = Table({c: np.zeros(0, dtype=bool if c in ("isolated", "saturated", "star_like")
                                 else (np.int32 if c in ("npix", "flag") else np.float64))
                     for c in _CATALOG_COLUMNS})
        tab.meta.update(fwhm=float("nan"), aperture_radius=float("nan"),
                        aperture_correction=float("nan"), background_rms=prep.rms_scalar,
                        threshold=float(threshold))
        return tab

    x0 = objs["x"].astype(np.float64)
    y0 = objs["y"].astype(np.float64)
    a = objs["a"].astype(np.float64)
    b = objs["b"].astype(np.float64)
    flag = objs["flag"].astype(np.int32)

    # Half-light radius -> Gaussian-equivalent FWHM (= 2 r_half for a Gaussian).
    rmax = np.clip(6.0 * a, 4.0, 60.0)
    rhalf, _ = sep.flux_radius(sub, x0, y0, rmax, 0.5, mask=bad, subpix=5)
    rhalf = np.where(np.isfinite(rhalf) & (rhalf > 0), rhalf, np.maximum(a, 0.5))
    fwhm = 2.0 * rhalf

    # Windowed centroids (XWIN/YWIN with Source Extractor's choice of window).
    sig = np.clip(2.0 * rhalf / _FWHM_PER_SIGMA, 0.5, 20.0)
    xw, yw, wflag = sep.winpos(sub, x0, y0, sig, mask=bad)
    wok = (wflag == 0) & np.isfinite(xw) & np.isfinite(yw) & (np.hypot(xw - x0, yw - y0) < 2.0)
    x = np.where(wok, xw, x0)
    y = np.where(wok, yw, y0)

    # Aperture photometry in one common aperture of ~2 x FWHM (radius).
    ellip = 1.0 - b / np.where(a > 0, a, 1.0)
    base_ok = (flag & (sep.OBJ_TRUNC | sep.OBJ_SINGU)) == 0
    prelim_snr = objs["flux"] / (prep.rms_scalar * np.sqrt(np.maximum(objs["npix"], 1)))
    locus = _stellar_locus(fwhm, prelim_snr, base_ok & (ellip < 0.3))
    if not np.isfinite(locus):
        locus = float(np.median(fwhm))
    r_ap = max(2.0 * locus, 2.0)
    flux, flux_err, aflag = sep.sum_circle(sub, x, y, r_ap, err=rms, mask=bad, gain=gain,
                                           subpix=5)
    flag = flag | aflag.astype(np.int32)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(flux_err > 0, flux / flux_err, 0.0)

    # Centroid errors of the windowed positions.
    x_err, y_err = _window_errors(sub, rms, bad, x, y, sig, gain)

    # Saturation: any saturated pixel inside the aperture.
    if prep.sat.any():
        nsat, _, _ = sep.sum_circle(prep.sat.astype(np.float32), x, y, r_ap, subpix=1)
        saturated = nsat > 0
    else:
        saturated = np.zeros(n, dtype=bool)

    # Isolation: no other detection within isolation_radius, and not deblended from a blend.
    r_iso = 2.0 * r_ap if isolation_radius is None else float(isolation_radius)
    if n > 1:
        from scipy.spatial import cKDTree
        dist, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
        nearest = dist[:, 1]
    else:
        nearest = np.full(n, np.inf)
    isolated = (nearest > r_iso) & ((flag & sep.OBJ_MERGED) == 0)

    # Point-source-like: on the stellar FWHM locus, round, cleanly measured.
    star_like = ((flag & _BAD_FLAGS) == 0) & (np.abs(fwhm / locus - 1.0) < 0.25) \
        & (ellip < 0.3) & ~saturated

    apcorr = _aperture_correction(sub, bad, x, y, flux, snr, flag, r_ap,
                                  star_like & isolated)

    tab = Table()
    tab["x"] = x
    tab["y"] = y
    tab["x_err"] = x_err
    tab["y_err"] = y_err
    tab["flux"] = np.asarray(flux, np.float64)
    tab["flux_err"] = np.asarray(flux_err, np.float64)
    tab["snr"] = np.asarray(snr, np.float64)
    tab["fwhm"] = fwhm
    tab["a"] = a
    tab["b"] = b
    tab["theta"] = objs["theta"].astype(np.float64)
    tab["ellipticity"] = ellip
    tab["peak"] = objs["peak"].astype(np.float64)
    tab["npix"] = objs["npix"].astype(np.int32)
    tab["flag"] = flag
    tab["isolated"] = isolated
    tab["saturated"] = saturated
    tab["star_like"] = star_like
    tab.meta.update(fwhm=locus, aperture_radius=r_ap, aperture_correction=apcorr,
                    background_rms=prep.rms_scalar, threshold=float(threshold))
    return tab


def _aperture_correction(sub, bad, x, y, flux, snr, flag, r_ap, candidates) -> float:
    """Median fraction of a star's flux (within ``2 r_ap``) that falls in ``r_ap``.

    Measured on bright, isolated, point-like stars; NaN when fewer than three.
    """
    sel = candidates & ((flag & _BAD_FLAGS) == 0) & (snr >= 50)
    if sel.sum() < 3:
        sel = candidates & ((flag & _BAD_FLAGS) == 0) & (snr >= 20)
    if sel.sum() < 3:
        return float("nan")
    order = np.argsort(-flux[sel])[:500]
    xs, ys, fa = x[sel][order], y[sel][order], flux[sel][order]
    fb, _, fbflag = sep.sum_circle(sub, xs, ys, 2.0 * r_ap, mask=bad, subpix=5)
    ok = ((fbflag & _BAD_FLAGS) == 0) & (fb > 0)
    if ok.sum() < 3:
        return float("nan")
    _, med, _ = sigma_clipped_stats(fa[ok] / fb[ok], sigma=3.0, maxiters=10)
    return float(med) if np.isfinite(med) and med > 0 else float("nan")


def background_maps(image, *, saturation=None, mask=None, threshold=10.0):
    """The background and noise maps the estimators of this module use by default.

    A ``sep.Background`` (64-pixel meshes, 3x3 median filter) measured twice,
    the second time with the sources detected at ``threshold`` sigma masked.
    Passing them as ``background=`` and ``rms=`` to :func:`find_stars`,
    :func:`estimate_psf` or :func:`fit_psf_model` of the same image spares
    each its own measurement.

    Parameters
    ----------
    image : array_like, 2-D
        Image, background not subtracted.
    saturation : float, optional
        Pixels at or above it are ignored.
    mask : ndarray of bool, optional
        Bad pixels (True) to ignore.
    threshold : float, optional
        Detection threshold (sigma) of the sources masked in the second pass.

    Returns
    -------
    background, rms : ndarray
        Maps of the image's shape.

    Raises
    ------
    InputError
        The image is not 2-D or ``mask`` does not match it.
    ProcessingError
        Every pixel is masked, or sep cannot measure the background.
    """
    _check_number("threshold", threshold, minimum=0)
    prep = _prepare(image, background=None, rms=None, saturation=saturation, mask=mask,
                    mask_sources=True, threshold=float(threshold))
    return prep.back, prep.rms


def find_stars(image, *, background=None, rms=None, saturation=None, threshold=10.0,
               mask=None, gain=None, minarea=5, isolation_radius=None,
               mask_sources=True) -> Table:
    """Detect and measure sources with sep and classify the point sources.

    Parameters
    ----------
    image : array_like, 2-D
        Image in its native units, background *not* subtracted (unless
        ``background=0`` is passed). Big-endian FITS data are converted.
    background : float or ndarray, optional
        Background level (scalar or map). Default: ``sep.Background`` with
        64-pixel meshes and a 3x3 median filter (see ``mask_sources``).
    rms : float or ndarray, optional
        Background noise (scalar or map), same units as ``image``. Default: the
        ``sep.Background`` RMS map.
    saturation : float, optional
        Saturation level in the units of ``image`` (before background
        subtraction). Pixels ``>= saturation`` are masked for detection, and a
        source with any such pixel in its aperture is flagged ``saturated``.
    threshold : float, optional
        Per-pixel detection threshold in units of ``rms`` (sep's ``thresh``);
        sources also need ``minarea`` connected pixels above it. The default of
        10 keeps bright sources only, which is what the estimators want.
    mask : ndarray of bool, optional
        True for bad pixels; they are ignored for detection and photometry.
    gain : float, optional
        Electrons per image unit; when given, source Poisson noise enters
        ``flux_err`` and the centroid errors.
    minarea : int, optional
        Minimum number of connected pixels above ``threshold``.
    isolation_radius : float, optional
        A source is ``isolated`` when no other detection lies within this
        radius (pixels) and sep did not deblend it from a blend. Default:
        twice the aperture radius (about 4 x FWHM).
    mask_sources : bool, optional
        When the background is estimated here, estimate it a second time with
        the detected sources (dilated by ~1 FWHM) masked. Star light otherwise
        biases the mesh modes upwards in crowded fields (by ~1 % of the flux of
        typical stars in a test field), which biases aperture fluxes and the
        flux ratio. Costs one more background and extraction pass.

    Returns
    -------
    astropy.table.Table
        One row per source with columns ``x, y`` (windowed centroids, 0-based
        pixels; x = column), ``x_err, y_err`` (their 1-sigma errors, Source
        Extractor's ERRX2WIN formula), ``flux, flux_err, snr`` (circular
        aperture of radius ``2 x`` the stellar FWHM), ``fwhm`` (twice the
        half-light radius, i.e. the FWHM for a Gaussian), ``a, b, theta,
        ellipticity`` (isophotal shape), ``peak`` (background-subtracted),
        ``npix``, ``flag`` (sep object and aperture flags OR-ed), and the
        booleans ``isolated``, ``saturated``, ``star_like`` (FWHM within 25 %
        of the stellar locus, ellipticity < 0.3, clean flags, unsaturated).
        ``meta`` holds ``fwhm`` (stellar locus), ``aperture_radius``,
        ``aperture_correction`` (median fraction of a bright isolated star's
        flux within twice that radius that falls in the aperture; NaN if
        fewer than 3 such stars), ``background_rms`` and ``threshold``. An
        image without sources gives an empty table with these columns.

    Raises
    ------
    InputError
        ``image`` is not 2-D real data, or ``background``/``rms``/``mask``
        do not match its shape, or a numeric option is invalid.
    ProcessingError
        Every pixel is masked, or sep cannot measure the background or
        extract sources.

    Notes
    -----
    If sep's process-wide pixel stack overflows (very crowded or very large
    images) it is raised once, tenfold, and the extraction repeated.
    """
    _check_number("threshold", threshold, minimum=0)
    _check_number("minarea", minarea, minimum=1, integer=True)
    if gain is not None:
        _check_number("gain", gain, minimum=0)
        if gain <= 0:
            raise InputError(f"gain={gain!r} must be positive (electrons per image unit)")
    prep = _prepare(image, background=background, rms=rms, saturation=saturation, mask=mask,
                    mask_sources=mask_sources, threshold=float(threshold))
    return _measure(prep, threshold=float(threshold), gain=gain, minarea=int(minarea),
                    isolation_radius=isolation_radius)


# ----------------------------------------------------------------------------------------------
# PSF measures
# ----------------------------------------------------------------------------------------------
def _fourier_shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Shift ``img`` by ``(+dx, +dy)`` pixels with a band-limited (Fourier) shift."""
    spec = np.fft.rfft2(img)
    ny, nx = img.shape
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    phase = np.exp(-2j * np.pi * (ky * dy + kx * dx))
    if nx % 2 == 0:  # keep the Nyquist column real so the shift stays real
        phase[:, -1] = np.cos(2 * np.pi * (ky[:, 0] * dy + 0.5 * dx))
    if ny % 2 == 0:
        phase[ny // 2, :] = np.real(phase[ny // 2, :])
    return np.fft.irfft2(spec * phase, s=img.shape)


def _profile_fwhm(psf: np.ndarray, xc: float, yc: float) -> float:
    """FWHM from the azimuthally averaged, spline-interpolated profile about (xc, yc)."""
    half = min(psf.shape) / 2.0
    radii = np.arange(0.0, half, 0.02)
    theta = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    xs = xc + radii[:, None] * np.cos(theta)[None, :]
    ys = yc + radii[:, None] * np.sin(theta)[None, :]
    vals = ndimage.map_coordinates(psf, [ys.ravel(), xs.ravel()], order=3, mode="constant")
    prof = vals.reshape(xs.shape).mean(axis=1)
    peak = prof[0]
    if not peak > 0:
        return float("nan")
    below = np.nonzero(prof < 0.5 * peak)[0]
    if len(below) == 0:
        return float("nan")
    i = below[0]
    r0, r1, p0, p1 = radii[i - 1], radii[i], prof[i - 1], prof[i]
    r_half = r0 + (p0 - 0.5 * peak) * (r1 - r0) / (p0 - p1)
    return float(2.0 * r_half)


def measure_psf(psf) -> tuple[float, float, float]:
    """FWHM and centroid of a PSF image.

    Parameters
    ----------
    psf : array_like, 2-D
        PSF image (any normalisation, background zero).

    Returns
    -------
    fwhm : float
        Full width at half maximum in pixels, from the azimuthally averaged
        cubic-spline-interpolated radial profile about the centroid (exact for
        any circular profile, not just a Gaussian; NaN if it cannot be found).
    x, y : float
        Windowed centroid (Source Extractor's XWIN/YWIN via ``sep.winpos``,
        window sigma = FWHM / 2.3548), 0-based pixels. A centred PSF gives
        ``(size // 2, size // 2)``.

    Raises
    ------
    InputError
        ``psf`` is not a 2-D finite array with a positive sum.
    """
    p = _as_image(psf, "psf").astype(np.float64)
    if not np.all(np.isfinite(p)) or not p.sum() > 0:
        raise InputError("psf must be finite with a positive sum; pass a valid PSF image")
    ny, nx = p.shape
    pos = np.clip(p, 0, None)
    # start: first moment of the positive part, then refine with the windowed centroid
    yy, xx = np.indices(p.shape)
    x1 = float((pos * xx).sum() / pos.sum())
    y1 = float((pos * yy).sum() / pos.sum())
    fwhm = _profile_fwhm(p, x1, y1)
    sig = max((fwhm if np.isfinite(fwhm) else 2.0) / _FWHM_PER_SIGMA, 0.5)
    for _ in range(2):
        xw, yw, f = sep.winpos(np.ascontiguousarray(pos), np.array([x1]), np.array([y1]),
                               np.array([sig]))
        if f[0] == 0 and np.isfinite(xw[0]) and np.isfinite(yw[0]):
            x1, y1 = float(xw[0]), float(yw[0])
        fwhm = _profile_fwhm(p, x1, y1)
        if not np.isfinite(fwhm):
            break
        sig = max(fwhm / _FWHM_PER_SIGMA, 0.5)
    return fwhm, x1, y1


def _recentre(psf: np.ndarray, *, tolerance: float = 0.2) -> tuple[np.ndarray, float, float]:
    """Shift ``psf`` so that its centroid is the centre pixel if it is off by > tolerance."""
    c = psf.shape[0] // 2
    _, xc, yc = measure_psf(psf)
    for _ in range(3):  # clipping the shifted wings moves the centroid a little: iterate
        if not np.hypot(xc - c, yc - c) > tolerance:
            break
        log.debug("re-centring PSF by (%.3f, %.3f) px", c - xc, c - yc)
        psf = np.clip(_fourier_shift(psf, c - xc, c - yc), 0, None)
        psf /= psf.sum()
        _, xc, yc = measure_psf(psf)
    return psf, xc, yc


# ----------------------------------------------------------------------------------------------
# PSF estimation
# ----------------------------------------------------------------------------------------------
def _odd(n: float) -> int:
    n = int(round(n))
    return n if n % 2 == 1 else n + 1


def _check_catalog(cat, name, required):
    cols = getattr(cat, "colnames", None)
    if cols is None and isinstance(cat, Mapping):
        cols = list(cat.keys())
    if cols is None:
        raise InputError(f"{name} must be a table with columns {', '.join(required)}; "
                         "pass the output of find_stars()")
    missing = [c for c in required if c not in cols]
    if missing:
        raise InputError(f"{name} lacks column(s) {', '.join(missing)}; pass the output of "
                         "find_stars()")


def _noise_radius(psf, err, fwhm) -> float:
    """First 1-px annulus radius (beyond 1.5 FWHM) whose mean is below the per-pixel error.

    ``err`` is the per-pixel standard error of the stack; the stamp's inscribed
    radius when the profile never sinks into the noise.
    """
    n = psf.shape[0]
    c = n // 2
    yy, xx = np.indices(psf.shape)
    r = np.hypot(xx - c, yy - c)
    r_edge = float(c)
    for k in range(int(np.ceil(min(1.5 * fwhm, r_edge))), int(r_edge) + 1):
        ring = (r >= k - 0.5) & (r < k + 0.5)
        if ring.any() and np.mean(psf[ring]) < np.median(err[ring]):
            return float(k)
    return r_edge


def _fit_wing_model(psf, err, fwhm):
    """Least-squares fit of ``A M(r; fwhm, beta) + B`` to a stacked PSF.

    ``M`` is the pixel-integrated circular Moffat of :func:`moffat_image`
    (``beta`` in [1.5, 100]; large ``beta`` is a Gaussian) and ``B`` a
    constant pedestal, fitted to every pixel of the stamp's inscribed circle
    with weights ``1 / err**2`` (:func:`fit_moffat_profile`). The pedestal is
    the mean residual background under the stars relative to their flux: the
    sky estimate is a mode, which lies below the mean level of a field with
    faint undetected stars, and left in the stack it adds ~0.3-0.6 % of
    spurious wing flux.

    Returns
    -------
    model : ndarray or None
        ``A M`` on the stamp grid, zero outside the inscribed circle (None
        when the fit fails or gives a non-positive amplitude).
    pedestal : float
        ``B`` (0 when the fit fails).
    """
    fit = fit_moffat_profile(psf, err, fwhm)
    if fit is None:
        return None, 0.0
    n = psf.shape[0]
    c = n // 2
    yy, xx = np.indices(psf.shape)
    m = moffat_image(fit["fwhm"], fit["beta"], n)
    return fit["amp"] * m * (np.hypot(xx - c, yy - c) <= c), fit["pedestal"]


def fit_moffat_profile(psf, err, fwhm) -> dict | None:
    """``A M(r; fwhm, beta) + B`` fitted to a centred PSF image (see
    :func:`_fit_wing_model`); ``err`` the per-pixel errors (weights 1/err^2),
    ``fwhm`` the starting width.  Returns ``fwhm``, ``beta``, ``amp`` and
    ``pedestal``, or None when the fit fails or the amplitude is not positive."""
    n = psf.shape[0]
    c = n // 2
    yy, xx = np.indices(psf.shape)
    inside = np.hypot(xx - c, yy - c) <= c
    e = np.maximum(err, 0.1 * max(float(np.median(err)), 1e-30))[inside]
    d = psf[inside] / e

    def linear(m):
        design = np.column_stack([m[inside], np.ones(int(inside.sum()))]) / e[:, None]
        coef, *_ = np.linalg.lstsq(design, d, rcond=None)
        return coef, design

    def resid(par):
        coef, design = linear(moffat_image(par[0], float(np.exp(par[1])), n, oversample=3))
        return d - design @ coef

    best = None
    from scipy import optimize

    for beta0 in (2.5, 10.0):
        try:
            res = optimize.least_squares(resid, [max(fwhm, 0.6), np.log(beta0)],
                                         bounds=([0.5, np.log(1.5)], [4.0 * n, np.log(100.0)]))
        except (ValueError, np.linalg.LinAlgError):
            continue
        if np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        return None
    fw, beta = float(best.x[0]), float(np.exp(best.x[1]))
    (amp, pedestal), _ = linear(moffat_image(fw, beta, n))
    if not (np.isfinite(amp) and amp > 0 and np.isfinite(pedestal)):
        return None
    return dict(fwhm=fw, beta=beta, amp=float(amp), pedestal=float(pedestal))


def wing_taper(n: int, r_cut: float) -> np.ndarray:
    """Cosine taper on an ``n`` x ``n`` stamp: 1 within the core, 0 from ``r_cut`` out.

    Width max(2 px, 0.25 ``r_cut``), ending at ``r_cut`` (the stack's noise radius).
    """
    c = n // 2
    yy, xx = np.indices((n, n))
    r = np.hypot(xx - c, yy - c)
    width = max(2.0, 0.25 * r_cut)
    r0 = r_cut - width
    return np.where(r <= r0, 1.0, np.where(r >= r_cut, 0.0,
                                           np.cos(0.5 * np.pi * (r - r0) / width) ** 2))


def _clean_wings(psf, err, fwhm):
    """Replace the noisy wings of a stacked PSF by a fitted profile.

    Within the noise radius ``r_cut`` (:func:`_noise_radius`) the stack is kept
    (less the fitted pedestal); beyond it the wings come from a Moffat profile
    fitted to the whole stack (:func:`_fit_wing_model`), joined with a cosine
    taper of width max(2 px, 0.25 r_cut) that ends at ``r_cut``; negative
    values are clipped. Zeroing the wings beyond the taper instead (the
    fallback when the fit fails) removes real light that a star's PSF fit then
    misses: 1.3 % of a FWHM-3 Gaussian whose r_cut is 5 px (3.4 % at FWHM
    3.45), which biased the fitted flux ratio of a FWHM-4 / FWHM-3 pair by as
    much; keeping the noisy stack out to the stamp edge instead makes PSF-fit
    fluxes noisy (the normalisation sums the noise of every wing pixel).

    Returns
    -------
    psf : ndarray
        The cleaned (not normalised) PSF.
    r_cut : float
        The noise radius in pixels.
    """
    r_cut = _noise_radius(psf, err, fwhm)
    taper = wing_taper(psf.shape[0], r_cut)
    model, pedestal = _fit_wing_model(psf, err, fwhm)
    if model is None:
        log.debug("PSF wing model fit failed; wings beyond %.1f px set to zero", r_cut)
        return np.clip(psf, 0, None) * taper, r_cut
    return np.clip(taper * (psf - pedestal) + (1.0 - taper) * model, 0, None), r_cut


def _stack(stamps):
    """Sigma-clipped mean and per-pixel standard error of normalised stamps."""
    clipped = sigma_clip(stamps, sigma=3.0, maxiters=5, axis=0, cenfunc="median",
                         stdfunc="mad_std")
    mean = clipped.mean(axis=0).filled(np.nan)
    med = np.median(stamps, axis=0)
    mean = np.where(np.isfinite(mean), mean, med)
    cnt = np.maximum(clipped.count(axis=0), 1)
    std = mad_std(stamps, axis=0)
    err = std / np.sqrt(cnt)
    return mean, err


def psf_star_mask(stars, snr_min=20.0) -> np.ndarray:
    """Rows of a :func:`find_stars` catalogue that :func:`estimate_psf` may stack.

    Star-like, isolated, unsaturated, cleanly measured, ``snr >= snr_min``,
    positive flux and finite position (the stamp tests come later).

    Parameters
    ----------
    stars : astropy.table.Table
        Catalogue from :func:`find_stars`.
    snr_min : float, optional
        Minimum aperture S/N.

    Returns
    -------
    ndarray of bool
    """
    _check_catalog(stars, "stars", ("x", "y", "flux", "snr", "flag", "isolated", "saturated",
                                    "star_like"))
    x = np.asarray(stars["x"], np.float64)
    y = np.asarray(stars["y"], np.float64)
    snr = np.asarray(stars["snr"], np.float64)
    flux = np.asarray(stars["flux"], np.float64)
    with np.errstate(invalid="ignore"):
        return (np.asarray(stars["star_like"], bool) & np.asarray(stars["isolated"], bool)
                & ~np.asarray(stars["saturated"], bool)
                & ((np.asarray(stars["flag"]) & _BAD_FLAGS) == 0)
                & (snr >= snr_min) & (flux > 0) & np.isfinite(x) & np.isfinite(y))


def estimate_psf(image, *, size=None, saturation=None, mask=None, stars=None, min_stars=5,
                 max_stars=200, threshold=10.0, snr_min=20.0, background=None, rms=None,
                 gain=None, mask_sources=True) -> tuple[np.ndarray, dict]:
    """Estimate the PSF of an image (or tile) by stacking bright isolated stars.

    Stars are taken from ``stars`` (or :func:`find_stars`): unsaturated,
    isolated, ``star_like``, cleanly measured, ``snr >= snr_min``, with the
    whole stamp inside the image and free of masked pixels; the brightest
    ``max_stars`` are used. Each stamp is shifted (Fourier shift) so that the
    star's windowed centroid lands on the centre pixel, normalised by its flux
    in an aperture of radius 2 x FWHM, and the stack is combined with a
    per-pixel 3-sigma-clipped mean. Stars whose residual from the stack is an
    outlier (blends, cosmic rays, galaxies) are dropped and the stack redone.
    Beyond the radius where the azimuthal profile falls below the per-pixel
    noise of the stack, the wings are replaced by a Moffat profile fitted to
    the stack together with a constant pedestal, which is subtracted (cosine
    taper, negative values clipped; see ``_clean_wings``): zeroing them
    instead made the PSF-fit fluxes of FWHM-3 stars 1.3 % low. The result is
    normalised to unit sum and re-centred with a Fourier shift if its
    centroid is more than 0.02 px from the centre pixel.

    Parameters
    ----------
    image : array_like, 2-D
        Image, background not subtracted (see :func:`find_stars`).
    size : int, optional
        Odd side of the PSF array. Default: ``6 x FWHM`` of the selected stars,
        made odd and clipped to [15, 63] (and to what the image can hold).
    saturation : float, optional
        Saturation level in image units.
    mask : ndarray of bool, optional
        True for bad pixels.
    stars : astropy.table.Table, optional
        A catalogue from :func:`find_stars` of this image; detected if omitted.
    min_stars : int, optional
        Fewest stars accepted.
    max_stars : int, optional
        At most this many (the brightest) stars are stacked.
    threshold : float, optional
        Detection threshold passed to :func:`find_stars`.
    snr_min : float, optional
        Minimum aperture S/N of a PSF star.
    background, rms, gain, mask_sources : optional
        As in :func:`find_stars` (they also define the background subtracted
        from the stamps).

    Returns
    -------
    psf : ndarray
        float64, odd square, unit sum, centred on pixel ``(size // 2, size // 2)``.
    info : dict
        ``n_stars`` (stacked), ``n_candidates``, ``fwhm`` (of the returned PSF,
        see :func:`measure_psf`), ``fwhm_stars`` (median of the stars),
        ``centroid`` (x, y) of the returned PSF, ``size``, ``cut_radius`` (px,
        beyond which the wings are the fitted model), ``indices`` (rows of the catalogue
        used), ``stamps`` (the stacked stamps, re-centred and normalised) and ``xy``
        (their stars' positions), for a field-varying model
        (:func:`zogy_stream.psffield.fit_psf_field`).

    Raises
    ------
    InputError
        Invalid image, mask, catalogue or options (e.g. even ``size``).
    ProcessingError
        Fewer than ``min_stars`` usable stars.
    """
    _check_number("min_stars", min_stars, minimum=1, integer=True)
    _check_number("max_stars", max_stars, minimum=1, integer=True)
    _check_number("snr_min", snr_min)
    if size is not None:
        if not isinstance(size, (int, np.integer)) or size < 3 or size % 2 == 0:
            raise InputError(f"size={size!r} must be an odd integer >= 3 (PSF arrays have odd "
                             "sides)")
    _check_number("threshold", threshold, minimum=0)
    prep = _prepare(image, background=background, rms=rms, saturation=saturation, mask=mask,
                    mask_sources=mask_sources, threshold=float(threshold))
    if stars is None:
        stars = _measure(prep, threshold=float(threshold), gain=gain, minarea=5,
                         isolation_radius=None)
    else:
        _check_catalog(stars, "stars", ("x", "y", "flux", "snr", "fwhm", "flag", "isolated",
                                        "saturated", "star_like"))
    sub, bad = prep.sub, prep.bad
    ny, nx = sub.shape
    margin = 3

    x = np.asarray(stars["x"], np.float64)
    y = np.asarray(stars["y"], np.float64)
    fw = np.asarray(stars["fwhm"], np.float64)
    flux = np.asarray(stars["flux"], np.float64)
    good = psf_star_mask(stars, snr_min)
    if good.sum() == 0:
        raise ProcessingError(f"no usable PSF stars (of {len(stars)} sources: need bright, "
                              "unsaturated, isolated point sources); check saturation=, "
                              "lower threshold= or snr_min=")
    fwhm_stars = float(np.median(fw[good]))
    if size is None:
        size = int(np.clip(_odd(6.0 * fwhm_stars), 15, 63))
        limit = min(ny, nx) - 2 * margin - 2
        if size > limit:
            size = limit if limit % 2 == 1 else limit - 1
            if size < 3:
                raise ProcessingError(f"image of shape {(ny, nx)} is too small for a PSF "
                                      "stamp; use a larger tile")
            log.warning("PSF size reduced to %d to fit the %dx%d image", size, ny, nx)
    half = size // 2 + margin
    cx = np.rint(x).astype(np.intp)
    cy = np.rint(y).astype(np.intp)
    inside = (cx - half >= 0) & (cx + half < nx) & (cy - half >= 0) & (cy + half < ny)
    good &= inside
    idx = np.nonzero(good)[0]
    # no bad pixels in the stamp
    idx = np.array([i for i in idx
                    if not bad[cy[i] - half:cy[i] + half + 1, cx[i] - half:cx[i] + half + 1].any()],
                   dtype=np.intp)
    n_candidates = len(idx)
    if n_candidates < min_stars:
        raise ProcessingError(f"only {n_candidates} usable PSF stars (min_stars={min_stars}); "
                              "use a larger image or tile, lower threshold=/snr_min=/"
                              "min_stars=, or pass a PSF")
    idx = idx[np.argsort(-flux[idx])][:max_stars]

    c = size // 2
    yy, xx = np.indices((size, size))
    rr = np.hypot(xx - c, yy - c)
    ap = rr <= min(2.0 * fwhm_stars, c)
    stamps = np.empty((len(idx), size, size))
    keep = np.ones(len(idx), bool)
    for k, i in enumerate(idx):
        big = sub[cy[i] - half:cy[i] + half + 1, cx[i] - half:cx[i] + half + 1].astype(np.float64)
        shifted = _fourier_shift(big, cx[i] - x[i], cy[i] - y[i])
        st = shifted[margin:margin + size, margin:margin + size]
        f = st[ap].sum()
        if not f > 0:
            keep[k] = False
            continue
        stamps[k] = st / f
    stamps, idx = stamps[keep], idx[keep]

    psf, err = _stack(stamps)
    if len(idx) >= max(min_stars, 5):
        core = rr <= max(1.5 * fwhm_stars, 2.0)
        scale = np.sum(psf[core] ** 2)
        resid = np.array([np.sum((s[core] - psf[core]) ** 2) / scale for s in stamps])
        med = np.median(resid)
        cut = med + 5.0 * max(mad_std(resid), 0.05 * med)
        ok = resid <= cut
        if (~ok).any() and ok.sum() >= min_stars:
            log.debug("dropping %d of %d PSF stars with outlying residuals", (~ok).sum(), len(ok))
            stamps, idx = stamps[ok], idx[ok]
            psf, err = _stack(stamps)

    psf, r_cut = _clean_wings(psf, err, fwhm_stars)
    total = psf.sum()
    if not total > 0:
        raise ProcessingError("the stacked PSF has no positive flux; check the star catalogue")
    psf = psf / total
    # centred to within 0.02 px: the registration offset measured from the same windowed
    # centroids is applied to the PSFs (calibrate.register_psf), so they must agree
    psf, xc, yc = _recentre(psf, tolerance=0.02)
    fwhm, _, _ = measure_psf(psf)
    info = dict(n_stars=int(len(idx)), n_candidates=int(n_candidates), fwhm=float(fwhm),
                fwhm_stars=fwhm_stars, centroid=(float(xc), float(yc)), size=int(size),
                cut_radius=float(r_cut), indices=idx, stamps=stamps,
                xy=np.column_stack([x[idx], y[idx]]))
    log.info("PSF from %d stars: size %d, FWHM %.2f px, centroid offset (%.3f, %.3f)",
             len(idx), size, fwhm, xc - c, yc - c)
    return psf, info


def moffat_image(fwhm: float, beta: float, size: int, *, dx: float = 0.0, dy: float = 0.0,
                 oversample: int = 5) -> np.ndarray:
    """Pixel-integrated circular Moffat profile of unit sum on a ``size`` x ``size`` grid.

    Centred at ``(size // 2 + dx, size // 2 + dy)``; ``beta`` above ~20 is
    practically a Gaussian.
    """
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    c = size // 2
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    g = np.arange(size) - c
    fx = (g[:, None] + sub[None, :]).ravel() - dx
    fy = (g[:, None] + sub[None, :]).ravel() - dy
    r2 = fy[:, None] ** 2 + fx[None, :] ** 2
    prof = (1.0 + r2 / (alpha * alpha)) ** (-beta)
    img = prof.reshape(size, oversample, size, oversample).mean(axis=(1, 3))
    return img / img.sum()


def fit_psf_model(image, *, stars, size=None, saturation=None, mask=None, snr_min=20.0,
                  max_stars=50, background=None, rms=None,
                  beta: float | None = None) -> tuple[np.ndarray, dict]:
    """A circular Moffat PSF fitted to the few good stars of an image.

    The fallback when there are too few stars to stack an empirical PSF
    (:func:`estimate_psf`), e.g. small cut-outs: the FWHM and ``beta`` of a
    pixel-integrated circular Moffat profile are fitted jointly to the
    stamps of up to ``max_stars`` bright, isolated, unsaturated, star-like
    sources (each with its own amplitude, background and sub-pixel centre),
    so one bright star suffices.

    Parameters
    ----------
    image : array_like, 2-D
        Image, background not subtracted.
    stars : astropy.table.Table
        Its catalogue from :func:`find_stars`.
    size : int, optional
        Odd side of the returned PSF (default 6 x FWHM, clipped to [15, 63]).
    saturation, mask, background, rms : optional
        As in :func:`estimate_psf`.
    snr_min : float, optional
        Minimum aperture S/N of a star used.
    max_stars : int, optional
        At most this many (the brightest) stars are used.
    beta : float, optional
        Fix the Moffat ``beta`` (e.g. from the other image of the pair) and fit
        the FWHM alone.

    Returns
    -------
    psf : ndarray
        Odd square, unit sum, centred.
    info : dict
        ``n_stars``, ``fwhm``, ``beta``, ``size``.

    Raises
    ------
    ProcessingError
        No usable star or the fit does not converge to a plausible profile.
    """
    _check_catalog(stars, "stars", ("x", "y", "flux", "snr", "fwhm", "flag", "isolated",
                                    "saturated", "star_like"))
    prep = _prepare(image, background=background, rms=rms, saturation=saturation, mask=mask,
                    mask_sources=True, threshold=10.0)
    sub, bad = prep.sub, prep.bad
    ny, nx = sub.shape
    x = np.asarray(stars["x"], np.float64)
    y = np.asarray(stars["y"], np.float64)
    fw = np.asarray(stars["fwhm"], np.float64)
    snr = np.asarray(stars["snr"], np.float64)
    good = (np.asarray(stars["star_like"], bool) & np.asarray(stars["isolated"], bool)
            & ~np.asarray(stars["saturated"], bool)
            & ((np.asarray(stars["flag"]) & _BAD_FLAGS) == 0) & (snr >= snr_min)
            & np.isfinite(x) & np.isfinite(y) & np.isfinite(fw) & (fw > 0))
    if not good.any():
        raise ProcessingError("no bright, isolated, unsaturated star to fit a PSF model to")
    f0 = float(np.median(fw[good]))
    h = int(np.clip(np.ceil(2.5 * f0), 4, 30))
    cx, cy = np.rint(x).astype(np.intp), np.rint(y).astype(np.intp)
    good &= (cx - h >= 0) & (cx + h < nx) & (cy - h >= 0) & (cy + h < ny)
    idx = [i for i in np.nonzero(good)[0][np.argsort(-snr[good])]
           if not bad[cy[i] - h:cy[i] + h + 1, cx[i] - h:cx[i] + h + 1].any()][:max_stars]
    if not idx:
        raise ProcessingError("no bright, isolated, unsaturated star with a clean stamp to fit "
                              "a PSF model to")
    n = 2 * h + 1
    stamps = [sub[cy[i] - h:cy[i] + h + 1, cx[i] - h:cx[i] + h + 1].astype(np.float64)
              for i in idx]
    scale = [max(float(s.max()), 1e-30) for s in stamps]
    offs = [(x[i] - cx[i], y[i] - cy[i]) for i in idx]

    def resid(par):
        fwhm = par[0]
        beta = float(np.exp(par[1])) if fixed is None else fixed
        out = []
        for st, sc, (dx, dy) in zip(stamps, scale, offs):
            m = moffat_image(fwhm, beta, n, dx=dx, dy=dy, oversample=3)
            design = np.column_stack([m.ravel(), np.ones(m.size)])
            coef, *_ = np.linalg.lstsq(design, st.ravel(), rcond=None)
            out.append((st.ravel() - design @ coef) / sc)
        return np.concatenate(out)

    fixed = None if beta is None else float(beta)
    if fixed is not None and not 1.0 < fixed < 1e3:
        raise InputError(f"beta must be in (1, 1000), got {beta}")
    from scipy import optimize

    best = None
    for b0 in ((2.5, 4.0, 8.0) if fixed is None else (fixed,)):
        x0, lo, hi = ([f0, np.log(b0)], [0.5, np.log(1.2)], [60.0, np.log(50.0)])
        if fixed is not None:
            x0, lo, hi = x0[:1], lo[:1], hi[:1]
        try:
            res = optimize.least_squares(resid, x0, bounds=(lo, hi))
        except (ValueError, np.linalg.LinAlgError):
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None or not best.success:
        raise ProcessingError("the PSF model fit to the stars did not converge; pass a PSF")
    fwhm = float(best.x[0])
    beta = float(np.exp(best.x[1])) if fixed is None else fixed
    if size is None:
        size = int(np.clip(_odd(6.0 * fwhm), 15, 63))
    psf = moffat_image(fwhm, beta, size)
    log.info("PSF model from %d star(s): Moffat FWHM %.2f px, beta %.2f, size %d", len(idx),
             fwhm, beta, size)
    return psf, dict(n_stars=len(idx), fwhm=fwhm, beta=beta, size=int(size))


# ----------------------------------------------------------------------------------------------
# PSF photometry
# ----------------------------------------------------------------------------------------------
def psf_photometry(image, x, y, psf, *, rms, gain=None, mask=None, annulus=(1.0, 6.0)
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF-fit fluxes at known positions, with a local annulus background.

    For each source the unit-sum ``psf`` is moved to the source's sub-pixel
    position (cubic spline) and its amplitude fitted by least squares,
    ``flux = sum P (I - B) / sum P^2`` over the PSF stamp, where ``B`` is the
    sigma-clipped median of an annulus just outside the stamp. This is the
    flux ZOGY's model assigns to the source (``N = F_n T (x) P_n`` with the
    same unit-sum PSF), so a ratio of such fluxes measured with each image's
    own PSF is the flux ratio ZOGY needs, whatever part of the light the PSF
    model misses; and it weights the core, so it is far less sensitive than a
    wide aperture to neighbours and to background errors.

    Parameters
    ----------
    image : array_like, 2-D
        Image, background included or not (the annulus removes it).
    x, y : array_like
        Positions (0-based pixels, ``x`` = column).
    psf : array_like, 2-D
        Odd-sided PSF centred on its middle pixel (normalised here).
    rms : float or ndarray
        Background noise (scalar or map of the image shape).
    gain : float, optional
        Electrons per image unit; adds the source's Poisson noise to the errors.
    mask : ndarray of bool, optional
        Bad pixels; a source with one in its stamp gets ``ok = False``.
    annulus : (float, float), optional
        Inner and outer radius of the background annulus in pixels beyond
        the stamp's half-side.

    Returns
    -------
    flux, flux_err : ndarray
        PSF fluxes and their 1-sigma errors (NaN where not measured).
    ok : ndarray of bool
        The whole stamp and annulus lie inside the image, free of masked pixels.

    Raises
    ------
    InputError
        Invalid image, PSF, ``rms`` or mask.
    """
    data = _as_image(image).astype(np.float64, copy=False)
    p = np.asarray(psf, np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1] or p.shape[0] % 2 == 0 or not p.sum() > 0:
        raise InputError(f"psf must be a square odd-sided 2-D array with a positive sum "
                         f"(got shape {p.shape})")
    p = p / p.sum()
    rms = _as_plane(rms, data.shape, "rms", positive=True)
    bad = _as_mask(mask, data.shape)
    if bad is None:
        bad = ~np.isfinite(data)
    else:
        bad = bad | ~np.isfinite(data)
    x = np.atleast_1d(np.asarray(x, np.float64))
    y = np.atleast_1d(np.asarray(y, np.float64))
    n = len(x)
    flux = np.full(n, np.nan)
    err = np.full(n, np.nan)
    ok = np.zeros(n, bool)
    h = p.shape[0] // 2
    r_in, r_out = h + annulus[0], h + annulus[1]
    big = int(np.ceil(r_out)) + 1
    ny, nx = data.shape
    yy, xx = np.indices((2 * big + 1, 2 * big + 1)) - big
    inner = slice(big - h, big + h + 1)
    from scipy import ndimage

    for i in range(n):
        if not (np.isfinite(x[i]) and np.isfinite(y[i])):
            continue
        ix, iy = int(np.rint(x[i])), int(np.rint(y[i]))
        if iy - big < 0 or ix - big < 0 or iy + big >= ny or ix + big >= nx:
            continue
        sl = (slice(iy - big, iy + big + 1), slice(ix - big, ix + big + 1))
        if bad[sl][inner, inner].any():
            continue
        cut = data[sl]
        dx, dy = x[i] - ix, y[i] - iy
        r = np.hypot(xx - dx, yy - dy)
        ring = (r >= r_in) & (r <= r_out) & ~bad[sl]
        if ring.sum() < 20:
            continue
        vals = sigma_clip(cut[ring], sigma=3.0, maxiters=5, cenfunc="median",
                          stdfunc="mad_std").compressed()
        if vals.size < 10:
            continue
        b = float(np.median(vals))
        b_var = (1.2533 * float(mad_std(vals))) ** 2 / vals.size
        ps = ndimage.shift(p, (dy, dx), order=3, mode="constant", cval=0.0)
        ps /= ps.sum()
        stamp = cut[inner, inner] - b
        p2 = float(np.sum(ps * ps))
        a = float(np.sum(ps * stamp)) / p2
        v = rms[sl][inner, inner] ** 2 if np.ndim(rms) == 2 else float(rms) ** 2
        if gain is not None:
            v = v + np.clip(a * ps, 0.0, None) / float(gain)
        flux[i] = a
        err[i] = np.sqrt(float(np.sum(ps * ps * v)) / (p2 * p2)
                         + b_var * (float(ps.sum()) / p2) ** 2)
        ok[i] = True
    return flux, err, ok


def _fill_small_holes(img: np.ndarray, holes: np.ndarray, size: int = 7,
                      min_weight: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with the pixels of ``holes`` replaced by the mean of the good pixels
    in a ``size`` x ``size`` box around each (normalised convolution), where at
    least ``min_weight`` of the box is good (holes up to ~6 px across, such as a
    dilated cosmic-ray mask); returns the filled image and the holes too large
    to fill.  Only the boxes around holes are computed."""
    out = img.copy()
    big = np.zeros_like(holes)
    h = size // 2
    lab, _ = ndimage.label(holes)
    for sl in ndimage.find_objects(lab):
        y0, y1 = max(sl[0].start - h, 0), min(sl[0].stop + h, img.shape[0])
        x0, x1 = max(sl[1].start - h, 0), min(sl[1].stop + h, img.shape[1])
        hole = holes[y0:y1, x0:x1]
        win = np.where(hole, 0.0, img[y0:y1, x0:x1])
        num = ndimage.uniform_filter(win, size, mode="constant")
        den = ndimage.uniform_filter((~hole).astype(np.float64), size, mode="constant")
        ok = hole & (den >= min_weight)
        out[y0:y1, x0:x1][ok] = num[ok] / den[ok]
        big[y0:y1, x0:x1] |= hole & ~ok
    return out, big


def _convolve_same(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Linear convolution of ``img`` with an odd-sided ``kernel``, cropped to
    ``img``'s shape and centred (``scipy.signal.fftconvolve(..., mode="same")``,
    the same values, without importing scipy.signal: 0.36 s of a run)."""
    from scipy import fft

    shape = [fft.next_fast_len(a + b - 1, real=True) for a, b in zip(img.shape, kernel.shape)]
    full = fft.irfft2(fft.rfft2(img, shape) * fft.rfft2(kernel, shape), shape)
    y0, x0 = (kernel.shape[0] - 1) // 2, (kernel.shape[1] - 1) // 2
    return full[y0:y0 + img.shape[0], x0:x0 + img.shape[1]]


def cross_convolved_photometry(new, ref, new_psf, ref_psf, xy_new, xy_ref, radius, *,
                               rms_new, rms_ref, mask_new=None, mask_ref=None,
                               fill_new=None, fill_ref=None, inner=None) -> tuple:
    """Aperture fluxes of matched sources after giving both images one PSF.

    ``new`` is convolved with the reference PSF and ``ref`` with the new one,
    so that both have the PSF ``P_n (x) P_r``; a static source of any shape
    then has the same profile in the two, scaled by ``F_n / F_r``, and the
    ratio of fluxes in one aperture is the flux ratio for galaxies as well as
    for stars (an aperture or PSF fit of a galaxy under two different PSFs is
    not).

    Parameters
    ----------
    new, ref : array_like, 2-D
        Background-subtracted images of one shape (NaN: not measured).
    new_psf, ref_psf : array_like, 2-D
        Their odd-sided PSFs (normalised here).
    xy_new, xy_ref : array_like, shape (N, 2)
        Positions (x, y) of the N matched sources in each image.
    radius : array_like, shape (N,) or float
        Aperture radius of each pair in pixels (the same in both images).
    rms_new, rms_ref : float or ndarray
        Background noise of the images before convolution.
    mask_new, mask_ref : ndarray of bool, optional
        Bad pixels (saturated, ...): every aperture that the convolution carries
        one into is left out.
    fill_new, fill_ref : ndarray of bool, optional
        Pixels lost to small defects (cosmic-ray hits, ...): replaced by a
        weighted mean of their neighbours before the convolution, and only the
        apertures with one within the source's own FWHM of its centre are left
        out.  Left out like ``mask_*``, the dilated masks of 600 hits per Mpix
        reached 65 % of a simulated frame, and 19 of its 50 selected sources were
        measured (flux ratio -2.6 %); filled, 47 (-1.0 %; -0.8 % without the
        hits).  Holes too large to fill count as ``mask_*``.
    inner : array_like, shape (N,) or float, optional
        Radii of concentric inner apertures (each below its ``radius``), also
        measured: a static source has one ratio in both, while a transient on a
        galaxy raises one of them (see :func:`contaminated_sources`).

    Returns
    -------
    flux_new, err_new, flux_ref, err_ref : ndarray
        Fluxes and their errors (background noise of the aperture sums).
    ok : ndarray of bool
        Aperture clear of the image edges (by the PSF half-size) and of bad pixels.
    inner_sums : ndarray, shape (N, 8)
        Only with ``inner``: per image (new, then ref), the inner aperture's sum
        and the noise covariances of the inner and full sums of the convolved
        image (:func:`_aperture_noise_forms`).

    Raises
    ------
    InputError
        Images of different shapes, invalid PSFs or positions.
    """
    imgs = [_as_image(new, "new").astype(np.float64), _as_image(ref, "ref").astype(np.float64)]
    if imgs[0].shape != imgs[1].shape:
        raise InputError(f"new and ref must have one shape (got {imgs[0].shape} and "
                         f"{imgs[1].shape})")
    shape = imgs[0].shape
    psfs = []
    for name, p in (("new_psf", new_psf), ("ref_psf", ref_psf)):
        p = np.asarray(p, np.float64)
        if p.ndim != 2 or p.shape[0] % 2 == 0 or p.shape[1] % 2 == 0 or not p.sum() > 0:
            raise InputError(f"{name} must be an odd-sided 2-D array with a positive sum "
                             f"(got shape {p.shape})")
        psfs.append(p / p.sum())
    xys = [np.atleast_2d(np.asarray(v, np.float64)) for v in (xy_new, xy_ref)]
    if xys[0].shape != xys[1].shape or xys[0].shape[1] != 2:
        raise InputError("xy_new and xy_ref must both have shape (N, 2)")
    n = len(xys[0])
    rad = np.broadcast_to(np.asarray(radius, np.float64), (n,)).copy()
    if not np.all(np.isfinite(rad) & (rad > 0)):
        raise InputError("radius must be positive and finite")
    if inner is not None:
        inner = np.broadcast_to(np.asarray(inner, np.float64), (n,)).copy()
        if not np.all(np.isfinite(inner) & (inner > 0) & (inner < rad)):
            raise InputError("inner must be positive, finite and below radius")
    sums_in = []
    h = max(max(p.shape) for p in psfs) // 2
    ok = np.ones(n, bool)
    out = []
    for img, own, other, xy, rms, mask, fill in zip(
            imgs, psfs, psfs[::-1], xys, (rms_new, rms_ref), (mask_new, mask_ref),
            (fill_new, fill_ref)):
        bad = ~np.isfinite(img)
        m = _as_mask(mask, shape)
        if m is not None:
            bad = bad | m
        holes = _as_mask(fill, shape)
        if holes is not None and (holes := holes & ~bad).any():
            img, big = _fill_small_holes(np.where(bad, 0.0, img), holes)
            bad = bad | big
            filled = holes & ~big
            # a filled pixel near a source's peak misses too much of its light
            from .psf import psf_fwhm

            core = max(1.0, psf_fwhm(own))
            fin = np.isfinite(xy).all(axis=1)
            hit, _, _ = sep.sum_circle(filled.astype(np.float64),
                                       np.where(fin, xy[:, 0], 0.0), np.where(fin, xy[:, 1], 0.0),
                                       core, subpix=1)
            ok &= ~(np.asarray(hit) > 0)
        var = _as_plane(rms, shape, "rms", positive=True)
        var = var * var if np.ndim(var) == 0 else np.ascontiguousarray(var ** 2)
        # float32: half the time of float64, ~1e-7 of the brightest pixel per sum
        conv = _convolve_same(np.where(bad, 0.0, img).astype(np.float32),
                              other.astype(np.float32)).astype(np.float64)
        # a bad pixel spoils the convolved image within the PSF's half-size (a square
        # maximum filter is separable: far cheaper than a dilation with a big structure)
        spread = ndimage.maximum_filter(bad, size=2 * h + 1) if bad.any() else bad
        x, y = xy[:, 0], xy[:, 1]
        ok &= (np.isfinite(x) & np.isfinite(y) & (x - rad >= h) & (y - rad >= h)
               & (x + rad <= shape[1] - 1 - h) & (y + rad <= shape[0] - 1 - h))
        xs, ys = np.where(ok, x, h + rad), np.where(ok, y, h + rad)
        f, _, flag = sep.sum_circle(conv, xs, ys, rad, mask=spread, subpix=5)
        ok &= (flag & (sep.APER_HASMASKED | sep.APER_TRUNC)) == 0
        # noise of an aperture sum of the convolved image (the aperture is large
        # against the PSF): that of the image's own aperture sum
        if np.ndim(var) == 0:
            v = var * np.pi * rad * rad
        else:
            v, _, _ = sep.sum_circle(var, xs, ys, rad, subpix=5)
        out += [np.asarray(f, np.float64), np.sqrt(np.maximum(v, 0.0))]
        if inner is not None:
            fi, _, _ = sep.sum_circle(conv, xs, ys, inner, mask=spread, subpix=5)
            sums_in += [np.asarray(fi, np.float64)[:, None],
                        _aperture_noise_forms(other, var, xs, ys, rad, inner, ok)]
    if inner is not None:
        return out[0], out[1], out[2], out[3], ok, np.column_stack(sums_in)
    return out[0], out[1], out[2], out[3], ok


def contaminated_sources(flux_new, flux_ref, inner_sums, *, nsigma: float = 3.0,
                         tolerance: float = 0.05, relative: bool = True,
                         min_relative: int = 5) -> np.ndarray:
    """Sources whose flux ratio differs between an inner aperture and the annulus around it.

    In images given one PSF (:func:`cross_convolved_photometry`) a static
    source, star or galaxy, has the same profile in both, so the ratio of its
    fluxes is the same in any part of it.  A transient (or a variable nucleus)
    on a galaxy adds light to one image only, concentrated where it sits: the
    ratio of the inner aperture and that of the annulus then differ.  Such a
    galaxy is among the brightest, best-measured sources of a star-poor field,
    and a few of them pull a weighted flux ratio by tens of per cent.

    Estimated PSFs that are a little off give every source's two parts
    slightly different ratios (by 5-20 % in a simulated star-poor field), so by
    default each source is compared with the median quotient of the inner and
    annulus ratios of the sources given (``relative``, at least
    ``min_relative`` of them; else with 1): pass sources of one kind (the
    galaxies) measured with one pair of PSFs.

    Parameters
    ----------
    flux_new, flux_ref : array_like, shape (N,)
        Sums in the full apertures.
    inner_sums : array_like, shape (N, 8)
        From ``cross_convolved_photometry(..., inner=...)``: per image the inner
        sum and the noise covariances of the inner and full sums.
    nsigma : float, optional
        Significance of the difference of the two ratios needed.
    tolerance : float, optional
        Least fractional difference of the two ratios (relative to the full
        aperture's) flagged, whatever its significance.
    relative : bool, optional
        Compare with the sources' median quotient of the two ratios.
    min_relative : int, optional
        Fewest sources with both parts measured for ``relative``.

    Returns
    -------
    ndarray of bool
        True where the inner and annulus ratios differ by more than both
        ``nsigma`` errors and ``tolerance``; False where either part has no
        light to compare.
    """
    fn, fr = np.asarray(flux_new, np.float64), np.asarray(flux_ref, np.float64)
    q = np.asarray(inner_sums, np.float64).reshape(-1, 8)
    new_in, ref_in = q[:, 0], q[:, 4]
    new_an, ref_an = fn - new_in, fr - ref_in  # the annulus
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_in, ratio_an = new_in / ref_in, new_an / ref_an
        measurable = (ref_in > 0) & (ref_an > 0) & (new_in > 0) & (new_an > 0)
        expect = 1.0
        if relative and measurable.sum() >= min_relative:
            expect = float(np.median((ratio_in / ratio_an)[measurable]))
        ratio_an = expect * ratio_an  # what the inner ratio should be

        def var_of(forms, a_in, a_an):
            # noise of a_in * X_in / ref_in - a_an * X_an / ref_an, where X are the
            # inner and annulus sums of the image whose noise ``forms`` describe
            ii, io, oo = forms.T
            return ((a_in / ref_in) ** 2 * ii
                    - 2 * a_in * a_an / (ref_in * ref_an) * (io - ii)
                    + (a_an / ref_an) ** 2 * (oo - 2 * io + ii))

        # linearised: d(ratio_in - ratio_an) = dN_in/ref_in - expect dN_an/ref_an
        #                                     - ratio_in dR_in/ref_in + ratio_an dR_an/ref_an
        var = var_of(q[:, 1:4], 1.0, expect) + var_of(q[:, 5:8], ratio_in, ratio_an)
        z = (ratio_in - ratio_an) / np.sqrt(np.maximum(var, 0.0))
        out = (measurable & (var > 0) & (np.abs(z) > nsigma)
               & (np.abs(ratio_in - ratio_an) > tolerance * (fn / fr)))
    return np.where(np.isfinite(z), out, False)


def _aperture_noise_forms(kernel, var, xs, ys, rad, inner, use) -> np.ndarray:
    """``(N, 3)``: the noise variance of the inner aperture sum, its covariance
    with the full aperture's, and the full one's variance, in an image convolved
    with ``kernel`` whose pixel noise variance is ``var`` (scalar or map).

    The sum over an aperture A of ``image (x) kernel`` weighs each image pixel
    by ``w_A = 1_A`` correlated with the kernel, so these are ``sum(var w_a w_b)``:
    the convolution spreads a pixel's noise over both apertures, which the
    noise of a plain aperture sum ignores.  The apertures are those of the
    sources' nearest pixels (enough for an error); rows not in ``use`` are 0.
    """
    out = np.zeros((len(xs), 3))
    kernel = np.asarray(kernel, np.float64)
    ky, kx = kernel.shape[0] // 2, kernel.shape[1] // 2
    templates = {}
    for i in np.flatnonzero(use):
        key = (float(rad[i]), float(inner[i]))
        if key not in templates:
            r = int(math.ceil(key[0]))
            yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
            d2 = (yy * yy + xx * xx).astype(np.float64)
            w = [ndimage.correlate(np.pad((d2 <= a * a).astype(np.float64), ((ky, ky), (kx, kx))),
                                   kernel, mode="constant") for a in (key[1], key[0])]
            forms = np.array([np.sum(w[0] * w[0]), np.sum(w[0] * w[1]), np.sum(w[1] * w[1])])
            templates[key] = (r + ky, r + kx, w[0], w[1], forms)
        hy, hx, wi, wo, forms = templates[key]
        if np.ndim(var) == 0:
            out[i] = var * forms
            continue
        iy, ix = int(round(ys[i])), int(round(xs[i]))
        v = var[max(iy - hy, 0):iy + hy + 1, max(ix - hx, 0):ix + hx + 1]
        if v.shape != wi.shape:  # at an edge: the median noise of what there is
            out[i] = float(np.median(v)) * forms if v.size else np.nan
            continue
        out[i] = np.sum(v * wi * wi), np.sum(v * wi * wo), np.sum(v * wo * wo)
    return out


# ----------------------------------------------------------------------------------------------
# matching, flux ratio, astrometric noise
# ----------------------------------------------------------------------------------------------
def _xy(cat, name) -> np.ndarray:
    if isinstance(cat, np.ndarray) and cat.dtype.names is None:
        arr = np.asarray(cat, np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise InputError(f"{name} as an array must have shape (N, 2) holding x, y")
        return arr
    _check_catalog(cat, name, ("x", "y"))
    return np.column_stack([np.asarray(cat["x"], np.float64), np.asarray(cat["y"], np.float64)])


def match_stars(cat_a, cat_b, *, radius=2.0) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour matching of two catalogues within ``radius``.

    Parameters
    ----------
    cat_a, cat_b : astropy.table.Table or ndarray
        Tables with ``x`` and ``y`` columns, or (N, 2) arrays of (x, y).
    radius : float, optional
        Maximum separation in pixels.

    Returns
    -------
    idx_a, idx_b : ndarray of int
        Row indices of matched pairs, ``cat_a[idx_a[k]] <-> cat_b[idx_b[k]]``.
        When several sources of ``cat_a`` share a nearest neighbour in
        ``cat_b`` only the closest pair is kept.

    Raises
    ------
    InputError
        A catalogue lacks ``x``/``y`` or ``radius`` is not positive.
    """
    _check_number("radius", radius, minimum=0)
    a = _xy(cat_a, "cat_a")
    b = _xy(cat_b, "cat_b")
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    fa = np.all(np.isfinite(a), axis=1)
    fb = np.nonzero(np.all(np.isfinite(b), axis=1))[0]
    if len(fb) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    from scipy.spatial import cKDTree
    tree = cKDTree(b[fb])
    ia = np.nonzero(fa)[0]
    d, j = tree.query(a[ia], k=1, distance_upper_bound=float(radius))
    ok = np.isfinite(d)
    ia, jb, d = ia[ok], fb[j[ok]], d[ok]
    order = np.argsort(d, kind="stable")
    ia, jb = ia[order], jb[order]
    _, first = np.unique(jb, return_index=True)
    first = np.sort(first)
    ia, jb = ia[first], jb[first]
    srt = np.argsort(ia)
    return ia[srt].astype(np.intp), jb[srt].astype(np.intp)


def _col(cat, name, default=None):
    cols = getattr(cat, "colnames", None) or list(cat.keys())
    if name in cols:
        return np.asarray(cat[name])
    return default


def _good_pairs(new_cat, ref_cat, radius, snr_min, isolated_only, point_sources=False):
    for name, cat in (("new_cat", new_cat), ("ref_cat", ref_cat)):
        _check_catalog(cat, name, ("x", "y", "flux", "flux_err"))
    _check_number("snr_min", snr_min)
    ia, ib = match_stars(new_cat, ref_cat, radius=radius)
    ok = np.ones(len(ia), bool)
    for cat, ii in ((new_cat, ia), (ref_cat, ib)):
        f = np.asarray(cat["flux"], np.float64)[ii]
        fe = np.asarray(cat["flux_err"], np.float64)[ii]
        with np.errstate(invalid="ignore", divide="ignore"):
            ok &= np.isfinite(f) & np.isfinite(fe) & (fe > 0) & (f > 0) & (f / fe >= snr_min)
        sat = _col(cat, "saturated")
        if sat is not None:
            ok &= ~sat.astype(bool)[ii]
        flag = _col(cat, "flag")
        if flag is not None:
            ok &= (flag.astype(np.int64)[ii] & _BAD_FLAGS) == 0
        iso = _col(cat, "isolated")
        if isolated_only and iso is not None:
            ok &= iso.astype(bool)[ii]
        star = _col(cat, "star_like")
        if point_sources and star is not None:
            ok &= star.astype(bool)[ii]
    return ia[ok], ib[ok]


def _matched_for(new_cat, ref_cat, radius, snr_min, isolated_only, min_stars, least, what,
                 hint, point_sources=False):
    """Matched bright unsaturated pairs for a fit of ``what``; ProcessingError when too few."""
    _check_number("min_stars", min_stars, minimum=least, integer=True)
    ia, ib = _good_pairs(new_cat, ref_cat, radius, snr_min, isolated_only, point_sources)
    if len(ia) < min_stars:
        raise ProcessingError(f"only {len(ia)} matched bright unsaturated stars for {what} "
                              f"(min_stars={min_stars}); check the registration, increase "
                              f"radius= or lower snr_min={hint}")
    return ia, ib


def fit_flux_ratio(new_cat, ref_cat, *, radius=2.0, snr_min=20.0, min_stars=5, clip=3.0,
                   isolated_only=True, point_sources=True, aperture_correction=True,
                   max_iter=20, columns=("flux", "flux_err")) -> tuple[float, float, int]:
    """Flux ratio ``F_n / F_r`` from matched stars, with outlier rejection.

    Uses matched pairs that are unsaturated, cleanly measured, (optionally)
    isolated and point-like, and have ``S/N >= snr_min`` in both catalogues.
    The estimate is an inverse-variance weighted mean of ``flux_new /
    flux_ref`` whose weights combine each star's photometric error with an
    intrinsic scatter term (fitted so that the reduced chi^2 is 1). Stars
    more than ``clip`` robust standard deviations from the median ratio are
    rejected first; then stars more than ``clip`` robust standard deviations
    from the weighted mean are rejected and the fit repeated until the set of
    stars no longer changes.

    Aperture fluxes miss different fractions of the light when the two PSFs
    differ; with ``aperture_correction=True`` the ratio is multiplied by
    ``apcorr_ref / apcorr_new`` from the catalogues' ``meta`` (see
    :func:`find_stars`) so that it refers to total fluxes, as ZOGY's unit-sum
    PSFs require. The (small) error of the corrections is not propagated.

    Parameters
    ----------
    new_cat, ref_cat : astropy.table.Table
        Catalogues of the new and reference images (from :func:`find_stars`;
        needs ``x, y, flux, flux_err``; ``saturated``, ``flag``, ``isolated``
        are used when present). Both must use the same aperture definition
        relative to their PSFs (``find_stars`` uses 2 x FWHM).
    radius : float, optional
        Matching radius in pixels.
    snr_min : float, optional
        Minimum aperture S/N in both images.
    min_stars : int, optional
        Fewest stars accepted.
    clip : float, optional
        Rejection threshold in units of the robust normalised scatter.
    isolated_only : bool, optional
        Use only stars flagged ``isolated`` in both catalogues.
    point_sources : bool, optional
        Use only sources flagged ``star_like`` in both catalogues (when they
        have the column): an extended source loses a different fraction of
        its light from an aperture, or a PSF fit, under a narrow and a broad
        PSF, and in a field with few stars the galaxies would set the ratio.
    aperture_correction : bool, optional
        Correct to total fluxes with ``meta['aperture_correction']`` when both
        catalogues carry a finite value (otherwise a warning is logged).
    max_iter : int, optional
        Maximum number of rejection iterations.
    columns : (str, str), optional
        Flux and flux-error columns to fit (e.g. PSF fluxes from
        :func:`psf_photometry`; pass ``aperture_correction=False`` with those).
        The S/N selection always uses ``flux``/``flux_err``.

    Returns
    -------
    ratio : float
        ``F_n / F_r``.
    ratio_err : float
        Its 1-sigma error (including the intrinsic scatter).
    n_used : int
        Number of stars in the final fit.

    Raises
    ------
    InputError
        A catalogue lacks required columns or an option is invalid.
    ProcessingError
        Fewer than ``min_stars`` usable matched stars.
    """
    ia, ib = _matched_for(new_cat, ref_cat, radius, snr_min, isolated_only, min_stars, 1,
                          "the flux ratio", ", or pass the ratio", point_sources)
    fcol, ecol = columns
    if (fcol, ecol) != ("flux", "flux_err"):
        for name, cat in (("new_cat", new_cat), ("ref_cat", ref_cat)):
            _check_catalog(cat, name, (fcol, ecol))
    fn = np.asarray(new_cat[fcol], np.float64)[ia]
    fr = np.asarray(ref_cat[fcol], np.float64)[ib]
    en = np.asarray(new_cat[ecol], np.float64)[ia]
    er = np.asarray(ref_cat[ecol], np.float64)[ib]
    with np.errstate(invalid="ignore", divide="ignore"):
        good = (np.isfinite(fn) & np.isfinite(fr) & np.isfinite(en) & np.isfinite(er)
                & (fn > 0) & (fr > 0) & (en > 0) & (er > 0))
    if good.sum() < min_stars:
        raise ProcessingError(f"only {int(good.sum())} matched stars with valid {fcol} for "
                              f"the flux ratio (min_stars={min_stars}); pass the ratio")
    fn, fr, en, er = fn[good], fr[good], en[good], er[good]
    r = fn / fr
    e2 = r * r * ((en / fn) ** 2 + (er / fr) ** 2)

    # robust start: reject outliers about the median first (galaxies, variables and
    # blends among the brightest, best-weighted stars would otherwise pull the
    # weighted mean and inflate the intrinsic scatter enough to survive the clip)
    ratio = float(np.median(r))
    z0 = (r - ratio) / np.sqrt(e2)
    keep = np.abs(z0) <= clip * max(1.0, float(mad_std(z0)))
    if keep.sum() < min_stars:
        keep = np.ones(len(r), bool)
    s2 = 0.0
    for _ in range(max_iter):
        rk, ek = r[keep], e2[keep]

        def excess(s2_):
            w = 1.0 / (ek + s2_)
            m = np.sum(w * rk) / np.sum(w)
            return np.sum(w * (rk - m) ** 2) / max(len(rk) - 1, 1) - 1.0

        if len(rk) > 2 and excess(0.0) > 0:
            hi = max(np.var(rk), 1e-30)
            while excess(hi) > 0:
                hi *= 4.0
            from scipy import optimize
            s2 = optimize.brentq(excess, 0.0, hi, xtol=1e-14 * max(ratio * ratio, 1e-30))
        else:
            s2 = 0.0
        w = 1.0 / (ek + s2)
        ratio = float(np.sum(w * rk) / np.sum(w))
        z = (r - ratio) / np.sqrt(e2 + s2)
        scale = max(1.0, float(mad_std(z[keep])))
        new_keep = np.abs(z) <= clip * scale
        if new_keep.sum() < min_stars:
            break
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    w = 1.0 / (e2[keep] + s2)
    ratio = float(np.sum(w * r[keep]) / np.sum(w))
    ratio_err = float(1.0 / np.sqrt(np.sum(w)))
    n_used = int(keep.sum())
    if aperture_correction:
        acn = getattr(new_cat, "meta", {}).get("aperture_correction", np.nan)
        acr = getattr(ref_cat, "meta", {}).get("aperture_correction", np.nan)
        if np.isfinite(acn) and np.isfinite(acr) and acn > 0 and acr > 0:
            ratio *= acr / acn
            ratio_err *= acr / acn
        else:
            log.warning("no aperture corrections in the catalogues' meta; the flux ratio is "
                        "that of aperture fluxes")
    log.info("flux ratio F_n/F_r = %.4f +- %.4f from %d stars (intrinsic scatter %.3g)",
             ratio, ratio_err, n_used, np.sqrt(s2))
    return ratio, ratio_err, n_used


def _ml_sigma(d, e2):
    """ML mean and extra scatter of ``d`` with known per-point variances ``e2``."""

    def mean_for(s2):
        w = 1.0 / (e2 + s2)
        return np.sum(w * d) / np.sum(w)

    def nll(log_s):
        s2 = np.exp(2 * log_s)
        v = e2 + s2
        m = mean_for(s2)
        return 0.5 * np.sum(np.log(v) + (d - m) ** 2 / v)

    spread = float(np.std(d)) if len(d) > 1 else 1.0
    spread = max(spread, 1e-6)
    lo, hi = np.log(spread * 1e-4), np.log(spread * 3.0)
    from scipy import optimize
    res = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded",
                                   options=dict(xatol=1e-4))
    s = float(np.exp(res.x))
    if s <= spread * 1.01e-4 or nll(lo) <= res.fun:  # at the lower bound: no extra scatter
        s = 0.0
    return float(mean_for(s * s)), s


def astrometric_sigma(new_cat, ref_cat, *, radius=2.0, snr_min=20.0, min_stars=5, clip=4.0,
                      isolated_only=True, max_iter=20) -> tuple[float, float, int]:
    """RMS registration error per axis from matched stars' centroid offsets.

    This is ZOGY's ``(sigma_x, sigma_y)`` (eq. 30): the scatter of
    ``x_new - x_ref`` (and ``y``) about its mean, *not* the mean or median
    offset, with the stars' own centroid noise removed. Per axis, offsets
    ``d_i`` are modelled as ``N(mu, sigma^2 + e_i^2)`` where ``e_i^2`` is the
    sum of the two catalogues' centroid variances, and ``(mu, sigma)`` are
    fitted by maximum likelihood; stars with a normalised offset beyond
    ``clip`` on either axis are rejected and the fit repeated.

    Centroid errors come from the ``x_err``/``y_err`` columns (as written by
    :func:`find_stars`); without them, from ``fwhm / (2.3548 * snr)`` if
    ``fwhm`` exists (an upper-end approximation); otherwise they are taken as
    zero and the result includes the centroid noise (a warning is logged).

    Parameters
    ----------
    new_cat, ref_cat : astropy.table.Table
        Catalogues of the registered new and reference images.
    radius : float, optional
        Matching radius in pixels.
    snr_min : float, optional
        Minimum aperture S/N in both images.
    min_stars : int, optional
        Fewest stars accepted.
    clip : float, optional
        Rejection threshold on the normalised offset per axis.
    isolated_only : bool, optional
        Use only stars flagged ``isolated`` in both catalogues.
    max_iter : int, optional
        Maximum number of rejection iterations.

    Returns
    -------
    sigma_x, sigma_y : float
        RMS registration error along x and y in pixels (0 when the offsets are
        fully explained by centroid noise).
    n_used : int
        Number of stars in the final fit.

    Raises
    ------
    InputError
        A catalogue lacks required columns or an option is invalid.
    ProcessingError
        Fewer than ``min_stars`` usable matched stars.
    """
    fit = _offset_fit(new_cat, ref_cat, radius=radius, snr_min=snr_min, min_stars=min_stars,
                      clip=clip, isolated_only=isolated_only, max_iter=max_iter)
    return fit["sx"], fit["sy"], fit["n"]


def registration_offset(new_cat, ref_cat, *, radius=2.0, snr_min=20.0, min_stars=5, clip=4.0,
                        isolated_only=True, max_iter=20) -> tuple[float, float, float, float, int]:
    """Mean sub-pixel offset ``new - ref`` of matched stars and its uncertainty.

    The same maximum-likelihood fit as :func:`astrometric_sigma`: per axis the
    offsets are ``N(mu, sigma^2 + e_i^2)``; this returns ``mu`` (the residual
    registration shift of the two images) and its standard error
    ``1 / sqrt(sum 1 / (sigma^2 + e_i^2))``.

    Parameters
    ----------
    new_cat, ref_cat : astropy.table.Table
        Catalogues of the new and reference images (from :func:`find_stars`).
    radius, snr_min, min_stars, clip, isolated_only, max_iter
        As in :func:`astrometric_sigma`.

    Returns
    -------
    dx, dy : float
        Mean offset ``x_new - x_ref``, ``y_new - y_ref`` in pixels.
    dx_err, dy_err : float
        Their 1-sigma errors.
    n_used : int
        Number of stars in the final fit.

    Raises
    ------
    InputError
        A catalogue lacks required columns or an option is invalid.
    ProcessingError
        Fewer than ``min_stars`` usable matched stars.
    """
    fit = _offset_fit(new_cat, ref_cat, radius=radius, snr_min=snr_min, min_stars=min_stars,
                      clip=clip, isolated_only=isolated_only, max_iter=max_iter)
    return fit["mx"], fit["my"], fit["ex"], fit["ey"], fit["n"]


def _offset_fit(new_cat, ref_cat, *, radius, snr_min, min_stars, clip, isolated_only,
                max_iter) -> dict:
    """ML mean and extra scatter of matched stars' offsets per axis (see astrometric_sigma)."""
    ia, ib = _matched_for(new_cat, ref_cat, radius, snr_min, isolated_only, min_stars, 2,
                          "the astrometric noise", "")
    dx = np.asarray(new_cat["x"], np.float64)[ia] - np.asarray(ref_cat["x"], np.float64)[ib]
    dy = np.asarray(new_cat["y"], np.float64)[ia] - np.asarray(ref_cat["y"], np.float64)[ib]

    def cvar(cat, ii, axis):
        col = _col(cat, f"{axis}_err")
        if col is not None:
            v = np.asarray(col, np.float64)[ii] ** 2
            if np.all(np.isfinite(v)):
                return v
        fw = _col(cat, "fwhm")
        if fw is not None:
            snr = np.asarray(cat["flux"], np.float64)[ii] / np.asarray(cat["flux_err"],
                                                                        np.float64)[ii]
            return (np.asarray(fw, np.float64)[ii] / _FWHM_PER_SIGMA / snr) ** 2
        return None

    evx = [cvar(new_cat, ia, "x"), cvar(ref_cat, ib, "x")]
    evy = [cvar(new_cat, ia, "y"), cvar(ref_cat, ib, "y")]
    if any(v is None for v in evx + evy):
        log.warning("catalogues lack centroid errors (x_err/y_err or fwhm); the astrometric "
                    "sigma includes the centroid noise")
    ex2 = sum(v for v in evx if v is not None) if any(v is not None for v in evx) \
        else np.zeros(len(dx))
    ey2 = sum(v for v in evy if v is not None) if any(v is not None for v in evy) \
        else np.zeros(len(dy))
    ex2 = np.where(np.isfinite(ex2), ex2, np.nanmedian(ex2) if np.isfinite(ex2).any() else 0.0)
    ey2 = np.where(np.isfinite(ey2), ey2, np.nanmedian(ey2) if np.isfinite(ey2).any() else 0.0)

    # robust start: reject gross outliers around the median
    keep = np.ones(len(dx), bool)
    for d in (dx, dy):
        med = np.median(d)
        s = max(float(mad_std(d)), 1e-6)
        keep &= np.abs(d - med) <= 2.0 * clip * s
    if keep.sum() < min_stars:
        keep = np.ones(len(dx), bool)
    mx = my = sx = sy = 0.0
    for _ in range(max_iter):
        mx, sx = _ml_sigma(dx[keep], ex2[keep])
        my, sy = _ml_sigma(dy[keep], ey2[keep])
        zx = (dx - mx) / np.sqrt(sx * sx + ex2)
        zy = (dy - my) / np.sqrt(sy * sy + ey2)
        new_keep = (np.abs(zx) <= clip) & (np.abs(zy) <= clip)
        if new_keep.sum() < min_stars or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    n_used = int(keep.sum())
    with np.errstate(divide="ignore"):
        emx = float(1.0 / np.sqrt(np.sum(1.0 / (ex2[keep] + sx * sx))))
        emy = float(1.0 / np.sqrt(np.sum(1.0 / (ey2[keep] + sy * sy))))
    log.info("astrometric sigma (x, y) = (%.4f, %.4f) px from %d stars (mean offset %.4f "
             "+- %.4f, %.4f +- %.4f)", sx, sy, n_used, mx, emx, my, emy)
    return dict(mx=float(mx), my=float(my), sx=float(sx), sy=float(sy), ex=emx, ey=emy,
                n=n_used)
