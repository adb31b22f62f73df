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
import logging
import math
import os
import sys
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyfftw
from astropy.io import fits

from . import _numba as nk
from .background import MeshBackground, tile_stats
from .catalog import candidate_table, find_candidates, write_catalog
from .errors import Cancelled, InputError
from .fft import Wisdom, default_wisdom_path
from .fitsio import ImageReader, OutputFile, Plane, wcs_cards
from .masks import EXCLUDE_CANDIDATE
from .options import Options
from .psf import load_psf, psf_fwhm
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

    def sources(self) -> dict[str, object]:
        """The image-shaped inputs that are given, by label."""
        items = {"NEW": self.new, "REF": self.ref, "--new-var": self.new_var,
                 "--ref-var": self.ref_var, "--new-mask": self.new_mask,
                 "--ref-mask": self.ref_mask}
        return {k: v for k, v in items.items() if v is not None}


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

    @property
    def has_var(self) -> bool:
        i = self.inputs
        return i.new_var is not None or i.ref_var is not None or any(
            g is not None for g in self.gain)

    @property
    def split(self) -> bool:
        return max(self.opts.astrometric_sigma) > 0


@dataclass(frozen=True)
class TileResult:
    """One finished tile: its core box in image pixels and the core arrays.

    Arrays are float32 (``mask`` int16) of the core's shape and belong to
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


def _global_sigma(reader: ImageReader, var_reader: ImageReader | None, sat: float) -> float:
    step = max(1, int(math.sqrt(reader.shape[0] * reader.shape[1] / 250_000)))
    img = reader.sample(step)
    var = var_reader.sample(step) if var_reader is not None else None
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
        for label, psf in (("--new-psf", inputs.new_psf), ("--ref-psf", inputs.ref_psf)):
            if psf is None:
                raise InputError(f"no PSF given for {label[2:5].upper()}: pass {label} FILE "
                                 "(a centred PSF image)")
        new_psf = load_psf(inputs.new_psf, label="--new-psf")
        ref_psf = load_psf(inputs.ref_psf, label="--ref-psf")
        hn, hr = readers["NEW"].header, readers["REF"].header
        sat = (opts.new_saturation or _header_float(hn, "SATURATE") or math.inf,
               opts.ref_saturation or _header_float(hr, "SATURATE") or math.inf)
        gain = (opts.new_gain or _header_float(hn, "GAIN"), opts.ref_gain or _header_float(hr, "GAIN"))
        if inputs.new_var is not None:
            gain = (None, gain[1])
        if inputs.ref_var is not None:
            gain = (gain[0], None)
        sigma = (_global_sigma(readers["NEW"], readers.get("--new-var"), sat[0]),
                 _global_sigma(readers["REF"], readers.get("--ref-var"), sat[1]))
    finally:
        for rd in readers.values():
            rd.close()
    kw = dict(sigma_n=sigma[0], sigma_r=sigma[1], flux_ratio=opts.flux_ratio)
    rk = kernel_radius(new_psf, ref_psf, **kw)
    grow = kernel_radius(new_psf, ref_psf, tol=1e-3, **kw)
    peak = max(2, int(round(0.5 * max(psf_fwhm(new_psf), psf_fwhm(ref_psf)))))
    margin = opts.overlap if opts.overlap is not None else rk + peak + 2
    if opts.image_space and margin < rk + peak + 2:
        raise InputError(f"--overlap {margin} is smaller than the image-space kernel needs "
                         f"({rk + peak + 2}); drop --overlap or raise it")
    margin = max(margin, peak + 2)
    grid = TileGrid(shape, opts.tile, margin)
    log.info("image %dx%d, %d tiles of %d (padded %dx%d), kernel radius %d px, "
             "sigma new %.4g ref %.4g", shape[1], shape[0], len(grid), opts.tile,
             grid.size[1], grid.size[0], rk, sigma[0], sigma[1])
    return RunPlan(inputs=inputs, opts=opts, shape=shape, new_psf=new_psf, ref_psf=ref_psf,
                   saturation=sat, gain=gain, sigma=sigma, kernel_radius=rk,
                   grow_radius=grow, peak_radius=peak, grid=grid, new_header=hn)


# ----------------------------------------------------------------- per process
@dataclass
class _Loaded:
    tile: Tile
    windows: dict
    stats: tuple


class TileEngine:
    """Per-process state for a plan: readers, FFT plans, kernel cache.

    Parameters
    ----------
    plan : RunPlan
    wisdom : Wisdom, optional
        FFTW wisdom cache (loaded before planning, saved after).
    """

    _EMPTY = np.empty((1, 1), dtype=np.float32)

    def __init__(self, plan: RunPlan, *, wisdom: Wisdom | None = None) -> None:
        self.plan = plan
        o = plan.opts
        self.readers = {label: ImageReader(src, label=label)
                        for label, src in plan.inputs.sources().items()}
        self.timings: dict[str, float] = defaultdict(float)
        if wisdom is not None:
            wisdom.load()
            known = pyfftw.export_wisdom()
        t0 = time.perf_counter()
        self.sub = TileSubtractor(plan.grid.size, has_var=plan.has_var, split=plan.split,
                                  image_space=o.image_space, radius=plan.kernel_radius,
                                  threads=o.threads, effort=o.fft_effort)
        self.timings["plan"] += time.perf_counter() - t0
        if wisdom is not None and pyfftw.export_wisdom() != known:
            wisdom.save()  # the planner learned something: keep it for the next run
        self.kernels = KernelCache(plan.grid.size, dtype=np.float32)
        self.mesh_new = MeshBackground(self.readers["NEW"], cell=o.bkg_mesh,
                                       saturation=plan.saturation[0], subtract=o.background,
                                       fallback_sigma=plan.sigma[0])
        self.mesh_ref = MeshBackground(self.readers["REF"], cell=o.bkg_mesh,
                                       saturation=plan.saturation[1], subtract=o.background,
                                       fallback_sigma=plan.sigma[1])
        self._mask = np.empty(plan.grid.size, dtype=np.uint8)
        self._grown = np.empty(plan.grid.size, dtype=np.uint8)
        self._tmp = np.empty(plan.grid.size, dtype=np.uint8)
        self._nonpos = np.empty(plan.grid.size[0], dtype=np.int64)

    def close(self) -> None:
        for rd in self.readers.values():
            rd.close()

    # reading happens in a background thread: no shared mutable state here
    def load(self, tile: Tile) -> _Loaded:
        """Read the in-image part of a tile's window from every input."""
        t0 = time.perf_counter()
        p = self.plan
        win = {label: rd.read(tile.valid) for label, rd in self.readers.items()}
        for rd in self.readers.values():
            rd.release(tile.valid)
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
        self.timings["read+stats"] += time.perf_counter() - t0
        return _Loaded(tile, win, tuple(stats))

    def process(self, loaded: _Loaded) -> TileResult:
        """ZOGY on one loaded tile; returns its core products.

        Raises
        ------
        InputError
            A variance map has non-positive values at unmasked pixels.
        """
        p, o, tile = self.plan, self.plan.opts, loaded.tile
        w = loaded.windows
        (rows_n, xi_n, xw_n, sig_n, bkg_n), (rows_r, xi_r, xw_r, sig_r, bkg_r) = loaded.stats
        tim = self.timings
        t0 = time.perf_counter()
        ks = self.kernels.get(0, p.new_psf, p.ref_psf, sigma_n=sig_n, sigma_r=sig_r,
                              flux_ratio=o.flux_ratio)
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
        nk._grow_mask(self._mask, p.grow_radius, self._tmp, self._grown)
        nk._edge_bits(self._grown, tile.window.y0, tile.window.x0, p.shape[0], p.shape[1],
                      p.kernel_radius)
        t2 = time.perf_counter()
        tim["prepare"] += t2 - t1
        b = p.peak_radius
        cw = tile.core_in_window
        region = cw.grow(b)
        var_const = sig_n ** 2 * ks.energy_n + sig_r ** 2 * ks.energy_r
        out = self.sub.run(ks, region, astrometric_sigma=o.astrometric_sigma, var_const=var_const)
        t3 = time.perf_counter()
        tim["zogy"] += t3 - t2
        mask_ext = self._grown[region.slices]
        cands = find_candidates(out["scorr"], out["flux"], out["flux_err"], mask_ext, border=b,
                                threshold=o.threshold, radius=b, exclude=EXCLUDE_CANDIDATE,
                                origin=(tile.core.y0 - b, tile.core.x0 - b), tile=tile.index)
        core = slice(b, b + cw.shape[0]), slice(b, b + cw.shape[1])
        res = TileResult(
            tile=tile, box=tile.core,
            d=out["d"][core], s=out["s"][core], scorr=out["scorr"][core],
            flux=out["flux"][core], flux_err=out["flux_err"][core],
            mask=mask_ext[core].astype(np.int16), candidates=cands,
            stats=dict(bkg_new=bkg_n, bkg_ref=bkg_r,
                       sigma_new=sig_n, sigma_ref=sig_r, f_s=ks.f_s, f_d=ks.f_d),
        )
        tim["finish"] += time.perf_counter() - t3
        return res


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


def _iter_tiles(engine: TileEngine, tiles, stop=None) -> Iterator[TileResult]:
    """Process ``tiles`` in order, reading up to ``prefetch`` tiles ahead."""
    ahead = engine.plan.opts.prefetch
    with _numba_threads(engine.plan.opts.threads):
        if ahead == 0:
            for t in tiles:
                if stop is not None and stop.is_set():
                    raise Cancelled("stopped on request")
                yield engine.process(engine.load(t))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zogy-read") as pool:
            pending: deque = deque()
            it = iter(tiles)
            try:
                for t in it:
                    pending.append(pool.submit(engine.load, t))
                    if len(pending) > ahead:
                        break
                while pending:
                    if stop is not None and stop.is_set():
                        raise Cancelled("stopped on request")
                    loaded = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(engine.load, nxt))
                    yield engine.process(loaded)
            finally:
                for f in pending:
                    f.cancel()


def _make_inputs(new, ref, kw: dict) -> tuple[Inputs, Options]:
    names = ("new_psf", "ref_psf", "new_var", "ref_var", "new_mask", "ref_mask")
    inputs = Inputs(new, ref, **{k: kw.pop(k, None) for k in names})
    return inputs, Options.from_kwargs(**kw)


def stream(new, ref, *, new_psf=None, ref_psf=None, new_var=None, ref_var=None,
           new_mask=None, ref_mask=None, stop=None, **options) -> Iterator[TileResult]:
    """Yield ZOGY products tile by tile as soon as each tile is done.

    Parameters
    ----------
    new, ref : path or 2-D array
        New (science) and reference images on one pixel grid.  Paths may
        name an HDU: ``"file.fits[1]"`` or ``"file.fits[SCI]"``.
    new_psf, ref_psf : path or 2-D array
        PSF images (centred, any normalisation).
    new_var, ref_var : path or 2-D array, optional
        Per-pixel variance maps.
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
                                               new_mask=new_mask, ref_mask=ref_mask))
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
        ("FLUXRAT", o.flux_ratio, "F_n/F_r used (F_r = 1)"),
        ("ASTSIGX", o.astrometric_sigma[0], "[pix] astrometric sigma x"),
        ("ASTSIGY", o.astrometric_sigma[1], "[pix] astrometric sigma y"),
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
                      flux_ratio=plan.opts.flux_ratio, dtype=np.float64)
    return ks.psf_d.astype(np.float32), ks


def subtract(new, ref, out, *, new_psf=None, ref_psf=None, new_var=None, ref_var=None,
             new_mask=None, ref_mask=None, catalog=None, progress: bool = False, stop=None,
             dask: str | None = None, **options) -> SubtractSummary:
    """Subtract ``ref`` from ``new`` into the multi-extension FITS file ``out``.

    Extensions D, S, SCORR, FLUX, FLUX_ERR (float32), MASK (int16, bits of
    :class:`~zogy_stream.masks.MaskBit`) and PSF_D, each with the new image's
    WCS and the run's parameters.  The file is written in place tile by tile
    under a temporary name and renamed when complete; on any error or
    cancellation no output is left behind.

    Parameters
    ----------
    new, ref, new_psf, ref_psf, new_var, ref_var, new_mask, ref_mask, stop, **options
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
    inputs, opts = _make_inputs(new, ref, dict(options, new_psf=new_psf, ref_psf=ref_psf,
                                               new_var=new_var, ref_var=ref_var,
                                               new_mask=new_mask, ref_mask=ref_mask))
    out = _check_output(out, "output")
    if catalog is not None:
        catalog = _check_output(catalog, "--catalog")
    plan = plan_run(inputs, opts)
    header = output_header(plan)
    psf_d, ks_c = _psf_d(plan)
    header["FS"] = (ks_c.f_s, "F_S at the global noise levels (eq. 42)")
    header["FD"] = (ks_c.f_d, "F_D at the global noise levels (eq. 15)")
    planes = [Plane(name, np.float32, plan.shape, _plane_header(header, name, text))
              for name, text in OUTPUT_PLANES.items()]
    planes.append(Plane("MASK", np.int16, plan.shape, _plane_header(header, "MASK",
                        "bit flags, see zogy_stream.masks.MaskBit")))
    planes.append(Plane("PSF_D", np.float32, psf_d.shape,
                        _plane_header(fits.Header(), "PSF_D", "PSF of D at the mosaic centre"),
                        data=psf_d))
    if dask is not None and any(isinstance(v, np.ndarray) for v in vars(inputs).values()):
        raise InputError("--dask needs inputs given as files on a shared filesystem, not arrays")
    outfile = OutputFile(out, planes, primary_header=header)
    engine = None
    bar = _progress(progress, len(plan.grid), plan.shape)
    try:
        if dask is None:
            engine = TileEngine(plan, wisdom=_wisdom_for(opts))
            parts, timings = _run_local(engine, outfile, stop, bar)
        else:
            from .distributed import dask_client, run_bands

            with dask_client(dask, threads_per_worker=opts.threads) as client:
                parts, timings = run_bands(client, plan, outfile, stop=stop, progress=bar)
        cat_path = None
        tab = candidate_table(parts, wcs=_celestial_wcs(plan.new_header))
        if catalog is not None:
            meta = {k: header[k] for k in ("FLUXRAT", "THRESH", "NEWIMG", "REFIMG")}
            cat_path = write_catalog(tab, catalog, meta=meta)
        outfile.commit(durable=opts.durable)
    except BaseException:
        outfile.abort()
        raise
    finally:
        if engine is not None:
            engine.close()
        if bar is not None:
            bar.close()
    secs = time.perf_counter() - t_start
    summary = SubtractSummary(out=out, catalog=cat_path, n_candidates=len(tab), shape=plan.shape,
                              n_tiles=len(plan.grid), seconds=secs, timings=timings)
    log.info("%s: %d tiles, %d candidates, %.2f s (%.1f Mpix/s)", out, summary.n_tiles,
             summary.n_candidates, secs, summary.mpix_per_s)
    return summary


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


def _run_local(engine: TileEngine, outfile: OutputFile, stop, bar) -> tuple[list, dict]:
    """Process every tile here, writing each in a background thread."""
    parts = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zogy-write") as writer:
        pending = None
        for res in _iter_tiles(engine, iter(engine.plan.grid), stop):
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_tile, outfile, res, engine.timings)
            parts.append(res.candidates)
            if bar is not None:
                bar.update(1)
        if pending is not None:
            pending.result()
    return parts, dict(engine.timings)


def _write_tile(outfile: OutputFile, res: TileResult, timings: dict) -> None:
    t0 = time.perf_counter()
    for name, arr in (("D", res.d), ("S", res.s), ("SCORR", res.scorr), ("FLUX", res.flux),
                      ("FLUX_ERR", res.flux_err), ("MASK", res.mask)):
        outfile.write(name, res.box, arr)
    outfile.release(res.box)
    timings["write"] += time.perf_counter() - t0


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
