"""Template library of the zogy_stream daemon, and file-naming rules shared with it.

A :class:`TemplateLibrary` indexes the FITS images of a directory (recursively)
by a few header keywords (default ``FILTER`` and ``FIELD``) and by their WCS
footprint.  An exposure is matched to the template whose keywords all agree
with it; when none matches on every keyword, the template with the largest
WCS footprint overlap among those that do not contradict it wins.  The
directory is indexed once and re-indexed (incrementally, re-reading only
changed files) whenever its signature, the names, sizes and mtimes of its
files, changes.

Naming rules
------------
* Images: ``*.fits``, ``*.fit``, ``*.fts``, ``*.fits.fz``, ``*.fits.gz``, ``*.fz``.
* Sidecars beside an image ``NAME.fits``: ``NAME.psf.fits`` (PSF image),
  ``NAME.psf`` (PSFEx model), ``NAME.var.fits`` (variance), ``NAME.weight.fits``
  (inverse variance), ``NAME.err.fits`` (1-sigma error), ``NAME.mask.fits``
  (non-zero = bad).  A sidecar is never
  an image itself.
* Temporary or hidden files are ignored: a leading ``.``, a trailing ``~``, or a
  ``.tmp`` / ``.temp`` / ``.part`` / ``.partial`` / ``.filepart`` /
  ``.crdownload`` / ``.swp`` component in the name.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from .errors import InputError

__all__ = [
    "IMAGE_SUFFIXES", "SIDECAR_SUFFIXES", "NoTemplateError", "Sidecars", "Footprint", "Template", "Match",
    "TemplateLibrary", "is_temporary", "select_image_hdu", "is_sidecar", "image_stem", "find_sidecars", "read_image_header",
    "footprint", "overlap_fraction",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".fits.fz", ".fits.gz", ".fits", ".fit", ".fts", ".fz")
SIDECAR_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("psf", ".psf.fits"), ("psf", ".psf"), ("var", ".var.fits"), ("weight", ".weight.fits"),
    ("err", ".err.fits"), ("mask", ".mask.fits"))
_TEMP_PARTS = frozenset({"tmp", "temp", "part", "partial", "filepart", "crdownload", "swp"})


class NoTemplateError(InputError):
    """No template of the library matches an exposure."""


# -- naming rules ---------------------------------------------------------------------------
def is_temporary(name: str) -> bool:
    """Whether a file name marks a hidden or temporary file (never taken as input)."""
    lower = name.lower()
    return (lower.startswith(".") or lower.endswith("~")
            or any(part in _TEMP_PARTS for part in lower.split(".")[1:]))


def is_sidecar(name: str) -> bool:
    """Whether a file name is that of a sidecar (PSF, variance, weight, mask) or a reason file."""
    lower = name.lower()
    return lower.endswith(tuple(s for _, s in SIDECAR_SUFFIXES) + (".reason.txt",))


def image_stem(name: str) -> str | None:
    """The stem of an image file name (``a.fits.fz`` → ``a``), or None if it is not an image.

    Temporary files and sidecars are not images.
    """
    if is_temporary(name) or is_sidecar(name):
        return None
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


@dataclass(frozen=True)
class Sidecars:
    """Sidecar files found beside an image (each None when absent)."""

    psf: Path | None = None
    var: Path | None = None
    weight: Path | None = None
    err: Path | None = None
    mask: Path | None = None

    def files(self) -> list[Path]:
        """The sidecar files present."""
        return [p for p in (self.psf, self.var, self.weight, self.err, self.mask) if p is not None]


def find_sidecars(image: str | Path) -> Sidecars:
    """Sidecars of ``image`` in its directory (``NAME.psf.fits`` is preferred to ``NAME.psf``)."""
    image = Path(image)
    stem = image_stem(image.name)
    if stem is None:
        return Sidecars()
    found: dict[str, Path] = {}
    for kind, suffix in SIDECAR_SUFFIXES:
        candidate = image.with_name(stem + suffix)
        if kind not in found and candidate.is_file():
            found[kind] = candidate
    return Sidecars(**found)


# -- FITS headers and footprints ----------------------------------------------------------------
def select_image_hdu(hdul: fits.HDUList, hdu: str | int | None = None) -> fits.hdu.base._BaseHDU:
    """The HDU ``hdu`` (name or index) of ``hdul``, default the first 2-D image HDU."""
    if hdu is not None:
        key: str | int = int(hdu) if str(hdu).lstrip("-").isdigit() else str(hdu)
        return hdul[key]
    for candidate in hdul:
        if candidate.header.get("NAXIS", 0) == 2 or isinstance(candidate, fits.CompImageHDU):
            if isinstance(candidate, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
                return candidate
    raise InputError("no 2-D image HDU")


def read_image_header(path: str | Path, hdu: str | int | None = None, *,
                      check_size: bool = True) -> tuple[fits.Header, tuple[int, int]]:
    """Header and shape of the image HDU of a FITS file, checking the file is complete.

    Parameters
    ----------
    path : str or Path
        FITS file.
    hdu : str or int, optional
        HDU name or index; default the first 2-D image HDU.
    check_size : bool
        Raise if the file is shorter than its header says (truncated).

    Returns
    -------
    header : astropy.io.fits.Header
    shape : tuple of int
        ``(ny, nx)``.

    Raises
    ------
    InputError
        Unreadable, not FITS, no 2-D image, or truncated.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
                h = select_image_hdu(hdul, hdu)
                shape = tuple(int(n) for n in h.shape)
                if len(shape) != 2 or min(shape) < 1:
                    raise InputError(f"{path.name}: not a 2-D image (shape {shape})")
                if check_size:
                    info = h.fileinfo()
                    if isinstance(h, fits.CompImageHDU):
                        need = info["datLoc"] + max(info["datSpan"] - 2879, 0)
                    else:
                        need = info["datLoc"] + abs(int(h.header["BITPIX"])) // 8 * shape[0] * shape[1]
                    have = os.path.getsize(path)
                    if have < need:
                        raise InputError(f"{path.name}: truncated FITS file ({have} of {need} bytes)")
                header = h.header.copy()
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"{path.name}: no such file") from exc
    except Exception as exc:  # astropy raises OSError, ValueError, KeyError... on corrupt files
        raise InputError(f"{path.name}: unreadable FITS file ({type(exc).__name__}: {exc})") from exc
    return header, (shape[0], shape[1])


def _celestial_wcs(header: fits.Header) -> WCS | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header)
        return wcs.celestial if wcs.has_celestial else None
    except Exception:  # malformed WCS keywords: no footprint
        return None


@dataclass(frozen=True)
class Footprint:
    """Sky outline of an image: 8 points along its border, its centre and radius (deg)."""

    ra: tuple[float, ...]
    dec: tuple[float, ...]
    center: tuple[float, float]
    radius: float


def _border(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = shape
    x0, x1, y0, y1 = -0.5, nx - 0.5, -0.5, ny - 0.5
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([x0, xm, x1, x1, x1, xm, x0, x0]), np.array([y0, y0, y0, ym, y1, y1, y1, ym])


def _separation(ra1: np.ndarray | float, dec1: np.ndarray | float, ra2: float, dec2: float) -> np.ndarray:
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    hav = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(hav, 0.0, 1.0))))


def footprint(header: fits.Header, shape: tuple[int, int]) -> Footprint | None:
    """Footprint of an image from its header, or None without a usable celestial WCS."""
    wcs = _celestial_wcs(header)
    if wcs is None:
        return None
    try:
        x, y = _border(shape)
        ra, dec = wcs.pixel_to_world_values(x, y)
        cra, cdec = wcs.pixel_to_world_values((shape[1] - 1) / 2, (shape[0] - 1) / 2)
    except Exception:
        return None
    if not np.all(np.isfinite(np.r_[ra, dec, cra, cdec])):
        return None
    radius = float(np.max(_separation(ra, dec, float(cra), float(cdec))))
    return Footprint(tuple(map(float, ra)), tuple(map(float, dec)), (float(cra), float(cdec)), radius)


def _clip(poly: list[tuple[float, float]], axis: int, bound: float, keep_below: bool) -> list[tuple[float, float]]:
    """One Sutherland-Hodgman step against an axis-aligned half-plane."""
    inside = (lambda p: p[axis] <= bound) if keep_below else (lambda p: p[axis] >= bound)
    out: list[tuple[float, float]] = []
    for i, cur in enumerate(poly):
        prev = poly[i - 1]
        if inside(cur) != inside(prev):
            t = (bound - prev[axis]) / (cur[axis] - prev[axis])
            out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
        if inside(cur):
            out.append(cur)
    return out


def _area(poly: Sequence[tuple[float, float]]) -> float:
    if len(poly) < 3:
        return 0.0
    return abs(sum(poly[i - 1][0] * p[1] - p[0] * poly[i - 1][1] for i, p in enumerate(poly))) / 2


def overlap_fraction(header: fits.Header, shape: tuple[int, int], other: Footprint | None) -> float:
    """Fraction of an image's area (given by its header and shape) covered by another footprint.

    The other footprint's border is projected into the image's pixel grid and
    clipped to the image rectangle.  Returns 0 when either has no WCS.
    """
    mine = footprint(header, shape)
    if mine is None or other is None:
        return 0.0
    if _separation(mine.center[0], mine.center[1], *other.center) > mine.radius + other.radius:
        return 0.0
    wcs = _celestial_wcs(header)
    try:
        x, y = wcs.world_to_pixel_values(np.array(other.ra), np.array(other.dec))
    except Exception:
        return 0.0
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return 0.0
    poly = list(zip(map(float, x), map(float, y)))
    ny, nx = shape
    for axis, bound, below in ((0, -0.5, False), (0, nx - 0.5, True), (1, -0.5, False), (1, ny - 0.5, True)):
        poly = _clip(poly, axis, bound, below)
        if not poly:
            return 0.0
    return min(_area(poly) / (nx * ny), 1.0)


def _normalise(value: object) -> str | None:
    if value is None or isinstance(value, fits.card.Undefined):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip().casefold()
    return text or None


# -- the library ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """One indexed template image.

    Attributes
    ----------
    path : Path
        The image file.
    keys : tuple of (str, str or None)
        The library's keywords and their normalised values (None if absent).
    shape : tuple of int
        ``(ny, nx)``.
    footprint : Footprint or None
        Sky footprint, None without a celestial WCS.
    """

    path: Path
    keys: tuple[tuple[str, str | None], ...]
    shape: tuple[int, int]
    footprint: Footprint | None

    @property
    def sidecars(self) -> Sidecars:
        """Sidecar files beside the template (looked up now)."""
        return find_sidecars(self.path)


@dataclass(frozen=True)
class Match:
    """Result of :meth:`TemplateLibrary.match`.

    Attributes
    ----------
    template : Template
    method : str
        ``"keywords"`` (all keywords agree) or ``"wcs"`` (largest footprint overlap).
    overlap : float
        Fraction of the exposure covered by the template (0 when unknown).
    """

    template: Template
    method: str
    overlap: float


class TemplateLibrary:
    """Index of a directory of template images.

    Parameters
    ----------
    directory : str or Path
        The library; searched recursively (hidden directories are skipped).
    keys : sequence of str
        Header keywords that must agree between exposure and template.
    hdu : str or int, optional
        HDU of the templates to read (default: first 2-D image HDU).
    min_overlap : float
        Smallest footprint overlap (fraction of the exposure) a WCS match may have.

    Notes
    -----
    Thread-safe: :meth:`match` may be called from several threads.
    """

    def __init__(self, directory: str | Path, keys: Sequence[str] = ("FILTER", "FIELD"), *,
                 hdu: str | int | None = None, min_overlap: float = 0.0) -> None:
        self.directory = Path(directory)
        self.keys = tuple(k.upper() for k in keys)
        self.hdu = hdu
        self.min_overlap = float(min_overlap)
        self._lock = threading.Lock()
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._entries: dict[str, tuple[int, int, Template | None]] = {}
        self.n_indexed = 0  # number of header reads, for tests and logs
        self.refresh()

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        found = []
        for root, dirs, files in os.walk(self.directory):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if image_stem(name) is None:
                    continue
                path = os.path.join(root, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                found.append((path, st.st_size, st.st_mtime_ns))
        return tuple(sorted(found))

    def refresh(self) -> bool:
        """Re-index if the directory changed since the last call; returns whether it did."""
        with self._lock:
            signature = self._scan()
            if signature == self._signature:
                return False
            entries: dict[str, tuple[int, int, Template | None]] = {}
            for path, size, mtime_ns in signature:
                old = self._entries.get(path)
                if old is not None and old[:2] == (size, mtime_ns):
                    entries[path] = old
                    continue
                entries[path] = (size, mtime_ns, self._read(Path(path)))
            self._entries, self._signature = entries, signature
            log.info("template library %s indexed: %d templates", self.directory, len(self.templates))
            return True

    def _read(self, path: Path) -> Template | None:
        self.n_indexed += 1
        try:
            header, shape = read_image_header(path, self.hdu)
        except InputError as exc:
            log.warning("template %s skipped: %s", path, exc)
            return None
        keys = tuple((k, _normalise(header.get(k))) for k in self.keys)
        return Template(path, keys, shape, footprint(header, shape))

    @property
    def templates(self) -> list[Template]:
        """The indexed templates, sorted by path."""
        return [e[2] for e in self._entries.values() if e[2] is not None]

    def match(self, header: fits.Header, shape: tuple[int, int]) -> Match:
        """Find the template of an exposure.

        Parameters
        ----------
        header : astropy.io.fits.Header
            The exposure's header.
        shape : tuple of int
            The exposure's ``(ny, nx)``.

        Returns
        -------
        Match

        Raises
        ------
        NoTemplateError
            No template agrees on every keyword and none overlaps the exposure.
        """
        self.refresh()
        with self._lock:
            templates = self.templates
        want = {k: _normalise(header.get(k)) for k in self.keys}
        full, compatible = [], []
        for t in templates:
            values = dict(t.keys)
            if any(want[k] is not None and values[k] is not None and want[k] != values[k] for k in self.keys):
                continue
            compatible.append(t)
            if all(want[k] is not None and values[k] == want[k] for k in self.keys):
                full.append(t)
        if len(full) == 1:
            return Match(full[0], "keywords", overlap_fraction(header, shape, full[0].footprint))
        pool, method = (full, "keywords") if full else (compatible, "wcs")
        scored = [(overlap_fraction(header, shape, t.footprint), t) for t in pool]
        scored = [(o, t) for o, t in scored if o > self.min_overlap or (method == "keywords" and not math.isnan(o))]
        if not scored:
            described = ", ".join(f"{k}={header.get(k)!r}" for k in self.keys)
            raise NoTemplateError(f"no template matches ({described}) and none overlaps the exposure "
                                  f"({len(templates)} templates in {self.directory})")
        best = max(scored, key=lambda ot: (ot[0], -pool.index(ot[1])))
        return Match(best[1], method, best[0])

    def match_file(self, path: str | Path, hdu: str | int | None = None) -> Match:
        """:meth:`match` for an exposure file."""
        header, shape = read_image_header(path, hdu)
        return self.match(header, shape)
