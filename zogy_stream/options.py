"""Options, normalised once at the entry point into a frozen dataclass."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError

__all__ = ["Options", "default_threads"]

_EFFORTS = {"estimate": "FFTW_ESTIMATE", "measure": "FFTW_MEASURE", "patient": "FFTW_PATIENT"}


def default_threads() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def word_or_number(name: str, value, words: tuple[str, ...], ok, requirement: str):
    """``value`` as one of ``words`` (any case) or as a finite float satisfying ``ok``.

    Raises
    ------
    ConfigError
        Neither; the message names the option and what it accepts.
    """
    if isinstance(value, str) and value.strip().lower() in words:
        return value.strip().lower()
    accepted = f"a number {requirement} or " + " or ".join(repr(w) for w in words)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {accepted}, got {value!r}") from None
    if not (math.isfinite(v) and ok(v)):
        raise ConfigError(f"{name}: expected {accepted}, got {value}")
    return v


@dataclass(frozen=True)
class Options:
    """Processing options of :func:`zogy_stream.stream` / :func:`zogy_stream.subtract`.

    Attributes
    ----------
    flux_ratio : float, "auto" or "local"
        F_n / F_r (F_r = 1): FLUX is in the reference image's units.  ``"auto"``
        (the default) fits it from matched bright stars in a few sampled regions
        at plan time (from only 2-4 stars with a warning; 1.0 with a warning
        when fewer); ``"local"`` fits it
        per tile, falling back to the global fit.
    astrometric_sigma : (float, float), "auto" or "default"
        Registration noise (sigma_x, sigma_y) in pixels for V_ast; ``"auto"``
        estimates it from the scatter of matched stars' centroid offsets;
        ``"default"`` (the default) is ``"auto"`` when stars are matched at
        plan time anyway (an estimated PSF or flux ratio), else ``(0, 0)``.
    tile : int
        Side of the square tile core in pixels.
    overlap : int or None
        Overlap margin per side; ``None`` derives it from the ZOGY kernels.
    threads : int
        Threads for FFTW and Numba.
    image_space : bool
        Direct convolutions with trimmed real-space kernels instead of FFTs.
    wisdom : Path, None or False
        FFTW wisdom file; ``None`` = default cache path, ``False`` = no cache.
    background : bool
        Subtract the background (sigma-clipped, on a global mesh).
    bkg_mesh : int
        Background mesh cell in pixels (cells are aligned to the image, so
        the background does not depend on the tiling).
    threshold : float
        |S_corr| detection threshold for candidates.
    new_saturation, ref_saturation : float or None
        Saturation level (default: the SATURATE keyword, else none).
    new_gain, ref_gain : float or None
        Gain in e-/ADU for the Poisson variance term (default: GAIN keyword).
    fft_effort : str
        FFTW planner: ``estimate``, ``measure`` or ``patient``.
    prefetch : int
        Tiles read ahead in a background thread.
    seed : int
        Seed of the noise that fills masked and off-image pixels.
    durable : bool
        fsync outputs before renaming them into place.
    settle : bool
        Write each finished band of tile rows of the output back to disk and
        drop it from the page cache as the run goes (default), so the output
        never piles up in memory; False leaves write-back to the kernel
        (faster on a slow disk with memory to spare).
    write_buffer : int
        MiB of memory for gathering whole-width row bands of the output
        (one tile row of every output plane: ~21 bytes x core x width).  A
        band that fits is written with direct I/O, past the page cache;
        otherwise tiles are written through the memory map.  0 never gathers.
    parallel_tiles : int
        Tiles processed at once by :func:`~zogy_stream.pipeline.subtract`, each
        with ``threads // parallel_tiles`` threads (~150 MiB each at the default
        tile).  0 (default): 2 when ``threads`` >= 2 and the output is written in
        row bands (see ``write_buffer``), else 1: the largest mosaics, written
        through the memory map, keep the smaller footprint.
    gain : float or None
        Gain of both images (overridden by ``new_gain``/``ref_gain``; default
        the ``gain_key`` header keyword).
    gain_key, saturate_key : str
        Header keywords holding the gain and the saturation level.
    psf_size : int or None
        Odd side of estimated / PSFEx-evaluated PSFs (default from the FWHM).
    local_psf : bool
        Estimate a PSF per tile from its own stars (when no PSF is given).
    model_error : float or "auto"
        Fractional error ε of the model of static sources (PSF shape, flux
        scale): ``ε² min(S_N, S_R)²`` joins the variance of S_corr, so bright
        stars that the PSFs model imperfectly leave no significant residual.
        ``auto`` (default) fits ε per tile to its bright static sources
        (:func:`zogy_stream.zogy.fit_model_error`; 0 with fewer than 5); 0 is off.
    noise_correction : bool
        Rescale S_corr per tile by its measured robust dispersion on blank sky
        (correlated noise of resampled/coadded images).
    deblend : bool
        Split a candidate into two when it is two point sources closer than
        S_corr resolves (:mod:`zogy_stream.deblend`); default on.
    cosmic_rays : str
        ``auto`` (on for an image given without variance/weight/error map and mask
        and not a coadd, NCOMBINE <= 1), ``on`` or ``off``.
    zeropoint : float or None
        Photometric zero point of the reference units: adds ``mag``, ``mag_err``.
    registration : bool
        Fold the residual sub-pixel registration offset of the two images
        (mean centroid offset of matched stars, when significant) into the
        new image's PSF; done whenever stars are matched at plan time (an
        estimated PSF, ``flux_ratio`` or ``astrometric_sigma`` ``auto``).
    """

    flux_ratio: float | str = "auto"
    astrometric_sigma: tuple[float, float] | str = "default"
    tile: int = 1024
    overlap: int | None = None
    threads: int = 0
    image_space: bool = False
    wisdom: Path | None | bool = None
    background: bool = True
    bkg_mesh: int = 256
    threshold: float = 5.0
    new_saturation: float | None = None
    ref_saturation: float | None = None
    new_gain: float | None = None
    ref_gain: float | None = None
    fft_effort: str = "measure"
    prefetch: int = 1
    seed: int = 0
    durable: bool = False
    settle: bool = True
    write_buffer: int = 256
    parallel_tiles: int = 0
    gain: float | None = None
    gain_key: str = "GAIN"
    saturate_key: str = "SATURATE"
    psf_size: int | None = None
    local_psf: bool = True
    noise_correction: bool = True
    deblend: bool = True
    model_error: float | str = "auto"
    cosmic_rays: str = "auto"
    zeropoint: float | None = None
    registration: bool = True

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Options":
        """Validate and normalise keyword options.

        Raises
        ------
        ConfigError
            Unknown option or a value out of range (the message names it).
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
        kw = {k: v for k, v in kwargs.items() if v is not None or k in ("overlap", "wisdom")}
        o = cls(**kw)
        if isinstance(o.astrometric_sigma, str):
            sig = o.astrometric_sigma.strip().lower()
            if sig not in ("auto", "default"):
                raise ConfigError("astrometric_sigma must be two numbers or 'auto', got "
                                  f"{o.astrometric_sigma!r}")
        else:
            try:
                sig = tuple(float(v) for v in o.astrometric_sigma)
            except (TypeError, ValueError):
                raise ConfigError("astrometric_sigma must be two numbers (sigma_x, sigma_y) "
                                  "or 'auto'") from None
            if len(sig) != 2 or min(sig) < 0:
                raise ConfigError(f"astrometric_sigma must be two values >= 0, got "
                                  f"{o.astrometric_sigma}")
        fr = word_or_number("flux_ratio", o.flux_ratio, ("auto", "local"),
                             lambda v: v > 0, "> 0")
        me = word_or_number("model_error", o.model_error, ("auto",),
                             lambda v: 0 <= v <= 1, "in [0, 1]")
        cr = str(o.cosmic_rays).lower()
        if cr in ("true", "1", "yes"):
            cr = "on"
        if cr in ("false", "0", "no", "none"):
            cr = "off"
        if cr not in ("auto", "on", "off"):
            raise ConfigError(f"cosmic_rays must be auto, on or off, got {o.cosmic_rays!r}")
        if o.psf_size is not None and (int(o.psf_size) < 3 or int(o.psf_size) % 2 == 0):
            raise ConfigError(f"psf_size must be an odd number >= 3, got {o.psf_size}")
        if o.zeropoint is not None and not math.isfinite(float(o.zeropoint)):
            raise ConfigError(f"zeropoint must be a finite number, got {o.zeropoint}")
        if int(o.tile) < 32:
            raise ConfigError(f"tile must be >= 32 pixels, got {o.tile}")
        if o.overlap is not None and int(o.overlap) < 2:
            raise ConfigError(f"overlap must be >= 2 pixels, got {o.overlap}")
        if int(o.threads) < 0:
            raise ConfigError(f"threads must be >= 1 (0 = all CPUs), got {o.threads}")
        if int(o.bkg_mesh) < 16:
            raise ConfigError(f"bkg_mesh must be >= 16 pixels, got {o.bkg_mesh}")
        if not float(o.threshold) > 0:
            raise ConfigError(f"threshold must be > 0, got {o.threshold}")
        for name in ("gain", "new_gain", "ref_gain", "new_saturation", "ref_saturation"):
            v = getattr(o, name)
            if v is not None and not float(v) > 0:
                raise ConfigError(f"{name} must be > 0, got {v}")
        effort = str(o.fft_effort).lower().removeprefix("fftw_")
        if effort not in _EFFORTS:
            raise ConfigError(f"fft_effort must be one of {', '.join(_EFFORTS)}, got {o.fft_effort}")
        if int(o.prefetch) < 0:
            raise ConfigError(f"prefetch must be >= 0, got {o.prefetch}")
        if int(o.write_buffer) < 0:
            raise ConfigError(f"write_buffer must be >= 0 MiB, got {o.write_buffer}")
        if int(o.parallel_tiles) < 0:
            raise ConfigError(f"parallel_tiles must be >= 0 (0: automatic), got {o.parallel_tiles}")
        wisdom = o.wisdom
        if wisdom is not None and wisdom is not False:
            wisdom = Path(wisdom)
        return cls(
            flux_ratio=fr, astrometric_sigma=sig, tile=int(o.tile),
            overlap=None if o.overlap is None else int(o.overlap),
            threads=int(o.threads) or default_threads(), image_space=bool(o.image_space),
            wisdom=wisdom, background=bool(o.background), bkg_mesh=int(o.bkg_mesh),
            threshold=float(o.threshold),
            new_saturation=None if o.new_saturation is None else float(o.new_saturation),
            ref_saturation=None if o.ref_saturation is None else float(o.ref_saturation),
            new_gain=None if o.new_gain is None else float(o.new_gain),
            ref_gain=None if o.ref_gain is None else float(o.ref_gain),
            fft_effort=_EFFORTS[effort], prefetch=int(o.prefetch), seed=int(o.seed),
            durable=bool(o.durable), settle=bool(o.settle), write_buffer=int(o.write_buffer),
            parallel_tiles=int(o.parallel_tiles),
            gain=None if o.gain is None else float(o.gain),
            gain_key=str(o.gain_key).upper(), saturate_key=str(o.saturate_key).upper(),
            psf_size=None if o.psf_size is None else int(o.psf_size),
            local_psf=bool(o.local_psf), noise_correction=bool(o.noise_correction),
            deblend=bool(o.deblend),
            model_error=me, cosmic_rays=cr, zeropoint=None if o.zeropoint is None else float(o.zeropoint),
            registration=bool(o.registration),
        )
