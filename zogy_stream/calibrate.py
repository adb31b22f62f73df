"""Plan-time and per-tile calibration from stars: PSFs, flux ratio, registration noise.

PSF sources per image (:class:`PsfSource`):

* ``image`` -- a PSF image (FITS or array), the same for every tile;
* ``psfex`` -- a PSFEx model file, evaluated at each tile's core centre;
* ``auto``  -- nothing given: a mosaic-wide PSF is estimated at plan time
  from the stars of a few sampled regions (centre and four quadrants), and
  each tile estimates its own PSF from the stars in its padded window when it
  has enough good ones (``local``), else uses the mosaic-wide one (``global``).

The flux ratio ``F_n/F_r`` (``auto``) and the astrometric sigma (``auto``)
are fitted from the matched star catalogues of the same sampled regions.
Everything here is deterministic: a tile's result depends only on its pixels
and on the (picklable) plan.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, ProcessingError
from .psf import load_psf, psf_fwhm
from .tiles import Box

__all__ = ["PsfSource", "load_psf_source", "sample_boxes", "RegionStars", "region_stars",
           "estimate_global_psf", "fit_global_flux_ratio", "fit_global_astrometric_sigma",
           "pad_psf", "usable_star_count"]

log = logging.getLogger(__name__)

#: fewest stars for a tile's own PSF (else the mosaic-wide one)
MIN_LOCAL_STARS = 8
#: fewest stars for the mosaic-wide PSF
MIN_GLOBAL_STARS = 5


def pad_psf(psf: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad (or crop) an odd PSF to ``size`` x ``size`` and renormalise."""
    ny, nx = psf.shape
    out = np.zeros((size, size))
    cy, cx, c = ny // 2, nx // 2, size // 2
    h = min(c, cy, cx)
    out[c - h:c + h + 1, c - h:c + h + 1] = psf[cy - h:cy + h + 1, cx - h:cx + h + 1]
    s = out.sum()
    return out / s if s > 0 else out


@dataclass(frozen=True, eq=False)
class PsfSource:
    """Where the PSFs of one image come from (picklable)."""

    label: str                     # "NEW" / "REF"
    kind: str                      # "image", "psfex", "auto"
    psf: np.ndarray = field(repr=False)   # the mosaic-wide (or given) PSF
    largest: np.ndarray = field(repr=False)  # the broadest PSF seen at plan time
    model: object = None           # PsfexModel for "psfex"
    size: int = 0
    local: bool = False
    n_stars: int = 0

    @property
    def varies(self) -> bool:
        return self.kind == "psfex" or (self.kind == "auto" and self.local)

    def for_tile(self, tile, window: np.ndarray | None, *, saturation: float,
                 stars=None) -> tuple[np.ndarray, str, dict]:
        """``(psf, source, info)`` for one tile; ``source`` is image/psfex/local/global."""
        if self.kind == "image":
            return self.psf, "image", {}
        if self.kind == "psfex":
            c = tile.core
            x, y = 0.5 * (c.x0 + c.x1 - 1), 0.5 * (c.y0 + c.y1 - 1)
            return self.model.evaluate(x, y, size=self.size), "psfex", {}
        if not self.local or window is None:
            return self.psf, "global", {}
        from .stars import estimate_psf

        size = min(self.size, (min(window.shape) - 1) // 2 * 2 - 1)
        reason = ""
        if size >= 7:
            try:
                sat = saturation if math.isfinite(saturation) else None
                psf, info = estimate_psf(window, size=size, saturation=sat, stars=stars,
                                         min_stars=MIN_LOCAL_STARS, snr_min=15.0)
                f_loc, f_glob = psf_fwhm(psf), psf_fwhm(self.psf)
                if 0.6 <= f_loc / f_glob <= 1.6:
                    return pad_psf(psf, self.size), "local", {"n_stars": info["n_stars"]}
                reason = f"local FWHM {f_loc:.2f} px far from mosaic-wide {f_glob:.2f} px"
            except (ProcessingError, InputError) as exc:
                reason = str(exc).split(";")[0]
        else:
            reason = "window too small"
        log.info("tile %d: PSF of %s from the mosaic-wide estimate (%s)", tile.index,
                 self.label, reason)
        return self.psf, "global", {"reason": reason}


def _is_psfex(src) -> bool:
    from pathlib import Path

    if isinstance(src, np.ndarray) or src is None:
        return False
    p = Path(str(src))
    if p.suffix.lower() == ".psf":
        return True
    try:
        from astropy.io import fits

        with fits.open(p) as hl:
            return len(hl) > 1 and (hl[1].header.get("EXTNAME", "").upper() == "PSF_DATA"
                                    or "PSF_MASK" in getattr(hl[1], "columns", ()).names)
    except Exception:
        return False


def load_psf_source(src, label: str, *, psf_size: int | None) -> PsfSource | None:
    """A PSF image or a PSFEx model; ``None`` when nothing was given."""
    flag = f"--{label.lower()}-psf"
    if src is None:
        return None
    if _is_psfex(src):
        from .psfex import read_psfex

        try:
            model = read_psfex(src)
        except (InputError, ProcessingError):
            raise
        except Exception as exc:
            raise InputError(f"{flag} '{src}': not a PSFEx model file ({exc})") from None
        size = psf_size or model.default_size
        try:
            centre = model.evaluate(0.0, 0.0, size=size)  # validates the model once
        except ProcessingError as exc:
            raise InputError(f"{flag} '{src}': {exc}") from None
        return PsfSource(label, "psfex", centre, centre, model=model, size=size)
    psf = load_psf(src, label=flag)
    return PsfSource(label, "image", psf, psf, size=max(psf.shape))


def psfex_extremes(source: PsfSource, shape) -> tuple[np.ndarray, np.ndarray]:
    """(centre PSF, broadest PSF) of a PSFEx model over the image corners and centre."""
    ny, nx = shape
    pts = [(0.5 * (nx - 1), 0.5 * (ny - 1)), (0, 0), (nx - 1, 0), (0, ny - 1), (nx - 1, ny - 1)]
    psfs = [source.model.evaluate(x, y, size=source.size) for x, y in pts]
    return psfs[0], max(psfs, key=psf_fwhm)


# ---------------------------------------------------------------- sampled regions
def sample_boxes(shape, size: int = 1024) -> list[Box]:
    """The whole image if small, else the centre and the four quadrant centres."""
    ny, nx = shape
    if ny <= 2 * size and nx <= 2 * size and ny * nx <= 4 * size * size:
        return [Box(0, ny, 0, nx)]
    out = []
    for fy, fx in ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):
        cy, cx = int(fy * ny), int(fx * nx)
        y0, x0 = max(0, cy - size // 2), max(0, cx - size // 2)
        out.append(Box(y0, min(ny, y0 + size), x0, min(nx, x0 + size)))
    return out


@dataclass
class RegionStars:
    box: Box
    data: np.ndarray
    cat: object  # astropy Table (box coordinates)


def region_stars(reader, boxes, *, saturation: float, gain: float | None) -> list[RegionStars]:
    """Star catalogues of the sampled regions of one image (failures give empty tables)."""
    from astropy.table import Table

    from .stars import find_stars

    out = []
    sat = saturation if math.isfinite(saturation) else None
    for box in boxes:
        data = np.array(reader.read(box), dtype=np.float32)
        reader.release(box)
        try:
            cat = find_stars(data, saturation=sat, gain=gain, threshold=5.0)
        except (ProcessingError, InputError) as exc:
            log.info("%s: no stars in region %s (%s)", reader.label, box, exc)
            cat = Table(names=("x", "y", "flux", "flux_err", "snr"))
        out.append(RegionStars(box, data, cat))
    return out


def usable_star_count(regions) -> int:
    n = 0
    for r in regions:
        c = r.cat
        if len(c) and "star_like" in c.colnames:
            ok = (np.asarray(c["star_like"]) & ~np.asarray(c["saturated"])
                  & np.asarray(c["isolated"]) & (np.asarray(c["snr"]) >= 15))
            n += int(ok.sum())
    return n


def estimate_global_psf(regions, label: str, *, saturation: float,
                        psf_size: int | None, local: bool) -> PsfSource:
    """Mosaic-wide PSF: the mean of the PSFs of the sampled regions.

    Raises
    ------
    ProcessingError
        No region has enough usable stars.
    """
    from .stars import estimate_psf

    sat = saturation if math.isfinite(saturation) else None
    psfs, n_used = [], 0
    for r in regions:
        if len(r.cat) == 0:
            continue
        try:
            psf, info = estimate_psf(r.data, size=psf_size, saturation=sat, stars=r.cat,
                                     min_stars=MIN_GLOBAL_STARS, snr_min=15.0)
        except (ProcessingError, InputError) as exc:
            log.info("%s: no PSF from region %s (%s)", label, r.box, exc)
            continue
        psfs.append(psf)
        n_used += int(info["n_stars"])
    if not psfs:
        n = usable_star_count(regions)
        raise ProcessingError(f"cannot estimate the PSF of {label}: only {n} usable stars; "
                              f"give --{label.lower()}-psf")
    size = psf_size or max(p.shape[0] for p in psfs)
    padded = [pad_psf(p, size) for p in psfs]
    mean = np.mean(padded, axis=0)
    mean /= mean.sum()
    largest = max(padded, key=psf_fwhm)
    log.info("%s: mosaic-wide PSF from %d stars in %d region(s), FWHM %.2f px (largest %.2f), "
             "size %d", label, n_used, len(psfs), psf_fwhm(mean), psf_fwhm(largest), size)
    return PsfSource(label, "auto", mean, largest, size=size, local=local, n_stars=n_used)


def _stack(regions):
    from astropy.table import vstack

    parts, apc = [], []
    for r in regions:
        c = r.cat
        if len(c) == 0 or "star_like" not in c.colnames:
            continue
        c = c.copy()
        c["x"] = c["x"] + r.box.x0
        c["y"] = c["y"] + r.box.y0
        parts.append(c)
        a = c.meta.get("aperture_correction", np.nan)
        if np.isfinite(a):
            apc.append(a)
    if not parts:
        return None
    tab = vstack(parts, metadata_conflicts="silent")
    tab.meta = {"aperture_correction": float(np.median(apc)) if apc else float("nan")}
    return tab


def _fit_matched(new_regions, ref_regions, fit):
    """``(fit(new_stars, ref_stars), None)``, or ``(None, reason)`` when it cannot be done."""
    cn, cr = _stack(new_regions), _stack(ref_regions)
    if cn is None or cr is None:
        return None, "no stars"
    try:
        return fit(cn, cr), None
    except (ProcessingError, InputError) as exc:
        return None, str(exc)


def fit_global_flux_ratio(new_regions, ref_regions) -> tuple[float, float, int, str]:
    """``(ratio, err, n_stars, source)``; ``(1.0, nan, 0, 'default')`` when too few stars."""
    from .stars import fit_flux_ratio

    res, reason = _fit_matched(new_regions, ref_regions, fit_flux_ratio)
    if res is None:
        log.warning("cannot fit the flux ratio (%s); using 1.0 (give --flux-ratio)", reason)
        return 1.0, float("nan"), 0, "default"
    ratio, err, n = res
    log.info("flux ratio F_n/F_r = %.4f +- %.4f from %d matched stars", ratio, err, n)
    return float(ratio), float(err), int(n), "auto"


def fit_local_flux_ratio(cat_n, cat_r) -> tuple[float, float, int] | None:
    from .stars import fit_flux_ratio

    if cat_n is None or cat_r is None or len(cat_n) == 0 or len(cat_r) == 0:
        return None
    try:
        return fit_flux_ratio(cat_n, cat_r)
    except (ProcessingError, InputError):
        return None


def fit_global_astrometric_sigma(new_regions, ref_regions) -> tuple[float, float, int, str]:
    """``(sx, sy, n, source)``; ``(0, 0, 0, 'default')`` when too few stars."""
    from .stars import astrometric_sigma

    res, reason = _fit_matched(new_regions, ref_regions, astrometric_sigma)
    if res is None:
        log.warning("cannot estimate the astrometric sigma (%s); using 0 0", reason)
        return 0.0, 0.0, 0, "default"
    sx, sy, n = res
    log.info("astrometric sigma %.4f, %.4f px from %d matched stars", sx, sy, n)
    return float(sx), float(sy), int(n), "auto"
