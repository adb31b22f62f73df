"""Point-spread functions: loading, validation, centring, size measures.

Convention: a PSF is a 2-D float64 array of unit sum whose centre is the
pixel ``(ny // 2, nx // 2)``; for even sizes that is the pixel just past the
geometric middle (numpy's ``fftshift`` convention).  Before transforming, the
centre pixel is moved to the array origin (a roll by ``-(n // 2)``), so a
delta-function source stays on its pixel for odd and even sizes alike.
"""
from __future__ import annotations

import logging

import numpy as np

from .errors import InputError

__all__ = ["load_psf", "normalise_psf", "psf_to_origin", "psf_fwhm", "psf_centroid"]

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


def load_psf(source, *, label: str = "PSF") -> np.ndarray:
    """Load a PSF from a FITS image path or an array; normalise it.

    Raises
    ------
    InputError
        Unreadable file or invalid PSF.
    """
    if isinstance(source, np.ndarray):
        return normalise_psf(source, label=label)
    from .fitsio import read_image

    data, _ = read_image(source, label=label)
    return normalise_psf(data, label=f"{label} '{source}'")


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
