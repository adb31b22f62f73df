"""Background and noise: a mesh on a global grid, plus plain tile statistics.

The background is estimated on square cells of a grid fixed in *image*
coordinates (cell ``(i, j)`` covers rows ``i*B:(i+1)*B``, columns
``j*B:(j+1)*B``), each from its own pixels only, and interpolated bilinearly
between cell centres.  A pixel's background therefore does not depend on
how the mosaic is tiled, nor on which process computes it.  Cell values are
a sigma-clipped mean and a truncation-corrected clipped standard deviation.

Why large cells: S integrates a PSF-sized footprint, so a background error
delta shifts S_corr by about delta/sigma * sqrt(4 pi s^2) (s: PSF sigma),
i.e. ~7 delta/sigma for a 4 px FWHM.  A 256-px cell has delta ~ sigma/256.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .tiles import Box

__all__ = ["TileStats", "tile_stats", "MeshBackground", "truncation_factor"]

#: clipping threshold (in sigma) of the background statistics
CLIP = 3.0


def truncation_factor(k: float) -> float:
    """Clipped std of Gaussian noise in units of its true sigma.

    Iterative k-sigma clipping converges to the cut ``c = k * f(c)`` where
    ``f(c)`` is the std of a Gaussian truncated at +-c; we return ``f(c)``
    at that fixed point (0.9853 for k = 3) so it can be divided out.
    """
    def f(c):
        phi = math.exp(-0.5 * c * c) / math.sqrt(2 * math.pi)
        return math.sqrt(1.0 - 2.0 * c * phi / math.erf(c / math.sqrt(2.0)))

    c = k
    for _ in range(50):
        c = k * f(c)
    return f(c)


_TRUNC = truncation_factor(CLIP)


_NBINS = 1024  # histogram bins over centre +- _HRANGE * MAD (~sigma / 50 per bin)
_HRANGE = 10.0
_MESH_PIXELS = 128 * 128  # pixels a mesh cell's statistics are taken from (at most)


@njit(cache=True, nogil=True)
def _clipped_stats(img, y0, y1, x0, x1, step, saturation, clip, iters):
    """Clipped mean and std of img[y0:y1:step, x0:x1:step] (finite, < saturation).

    Starts from the median and MAD of a sparse subsample (~4000 pixels).  One
    pass over all the pixels then fills a fine histogram (bins of ~sigma/50
    over +-10 MAD, with each bin's count and sum), and the mean/std clipping
    iterations within +-clip*std run on the histogram: exact sums for bins
    inside the limits, a pro-rata share of the two bins the limits cut.
    Returns (mean, std, n_used); n_used = 0 when nothing is usable.
    """
    every = np.ones((1, 1), np.bool_)  # a 1x1 mask: no mask
    centre, mad, n = _start_stats(img, every, y0, y1, x0, x1, step, saturation)
    if n == 0:
        return 0.0, 0.0, 0
    if not mad > 0:  # (nearly) constant data: the plain mean of what is there
        s = 0.0
        m = 0
        for y in range(y0, y1, step):
            for x in range(x0, x1, step):
                v = img[y, x]
                if np.isfinite(v) and v < saturation:
                    s += v
                    m += 1
        return s / m, 0.0, m
    nb = _NBINS
    w = 2.0 * _HRANGE * mad / nb
    lo0 = centre - _HRANGE * mad
    inv_w = 1.0 / w
    # four interleaved sub-histograms: neighbouring pixels often fall in the same bin,
    # and alternating the copies keeps the increments from waiting on each other
    cnt4 = np.zeros((4, nb), np.float64)
    sm4 = np.zeros((4, nb), np.float64)  # sum of (v - centre) per bin
    for y in range(y0, y1, step):
        q = 0
        for x in range(x0, x1, step):
            v = img[y, x]
            if v < saturation:  # NaN fails the comparisons
                t = (v - lo0) * inv_w
                if 0.0 <= t < nb:
                    k = int(t)
                    cnt4[q, k] += 1.0
                    sm4[q, k] += v - centre
            q = (q + 1) & 3
    cnt = cnt4[0] + cnt4[1] + cnt4[2] + cnt4[3]
    sm = sm4[0] + sm4[1] + sm4[2] + sm4[3]
    mean, std, used = _clip_histogram(cnt, sm, centre, mad, lo0, inv_w, clip, iters)
    if used == 0:
        return centre, mad, n
    return mean, std, used


@njit(cache=True, nogil=True)
def _start_stats(img, good, y0, y1, x0, x1, step, saturation):
    """Median, 1.4826 x MAD and size of a ~4096-pixel regular subsample of
    img[y0:y1:step, x0:x1:step] (finite, < saturation, and ``good`` unless it
    is 1 x 1); size 0 (and zeros) below 16 usable pixels."""
    ny = (y1 - y0 + step - 1) // step
    nx = (x1 - x0 + step - 1) // step
    sub = max(1, int(math.sqrt(ny * nx / 4096.0)))
    buf = np.empty(((ny + sub - 1) // sub) * ((nx + sub - 1) // sub), np.float64)
    n = 0
    check = good.size > 1
    for y in range(y0, y1, step * sub):
        for x in range(x0, x1, step * sub):
            v = img[y, x]
            if np.isfinite(v) and v < saturation and (not check or good[y, x]):
                buf[n] = v
                n += 1
    if n < 16:
        return 0.0, 0.0, 0
    centre = _median_inplace(buf, n)
    for i in range(n):
        buf[i] = abs(buf[i] - centre)
    return centre, _median_inplace(buf, n) * 1.482602218505602, n


@njit(cache=True, nogil=True)
def _kth(a, n, k):
    """The ``k``-th smallest (0-based) of ``a[:n]``, reordering ``a`` so that
    every later element is >= it (quickselect, Hoare partition)."""
    lo, hi = 0, n - 1
    while hi > lo:
        pivot = a[(lo + hi) >> 1]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@njit(cache=True, nogil=True)
def _median_inplace(a, n):
    """``np.median(a[:n])`` (finite values), reordering ``a``.  Our own: Numba's
    ``np.median`` took ~1.4 s of a cold start to compile, this ~0.7 s."""
    half = n >> 1
    if n & 1:
        return _kth(a, n, half)
    lo = _kth(a, n, half - 1)
    hi = a[half]
    for i in range(half + 1, n):
        hi = min(hi, a[i])
    return (lo + hi) / 2


@njit(cache=True, nogil=True)
def _clip_histogram(cnt, sm, centre, mad, lo0, inv_w, clip, iters):
    """Mean/std clipping iterations within +-clip*std on a fine histogram:
    ``cnt[k]`` pixels with ``sm[k]`` the sum of their (value - centre) in bin k
    of width ``1 / inv_w`` from ``lo0``; starts at centre +- clip * mad.  Exact
    sums for bins inside the limits, a pro-rata share of the two bins the
    limits cut.  Returns (mean, std, n_used); n_used = 0 when < 16 pixels."""
    nb = cnt.size
    lo = centre - clip * mad
    hi = centre + clip * mad
    mean = centre
    std = mad
    used = 0
    for _ in range(iters):
        ka = (lo - lo0) * inv_w
        kb = (hi - lo0) * inv_w
        ia = min(max(int(math.floor(ka)), 0), nb - 1)
        ib = min(max(int(math.floor(kb)), 0), nb - 1)
        s = 0.0
        s2 = 0.0
        m = 0.0
        for k in range(ia, ib + 1):
            c = cnt[k]
            if c == 0.0:
                continue
            f = 1.0  # share of bin k inside [lo, hi]
            if k == ia:
                f -= min(max(ka - k, 0.0), 1.0)
            if k == ib:
                f -= 1.0 - min(max(kb - k, 0.0), 1.0)
            if f <= 0.0:
                continue
            mk = sm[k] / c
            s += f * sm[k]
            s2 += f * c * mk * mk
            m += f * c
        if m < 16.0:
            break
        mean = centre + s / m
        std = math.sqrt(max(s2 / m - (s / m) ** 2, 0.0))
        used = int(round(m))
        nlo = mean - clip * std
        nhi = mean + clip * std
        # converged when the clip limits move by < 0.1% of sigma (a few passes)
        if abs(nlo - lo) <= 1e-3 * std and abs(nhi - hi) <= 1e-3 * std:
            break
        lo, hi = nlo, nhi
    return mean, std, used


@njit(cache=True, nogil=True)
def _clipped_stats_blocks(img, good, nby, nbx, clip, iters, out):
    """Clipped (mean, std, n_used) of the finite ``good`` pixels of all of
    ``img`` into ``out[0]``, and of each of its ``nby`` x ``nbx`` blocks (block
    (i, j): rows ``i*ny//nby`` to ``(i+1)*ny//nby``, columns alike) into
    ``out[1 + i*nbx + j]``, from one pass: every histogram is binned around
    the median and MAD of the whole, then clipped on its own (as
    :func:`_clipped_stats`).  n_used = 0 where a block has < 16 usable pixels."""
    ny, nx = img.shape
    out[:] = 0.0
    centre, mad, n = _start_stats(img, good, 0, ny, 0, nx, 1, np.inf)
    if n == 0:
        return
    if not mad > 0:  # (nearly) constant data: no dispersion to measure
        out[0, 0] = centre
        out[0, 2] = n
        return
    nb = _NBINS
    w = 2.0 * _HRANGE * mad / nb
    lo0 = centre - _HRANGE * mad
    inv_w = 1.0 / w
    cnt = np.zeros((1 + nby * nbx, nb), np.float64)
    sm = np.zeros((1 + nby * nbx, nb), np.float64)
    bx = np.empty(nx, np.int64)
    for j in range(nbx):
        for x in range(j * nx // nbx, (j + 1) * nx // nbx):
            bx[x] = 1 + j
    for i in range(nby):
        for y in range(i * ny // nby, (i + 1) * ny // nby):
            row = i * nbx
            for x in range(nx):
                v = img[y, x]
                if good[y, x]:
                    t = (v - lo0) * inv_w
                    if 0.0 <= t < nb:  # NaN fails the comparisons
                        k = int(t)
                        d = v - centre
                        cnt[0, k] += 1.0
                        sm[0, k] += d
                        cnt[row + bx[x], k] += 1.0
                        sm[row + bx[x], k] += d
    for b in range(1 + nby * nbx):
        mean, std, used = _clip_histogram(cnt[b], sm[b], centre, mad, lo0, inv_w, clip, iters)
        if used > 0:
            out[b, 0] = mean
            out[b, 1] = std
            out[b, 2] = used


class TileStats(tuple):
    """``(background, sigma)`` of one image in one window."""

    __slots__ = ()

    def __new__(cls, background: float, sigma: float):
        return super().__new__(cls, (float(background), float(sigma)))

    background = property(lambda self: self[0])
    sigma = property(lambda self: self[1])


def tile_stats(image: np.ndarray, *, variance: np.ndarray | None = None,
               saturation: float = math.inf, subtract: bool = True,
               fallback_sigma: float | None = None, samples: int = 250_000) -> TileStats:
    """Clipped background and noise of a whole array (a regular subsample).

    The noise is the truncation-corrected clipped std, or sqrt(median
    variance) when a variance map is given.  ``(0, fallback_sigma)`` when no
    pixel is usable.
    """
    img = np.asarray(image, dtype=np.float32)
    step = max(1, int(math.sqrt(img.size / samples)))
    mean, std, n = _clipped_stats(img, 0, img.shape[0], 0, img.shape[1], step,
                                  float(saturation), CLIP, 20)
    fb = fallback_sigma if fallback_sigma else 1.0
    if n == 0:
        return TileStats(0.0, fb)
    sigma = std / _TRUNC
    if variance is not None:
        v = np.asarray(variance)[::step, ::step]
        v = v[np.isfinite(v) & (v > 0)]
        if v.size:
            sigma = math.sqrt(float(np.median(v)))
    return TileStats(mean if subtract else 0.0, sigma if sigma > 0 else fb)


class MeshBackground:
    """Background mesh of one image on a global grid of ``cell``-pixel cells.

    Cells are computed on first use from the image (through ``reader``) and
    cached; the object belongs to one pipeline engine and is used from one
    thread.

    Parameters
    ----------
    reader : ImageReader
    cell : int
        Cell side in pixels.
    saturation : float
        Pixels at or above it are ignored.
    subtract : bool
        When False the background is 0 (the rms is still measured).
    fallback_sigma : float
        Noise of cells with no usable pixel.
    """

    def __init__(self, reader, *, cell: int, saturation: float = math.inf,
                 subtract: bool = True, fallback_sigma: float = 1.0) -> None:
        self.reader = reader
        self.cell = int(cell)
        # a regular subsample of >= _MESH_PIXELS pixels per cell: the clipped
        # mean of 128^2 pixels is good to 0.008 sigma, and reading every other
        # row and column of a 256-pixel cell costs a quarter of reading them all
        self.step = max(1, int(math.sqrt(self.cell * self.cell / _MESH_PIXELS)))
        self.saturation = float(saturation)
        self.subtract = subtract
        self.fallback_sigma = float(fallback_sigma)
        ny, nx = reader.shape
        self.n_cells = (-(-ny // self.cell), -(-nx // self.cell))
        self._bkg = np.full(self.n_cells, np.nan)
        self._rms = np.full(self.n_cells, np.nan)

    def _compute_row(self, i: int) -> None:
        """All cells of cell row ``i`` from one read of its band of rows
        (reading cell by cell would map and drop the same pages many times)."""
        ny, nx = self.reader.shape
        b = self.cell
        s = self.step
        box = Box(i * b, min((i + 1) * b, ny), 0, nx)
        pix = self.reader.read(box, step=s)
        for j in range(self.n_cells[1]):
            mean, std, n = _clipped_stats(pix, 0, pix.shape[0], -(-j * b // s),
                                          -(-min((j + 1) * b, nx) // s), 1,
                                          self.saturation, CLIP, 8)
            if n == 0:  # nothing usable (all NaN/saturated): neutral values
                mean, sig = np.nan, self.fallback_sigma
            else:
                sig = std / _TRUNC if std > 0 else self.fallback_sigma
            self._bkg[i, j] = mean if self.subtract else 0.0
            self._rms[i, j] = sig

    def warm(self, y_limit: int) -> bool:
        """Compute the first missing cell row that starts above image row ``y_limit``.

        Called once per tile, this spreads the cells the next row of tiles will
        need over the tiles of the current one, instead of computing them all
        when the first tile of the next row is read.  Returns whether a row
        was computed.
        """
        for i in range(min(self.n_cells[0], -(-int(y_limit) // self.cell))):
            if np.isnan(self._rms[i, 0]):
                self._compute_row(i)
                return True
        return False

    def mesh(self, box: Box) -> tuple[np.ndarray, int, int, float]:
        """Cell values needed to interpolate over ``box`` (image pixels).

        Returns ``(values, i0, j0, sigma)``: background of cells ``i0..``,
        ``j0..`` (cells without data take the median of the others) and the
        median rms of the cells that overlap ``box``.
        """
        ny, nx = self.reader.shape
        b = self.cell
        clip = box.clip(ny, nx)
        # the bilinear stencil reaches the next cell centre on either side
        i0 = max(0, (clip.y0 - b // 2) // b)
        i1 = min(self.n_cells[0], (clip.y1 - 1 + b // 2) // b + 1)
        j0 = max(0, (clip.x0 - b // 2) // b)
        j1 = min(self.n_cells[1], (clip.x1 - 1 + b // 2) // b + 1)
        for i in range(i0, i1):
            if np.isnan(self._rms[i, 0]):
                self._compute_row(i)
        vals = self._bkg[i0:i1, j0:j1].astype(np.float64)
        bad = ~np.isfinite(vals)
        if bad.all():
            vals[:] = 0.0
        elif bad.any():
            vals[bad] = np.median(vals[~bad])
        core = self._rms[clip.y0 // b:(clip.y1 - 1) // b + 1, clip.x0 // b:(clip.x1 - 1) // b + 1]
        return vals, i0, j0, float(np.median(core))
