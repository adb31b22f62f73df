"""Streaming pipeline: read -> tile -> subtract -> write.

:func:`plan_run` validates the inputs once and derives everything global
(PSFs, saturation and gain, noise levels, the overlap from the ZOGY kernels,
the tile grid) into a picklable :class:`RunPlan`.  A :class:`TileEngine`
owns the per-process state for a plan (open readers, FFT plans, kernel
cache) and turns one tile into a :class:`TileResult`.  :func:`stream` yields
tile results as they are done, reading ahead in a background thread;
:func:`subtract` drives it into pre-sized output files.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from astropy.io import fits

from . import _numba as nk
from .background import MeshBackground, tile_stats
from .catalog import candidate_table, find_candidates, write_catalog
from .errors import Cancelled, InputError, ProcessingError
from .fft import Wisdom, default_wisdom_path, pyfftw
from .fitsio import ImageReader, OutputFile, Plane, wcs_cards
from .masks import EXCLUDE_CANDIDATE, MaskBit
from .options import Options
from .psf import psf_fwhm
from .tiles import Box, Tile, TileGrid
from .zogy import KernelCache, TileSubtractor, kernel_radius, make_kernels, PsfSpectra

__all__ = ["Inputs", "RunPlan", "TileResult", "TileEngine", "SubtractSummary",
           "plan_run", "stream", "subtract", "OUTPUT_PLANES"]

log = logging.getLogger(__name__)

#: float32 image extensions of the output file, in order, with their meaning
OUTPUT_PLANES = {
    "D": "proper difference image, unit variance (ZOGY eq. 13)",
    "S": "score image S = S_N - S_R (eq. 12)",
    "SCORR": "corrected score, source+astrometric noise (eq. 25)",
    "FLUX": "PSF flux of a point source, reference units (eq. 41)",
    "FLUX_ERR": "1-sigma error of FLUX (eq. 41)",
}


_NOISE_KINDS = ("var", "weight", "err")
#: Fraction of the ZOGY kernels' energy allowed beyond the tile overlap
#: (:func:`~zogy_stream.zogy.kernel_radius`).  With both PSFs given the tiles
#: equal the whole-image computation to float32 precision.  A PSF stacked from
#: ~100 stars differs from the true one by 1.5e-4 to 9e-4 of its energy (the
#: images-only benchmark scenes), and its kernels have wings whose energy beyond
#: r falls only as ~r^-4, far below what the PSF itself is known to.  On the
#: 4096^2 scene the overlap is 132 px at 1e-5 (247 at 1e-6); with the same PSFs,
#: D then differs from the whole-image computation by at most 0.008 sigma
#: (0.003 at 247 px).  README, stop 28.
_KERNEL_TOL_GIVEN = 1e-6
_KERNEL_TOL_ESTIMATED = 1e-5


def _as_variance(kind: str, a: np.ndarray) -> np.ndarray:
    """Variance from a noise map: ``var`` as is, ``weight`` = 1/variance, ``err`` = 1-sigma.

    Pixels whose weight or error is not positive and finite come out NaN, which
    masks them.
    """
    if kind == "var":
        return a
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ok = (a > 0) & np.isfinite(a)
        if kind == "weight":
            return np.where(ok, 1.0 / a, np.nan).astype(np.float32)
        return np.where(ok, np.square(a, dtype=np.float32), np.nan).astype(np.float32)


@dataclass(frozen=True)
class Inputs:
    """Input sources: FITS paths (``file.fits[ext]`` allowed) or 2-D arrays."""

    new: object
    ref: object
    new_psf: object = None
    ref_psf: object = None
    new_var: object = None
    ref_var: object = None
    new_mask: object = None
    ref_mask: object = None
    new_weight: object = None
    ref_weight: object = None
    new_err: object = None
    ref_err: object = None

    def sources(self) -> dict[str, object]:
        """The image-shaped inputs that are given, by label."""
        items = {"NEW": self.new, "REF": self.ref, "--new-var": self.new_var,
                 "--ref-var": self.ref_var, "--new-mask": self.new_mask,
                 "--ref-mask": self.ref_mask, "--new-weight": self.new_weight,
                 "--ref-weight": self.ref_weight, "--new-err": self.new_err,
                 "--ref-err": self.ref_err}
        return {k: v for k, v in items.items() if v is not None}

    def noise(self, img: str) -> str | None:
        """Which noise map ``img`` ("new" or "ref") has: "var", "weight", "err" or None."""
        for kind in _NOISE_KINDS:
            if getattr(self, f"{img}_{kind}") is not None:
                return kind
        return None


@dataclass(frozen=True)
class RunPlan:
    """Everything global about one subtraction, computed once (picklable)."""

    inputs: Inputs
    opts: Options
    shape: tuple[int, int]
    new_psf: np.ndarray
    ref_psf: np.ndarray
    saturation: tuple[float, float]
    gain: tuple[float | None, float | None]
    sigma: tuple[float, float]
    kernel_radius: int
    grow_radius: int
    peak_radius: int
    grid: TileGrid
    new_header: fits.Header = field(repr=False)
    psf_sources: tuple = (None, None)
    flux_ratio: float = 1.0
    flux_ratio_err: float = float("nan")
    flux_ratio_src: str = "user"
    astrometric_sigma: tuple[float, float] = (0.0, 0.0)
    astrometric_src: str = "user"
    cosmics: tuple[bool, bool] = (False, False)
    read_noise: tuple[float | None, float | None] = (None, None)
    bleed: int = 0

    @property
    def has_var(self) -> bool:
        i = self.inputs
        return (i.noise("new") is not None or i.noise("ref") is not None
                or any(g is not None for g in self.gain))

    @property
    def split(self) -> bool:
        """S_N and S_R are kept apart: for the astrometric or the model-error term."""
        return max(self.astrometric_sigma) > 0 or self.opts.model_error != 0

    @property
    def local_flux_ratio(self) -> bool:
        return self.opts.flux_ratio == "local"


@dataclass(frozen=True)
class TileResult:
    """One finished tile: its core box in image pixels and the core arrays.

    Arrays are float32 (``mask`` uint8) of the core's shape and belong to
    the caller.  ``candidates`` is an astropy Table (image coordinates).
    """

    tile: Tile
    box: Box
    d: np.ndarray
    s: np.ndarray
    scorr: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    mask: np.ndarray
    candidates: object
    stats: dict


@dataclass(frozen=True)
class SubtractSummary:
    """What :func:`subtract` did."""

    out: Path
    catalog: Path | None
    n_candidates: int
    shape: tuple[int, int]
    n_tiles: int
    seconds: float
    timings: dict
    stamps: Path | None = None
    png: Path | None = None
    header: object = None

    @property
    def mpix_per_s(self) -> float:
        return self.shape[0] * self.shape[1] / 1e6 / max(self.seconds, 1e-9)


# --------------------------------------------------------------------- planning
def _header_float(header, key: str) -> float | None:
    try:
        v = float(header[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _global_sigma(reader: ImageReader, noise_reader: ImageReader | None, kind: str | None,
                  sat: float) -> float:
    step = max(1, int(math.sqrt(reader.shape[0] * reader.shape[1] / 250_000)))
    img = reader.sample(step)
    var = _as_variance(kind, noise_reader.sample(step)) if noise_reader is not None else None
    if not np.any(np.isfinite(img)):
        raise InputError(f"{reader.label}: image has no finite pixels")
    return tile_stats(img, variance=var, saturation=sat).sigma


def plan_run(inputs: Inputs, opts: Options) -> RunPlan:
    """Validate inputs and derive the global quantities of a run.

    Raises
    ------
    InputError
        Unreadable or inconsistent inputs, missing or invalid PSFs.
    """
    readers: dict[str, ImageReader] = {}
    try:
        for label, src in inputs.sources().items():
            readers[label] = ImageReader(src, label=label)
        shape = readers["NEW"].shape
        for label, rd in readers.items():
            if rd.shape != shape:
                raise InputError(f"{label} has shape {rd.shape[1]}x{rd.shape[0]} but NEW is "
                                 f"{shape[1]}x{shape[0]}; images must be registered on one grid")
        for img in ("new", "ref"):
            given = [f"--{img}-{k}" for k in _NOISE_KINDS if getattr(inputs, f"{img}_{k}") is not None]
            if len(given) > 1:
                raise InputError(f"give one noise map of {img.upper()}, not {' and '.join(given)}")
        hn, hr = readers["NEW"].header, readers["REF"].header
        sk, gk = opts.saturate_key, opts.gain_key
        from .calibrate import detect_saturation  # no keyword: a pile-up at the maximum
        sat = (opts.new_saturation or _header_float(hn, sk) or detect_saturation(readers["NEW"]),
               opts.ref_saturation or _header_float(hr, sk) or detect_saturation(readers["REF"]))
        gain = [opts.new_gain or opts.gain or _header_float(hn, gk),
                opts.ref_gain or opts.gain or _header_float(hr, gk)]
        for k, img in enumerate(("new", "ref")):
            if inputs.noise(img) is not None:
                gain[k] = None
            elif gain[k] is None and not isinstance(getattr(inputs, img), np.ndarray):
                log.warning("%s has no %s keyword and no --gain was given: its variance is the "
                            "background variance only (no source Poisson term)",
                            img.upper(), gk)
        gain = tuple(gain)
        sigma = tuple(_global_sigma(readers[img.upper()], readers.get(f"--{img}-{inputs.noise(img)}"),
                                    inputs.noise(img), s) for img, s in (("new", sat[0]), ("ref", sat[1])))
        cosmics = tuple(_cosmics_on(opts.cosmic_rays, inputs, img, h)
                        for img, h in (("new", hn), ("ref", hr)))
        rn = (_header_float(hn, "RDNOISE"), _header_float(hr, "RDNOISE"))
        cal = _calibrate(inputs, opts, readers, shape, sat, gain, cosmics=cosmics,
                         sigma=sigma, read_noise=rn)
    finally:
        for rd in readers.values():
            rd.close()
    src_n, src_r, fr, fr_err, fr_src, ast, ast_src = cal
    new_psf, ref_psf = src_n.psf, src_r.psf
    kw = dict(sigma_n=sigma[0], sigma_r=sigma[1], flux_ratio=fr)
    pairs = [(src_n.largest, src_r.largest)]
    if src_n.field_model is not None or src_r.field_model is not None:
        from .calibrate import outer_tile_centres

        # the pairs tiles get from field-varying PSFs, where they are most extreme: each
        # image's broadest PSF paired with the other's mean is a pair no tile has (a
        # 244 px radius for 160 on a crowded scene), and the mean of a varying PSF, a
        # blend of widths, needs more reach than any of them (126 px for 85)
        pairs = [(src_n.psf_at(x, y) if src_n.field_model is not None else src_n.largest,
                  src_r.psf_at(x, y) if src_r.field_model is not None else src_r.largest)
                 for x, y in outer_tile_centres(shape, opts.tile)]
    estimated = "auto" in (src_n.kind, src_r.kind)
    tol = _KERNEL_TOL_ESTIMATED if estimated else _KERNEL_TOL_GIVEN
    rk = max(kernel_radius(pn, pr, tol=tol, **kw) for pn, pr in pairs)
    # NEAR: the reach of a flagged pixel.  Through S's kernels alone it is smaller,
    # but sources cut by a mask's edge leave residuals beyond it: on the real pairs
    # an S-only radius let one more spurious candidate through in 2 of 6 (Bosque
    # Alegre 2 -> 3, DECam e 8 -> 9), so D's kernels count too
    grow = max(kernel_radius(pn, pr, tol=1e-3, **kw) for pn, pr in pairs)
    fwhm_max = max(psf_fwhm(p) for pair in pairs for p in pair)
    peak = max(2, int(round(0.5 * fwhm_max)))
    margin = opts.overlap if opts.overlap is not None else rk + peak + 2
    if opts.image_space and margin < rk + peak + 2:
        raise InputError(f"--overlap {margin} is smaller than the image-space kernel needs "
                         f"({rk + peak + 2}); drop --overlap or raise it")
    margin = max(margin, peak + 2)
    grid = TileGrid(shape, opts.tile, margin)
    bleed = int(min(margin, max(4, round(3 * fwhm_max))))
    log.info("image %dx%d, %d tiles of %d (padded %dx%d), kernel radius %d px, "
             "sigma new %.4g ref %.4g; PSFs: new %s, ref %s; flux ratio %.4g (%s); "
             "astrometric sigma %.3g %.3g (%s); cosmic rays new %s ref %s", shape[1], shape[0],
             len(grid), opts.tile, grid.size[1], grid.size[0], rk, sigma[0], sigma[1],
             src_n.kind, src_r.kind, fr, fr_src, ast[0], ast[1], ast_src,
             "on" if cosmics[0] else "off", "on" if cosmics[1] else "off")
    return RunPlan(inputs=inputs, opts=opts, shape=shape, new_psf=new_psf, ref_psf=ref_psf,
                   saturation=sat, gain=gain, sigma=sigma, kernel_radius=rk,
                   grow_radius=grow, peak_radius=peak, grid=grid, new_header=hn,
                   psf_sources=(src_n, src_r), flux_ratio=fr, flux_ratio_err=fr_err,
                   flux_ratio_src=fr_src, astrometric_sigma=ast, astrometric_src=ast_src,
                   cosmics=cosmics, read_noise=rn, bleed=bleed)


def _cosmics_on(mode: str, inputs: Inputs, img: str, header) -> bool:
    """``--cosmic-rays auto``: on for an image given without a variance/weight/error map
    or mask, whose header identifies an exposure (EXPTIME, EXPOSURE, GAIN, RDNOISE or
    DATE-OBS) and does not mark a coadd (NCOMBINE > 1); arrays and bare files: off."""
    if mode != "auto":
        return mode == "on"
    if inputs.noise(img) is not None or getattr(inputs, f"{img}_mask") is not None:
        return False
    if isinstance(getattr(inputs, img), np.ndarray) or not any(
            k in header for k in ("EXPTIME", "EXPOSURE", "GAIN", "RDNOISE", "DATE-OBS")):
        return False  # no header that identifies an exposure (arrays, bare files): off
    try:
        ncombine = float(header.get("NCOMBINE", 1))
    except (TypeError, ValueError):
        ncombine = 1.0
    return not ncombine > 1


def _calibrate(inputs: Inputs, opts: Options, readers, shape, sat, gain, *,
               cosmics=(False, False), sigma=(None, None), read_noise=(None, None)):
    """PSF sources, flux ratio and astrometric sigma (estimated from stars when needed).

    The star catalogues of an image whose cosmic rays are masked (``cosmics``)
    are measured with its hits masked, as its tiles will be.
    """
    from . import calibrate as cb

    src_n = cb.load_psf_source(inputs.new_psf, "NEW", psf_size=opts.psf_size)
    src_r = cb.load_psf_source(inputs.ref_psf, "REF", psf_size=opts.psf_size)
    for i, src in enumerate((src_n, src_r)):
        if src is not None and src.kind == "psfex":
            centre, largest = cb.psfex_extremes(src, shape)
            src = dataclasses.replace(src, psf=centre, largest=largest)
            if i == 0:
                src_n = src
            else:
                src_r = src
    fr_auto = opts.flux_ratio in ("auto", "local")
    ast_auto = opts.astrometric_sigma == "auto" or (  # default: auto when stars are matched
        opts.astrometric_sigma == "default" and (src_n is None or src_r is None or fr_auto))
    regions_n = regions_r = None
    if src_n is None or src_r is None or fr_auto or ast_auto:
        boxes = cb.sample_boxes(shape)
        # two regions at a time when --threads allows: sep holds the GIL, so more
        # threads gain little on the measured two cores, and each region in flight
        # holds ~60 MiB of temporaries (4096², images only, warm: plan 3.4-3.7 s
        # against 4.0-4.2 s one region at a time; peak RSS 487 against 424 MiB,
        # 572 MiB with four at a time)
        regions_n, regions_r = _region_stars(cb, readers, boxes, sat, gain, cosmics, sigma,
                                             read_noise, min(opts.threads, 2))
        cb.drop_extended_matches(regions_n, regions_r)
    errors = [None, None]
    srcs = [src_n, src_r]
    for k, label in enumerate(("NEW", "REF")):
        if srcs[k] is None:
            try:
                srcs[k] = cb.estimate_global_psf((regions_n, regions_r)[k], label,
                                                 saturation=sat[k], psf_size=opts.psf_size,
                                                 local=opts.local_psf, shape=shape)
            except ProcessingError as exc:
                errors[k] = exc
    if any(s is None or s.moffat is not None for s in srcs):
        # star-poor: fit through the other image's PSF, whose sources show this one's too
        srcs = cb.fill_psfs_through_other(*srcs, regions_n, regions_r, errors=errors,
                                          gains=gain, psf_size=opts.psf_size)
    src_n, src_r = srcs
    if src_n.moffat is not None or src_r.moffat is not None:  # star-poor: share the shape
        src_n, src_r = cb.share_moffat_beta(src_n, src_r, regions_n, regions_r,
                                            saturation=sat, psf_size=opts.psf_size)
        for src in (src_n, src_r):
            if src.moffat is not None:
                log.warning("%s: too few stars for an empirical PSF; using a Moffat profile "
                            "(FWHM %.2f px, beta %.2f) fitted to %d star(s) of S/N >= %g",
                            src.label, *src.moffat)
    if fr_auto:
        fr, fr_err, _, fr_src = cb.fit_global_flux_ratio(regions_n, regions_r,
                                                         psfs=(src_n, src_r), gains=gain)
    else:
        fr, fr_err, fr_src = float(opts.flux_ratio), float("nan"), "user"
    if ast_auto:
        sx, sy, _, ast_src = cb.fit_global_astrometric_sigma(regions_n, regions_r)
        ast = (sx, sy)
    elif opts.astrometric_sigma == "default":
        ast, ast_src = (0.0, 0.0), "default"
    else:
        ast, ast_src = tuple(opts.astrometric_sigma), "user"
    if regions_n is not None and opts.registration:  # residual sub-pixel offset -> NEW's PSF
        src_n = cb.register_psf(src_n, src_r, regions_n, regions_r)
    return src_n, src_r, fr, fr_err, fr_src, ast, ast_src


def _region_stars(cb, readers, boxes, sat, gain, cosmics, sigma, read_noise, threads):
    """Both images' plan-time star catalogues (masks and cosmic rays masked), in threads."""
    kw = dict(saturation=sat, gain=gain, sigma=sigma, read_noise=read_noise, threads=threads,
              mask_readers=tuple(readers.get(f"--{lb}-mask") for lb in ("new", "ref")))
    rds = (readers["NEW"], readers["REF"])
    try:
        return cb.pair_region_stars(rds, boxes, cosmic_rays=cosmics, **kw)
    except ImportError as exc:  # the tiles will say so too
        log.warning("cosmic-ray detection unavailable (%s)", exc)
        return cb.pair_region_stars(rds, boxes, **kw)


# ----------------------------------------------------------------- per process
@dataclass
class _Loaded:
    tile: Tile
    windows: dict
    stats: tuple
    extra: dict | None = field(default_factory=dict)  # None: not yet calibrated
    buffers: list = field(default_factory=list)  # of the engine's window pool


class _WindowPool:
    """Reused float32 buffers for the reader's tile windows.

    Each tile's input windows (4 planes of the padded tile with variance
    maps) would otherwise be new arrays, which the reader, engine and writer
    threads allocate and free in no fixed order, so glibc hands many of them
    back to the system and every tile pages fresh, zeroed memory in again.
    :meth:`take` gives a C-contiguous view of a free buffer of ``size``
    elements (a new one when none is free, or a plain new array for a larger
    shape); :meth:`give` returns buffers, of which at most ``keep`` are kept.
    Thread-safe: the reader takes, the tile threads give back.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size, self.keep = int(size), int(keep)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape) -> tuple[np.ndarray, np.ndarray | None]:
        """(view of ``shape``, the pooled buffer behind it or None)."""
        n = int(shape[0]) * int(shape[1])
        if n > self.size:
            return np.empty(shape, np.float32), None
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = np.empty(self.size, np.float32)
        return buf[:n].reshape(shape), buf

    def give(self, buffers) -> None:
        with self._lock:
            for buf in buffers:
                if buf is not None and len(self._free) < self.keep:
                    self._free.append(buf)


class TileEngine:
    """Per-process state for a plan: readers, FFT plans, kernel cache.

    Parameters
    ----------
    plan : RunPlan
    wisdom : Wisdom, optional
        FFTW wisdom cache (loaded before planning, saved after).
    threads : int, optional
        FFT threads of :meth:`process` (default ``plan.opts.threads``; fewer when
        several tiles are processed at once, see :meth:`fork`).
    """

    _EMPTY = np.empty((1, 1), dtype=np.float32)

    def __init__(self, plan: RunPlan, *, wisdom: Wisdom | None = None,
                 threads: int | None = None) -> None:
        self.plan = plan
        o = plan.opts
        self.threads = int(threads or o.threads)
        self.readers = {label: ImageReader(src, label=label)
                        for label, src in plan.inputs.sources().items()}
        self.timings: dict[str, float] = defaultdict(float)
        self._wisdom = wisdom
        if wisdom is not None:
            wisdom.load()
            known = pyfftw.export_wisdom()
        t0 = time.perf_counter()
        self.sub = TileSubtractor(plan.grid.size, has_var=plan.has_var, split=plan.split,
                                  image_space=o.image_space, radius=plan.kernel_radius,
                                  threads=self.threads, effort=o.fft_effort)
        self.timings["plan"] += time.perf_counter() - t0
        if wisdom is not None:
            learned = pyfftw.export_wisdom() != known
            if learned or not wisdom.loaded:
                # the planner learned something, or the file is missing or unreadable
                # (the process may know the plans from an earlier run): keep it for
                # the next run
                wisdom.save(learned=learned)
        self.kernels = KernelCache(plan.grid.size, dtype=np.float32)
        self.mesh_new = MeshBackground(self.readers["NEW"], cell=o.bkg_mesh,
                                       saturation=plan.saturation[0], subtract=o.background,
                                       fallback_sigma=plan.sigma[0])
        self.mesh_ref = MeshBackground(self.readers["REF"], cell=o.bkg_mesh,
                                       saturation=plan.saturation[1], subtract=o.background,
                                       fallback_sigma=plan.sigma[1])
        # the windows of up to 8 tiles in flight are kept for reuse (2 n + prefetch
        # with n tiles at once: 5 by default; more than 8 only with n >= 4)
        self._windows = _WindowPool(plan.grid.size[0] * plan.grid.size[1],
                                    keep=8 * len(self.readers))
        self._mask = np.empty(plan.grid.size, dtype=np.uint8)
        self._grown = np.empty(plan.grid.size, dtype=np.uint8)
        self._tmp = np.empty(plan.grid.size, dtype=np.uint8)
        self._nonpos = np.empty(plan.grid.size[0], dtype=np.int64)
        self._cosmics_psf = (None, None)  # the PSF test of L.A.Cosmic (undersampled only)
        if any(plan.cosmics):
            from .cosmics import UNDERSAMPLED_FWHM
            from .stars import measure_psf  # profile FWHM: psf_fwhm's pixel count is coarse

            self._cosmics_psf = tuple(psf if measure_psf(psf)[0] < UNDERSAMPLED_FWHM else None
                                      for psf in (plan.new_psf, plan.ref_psf))

    def fork(self) -> "TileEngine":
        """Another compute context for :meth:`process` on this engine's plan, so
        two tiles can be processed at once: its own FFT plans (on as many
        threads), work buffers and timings.  Readers, background meshes and the
        (thread-safe) kernel cache are shared; :meth:`load` stays with this
        engine (one reader thread), though a tile's own calibration may be left
        to the context that processes it (``load(calibrate=False)``).
        """
        p, o = self.plan, self.plan.opts
        twin = copy.copy(self)
        known = pyfftw.export_wisdom()
        twin.sub = TileSubtractor(p.grid.size, has_var=p.has_var, split=p.split,
                                  image_space=o.image_space, radius=p.kernel_radius,
                                  threads=self.threads, effort=o.fft_effort)
        if self._wisdom is not None and pyfftw.export_wisdom() != known:
            self._wisdom.save()
        for name in ("_mask", "_grown", "_tmp", "_nonpos"):
            setattr(twin, name, np.empty_like(getattr(self, name)))
        twin.timings = defaultdict(float)
        return twin

    def close(self) -> None:
        for rd in self.readers.values():
            rd.close()

    # reading happens in a background thread: no shared mutable state here
    # (but the thread-safe window pool)
    def load(self, tile: Tile, *, calibrate: bool = True) -> _Loaded:
        """Read the in-image part of a tile's window from every input.

        The windows are in buffers of the engine's pool: hand them back with
        :meth:`release` once :meth:`process` is done with them (else they are
        simply garbage-collected).  With ``calibrate=False`` the tile's own
        calibration (masks, cosmic rays, local PSFs, local flux ratio) is left
        to :meth:`process`, i.e. to the thread that processes the tile.
        """
        t0 = time.perf_counter()
        p = self.plan
        # read() drops each chunk's mapped pages as it copies: no release needed here
        win, pooled = {}, []
        for label, rd in self.readers.items():
            view, buf = self._windows.take(tile.valid.shape)
            win[label] = rd.read(tile.valid, out=view)
            pooled.append(buf)
        for img in ("new", "ref"):
            kind = p.inputs.noise(img)
            if kind in ("weight", "err"):  # unusable weights/errors mask via a NaN variance
                win[f"--{img}-var"] = _as_variance(kind, win.pop(f"--{img}-{kind}"))
        extra = self._tile_calibration(tile, win) if calibrate else None
        stats = []
        ly, lx = p.grid.size
        for mesh, var in ((self.mesh_new, win.get("--new-var")), (self.mesh_ref, win.get("--ref-var"))):
            values, i0, j0, sigma = mesh.mesh(tile.window)
            rows = np.empty((ly, values.shape[1]))
            xi = np.empty(lx, np.int64)
            xw = np.empty(lx)
            nk._mesh_rows(values, i0, j0, mesh.cell, tile.window.y0, tile.window.x0, ly, lx,
                          rows, xi, xw)
            if var is not None:
                v = var[::4, ::4]
                v = v[np.isfinite(v) & (v > 0)]
                sigma = math.sqrt(float(np.median(v))) if v.size else sigma
            stats.append((rows, xi, xw, sigma, float(values.mean())))
        for mesh in (self.mesh_new, self.mesh_ref):  # a share of the next tile row's cells
            mesh.warm(tile.window.y1 + p.grid.core_shape[0] + mesh.cell)
        self.timings["read+stats"] += time.perf_counter() - t0
        return _Loaded(tile, win, tuple(stats), extra, pooled)

    @property
    def heavy_calibration(self) -> bool:
        """Whether each tile's calibration is costly: cosmic rays, local PSFs or
        a local flux ratio (seconds per tile, against milliseconds of masks)."""
        p = self.plan
        return bool(any(p.cosmics) or p.local_flux_ratio
                    or any(s is not None and s.kind == "auto" and s.local
                           for s in p.psf_sources))

    def warm_kernels(self) -> None:
        """Build the kernel set of the mosaic-wide PSFs, flux ratio and noise levels.

        Run in a background thread while the first tiles are read (see
        :func:`_iter_tiles`): a tile whose noise level snaps to the same step
        (:func:`~zogy_stream.zogy.snap_sigma`; most do when the noise is even)
        then finds the set built or being built (~0.1-0.2 s at 1080^2) instead
        of starting it.  Nothing when the PSFs or the flux ratio vary by tile; a
        failure is left for the tile that needs the set to report.
        """
        p = self.plan
        srcs = p.psf_sources
        if p.local_flux_ratio or any(s is None or s.varies for s in srcs):
            return
        try:  # the key and PSFs of a tile whose sources say image/global
            self.kernels.get((0, 0), srcs[0].psf, srcs[1].psf, sigma_n=p.sigma[0],
                             sigma_r=p.sigma[1], flux_ratio=p.flux_ratio)
        except Exception as exc:  # noqa: BLE001 - the tiles build (and raise) themselves
            log.debug("kernels of the mosaic-wide PSFs not built ahead: %s", exc)

    def release(self, loaded: _Loaded) -> None:
        """Return ``loaded``'s window buffers to the pool; its windows are gone."""
        buffers, loaded.buffers, loaded.windows = loaded.buffers, [], {}
        self._windows.give(buffers)

    def _tile_calibration(self, tile: Tile, win: dict) -> dict:
        """Per-tile masks (bleed, cosmic rays), PSFs and flux ratio (see :meth:`load`)."""
        p = self.plan
        extra: dict = {}
        bits = None
        bad = [None, None]  # per image: the user's mask and cosmic rays (tile catalogues)
        for k, (label, mlabel) in enumerate((("NEW", "--new-mask"), ("REF", "--ref-mask"))):
            img = win[label]
            if win.get(mlabel) is not None:
                bad[k] = win[mlabel] != 0
            sat = p.saturation[k]
            if math.isfinite(sat):
                s = img >= sat
                if s.any():  # bleed footprint: generously along columns, a little across
                    from scipy import ndimage  # only here: its import costs ~0.15 s

                    g = ndimage.maximum_filter1d(s.view(np.uint8), 2 * p.bleed + 1, axis=0)
                    g = ndimage.maximum_filter1d(g, 5, axis=1)
                    bits = np.zeros(img.shape, np.uint8) if bits is None else bits
                    bits[g > 0] |= int(MaskBit.SATURATED)
            from .calibrate import defect_mask  # zero-coverage fill, bad border lines
            dm = defect_mask(img, tile.valid, p.shape, p.sigma[k])
            if dm is not None:
                bits = np.zeros(img.shape, np.uint8) if bits is None else bits
                bits[dm] |= int(MaskBit.BAD_NEW if k == 0 else MaskBit.BAD_REF)
            if p.cosmics[k]:
                t0 = time.perf_counter()
                cr = self._cosmics(img, k, win.get(mlabel))
                self.timings["cosmics"] += time.perf_counter() - t0
                extra[f"n_cosmic_{label.lower()}"] = int(cr.sum())
                if cr.any():
                    bad[k] = cr if bad[k] is None else bad[k] | cr
                    bits = np.zeros(img.shape, np.uint8) if bits is None else bits
                    bits[cr] |= int(MaskBit.COSMIC)
        if bits is not None:
            user = None
            for mlabel in ("--new-mask", "--ref-mask"):
                m = win.get(mlabel)
                if m is not None:
                    user = (m != 0) if user is None else (user | (m != 0))
            extra["bits"] = bits
            extra["user"] = user
            for mlabel in ("--new-mask", "--ref-mask"):
                m = win.get(mlabel)
                win[mlabel] = ((bits != 0) | (m != 0)).astype(np.uint8) if m is not None else \
                    (bits != 0).astype(np.uint8)
        # PSFs and flux ratio
        t0 = time.perf_counter()
        src_n, src_r = p.psf_sources
        cats = [None, None]
        need_cat = [s.kind == "auto" and s.local for s in (src_n, src_r)]
        if p.local_flux_ratio:
            need_cat = [True, True]
        maps = [(None, None), (None, None)]
        if any(need_cat):
            from .calibrate import STAR_THRESHOLD
            from .errors import ProcessingError
            from .stars import background_maps, find_stars

            for k, label in enumerate(("NEW", "REF")):
                if need_cat[k]:
                    sat = p.saturation[k]
                    sat = sat if math.isfinite(sat) else None
                    try:  # one background for the catalogue and the PSF
                        maps[k] = background_maps(win[label], saturation=sat, mask=bad[k],
                                                  threshold=STAR_THRESHOLD)
                        cats[k] = find_stars(win[label], saturation=sat, gain=p.gain[k],
                                             threshold=STAR_THRESHOLD, background=maps[k][0],
                                             rms=maps[k][1], mask=bad[k])
                    except (ProcessingError, InputError):
                        cats[k] = None
        psfs, srcs = [], []
        for k, src in enumerate((src_n, src_r)):
            label = ("NEW", "REF")[k]
            cat = cats[k]
            window = win[label] if (src.kind == "auto" and src.local and cat is not None
                                    and len(cat)) else None
            psf, how, _ = src.for_tile(tile, window, saturation=p.saturation[k], stars=cat,
                                       background=maps[k][0], rms=maps[k][1], mask=bad[k])
            psfs.append(psf)
            srcs.append(how)
        extra["psf"] = tuple(psfs)
        extra["psf_src"] = tuple(srcs)
        fr, fr_err, fr_src = p.flux_ratio, p.flux_ratio_err, p.flux_ratio_src
        if p.local_flux_ratio:
            from .calibrate import fit_local_flux_ratio

            res = fit_local_flux_ratio(cats[0], cats[1])
            if res is not None:
                fr, fr_err, fr_src = float(res[0]), float(res[1]), "local"
            else:
                fr_src = "global"
                log.info("tile %d: too few matched stars for a local flux ratio; using %.4g",
                         tile.index, fr)
        extra["flux_ratio"] = (fr, fr_err, fr_src)
        self.timings["psf+stars"] += time.perf_counter() - t0
        return extra

    def _cosmics(self, img: np.ndarray, k: int, user_mask) -> np.ndarray:
        """Cosmic-ray mask of one image window (L.A.Cosmic via astroscrappy).

        L.A.Cosmic's own median-filter fine-structure image is used, not a
        convolution with the PSF: with the PSF (FWHM 4 px) it found none of
        the 2x2-pixel hits of a simulated exposure, and at FWHM 2-3 px fewer
        than a third of all hits, where the median filter finds 99 %.  The
        median filter also flags cores of undersampled stars and transients:
        with a PSF sharper than :data:`~zogy_stream.cosmics.UNDERSAMPLED_FWHM`
        groups not sharper than it are dropped.
        """
        from .cosmics import exposure_cosmic_rays

        p = self.plan
        sat = p.saturation[k]
        try:
            return exposure_cosmic_rays(img, sigma=p.sigma[k], gain=p.gain[k],
                                        read_noise=p.read_noise[k],
                                        saturation=sat if math.isfinite(sat) else None,
                                        bad=None if user_mask is None else user_mask != 0,
                                        psf=self._cosmics_psf[k])
        except ImportError as exc:
            log.warning("cosmic-ray detection unavailable (%s)", exc)
            return np.zeros(img.shape, bool)

    def process(self, loaded: _Loaded, buffer: np.ndarray | None = None) -> TileResult:
        """ZOGY on one loaded tile; returns its core products.

        ``buffer`` (the ``out`` of :meth:`TileSubtractor.run`) receives the
        products; the result's arrays are views of it, valid until it is reused.

        Raises
        ------
        InputError
            A variance map has non-positive values at unmasked pixels.
        """
        p, o, tile = self.plan, self.plan.opts, loaded.tile
        w = loaded.windows
        (rows_n, xi_n, xw_n, sig_n, bkg_n), (rows_r, xi_r, xw_r, sig_r, bkg_r) = loaded.stats
        tim = self.timings
        if loaded.extra is None:
            t0 = time.perf_counter()
            loaded.extra = self._tile_calibration(tile, w)
            tim["calibrate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ex = loaded.extra
        psf_n, psf_r = ex.get("psf", (p.new_psf, p.ref_psf))
        psf_src = ex.get("psf_src", ("image", "image"))
        fr, fr_err, fr_src = ex.get("flux_ratio", (p.flux_ratio, p.flux_ratio_err,
                                                   p.flux_ratio_src))
        key = tuple(0 if s in ("image", "global") else ("t", tile.index, s) for s in psf_src)
        ks = self.kernels.get(key, psf_n, psf_r, sigma_n=sig_n, sigma_r=sig_r,
                              flux_ratio=fr)
        t1 = time.perf_counter()
        tim["kernels"] += t1 - t0
        vin = tile.valid_in_window
        e = self._EMPTY
        gn, gr = p.gain
        nk._prepare(w["NEW"], w["REF"], w.get("--new-var", e), w.get("--ref-var", e),
                    w.get("--new-mask", e), w.get("--ref-mask", e),
                    "--new-var" in w, "--ref-var" in w, "--new-mask" in w, "--ref-mask" in w,
                    vin.y0, vin.x0, rows_n, xi_n, xw_n, rows_r, xi_r, xw_r,
                    sig_n, sig_r, p.saturation[0],
                    p.saturation[1], 1.0 / gn if gn else 0.0, 1.0 / gr if gr else 0.0,
                    p.has_var, tile.window.y0, tile.window.x0, o.seed, self.sub.inputs,
                    self._mask, self._nonpos)
        if self._nonpos.any():
            y = int(np.argmax(self._nonpos > 0)) + tile.window.y0
            raise InputError(f"variance map has values <= 0 at unmasked pixels (e.g. row {y}); "
                             "variances must be > 0 (mask such pixels with --new-mask/--ref-mask)")
        if "bits" in ex:  # extra bits were passed as user-mask pixels: relabel them
            mv = self._mask[vin.slices]
            sel = ex["bits"] != 0
            if ex["user"] is not None:
                sel &= ~ex["user"]
            mv[sel] = (mv[sel] & ~np.uint8(MaskBit.USER)) | ex["bits"][sel]
        nk._grow_mask(self._mask, p.grow_radius, self._tmp, self._grown, self.sub.inputs[0],
                      self.sub.inputs[1], _CUT_NSIGMA * sig_n, _CUT_NSIGMA * sig_r)
        nk._edge_bits(self._grown, tile.window.y0, tile.window.x0, p.shape[0], p.shape[1],
                      p.kernel_radius)
        _cut_sources(self.sub.inputs, self._grown, tile, p.shape, (sig_n, sig_r), p.grow_radius)
        t2 = time.perf_counter()
        tim["prepare"] += t2 - t1
        b = p.peak_radius
        cw = tile.core_in_window
        region = cw.grow(b)
        var_const = sig_n ** 2 * ks.energy_n + sig_r ** 2 * ks.energy_r
        blank = None
        if o.noise_correction:  # before run(): the FFTs overwrite the inputs
            blank = _blank_sky(self.sub.inputs, region, cw, self._grown, sig_n, sig_r, b)
        tim["prepare"] += time.perf_counter() - t2
        mask_ext = self._grown[region.slices]
        # fft forward ... score
        out = self.sub.run(ks, region, astrometric_sigma=p.astrometric_sigma, var_const=var_const,
                           model_error=o.model_error, static_mask=mask_ext,
                           exclude=EXCLUDE_CANDIDATE, timings=tim, out=buffer)
        t3 = time.perf_counter()
        core = slice(b, b + cw.shape[0]), slice(b, b + cw.shape[1])
        nc = dict(factor=1.0, measured=float("nan"), err=float("nan"), applied=False)
        if blank is not None:
            # S_corr is correlated on the PSF scale: a stride-3 grid measures its
            # dispersion almost as well at a ninth of the cost
            nc = _noise_factor(out["scorr"][core][::_BLANK_STEP, ::_BLANK_STEP], blank)
            if nc["applied"]:
                out["scorr"] /= np.float32(nc["factor"])
                out["flux_err"] *= np.float32(nc["factor"])
        cands = find_candidates(out["scorr"], out["flux"], out["flux_err"], mask_ext, border=b,
                                threshold=o.threshold, radius=b, exclude=EXCLUDE_CANDIDATE,
                                origin=(tile.core.y0 - b, tile.core.x0 - b), tile=tile.index,
                                score=out["s"])
        sx, sy = p.psf_sources[0].shift if p.psf_sources[0] is not None else (0.0, 0.0)
        if len(cands) and (sx or sy):
            # S_corr peaks where the model (REF's grid) puts a source; NEW, whose PSF
            # carries the residual registration offset, sees it that far away: give
            # x, y in NEW's pixel frame, the frame of the WCS used for ra, dec
            # (x_peak, y_peak stay the S_corr peak pixel)
            cands["x"] += sx
            cands["y"] += sy
        from .products import annotate_candidates

        cands = annotate_candidates(cands, mask_ext, loaded.windows, tile, psf_n, psf_r,
                                    origin=(tile.core.y0 - b, tile.core.x0 - b),
                                    grow=p.grow_radius, peak=b, zeropoint=o.zeropoint)
        res = TileResult(
            tile=tile, box=tile.core,
            d=out["d"][core], s=out["s"][core], scorr=out["scorr"][core],
            flux=out["flux"][core], flux_err=out["flux_err"][core],
            mask=mask_ext[core].copy(), candidates=cands,
            stats=dict(bkg_new=bkg_n, bkg_ref=bkg_r,
                       sigma_new=sig_n, sigma_ref=sig_r, f_s=ks.f_s, f_d=ks.f_d,
                       psf_new=psf_src[0], psf_ref=psf_src[1],
                       fwhm_new=psf_fwhm(psf_n), fwhm_ref=psf_fwhm(psf_r),
                       flux_ratio=fr, flux_ratio_err=fr_err, flux_ratio_src=fr_src,
                       noise_factor=nc["factor"], noise_measured=nc["measured"],
                       noise_err=nc["err"], noise_applied=nc["applied"],
                       model_error=out["model_error"],
                       n_cosmic_new=ex.get("n_cosmic_new", 0),
                       n_cosmic_ref=ex.get("n_cosmic_ref", 0)),
        )
        cands.meta["tile_stats"] = _Carried({"index": tile.index, **res.stats})
        tim["candidates"] += time.perf_counter() - t3  # noise factor, peaks, flags
        return res


_CUT_NSIGMA = 10.0  # a border pixel this far above the sky is a source cut by the border


def _cut_sources(inputs, grown, tile, shape, sigmas, radius) -> None:
    """Mark NEAR (no candidates) around bright sources cut by the image border.

    Convolving a source that the border truncates cannot cancel between the two
    images (the kernels see a hard edge where the source's light stops), so a
    bright star on the border leaves residuals of high significance over its
    whole footprint and out to the kernel radius around it.  A border pixel
    more than ``_CUT_NSIGMA`` sigma above the sky in either
    background-subtracted image marks such a source; its footprint is the
    connected region above ``_CUT_FOLLOW`` sigma (in either image) that
    contains it, within ``_CUT_DEPTH`` kernel radii of the border, and NEAR
    covers that footprint widened by ``radius``.  Only the image's own border
    rows/columns seed it, so the result does not depend on the tiling.
    """
    v, w = tile.valid, tile.window
    ny, nx = shape
    iy0, iy1, ix0, ix1 = v.y0 - w.y0, v.y1 - w.y0, v.x0 - w.x0, v.x1 - w.x0
    depth = _CUT_DEPTH * radius
    # (band along a border in window coordinates, index of the border line in it)
    bands = []
    if v.y0 == 0:
        bands.append(((slice(iy0, min(iy1, iy0 + depth)), slice(ix0, ix1)), (0, None)))
    if v.y1 == ny:
        bands.append(((slice(max(iy0, iy1 - depth), iy1), slice(ix0, ix1)), (-1, None)))
    if v.x0 == 0:
        bands.append(((slice(iy0, iy1), slice(ix0, min(ix1, ix0 + depth))), (None, 0)))
    if v.x1 == nx:
        bands.append(((slice(iy0, iy1), slice(max(ix0, ix1 - depth), ix1)), (None, -1)))
    near = np.uint8(MaskBit.NEAR)
    ly, lx = grown.shape
    a, b = inputs[0], inputs[1]
    for sl, (ry, rx) in bands:
        line = (slice(ry, ry + 1 or None) if ry is not None else slice(None),
                slice(rx, rx + 1 or None) if rx is not None else slice(None))
        inside = (grown[sl] & int(MaskBit.OUTSIDE)) == 0
        hot = np.zeros(a[sl].shape, bool)
        hot[line] = (((a[sl][line] > _CUT_NSIGMA * sigmas[0])
                      | (b[sl][line] > _CUT_NSIGMA * sigmas[1])) & inside[line])
        if not hot.any():
            continue
        from scipy import ndimage  # only here: its import costs ~0.15 s

        above = ((a[sl] > _CUT_FOLLOW * sigmas[0]) | (b[sl] > _CUT_FOLLOW * sigmas[1])) & inside
        lab, _ = ndimage.label(above | hot, structure=np.ones((3, 3), bool))
        foot = np.isin(lab, np.unique(lab[hot]))
        yy, xx = np.nonzero(foot)
        yy = yy + sl[0].start
        xx = xx + sl[1].start
        # widen by ``radius``: a box filter over the footprint's bounding region
        y0, y1 = max(0, yy.min() - radius), min(ly, yy.max() + radius + 1)
        x0, x1 = max(0, xx.min() - radius), min(lx, xx.max() + radius + 1)
        fp = np.zeros((y1 - y0, x1 - x0), bool)
        fp[yy - y0, xx - x0] = True
        fp = ndimage.maximum_filter(fp, size=2 * radius + 1, mode="constant")
        grown[y0:y1, x0:x1][fp] |= near


_CUT_FOLLOW = 5.0  # a cut source's footprint: connected pixels above this many sigma
_CUT_DEPTH = 4  # ... within this many kernel radii of the border


_BLANK_STEP = 3  # S_corr is correlated on the PSF scale: every 3rd pixel nearly suffices


def _blank_sky(inputs, region, core, grown, sig_n, sig_r, b) -> np.ndarray:
    """Blank-sky points of ``core``, every ``_BLANK_STEP`` pixels (bool array).

    A point is blank when unmasked and no pixel of ``region`` within ``2 b``
    of it is > 5 sigma in either image (no source nearby).
    """
    st = _BLANK_STEP
    out = np.empty((-(-core.shape[0] // st), -(-core.shape[1] // st)), np.uint8)
    nk._blank_samples(inputs[0], inputs[1], 5.0 * sig_n, 5.0 * sig_r, grown,
                      region.y0, region.y1, region.x0, region.x1, core.y0, core.x0, st, 2 * b,
                      out)
    return out.view(bool)


def _noise_factor(scorr: np.ndarray, good: np.ndarray, *, nsig: float = 4.0) -> dict:
    """Robust std of S_corr on blank sky and its uncertainty (from 4x4 blocks).

    The factor is applied when it differs from 1 by more than ``nsig`` times
    its uncertainty (floored at 1 %), with a smooth gate between nsig - 1 and
    nsig + 1 sigma, so white-noise tiles are left exactly as they are.
    """
    from .background import CLIP, _clipped_stats_blocks, truncation_factor

    if np.shape(good) != np.shape(scorr):  # the kernel reads both unchecked
        raise ValueError(f"good has shape {np.shape(good)}, scorr {np.shape(scorr)}")
    out = dict(factor=1.0, measured=float("nan"), err=float("nan"), applied=False)
    if np.count_nonzero(good) < 1000:
        return out
    # clipped std (truncation-corrected) of all and of 4 x 4 blocks, in one pass
    st = np.empty((17, 3))
    _clipped_stats_blocks(scorr, good, 4, 4, CLIP, 8, st)
    std = np.where(st[:, 2] >= 50, st[:, 1] / truncation_factor(CLIP), np.nan)
    f = float(std[0])
    blocks = [float(v) for v in std[1:] if np.isfinite(v)]
    if len(blocks) < 4 or not np.isfinite(f) or f <= 0:
        out["measured"] = f
        return out
    err = float(np.std(blocks, ddof=1) / math.sqrt(len(blocks)))
    out.update(measured=f, err=err)
    # a smooth gate (no jump when round-off moves f across a threshold): nothing below
    # (nsig - 1) sigma, the full measured factor above (nsig + 1) sigma
    z = abs(f - 1.0) / max(err, 0.01)  # and never for deviations below 2-3 %
    w = min(max((z - (nsig - 1.0)) / 2.0, 0.0), 1.0)
    w = w * w * (3.0 - 2.0 * w)
    if w > 0:
        out.update(factor=1.0 + w * (f - 1.0), applied=True)
    return out


@contextlib.contextmanager
def _numba_threads(n: int):
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _wisdom_for(opts: Options) -> Wisdom | None:
    if opts.wisdom is False:
        return None
    return Wisdom(opts.wisdom if opts.wisdom not in (None, True) else default_wisdom_path())


def _iter_tiles(engine: TileEngine, tiles, stop=None, ring: int = 0,
                parallel: int = 1) -> Iterator[TileResult]:
    """Process ``tiles`` in order, reading up to ``prefetch`` tiles ahead.

    With ``ring`` > 0 the products are written into ``ring`` preallocated
    buffers in turn, so a result is overwritten ``ring`` tiles later: for a
    consumer that is done with each result by then (no per-tile allocation,
    no page faults on fresh memory, no heap growth).

    With ``parallel`` > 1 that many tiles are processed at once (see
    :func:`_iter_parallel`; ``ring`` is then ``2 * parallel``).

    (Making the candidates of a tile in a thread of their own, beside the next
    tile's FFTs, was measured: no faster on 2 cores, one more tile in memory.)
    """
    if parallel > 1:
        yield from _iter_parallel(engine, tiles, stop, parallel)
        return
    _warm_kernels_in_background(engine)
    ahead = engine.plan.opts.prefetch
    core = engine.plan.grid.core_shape
    b = engine.plan.peak_radius
    bufs = [np.empty((5, (core[0] + 2 * b) * (core[1] + 2 * b)), engine.sub.dtype)
            for _ in range(ring)]
    count = itertools.count()

    def buffer():
        return bufs[next(count) % ring] if ring else None

    with _numba_threads(engine.plan.opts.threads):
        if ahead == 0:
            for t in tiles:
                if stop is not None and stop.is_set():
                    raise Cancelled("stopped on request")
                yield _process_release(engine, engine.load(t), buffer())
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zogy-read") as pool:
            pending: deque = deque()
            it = iter(tiles)
            try:
                for t in it:  # ``ahead`` reads in flight while a tile is processed
                    pending.append(pool.submit(engine.load, t))
                    if len(pending) >= ahead:
                        break
                while pending:
                    if stop is not None and stop.is_set():
                        raise Cancelled("stopped on request")
                    t0 = time.perf_counter()
                    loaded = pending.popleft().result()
                    engine.timings["wait read"] += time.perf_counter() - t0
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(engine.load, nxt))
                    # the windows go back before the consumer is done with the result
                    res = _process_release(engine, loaded, buffer())
                    del loaded
                    yield res
            finally:
                for f in pending:
                    f.cancel()


def _warm_kernels_in_background(engine: TileEngine) -> None:
    """The first tiles' kernel set, built while they are read (:meth:`TileEngine.warm_kernels`)."""
    threading.Thread(target=engine.warm_kernels, name="zogy-kernels", daemon=True).start()


def _preimport(name: str) -> None:
    """Import module ``name`` (in a background thread); a failure is left for its user."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - imported again, and reported, where used
        log.debug("background import of %s failed: %s", name, exc)


def _process_release(engine: TileEngine, loaded: _Loaded, buffer) -> TileResult:
    """:meth:`TileEngine.process`, then the windows back to the pool."""
    try:
        return engine.process(loaded, buffer)
    finally:
        engine.release(loaded)


def _iter_parallel(engine: TileEngine, tiles, stop, n: int) -> Iterator[TileResult]:
    """:func:`_iter_tiles` with ``n`` tiles processed at once, results in order.

    Numba is asked to choose its threading layer first (:func:`_numba.launch_threads`;
    where it cannot be asked, the first tile runs alone and the layer is chosen
    there); with ``workqueue``, which cannot run kernels from two threads at
    once, the tiles run one at a time.  Tiles go to compute contexts (``engine`` and its
    :meth:`TileEngine.fork`s, each with its own single-worker thread, so a
    context never has two tiles), each with ``engine.threads`` FFT and Numba
    threads (``threads // n``: see :func:`_parallel_tiles`); one thread reads
    ahead for all.
    On 2 cores this beats one tile on 2 threads: FFTW's and Numba's threads
    wait on each other at every step, and the reader and writer threads keep
    preempting one of them (8192^2: 4.8-5.1 s against 5.6-5.9 s).  The
    products go into ``2 n`` buffers in turn: a result is overwritten ``2 n``
    tiles later, after the consumer has asked for ``n`` more (for
    :func:`_run_local`: after its write has finished).  Every tile's products
    are the same as with one context (kernels depend only on their key; fill
    noise only on the pixel's position).  A free context takes the next tile
    whenever the generator runs, not only when the tile before is yielded
    (results are still yielded in order).
    """
    import numba

    threads = engine.threads
    core = engine.plan.grid.core_shape
    b = engine.plan.peak_radius
    bufs = [np.empty((5, (core[0] + 2 * b) * (core[1] + 2 * b)), engine.sub.dtype)
            for _ in range(2 * n)]
    workers = [engine] + [engine.fork() for _ in range(n - 1)]
    _warm_kernels_in_background(engine)  # after the forks' FFTW planning, not beside it

    def init():  # Numba's thread count is per calling thread
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))

    pools = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"zogy-tile{i}",
                                initializer=init) for i in range(n)]
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zogy-read")
    loads: deque = deque()
    running: dict = {}  # tile number -> future, until its result is yielded
    assigned: dict = {}  # compute context -> future of the tile it is processing
    idle: list = []  # compute contexts without a tile
    it = enumerate(tiles)

    # a tile's own calibration (cosmic rays, local PSFs; ~1 s a 1024^2 tile) in the
    # context that processes it, so that the contexts calibrate at once, not one tile
    # after another in the reader thread; in the reader again once the threading layer
    # turns out to allow one context only (the reader then overlaps the subtraction)
    defer = [n > 1 and engine.heavy_calibration]

    def read_next():
        nxt = next(it, None)
        if nxt is not None:
            loads.append((nxt[0], reader.submit(engine.load, nxt[1], calibrate=not defer[0])))

    def start(limit: int) -> None:
        """Loaded tiles numbered below ``limit`` onto idle contexts, in order."""
        while idle and loads and loads[0][0] < limit:
            k, fut = loads.popleft()
            read_next()
            t0 = time.perf_counter()
            loaded = fut.result()
            engine.timings["wait read"] += time.perf_counter() - t0
            w = idle.pop(0)
            running[k] = assigned[w] = pools[w].submit(_process_release, workers[w], loaded,
                                                       bufs[k % len(bufs)])

    def free_done() -> None:
        for w, fut in list(assigned.items()):
            if fut.done():
                del assigned[w]
                idle.append(w)

    def check_layer() -> int:
        if nk.threadsafe_layer():
            return n
        (log.warning if engine.plan.opts.parallel_tiles > 1 else log.debug)(
            "Numba's threading layer (%s) cannot run kernels from two threads at "
            "once (pip install tbb, or an OpenMP runtime): one tile at a time",
            _layer_name())
        return 1

    try:
        for _ in range(n + max(engine.plan.opts.prefetch, 1)):
            read_next()
        # Numba chooses its threading layer now where it can be asked to (else in the
        # first tile, run alone): the first tile's one-time costs (kernel cache loads,
        # the first kernel set, first FFT calls; ~0.3 s) then overlap the second's
        chosen = nk.launch_threads()
        contexts = check_layer() if chosen else 1
        idle.extend(range(contexts))
        if not chosen:
            start(1)
            if running:
                wait([running[0]])
                contexts = check_layer()
                idle.extend(range(1, contexts))
        defer[0] = defer[0] and contexts > 1
        # A context that is free takes the next tile whenever this loop runs (between
        # results, not only when the tile before is yielded: tiles take unequal
        # times).  Tile j goes into the buffer of tile j - 2n, so it starts once the
        # consumer has asked for n results after that one: with ``last`` the newest
        # result the consumer has asked past, j < last + n + 2.
        head, last = 0, -1
        while True:
            if stop is not None and stop.is_set():
                raise Cancelled("stopped on request")
            free_done()
            start(last + n + 2)
            if head not in running:  # nothing left to read or run
                break
            if not running[head].done():
                wait([f for f in running.values() if not f.done()],
                     return_when=FIRST_COMPLETED)
                continue
            res = running.pop(head).result()
            head += 1
            yield res
            last = head - 1
    finally:
        for f in list(loads):
            f[1].cancel()
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        reader.shutdown(wait=True, cancel_futures=True)
        for w in workers[1:]:  # stage times summed over the contexts
            for k, v in w.timings.items():
                engine.timings[k] += v


def _layer_name() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        return "not chosen"


def _make_inputs(new, ref, kw: dict) -> tuple[Inputs, Options]:
    names = ("new_psf", "ref_psf", "new_var", "ref_var", "new_mask", "ref_mask", "new_weight",
             "ref_weight", "new_err", "ref_err")
    inputs = Inputs(new, ref, **{k: kw.pop(k, None) for k in names})
    return inputs, Options.from_kwargs(**kw)


def stream(new, ref, *, new_psf=None, ref_psf=None, new_var=None, ref_var=None,
           new_mask=None, ref_mask=None, new_weight=None, ref_weight=None, new_err=None,
           ref_err=None, stop=None, **options) -> Iterator[TileResult]:
    """Yield ZOGY products tile by tile as soon as each tile is done.

    Parameters
    ----------
    new, ref : path or 2-D array
        New (science) and reference images on one pixel grid.  Paths may
        name an HDU: ``"file.fits[1]"`` or ``"file.fits[SCI]"``.
    new_psf, ref_psf : path or 2-D array, optional
        PSF images (centred, any normalisation) or PSFEx model files (``.psf``,
        evaluated at each tile's centre).  When omitted, the PSF is estimated
        from stars: mosaic-wide at plan time and per tile from the tile's own
        stars when it has enough (``TileResult.stats['psf_new']`` says which).
    new_var, ref_var : path or 2-D array, optional
        Per-pixel variance maps.
    new_weight, ref_weight : path or 2-D array, optional
        Inverse-variance weight maps (variance = 1/w; w <= 0 is masked).
    new_err, ref_err : path or 2-D array, optional
        1-sigma error maps (variance = err**2; err <= 0 is masked), e.g. the
        ERR extension of a drizzled or pipeline-calibrated image.  Give at
        most one of var, weight and err per image.
    new_mask, ref_mask : path or 2-D array, optional
        Non-zero marks a bad pixel.
    stop : threading.Event, optional
        Checked between tiles; when set, :class:`~zogy_stream.errors.Cancelled` is raised.
    **options
        Keyword options of :class:`~zogy_stream.options.Options` (``flux_ratio``,
        ``astrometric_sigma``, ``tile``, ``overlap``, ``threads``, ``image_space``,
        ``wisdom``, ``background``, ``threshold``, ...).

    Yields
    ------
    TileResult

    Raises
    ------
    InputError, ConfigError
        Bad inputs or options (before the first tile where possible).
    """
    inputs, opts = _make_inputs(new, ref, dict(options, new_psf=new_psf, ref_psf=ref_psf,
                                               new_var=new_var, ref_var=ref_var,
                                               new_mask=new_mask, ref_mask=ref_mask,
                                               new_weight=new_weight, ref_weight=ref_weight,
                                               new_err=new_err, ref_err=ref_err))
    plan = plan_run(inputs, opts)
    engine = TileEngine(plan, wisdom=_wisdom_for(opts))
    try:
        yield from _iter_tiles(engine, iter(plan.grid), stop)
    finally:
        engine.close()


# ---------------------------------------------------------------------- output
def output_header(plan: RunPlan) -> fits.Header:
    """WCS of the new image plus the parameters of the run."""
    from . import __version__

    o, i = plan.opts, plan.inputs
    h = wcs_cards(plan.new_header)

    def name(src):
        return "array" if src is not None and not isinstance(src, (str, os.PathLike)) else (
            os.fspath(src) if src is not None else "none")

    cards = [
        ("ZOGYVER", __version__, "zogy_stream version"),
        ("NEWIMG", name(i.new), "new (science) image"),
        ("REFIMG", name(i.ref), "reference image"),
        ("NEWPSF", name(i.new_psf), "PSF of the new image"),
        ("REFPSF", name(i.ref_psf), "PSF of the reference image"),
        ("NEWVAR", name(i.new_var), "variance map of the new image"),
        ("REFVAR", name(i.ref_var), "variance map of the reference image"),
        ("NEWMASK", name(i.new_mask), "bad-pixel mask of the new image"),
        ("REFMASK", name(i.ref_mask), "bad-pixel mask of the reference image"),
        ("NEWWHT", name(i.new_weight), "inverse-variance weight map of new"),
        ("REFWHT", name(i.ref_weight), "inverse-variance weight map of ref"),
        ("NEWERR", name(i.new_err), "1-sigma error map of the new image"),
        ("REFERR", name(i.ref_err), "1-sigma error map of the reference image"),
        ("NPSFSRC", plan.psf_sources[0].kind if plan.psf_sources[0] else "image",
         "PSF of new: image, psfex or auto (estimated)"),
        ("RPSFSRC", plan.psf_sources[1].kind if plan.psf_sources[1] else "image",
         "PSF of ref: image, psfex or auto (estimated)"),
        ("NPSFHOW", plan.psf_sources[0].method if plan.psf_sources[0] else "given",
         "auto PSF of new: stars, moffat, cross"),
        ("RPSFHOW", plan.psf_sources[1].method if plan.psf_sources[1] else "given",
         "auto PSF of ref: stars, moffat, cross"),
        ("FLUXRAT", plan.flux_ratio, "F_n/F_r used (F_r = 1)"),
        ("FLUXRERR", plan.flux_ratio_err if math.isfinite(plan.flux_ratio_err) else -1.0,
         "error of FLUXRAT (-1: not fitted)"),
        ("FLUXRSRC", plan.flux_ratio_src if o.flux_ratio != "local" else "local",
         "user, auto (star fit), default (1.0), local"),
        ("ASTSIGX", plan.astrometric_sigma[0], "[pix] astrometric sigma x"),
        ("ASTSIGY", plan.astrometric_sigma[1], "[pix] astrometric sigma y"),
        ("ASTSRC", plan.astrometric_src, "astrometric sigma: user, auto, default"),
        ("MODERR", str(o.model_error), "model error of static sources: auto or fixed"),
        ("REGDX", float(plan.psf_sources[0].shift[0]), "[pix] registration shift applied to NEW PSF"),
        ("REGDY", float(plan.psf_sources[0].shift[1]), "[pix] registration shift applied to NEW PSF"),
        ("COSMNEW", plan.cosmics[0], "cosmic rays detected and masked in new"),
        ("COSMREF", plan.cosmics[1], "cosmic rays detected and masked in ref"),
        ("NOISCORR", o.noise_correction, "per-tile S_corr noise correction enabled"),
        ("SIGNEW", plan.sigma[0], "global background noise of new"),
        ("SIGREF", plan.sigma[1], "global background noise of ref"),
        ("GAINNEW", plan.gain[0] if plan.gain[0] else "none", "gain for new Poisson variance"),
        ("GAINREF", plan.gain[1] if plan.gain[1] else "none", "gain for ref Poisson variance"),
        ("SATNEW", plan.saturation[0] if math.isfinite(plan.saturation[0]) else "none",
         "saturation level of new"),
        ("SATREF", plan.saturation[1] if math.isfinite(plan.saturation[1]) else "none",
         "saturation level of ref"),
        ("TILE", o.tile, "[pix] tile core size"),
        ("OVERLAP", plan.grid.margin, "[pix] tile overlap margin"),
        ("FFTSHAPE", f"{plan.grid.size[0]}x{plan.grid.size[1]}", "padded tile shape"),
        ("KERNRAD", plan.kernel_radius, "[pix] ZOGY kernel support radius"),
        ("BKGSUB", o.background, "mesh background subtracted"),
        ("BKGMESH", o.bkg_mesh, "[pix] background mesh cell"),
        ("IMGSPACE", o.image_space, "image-space convolutions"),
        ("THRESH", o.threshold, "candidate |S_corr| threshold"),
    ]
    for key, val, comment in cards:
        # a comment that would not fit beside a long value is dropped, not
        # truncated with a VerifyWarning on every run
        fits_card = not isinstance(val, str) or len(val) + len(comment) <= 62
        h[key] = (val, comment) if fits_card else val
    return h


def _psf_d(plan: RunPlan) -> np.ndarray:
    n = max(64, 4 * max(plan.new_psf.shape + plan.ref_psf.shape))
    ks = make_kernels(PsfSpectra.from_psfs(plan.new_psf, plan.ref_psf, (n, n)),
                      sigma_n=plan.sigma[0], sigma_r=plan.sigma[1],
                      flux_ratio=plan.flux_ratio, dtype=np.float64)
    return ks.psf_d.astype(np.float32), ks


def subtract(new, ref, out, *, new_psf=None, ref_psf=None, new_var=None, ref_var=None,
             new_mask=None, ref_mask=None, new_weight=None, ref_weight=None, new_err=None,
             ref_err=None, catalog=None,
             stamps=None, png=None, progress: bool = False, stop=None,
             dask: str | None = None, **options) -> SubtractSummary:
    """Subtract ``ref`` from ``new`` into the multi-extension FITS file ``out``.

    Extensions D, S, SCORR, FLUX, FLUX_ERR (float32), MASK (uint8, bits of
    :class:`~zogy_stream.masks.MaskBit`) and PSF_D, each with the new image's
    WCS and the run's parameters.  The file is written in place tile by tile
    under a temporary name and renamed when complete; on any error or
    cancellation no output is left behind.

    Parameters
    ----------
    new, ref, new_psf, ref_psf, new_var, ref_var, new_weight, ref_weight, new_err, ref_err
        As for :func:`stream`.
    new_mask, ref_mask, stop, **options
        As for :func:`stream`.
    out : path
        Output FITS path.
    catalog : path, optional
        Candidates (ECSV, or FITS by suffix): local extrema of S_corr with
        |S_corr| >= threshold outside masked pixels.
    progress : bool
        Show a tqdm progress bar (only when stderr is a terminal).
    dask : str, optional
        Run the tiles on Dask distributed: a scheduler address, or
        ``"local:N"`` for a LocalCluster of N worker processes.  Inputs and
        output must be on a filesystem the workers share.
    stamps : path, optional
        31x31 cut-outs of NEW, REF, D and S_corr per candidate (see
        :mod:`zogy_stream.products` for the layout), written atomically.
    png : path, optional
        Down-sampled S_corr quick-look with candidates circled (needs matplotlib).

    Returns
    -------
    SubtractSummary

    Raises
    ------
    InputError, ConfigError
        Bad inputs, options or output path.
    Cancelled
        ``stop`` was set.
    """
    t_start = time.perf_counter()
    from .products import check_png_available, ensure_columns, write_png, write_stamps

    inputs, opts = _make_inputs(new, ref, dict(options, new_psf=new_psf, ref_psf=ref_psf,
                                               new_var=new_var, ref_var=ref_var,
                                               new_mask=new_mask, ref_mask=ref_mask,
                                               new_weight=new_weight, ref_weight=ref_weight,
                                               new_err=new_err, ref_err=ref_err))
    out = _check_output(out, "output")
    if catalog is not None:
        catalog = _check_output(catalog, "--catalog")
    if stamps is not None:
        stamps = _check_output(stamps, "--stamps")
    if png is not None:
        png = _check_output(png, "--png")
        check_png_available()
    plan = plan_run(inputs, opts)
    header = output_header(plan)
    psf_d, ks_c = _psf_d(plan)
    header["FS"] = (ks_c.f_s, "F_S at the global noise levels (eq. 42)")
    header["FD"] = (ks_c.f_d, "F_D at the global noise levels (eq. 15)")
    plane_header = header.copy()
    for key, comment in _TILE_SUMMARY:
        header[key] = (0.0 if key.startswith(("NC", "ME")) else 0, comment)
    planes = [Plane(name, np.float32, plan.shape, _plane_header(plane_header, name, text))
              for name, text in OUTPUT_PLANES.items()]
    planes.append(Plane("MASK", np.uint8, plan.shape, _plane_header(plane_header, "MASK",
                        "bit flags, see zogy_stream.masks.MaskBit")))
    planes.append(Plane("PSF_D", np.float32, psf_d.shape,
                        _plane_header(fits.Header(), "PSF_D", "PSF of D at the mosaic centre"),
                        data=psf_d))
    if dask is not None and any(isinstance(v, np.ndarray) for v in vars(inputs).values()):
        raise InputError("--dask needs inputs given as files on a shared filesystem, not arrays")
    outfile = OutputFile(out, planes, primary_header=header)
    engine = None
    bar = _progress(progress, len(plan.grid), plan.shape)
    cat_path = None
    # astropy.wcs, for the candidates' ra/dec after the tiles, imported meanwhile
    # (~0.1 s, that would otherwise be the last thing the run waits for)
    threading.Thread(target=_preimport, args=("astropy.wcs",), name="zogy-import",
                     daemon=True).start()
    try:
        if dask is None:
            bands = _bands_fit(plan, planes)
            n = _parallel_tiles(plan, bands)
            engine = TileEngine(plan, wisdom=_wisdom_for(opts),
                                threads=max(1, opts.threads // n))
            _gather_bands(outfile, plan, bands)
            parts, timings = _run_local(engine, outfile, stop, bar, parallel=n)
        else:
            from .distributed import dask_client, run_bands

            # one task at a time per local worker, each on --threads FFT/Numba threads
            with dask_client(dask) as client:
                parts, timings = run_bands(client, plan, outfile, stop=stop, progress=bar)
        _tile_summary(header, parts)
        _patch_primary(outfile, header)
        tab = ensure_columns(candidate_table(parts, wcs=_celestial_wcs(plan.new_header)),
                             opts.zeropoint)
        if catalog is not None:
            meta = {k: header[k] for k in ("FLUXRAT", "FLUXRERR", "FLUXRSRC", "THRESH",
                                           "NEWIMG", "REFIMG")}
            if opts.zeropoint is not None:
                meta["ZEROPT"] = opts.zeropoint
            cat_path = write_catalog(tab, catalog, meta=meta)
        outfile.commit(durable=opts.durable)
    except BaseException:
        outfile.abort()
        if cat_path is not None:
            Path(cat_path).unlink(missing_ok=True)
        raise
    finally:
        if engine is not None:
            engine.close()
        if bar is not None:
            bar.close()
    stamps_path = png_path = None
    try:
        if stamps is not None:
            stamps_path = write_stamps(stamps, tab, out, inputs.new, inputs.ref)
        if png is not None:
            png_path = write_png(png, out, tab)
    except BaseException:  # all or nothing: a failed product removes the others
        for pth in (out, cat_path, stamps_path):
            if pth is not None:
                Path(pth).unlink(missing_ok=True)
        raise
    secs = time.perf_counter() - t_start
    summary = SubtractSummary(out=out, catalog=cat_path, n_candidates=len(tab), shape=plan.shape,
                              n_tiles=len(plan.grid), seconds=secs, timings=timings,
                              stamps=stamps_path, png=png_path, header=header)
    log.info("%s: %d tiles, %d candidates, %.2f s (%.1f Mpix/s)", out, summary.n_tiles,
             summary.n_candidates, secs, summary.mpix_per_s)
    return summary


_TILE_SUMMARY = (
    ("NPSFLOCN", "tiles with a PSF of new from own stars"),
    ("NPSFGLBN", "tiles with the mosaic-wide PSF of new"),
    ("NPSFFLDN", "tiles with the field-varying PSF of new"),
    ("NPSFLOCR", "tiles with a PSF of ref from own stars"),
    ("NPSFGLBR", "tiles with the mosaic-wide PSF of ref"),
    ("NPSFFLDR", "tiles with the field-varying PSF of ref"),
    ("NFRLOCAL", "tiles with a local flux ratio"),
    ("NCMED", "median per-tile S_corr noise factor"),
    ("NCMIN", "min per-tile S_corr noise factor"),
    ("NCMAX", "max per-tile S_corr noise factor"),
    ("NCAPPLD", "tiles whose S_corr was rescaled"),
    ("NCOSMIC", "cosmic-ray pixels masked (new + ref)"),
    ("MEMED", "median per-tile model error of static sources"),
    ("MEMAX", "max per-tile model error of static sources"),
)


class _Carried:
    """Per-tile stats riding in a candidate table's meta (to Dask and back).

    Compares equal to any other instance so that stacking tables never warns
    about conflicting metadata."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def __eq__(self, other) -> bool:
        return isinstance(other, _Carried)

    __hash__ = None


def tile_stats_of(parts) -> list[dict]:
    """Per-tile stats carried in the candidate tables' meta, in tile order."""
    st = [p.meta["tile_stats"].data for p in parts
          if isinstance(getattr(p, "meta", {}).get("tile_stats"), _Carried)]
    return sorted(st, key=lambda d: d["index"])


def _tile_summary(header: fits.Header, parts) -> None:
    st = tile_stats_of(parts)
    if not st:
        return
    f = np.array([d["noise_factor"] for d in st])
    vals = {
        "NPSFLOCN": sum(d["psf_new"] == "local" for d in st),
        "NPSFGLBN": sum(d["psf_new"] == "global" for d in st),
        "NPSFFLDN": sum(d["psf_new"] == "field" for d in st),
        "NPSFLOCR": sum(d["psf_ref"] == "local" for d in st),
        "NPSFGLBR": sum(d["psf_ref"] == "global" for d in st),
        "NPSFFLDR": sum(d["psf_ref"] == "field" for d in st),
        "NFRLOCAL": sum(d["flux_ratio_src"] == "local" for d in st),
        "NCMED": float(np.median(f)), "NCMIN": float(f.min()), "NCMAX": float(f.max()),
        "NCAPPLD": sum(bool(d["noise_applied"]) for d in st),
        "NCOSMIC": sum(int(d["n_cosmic_new"]) + int(d["n_cosmic_ref"]) for d in st),
    }
    me = np.array([d.get("model_error", 0.0) for d in st])
    for key, v in vals.items():
        header[key] = int(v) if not key.startswith("NC") or key in ("NCAPPLD", "NCOSMIC") \
            else round(float(v), 5)
    header["MEMED"] = round(float(np.median(me)), 5)
    header["MEMAX"] = round(float(me.max()), 5)
    if vals["NPSFGLBN"] or vals["NPSFGLBR"]:
        log.info("%d/%d tiles used the mosaic-wide PSF of NEW, %d/%d of REF (too few stars)",
                 vals["NPSFGLBN"], len(st), vals["NPSFGLBR"], len(st))
    log.info("S_corr noise factors: median %.3f, min %.3f, max %.3f, applied in %d tiles",
             vals["NCMED"], vals["NCMIN"], vals["NCMAX"], vals["NCAPPLD"])
    log.info("model error of static sources: median %.4f, max %.4f over %d tiles",
             float(np.median(me)), float(me.max()), len(st))


def _patch_primary(outfile: OutputFile, header: fits.Header) -> None:
    """Rewrite the primary header of the temporary output with final per-tile summary
    values (same cards, so the same size)."""
    prim = fits.Header()
    prim["SIMPLE"] = True
    prim["BITPIX"] = 8
    prim["NAXIS"] = 0
    prim["EXTEND"] = True
    for card in header.cards:
        if card.keyword not in prim:
            prim.append(card)
    blob = prim.tostring().encode("ascii")
    old_len = len(outfile._layout()[1][0][1])
    if len(blob) != old_len:  # cannot happen with same-count cards; never corrupt the file
        log.warning("could not record the per-tile summary in the output header")
        return
    with open(outfile.tmp, "r+b") as fh:
        fh.seek(0)
        fh.write(blob)


def _check_output(path, label: str) -> Path:
    """Fail before any work if ``path`` cannot become an output file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{label} '{path}' is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{label} '{path}': directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{label} '{path}': directory '{parent}' is not writable")
    return path


def _run_local(engine: TileEngine, outfile: OutputFile, stop, bar,
               parallel: int = 1) -> tuple[list, dict]:
    """Process every tile here (``parallel`` at once), writing each in a background thread."""
    parts = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zogy-write") as writer:
        pending = None
        # two product buffers in turn: tile k is computed while tile k - 1 is
        # written, and tile k + 1 only after that write has finished (below)
        for res in _iter_tiles(engine, iter(engine.plan.grid), stop, ring=2, parallel=parallel):
            if pending is not None:
                t0 = time.perf_counter()
                pending.result()
                engine.timings["wait write"] += time.perf_counter() - t0
            pending = writer.submit(_write_tile, outfile, res, engine.timings,
                                    engine.plan.shape[1], engine.plan.opts.settle)
            parts.append(res.candidates)
            if bar is not None:
                bar.update(1)
        if pending is not None:
            pending.result()
    return parts, dict(engine.timings)


def _parallel_tiles(plan: RunPlan, bands: bool) -> int:
    """Tiles to process at once (``opts.parallel_tiles``; 0: 2 when there are >= 2
    threads and the output is gathered in row ``bands``, else 1), at most one per thread."""
    n = plan.opts.parallel_tiles or (2 if bands else 1)
    n = max(1, min(n, plan.opts.threads, len(plan.grid)))
    log.debug("%d tile(s) at once, %d thread(s) each", n, max(1, plan.opts.threads // n))
    return n


def _band_bytes(plan: RunPlan, planes) -> int:
    """Memory for one tile row of every streamed output plane."""
    width = plan.shape[1]
    return plan.grid.core_shape[0] * width * sum(
        np.dtype(p.dtype).itemsize for p in planes if p.data is None)


def _bands_fit(plan: RunPlan, planes) -> bool:
    """Whether the output (``planes``) is to be written in whole row bands: one
    fits ``opts.write_buffer`` and there is ``os.pwrite`` (not on Windows)."""
    if not hasattr(os, "pwrite"):  # Windows: the memory map only
        return False
    need = _band_bytes(plan, planes)
    budget = plan.opts.write_buffer * 2 ** 20
    if need > budget and budget:
        log.debug("a row band of the output needs %.0f MiB > --write-buffer %d: "
                  "writing tiles through the memory map", need / 2 ** 20,
                  plan.opts.write_buffer)
    return need <= budget


def _gather_bands(outfile: OutputFile, plan: RunPlan, fit: bool | None = None) -> None:
    """Write ``outfile`` in whole row bands when one fits ``opts.write_buffer``
    (``fit``: :func:`_bands_fit`'s answer, when already asked)."""
    if not (_bands_fit(plan, outfile.planes) if fit is None else fit):
        return
    direct = outfile.use_bands(plan.grid.core_shape[0])
    log.debug("output written in row bands of %.0f MiB%s",
              _band_bytes(plan, outfile.planes) / 2 ** 20, " with direct I/O" if direct else "")


def _write_tile(outfile: OutputFile, res: TileResult, timings: dict, width: int,
                settle: bool = True) -> None:
    """Write a tile's planes; after the last tile of a row (its core ends at
    ``width``; tiles are written in raster order) end the row band: written
    out if the file gathers bands (:meth:`OutputFile.use_bands`), settled if
    ``settle``."""
    t0 = time.perf_counter()
    for name, arr in (("D", res.d), ("S", res.s), ("SCORR", res.scorr), ("FLUX", res.flux),
                      ("FLUX_ERR", res.flux_err), ("MASK", res.mask)):
        outfile.write(name, res.box, arr)
    if res.tile.index % _TRIM_EVERY == _TRIM_EVERY - 1:
        _trim_heap()
    t1 = time.perf_counter()
    timings["write"] += t1 - t0
    if res.box.x1 == width and (settle or outfile.bands):
        outfile.end_rows(res.box.y0, res.box.y1, settle=settle)
        timings["settle"] += time.perf_counter() - t1


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None where there is no glibc)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM_EVERY = 16  # tiles between heap trims


def _trim_heap() -> None:
    """Hand the freed parts of the malloc heaps back to the OS.

    Tile arrays are allocated and freed by three threads (reader, engine,
    writer), and the free holes of glibc's heaps otherwise stay resident and
    grow with the mosaic.  Trimming after every tile (16384²: peak RSS 476 ->
    422 MB) made every tile's new arrays page-fault afresh (+0.3 s of score
    time at 8192²); every 16th tile keeps most of the gain at no measured cost.
    """
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def _plane_header(base: fits.Header, name: str, text: str) -> fits.Header:
    h = base.copy()
    h["EXTNAME"] = name
    h["COMMENT"] = text
    return h


def _celestial_wcs(header):
    from astropy.wcs import WCS
    from astropy.utils.exceptions import AstropyWarning
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            w = WCS(header)
        return w if w.has_celestial else None
    except Exception as exc:  # a broken WCS must not stop the subtraction
        log.warning("ignoring unusable WCS of NEW (%s)", exc)
        return None


def _progress(enabled: bool, n: int, shape):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    mpix_per_tile = shape[0] * shape[1] / 1e6 / max(n, 1)
    return tqdm(total=n, unit="tile", desc="zogy", file=sys.stderr, leave=False,
                postfix=None, unit_scale=False, smoothing=0.1,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} tiles [{elapsed}<{remaining}, "
                           + f"{{rate_fmt}} x {mpix_per_tile:.2f} Mpix]")
