"""The ZOGY mathematics on one (padded) tile.

Equation numbers refer to Zackay, Ofek & Gal-Yam (2016, ApJ 830, 27).  With
``^`` the unnormalised 2-D DFT, F_r = 1 and F_n = ``flux_ratio``:

    Delta = sigma_n^2 F_r^2 |P_r^|^2 + sigma_r^2 F_n^2 |P_n^|^2
    D^    = (F_r P_r^ N^ - F_n P_n^ R^) / sqrt(Delta)                 (13)
    F_D   = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2)          (15)
    P_D^  = F_r F_n P_r^ P_n^ / (F_D sqrt(Delta))                     (14)
    k_n^  = F_n F_r^2 conj(P_n^) |P_r^|^2 / Delta                     (29)
    k_r^  = F_r F_n^2 conj(P_r^) |P_n^|^2 / Delta                     (28)
    S     = k_n (x) N - k_r (x) R = S_N - S_R                         (12, 31, 33)
    V(S_N) = V_n (x) k_n^2,  V(S_R) = V_r (x) k_r^2                    (26, 27)
    V_ast = sigma_x^2 (dS_N/dx)^2 + sigma_y^2 (dS_N/dy)^2 + same for S_R (30, 32)
    S_corr = S / sqrt(V(S_N) + V(S_R) + V_ast)                        (25)
    F_S   = (1/N_pix) sum F_n^2 F_r^2 |P_n^|^2 |P_r^|^2 / Delta        (42)
    FLUX  = S / F_S,  FLUX_ERR = sqrt(V(S_N) + V(S_R)) / F_S           (41)

(The notes' k_r/k_n labels follow S = k_n (x) N - k_r (x) R: k_n carries
conj(P_n^) |P_r^|^2.)  FLUX is in the reference image's units.

Kernels depend only on the PSFs, the noise levels and the flux ratio; they
are built once in float64 (:func:`make_kernels`), cast to the working
precision and reused for every tile that shares them.  Nothing here reads
files.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import _numba as nk
from .errors import InputError
from .fft import RealFFT2
from .options import word_or_number
from .psf import normalise_psf, psf_to_origin

__all__ = [
    "KernelSet",
    "PsfSpectra",
    "make_kernels",
    "kernel_radius",
    "snap_sigma",
    "KernelCache",
    "TileSubtractor",
    "ZogyResult",
    "zogy",
    "robust_sigma",
]

log = logging.getLogger(__name__)

#: relative guard on Delta where both PSF transforms underflow.  The kernel
#: ratios are bounded (e.g. |kd_n| <= 1/sigma_n), so only a true 0/0 needs
#: catching; a larger floor would cut the spectrum and make the kernels ring.
_DELTA_FLOOR = 1e-250
#: relative step of the grid noise levels are snapped to before building kernels
SIGMA_STEP = 0.02


#: weight of a delta added to both PSFs (which are then renormalised): a constant
#: floor in their transforms.  Where both transforms are smaller -- broad PSFs beyond
#: the band they pass, where what is left is the round-off of the PSF model (float32
#: files: ~1e-8) with random signs -- D's kernels (eq. 13), P_r^ / sqrt(Delta) and
#: P_n^ / sqrt(Delta), would follow those signs and ring hundreds of pixels out
#: (Gaussians of FWHM 5.5 / 5 px from float32 files: radius 259 px, capped at 256,
#: instead of 23; 1568^2 FFTs per 1024^2 tile instead of 1080^2, 1.7x the run time at
#: 4096^2).  With the floor both kernels are smooth there.  Frequencies where both PSFs
#: carry less than 1e-7 of a source's flux hold nothing but noise; D stays white there.
PSF_FLOOR = 1e-7


@dataclass(frozen=True, eq=False)
class PsfSpectra:
    """Transforms of a PSF pair on one padded shape (centre at the origin)."""

    shape: tuple[int, int]
    psf_n: np.ndarray
    psf_r: np.ndarray
    pn: np.ndarray = field(repr=False)
    pr: np.ndarray = field(repr=False)

    @classmethod
    def from_psfs(cls, psf_n, psf_r, shape) -> "PsfSpectra":
        psf_n = normalise_psf(psf_n, label="new PSF")
        psf_r = normalise_psf(psf_r, label="reference PSF")
        shape = (int(shape[0]), int(shape[1]))
        scale = 1.0 / (1.0 + PSF_FLOOR)  # psf + PSF_FLOOR * delta, unit sum again
        return cls(shape, psf_n, psf_r,
                   (np.fft.rfft2(psf_to_origin(psf_n, shape)) + PSF_FLOOR) * scale,
                   (np.fft.rfft2(psf_to_origin(psf_r, shape)) + PSF_FLOOR) * scale)


@dataclass(frozen=True, eq=False)
class KernelSet:
    """Fourier-space ZOGY kernels for one (PSF pair, sigma_n, sigma_r, F_n).

    The six half-spectra are pre-multiplied by 1/(ny nx), so an unnormalised
    inverse FFT of their products with image spectra gives the convolution.
    """

    shape: tuple[int, int]
    sigma_n: float
    sigma_r: float
    flux_ratio: float
    kd_n: np.ndarray = field(repr=False)   # F_r P_r^ / sqrt(Delta)      (13)
    kd_r: np.ndarray = field(repr=False)   # F_n P_n^ / sqrt(Delta)      (13)
    k_n: np.ndarray = field(repr=False)    # (29)
    k_r: np.ndarray = field(repr=False)    # (28)
    k_n2: np.ndarray = field(repr=False)   # (k_n^2)^, real-space square (26)
    k_r2: np.ndarray = field(repr=False)   # (k_r^2)^                     (27)
    f_d: float = 0.0                       # (15)
    f_s: float = 0.0                       # (42)
    energy_n: float = 0.0                  # sum k_n^2 (real space)
    energy_r: float = 0.0                  # sum k_r^2
    psf_d: np.ndarray = field(default=None, repr=False)  # (14), centred; None if not made

    def real_space(self, name: str, radius: int) -> np.ndarray:
        """Real-space kernel ``name`` cropped to ``(2 radius + 1)^2``, centred."""
        spec = getattr(self, name).astype(np.complex128)
        full = np.fft.irfft2(spec, s=self.shape, norm="forward")
        return _crop_centred(full, radius)


def _crop_centred(arr: np.ndarray, radius: int) -> np.ndarray:
    """Crop an origin-centred periodic array to an odd centred stamp."""
    idx_y = np.arange(-radius, radius + 1) % arr.shape[0]
    idx_x = np.arange(-radius, radius + 1) % arr.shape[1]
    return arr[np.ix_(idx_y, idx_x)]


def snap_sigma(sigma: float, step: float = SIGMA_STEP) -> float:
    """Snap a noise level to a geometric grid of relative ``step``.

    Tiles whose measured noise differs by less than the step share one kernel
    set (and one set of PSF-only transforms); the kernels' optimality is
    insensitive at that level, D's normalisation moves by at most step/2, and
    S_corr and FLUX_ERR are normalised by the actual variance regardless.
    """
    if not sigma > 0 or not math.isfinite(sigma):
        raise InputError(f"noise level must be positive and finite, got {sigma!r}")
    k = round(math.log(sigma) / math.log1p(step))
    return float(math.exp(k * math.log1p(step)))


def _origin_value(half: np.ndarray, nx: int) -> float:
    """Value at pixel (0, 0) of the real image whose half spectrum (``rfft2``
    layout, last axis ``nx // 2 + 1``) is ``half``: the mean of the full
    spectrum, each column between 0 and Nyquist standing for itself and its
    Hermitian twin.  ``irfft2(half)[0, 0]`` without the inverse FFT."""
    s = half.real.sum(axis=0)
    last = nx // 2 if nx % 2 == 0 else None  # the Nyquist column has no twin
    total = 2.0 * s.sum() - s[0] - (s[last] if last is not None else 0.0)
    return float(total / (half.shape[0] * nx))


def make_kernels(spectra: PsfSpectra, *, sigma_n: float, sigma_r: float,
                 flux_ratio: float = 1.0, dtype=np.float32, psf_d_radius: int | None = None,
                 with_psf_d: bool = True) -> KernelSet:
    """Build the ZOGY kernels in float64 and cast them to ``dtype``'s complex type.

    ``with_psf_d=False`` leaves ``psf_d`` (the PSF of D, an inverse FFT of
    the whole shape) out: the tile loop never uses it.

    Raises
    ------
    InputError
        Non-positive noise levels or flux ratio.
    """
    if not (sigma_n > 0 and sigma_r > 0):
        raise InputError(f"noise levels must be positive (sigma_new={sigma_n}, sigma_ref={sigma_r})")
    if not flux_ratio > 0:
        raise InputError(f"flux_ratio must be positive, got {flux_ratio}")
    ny, nx = spectra.shape
    fn, fr = float(flux_ratio), 1.0
    pn, pr = spectra.pn, spectra.pr
    cdtype = np.result_type(np.dtype(dtype), np.complex64)
    scale = 1.0 / (ny * nx)

    def cast(a):  # fold in the 1/(ny nx) of the unnormalised inverse FFT
        a *= scale
        return np.ascontiguousarray(a, dtype=cdtype)

    # Intermediates are freed as soon as they are cast: the float64 build
    # would otherwise hold ~15 full-size complex arrays at once.
    an2 = pn.real ** 2 + pn.imag ** 2
    ar2 = pr.real ** 2 + pr.imag ** 2
    delta = sigma_n ** 2 * fr ** 2 * ar2 + sigma_r ** 2 * fn ** 2 * an2
    # Guard: where both transforms vanish Delta underflows; kernels are 0 there.
    ok = delta > _DELTA_FLOOR * delta.max()
    np.divide(1.0, delta, out=delta, where=ok)
    delta[~ok] = 0.0
    inv_delta = delta                                           # 1 / Delta
    inv_sqrt = np.sqrt(inv_delta)
    f_d = fr * fn / math.sqrt(sigma_n ** 2 * fr ** 2 + sigma_r ** 2 * fn ** 2)   # (15)
    pd_hat = (fr * fn / f_d) * pr * pn * inv_sqrt               # (14)
    psf_d = None
    if with_psf_d:
        radius = psf_d_radius or max(spectra.psf_n.shape + spectra.psf_r.shape) // 2
        psf_d = _crop_centred(np.fft.irfft2(pd_hat, s=(ny, nx)),
                              min(radius, min(ny, nx) // 2 - 1))
    del pd_hat
    kd_n = cast(fr * pr * inv_sqrt)                             # (13)
    kd_r = cast(fn * pn * inv_sqrt)                             # (13)
    del inv_sqrt
    k_n = fn * fr ** 2 * np.conj(pn) * (ar2 * inv_delta)        # (29)
    del ar2
    # F_S (42) as the response of S to a unit point source in N: S's value at the
    # source, the origin of the inverse transform of k_n F_n P_n^
    f_s = _origin_value(k_n * (fn * pn), nx)
    kn_real = np.fft.irfft2(k_n, s=(ny, nx))
    k_n = cast(k_n)
    k_r = fr * fn ** 2 * np.conj(pr) * (an2 * inv_delta)        # (28)
    del an2, inv_delta
    kr_real = np.fft.irfft2(k_r, s=(ny, nx))
    k_r = cast(k_r)
    kn_real **= 2
    kr_real **= 2
    energy_n, energy_r = float(kn_real.sum()), float(kr_real.sum())
    k_n2 = cast(np.fft.rfft2(kn_real))                          # (26)
    del kn_real
    k_r2 = cast(np.fft.rfft2(kr_real))                          # (27)
    del kr_real
    return KernelSet(
        shape=(ny, nx), sigma_n=float(sigma_n), sigma_r=float(sigma_r), flux_ratio=fn,
        kd_n=kd_n, kd_r=kd_r, k_n=k_n, k_r=k_r, k_n2=k_n2, k_r2=k_r2, f_d=f_d, f_s=f_s,
        energy_n=energy_n, energy_r=energy_r, psf_d=psf_d,
    )


def _support_radius(kernel: np.ndarray, tol: float) -> int:
    """Smallest r such that the energy outside the centred (2r+1)^2 box is <= tol.

    ``kernel`` is a centred odd stamp (as from :meth:`KernelSet.real_space`).
    """
    ny, nx = kernel.shape
    e = kernel ** 2
    cy, cx = ny // 2, nx // 2
    yy, xx = np.indices(e.shape)
    cheb = np.maximum(np.abs(yy - cy), np.abs(xx - cx)).ravel()
    per_r = np.bincount(cheb, weights=e.ravel())
    outside = e.sum() - np.cumsum(per_r)
    hits = np.nonzero(outside <= tol * e.sum())[0]
    return int(hits[0]) if hits.size else int(min(cy, cx))


def kernel_radius(psf_n, psf_r, *, sigma_n: float, sigma_r: float, flux_ratio: float = 1.0,
                  tol: float = 1e-6, max_radius: int = 256) -> int:
    """Support radius of the real-space ZOGY kernels (D and S) for a PSF pair.

    The radius holds all but a fraction ``tol`` of the energy of each of D's
    (eq. 13) and S's (eqs. 28-29) kernels; it sets the tile overlap and the
    image-space kernel size.  D's kernels can be far wider than S's: where the
    two PSF transforms fall to zero at different frequencies, as for drizzled
    undersampled PSFs near Nyquist, their ratio has sharp features and D's
    kernels ring.
    """
    size = max(psf_n.shape + psf_r.shape)
    n = 64
    while True:
        n = max(n, 4 * size)
        spectra = PsfSpectra.from_psfs(psf_n, psf_r, (n, n))
        ks = make_kernels(spectra, sigma_n=sigma_n, sigma_r=sigma_r, flux_ratio=flux_ratio,
                          dtype=np.float64, with_psf_d=False)
        r = max(_support_radius(ks.real_space(name, n // 2 - 1), tol)
                for name in ("kd_n", "kd_r", "k_n", "k_r"))
        if r < n // 4 or n >= 2 * max_radius:
            break
        n *= 2
    if r >= max_radius:
        log.warning("ZOGY kernels are very extended (radius %d px); capping the overlap at %d",
                    r, max_radius)
        r = max_radius
    return int(max(r, size // 2))


class KernelCache:
    """Small LRU of kernel sets for one padded shape (owned by a pipeline).

    Parameters
    ----------
    shape : (int, int)
        Padded tile shape.
    dtype : numpy dtype
        Working precision.
    maxsize : int
        Kernel sets kept (each holds six half-spectra).
    """

    def __init__(self, shape, *, dtype=np.float32, maxsize: int = 2) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.maxsize = maxsize
        self._kernels: OrderedDict = OrderedDict()
        self._building: dict = {}  # key -> [threading.Event, KernelSet or None]
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, psf_key, psf_n, psf_r, *, sigma_n: float, sigma_r: float,
            flux_ratio: float) -> KernelSet:
        """Kernels for snapped noise levels, built on first use.

        Thread-safe: tiles processed at once share the cache, and a set being
        built by one thread is waited for, not built again, by another.
        """
        sn, sr = snap_sigma(sigma_n), snap_sigma(sigma_r)
        key = (psf_key, sn, sr, float(flux_ratio))
        with self._lock:
            ks = self._kernels.get(key)
            if ks is not None:
                self._kernels.move_to_end(key)
                return ks
            job = self._building.get(key)
            owner = job is None
            if owner:
                job = self._building[key] = [threading.Event(), None]
        if not owner:
            job[0].wait()
            if job[1] is not None:
                return job[1]
            return self.get(psf_key, psf_n, psf_r, sigma_n=sigma_n, sigma_r=sigma_r,
                            flux_ratio=flux_ratio)  # its build failed: try here
        try:
            # The PSF transforms are recomputed per build (two FFTs, small next to
            # the build) rather than cached: that is 2 full-size complex128 arrays.
            spectra = PsfSpectra.from_psfs(psf_n, psf_r, self.shape)
            job[1] = make_kernels(spectra, sigma_n=sn, sigma_r=sr, flux_ratio=flux_ratio,
                                  dtype=self.dtype, with_psf_d=False)
            del spectra
        finally:
            with self._lock:
                del self._building[key]
                if job[1] is not None:
                    self.builds += 1
                    self._kernels[key] = job[1]
                    if len(self._kernels) > self.maxsize:
                        self._kernels.popitem(last=False)
            job[0].set()
        return job[1]


class _Score:
    """S of a :class:`TileSubtractor`'s last run on a region, read a window at a time.

    Indexing with two slices (non-negative, relative to the region) returns S
    there as a new float64 array: ``S_N - S_R`` or ``S`` from the planes,
    convolved first where the image-space path had not computed them.
    """

    def __init__(self, sub: "TileSubtractor", region) -> None:
        self._sub, self._y0, self._x0 = sub, region.y0, region.x0
        self.shape = region.shape

    def __getitem__(self, key) -> np.ndarray:
        ys, xs = key
        y0, y1 = self._y0 + ys.start, self._y0 + ys.stop
        x0, x1 = self._x0 + xs.start, self._x0 + xs.stop
        planes = self._sub._scores_on(y0, y1, x0, x1)
        s = planes[1][y0:y1, x0:x1].astype(np.float64)
        if self._sub.split:
            s -= planes[2][y0:y1, x0:x1]
        return s


class TileSubtractor:
    """ZOGY on padded tiles of one shape, with reusable buffers and FFT plans.

    Fill :attr:`inputs` (planes: new, ref, then V_n, V_r when ``has_var``),
    then call :meth:`run`.

    Parameters
    ----------
    shape : (int, int)
        Padded tile shape.
    has_var : bool
        Variance planes are given (else the variance is the constant
        sigma^2 of each image).
    split : bool
        Keep S_N and S_R apart (needed when the astrometric sigma is > 0).
    image_space : bool
        Direct convolutions with real-space kernels of ``radius`` instead of FFTs.
    radius : int
        Kernel radius for the image-space path.
    dtype, threads, effort :
        Working precision, threads, FFTW planner effort.
    """

    def __init__(self, shape, *, has_var: bool, split: bool, image_space: bool = False,
                 radius: int = 0, dtype=np.float32, threads: int = 1,
                 effort: str = "FFTW_MEASURE") -> None:
        self.shape = tuple(shape)
        self.has_var, self.split, self.image_space = bool(has_var), bool(split), bool(image_space)
        self.dtype = np.dtype(dtype)
        self.radius = int(radius)
        n_in = 4 if has_var else 2
        n_out = 2 + int(split) + int(has_var)
        self.fft = RealFFT2(self.shape, n_forward=n_in, n_inverse=n_out, dtype=self.dtype,
                            threads=threads, effort=effort)
        self.inputs = self.fft.real
        self._out = (np.empty((n_out,) + self.shape, dtype=self.dtype) if image_space else None)
        self._rk: tuple | None = None
        self._planes = None  # the last run's D, S (or S_N, S_R), ... planes
        self._computed = None  # the box of them computed (image-space path)

    def score_on(self, region) -> _Score:
        """S (eq. 17) of the tile last run on ``region`` (padded-tile pixels), to be
        read a window at a time (:class:`_Score`); valid until the next :meth:`run`.
        The Fourier path has S everywhere; the image-space path computed the
        region given to :meth:`run` and convolves any other window when it is read.

        Raises
        ------
        ValueError
            Before :meth:`run`, or (image-space) a window whose kernel footprint
            leaves the padded tile.
        """
        if self._planes is None:
            raise ValueError("score_on() before run()")
        return _Score(self, region)

    def _scores_on(self, y0, y1, x0, x1) -> np.ndarray:
        """The planes, with S (S_N, S_R) computed on rows y0:y1, cols x0:x1."""
        cy0, cy1, cx0, cx1 = self._computed
        if not (y0 >= cy0 and x0 >= cx0 and y1 <= cy1 and x1 <= cx1):
            self._convolve_scores(self._rk[3], self._rk[4], (y0, y1, x0, x1))
        return self._planes

    def _convolve_scores(self, kn, kr, box) -> None:
        """Image-space S (or S_N and S_R) into the planes on ``box`` (y0, y1, x0, x1)."""
        r = self.radius
        y0, y1, x0, x1 = box
        if y0 - r < 0 or x0 - r < 0 or y1 + r > self.shape[0] or x1 + r > self.shape[1]:
            raise ValueError("image-space kernel footprint leaves the padded tile")
        src, planes = self.inputs, self._out
        if self.split:
            nk._convolve_pair(src[0], kn, src[1], kr, 0.0, *box, planes[1])
            nk._convolve_pair(src[1], kr, src[0], kn, 0.0, *box, planes[2])
        else:
            nk._convolve_pair(src[0], kn, src[1], kr, -1.0, *box, planes[1])

    @staticmethod
    def _fview(a: np.ndarray) -> np.ndarray:
        """Complex array as interleaved (re, im) floats, same memory."""
        return a.view(a.real.dtype)

    def _image_kernels(self, ks: KernelSet):
        if self._rk is None or self._rk[0] is not ks:
            r = self.radius
            dt = self.dtype
            self._rk = (ks,) + tuple(ks.real_space(n, r).astype(dt)
                                     for n in ("kd_n", "kd_r", "k_n", "k_r", "k_n2", "k_r2"))
        return self._rk[1:]

    def run(self, ks: KernelSet, region, *, astrometric_sigma=(0.0, 0.0),
            var_const: float = 0.0, model_error=0.0, static_mask=None, exclude: int = 0,
            timings=None, out=None) -> dict:
        """Subtract the filled tile; return D, S, SCORR, FLUX, FLUX_ERR on ``region``.

        ``region`` is a :class:`~zogy_stream.tiles.Box` in padded-tile pixels.
        ``model_error`` (needs ``split``) is the fractional error ε of the
        model of static sources, or ``"auto"`` to fit it to this tile's
        bright static sources (:func:`fit_model_error`, skipping peaks where
        ``static_mask & exclude``; ``static_mask`` covers ``region``); the
        value used is returned under ``"model_error"`` (0 when too few).
        ``timings``, a mapping of stage name to seconds, gets the time of each
        step added: ``fft forward``, ``combine``, ``fft inverse`` (or
        ``convolve`` on the image-space path) and ``score``.  ``out``, a
        float32 array of shape ``(5, n)`` with ``n`` at least the region's
        pixel count, holds the five products (reused by a caller that is done
        with the previous ones); by default they are new arrays.
        """
        clock = time.perf_counter
        t0 = clock()
        marks = []
        if ks.shape != self.shape:
            raise ValueError(f"kernel shape {ks.shape} != tile shape {self.shape}")
        sx, sy = astrometric_sigma
        y0, y1, x0, x1 = region.y0, region.y1, region.x0, region.x1
        if self.image_space:
            planes = self._out
            kdn, kdr, kn, kr, kn2, kr2 = self._image_kernels(ks)
            g = (y0 - 1, y1 + 1, x0 - 1, x1 + 1)  # gradients need one more pixel
            self._convolve_scores(kn, kr, g)  # checks the footprint first
            src = self.inputs
            nk._convolve_pair(src[0], kdn, src[1], kdr, -1.0, *g, planes[0])
            if self.has_var:
                nk._convolve_pair(src[2], kn2, src[3], kr2, 1.0, *g, planes[-1])
            marks.append(("convolve", clock()))
        else:
            spec = self.fft.forward()
            marks.append(("fft forward", clock()))
            f = self._fview
            nk._combine(f(self.fft.spec), f(ks.kd_n), f(ks.kd_r), f(ks.k_n), f(ks.k_r),
                        f(ks.k_n2), f(ks.k_r2), self.has_var, self.split)
            marks.append(("combine", clock()))
            planes = self.fft.inverse()
            marks.append(("fft inverse", clock()))
            del spec
        self._planes = planes
        self._computed = ((g[0], g[1], g[2], g[3]) if self.image_space
                          else (0, self.shape[0], 0, self.shape[1]))
        shape = (y1 - y0, x1 - x0)
        eps = 0.0
        if model_error == "auto" and self.split:
            mask = (static_mask if static_mask is not None
                    else np.zeros(shape, np.uint8))
            eps = fit_model_error(*_static_peaks(planes, region, self.has_var, float(var_const),
                                                 float(sx) ** 2, float(sy) ** 2, mask,
                                                 int(exclude)))
            eps = 0.0 if not math.isfinite(eps) else eps
        elif model_error != "auto" and self.split:
            eps = float(model_error)
        names = ("d", "s", "scorr", "flux", "flux_err")
        if out is None:
            out = {k: np.empty(shape, dtype=self.dtype) for k in names}
        else:  # contiguous views of the caller's buffers
            npix = shape[0] * shape[1]
            if out.dtype != self.dtype or out.ndim != 2 or out.shape[0] != 5 or out.shape[1] < npix:
                raise ValueError(f"out must be a {np.dtype(self.dtype).name} array of shape "
                                 f"(5, >= {npix}), got {out.dtype.name} {out.shape}")
            out = {k: out[i, :npix].reshape(shape) for i, k in enumerate(names)}
        nk._finish(planes, y0, y1, x0, x1, self.split, self.has_var, float(var_const),
                   float(sx) ** 2, float(sy) ** 2, eps * eps, 1.0 / ks.f_s,
                   out["d"], out["s"], out["scorr"], out["flux"], out["flux_err"])
        out["model_error"] = eps
        marks.append(("score", clock()))
        if timings is not None:
            for name, t in marks:
                timings[name] = timings.get(name, 0.0) + (t - t0)
                t0 = t
        return out


#: Static sources whose min(S_N, S_R) exceeds this many sigma measure the model error.
MODEL_ERROR_NSIGMA = 20.0
#: Fewer such sources in a tile than this: no model-error term there.
MODEL_ERROR_MIN_SOURCES = 5


def _static_peaks(planes, region, has_var, var_const, sx2, sy2, mask, exclude):
    """S, V and m = min(S_N, S_R) at the peaks of bright static sources in ``region``.

    ``planes`` holds D, S_N, S_R (and V).  A peak is a local maximum of m over
    its 8 neighbours with ``m > MODEL_ERROR_NSIGMA * sqrt(V)`` (V with the
    astrometric term, eqs. 30-33) and ``mask & exclude == 0`` (``mask`` covers
    ``region``).  Only pixels above half the threshold at the background-only
    variance are examined: a handful per bright source.
    """
    ly, lx = planes.shape[1:]
    y0, y1 = max(region.y0, 1), min(region.y1, ly - 1)
    x0, x1 = max(region.x0, 1), min(region.x1, lx - 1)
    sn, sr = planes[1], planes[2]
    lo = 0.5 * MODEL_ERROR_NSIGMA * math.sqrt(var_const)
    yy, xx = nk._above(sr, lo, y0, y1, x0, x1)
    m = np.minimum(sn[yy, xx], sr[yy, xx]).astype(np.float64)
    v = (planes[3][yy, xx].astype(np.float64) if has_var else np.full(m.shape, var_const))
    if sx2 > 0 or sy2 > 0:
        def grad(p, dy, dx):
            return 0.5 * (p[yy + dy, xx + dx].astype(np.float64) - p[yy - dy, xx - dx])
        v = v + sx2 * (grad(sn, 0, 1) ** 2 + grad(sr, 0, 1) ** 2) \
            + sy2 * (grad(sn, 1, 0) ** 2 + grad(sr, 1, 0) ** 2)
    keep = (m > 0) & (m * m > MODEL_ERROR_NSIGMA ** 2 * v) \
        & (mask[yy - region.y0, xx - region.x0] & exclude == 0)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                keep &= np.minimum(sn[yy + dy, xx + dx], sr[yy + dy, xx + dx]) <= m
    s = (sn[yy, xx] - sr[yy, xx]).astype(np.float64)
    return s[keep], v[keep], m[keep]


_MEDIAN_ABS_NORMAL = 0.6744897501960817


def fit_model_error(s, v, m, *, min_sources: int = MODEL_ERROR_MIN_SOURCES) -> float:
    """Fractional model error ε of static sources from their score residuals.

    Subtraction leaves, at a static source whose score is ``m = min(S_N, S_R)``,
    a residual ``S`` that PSF-model and flux-scale errors make proportional to
    ``m``: ``S ~ N(0, V + ε² m²)``.  The ε returned is the smallest for which
    the median of ``|S| / sqrt(V + ε² m²)`` over the sources is that of a unit
    normal (0.674): a few variable stars among them do not move it.  This is
    the analogue for flux/PSF errors of the astrometric term of eqs. 30-33.

    Parameters
    ----------
    s, v, m : array_like
        S, its variance (with any astrometric term) and ``min(S_N, S_R)`` at
        the peaks of bright static sources.
    min_sources : int
        Fewer sources than this give NaN.

    Returns
    -------
    float
        ε in [0, 1], or NaN.
    """
    s, v, m = (np.asarray(a, np.float64) for a in (s, v, m))
    if s.size < min_sources:
        return float("nan")
    a = np.abs(s)

    def med(e):
        return float(np.median(a / np.sqrt(v + e * e * m * m)))

    if med(0.0) <= _MEDIAN_ABS_NORMAL:
        return 0.0
    lo, hi = 0.0, 1.0
    if med(hi) > _MEDIAN_ABS_NORMAL:
        return 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if med(mid) > _MEDIAN_ABS_NORMAL:
            lo = mid
        else:
            hi = mid
    return hi


def robust_sigma(image: np.ndarray, *, max_samples: int = 65536) -> float:
    """Background noise of ``image``: clipped std of a subsample, truncation-corrected."""
    from .background import tile_stats

    return tile_stats(np.asarray(image), subtract=False).sigma


@dataclass(frozen=True)
class ZogyResult:
    """Products of :func:`zogy` (arrays of the input shape).

    Attributes
    ----------
    d : proper difference image, unit variance on blank sky (eq. 13)
    psf_d : PSF of D, centred, unit sum (eq. 14)
    s : score image (eq. 12)
    scorr : corrected score (eq. 25)
    flux, flux_err : PSF-photometry flux and its error (eq. 41), reference units
    f_d, f_s : flux zero point of D (eq. 15) and F_S (eq. 42)
    sigma_new, sigma_ref : background noise levels used
    model_error : fractional model error ε of static sources used in S_corr
    """

    d: np.ndarray
    psf_d: np.ndarray
    s: np.ndarray
    scorr: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    f_d: float
    f_s: float
    sigma_new: float
    sigma_ref: float
    model_error: float = 0.0


def zogy(new, ref, new_psf, ref_psf, *, new_var=None, ref_var=None, flux_ratio: float = 1.0,
         astrometric_sigma=(0.0, 0.0), model_error=0.0, sigma_new: float | None = None,
         sigma_ref: float | None = None, dtype=np.float64, threads: int = 1) -> ZogyResult:
    """ZOGY proper subtraction of one background-subtracted image pair.

    The arrays are treated as one periodic tile (the FFT's convention): pad
    them yourself, or use :func:`zogy_stream.stream` for mosaics, which
    handles borders, masks, background and tiling.

    Parameters
    ----------
    new, ref : 2-D arrays
        Background-subtracted new and reference images on the same grid.
    new_psf, ref_psf : 2-D arrays
        PSFs (any sum; normalised here), centre pixel at ``(n // 2, n // 2)``.
    new_var, ref_var : 2-D arrays, optional
        Per-pixel variances; default ``sigma**2`` everywhere.
    flux_ratio : float
        F_n / F_r with F_r = 1.
    astrometric_sigma : (float, float)
        Registration noise (sigma_x, sigma_y) in pixels (eqs. 30-33).
    model_error : float or "auto"
        Fractional error ε of the model of static sources (PSFs, flux scale):
        ``ε² min(S_N, S_R)²`` joins the variance of S_corr; ``"auto"`` fits ε
        to the bright static sources (:func:`fit_model_error`).  A number in
        [0, 1]; default 0.
    sigma_new, sigma_ref : float, optional
        Background noise; default sqrt(median variance) when a variance map
        is given, else a sigma-clipped standard deviation of the image.
    dtype : float32 or float64
        Working precision.
    threads : int
        FFT and Numba threads.

    Returns
    -------
    ZogyResult

    Raises
    ------
    InputError
        Shapes differ, PSFs are invalid or do not fit, or noise levels are not positive.
    ConfigError
        ``model_error`` is neither a number in [0, 1] nor ``"auto"``.
    """
    new = np.asarray(new)
    ref = np.asarray(ref)
    if new.ndim != 2 or new.shape != ref.shape:
        raise InputError(f"new and ref must be 2-D arrays of one shape ({new.shape} vs {ref.shape})")
    for name, v in (("new_var", new_var), ("ref_var", ref_var)):
        if v is not None and np.shape(v) != new.shape:
            raise InputError(f"{name} has shape {np.shape(v)}, the images {new.shape}")
    for name, a in (("new", new), ("ref", ref), ("new_var", new_var), ("ref_var", ref_var)):
        if a is not None and not np.all(np.isfinite(a)):
            raise InputError(f"{name} contains NaN or Inf; mask and fill them, or use stream()")
    if sigma_new is None:
        sigma_new = math.sqrt(float(np.median(new_var))) if new_var is not None else robust_sigma(new)
    if sigma_ref is None:
        sigma_ref = math.sqrt(float(np.median(ref_var))) if ref_var is not None else robust_sigma(ref)
    has_var = new_var is not None or ref_var is not None
    sx, sy = (float(v) for v in astrometric_sigma)
    model_error = word_or_number("model_error", model_error, ("auto",),
                                 lambda v: 0 <= v <= 1, "in [0, 1]")
    split = sx > 0 or sy > 0 or model_error == "auto" or model_error > 0
    import numba

    old_threads = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        sub = TileSubtractor(new.shape, has_var=has_var, split=split, dtype=dtype,
                             threads=threads, effort="FFTW_ESTIMATE")
        ks = make_kernels(PsfSpectra.from_psfs(new_psf, ref_psf, new.shape), sigma_n=sigma_new,
                          sigma_r=sigma_ref, flux_ratio=flux_ratio, dtype=dtype)
        sub.inputs[0] = new
        sub.inputs[1] = ref
        if has_var:
            sub.inputs[2] = sigma_new ** 2 if new_var is None else new_var
            sub.inputs[3] = sigma_ref ** 2 if ref_var is None else ref_var
            if np.any(sub.inputs[2:4] <= 0):
                raise InputError("variance maps must be positive")
        var_const = sigma_new ** 2 * ks.energy_n + sigma_ref ** 2 * ks.energy_r
        from .tiles import Box

        out = sub.run(ks, Box(0, new.shape[0], 0, new.shape[1]),
                      astrometric_sigma=(sx, sy), var_const=var_const,
                      model_error=model_error)
    finally:
        numba.set_num_threads(old_threads)
    return ZogyResult(d=out["d"], psf_d=ks.psf_d, s=out["s"], scorr=out["scorr"],
                      flux=out["flux"], flux_err=out["flux_err"], f_d=ks.f_d, f_s=ks.f_s,
                      sigma_new=float(sigma_new), sigma_ref=float(sigma_ref),
                      model_error=float(out["model_error"]))
