"""Read PSFEx ``.psf`` models and evaluate them at a position.

A PSFEx model file has a binary-table extension ``PSF_DATA`` whose single
row holds the column ``PSF_MASK`` of shape ``(PSFAXIS3, PSFAXIS2, PSFAXIS1)``
= ``(ncoeff, ny, nx)``: one basis image per polynomial term. The PSF at image
position ``(X, Y)`` is::

    PSF = sum_k  c_k(X, Y) * PSF_MASK[k]

with the polynomial terms ``c_k`` in the scaled coordinates
``u = (X - POLZERO1) / POLSCAL1``, ``v = (Y - POLZERO2) / POLSCAL2`` where
``X, Y`` are PSFEx's (and SExtractor's) **1-based** pixel coordinates.
:meth:`PsfexModel.evaluate` takes this package's 0-based coordinates and adds 1.
Terms are ordered as PSFEx orders them: powers of ``u`` vary fastest, ``v``
powers slowest, total degree at most ``POLDEG1``::

    1, u, u^2, ..., u^d,  v, u v, ..., u^(d-1) v,  v^2, ...,  v^d

The basis images are sampled with a step of ``PSF_SAMP`` image pixels (so
``PSF_SAMP = 0.5`` means two samples per pixel), centred on sample
``(PSFAXIS2 // 2, PSFAXIS1 // 2)``; they already include the pixel response,
so the PSF on the image grid is obtained by interpolating the sampled model
at the pixel centres (as PSFEx itself does).

Only single-group models in the image coordinates (``POLNAXIS`` 0, 1 or 2,
``POLNGRP`` 1, names ``X*_IMAGE``/``Y*_IMAGE``) are supported.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from math import comb

import numpy as np
from astropy.io import fits
from scipy import ndimage

from .errors import InputError, ProcessingError
from .stars import measure_psf

__all__ = ["PsfexModel", "read_psfex"]

log = logging.getLogger(__name__)

#: Centroid offset (pixels) beyond which :meth:`PsfexModel.evaluate` re-centres.
RECENTRE_TOLERANCE = 0.2


def _terms(degree: int, ndim: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of u^i v^j in PSFEx order."""
    if ndim == 0:
        return [(0, 0)]
    if ndim == 1:
        return [(i, 0) for i in range(degree + 1)]
    return [(i, j) for j in range(degree + 1) for i in range(degree + 1 - j)]


@dataclass(frozen=True, eq=False)
class PsfexModel:
    """A PSFEx PSF model (see :func:`read_psfex`).

    Attributes
    ----------
    basis : ndarray
        Read-only float64 array ``(ncoeff, ny, nx)`` of basis images.
    degree : int
        Polynomial degree (``POLDEG1``; 0 for a constant model).
    ndim : int
        Number of polynomial variables (``POLNAXIS``: 0, 1 = x, 2 = x and y).
    zero, scale : tuple of float
        ``POLZERO1/2`` and ``POLSCAL1/2`` (1-based pixel coordinates).
    sampling : float
        ``PSF_SAMP``: basis sample step in image pixels.
    fwhm : float
        ``PSF_FWHM`` from the header (pixels; NaN if absent).
    names : tuple of str
        ``POLNAME1/2``.
    path : str
        File the model was read from.
    """

    basis: np.ndarray = field(repr=False)
    degree: int
    ndim: int
    zero: tuple[float, ...]
    scale: tuple[float, ...]
    sampling: float
    fwhm: float
    names: tuple[str, ...]
    path: str

    @property
    def ncoeff(self) -> int:
        """Number of polynomial terms (basis images)."""
        return int(self.basis.shape[0])

    @property
    def default_size(self) -> int:
        """Odd side (pixels) covering the sampled extent of the model."""
        extent = min(self.basis.shape[1:]) * self.sampling
        n = max(int(np.ceil(extent - 1e-9)), 1)
        return n if n % 2 == 1 else n + 1

    def coefficients(self, x: float, y: float) -> np.ndarray:
        """Polynomial term values at 0-based pixel position ``(x, y)`` in PSFEx order.

        Raises
        ------
        InputError
            Non-finite position.
        """
        if not (np.isfinite(x) and np.isfinite(y)):
            raise InputError(f"position ({x!r}, {y!r}) must be finite pixel coordinates")
        u = (float(x) + 1.0 - self.zero[0]) / self.scale[0] if self.ndim >= 1 else 0.0
        v = (float(y) + 1.0 - self.zero[1]) / self.scale[1] if self.ndim >= 2 else 0.0
        return np.array([u ** i * v ** j for i, j in _terms(self.degree, self.ndim)])

    def sampled(self, x: float, y: float) -> np.ndarray:
        """The model at ``(x, y)`` on its own sample grid (no resampling, no normalisation)."""
        return np.tensordot(self.coefficients(x, y), self.basis, axes=1)

    def evaluate(self, x: float, y: float, *, size: int | None = None) -> np.ndarray:
        """PSF at 0-based pixel position ``(x, y)`` on the image pixel grid.

        The sampled model (step ``PSF_SAMP`` pixels) is interpolated with a
        cubic B-spline (``scipy.ndimage.map_coordinates``, order 3) at the
        pixel centres around the model centre, cropped or zero-padded to
        ``size``, and normalised to unit sum. If the centroid of the result
        (windowed centroid, see :func:`zogy_stream.stars.measure_psf`) is more
        than 0.2 px from the centre pixel the model is resampled once more
        with the offset removed, so the PSF centre is pixel
        ``(size // 2, size // 2)``.

        Parameters
        ----------
        x, y : float
            0-based pixel coordinates (x = column); PSFEx's 1-based
            coordinates are ``x + 1, y + 1``.
        size : int, optional
            Odd side of the returned array. Default :attr:`default_size`.

        Returns
        -------
        ndarray
            float64 ``(size, size)``, unit sum.

        Raises
        ------
        InputError
            ``size`` is not an odd positive integer, or the position is not
            finite.
        ProcessingError
            The model has no positive flux at this position.
        """
        if size is None:
            size = self.default_size
        elif not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
            raise InputError(f"size={size!r} must be an odd positive integer")
        size = int(size)
        img = self.sampled(x, y)
        psf = self._resample(img, size, 0.0, 0.0)
        c = size // 2
        if size >= 3:
            _, xc, yc = measure_psf(np.clip(psf, 0, None))
            if np.hypot(xc - c, yc - c) > RECENTRE_TOLERANCE:
                log.debug("PSFEx model at (%.1f, %.1f) is off-centre by (%.3f, %.3f) px; "
                          "re-centring", x, y, xc - c, yc - c)
                psf = self._resample(img, size, xc - c, yc - c)
        return psf

    def _resample(self, img, size, off_x, off_y):
        ny, nx = img.shape
        d = np.arange(size, dtype=np.float64) - size // 2
        sx = nx // 2 + (d + off_x) / self.sampling
        sy = ny // 2 + (d + off_y) / self.sampling
        gy, gx = np.meshgrid(sy, sx, indexing="ij")
        out = ndimage.map_coordinates(img, [gy, gx], order=3, mode="constant", cval=0.0,
                                      prefilter=True)
        total = out.sum()
        if not (np.isfinite(total) and total > 0):
            raise ProcessingError(f"PSFEx model '{self.path}' has no positive flux at this "
                                  "position; check the model or the coordinates")
        return out / total


def _key(header, name, path, kind=float):
    if name not in header:
        raise InputError(f"PSFEx file '{path}': header keyword {name} is missing from the "
                         "PSF_DATA extension; regenerate the model with PSFEx")
    try:
        value = kind(header[name])
    except (TypeError, ValueError):
        raise InputError(f"PSFEx file '{path}': keyword {name}={header[name]!r} is not a valid "
                         f"{kind.__name__}; regenerate the model with PSFEx") from None
    if kind is float and not np.isfinite(value):
        raise InputError(f"PSFEx file '{path}': keyword {name} is not finite")
    return value


def read_psfex(path) -> PsfexModel:
    """Read a PSFEx ``.psf`` model file.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.psf`` file (FITS with a ``PSF_DATA`` binary table).

    Returns
    -------
    PsfexModel
        The model; call :meth:`PsfexModel.evaluate` to get a PSF array.

    Raises
    ------
    InputError
        The file is missing or not FITS, has no ``PSF_DATA`` extension, lacks a
        required keyword (``POLNAXIS``, ``POLNGRP``, ``POLNAME*``, ``POLZERO*``,
        ``POLSCAL*``, ``POLDEG1``, ``PSFNAXIS``, ``PSFAXIS1..3``, ``PSF_SAMP``)
        or the ``PSF_MASK`` column, the column's shape disagrees with the
        header or the polynomial, or the model uses an unsupported polynomial
        (several groups, variables other than the image x/y).
    """
    path = os.fspath(path)
    try:
        hdul = fits.open(path, memmap=False)
    except FileNotFoundError:
        raise InputError(f"PSFEx file '{path}' does not exist; check the path") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"PSFEx file '{path}' is not a readable FITS file ({exc}); pass a "
                         "PSFEx .psf model") from None
    with hdul:
        try:
            hdu = hdul["PSF_DATA"]
        except KeyError:
            raise InputError(f"PSFEx file '{path}' has no PSF_DATA extension; pass a PSFEx "
                             ".psf model (not an image or catalogue)") from None
        h = hdu.header
        ndim = _key(h, "POLNAXIS", path, int)
        if ndim not in (0, 1, 2):
            raise InputError(f"PSFEx file '{path}': POLNAXIS={ndim} is not supported (0, 1 or "
                             "2 image coordinates only); refit with PSFVAR_KEYS X_IMAGE,Y_IMAGE")
        names, zero, scale, degree = (), (), (), 0
        if ndim > 0:
            ngrp = _key(h, "POLNGRP", path, int)
            if ngrp != 1:
                raise InputError(f"PSFEx file '{path}': POLNGRP={ngrp}; only single-group "
                                 "polynomials are supported (refit with PSFVAR_GROUPS 1,1)")
            names = tuple(str(_key(h, f"POLNAME{i}", path, str)).strip()
                          for i in range(1, ndim + 1))
            for i, (name, pattern) in enumerate(zip(names, (r"^X\w*_IMAGE$", r"^Y\w*_IMAGE$"))):
                if not re.match(pattern, name.upper()):
                    raise InputError(f"PSFEx file '{path}': POLNAME{i + 1}={name!r} is not an "
                                     "image coordinate; refit with PSFVAR_KEYS X_IMAGE,Y_IMAGE")
            zero = tuple(_key(h, f"POLZERO{i}", path) for i in range(1, ndim + 1))
            scale = tuple(_key(h, f"POLSCAL{i}", path) for i in range(1, ndim + 1))
            if any(s == 0 for s in scale):
                raise InputError(f"PSFEx file '{path}': POLSCAL is zero; the model is corrupt")
            degree = _key(h, "POLDEG1", path, int)
            if degree < 0:
                raise InputError(f"PSFEx file '{path}': POLDEG1={degree} must be >= 0")
        naxis = _key(h, "PSFNAXIS", path, int)
        if naxis != 3:
            raise InputError(f"PSFEx file '{path}': PSFNAXIS={naxis}, expected 3")
        nx, ny, ncoeff = (_key(h, f"PSFAXIS{i}", path, int) for i in (1, 2, 3))
        expected = comb(degree + ndim, ndim)
        if ncoeff != expected:
            raise InputError(f"PSFEx file '{path}': PSFAXIS3={ncoeff} but a degree-{degree} "
                             f"polynomial in {ndim} variables has {expected} terms")
        sampling = _key(h, "PSF_SAMP", path)
        if sampling <= 0:
            raise InputError(f"PSFEx file '{path}': PSF_SAMP={sampling} must be positive")
        fwhm = float(h["PSF_FWHM"]) if "PSF_FWHM" in h else float("nan")
        if hdu.data is None or "PSF_MASK" not in hdu.columns.names:
            raise InputError(f"PSFEx file '{path}': the PSF_DATA table has no PSF_MASK column")
        if len(hdu.data) < 1:
            raise InputError(f"PSFEx file '{path}': the PSF_DATA table is empty")
        mask = np.asarray(hdu.data["PSF_MASK"][0])
    if mask.size != ncoeff * ny * nx:
        raise InputError(f"PSFEx file '{path}': PSF_MASK has shape {mask.shape} but the header "
                         f"says (PSFAXIS3, PSFAXIS2, PSFAXIS1) = ({ncoeff}, {ny}, {nx})")
    if mask.shape != (ncoeff, ny, nx):
        if mask.ndim == 2 and ncoeff == 1 and mask.shape == (ny, nx):
            mask = mask[None]
        else:
            raise InputError(f"PSFEx file '{path}': PSF_MASK has shape {mask.shape}, expected "
                             f"(PSFAXIS3, PSFAXIS2, PSFAXIS1) = ({ncoeff}, {ny}, {nx})")
    basis = np.array(mask, dtype=np.float64)  # native byte order, own copy
    if not np.all(np.isfinite(basis)):
        raise InputError(f"PSFEx file '{path}': PSF_MASK contains NaN or Inf")
    basis.setflags(write=False)
    log.debug("read PSFEx model %s: %d terms (degree %d), %dx%d samples, PSF_SAMP %.3g",
              path, ncoeff, degree, nx, ny, sampling)
    return PsfexModel(basis=basis, degree=int(degree), ndim=int(ndim), zero=zero, scale=scale,
                      sampling=float(sampling), fwhm=fwhm, names=names, path=path)
