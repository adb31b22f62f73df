"""Cosmic-ray detection and a PSF-sharpness test for transient candidates.

:func:`detect_cosmic_rays` wraps the L.A.Cosmic implementation of
`astroscrappy <https://github.com/astropy/astroscrappy>`_ (an optional
dependency: ``pip install astroscrappy``). :func:`sharpness` and
:func:`sharper_than_psf` compare a candidate's profile with the PSF, e.g. to
flag single-exposure cosmic rays or hot pixels among difference-image
detections.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from astropy.stats import mad_std

from .errors import InputError, ProcessingError

__all__ = ["UNDERSAMPLED_FWHM", "CosmicsUnavailableError", "detect_cosmic_rays", "drop_coincident",
           "exposure_cosmic_rays", "sharpness", "sharper_than_psf"]

log = logging.getLogger(__name__)


class CosmicsUnavailableError(ProcessingError, ImportError):
    """astroscrappy, needed for cosmic-ray detection, is not installed."""


def _import_astroscrappy():
    try:
        import astroscrappy
    except ImportError as exc:
        raise CosmicsUnavailableError(
            "cosmic-ray detection needs astroscrappy, which is not installed; run "
            "'pip install astroscrappy' or disable cosmic-ray masking") from exc
    return astroscrappy


def _positive(name, value, *, allow_zero=False):
    try:
        ok = np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    except TypeError:
        ok = False
    if not ok:
        raise InputError(f"{name}={value!r} must be a finite "
                         f"{'non-negative' if allow_zero else 'positive'} number")


def detect_cosmic_rays(image, *, gain=1.0, read_noise=5.0, saturation=None, sigclip=4.5,
                       sigfrac=0.3, objlim=5.0, niter=4, mask=None, sky=None,
                       fwhm=None, min_significance=None, grow=1,
                       windowed=True, psf=None) -> np.ndarray:
    """Boolean mask of cosmic-ray pixels (L.A.Cosmic via astroscrappy).

    L.A.Cosmic's Laplacian test at ``sigclip`` = 4.5 also fires on single
    pixels of plain Poisson noise (tens per megapixel), so each connected
    group it flags is kept only if its brightest pixel stands above the
    cleaned image (astroscrappy's replacement values) by ``min_significance``
    times that pixel's noise (``sqrt(clean * gain + read_noise^2) / gain``):
    by default ``sqrt(2 ln N_pix) + 0.5``, a level that noise reaches in
    fewer than one pixel in a hundred images (about 5.8 for a megapixel),
    while real hits stand tens of sigma high.  Kept groups are followed up to
    3 px into neighbours more than 3 sigma above the local median (a
    resampled image spreads a hit over pixels the Laplacian test misses),
    then grown by ``grow`` pixels: the faint wings of a hit (and the
    interpolation ringing of a hit or hot pixel in a resampled image) are
    below the Laplacian limit but not below the transient threshold.

    Parameters
    ----------
    image : array_like, 2-D
        Image in ADU **including the sky** (L.A.Cosmic's noise model needs it).
        For a sky-subtracted image pass the subtracted level as ``sky``; when
        the level is unknown and the measured background noise is well above
        what the model predicts, the sky that explains it is added back.
    gain : float, optional
        Electrons per ADU.
    read_noise : float, optional
        Read noise in electrons.
    saturation : float, optional
        Saturation level in ADU (of ``image + sky``); saturated stars are
        protected. Default: no saturation.
    sigclip : float, optional
        Laplacian-to-noise detection limit (lower flags more pixels).
    sigfrac : float, optional
        Fraction of ``sigclip`` used to grow detections into neighbours.
    objlim : float, optional
        Minimum contrast between the Laplacian and the fine-structure image;
        raise it if cores of sharp (undersampled) stars get flagged.
    niter : int, optional
        Number of L.A.Cosmic iterations.
    mask : ndarray of bool, optional
        Bad pixels (True) to ignore; never flagged in the result.
    sky : float or ndarray, optional
        Sky level (ADU) to add back to a sky-subtracted image.
    fwhm : float, optional
        PSF FWHM in pixels. If given, the fine-structure image is built by
        convolving with a Gaussian of this FWHM (astroscrappy's
        ``fsmode='convolve'``) instead of median filtering. With the default
        ``objlim`` it misses most compact hits: on a simulated exposure none
        of the 2x2-pixel hits at FWHM 4 px, and 97 % of all hits at FWHM 2 px
        (the median filter: 1 %). Prefer ``psf``.
    min_significance : float, optional
        Peak significance a flagged group needs (default ``sqrt(2 ln N) + 0.5``
        for an image of ``N`` pixels; 0 keeps every group).
    grow : int, optional
        Pixels by which the kept groups are grown (0: not at all).
    windowed : bool, optional
        Run L.A.Cosmic only in windows around the pixels that can pass its
        first test (default; same result, several times faster on a sparse
        field); False runs it on the whole image.
    psf : ndarray, 2-D, optional
        The image's PSF (odd sides, centred).  A flagged group whose peak does
        not stand above a PSF fit to its source (in none of the four directions
        of :func:`sharpness` an index above 0.15 with an excess above 2 sigma)
        is a star or a transient, not a hit, and is dropped.  L.A.Cosmic's
        median filter flags the cores of undersampled stars: on a simulated
        clean 1 Mpix frame at FWHM 2 px 1427 pixels in 62 groups, after this
        test one group (a star on the border), while it keeps 98 % of the hits
        at FWHM 2 px and 99.6-99.7 % at 2.5-4 px.

    Returns
    -------
    ndarray of bool
        True where a cosmic ray was found; same shape as ``image``.

    Raises
    ------
    CosmicsUnavailableError
        astroscrappy is not installed (a :class:`ProcessingError` and an
        :class:`ImportError`).
    InputError
        ``image`` is not 2-D, ``mask``/``sky`` do not match it, or an option
        is out of range.
    """
    astroscrappy = _import_astroscrappy()
    arr = np.asarray(image)
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"image must be a non-empty 2-D array (got shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"image has dtype {arr.dtype}; pass a real-valued array")
    _positive("gain", gain)
    _positive("read_noise", read_noise, allow_zero=True)
    _positive("sigclip", sigclip)
    _positive("sigfrac", sigfrac)
    _positive("objlim", objlim)
    if not isinstance(niter, (int, np.integer)) or niter < 1:
        raise InputError(f"niter={niter!r} must be a positive integer")
    data = np.array(arr, dtype=np.float32)  # native-endian copy
    if sky is not None:
        sky_arr = np.asarray(sky, dtype=np.float32)
        if sky_arr.ndim != 0 and sky_arr.shape != data.shape:
            raise InputError(f"sky has shape {sky_arr.shape} but the image has {data.shape}; "
                             "pass a scalar or an array of the image shape")
        data += sky_arr
    bad = ~np.isfinite(data)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != data.shape:
            raise InputError(f"mask has shape {m.shape} but the image has {data.shape}; pass "
                             "a boolean array of the image shape")
        bad |= m.astype(bool)
    if bad.any():
        fill = np.median(data[~bad]) if (~bad).any() else 0.0
        data[bad] = fill
    pedestal = _missing_sky(data, bad, float(gain), float(read_noise))
    if pedestal > 0:
        data += np.float32(pedestal)
    if saturation is None:
        satlevel = np.inf
    else:
        _positive("saturation", saturation)
        satlevel = (float(saturation) + pedestal) * float(gain)  # astroscrappy compares e-
    kwargs = dict(inmask=bad, sigclip=float(sigclip), sigfrac=float(sigfrac),
                  objlim=float(objlim), gain=float(gain), readnoise=float(read_noise),
                  satlevel=satlevel, niter=int(niter), sepmed=True, cleantype="meanmask",
                  verbose=False)
    if fwhm is not None:
        _positive("fwhm", fwhm)
        size = int(2 * np.ceil(1.5 * fwhm) + 1)
        kwargs.update(fsmode="convolve", psfmodel="gauss", psffwhm=float(fwhm), psfsize=size)
    if psf is not None:
        psf = _validate(psf, psf, None)[1]
    if min_significance is None:
        min_significance = float(np.sqrt(2.0 * np.log(max(data.size, 2)))) + 0.5
    _positive("min_significance", min_significance, allow_zero=True)
    if not isinstance(grow, (int, np.integer)) or grow < 0:
        raise InputError(f"grow={grow!r} must be a non-negative integer")
    # Extend the image beyond its borders first (each border pixel repeated
    # outwards): L.A.Cosmic's filters otherwise see a star near the border
    # as cut by a sharp edge and flag its core (a real DECam frame: 38 pixels
    # of a FWHM-3.5 star 5 px from the border).  Repeating the border keeps
    # stars centred >= 2 px inside unflagged; mirroring did not (tested).
    pad = _EDGE_PAD if fwhm is None else max(_EDGE_PAD, int(2 * np.ceil(1.5 * fwhm) + 1))
    # Its Laplacian also takes 0 beyond the array, so the outermost pixels of
    # the extension would be flagged and cleaned, changing the next iteration
    # inwards: they are masked.
    data_p = np.pad(data, pad, mode="edge")
    kwargs["inmask"] = np.pad(bad, pad, mode="edge")
    _mask_border(kwargs["inmask"], _WINDOW_BORDER)
    try:
        crmask, clean = _lacosmic(astroscrappy, data_p, kwargs, windowed=windowed,
                                  halo=kwargs.get("psfsize", 0) // 2)
    except Exception as exc:  # pragma: no cover - library failure
        raise ProcessingError(f"astroscrappy failed: {exc}") from exc
    crmask = np.asarray(crmask)[pad:-pad, pad:-pad]
    clean = np.asarray(clean)[pad:-pad, pad:-pad]
    crmask = np.asarray(crmask, dtype=bool) & ~bad
    n_raw = int(crmask.sum())
    if crmask.any() and min_significance > 0:
        crmask = _significant_groups(crmask, data, np.asarray(clean, np.float64), float(gain),
                                     float(read_noise), min_significance)
    if psf is not None and crmask.any():
        crmask = _sharper_groups(crmask, data, np.asarray(psf, np.float64), float(gain),
                                 float(read_noise))
    if crmask.any():
        crmask = _follow_wings(crmask, data, np.asarray(clean, np.float64), float(gain),
                               float(read_noise))
    if grow and crmask.any():
        from scipy import ndimage

        crmask = ndimage.binary_dilation(crmask, iterations=int(grow),
                                         structure=np.ones((3, 3), bool)) & ~bad
    log.debug("L.A.Cosmic flagged %d pixels, %d after the significance test and growth",
              n_raw, int(crmask.sum()))
    return crmask


def exposure_cosmic_rays(image, *, sigma: float, gain: float | None,
                         read_noise: float | None, saturation: float | None = None,
                         bad=None, psf=None) -> np.ndarray:
    """Cosmic-ray mask of a window of one exposure, its noise model inferred.

    :func:`detect_cosmic_rays` needs the gain and read noise of the detector.
    With ``gain`` known, the read noise is ``read_noise`` or the part of the
    background noise ``sigma`` (ADU) the sky's Poisson noise does not explain;
    without it, the effective gain is the one that makes the sky level's
    Poisson noise equal ``sigma`` (``sky / gain = sigma**2``).

    Parameters
    ----------
    image : ndarray, 2-D
        The window (ADU, sky included); non-finite pixels are ignored.
    sigma : float
        Background noise of the image (ADU).
    gain, read_noise : float or None
        Electrons per ADU and read noise (electrons), when known.
    saturation : float, optional
        Saturation level (ADU); saturated stars are protected.
    bad : ndarray of bool, optional
        Pixels to ignore (never flagged).
    psf : ndarray, optional
        The image's PSF, when known (see :func:`detect_cosmic_rays`).

    Returns
    -------
    ndarray of bool
        True on cosmic-ray pixels; all False when fewer than 100 of the
        sampled pixels are usable.

    Raises
    ------
    CosmicsUnavailableError
        astroscrappy is not installed.
    InputError
        ``bad`` does not match ``image``, or an option is out of range.
    """
    img = np.asarray(image)
    miss = ~np.isfinite(img)
    if bad is not None:
        if np.shape(bad) != img.shape:
            raise InputError(f"bad has shape {np.shape(bad)} but the image has {img.shape}")
        miss |= np.asarray(bad, bool)
    data = np.where(miss, 0.0, img).astype(np.float32)
    sub = data[::4, ::4][~miss[::4, ::4]]
    if sub.size < 100:
        return np.zeros(img.shape, bool)
    sky = max(float(np.median(sub)), 0.0)
    sig = float(sigma)
    if gain:
        rn = read_noise or math.sqrt(max(sig * sig * gain * gain - sky * gain, 1.0))
    else:  # effective gain from the noise: sky / gain = sigma^2
        gain = max(sky, sig * sig) / (sig * sig) if sig > 0 else 1.0
        rn = math.sqrt(max(sig * sig * gain * gain - sky * gain, 1e-2))
    return detect_cosmic_rays(data, gain=gain, read_noise=rn, saturation=saturation,
                              mask=miss, psf=psf)


_EDGE_PAD = 8  # pixels of extended image around the one given to L.A.Cosmic (at least)
_KEEP_GROW = 12  # pixels around each seed decided by its window: the reach of 4 iterations
_WINDOW_MARGIN = 8  # pixels of context beyond that (plus half the fine-structure kernel)
_WINDOW_BORDER = 2  # masked outer pixels of a window inside the image (no false edge hits)
_WINDOW_FRACTION = 0.5  # windows covering more than this of the image: run it whole


def _mask_border(mask, width):
    mask[:width] = True
    mask[-width:] = True
    mask[:, :width] = True
    mask[:, -width:] = True


def _lacosmic(astroscrappy, data, kwargs, *, windowed, halo=0):
    """astroscrappy's ``detect_cosmics`` on ``data``, only where hits are possible.

    L.A.Cosmic's tests are local: a pixel is flagged only where its Laplacian
    significance exceeds ``sigclip`` (or next to such a pixel, growing by one
    pixel per step), and later iterations change the image only at pixels
    already flagged.  ``_numba._lacosmic_seeds`` finds, in one cheap pass, a
    superset of the pixels that can pass the first test.  Each connected
    region of seeds grown by ``_KEEP_GROW`` is decided by its bounding box
    plus ``_WINDOW_MARGIN + halo`` pixels of context.  These windows are
    packed into one array for a single call, their outer pixels masked
    (astroscrappy's Laplacian takes 0 beyond an array's edge and would flag
    them); ``kwargs["inmask"]`` must mask the image's own outer
    ``_WINDOW_BORDER`` pixels likewise.  On a sparse field this is several
    times faster than the whole image and gives the same mask; when the
    packed windows would cover more than ``_WINDOW_FRACTION`` of the image (a
    crowded field) the image is processed whole.  Returns ``(crmask, clean)``
    as ``detect_cosmics`` does (``clean`` equals ``data`` outside the
    windows, where nothing is flagged).
    """
    if not windowed:
        return astroscrappy.detect_cosmics(data, **kwargs)
    from scipy import ndimage

    from . import _numba as nk

    gain = kwargs["gain"]
    e = np.ascontiguousarray(data, dtype=np.float64) * gain
    seeds = np.empty(e.shape, dtype=np.bool_)
    # 0.98: astroscrappy works in float32; a seed too many costs nothing
    nk._lacosmic_seeds(e, kwargs["readnoise"] ** 2, 0.98 * kwargs["sigclip"],
                       np.empty_like(e), seeds)
    inmask = np.asarray(kwargs["inmask"], dtype=bool)
    seeds &= ~inmask  # masked pixels are never flagged
    ny, nx = data.shape
    crmask = np.zeros(data.shape, dtype=bool)
    clean = np.array(data, dtype=np.float32)
    if not seeds.any():
        return crmask, clean
    keep = ndimage.maximum_filter(seeds, size=2 * _KEEP_GROW + 1, mode="constant")
    lab, _ = ndimage.label(keep)
    m = _WINDOW_MARGIN + int(halo)
    boxes = [(max(0, sl[0].start - m), min(ny, sl[0].stop + m),
              max(0, sl[1].start - m), min(nx, sl[1].stop + m))
             for sl in ndimage.find_objects(lab)]
    sizes = [(y1 - y0, x1 - x0) for y0, y1, x0, x1 in boxes]
    where, canvas_shape = _shelf_pack(sizes)
    if canvas_shape[0] * canvas_shape[1] > _WINDOW_FRACTION * data.size:
        return astroscrappy.detect_cosmics(data, **kwargs)
    # one call on all windows packed side by side (a call per window costs
    # milliseconds of OpenMP start-up each); the space between is masked sky
    canvas = np.full(canvas_shape, np.median(data[::4, ::4]), dtype=np.float32)
    canvas_mask = np.ones(canvas_shape, dtype=bool)
    for (y0, y1, x0, x1), (py, px) in zip(boxes, where):
        canvas[py:py + y1 - y0, px:px + x1 - x0] = data[y0:y1, x0:x1]
        win_mask = canvas_mask[py:py + y1 - y0, px:px + x1 - x0]
        win_mask[...] = inmask[y0:y1, x0:x1]
        _mask_border(win_mask, _WINDOW_BORDER)
    cm, cl = astroscrappy.detect_cosmics(canvas, **dict(kwargs, inmask=canvas_mask))
    cm, cl = np.asarray(cm, dtype=bool), np.asarray(cl)
    for k, ((y0, y1, x0, x1), (py, px)) in enumerate(zip(boxes, where), start=1):
        own = lab[y0:y1, x0:x1] == k
        crmask[y0:y1, x0:x1] |= cm[py:py + y1 - y0, px:px + x1 - x0] & own
        clean[y0:y1, x0:x1][own] = cl[py:py + y1 - y0, px:px + x1 - x0][own]
    return crmask, clean


def _shelf_pack(sizes):
    """Positions ``(y, x)`` of rectangles ``(h, w)`` packed in shelves, and the canvas shape."""
    width = max(max(w for _, w in sizes), int(1.2 * np.sqrt(sum(h * w for h, w in sizes))))
    where = [(0, 0)] * len(sizes)
    y = x = shelf = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i][0]):
        h, w = sizes[i]
        if x + w > width:
            y, x, shelf = y + shelf, 0, 0
        where[i] = (y, x)
        x += w
        shelf = max(shelf, h)
    return where, (y + shelf, width)


def _missing_sky(data, bad, gain, read_noise) -> float:
    """Sky level (ADU) to add so that L.A.Cosmic's noise model fits the measured noise.

    L.A.Cosmic predicts the noise of a pixel from its value,
    ``sqrt(value * gain + read_noise^2) / gain``.  In a sky-subtracted image
    (every survey-processed frame) that prediction falls far below the real
    background noise, which still carries the subtracted sky's Poisson
    noise, and every noise peak looks like a hit.  When the robust
    background dispersion exceeds the prediction at the median level by more
    than 20 %, the missing sky ``sigma^2 gain - read_noise^2 / gain - median``
    is returned (0 otherwise).
    """
    good = data[~bad] if bad.any() else data.ravel()
    if good.size < 100:
        return 0.0
    good = good[::max(1, good.size // 200_000)]
    med = float(np.median(good))
    sig = float(mad_std(good))
    model2 = (max(med, 0.0) * gain + read_noise * read_noise) / (gain * gain)
    if not sig * sig > 1.44 * model2:
        return 0.0
    ped = sig * sig * gain - read_noise * read_noise / gain - med
    log.debug("noise %.4g exceeds the L.A.Cosmic model %.4g at the median %.4g: adding a sky "
              "of %.4g", sig, np.sqrt(model2), med, ped)
    return max(float(ped), 0.0)


def _significant_groups(crmask, data, clean, gain, read_noise, zmin):
    """Keep the 8-connected groups of ``crmask`` whose peak is ``zmin`` sigma above ``clean``."""
    from scipy import ndimage

    lab, n = ndimage.label(crmask, structure=np.ones((3, 3), bool))
    if n == 0:
        return crmask
    idx = np.nonzero(crmask)
    excess = data[idx] - clean[idx]
    noise = np.sqrt(np.clip(clean[idx], 0.0, None) * gain + read_noise * read_noise) / gain
    z = excess / np.maximum(noise, 1e-30)
    peak = np.full(n + 1, -np.inf)
    np.maximum.at(peak, lab[idx], z)
    keep = peak >= zmin
    keep[0] = False
    return keep[lab]


#: PSF FWHM (px) below which the pipeline gives L.A.Cosmic the PSF test
#: (:func:`detect_cosmic_rays`'s ``psf``).  On simulated clean 1 Mpix frames (with
#: 2000 stars) its median filter flags 8464, 1427, 62, 24 and 0 star pixels at FWHM
#: 1.6, 2, 2.5, 3 and 4 px; the test costs hits: 0.1-0.2 % of them at 2.5-4 px, and a
#: faint resampled track in a real DECam reference (FWHM 3.4 px) passes as a star.
UNDERSAMPLED_FWHM = 2.5

_HIT_INDEX = 0.15  # sharpness index above which a flagged group can be a hit, ...
_HIT_NSIGMA = 2.0  # ... when its peak also exceeds the PSF fit by this many sigma:
# on simulated frames the cores L.A.Cosmic flags on undersampled stars exceed 2 sigma
# in 0-0.7 % of groups (FWHM 2 and 1.6 px), hits in 98-99.7 % (FWHM 2-4 px)
_HIT_RADIUS = 3  # half-side of the stamp: larger ones sum more noise into each profile
# bin (a faint resampled track in a real DECam frame: 2.1 sigma at 7, 3 at 3)


def _sharper_groups(crmask, data, psf, gain, read_noise):
    """Keep the groups of ``crmask`` whose source is sharper than ``psf``."""
    from scipy import ndimage

    lab, n = ndimage.label(crmask, structure=np.ones((3, 3), bool))
    h = min(psf.shape[0] // 2, _HIT_RADIUS)
    c = psf.shape[0] // 2
    p = psf[c - h:c + h + 1, c - h:c + h + 1]
    keep = np.ones(n + 1, bool)
    keep[0] = False
    profiles = {}
    ny, nx = data.shape
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        # the brightest pixel of the group and its neighbours: L.A.Cosmic may flag
        # the flank of a track whose peak it left (a resampled track, real DECam)
        y0, x0 = max(0, sl[0].start - 1), max(0, sl[1].start - 1)
        near = ndimage.binary_dilation(lab[y0:sl[0].stop + 1, x0:sl[1].stop + 1] == k,
                                       structure=np.ones((3, 3), bool))
        sub = np.where(near, data[y0:sl[0].stop + 1, x0:sl[1].stop + 1], -np.inf)
        i, j = np.unravel_index(int(np.argmax(sub)), sub.shape)
        y, x = y0 + i, x0 + j
        r = min(h, y, x, ny - 1 - y, nx - 1 - x)  # a smaller stamp near the border
        if r < 2:
            continue  # too near the border to tell: stays a hit
        st = np.asarray(data[y - r:y + r + 1, x - r:x + r + 1], np.float64)
        edge = np.concatenate([st[0], st[-1], st[:, 0], st[:, -1]])
        sky = float(np.median(edge))
        noise = np.maximum(np.sqrt(np.clip(st, 0.0, None) * gain + read_noise * read_noise)
                           / gain, 1e-30)
        if r not in profiles:  # the PSF's share of the test, once per stamp side
            q = p[h - r:h + r + 1, h - r:h + r + 1]
            profiles[r] = _PsfProfiles(q / q.sum(), 2 * r + 1)
        index, z = _directional((st - sky)[None], noise[None], profiles[r])
        keep[k] = bool(np.any((index > _HIT_INDEX) & (z > _HIT_NSIGMA)))
    return keep[lab]


def drop_coincident(crmask, other, *, nsigma: float = 4.0, box: int = 15) -> np.ndarray:
    """Drop the flagged groups that sit on a source of the other image.

    A cosmic ray hits one exposure; a star is in both images of a registered
    pair.  Where no PSF is known yet (the plan-time star catalogues),
    L.A.Cosmic's median filter flags the cores of undersampled stars; a group
    whose 3x3 neighbourhood in ``other`` peaks more than ``nsigma`` times
    ``other``'s background noise above the median of the surrounding
    ``box`` x ``box`` pixels is such a star and is dropped.

    Parameters
    ----------
    crmask : ndarray of bool, 2-D
        Cosmic-ray mask of one image.
    other : ndarray, 2-D
        The other image of the pair, on the same pixel grid (non-finite: no source).
    nsigma : float, optional
        Peak significance in ``other`` that marks a source.
    box : int, optional
        Side of the box whose median is ``other``'s local background.

    Returns
    -------
    ndarray of bool
        The mask without those groups.

    Raises
    ------
    InputError
        The shapes differ.
    """
    from scipy import ndimage

    crmask = np.asarray(crmask, bool)
    other = np.asarray(other)
    if other.shape != crmask.shape:
        raise InputError(f"other has shape {other.shape} but the mask has {crmask.shape}")
    if not crmask.any():
        return crmask
    sample = other[::4, ::4]
    sample = sample[np.isfinite(sample)]
    if sample.size < 100:
        return crmask
    sigma = float(mad_std(sample))
    if not sigma > 0:
        return crmask
    lab, n = ndimage.label(crmask, structure=np.ones((3, 3), bool))
    keep = np.ones(n + 1, bool)
    keep[0] = False
    ny, nx = other.shape
    r, b = 1, box // 2
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        yc = (sl[0].start + sl[0].stop - 1) // 2
        xc = (sl[1].start + sl[1].stop - 1) // 2
        near = other[max(0, sl[0].start - r):sl[0].stop + r, max(0, sl[1].start - r):sl[1].stop + r]
        around = other[max(0, yc - b):yc + b + 1, max(0, xc - b):xc + b + 1]
        around = around[np.isfinite(around)]
        near = near[np.isfinite(near)]
        if near.size and around.size and near.max() - np.median(around) > nsigma * sigma:
            keep[k] = False
    dropped = int(n - keep[1:].sum())
    if dropped:
        log.debug("%d of %d flagged groups dropped: a source of the other image", dropped, n)
    return keep[lab]


_WING_RADIUS = 3  # pixels a hit is followed into its significant neighbours, at most
_WING_NSIGMA = 3.0  # ... while they stand this many sigma above the local median


def _follow_wings(crmask, data, clean, gain, read_noise):
    """Extend each hit into the neighbours that still stand out from the local sky.

    L.A.Cosmic flags a hit's sharp core; in a resampled image the hit is spread
    over its neighbours by the interpolation kernel (a track at 579 ADU keeps
    300-400 ADU beside it in a real DECam frame), and those unflagged wings
    become significant residuals.  Around each group, pixels more than
    ``_WING_NSIGMA`` noise sigma above the 5 x 5 median of astroscrappy's
    cleaned image (the sky and any star under the hit) are added, out to
    ``_WING_RADIUS`` pixels.  Boxes around the groups only: the cost follows
    the number of hits, not the image size.
    """
    from scipy import ndimage

    lab, n = ndimage.label(crmask, structure=np.ones((3, 3), bool))
    out = crmask.copy()
    m = _WING_RADIUS + 2
    ny, nx = crmask.shape
    for sl in ndimage.find_objects(lab):
        y0, y1 = max(0, sl[0].start - m), min(ny, sl[0].stop + m)
        x0, x1 = max(0, sl[1].start - m), min(nx, sl[1].stop + m)
        ref = ndimage.median_filter(clean[y0:y1, x0:x1], size=5, mode="nearest")
        noise = np.sqrt(np.clip(ref, 0.0, None) * gain + read_noise * read_noise) / gain
        hot = data[y0:y1, x0:x1] - ref > _WING_NSIGMA * np.maximum(noise, 1e-30)
        grown = ndimage.binary_dilation(crmask[y0:y1, x0:x1], structure=np.ones((3, 3), bool),
                                        iterations=_WING_RADIUS, mask=hot)
        out[y0:y1, x0:x1] |= grown
    return out


# ----------------------------------------------------------------------------------------------
# sharpness relative to the PSF
# ----------------------------------------------------------------------------------------------
def _centre_crop(a, n):
    cy, cx = a.shape[0] // 2, a.shape[1] // 2
    h = n // 2
    return a[cy - h:cy + h + 1, cx - h:cx + h + 1]


def _shift_design(cnt, pprof):
    """The PSF's side of :func:`_peak_ratios`: the profile shifted by -1, 0, +1
    bins (zero-filled) and the normal-equation terms shared by every row."""
    m = pprof.size
    design = np.zeros((3, m))
    design[0, :-1] = pprof[1:]
    design[1] = pprof
    design[2, 1:] = pprof[:-1]
    aa = np.einsum("ij,ij->i", design, design)
    ab = design @ cnt
    bb = float(cnt @ cnt)
    det = aa * bb - ab * ab
    deficient = np.nonzero(~((det > 1e-12 * aa * bb) & (det > 0)))[0]
    return design, aa, ab, bb, det, deficient


def _peak_ratios(ys, cnt, pprof, centre, shifts=None):
    """Observed over fitted peak for each profile ``y`` (rows of ``ys``) fitted as
    ``A * pprof(shifted) + B * cnt``.

    The PSF profile is tried at shifts -1, 0, +1 bins and the best-fitting
    shift is used.  The three shifted profiles and ``cnt`` form one design
    shared by every row (``shifts``: :func:`_shift_design`'s result, when
    already made), so the normal equations are solved for all rows and
    shifts together (a rank-deficient shift falls back to the minimum-norm
    solution).  Returns one ``(ratio, excess, bin)`` per row, where ``excess``
    is the observed minus the fitted value in the peak bin; ratio is NaN when
    no positive amplitude fits.
    """
    design, aa, ab, bb, det, deficient = shifts or _shift_design(cnt, pprof)
    ay = design @ ys.T  # (shift, row)
    by = ys @ cnt
    with np.errstate(divide="ignore", invalid="ignore"):
        amp = (bb * ay - ab[:, None] * by) / det[:, None]
        back = (aa[:, None] * by - ab[:, None] * ay) / det[:, None]
    for k in deficient:  # rank-deficient
        coef, *_ = np.linalg.lstsq(np.column_stack([design[k], cnt]), ys.T, rcond=None)
        amp[k], back[k] = coef
    fit = amp[:, :, None] * design[:, None, :] + back[:, :, None] * cnt
    best = np.argmin(np.sum((fit - ys) ** 2, axis=2), axis=0)  # first minimum, as -1, 0, +1
    out = []
    for q, kk in enumerate(best):
        j = centre + int(kk) - 1
        a, b, pj = amp[kk, q], back[kk, q], design[kk, j]
        if not (a > 0 and pj > 0):
            out.append((float("nan"), float("nan"), j))
            continue
        excess = ys[q, j] - b * cnt[j] - a * pj
        out.append((float((ys[q, j] - b * cnt[j]) / (a * pj)), float(excess), j))
    return out


def _lsq2(a, b, y):
    """Least-squares ``(u, v)`` of ``y ~ u * a + v * b`` for each column of ``y``
    (``(pixels,)`` or ``(pixels, k)``; normal equations, a rank-deficient design
    falls back to the minimum-norm solution)."""
    aa, ab, bb = float(a @ a), float(a @ b), float(b @ b)
    det = aa * bb - ab * ab
    if det > 1e-12 * aa * bb and det > 0:
        ay, by = a @ y, b @ y
        return np.array([(bb * ay - ab * by) / det, (aa * by - ab * ay) / det])
    coef, *_ = np.linalg.lstsq(np.column_stack([a, b]), y, rcond=None)
    return coef


def _validate(stamp, psf, noise):
    s = np.asarray(stamp, dtype=np.float64)
    p = np.asarray(psf, dtype=np.float64)
    for name, a in (("stamp", s), ("psf", p)):
        if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] % 2 == 0 or a.shape[0] < 3:
            raise InputError(f"{name} must be a square 2-D array with an odd side >= 3 "
                             f"(got shape {a.shape}); cut it centred on the source")
        if not np.all(np.isfinite(a)):
            raise InputError(f"{name} contains NaN or Inf; replace masked pixels first")
    if not p.sum() > 0:
        raise InputError("psf must have a positive sum")
    if noise is not None:
        noise = np.asarray(noise, dtype=np.float64)
        if noise.ndim != 0 and noise.shape != s.shape:
            raise InputError(f"noise has shape {noise.shape} but the stamp has {s.shape}; pass "
                             "a scalar or an array of the stamp shape")
        if not np.all(np.isfinite(noise)) or np.any(noise <= 0):
            raise InputError("noise must be positive and finite (per-pixel 1-sigma)")
    return s, p / p.sum(), noise


class _PsfProfiles:
    """The PSF's side of :func:`_directional` for stamps of side ``side``, made
    once per PSF: the window, the four directions' bins, the PSF's and a
    single-pixel spike's profiles and the spike's peak ratio (a third of the
    time of a candidate's sharpness test)."""

    def __init__(self, psf, side: int):
        p = psf
        sigma = 1.0 / np.sqrt(2.0 * np.pi * p[p.shape[0] // 2, p.shape[1] // 2])
        self.radius = max(2.0, 3.0 * sigma)
        self.side = side
        n = self.n = min(side, p.shape[0], 2 * int(np.ceil(self.radius)) + 1)
        self.fit_psf = _centre_crop(p, min(side, p.shape[0])).ravel()  # the noise fit's
        p = _centre_crop(p, n)
        c = n // 2
        yy, xx = np.indices((n, n)) - c
        self.window = np.hypot(xx, yy) <= self.radius
        pw = p[self.window]
        delta = ((yy == 0) & (xx == 0))[self.window].astype(np.float64)  # a one-pixel spike
        self.dirs = []
        for across in (yy, xx, xx - yy, xx + yy):
            t = across[self.window]
            off = -int(t.min())
            t = t + off
            cnt = np.bincount(t).astype(np.float64)
            pprof = np.bincount(t, weights=pw)
            shifts = _shift_design(cnt, pprof)
            spike = np.bincount(t, weights=delta)
            (r_delta, _, _), = _peak_ratios(spike[None], cnt, pprof, off, shifts)
            self.dirs.append((t, off, cnt, pprof, shifts, r_delta))
        # per direction the (pixels, bins) 0/1 matrix: a stack of pixel rows times
        # it is their profiles, as np.bincount makes one
        self.binnings = []
        for t, _, cnt, *_ in self.dirs:
            b = np.zeros((t.size, cnt.size))
            b[np.arange(t.size), t] = 1.0
            self.binnings.append(b)


def _directional(stamps, noise, profiles):
    """Per stamp and direction: the sharpness index and the significance of the peak excess.

    ``stamps`` is a stack ``(k, side, side)`` (float64, finite) for ``profiles``
    (``_PsfProfiles(psf, side)``); ``noise`` is None (each stamp's robust scatter
    about a fit ``A * psf + B``) or per-pixel 1-sigma values broadcastable to the
    stack.  Returns ``(index, z)``, arrays ``(k, 4)``: NaN where a direction
    gives no index (no positive PSF amplitude fits, or a spike would not stand
    out).  One array operation per step for the whole stack: ~0.05 ms a stamp
    in a tile's batch, against ~0.2 ms for stamps one by one.
    """
    pr = profiles
    st = np.asarray(stamps, dtype=np.float64)
    if st.ndim != 3 or st.shape[1:] != (pr.side, pr.side):
        raise ValueError(f"profiles made for stamps of side {pr.side}, got shape {st.shape}")
    k = st.shape[0]
    cube = st.transpose(1, 2, 0)  # _centre_crop crops the first two axes
    sw = _centre_crop(cube, pr.n)[pr.window].T  # (k, pixels of the window)
    if noise is None:
        a = pr.fit_psf
        y = _centre_crop(cube, int(round(math.sqrt(a.size)))).reshape(a.size, k)
        u, v = _lsq2(a, np.ones(a.size), y)
        var = mad_std(y - u * a[:, None] - v, axis=0) ** 2 if k else np.zeros(0)
        vw = np.broadcast_to(var[:, None], sw.shape)
    else:
        nz = np.broadcast_to(np.asarray(noise, dtype=np.float64), st.shape).transpose(1, 2, 0)
        vw = _centre_crop(nz, pr.n)[pr.window].T ** 2
    index = np.full((k, len(pr.dirs)), np.nan)
    z = np.full((k, len(pr.dirs)), np.nan)
    if k == 0:
        return index, z
    for d, ((_, off, cnt, pprof, shifts, r_delta), onehot) in enumerate(zip(pr.dirs,
                                                                             pr.binnings)):
        if not (np.isfinite(r_delta) and r_delta > 1.0):
            continue
        vprof = vw @ onehot
        for q, (r, excess, j) in enumerate(_peak_ratios(sw @ onehot, cnt, pprof, off, shifts)):
            if np.isfinite(r):
                index[q, d] = (r - 1.0) / (r_delta - 1.0)
                z[q, d] = excess / math.sqrt(vprof[q, j]) if vprof[q, j] > 0 else math.inf
    return index, z


def sharpness(stamp, psf) -> float:
    """Sharpness index of a source relative to the PSF: ~0 for a star, ~1 for a cosmic ray.

    Within a circular window of radius ``3 sigma`` of the PSF (sigma from its
    peak value, at least 2 px) the stamp and the PSF are collapsed into 1-D
    profiles across four directions (rows, columns and both diagonals). Each
    stamp profile is fitted with ``A * psf_profile + B * npix`` (the PSF
    profile allowed to move by one bin) and the ratio ``r`` of the observed to
    the fitted peak is turned into ``(r - 1) / (r_delta - 1)``, where
    ``r_delta`` is the ratio a single-pixel spike would give. The index is the
    largest over the four directions: 0 for a source shaped like the PSF, 1
    for a single hot pixel or across a straight cosmic-ray track, negative for
    sources broader than the PSF. Sub-pixel centring errors make a star look
    broader, never sharper. The index is noisy for faint sources (standard
    deviation ~0.1 at a peak S/N of 12); :func:`sharper_than_psf` also tests
    the significance of the excess.

    Parameters
    ----------
    stamp : array_like, 2-D
        Square cut-out with odd sides centred (to within one pixel) on a
        positive source; a constant background is allowed.
    psf : array_like, 2-D
        PSF with odd sides, centred on its middle pixel.

    Returns
    -------
    float
        The index (NaN when no positive PSF amplitude fits in any direction).

    Raises
    ------
    InputError
        Non-square, even-sized, non-finite inputs, or a side smaller than 3.
    """
    s, p, _ = _validate(stamp, psf, None)
    index = _directional(s[None], 1.0, _PsfProfiles(p, s.shape[0]))[0][0]
    index = index[np.isfinite(index)]
    return float(index.max()) if index.size else float("nan")


def sharper_than_psf(stamp, psf, *, threshold=0.3, nsigma=4.0, noise=None) -> bool:
    """True if the source in ``stamp`` is significantly sharper than the PSF.

    In at least one of the four directions of :func:`sharpness` the index must
    exceed ``threshold`` *and* the peak must exceed the PSF-fit prediction by
    more than ``nsigma`` times its noise. A star gives an index of ~0, a
    single-pixel hit or a straight track ~1; the index threshold leaves room
    for a PSF estimate that is too broad or too narrow by tens of per cent
    (index ~0.1-0.15 for a PSF 30-50 % too broad), the significance test
    keeps faint stars (whose index is noisy) from being flagged.

    Parameters
    ----------
    stamp, psf : array_like, 2-D
        As in :func:`sharpness`.
    threshold : float, optional
        Index above which the source counts as sharper than the PSF.
    nsigma : float, optional
        Required significance of the peak excess.
    noise : float or ndarray, optional
        Per-pixel 1-sigma noise of the stamp (scalar or array of its shape).
        Default: robust (MAD) scatter of the residuals of a PSF fit to the
        stamp, i.e. the background noise.

    Returns
    -------
    bool
        False also when the index cannot be computed (no positive source).

    Raises
    ------
    InputError
        Invalid inputs (see :func:`sharpness`) or non-positive ``noise``.
    """
    s, p, noise = _validate(stamp, psf, noise)
    return _SharpnessTest(p, s.shape[0], threshold=threshold, nsigma=nsigma)(s, noise)


class _SharpnessTest:
    """:func:`sharper_than_psf` for many stamps of one side and one PSF (normalised,
    validated): the PSF's share of the work is done once, here."""

    def __init__(self, psf, side: int, *, threshold=0.3, nsigma=4.0):
        self.profiles = _PsfProfiles(psf, side)
        self.psf = psf
        self.threshold, self.nsigma = threshold, nsigma

    def __call__(self, stamp, noise=None) -> bool:
        return bool(self.many(np.asarray(stamp, dtype=np.float64)[None], noise)[0])

    def many(self, stamps, noise=None) -> np.ndarray:
        """The test for a stack of stamps ``(k, side, side)`` at once (float64,
        finite; ``noise`` as for :func:`_directional`): one array operation per
        step for all of them, so a tile's vetting time does not grow with a crowd
        of candidates."""
        index, z = _directional(stamps, noise, self.profiles)
        return np.any((index > self.threshold) & (z > self.nsigma), axis=1)
