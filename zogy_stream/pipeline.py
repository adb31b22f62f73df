"""Streaming pipeline: read -> tile -> subtract -> write.

:func:`~zogy_stream.plan.plan_run` validates the inputs once and derives
everything global into a picklable :class:`~zogy_stream.plan.RunPlan`; a
:class:`~zogy_stream.engine.TileEngine` turns one tile into a
:class:`~zogy_stream.engine.TileResult`.  This module schedules the tiles:
:func:`stream` yields tile results as they are done, reading ahead in a
background thread (and, on two or more threads, processing tiles side by
side); :func:`subtract` drives it into pre-sized output files, with the
catalogue, stamps and quick-look.  ``Inputs``, ``RunPlan``, ``plan_run``,
``TileEngine`` and ``TileResult`` are re-exported here.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from astropy.io import fits

from . import _numba as nk
from .catalog import candidate_table, write_catalog
from .engine import TileEngine, TileResult, _Loaded, _wisdom_for, tile_stats_of
from .errors import Cancelled, InputError
from .fitsio import OutputFile, Plane, wcs_cards
from .plan import Inputs, RunPlan, _make_inputs, plan_run
from .zogy import PsfSpectra, make_kernels

__all__ = ["Inputs", "RunPlan", "TileResult", "TileEngine", "SubtractSummary",
           "plan_run", "stream", "subtract", "OUTPUT_PLANES"]

log = logging.getLogger(__name__)

OUTPUT_PLANES = {
    "D": "proper difference image, unit variance (ZOGY eq. 13)",
    "S": "score image S = S_N - S_R (eq. 12)",
    "SCORR": "corrected score, source+astrometric noise (eq. 25)",
    "FLUX": "PSF flux of a point source, reference units (eq. 41)",
    "FLUX_ERR": "1-sigma error of FLUX (eq. 41)",
}


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


@contextlib.contextmanager
def _numba_threads(n: int):
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


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
        ("DEBLEND", plan.blend_radius, "[pix] half size searched for blends (0: off)"),
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
