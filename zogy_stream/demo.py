"""``zogy-stream demo``: simulate a pair with transients, subtract, check."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

__all__ = ["run_demo", "match_truth"]

log = logging.getLogger(__name__)


def match_truth(truth: Table, cands: Table, *, radius: float = 2.0) -> np.ndarray:
    """Index into ``cands`` of the positive candidate nearest each truth row
    within ``radius`` pixels, or -1."""
    idx = np.full(len(truth), -1)
    if len(cands) == 0:
        return idx
    pos = cands[cands["sign"] > 0] if "sign" in cands.colnames else cands
    rows = np.nonzero(cands["sign"] > 0)[0] if "sign" in cands.colnames else np.arange(len(cands))
    cx, cy = np.asarray(pos["x"]), np.asarray(pos["y"])
    for i, (x, y) in enumerate(zip(truth["x"], truth["y"])):
        d2 = (cx - x) ** 2 + (cy - y) ** 2
        if d2.size and d2.min() <= radius ** 2:
            idx[i] = rows[int(np.argmin(d2))]
    return idx


def run_demo(outdir: Path, *, size: int = 2048, seed: int = 1, threads: int | None = None,
             progress: bool = False) -> str:
    """Write a synthetic scene into ``outdir``, subtract it, report recovery.

    Returns a short human-readable report.
    """
    from .pipeline import subtract
    from .simulate import write_scene

    outdir.mkdir(parents=True, exist_ok=True)
    n_tr = max(10, int(40 * size * size / 2048 ** 2))
    paths = write_scene(outdir, (size, size), seed=seed, n_transients=n_tr, n_galaxies=size // 16,
                        new_fwhm=4.0, ref_fwhm=3.0, flux_ratio=1.0, transient_snr=(5, 60))
    summary = subtract(paths["new"], paths["ref"], outdir / "diff.fits",
                       new_psf=paths["new_psf"], ref_psf=paths["ref_psf"],
                       new_var=paths["new_var"], ref_var=paths["ref_var"],
                       flux_ratio=1.0, catalog=outdir / "candidates.ecsv", threads=threads,
                       progress=progress)
    truth = Table.read(paths["truth"])
    cands = Table.read(summary.catalog)
    with fits.open(summary.out) as hdul:
        sc = hdul["SCORR"].data
        mask = hdul["MASK"].data
        blank = sc[mask == 0]
    from astropy.stats import mad_std
    idx = match_truth(truth, cands)
    bright = np.asarray(truth["expected_snr"]) >= 7
    found = (idx >= 0) & bright
    ratio = [cands["flux"][j] / f for j, f in zip(idx, truth["flux"]) if j >= 0]
    lines = [
        f"demo scene: {size}x{size}, {len(truth)} transients -> {outdir}",
        f"subtracted in {summary.seconds:.2f} s ({summary.mpix_per_s:.1f} Mpix/s): "
        f"{summary.out}, {summary.catalog} ({summary.n_candidates} candidates)",
        f"recovered {found.sum()}/{bright.sum()} transients with expected S/N >= 7 at "
        f"|S_corr| >= 5; median FLUX/true "
        f"{np.median(ratio) if ratio else math.nan:.3f}; robust std(S_corr) of unmasked "
        f"pixels {mad_std(blank):.3f}",
    ]
    return "\n".join(lines)
