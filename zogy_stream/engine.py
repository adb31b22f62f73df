"""One tile at a time: a :class:`TileEngine` reads, calibrates and subtracts.

The engine owns the per-process state of a :class:`~zogy_stream.plan.RunPlan`
(open readers, FFT plans, the kernel cache, window buffers) and turns one tile
into a :class:`TileResult`: its window is read (:meth:`TileEngine.load`), the
tile's own masks, cosmic rays and local PSFs are measured, and
:class:`~zogy_stream.zogy.TileSubtractor` computes the products of its core,
with the per-tile S_corr noise factor and the candidates.
"""
from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from . import _numba as nk
from .background import MeshBackground
from .catalog import find_candidates
from .errors import InputError
from .fft import Wisdom, default_wisdom_path, pyfftw
from .fitsio import ImageReader
from .masks import EXCLUDE_CANDIDATE, MaskBit
from .options import Options
from .plan import RunPlan, _as_variance
from .psf import psf_fwhm
from .tiles import Box, Tile
from .zogy import KernelCache, TileSubtractor

__all__ = ["TileEngine", "TileResult", "tile_stats_of"]

log = logging.getLogger(__name__)


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
        # P_D and its autocorrelation for deblending, by kernel key (shared with
        # forks: a race only builds one twice)
        self._psf_d: dict = {}
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
        if len(cands) and p.blend_radius:
            cands = self._deblend(cands, ks, key, psf_n, psf_r, tile)
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

    def _deblend(self, cands, ks, psf_key, psf_n, psf_r, tile):
        """Candidates that are two point sources split in two (:func:`split_blends`)."""
        from .deblend import PAD, psf_autocorrelation, split_blends
        from .zogy import PsfSpectra, make_kernels

        p = self.plan
        r = p.blend_radius
        e = r + PAD
        region = tile.core_in_window.grow(e)
        s = self.sub.score_on(region)
        key = (psf_key, ks.sigma_n, ks.sigma_r, ks.flux_ratio)
        got = self._psf_d.get(key)
        if got is None:
            # P_D on a small grid: the same spectra as the tile's kernels (eq. 14)
            size = max(psf_n.shape[0], psf_r.shape[0])
            small = make_kernels(PsfSpectra.from_psfs(psf_n, psf_r, (2 * size + 2,) * 2),
                                 sigma_n=ks.sigma_n, sigma_r=ks.sigma_r, flux_ratio=ks.flux_ratio,
                                 dtype=np.float64, psf_d_radius=size // 2)
            got = self._psf_d[key] = (small.psf_d, psf_autocorrelation(small.psf_d, r))
            if len(self._psf_d) > 64:
                self._psf_d.pop(next(iter(self._psf_d)))
        return split_blends(cands, s, got[0], ks.f_d, origin=(tile.core.y0 - e, tile.core.x0 - e),
                            radius=r, threshold=self.plan.opts.threshold,
                            mask=self._grown[region.slices], exclude=EXCLUDE_CANDIDATE,
                            acorr=got[1])


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


def _wisdom_for(opts: Options) -> Wisdom | None:
    if opts.wisdom is False:
        return None
    return Wisdom(opts.wisdom if opts.wisdom not in (None, True) else default_wisdom_path())
