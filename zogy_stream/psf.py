"""Point-spread functions: loading, validation, centring, size measures.

Convention: a PSF is a 2-D float64 array of unit sum whose centre is the
pixel ``(ny // 2, nx // 2)``; for even sizes that is the pixel just past the
geometric middle (numpy's ``fftshift`` convention).  Before transforming, the
centre pixel is moved to the array origin (a roll by ``-(n // 2)``), so a
delta-function source stays on its pixel for odd and even sizes alike.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .errors import InputError

__all__ = ["load_psf", "normalise_psf", "centre_psf", "psf_to_origin", "psf_fwhm",
           "psf_centroid"]

#: Offset (pixels) of a given PSF's centroid from its centre pixel beyond which it is re-centred.
RECENTRE_TOLERANCE = 0.2

log = logging.getLogger(__name__)


def normalise_psf(psf, *, label: str = "PSF") -> np.ndarray:
    """Validate a PSF array and return it as float64 with unit sum.

    Raises
    ------
    InputError
        Not 2-D, empty, non-finite values, or a sum that is not positive.
    """
    arr = np.array(psf, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"{label}: a PSF must be a non-empty 2-D image (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{label}: PSF contains NaN or Inf values")
    total = arr.sum()
    if not total > 0:
        raise InputError(f"{label}: PSF sum is {total:g}; it must be positive")
    return arr / total


def load_psf(source, *, label: str = "PSF", image_shape=None) -> np.ndarray:
    """Load a PSF from a FITS image path or an array; normalise and centre it.

    A PSF whose centroid is more than :data:`RECENTRE_TOLERANCE` pixels from
    its centre pixel ``(ny // 2, nx // 2)`` -- typically an even-sized model
    centred on the geometric middle -- is re-centred (see :func:`centre_psf`).
    With ``image_shape`` (the images' ``(ny, nx)``), a stamp at least as large
    as the image along either axis is refused: that is an image given as the PSF.

    Raises
    ------
    InputError
        Unreadable file or invalid PSF, or a stamp as large as the image.
    """
    if isinstance(source, np.ndarray):
        data, name = source, label
    else:
        from .fitsio import read_image

        data, _ = read_image(source, label=label)
        name = f"{label} '{source}'"
    if image_shape is not None and np.ndim(data) == 2 and (
            data.shape[0] >= image_shape[0] or data.shape[1] >= image_shape[1]):
        raise InputError(f"{name}: a {data.shape[1]}x{data.shape[0]} stamp is as large as the "
                         f"{image_shape[1]}x{image_shape[0]} image; give the PSF's stamp "
                         "(an image of one centred point source), not an image")
    return centre_psf(normalise_psf(data, label=name), label=name)


def centre_psf(psf: np.ndarray, *, tolerance: float = RECENTRE_TOLERANCE,
               label: str = "PSF") -> np.ndarray:
    """Move a unit-sum PSF's windowed centroid onto its centre pixel if it is off.

    The centroid is Source Extractor's windowed one (XWIN/YWIN), robust to
    wings and spikes.  An offset of at most ``tolerance`` pixels is left alone
    (it may be meant, e.g. a registration residual); a larger one is removed
    with a band-limited (Fourier) shift of the zero-padded stamp, and logged.

    Returns
    -------
    ndarray
        ``psf`` itself, or the shifted PSF (float64, unit sum, same shape).

    Raises
    ------
    InputError
        The PSF has no measurable centroid.
    """
    from .stars import measure_psf  # sep-based; stars imports nothing from here

    ny, nx = psf.shape
    if min(ny, nx) < 3:
        return psf
    _, xc, yc = measure_psf(np.clip(psf, 0, None))
    dy, dx = ny // 2 - yc, nx // 2 - xc
    if not (np.isfinite(dx) and np.isfinite(dy)):
        raise InputError(f"{label}: the PSF has no measurable centroid; give a centred PSF")
    if math.hypot(dx, dy) <= tolerance:
        return psf
    log.warning("%s: centroid is off the centre pixel (%d, %d) by (%+.2f, %+.2f) px; "
                "re-centred (the convention is the pixel n//2, 0-based)", label, nx // 2,
                ny // 2, -dx, -dy)
    from scipy import ndimage  # here: importing scipy.ndimage costs ~0.15 s

    py, px = ny // 2 + 2, nx // 2 + 2
    padded = np.pad(psf, ((py, py), (px, px)))
    spec = ndimage.fourier_shift(np.fft.rfft2(padded), (dy, dx), n=padded.shape[1])
    out = np.fft.irfft2(spec, s=padded.shape)[py:py + ny, px:px + nx]
    return out / out.sum()


def psf_to_origin(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Embed ``psf`` in a zero array of ``shape`` with its centre pixel at [0, 0].

    Raises
    ------
    InputError
        The PSF is larger than ``shape``.
    """
    py, px = psf.shape
    if py > shape[0] or px > shape[1]:
        raise InputError(f"PSF of shape {psf.shape} does not fit a tile of {shape}; "
                         "use a larger --tile or a smaller PSF stamp")
    out = np.zeros(shape, dtype=np.float64)
    out[:py, :px] = psf
    return np.roll(out, (-(py // 2), -(px // 2)), axis=(0, 1))


def psf_centroid(psf: np.ndarray) -> tuple[float, float]:
    """First moment ``(y, x)`` of the positive part of the PSF."""
    w = np.clip(psf, 0, None)
    yy, xx = np.indices(psf.shape)
    s = w.sum()
    return float((w * yy).sum() / s), float((w * xx).sum() / s)


def psf_fwhm(psf: np.ndarray) -> float:
    """FWHM in pixels from the area above half maximum (robust to shape)."""
    peak = psf.max()
    area = np.count_nonzero(psf >= 0.5 * peak)
    return float(2.0 * np.sqrt(area / np.pi))
