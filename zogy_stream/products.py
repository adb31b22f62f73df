"""What a person looks at: candidate flags and magnitudes, cut-out stamps, a quick-look PNG.

Candidate ``flags`` (int, OR of):

=====  ============================================================
1      near a masked pixel (bad, user mask, cosmic ray, kernel footprint)
2      near a saturated star (within the kernel footprint of its bleed mask)
4      on an edge (the kernel footprint reaches outside the image)
8      sharp: the profile is sharper than the PSF (cosmic-ray like)
=====  ============================================================

``--stamps STAMPS.fits`` layout: a primary HDU, then four float32 ImageHDU
cubes ``NEW``, ``REF``, ``D``, ``SCORR`` of shape ``(n_candidates, 31, 31)``
(plane ``k`` is candidate ``k`` of the ``CANDIDATES`` binary table, in
catalogue order, centred on its peak pixel ``x_peak, y_peak``; pixels outside
the image are NaN), and the ``CANDIDATES`` table itself (``index``, ``x``,
``y``, ``x_peak``, ``y_peak``, ``scorr``, ``flux``, ``flux_err``, ``flags``).
NEW and REF are the input pixels (background included).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .errors import InputError
from .masks import MaskBit

__all__ = ["FLAG_NEAR_MASK", "FLAG_NEAR_SATURATED", "FLAG_EDGE", "FLAG_SHARP", "FLAG_BLEND",
           "annotate_candidates", "ensure_columns", "write_stamps", "write_png",
           "check_png_available"]

log = logging.getLogger(__name__)

FLAG_NEAR_MASK = 1
FLAG_NEAR_SATURATED = 2
FLAG_EDGE = 4
FLAG_SHARP = 8
FLAG_BLEND = 16  #: one of two point sources a single S_corr peak was split into

_NEAR_BITS = int(MaskBit.BAD_NEW | MaskBit.BAD_REF | MaskBit.USER | MaskBit.NEAR | MaskBit.COSMIC)


def ensure_columns(tab: Table, zeropoint: float | None = None) -> Table:
    """Add ``flags``, ``sharp``, ``blend`` (and ``mag``, ``mag_err`` with a zero point)
    when missing."""
    n = len(tab)
    if "blend" not in tab.colnames:
        tab["blend"] = np.zeros(n, np.int32)
    if "flags" not in tab.colnames:
        tab["flags"] = np.zeros(n, np.int16)
    if "sharp" not in tab.colnames:
        tab["sharp"] = np.zeros(n, bool)
    if zeropoint is not None and "mag" not in tab.colnames:
        flux = np.asarray(tab["flux"], float) if n else np.zeros(0)
        err = np.asarray(tab["flux_err"], float) if n else np.zeros(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            pos = flux > 0
            mag = np.where(pos, zeropoint - 2.5 * np.log10(np.where(pos, flux, 1.0)), np.nan)
            merr = np.where(pos, 2.5 / math.log(10) * err / np.where(pos, flux, 1.0), np.nan)
        tab["mag"] = mag.astype(np.float32)
        tab["mag_err"] = merr.astype(np.float32)
    return tab


def _stamp(img: np.ndarray, y: int, x: int, h: int) -> np.ndarray | None:
    if y - h < 0 or x - h < 0 or y + h + 1 > img.shape[0] or x + h + 1 > img.shape[1]:
        return None
    s = np.array(img[y - h:y + h + 1, x - h:x + h + 1], dtype=np.float64)
    return s if np.all(np.isfinite(s)) else None


def annotate_candidates(cands: Table, mask_ext: np.ndarray, windows: dict, tile, psf_n, psf_r,
                        *, origin, grow: int, peak: int, zeropoint=None) -> Table:
    """Add ``flags``, ``sharp`` and (with ``zeropoint``) ``mag``, ``mag_err`` to one tile's table."""
    n = len(cands)
    flags = np.zeros(n, np.int16)
    sharp = np.zeros(n, bool)
    if n:
        from .cosmics import _SharpnessTest, _validate

        r_near, r_sat = 2 * peak + 1, grow + 2 * peak
        v = tile.valid
        yp = np.asarray(cands["y_peak"], np.int64)
        xp = np.asarray(cands["x_peak"], np.int64)
        positive = np.asarray(cands["sign"]) > 0
        stamps = {True: ([], []), False: ([], [])}  # sign -> (candidate rows, stamps)
        for k in range(n):
            i, j = int(yp[k]) - origin[0], int(xp[k]) - origin[1]
            box = mask_ext[max(0, i - r_near):i + r_near + 1, max(0, j - r_near):j + r_near + 1]
            if np.any(box & _NEAR_BITS):
                flags[k] |= FLAG_NEAR_MASK
            big = mask_ext[max(0, i - r_sat):i + r_sat + 1, max(0, j - r_sat):j + r_sat + 1]
            if np.any(big & int(MaskBit.SATURATED)):
                flags[k] |= FLAG_NEAR_SATURATED
            if mask_ext[i, j] & int(MaskBit.EDGE):
                flags[k] |= FLAG_EDGE
            pos = bool(positive[k])
            img = windows["NEW"] if pos else windows["REF"]
            h = min((psf_n if pos else psf_r).shape[0] // 2, 15)
            st = _stamp(img, int(yp[k]) - v.y0, int(xp[k]) - v.x0, h)
            if st is not None:
                stamps[pos][0].append(k)
                stamps[pos][1].append(st)
        # the sharpness test of all stamps of one sign at once (one PSF, one side):
        # ~0.05 against ~0.2-0.3 ms a candidate one by one
        for pos, (rows, sts) in stamps.items():
            if not rows:
                continue
            try:
                stack = np.array(sts)
                edge = np.concatenate([stack[:, 0], stack[:, -1], stack[:, :, 0],
                                       stack[:, :, -1]], axis=1)
                stack -= np.median(edge, axis=1)[:, None, None]
                psf = psf_n if pos else psf_r
                c, h = psf.shape[0] // 2, stack.shape[1] // 2
                _, p, _ = _validate(stack[0], psf[c - h:c + h + 1, c - h:c + h + 1], None)
                sharp[rows] = _SharpnessTest(p, stack.shape[1]).many(stack)
            except Exception as exc:  # noqa: BLE001 - never let a vetting aid stop the run
                log.debug("sharpness test failed for %d candidate(s): %s", len(rows), exc)
        flags[sharp] |= FLAG_SHARP
        if "blend" in cands.colnames:
            flags[np.asarray(cands["blend"]) > 0] |= FLAG_BLEND
    cands["flags"] = flags
    cands["sharp"] = sharp
    return ensure_columns(cands, zeropoint)


def _atomic_write(path: Path, write) -> Path:
    from .fitsio import atomic_path

    tmp = atomic_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_stamps(path, tab: Table, out_fits, new, ref, *, size: int = 31) -> Path:
    """Cut-outs of NEW, REF, D and S_corr around every candidate (see module doc)."""
    from .fitsio import ImageReader
    from .tiles import Box

    path = Path(path)
    h = size // 2
    n = len(tab)
    cubes = {k: np.full((n, size, size), np.nan, np.float32) for k in ("NEW", "REF", "D", "SCORR")}
    with fits.open(out_fits, memmap=True) as hl:
        shape = hl["D"].data.shape
        planes = {"D": hl["D"].data, "SCORR": hl["SCORR"].data}
        readers = {"NEW": ImageReader(new, label="NEW"), "REF": ImageReader(ref, label="REF")}
        try:
            for k in range(n):
                y, x = int(tab["y_peak"][k]), int(tab["x_peak"][k])
                y0, y1 = max(0, y - h), min(shape[0], y + h + 1)
                x0, x1 = max(0, x - h), min(shape[1], x + h + 1)
                dst = (k, slice(y0 - (y - h), y1 - (y - h)), slice(x0 - (x - h), x1 - (x - h)))
                for name, arr in planes.items():
                    cubes[name][dst] = arr[y0:y1, x0:x1]
                for name, rd in readers.items():
                    cubes[name][dst] = rd.read(Box(y0, y1, x0, x1))
        finally:
            for rd in readers.values():
                rd.close()
    cols = [c for c in ("x", "y", "x_peak", "y_peak", "ra", "dec", "scorr", "flux", "flux_err",
                        "sign", "flags") if c in tab.colnames]
    index = Table({"index": np.arange(n, dtype=np.int32)})
    for c in cols:
        index[c] = np.asarray(tab[c])
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["NCAND"] = (n, "number of candidates")
    hdus[0].header["STAMPSZ"] = (size, "[pix] stamp side")
    for name, cube in cubes.items():
        hdus.append(fits.ImageHDU(cube, name=name))
    hdus.append(fits.BinTableHDU(index, name="CANDIDATES"))
    return _atomic_write(path, lambda tmp: fits.HDUList(hdus).writeto(tmp, overwrite=True))


def check_png_available() -> None:
    """Raise InputError when matplotlib is missing (checked before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--png needs matplotlib: pip install matplotlib "
                         "(or install zogy-stream[plot])") from None


def write_png(path, out_fits, tab: Table, *, max_side: int = 1024) -> Path:
    """Down-sampled S_corr (grey, -5..5) with candidates circled (green +, red -)."""
    check_png_available()
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    with fits.open(out_fits, memmap=True) as hl:
        sc = hl["SCORR"].data
        step = max(1, int(math.ceil(max(sc.shape) / max_side)))
        img = np.array(sc[::step, ::step], dtype=np.float32)
    fig = Figure(figsize=(8, 8 * img.shape[0] / max(img.shape[1], 1) + 0.01), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img, origin="lower", cmap="gray", vmin=-5, vmax=5, interpolation="nearest")
    if len(tab):
        x = np.asarray(tab["x"]) / step
        y = np.asarray(tab["y"]) / step
        pos = np.asarray(tab["sign"]) > 0
        ax.scatter(x[pos], y[pos], s=80, facecolors="none", edgecolors="lime", linewidths=0.8)
        ax.scatter(x[~pos], y[~pos], s=80, facecolors="none", edgecolors="red", linewidths=0.8)
    ax.set_axis_off()
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(-0.5, img.shape[0] - 0.5)
    return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
