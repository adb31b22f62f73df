"""Planning: validate a run's inputs once and derive everything global.

:func:`plan_run` opens the inputs, checks that they share one grid, and derives
the saturation levels, gains and noise levels, the PSF sources, flux ratio and
astrometric noise (:mod:`~zogy_stream.calibrate` at plan time), and from the
ZOGY kernels the tile overlap and grid, into a picklable :class:`RunPlan`
that every tile (and every Dask worker) shares.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from .background import tile_stats
from .errors import InputError, ProcessingError
from .fitsio import ImageReader
from .options import Options
from .psf import psf_fwhm
from .tiles import TileGrid
from .zogy import kernel_radius

__all__ = ["Inputs", "RunPlan", "plan_run"]

log = logging.getLogger(__name__)

_NOISE_KINDS = ("var", "weight", "err")
#: Fraction of the ZOGY kernels' energy allowed beyond the tile overlap
#: (:func:`~zogy_stream.zogy.kernel_radius`).  With both PSFs given the tiles
#: equal the whole-image computation to float32 precision.  A PSF stacked from
#: ~100 stars differs from the true one by 1.5e-4 to 9e-4 of its energy (the
#: images-only benchmark scenes), and its kernels have wings whose energy beyond
#: r falls only as ~r^-4, far below what the PSF itself is known to.  On the
#: 4096^2 scene the overlap is 132 px at 1e-5 (247 at 1e-6); with the same PSFs,
#: D then differs from the whole-image computation by at most 0.008 sigma
#: (0.003 at 247 px).  benchmarks/HISTORY.md, stop 28.
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
    blend_radius: int = 0

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
    want = 0
    if opts.deblend:
        from .deblend import PAD, blend_radius

        want = blend_radius(fwhm_max)  # the windows searched need S that far beyond
    margin = (opts.overlap if opts.overlap is not None
              else rk + max(peak + 2, want + PAD if want else 0))
    if opts.image_space and margin < rk + peak + 2:
        raise InputError(f"--overlap {margin} is smaller than the image-space kernel needs "
                         f"({rk + peak + 2}); drop --overlap or raise it")
    margin = max(margin, peak + 2)
    grid = TileGrid(shape, opts.tile, margin)
    bleed = int(min(margin, max(4, round(3 * fwhm_max))))
    blend = 0
    if want:
        # what the overlap leaves valid of S beyond the cores (the same for every
        # tile, so the tiling changes nothing); less only with a small --overlap
        blend = min(want, margin - rk - PAD)
        if blend < 2:
            log.info("deblending off: the overlap leaves %d px of S beyond the cores",
                     margin - rk)
            blend = 0
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
                   cosmics=cosmics, read_noise=rn, bleed=bleed, blend_radius=blend)


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

    src_n = cb.load_psf_source(inputs.new_psf, "NEW", psf_size=opts.psf_size, image_shape=shape)
    src_r = cb.load_psf_source(inputs.ref_psf, "REF", psf_size=opts.psf_size, image_shape=shape)
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


def _make_inputs(new, ref, kw: dict) -> tuple[Inputs, Options]:
    names = ("new_psf", "ref_psf", "new_var", "ref_var", "new_mask", "ref_mask", "new_weight",
             "ref_weight", "new_err", "ref_err")
    inputs = Inputs(new, ref, **{k: kw.pop(k, None) for k in names})
    return inputs, Options.from_kwargs(**kw)
