"""Plan-time and per-tile calibration from stars: PSFs, flux ratio, registration noise.

PSF sources per image (:class:`PsfSource`):

* ``image`` -- a PSF image (FITS or array), the same for every tile;
* ``psfex`` -- a PSFEx model file, evaluated at each tile's core centre;
* ``auto``  -- nothing given: a mosaic-wide PSF is estimated at plan time
  from the stars of a few sampled regions (centre and four quadrants), and
  each tile estimates its own PSF from the stars in its padded window when it
  has enough good ones (``local``), else uses the mosaic-wide one (``global``).
  An image with too few stars of its own gets a Moffat fitted to the few it
  has, or, when that is missing or weak, a PSF fitted through the other
  image's on the sources both show (:func:`fill_psfs_through_other`).

The flux ratio ``F_n/F_r`` (``auto``) and the astrometric sigma (``auto``)
are fitted from the matched star catalogues of the same sampled regions; so is
the residual registration offset, which :func:`register_psf` folds into the
new image's PSF.  :func:`detect_saturation` finds the saturation level of an
image without a SATURATE keyword, :func:`defect_mask` the pixels of a tile
window that carry no sky signal (zero-coverage fill, defective border lines).
Everything here is deterministic: a tile's result depends only on its pixels
and on the (picklable) plan.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, ProcessingError
from .psf import load_psf, psf_fwhm
from .tiles import Box

__all__ = ["PsfSource", "load_psf_source", "sample_boxes", "RegionStars", "region_stars",
           "pair_region_stars", "read_regions", "region_catalogue", "drop_extended_matches",
           "estimate_global_psf", "fit_global_flux_ratio", "fit_global_astrometric_sigma",
           "pad_psf", "outer_tile_centres", "usable_star_count",
           "detect_saturation", "defect_mask", "fit_registration", "register_psf", "shift_psf",
           "cross_psf_source", "fill_psfs_through_other"]

log = logging.getLogger(__name__)

#: fewest stars for a tile's own PSF (else the mosaic-wide one)
MIN_LOCAL_STARS = 8
#: fewest stars for a tile's own PSF when the field-varying model of all the stars
#: (:mod:`zogy_stream.psffield`) is the alternative
MIN_LOCAL_OVER_FIELD = 50
#: detection threshold (sigma) of the star catalogues, and of the sources masked for
#: their background maps
STAR_THRESHOLD = 5.0
#: fewest stars for the mosaic-wide empirical PSF (fewer: a Moffat fitted to them; a
#: stack of a handful of stars is noisy and its noise spreads the ZOGY kernels)
MIN_GLOBAL_STARS = 10
#: S/N thresholds, in turn, of the stars a Moffat PSF is fitted to when there are too
#: few for an empirical PSF: faint stars only when no brighter one is found (several
#: faint stars fitted jointly pin the FWHM down far better than no PSF at all)
MODEL_STAR_SNR = (20.0, 10.0, 7.0)
#: Moffat fits of regions broader than this factor times the sharpest one are left out
#: (their stars were galaxies; a PSF varying across the field varies far less)
MAX_MODEL_FWHM_SPREAD = 1.5
#: fewest matched sources (stars and galaxies) for a flux ratio from cross-convolved
#: images (with a warning below :data:`MIN_RATIO_SOURCES`)
MIN_CROSS_RATIO_SOURCES = 2
#: fewest matched sources for the regular flux-ratio fit (as ``fit_flux_ratio``'s stars)
MIN_RATIO_SOURCES = 5
#: relative error of a PSF-fit flux ratio beyond its stated (statistical) one, from
#: the PSF models: on the 33 off-nominal simulated scenes with estimated PSFs the
#: PSF-fit ratios were off by 1.67 % RMS, where nominal seed 3 stated 0.5 %
PSF_RATIO_SYSTEMATIC = 0.015
#: aperture radius of the cross-convolved flux ratio, in units of the FWHM of
#: ``P_n (x) P_r`` (~ hypot of the two FWHMs).  For a Gaussian it encloses 99.8 % of
#: a star's light, so errors of the estimated PSFs' wings barely change the ratio.
#: RMS errors on the 33 off-nominal simulated scenes: 0.86, 0.76 and 1.11 % for 1.2,
#: 1.5 and 2.0 given the true PSFs; 0.88 and 2.80 % for 1.5 and 2.5 with estimated
#: ones (larger apertures: more noise and background error)
CROSS_APERTURE = 1.5
#: Radius of the inner aperture (in FWHM of ``P_n (x) P_r``) whose ratio a galaxy's
#: annulus must share (:func:`zogy_stream.stars.contaminated_sources`): 83 % of a
#: point source's light, so that a transient near a galaxy's centre falls in it.
CROSS_INNER = 0.8
#: most (brightest) stars per region with PSF fluxes for the flux ratio
MAX_RATIO_STARS = 300
#: fewest matched stars whose flux ratio is used (with a warning) when the
#: regular fit (5 stars) is impossible
MIN_FEW_RATIO_STARS = 2


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
    #: residual registration offset (dx, dy) folded into this image's PSFs (NEW only);
    #: ``psf`` and ``largest`` already carry it, tile PSFs get it in :meth:`for_tile`
    shift: tuple = (0.0, 0.0)
    #: a PSF varying linearly across the field (:class:`zogy_stream.psffield.PsfField`),
    #: fitted to every PSF star of the sampled regions; ``None`` when the variation is
    #: not significant or there are too few stars
    field_model: object = field(default=None, repr=False)
    #: ``(fwhm, beta, n_stars, snr_min)`` of a Moffat fitted to too few stars for an
    #: empirical PSF (:func:`_model_psf_source`); ``None`` otherwise
    moffat: tuple | None = None
    #: how an ``auto`` PSF was obtained: ``stars`` (stacked), ``moffat`` (fitted to too
    #: few stars), ``cross`` (fitted through the other image, :func:`cross_psf_source`);
    #: ``given`` for images and PSFEx models
    method: str = "given"

    @property
    def varies(self) -> bool:
        return self.kind == "psfex" or (self.kind == "auto" and self.local)

    def psf_at(self, x: float, y: float) -> np.ndarray:
        """The field-varying model's PSF at ``(x, y)`` as a tile gets it (else ``psf``)."""
        if self.field_model is None or not self.local:
            return self.psf
        return shift_psf(pad_psf(self.field_model.at(x, y), self.size), *self.shift)

    def for_tile(self, tile, window: np.ndarray | None, *, saturation: float,
                 stars=None, background=None, rms=None, mask=None
                 ) -> tuple[np.ndarray, str, dict]:
        """``(psf, source, info)`` for one tile; ``source`` is image/psfex/local/global.

        ``background`` and ``rms`` are the window's maps when already measured
        (:func:`zogy_stream.stars.background_maps`); ``mask`` its bad pixels.
        """
        if self.kind == "image":
            return self.psf, "image", {}
        if self.kind == "psfex":
            c = tile.core
            x, y = 0.5 * (c.x0 + c.x1 - 1), 0.5 * (c.y0 + c.y1 - 1)
            return shift_psf(self.model.evaluate(x, y, size=self.size), *self.shift), "psfex", {}
        if not self.local:
            return self.psf, "global", {}
        fallback, how = self.psf, "global"
        if self.field_model is not None:
            c = tile.core
            fallback = self.psf_at(0.5 * (c.x0 + c.x1 - 1), 0.5 * (c.y0 + c.y1 - 1))
            how = "field"
        if window is None:
            return fallback, how, {}
        from .stars import estimate_psf

        size = min(self.size, (min(window.shape) - 1) // 2 * 2 - 1)
        reason = ""
        if size >= 7:
            # with a field model, a tile's own stack must hold enough stars to beat it
            least = MIN_LOCAL_STARS if self.field_model is None else MIN_LOCAL_OVER_FIELD
            try:
                sat = saturation if math.isfinite(saturation) else None
                psf, info = estimate_psf(window, size=size, saturation=sat, stars=stars,
                                         min_stars=least, snr_min=15.0,
                                         background=background, rms=rms, mask=mask)
                f_loc, f_glob = psf_fwhm(psf), psf_fwhm(self.psf)
                if 0.6 <= f_loc / f_glob <= 1.6:
                    return (shift_psf(pad_psf(psf, self.size), *self.shift), "local",
                            {"n_stars": info["n_stars"]})
                reason = f"local FWHM {f_loc:.2f} px far from mosaic-wide {f_glob:.2f} px"
            except (ProcessingError, InputError) as exc:
                reason = str(exc).split(";")[0]
        else:
            reason = "window too small"
        log.info("tile %d: PSF of %s from the %s model (%s)", tile.index, self.label,
                 "field-varying" if how == "field" else "mosaic-wide", reason)
        return fallback, how, {"reason": reason}


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


def load_psf_source(src, label: str, *, psf_size: int | None,
                    image_shape=None) -> PsfSource | None:
    """A PSF image or a PSFEx model; ``None`` when nothing was given.  A PSF image
    at least as large as ``image_shape`` is refused (see :func:`load_psf`)."""
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
    psf = load_psf(src, label=flag, image_shape=image_shape)
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
    psf: np.ndarray | None = None  # this region's estimated PSF (estimate_global_psf)
    saturation: float | None = None  # saturation level of the image (None: none)
    back: np.ndarray | None = None  # background and noise maps (measured once, shared)
    rms: np.ndarray | None = None
    mask: np.ndarray | None = None  # bad pixels: the user's mask and cosmic rays (True)


def region_stars(reader, boxes, *, saturation: float, gain: float | None, mask_reader=None,
                 cosmic_rays: bool = False, sigma: float | None = None,
                 read_noise: float | None = None, other=None) -> list[RegionStars]:
    """Star catalogues of the sampled regions of one image (failures give empty tables).

    Parameters
    ----------
    reader : ImageReader
        The image.
    boxes : list of Box
        The regions (:func:`sample_boxes`).
    saturation : float
        Saturation level (ADU; ``inf`` for none).
    gain : float or None
        Electrons per ADU (the catalogue's Poisson errors; None: background only).
    mask_reader : ImageReader, optional
        The user's mask of the image (non-zero: bad).
    cosmic_rays : bool, optional
        Mask cosmic rays in each region first
        (:func:`zogy_stream.cosmics.exposure_cosmic_rays`, with ``sigma``,
        ``gain`` and ``read_noise``).  In a single exposure the hits
        otherwise outnumber the stars: the stellar locus, the PSF and the
        flux ratio would be measured on them.
    other : ImageReader, optional
        The other image of the pair.  With no PSF known yet, L.A.Cosmic also
        flags the cores of undersampled stars; those sit on a source of the
        other image and are not masked (:func:`zogy_stream.cosmics.drop_coincident`).

    Returns
    -------
    list of RegionStars
        One per box; the catalogue is empty where no star was found.

    Raises
    ------
    CosmicsUnavailableError
        ``cosmic_rays`` and astroscrappy is not installed.
    """
    regions = read_regions(reader, boxes, mask_reader)
    others = (read_regions(other, boxes) if other is not None and cosmic_rays
              else [(None, None)] * len(boxes))
    return [region_catalogue(box, data, bad, label=reader.label, saturation=saturation,
                             gain=gain, cosmic_rays=cosmic_rays, sigma=sigma,
                             read_noise=read_noise, other=odata)
            for box, (data, bad), (odata, _) in zip(boxes, regions, others)]


def pair_region_stars(readers, boxes, *, saturation, gain, mask_readers=(None, None),
                      cosmic_rays=(False, False), sigma=(None, None),
                      read_noise=(None, None), threads: int = 1):
    """:func:`region_stars` of both images of a pair, the regions measured in threads.

    Each of ``readers``, ``saturation``, ``gain``, ``mask_readers``,
    ``cosmic_rays``, ``sigma`` and ``read_noise`` is a ``(new, ref)`` pair;
    each image's hits are tested against the other image
    (:func:`region_stars`'s ``other``).  The regions are read first, one
    after another (a reader is not shared between threads); their
    catalogues, which need nothing but the pixels, are then measured on up
    to ``threads`` threads.  L.A.Cosmic releases the interpreter's lock and
    sep holds it, so one image's star finding overlaps the other's cosmic
    rays.  The catalogues are the ones :func:`region_stars` makes.

    Returns
    -------
    (list of RegionStars, list of RegionStars)
        NEW's and REF's, one per box.

    Raises
    ------
    CosmicsUnavailableError
        ``cosmic_rays`` is on for an image and astroscrappy is not installed.
    """
    if any(cosmic_rays):
        from .cosmics import _import_astroscrappy

        _import_astroscrappy()  # fail before any work, as the serial path does
    regions = [read_regions(rd, boxes, mk) for rd, mk in zip(readers, mask_readers)]
    jobs = [(k, i) for k in (0, 1) for i in range(len(boxes))]

    def one(job):
        k, i = job
        data, bad = regions[k][i]
        other = regions[1 - k][i][0] if cosmic_rays[k] else None
        return region_catalogue(boxes[i], data, bad, label=readers[k].label,
                                saturation=saturation[k], gain=gain[k],
                                cosmic_rays=cosmic_rays[k], sigma=sigma[k],
                                read_noise=read_noise[k], other=other)

    workers = max(1, min(int(threads), len(jobs)))
    if workers == 1:
        done = [one(job) for job in jobs]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zogy-regions") as ex:
            done = list(ex.map(one, jobs))
    n = len(boxes)
    return done[:n], done[n:]


def read_regions(reader, boxes, mask_reader=None) -> list[tuple]:
    """``(data, bad)`` of each box: float32 pixels, and the user's mask (or None)."""
    out = []
    for box in boxes:
        data = np.array(reader.read(box), dtype=np.float32)
        reader.release(box)
        bad = None
        if mask_reader is not None:
            bad = np.asarray(mask_reader.read(box)) != 0
            mask_reader.release(box)
        out.append((data, bad))
    return out


def region_catalogue(box, data, bad, *, label: str, saturation: float, gain: float | None,
                     cosmic_rays: bool = False, sigma: float | None = None,
                     read_noise: float | None = None, other=None) -> RegionStars:
    """The star catalogue of one region of an image (see :func:`region_stars`).

    ``data`` are the region's float32 pixels, ``bad`` its user mask (or None)
    and ``other`` the other image's pixels in the same box (or None).  Pure
    function of its arguments: regions can be measured in threads.
    """
    from astropy.table import Table

    from .stars import background_maps, find_stars

    sat = saturation if math.isfinite(saturation) else None
    if cosmic_rays:
        from .cosmics import drop_coincident, exposure_cosmic_rays

        cr = exposure_cosmic_rays(data, sigma=sigma, gain=gain, read_noise=read_noise,
                                  saturation=sat, bad=bad)
        if other is not None and cr.any():
            cr = drop_coincident(cr, other)
        log.info("%s: %d cosmic-ray pixel(s) masked for the star catalogue of region %s",
                 label, int(cr.sum()), box)
        bad = cr if bad is None else bad | cr
    back = rms = None
    try:
        back, rms = background_maps(data, saturation=sat, mask=bad, threshold=STAR_THRESHOLD)
        cat = find_stars(data, saturation=sat, gain=gain, threshold=STAR_THRESHOLD,
                         background=back, rms=rms, mask=bad)
    except (ProcessingError, InputError) as exc:
        log.info("%s: no stars in region %s (%s)", label, box, exc)
        cat = Table(names=("x", "y", "flux", "flux_err", "snr"))
    return RegionStars(box, data, cat, saturation=sat, back=back, rms=rms, mask=bad)


def drop_extended_matches(new_regions, ref_regions, *, factor: float = 1.5) -> int:
    """Unflag as ``star_like`` the sources that the other image shows extended.

    A point source is point-like in both images; in a field with few stars
    and some galaxies, an image's stellar locus can fall on the galaxies
    (or a galaxy pass the star cut), while the other image -- with a
    different PSF, or the new image's transients as its point sources -- has
    them clearly broader than its own point sources.  A source whose match
    (within 2 px, S/N >= 10) in the other image is more than ``factor``
    times that image's stellar locus is marked ``star_like = False``.
    Returns the number of sources unflagged (the catalogues are changed in place).
    """
    from .stars import match_stars

    n = 0
    if len(new_regions) != len(ref_regions):
        return 0
    for rn, rr in zip(new_regions, ref_regions):
        cats = (rn.cat, rr.cat)
        if any(len(c) == 0 or "star_like" not in c.colnames for c in cats):
            continue
        ia, ib = match_stars(cats[0], cats[1], radius=2.0)
        for (c, ii), (o, jj) in (((cats[0], ia), (cats[1], ib)), ((cats[1], ib), (cats[0], ia))):
            locus = float(o.meta.get("fwhm", np.nan))
            if not np.isfinite(locus):
                continue
            wide = ((np.asarray(o["fwhm"])[jj] > factor * locus)
                    & (np.asarray(o["snr"])[jj] >= 10) & np.asarray(c["star_like"], bool)[ii])
            if wide.any():
                c["star_like"][ii[wide]] = False
                n += int(wide.sum())
    if n:
        log.info("%d source(s) unflagged as stars: extended in the other image", n)
    return n


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
                        psf_size: int | None, local: bool, shape=None) -> PsfSource:
    """Mosaic-wide PSF: the mean of the PSFs of the sampled regions.

    With ``local`` and the image's ``shape`` given, the stacked stars of all
    the regions are also fitted with a PSF varying linearly across the field
    (:func:`zogy_stream.psffield.fit_psf_field`), which tiles with too few
    stars of their own use instead of the mean (the plan bounds the kernels'
    reach with :func:`outer_tile_centres`).

    Raises
    ------
    ProcessingError
        No region has enough usable stars.
    """
    from .stars import estimate_psf

    sat = saturation if math.isfinite(saturation) else None
    psfs, infos, n_used = [], [], 0
    for r in regions:
        if len(r.cat) == 0:
            continue
        try:
            psf, info = estimate_psf(r.data, size=psf_size, saturation=sat, stars=r.cat,
                                     min_stars=MIN_GLOBAL_STARS, snr_min=15.0,
                                     background=r.back, rms=r.rms, mask=r.mask)
        except (ProcessingError, InputError) as exc:
            log.info("%s: no PSF from region %s (%s)", label, r.box, exc)
            continue
        psfs.append(psf)
        infos.append((r.box, info))
        r.psf = psf
        n_used += int(info["n_stars"])
    if not psfs:
        return _model_psf_source(regions, label, sat=sat, psf_size=psf_size, local=local)
    size = psf_size or max(p.shape[0] for p in psfs)
    padded = [pad_psf(p, size) for p in psfs]
    mean = np.mean(padded, axis=0)
    mean /= mean.sum()
    largest = max(padded, key=psf_fwhm)
    fld = _psf_field(infos, size, shape) if local and shape is not None else None
    log.info("%s: mosaic-wide PSF from %d stars in %d region(s), FWHM %.2f px (largest %.2f), "
             "size %d%s", label, n_used, len(psfs), psf_fwhm(mean), psf_fwhm(largest), size,
             "; it varies across the field (fitted to all of them)" if fld is not None else "")
    return PsfSource(label, "auto", mean, largest, size=size, local=local, n_stars=n_used,
                     field_model=fld, method="stars")


def outer_tile_centres(shape, tile: int) -> list[tuple[float, float]]:
    """``(x, y)`` of the outermost tile-core centres, half a core in from the borders.

    Where a field-varying PSF is most extreme for the tiles that use it.
    """
    ny, nx = shape
    h = 0.5 * tile
    xs = sorted({min(h, 0.5 * (nx - 1)), max(nx - 1 - h, 0.5 * (nx - 1))})
    ys = sorted({min(h, 0.5 * (ny - 1)), max(ny - 1 - h, 0.5 * (ny - 1))})
    return [(x, y) for y in ys for x in xs]


def _psf_field(infos, size: int, shape):
    """The field-varying PSF of the regions' stacked stars (None: not significant)."""
    from .psffield import _pad_stamps, fit_psf_field

    stamps, xs, ys, fw = [], [], [], []
    for box, info in infos:
        st = info.get("stamps")
        if st is None or not len(st):
            continue
        stamps.append(_pad_stamps(np.asarray(st), size))
        xs.append(info["xy"][:, 0] + box.x0)
        ys.append(info["xy"][:, 1] + box.y0)
        fw.append(info["fwhm_stars"])
    if not stamps:
        return None
    return fit_psf_field(np.concatenate(stamps), np.concatenate(xs), np.concatenate(ys),
                         fwhm=float(np.median(fw)), half_size=0.5 * max(shape))


def _sharp_fwhm(cat) -> float:
    """FWHM of the third-sharpest well-measured source (S/N >= 10) of a catalogue.

    No source is sharper than the PSF, so no PSF is much broader than this
    (the third, so that a cosmic ray or two cannot set it; inf when fewer
    than three such sources).
    """
    from .stars import _BAD_FLAGS, _LOCUS_MIN_FWHM

    if len(cat) == 0 or "fwhm" not in cat.colnames:
        return math.inf
    fw = np.asarray(cat["fwhm"], np.float64)
    with np.errstate(invalid="ignore"):
        ok = ((np.asarray(cat["snr"], np.float64) >= 10) & (fw >= _LOCUS_MIN_FWHM)
              & ((np.asarray(cat["flag"]) & _BAD_FLAGS) == 0)
              & ~np.asarray(cat["saturated"], bool))
    fw = np.sort(fw[ok])
    return float(fw[2]) if len(fw) >= 3 else math.inf


def _model_psf_source(regions, label: str, *, sat, psf_size, local,
                      beta: float | None = None) -> PsfSource:
    """Too few stars for an empirical PSF anywhere: a Moffat fitted to the few there are.

    Each region's stars give a Moffat FWHM and beta
    (:func:`zogy_stream.stars.fit_psf_model`); their star-weighted means
    define the mosaic-wide PSF.  Tiles then use it too (there are not enough
    stars for local PSFs either).  With ``beta`` only the FWHM is fitted
    (:func:`share_moffat_beta`).

    Raises
    ------
    ProcessingError
        Not a single usable star.
    """
    from .stars import fit_psf_model, moffat_image

    beta_fixed = beta
    fits_, reasons = [], []
    for snr_min in MODEL_STAR_SNR:  # the brightest stars there are
        for r in regions:
            if len(r.cat) == 0:
                continue
            try:
                _, info = fit_psf_model(r.data, stars=r.cat, saturation=sat, size=psf_size,
                                        background=r.back, rms=r.rms, snr_min=snr_min,
                                        mask=r.mask, beta=beta)
            except (ProcessingError, InputError) as exc:
                reasons.append(str(exc))
                continue
            sharp = _sharp_fwhm(r.cat)
            if info["fwhm"] > MAX_MODEL_FWHM_SPREAD * sharp:
                reasons.append(f"a Moffat of FWHM {info['fwhm']:.2f} px is broader than "
                               f"{MAX_MODEL_FWHM_SPREAD} x the sharp sources ({sharp:.2f} px): "
                               "its stars are galaxies")
                log.info("%s: region %s: %s", label, r.box, reasons[-1])
                continue
            fits_.append(info)
        if fits_:
            break
    if not fits_:
        n = usable_star_count(regions)
        raise ProcessingError(f"cannot estimate the PSF of {label}: only {n} usable stars; "
                              f"give --{label.lower()}-psf")
    # point sources are the sharpest sources: a region whose few "stars" give a far
    # broader profile than another region's took galaxies for stars
    sharpest = min(f["fwhm"] for f in fits_)
    broad = [f for f in fits_ if f["fwhm"] > MAX_MODEL_FWHM_SPREAD * sharpest]
    if broad:
        log.info("%s: Moffat fits of FWHM %s px left out (> %.1f x the sharpest, %.2f px)",
                 label, ", ".join(f"{f['fwhm']:.2f}" for f in broad), MAX_MODEL_FWHM_SPREAD,
                 sharpest)
        fits_ = [f for f in fits_ if f["fwhm"] <= MAX_MODEL_FWHM_SPREAD * sharpest]
    w = np.array([f["n_stars"] for f in fits_], float)
    fwhm = float(np.sum(w * [f["fwhm"] for f in fits_]) / w.sum())
    beta = float(np.exp(np.sum(w * np.log([f["beta"] for f in fits_])) / w.sum()))
    size = psf_size or int(np.clip(int(round(6.0 * fwhm)) // 2 * 2 + 1, 15, 63))
    psf = moffat_image(fwhm, beta, size)
    n_used = int(w.sum())
    # INFO: the caller warns about the fallback it keeps (fill_psfs_through_other may
    # replace it)
    log.info("%s: too few stars for an empirical PSF; Moffat profile (FWHM %.2f px, "
             "beta %.2f%s) fitted to %d star(s) of S/N >= %g", label, fwhm, beta,
             "" if beta_fixed is None else " given", n_used, snr_min)
    return PsfSource(label, "auto", psf, psf, size=size, local=False, n_stars=n_used,
                     moffat=(fwhm, beta, n_used, snr_min), method="moffat")


#: A Moffat fallback fitted to fewer stars than this, or below the first S/N tier of
#: MODEL_STAR_SNR, has a poorly constrained beta (see :func:`share_moffat_beta`)
SHAPE_MIN_STARS = 3


def _moffat_beta_of(psf: np.ndarray) -> float | None:
    """Moffat ``beta`` of a (noise-free) PSF image (None when no Moffat fits)."""
    from .stars import fit_moffat_profile

    p = np.asarray(psf, np.float64) / np.sum(psf)
    fit = fit_moffat_profile(p, np.ones_like(p), psf_fwhm(p))
    return None if fit is None else fit["beta"]


def _shape_strength(src: PsfSource) -> tuple:
    """How well a PSF's shape is known: an empirical or given PSF beats any Moffat
    fallback, which ranks by its S/N tier, then its star count."""
    if src.moffat is None:
        return (1, 0.0, 0)
    return (0, src.moffat[3], src.moffat[2])


def share_moffat_beta(src_n: PsfSource, src_r: PsfSource, regions_n, regions_r, *,
                      saturation, psf_size) -> tuple[PsfSource, PsfSource]:
    """Refit a weakly constrained Moffat fallback with the other image's ``beta``.

    A Moffat fitted to one or two faint stars gets its FWHM right but its
    ``beta`` (the wings) from noise, and the wings set the flux scale of
    everything fitted with it: on a star-poor simulated pair (80 stars per
    Mpix, Gaussian PSFs, seed 3) the reference's Moffat from 1 star at S/N >= 7
    had beta 3.35, and the transients' FLUX/true was 1.096 with F_n/F_r 2.4 %
    low; refitted with the new image's beta (42, from 3 stars at S/N >= 20)
    1.079 and 0.6 % low.  The two images of a pair come from one sky and usually one
    instrument, so the better-known shape is the better prior.  A fallback is
    weak when fitted to fewer than :data:`SHAPE_MIN_STARS` stars or below the
    first S/N tier; the donor must rank higher (:func:`_shape_strength`): an
    empirical or given PSF (its beta fitted to its image) or a Moffat fitted
    at a higher tier or to more stars.  Returns the two sources, one refitted
    at most.
    """
    pair = [src_n, src_r]
    regions = (regions_n, regions_r)
    sat = tuple(v if math.isfinite(v) else None for v in saturation)
    for k in (0, 1):
        weak, donor = pair[k], pair[1 - k]
        m = weak.moffat
        if (m is None or regions[k] is None
                or (m[2] >= SHAPE_MIN_STARS and m[3] >= MODEL_STAR_SNR[0])
                or _shape_strength(donor) <= _shape_strength(weak)):
            continue
        beta = donor.moffat[1] if donor.moffat is not None else _moffat_beta_of(donor.psf)
        if beta is None:
            break
        log.info("%s: the Moffat beta %.2f from %d star(s) of S/N >= %g is poorly constrained; "
                 "refitting the FWHM with %s's beta %.2f", weak.label, m[1], m[2], m[3],
                 donor.label, beta)
        try:
            pair[k] = _model_psf_source(regions[k], weak.label, sat=sat[k], psf_size=psf_size,
                                        local=False, beta=beta)
        except ProcessingError as exc:
            log.info("%s: refit failed (%s); keeping beta %.2f", weak.label, exc, m[1])
        break
    return pair[0], pair[1]


#: S/N tiers, in turn, of the sources (stars and galaxies) matched in both images that
#: an image's PSF is fitted through the other's (:func:`cross_psf_source`)
CROSS_PSF_SNR = (20.0, 10.0)
#: at most this many (the brightest) matched sources per region for that fit
MAX_CROSS_PSF_SOURCES = 100
#: Moffat beta of that fit when the known PSF's cannot be measured (typical seeing)
DEFAULT_BETA = 4.765


def _cross_stamps(region_u: RegionStars, region_k: RegionStars, *, gains, snr_min,
                  half: int, pad: int):
    """Stamps of the sources matched in one region of both images (see cut_stamps)."""
    from .crosspsf import cut_stamps
    from .stars import _BAD_FLAGS, match_stars

    cu, ck = region_u.cat, region_k.cat
    if (region_u.box != region_k.box or len(cu) == 0 or len(ck) == 0
            or region_u.back is None or region_k.back is None
            or any(n not in c.colnames for c in (cu, ck)
                   for n in ("snr", "fwhm", "flag", "saturated"))):
        return None
    iu, ik = match_stars(cu, ck, radius=2.0)
    if len(iu) == 0:
        return None
    good = np.ones(len(iu), bool)
    for c, ii in ((cu, iu), (ck, ik)):
        with np.errstate(invalid="ignore"):
            good &= ((np.asarray(c["snr"], np.float64)[ii] >= snr_min)
                     & ~np.asarray(c["saturated"], bool)[ii]
                     & ((np.asarray(c["flag"])[ii] & _BAD_FLAGS) == 0))
    iu, ik = iu[good], ik[good]
    order = np.argsort(-np.asarray(cu["snr"], np.float64)[iu])[:MAX_CROSS_PSF_SOURCES]
    iu, ik = iu[order], ik[order]
    x = 0.5 * (np.asarray(cu["x"], np.float64)[iu] + np.asarray(ck["x"], np.float64)[ik])
    y = 0.5 * (np.asarray(cu["y"], np.float64)[iu] + np.asarray(ck["y"], np.float64)[ik])
    planes = []
    bad = np.zeros(region_u.data.shape, bool)
    for r, gain in ((region_k, gains[0]), (region_u, gains[1])):
        sub = np.asarray(r.data, np.float64) - r.back
        var = np.asarray(r.rms, np.float64) ** 2
        if gain:
            var = var + np.clip(sub, 0.0, None) / gain  # source Poisson noise
        planes += [sub, var]
        if r.mask is not None:
            bad |= r.mask
        if r.saturation is not None:
            bad |= r.data >= r.saturation
    k, u, vk, vu, used = cut_stamps(planes[0], planes[2], planes[1], planes[3], x, y,
                                    half=half, pad=pad, bad=bad)
    fw_u = np.asarray(cu["fwhm"], np.float64)[iu][used]
    return k, u, vk, vu, fw_u


def cross_psf_source(weak_label: str, regions_u, regions_k, known: PsfSource, *,
                     gains=(None, None), psf_size: int | None = None) -> PsfSource:
    """The PSF of an image without usable stars, fitted through the other image.

    Every static source -- galaxies too -- obeys ``N (x) P_r = F * R (x) P_n``,
    so with the ``known`` PSF of one image, a Moffat profile of its ``beta``
    whose FWHM makes the two sides agree on the sources matched in both
    images (S/N >= 20, else >= 10, unsaturated) is the other image's PSF
    (:func:`zogy_stream.crosspsf.fit_cross_psf`).  The FWHM tried is at most
    1.2 x the sharpest of those sources in the image (no source is sharper
    than its PSF).

    Parameters
    ----------
    weak_label : str
        ``NEW`` or ``REF``: the image whose PSF is fitted (``regions_u``).
    regions_u, regions_k : list of RegionStars
        The sampled regions of that image and of the other one (same boxes).
    known : PsfSource
        The other image's PSF (given, PSFEx or stacked from its stars).
    gains : (float or None, float or None)
        Gains of the known and the unknown image (source Poisson noise).
    psf_size : int, optional
        Odd side of the returned PSF (default 6 x FWHM, clipped to [15, 63]).

    Returns
    -------
    PsfSource
        ``kind`` ``auto``, ``method`` ``cross``, mosaic-wide (``local`` False).

    Raises
    ------
    ProcessingError
        Too few matched sources, or they do not constrain the FWHM.
    """
    from .crosspsf import MIN_SOURCES, fit_cross_psf
    from .stars import _odd, moffat_image

    psf_k = odd_square(known.psf / np.sum(known.psf))  # given PSFs may be even or oblong
    fw_k = psf_fwhm(psf_k)
    beta = known.moffat[1] if known.moffat is not None else _moffat_beta_of(psf_k)
    if beta is None or not 1.0 < beta < 1e3:
        beta = DEFAULT_BETA
    half = int(np.clip(math.ceil(3.0 * fw_k), 8, 24))
    reason = "no matched sources"
    for snr_min in CROSS_PSF_SNR:
        hi = min(4.0 * fw_k, 10.5)  # trial profiles of at most 63 px
        size = int(np.clip(_odd(6.0 * hi), 15, 63))
        pad = max(size, psf_k.shape[0]) // 2
        parts = [p for ru, rk in zip(regions_u, regions_k)
                 if (p := _cross_stamps(ru, rk, gains=gains, snr_min=snr_min,
                                        half=half, pad=pad)) is not None and len(p[0])]
        if not parts or sum(len(p[0]) for p in parts) < MIN_SOURCES:
            reason = (f"{sum(len(p[0]) for p in parts)} clean matched source(s) of S/N >= "
                      f"{snr_min:g}, need {MIN_SOURCES}")
            continue
        k, u, vk, vu, fw_u = (np.concatenate([p[i] for p in parts]) for i in range(5))
        with np.errstate(invalid="ignore"):
            sharp = fw_u[np.isfinite(fw_u) & (fw_u > 0)]
        if len(sharp):
            hi = min(hi, 1.2 * float(np.min(sharp)))
        lo = 0.6
        if hi <= lo * 1.5:
            reason = f"the sharpest matched source ({hi / 1.2:.2f} px) leaves no FWHM to fit"
            continue
        try:
            fit = fit_cross_psf(k, u, vk, vu, psf_k, half=half, beta=float(beta),
                                fwhm_bounds=(lo, hi), size=size)
        except ProcessingError as exc:
            reason = str(exc)
            continue
        fwhm = fit["fwhm"]
        out_size = psf_size or int(np.clip(_odd(6.0 * fwhm), 15, 63))
        psf = moffat_image(fwhm, float(beta), out_size)
        log.warning("%s: too few stars of its own; PSF fitted through %s's PSF to %d "
                    "source(s) matched in both images (S/N >= %g, %d rejected): Moffat FWHM "
                    "%.2f +- %.2f px, beta %.2f", weak_label, known.label, fit["n_sources"], snr_min,
                    fit["n_rejected"], fwhm, fit["fwhm_err"], beta)
        return PsfSource(weak_label, "auto", psf, psf, size=out_size, local=False,
                         n_stars=int(fit["n_sources"]), method="cross")
    raise ProcessingError(f"cannot fit the PSF of {weak_label} through {known.label}'s: "
                          f"{reason}")


def _weak_moffat(m) -> bool:
    """A Moffat fallback ``(fwhm, beta, n_stars, snr_min)`` of few or faint stars."""
    return m[2] < SHAPE_MIN_STARS or m[3] < MODEL_STAR_SNR[0]


def fill_psfs_through_other(src_n: PsfSource | None, src_r: PsfSource | None,
                            regions_n, regions_r, *, errors=(None, None), gains=(None, None),
                            psf_size: int | None = None) -> tuple[PsfSource, PsfSource]:
    """Replace a missing or weak Moffat-fallback PSF by one fitted through the other image.

    An image's PSF that could not be estimated (``None``, its ``errors``
    entry says why), or is a Moffat fitted to fewer than
    :data:`SHAPE_MIN_STARS` stars or below S/N 20, is fitted by
    :func:`cross_psf_source` when the other image's PSF is known better
    (given, PSFEx, or stacked from enough stars; for a missing PSF, a
    Moffat fallback too).  A Moffat of 3 or more stars of S/N >= 20 is kept:
    on a star-poor simulated pair (80 stars per Mpix, seed 4) one of FWHM
    3.01 px (truth 3.0) beat the fit through the other image (2.90 +- 0.13 px
    from 3 sources).  A failed fit keeps the Moffat, or raises the original
    error (with the fit's reason) for a missing PSF.  Returns the two sources.

    Raises
    ------
    ProcessingError
        A PSF is missing and cannot be fitted either.
    """
    pair = [src_n, src_r]
    regions = (regions_n, regions_r)
    labels = ("NEW", "REF")
    for k in (0, 1):
        weak, donor = pair[k], pair[1 - k]
        if weak is not None and (weak.moffat is None or not _weak_moffat(weak.moffat)):
            continue
        if weak is None and donor is None:
            raise errors[k] or ProcessingError(f"cannot estimate the PSF of {labels[k]}; "
                                               f"give --{labels[k].lower()}-psf")
        reason = None
        # a Moffat fallback is a donor only when there is nothing else
        if donor is None or (donor.moffat is not None and weak is not None) \
                or regions[k] is None or regions[1 - k] is None:
            reason = f"{labels[1 - k]}'s PSF is not known well enough to fit it through"
        else:
            gk = (gains[1 - k], gains[k])
            try:
                pair[k] = cross_psf_source(labels[k], regions[k], regions[1 - k], donor,
                                           gains=gk, psf_size=psf_size)
                if weak is not None:
                    log.info("%s: instead of the Moffat fallback of FWHM %.2f px from %d "
                             "star(s) of S/N >= %g", labels[k], weak.moffat[0], weak.moffat[2],
                             weak.moffat[3])
                continue
            except ProcessingError as exc:
                reason = str(exc)
        if weak is None:
            first = str(errors[k] or f"cannot estimate the PSF of {labels[k]}").split("; give")[0]
            raise ProcessingError(f"{first.rstrip('.')} (and {reason}); give "
                                  f"--{labels[k].lower()}-psf") from None
        log.info("%s: keeping the Moffat fallback (%s)", labels[k], reason)
    return pair[0], pair[1]


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


def _region_psf(src: PsfSource | None, region: RegionStars) -> np.ndarray | None:
    """The PSF the subtraction uses around ``region``: its own estimate, or the source's."""
    if region.psf is not None:
        return region.psf
    if src is None:
        return None
    if src.kind == "psfex":
        b = region.box
        return src.model.evaluate(0.5 * (b.x0 + b.x1 - 1), 0.5 * (b.y0 + b.y1 - 1),
                                  size=src.size)
    return odd_square(src.psf)


def odd_square(psf: np.ndarray) -> np.ndarray:
    """``psf`` on an odd square grid, its centre pixel ``(ny // 2, nx // 2)`` in the middle.

    Given PSF images may be even-sized or rectangular; nothing is cropped.
    """
    if psf.shape[0] % 2 == 1 and psf.shape[0] == psf.shape[1]:
        return psf
    ny, nx = psf.shape
    n = max(ny, nx) // 2 * 2 + 1
    out = np.zeros((n, n))
    y0, x0 = n // 2 - ny // 2, n // 2 - nx // 2
    out[y0:y0 + ny, x0:x0 + nx] = psf
    return out


def _common_star_psfs(rn: RegionStars, rr: RegionStars
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """PSFs of one region of NEW and REF stacked from the same stars.

    Both regions' own PSFs are stacks of their own PSF stars
    (:func:`zogy_stream.stars.estimate_psf`), and isolation, S/N and shape
    cuts differ between two images, so the two sets overlap only partly (in
    simulated 1 Mpix scenes 17-26 of 20-33 stars).  Where the PSF varies
    across the region, each stack is the PSF averaged over its own stars'
    positions, and a different average in the two images biases the ratio of
    PSF-fit fluxes: by up to 3 % with FWHMs varying +-15 % across the field,
    even for noise-free stacks.  Stacking only stars usable in both images
    (matched within 2 px) makes the two averages cover the same positions,
    which cut that error to under 1 %.

    Returns None when either image lacks its own estimated PSF for the region,
    the boxes differ, or there are too few common stars.
    """
    from .stars import estimate_psf, match_stars, psf_star_mask

    if rn.psf is None or rr.psf is None or rn.box != rr.box or len(rn.cat) == 0 \
            or len(rr.cat) == 0:
        return None
    snr_min = 15.0  # as for the regions' PSFs (estimate_global_psf)
    try:
        ia, ib = match_stars(rn.cat, rr.cat, radius=2.0)
        both = psf_star_mask(rn.cat, snr_min)[ia] & psf_star_mask(rr.cat, snr_min)[ib]
        out = []
        for r, ii in ((rn, ia), (rr, ib)):
            cat = r.cat.copy(copy_data=True)
            common = np.zeros(len(cat), bool)
            common[ii[both]] = True
            cat["star_like"] = np.asarray(cat["star_like"], bool) & common
            psf, _ = estimate_psf(r.data, size=r.psf.shape[0], saturation=r.saturation,
                                  stars=cat, min_stars=MIN_GLOBAL_STARS, snr_min=snr_min,
                                  background=r.back, rms=r.rms, mask=r.mask)
            out.append(psf)
    except (ProcessingError, InputError) as exc:
        log.info("region %s: flux-ratio PSFs from each image's own stars (%s)", rn.box,
                 str(exc).split(";")[0])
        return None
    log.debug("region %s: flux-ratio PSFs from %d common stars", rn.box, int(both.sum()))
    return out[0], out[1]


def _add_psf_fluxes(regions, src: PsfSource | None, gain, snr_min: float,
                    psfs=None) -> bool:
    """PSF fluxes (``psf_flux``, ``psf_flux_err``) of each region's usable stars.

    ``psfs`` (one array or None per region) overrides the region's PSF.
    """
    from .stars import psf_photometry

    done = False
    for k, r in enumerate(regions):
        c = r.cat
        if len(c) == 0 or "star_like" not in c.colnames:
            continue
        psf = psfs[k] if psfs is not None and psfs[k] is not None else _region_psf(src, r)
        c["psf_flux"] = np.full(len(c), np.nan)
        c["psf_flux_err"] = np.full(len(c), np.nan)
        if psf is None:
            continue
        # point sources only: galaxies and blends are among the brightest isolated
        # sources, and a PSF fit of an extended source takes a different fraction of
        # its light under a narrow and a broad PSF (ratios of 1.5-3 for a true 1.2)
        use = (~np.asarray(c["saturated"], bool) & np.asarray(c["isolated"], bool)
               & np.asarray(c["star_like"], bool) & (np.asarray(c["snr"]) >= snr_min))
        if not use.any():
            continue
        idx = np.nonzero(use)[0]
        idx = idx[np.argsort(-np.asarray(c["snr"])[idx])][:MAX_RATIO_STARS]  # bounded cost
        rms = float(c.meta.get("background_rms", np.nan))
        if not rms > 0:
            continue
        f, e, ok = psf_photometry(r.data, np.asarray(c["x"])[idx], np.asarray(c["y"])[idx],
                                  psf, rms=rms, gain=gain, mask=r.mask)
        c["psf_flux"][idx[ok]] = f[ok]
        c["psf_flux_err"][idx[ok]] = e[ok]
        done = done or bool(ok.any())
    return done


def fit_global_flux_ratio(new_regions, ref_regions, *, psfs=None, gains=(None, None),
                          snr_min: float = 10.0) -> tuple[float, float, int, str]:
    """``(ratio, err, n_sources, source)``; ``(1.0, nan, 0, 'default')`` when too few sources.

    ``F_n/F_r`` is the ratio of the total fluxes of static sources in NEW and
    REF.  It is measured first in images given one common PSF
    (:func:`_fit_cross_convolved`: NEW convolved with REF's PSF and REF with
    NEW's, every isolated, unsaturated source of ``S/N >= snr_min`` in both,
    stars and galaxies, in an aperture that holds nearly all the light).  A
    PSF-fit ratio is only as good as the PSF models: with estimated PSFs, a
    model that misses a different part of the light in the two images biases it
    (on the 33 off-nominal simulated scenes, images only: RMS error 1.67 %,
    3 runs beyond 3 %; the cross-convolved apertures: 0.88 %, none beyond
    1.6 %; with PSFEx models 0.59 -> 0.48 %, with the true PSFs 0.74 -> 0.76 %).

    Stars are also fitted with the PSFs (``psfs``: the two :class:`PsfSource`,
    or regions that carry their own estimated PSF;
    :func:`zogy_stream.stars.psf_photometry`), where both images' PSFs were
    estimated re-stacked from the stars usable in both
    (:func:`_common_star_psfs`).  That ratio is used instead when the
    cross-convolved one has fewer than :data:`MIN_RATIO_SOURCES` sources, or
    a larger error than the PSF fit's (of 5 or more stars, else of the 2-4
    there are) combined with :data:`PSF_RATIO_SYSTEMATIC` (few sources, noisy
    apertures: +-8 % against +-0.4 % on a small real DECam pair).  With fewer
    than 5 of both, the more precise of the few cross-convolved sources and the
    few stars is used, with a warning.  The fits are robust (see
    :func:`zogy_stream.stars.fit_flux_ratio`).
    """
    from functools import partial

    from .stars import fit_flux_ratio

    def use_cross(psf_fit=None):
        ratio, err, n = cross
        log.info("flux ratio F_n/F_r = %.4f +- %.4f from %d matched stars and galaxies in "
                 "cross-convolved images%s", ratio, err, n, "" if psf_fit is None else
                 " (PSF fits of %d stars: %.4f +- %.4f)" % (psf_fit[2], psf_fit[0], psf_fit[1]))
        return float(ratio), float(err), int(n), "auto"

    psfs = psfs or (None, None)
    cross = _fit_cross_convolved(new_regions, ref_regions, psfs, snr_min)
    regular = cross is not None and cross[2] >= MIN_RATIO_SOURCES and np.isfinite(cross[1])
    if regular and cross[1] <= PSF_RATIO_SYSTEMATIC * cross[0]:
        # a PSF fit's error, which includes PSF_RATIO_SYSTEMATIC, could only be
        # smaller by the two ratios' difference: skip re-stacking the PSFs and
        # the PSF photometry
        return use_cross()
    fit = partial(fit_flux_ratio, snr_min=snr_min)
    common = [_common_star_psfs(rn, rr) for rn, rr in zip(new_regions, ref_regions)] \
        if len(new_regions) == len(ref_regions) else []
    own_n = [c[0] if c is not None else None for c in common] or None
    own_r = [c[1] if c is not None else None for c in common] or None
    if (_add_psf_fluxes(new_regions, psfs[0], gains[0], snr_min, own_n)
            and _add_psf_fluxes(ref_regions, psfs[1], gains[1], snr_min, own_r)):
        fit = partial(fit_flux_ratio, snr_min=snr_min, columns=("psf_flux", "psf_flux_err"),
                      aperture_correction=False)
    res, reason = _fit_matched(new_regions, ref_regions, fit)
    few = None
    if res is None:  # the few stars there are (2-4), for the comparisons below
        few, _ = _fit_matched(new_regions, ref_regions,
                              partial(fit, min_stars=MIN_FEW_RATIO_STARS))
    psf_fit = res if res is not None else few
    if regular and (psf_fit is None or not np.isfinite(psf_fit[1])
                    or cross[1] <= math.hypot(psf_fit[1], PSF_RATIO_SYSTEMATIC * psf_fit[0])):
        return use_cross(psf_fit)
    if psf_fit is not None and regular:
        log.info("flux ratio: PSF fits preferred to cross-convolved images (%.4f +- %.4f "
                 "from %d sources)", *cross)
    if res is None:
        # Too few sources for the regular fit.  Two fallbacks, the more precise one
        # wins: the few sources in the cross-convolved images; and the few stars
        # there are, whose (weighted, clipped) ratio is still far closer to the truth
        # than 1.0, which would leave every star of the frame as a residual.
        what = "matched stars"
        cross_better = cross is not None and np.isfinite(cross[1]) and not (
            few is not None and few[1] <= cross[1])
        if cross_better or few is None:
            res = cross
            if cross is not None:
                what = "matched stars and galaxies in cross-convolved images"
        else:
            res = few
        if res is not None:
            log.warning("flux ratio F_n/F_r = %.4f +- %.4f from only %d %s (%s); check it, or "
                        "give --flux-ratio", res[0], res[1], res[2], what, reason.split(";")[0])
    if res is None:
        log.warning("cannot fit the flux ratio (%s); using 1.0 (give --flux-ratio)", reason)
        return 1.0, float("nan"), 0, "default"
    ratio, err, n = res
    log.info("flux ratio F_n/F_r = %.4f +- %.4f from %d matched stars (PSF fits)", ratio, err, n)
    return float(ratio), float(err), int(n), "auto"


def _fit_cross_convolved(new_regions, ref_regions, psfs, snr_min: float, *,
                         min_sources: int = MIN_CROSS_RATIO_SOURCES
                         ) -> tuple[float, float, int] | None:
    """Flux ratio from every matched, isolated, unsaturated source (stars and galaxies).

    Each region of NEW is convolved with REF's PSF and vice versa
    (:func:`zogy_stream.stars.cross_convolved_photometry`), so that every
    static source, star or galaxy, has one profile in both, ``P_n (x) P_r``
    times its own, and the ratio of its fluxes in a common aperture is
    ``F_n / F_r``.  The aperture is :data:`CROSS_APERTURE` times the FWHM of
    ``P_n (x) P_r`` for every source: it holds nearly all of a star's light, so
    the ratio hardly depends on how well the PSFs' wings were estimated, and a
    neighbour's light in it scales by the same ratio.  The ratios are combined
    as the stars' are (:func:`zogy_stream.stars.fit_flux_ratio`, at least
    ``min_sources``).  ``None`` when that is not possible.
    """
    from astropy.table import Table

    from .stars import (contaminated_sources, cross_convolved_photometry, fit_flux_ratio,
                        match_stars)

    if len(new_regions) != len(ref_regions):
        return None
    psfs = psfs or (None, None)
    parts = []
    n_changed = 0
    for rn, rr in zip(new_regions, ref_regions):
        cn, cr = rn.cat, rr.cat
        need = ("star_like", "isolated", "saturated", "flag", "fwhm", "snr")
        if (len(cn) == 0 or len(cr) == 0 or rn.back is None or rr.back is None
                or any(c not in cat.colnames for c in need for cat in (cn, cr))):
            continue
        pn, pr = _region_psf(psfs[0], rn), _region_psf(psfs[1], rr)
        if pn is None or pr is None:
            continue
        ia, ib = match_stars(cn, cr, radius=2.0)
        ok = np.ones(len(ia), bool)
        for c, ii in ((cn, ia), (cr, ib)):
            ok &= (np.asarray(c["isolated"], bool)[ii] & ~np.asarray(c["saturated"], bool)[ii]
                   & (np.asarray(c["flag"])[ii] == 0) & (np.asarray(c["snr"])[ii] >= snr_min))
        ia, ib = ia[ok], ib[ok]
        if len(ia) == 0:
            continue
        fwhm_c = float(np.hypot(psf_fwhm(pn), psf_fwhm(pr)))
        radius = float(np.clip(CROSS_APERTURE * fwhm_c, 3.0, 40.0))
        inner = float(np.clip(CROSS_INNER * fwhm_c, 1.5, 0.8 * radius))
        # saturated pixels exclude the apertures they reach; masked ones (cosmic
        # rays, the user's mask) are filled from their neighbours where small
        masks = [None if r.saturation is None else np.asarray(r.data) >= r.saturation
                 for r in (rn, rr)]
        try:
            fn, en, fr, er, good, sums_in = cross_convolved_photometry(
                np.asarray(rn.data, np.float64) - rn.back,
                np.asarray(rr.data, np.float64) - rr.back, pn, pr,
                np.column_stack([np.asarray(cn["x"])[ia], np.asarray(cn["y"])[ia]]),
                np.column_stack([np.asarray(cr["x"])[ib], np.asarray(cr["y"])[ib]]),
                radius, rms_new=rn.rms, rms_ref=rr.rms, mask_new=masks[0], mask_ref=masks[1],
                fill_new=rn.mask, fill_ref=rr.mask, inner=inner)
        except InputError as exc:
            log.info("no cross-convolved photometry in %s (%s)", rn.box, exc)
            continue
        # a galaxy whose light changed where a transient sits on it (stars: a change
        # of the whole source, left to the fit's outlier rejection)
        extended = ~(np.asarray(cn["star_like"], bool)[ia] & np.asarray(cr["star_like"], bool)[ib])
        changed = np.zeros(len(ia), bool)
        test = good & extended
        changed[test] = contaminated_sources(fn[test], fr[test], sums_in[test])
        n_changed += int(changed.sum())
        good &= ~changed
        parts.append(np.column_stack([fn, en, fr, er])[good])
    if n_changed:
        log.info("flux ratio: %d extended source(s) left out, their inner and outer parts "
                 "changed by different factors (transients on galaxies?)", n_changed)
    if not parts:
        return None
    f = np.concatenate(parts)
    idx = np.arange(len(f), dtype=np.float64) * 10.0  # distinct positions: rows pair up
    tn = Table({"x": idx, "y": np.zeros(len(f)), "flux": f[:, 0], "flux_err": f[:, 1]})
    tr = Table({"x": idx, "y": np.zeros(len(f)), "flux": f[:, 2], "flux_err": f[:, 3]})
    try:
        return fit_flux_ratio(tn, tr, snr_min=snr_min, min_stars=min_sources,
                              isolated_only=False, point_sources=False,
                              aperture_correction=False)
    except (ProcessingError, InputError) as exc:
        log.info("no flux ratio from cross-convolved images (%s)", exc)
        return None


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
    from functools import partial

    from .stars import astrometric_sigma

    # three stars already tell a scatter of tenths of a pixel from none at all, and
    # V_ast only damps S_corr on the gradients of bright sources
    res, reason = _fit_matched(new_regions, ref_regions, partial(astrometric_sigma, min_stars=3))
    if res is None:
        log.warning("cannot estimate the astrometric sigma (%s); using 0 0", reason)
        return 0.0, 0.0, 0, "default"
    sx, sy, n = res
    log.info("astrometric sigma %.4f, %.4f px from %d matched stars", sx, sy, n)
    return float(sx), float(sy), int(n), "auto"


# ---------------------------------------------------------------- registration
def shift_psf(psf: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``psf`` moved by ``(+dx, +dy)`` pixels (cubic-spline interpolation), unit sum.

    A spline shift keeps the PSF compact; a Fourier shift of a PSF that is
    not band-limited rings over the whole stamp and widens the ZOGY kernels'
    support (and so the tile overlap) by half.  For shifts of a fraction of
    a pixel the two agree to ~0.1 % of the peak.  Returns ``psf`` itself when
    the shift is zero.
    """
    if dx == 0 and dy == 0:
        return psf
    from scipy import ndimage

    out = ndimage.shift(np.asarray(psf, np.float64), (float(dy), float(dx)), order=3,
                        mode="constant", cval=0.0)
    return out / out.sum()


def fit_registration(new_regions, ref_regions, *, nsigma: float = 3.0
                     ) -> tuple[float, float, float, float, int]:
    """Residual registration offset ``new - ref`` from matched stars.

    Returns ``(dx, dy, dx_err, dy_err, n)``; the offset is ``(0, 0)`` when it
    is not significant (neither axis beyond ``nsigma`` errors) or cannot be
    fitted (``n = 0``).
    """
    from functools import partial

    from .stars import registration_offset

    # a mean needs fewer stars than a scatter: the significance test guards it
    res, reason = _fit_matched(new_regions, ref_regions,
                               partial(registration_offset, min_stars=3))
    if res is None:
        log.info("no registration offset fitted (%s)", reason)
        return 0.0, 0.0, float("nan"), float("nan"), 0
    dx, dy, ex, ey, n = (float(v) for v in res)
    z = max(abs(dx) / ex if ex > 0 else math.inf * abs(dx),
            abs(dy) / ey if ey > 0 else math.inf * abs(dy))
    if not z > nsigma:
        log.info("registration offset (%.4f, %.4f) +- (%.4f, %.4f) px from %d stars is not "
                 "significant: not applied", dx, dy, ex, ey, int(n))
        return 0.0, 0.0, ex, ey, int(n)
    return dx, dy, ex, ey, int(n)


def register_psf(src_n: PsfSource, src_r: PsfSource, new_regions, ref_regions,
                 *, nsigma: float = 3.0) -> PsfSource:
    """NEW's PSF source with the residual registration offset folded into its PSFs.

    Two images registered to a fraction of a pixel still differ by a small
    global shift; left alone it turns every bright star into a dipole in D
    and S_corr.  ZOGY needs no resampling to undo it: the PSF of N on the
    common grid is N's own PSF displaced by the shift.  The offset ``delta``
    (mean ``x_new - x_ref`` of matched stars' windowed centroids, see
    :func:`zogy_stream.stars.registration_offset`) is applied when
    significant, as ``delta - (c_n - c_r)`` where ``c_n``, ``c_r`` are the
    windowed-centroid offsets of the two (mosaic-wide) PSFs from their
    centre pixels, measured the same way, so PSFs given off-centre are
    accounted for; estimated PSFs are centred to 0.02 px.

    Parameters
    ----------
    src_n, src_r : PsfSource
        PSF sources of NEW and REF.
    new_regions, ref_regions : list of RegionStars
        Star catalogues of the sampled regions (:func:`region_stars`).
    nsigma : float, optional
        Significance needed to apply the offset.

    Returns
    -------
    PsfSource
        ``src_n`` with ``shift`` set and ``psf``/``largest`` shifted (or
        ``src_n`` itself when nothing is applied).
    """
    import dataclasses

    from .stars import measure_psf

    dx, dy, ex, ey, n = fit_registration(new_regions, ref_regions, nsigma=nsigma)
    if dx == 0 and dy == 0:
        return src_n
    _, xn, yn = measure_psf(src_n.psf)
    _, xr, yr = measure_psf(src_r.psf)
    cn = (xn - src_n.psf.shape[1] // 2, yn - src_n.psf.shape[0] // 2)
    cr = (xr - src_r.psf.shape[1] // 2, yr - src_r.psf.shape[0] // 2)
    sx, sy = dx - (cn[0] - cr[0]), dy - (cn[1] - cr[1])
    log.info("registration offset NEW - REF = (%.4f, %.4f) +- (%.4f, %.4f) px from %d stars: "
             "NEW's PSF shifted by (%.4f, %.4f) px", dx, dy, ex, ey, n, sx, sy)
    return dataclasses.replace(src_n, psf=shift_psf(src_n.psf, sx, sy),
                               largest=shift_psf(src_n.largest, sx, sy), shift=(sx, sy))


# ---------------------------------------------------------------- saturation
def _full_scale(header) -> float | None:
    """Largest physical value an integer FITS image can hold (None for float data)."""
    try:
        bitpix = int(header.get("ZBITPIX", header.get("BITPIX", -32)))
        bscale = float(header.get("BSCALE", 1.0))
        bzero = float(header.get("BZERO", 0.0))
    except (TypeError, ValueError):
        return None
    if bitpix <= 0 or not bscale > 0:
        return None
    raw_max = 255 if bitpix == 8 else 2 ** (bitpix - 1) - 1
    return raw_max * bscale + bzero


def detect_saturation(reader, boxes=None, *, min_pixels: int = 3,
                      min_contrast: float = 20.0) -> float:
    """Saturation level of an image without a SATURATE keyword (``inf`` if none is seen).

    A saturated detector pixel holds the converter's full-scale value (or a
    clipped level set by the software that wrote the file), so saturated
    stars pile pixels up on one exact value at the top of the histogram,
    which unsaturated stars, whose peaks are noisy, never do.  The level is
    the image maximum when either

    * it is the largest value the integer FITS type can hold (after
      BSCALE/BZERO, e.g. 65535 for unsigned 16-bit data), or
    * at least ``min_pixels`` pixels share it and it lies more than
      ``min_contrast`` robust standard deviations above the median.

    Only the regions of :func:`sample_boxes` are read (the whole image when
    it is small), as for the star catalogues.

    Parameters
    ----------
    reader : ImageReader
        The open image.
    boxes : list of Box, optional
        Regions to read (default :func:`sample_boxes`).
    min_pixels : int, optional
        Pixels needed at the maximum for a pile-up.
    min_contrast : float, optional
        Height of the maximum above the median, in robust sigmas.

    Returns
    -------
    float
        The saturation level (pixels ``>=`` it are saturated), or ``inf``.
    """
    from astropy.stats import mad_std

    boxes = boxes or sample_boxes(reader.shape)
    vmax, count, samples = -math.inf, 0, []
    for box in boxes:
        data = reader.read(box)
        reader.release(box)
        f = data[np.isfinite(data)]
        if f.size == 0:
            continue
        m = float(f.max())
        n = int(np.count_nonzero(f == m))
        if m > vmax:
            vmax, count = m, n
        elif m == vmax:
            count += n
        samples.append(f[::max(1, f.size // 50_000)])
    if not samples:
        return math.inf
    s = np.concatenate(samples)
    med, sig = float(np.median(s)), float(mad_std(s))
    full = _full_scale(reader.header)
    at_full = full is not None and vmax >= full - 0.5
    pileup = count >= min_pixels and vmax > med + min_contrast * max(sig, 1e-30)
    if at_full or pileup:
        log.info("%s: no saturation level given; %d pixel(s) at the maximum %.6g (%s): "
                 "saturated at %.6g", reader.label, count, vmax,
                 "full scale of the data type" if at_full else "a pile-up", vmax)
        return vmax
    return math.inf


# ---------------------------------------------------------------- defects
def _flat_mask(img: np.ndarray, sigma: float, size: int = 5) -> np.ndarray | None:
    """Pixels of ``size`` x ``size`` blocks of one exact value (zero-coverage fill)."""
    a = img
    if min(a.shape) < size:
        return None
    # Every size x size block covers a row whose index is a multiple of size, with a
    # run of size equal values in it: noise is told apart on those rows alone (a
    # size-th of the pixels; float32 noise has a chance pair of equal neighbours in
    # most 1080^2 windows, never a run of 5).  The min/max filters below pass over a
    # NaN inside a block, so with NaN on those rows every row is looked at.
    rows = a[::size]
    if np.isnan(rows).any():
        rows = a
    eq = rows[:, 1:] == rows[:, :-1]
    if not eq.any():
        return None
    n = a.shape[1] - size + 1
    run = eq[:, :n].copy()
    for k in range(1, size - 1):  # size - 1 equal neighbours in a row: a run of `size`
        run &= eq[:, k:k + n]
    if not run.any():
        return None
    if sigma < 1.0:  # coarsely quantised noise repeats values by chance
        smp = a[::7, ::7]
        smp = smp[np.isfinite(smp)]
        if smp.size and np.all(smp == np.round(smp)):
            return None
    from scipy import ndimage  # only here: its import costs ~0.15 s

    lo = ndimage.minimum_filter(a, size=size, mode="nearest")
    hi = ndimage.maximum_filter(a, size=size, mode="nearest")
    centre = lo == hi
    centre[:size // 2] = centre[-(size // 2):] = False
    centre[:, :size // 2] = centre[:, -(size // 2):] = False
    if not centre.any():
        return None
    return ndimage.binary_dilation(centre, structure=np.ones((size, size), bool))


_MAD_TO_STD = 1.482602218505602  # 1 / Phi^-1(3/4), as astropy.stats.mad_std


def _bad_border_lines(lines: np.ndarray, sigma: float, *, depth: int, n_ref: int,
                      level: float, noise: tuple[float, float]) -> int:
    """How many lines, counted from the border (row 0 of ``lines``), are defective."""
    n = min(len(lines), depth + n_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN lines
        med = np.nanmedian(lines[:n], axis=1)
        # astropy's mad_std of each line's finite pixels, for all lines at once
        # (one call per line was ~1.5 ms of every border tile's read)
        mad = _MAD_TO_STD * np.nanmedian(np.abs(lines[:n] - med[:, None]), axis=1)
    mad = np.where(np.isfinite(lines[:n]).sum(axis=1) > 8, mad, np.nan)
    if n < n_ref + 1:
        return 0
    # reference: a straight line through the medians of the n_ref lines inside the
    # flagged zone (a smooth gradient towards the edge is sky, not a defect)
    ref = np.arange(depth, n) if n > depth else np.arange(n - n_ref, n)
    ok = np.isfinite(med[ref])
    if ok.sum() < 3:
        return 0
    coef = np.polyfit(ref[ok], med[ref][ok], 1)
    scale = float(np.nanmedian(mad[ref])) if np.isfinite(mad[ref]).any() else sigma
    scale = scale if scale > 0 else sigma
    length = lines.shape[1]
    tol = level * sigma + 3.0 * 1.25 * scale / math.sqrt(length)  # plus the medians' noise
    bad = 0
    for j in range(min(depth, ref[0])):
        off = abs(med[j] - np.polyval(coef, j))
        q = mad[j] / scale if np.isfinite(mad[j]) else 1.0
        if np.isfinite(med[j]) and (off > tol or not noise[0] <= q <= noise[1]):
            bad = j + 1
        else:
            break
    return bad


def defect_mask(img: np.ndarray, valid: Box, shape, sigma: float, *, depth: int = 8,
                n_ref: int = 8, level: float = 1.0, noise=(0.3, 3.0),
                min_length: int = 32) -> np.ndarray | None:
    """Pixels of a tile window that carry no usable sky signal.

    Two kinds, both common in real frames and both a source of false
    candidates when left in (a line offset by ``d`` per pixel shifts S_corr
    along it by about ``1.4 d / sigma``):

    * **zero coverage**: blocks of 5 x 5 pixels of one exact value (mosaic
      edges and gaps filled with 0 or a constant, rows/columns left over by a
      shift during alignment); noise never repeats a value 25 times (skipped
      for integer data with sigma < 1, where it can);
    * **defective border lines**: counted from each image border that the
      window touches, the consecutive rows/columns whose median departs from
      a straight line through the next ``n_ref`` lines further in by more than
      ``level`` sigma (plus the medians' own noise), or whose robust scatter
      is outside ``noise`` times that of those lines (dead, hot, or partly
      read-out lines); at most ``depth`` lines per border.

    Parameters
    ----------
    img : ndarray
        The in-image part of the window (``valid``), background included.
    valid : Box
        Its position in the image.
    shape : (int, int)
        The image shape (to know which sides of the window are image borders).
    sigma : float
        Background noise of the image.
    depth, n_ref, level, noise, min_length : optional
        Border-line test parameters (lines shorter than ``min_length`` pixels
        are not tested).

    Returns
    -------
    ndarray of bool or None
        True for defective pixels; None when there are none.
    """
    if not sigma > 0 or img.size == 0:
        return None
    out = _flat_mask(img, sigma)
    ny, nx = img.shape
    sides = []
    if valid.y0 == 0:
        sides.append(("top", img))
    if valid.y1 == shape[0]:
        sides.append(("bottom", img[::-1]))
    if valid.x0 == 0:
        sides.append(("left", img.T))
    if valid.x1 == shape[1]:
        sides.append(("right", img[:, ::-1].T))
    for side, lines in sides:
        if lines.shape[1] < min_length:
            continue
        k = _bad_border_lines(lines, sigma, depth=depth, n_ref=n_ref, level=level,
                              noise=noise)
        if not k:
            continue
        out = np.zeros(img.shape, bool) if out is None else out
        if side == "top":
            out[:k] = True
        elif side == "bottom":
            out[ny - k:] = True
        elif side == "left":
            out[:, :k] = True
        else:
            out[:, nx - k:] = True
    return out if out is not None and out.any() else None
