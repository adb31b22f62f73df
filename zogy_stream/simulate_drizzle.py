"""Seeded simulator of drizzled space-telescope image pairs (tests and benchmarks).

A space-telescope pair is unlike a ground-based one in three ways that matter to ZOGY:

- each exposure is **undersampled** (PSF FWHM ~1.5 detector pixels), so the images a
  user subtracts are drizzled combinations of dithered exposures on a finer grid;
- drizzling **correlates the noise** of neighbouring output pixels, and the ERR map a
  pipeline propagates (the square root of the variance drizzled with squared weights)
  is right pixel by pixel but understates the noise on PSF scales;
- the PSFs given are **models** (here: a noise-free star drizzled with the same dither
  pattern, at one sub-pixel phase), never exactly the PSF of every source.

:func:`make_drizzled_pair` renders the detector exposures of both epochs (stars,
exponential-disc galaxies and, in the new epoch only, transients; Gaussian noise with the
variance of the model, ``model / gain + read_noise**2`` electrons) and combines each epoch
with the ``drizzle`` package (spacetelescope/drizzle: square kernel, ``pixfrac``, exposure
weights, variance propagated with squared weights).  The output grid, in which every
position of the truth tables is given, is the drizzled grid; the images are in electrons per
second, flux-conserving (a source's pixels sum to its rate), so ``F_n/F_r = 1``.

``drizzle`` is an optional dependency (``pip install drizzle``; in the ``test`` extra).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .errors import ConfigError
from .simulate import _KINDS, _add_points, _disc, _fft_convolve, _stamp, background_fs

__all__ = ["DrizzledPair", "make_drizzled_pair", "write_drizzled_pair"]

def _stamp_size(fwhm):
    """Odd native-pixel stamp of a point source: 16 FWHM, at least 25 (beta-2.5 Moffat
    wings beyond it hold < 0.3 % of the flux)."""
    return max(25, int(math.ceil(16.0 * fwhm)) | 1)


@dataclass(frozen=True, eq=False)
class DrizzledPair:
    """A drizzled new/reference pair with its truth.

    Attributes
    ----------
    new, ref : numpy.ndarray
        float32 drizzled science images (e-/s per output pixel, sky included).
    new_err, ref_err : numpy.ndarray
        float32 propagated per-pixel errors (the ERR a drizzle pipeline writes).
    new_wht, ref_wht : numpy.ndarray
        float32 drizzle weights.
    new_psf, ref_psf : numpy.ndarray
        float64 unit-sum model PSFs on the output grid (odd sides).
    transients : astropy.table.Table
        ``x, y`` (output pixels, 0-based), ``flux`` (e-/s, new epoch only),
        ``sky_snr`` (``flux * sqrt(F_S)`` with the white-equivalent noise of the
        drizzled sky, see ``meta``), ``expected_snr`` (``sky_snr`` lowered by the
        Poisson noise of the static light under the transient: a host or a star)
        and ``host`` (row in ``galaxies`` or -1).
    stars, galaxies : astropy.table.Table
        The static sources (``x, y, flux``; galaxies also ``scale, q, theta`` in native
        pixels).
    meta : dict
        The parameters, plus ``sigma_new``/``sigma_ref``: the white-equivalent noise of the
        drizzled sky per output pixel (``scale * sqrt(sky + rn**2) / (t * sqrt(n_exp))``),
        and ``pix_sigma_new``/``pix_sigma_ref``: the median propagated ERR on the sky.
    """

    new: np.ndarray
    ref: np.ndarray
    new_err: np.ndarray
    ref_err: np.ndarray
    new_wht: np.ndarray
    ref_wht: np.ndarray
    new_psf: np.ndarray
    ref_psf: np.ndarray
    transients: Table
    stars: Table
    galaxies: Table
    meta: dict


def _dithers(n, rng, jitter, phase):
    """``n`` sub-pixel pointings: 2x2 half-pixel boxes, each box shifted by ``phase``."""
    box = np.array([(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5)])
    out = [box[k % 4] + phase + (k // 4) * np.array([0.25, 0.25]) for k in range(n)]
    return np.mod(np.array(out) + rng.normal(0.0, jitter, (n, 2)), 1.0)


def _render(native_shape, pos, fluxes, galaxies, fwhm, beta, oversample, sky):
    """Noise-free exposure (electrons) of point sources at native ``pos`` (x, y) and galaxies."""
    img = np.full(native_shape, sky, dtype=np.float32)
    order = np.argsort(pos[:, 1], kind="stable")
    fw = np.full(len(pos), fwhm)
    size = _stamp_size(fwhm)
    _add_points(img, 0, pos[order, 0].copy(), pos[order, 1].copy(), fluxes[order].copy(), fw,
                _KINDS["moffat"], beta, oversample, np.empty((size, size)))
    if galaxies:
        psf = np.empty((size, size))
        _stamp(_KINDS["moffat"], fwhm, beta, 0.0, 0.0, oversample, psf)
        ny, nx = native_shape
        for gx, gy, gflux, scale, q, theta in galaxies:
            ix, iy = int(math.floor(gx + 0.5)), int(math.floor(gy + 0.5))
            disc = np.empty((2 * int(math.ceil(7 * scale)) + 1,) * 2)
            _disc(scale, q, theta, gy - iy, gx - ix, oversample, disc)
            stamp = gflux * _fft_convolve(disc, psf)
            h = stamp.shape[0] // 2
            r0, r1 = max(iy - h, 0), min(iy + h + 1, ny)
            c0, c1 = max(ix - h, 0), min(ix + h + 1, nx)
            if r0 < r1 and c0 < c1:
                img[r0:r1, c0:c1] += stamp[r0 - iy + h:r1 - iy + h, c0 - ix + h:c1 - ix + h]
    return img


def _drizzle_epoch(out_shape, scale, pixfrac, exposures, *, variance=True):
    """Drizzle ``(data_e, var_e, exptime, offset)`` exposures onto ``out_shape``."""
    try:
        from drizzle.resample import Drizzle
    except ImportError as exc:  # pragma: no cover - exercised where drizzle is missing
        raise ImportError("simulating drizzled images needs the 'drizzle' package "
                          "(pip install drizzle)") from exc
    driz = Drizzle(kernel="square", out_shape=out_shape, fillval=np.nan, fillval2=np.nan,
                   disable_ctx=True)
    for data, var, t, (ox, oy) in exposures:
        ny, nx = data.shape
        jj, ii = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64))
        # native (xi, eta) -> output (u, v): the inverse of _native_position
        pixmap = np.dstack([(jj - 1.0 - ox + 0.5) / scale - 0.5,
                            (ii - 1.0 - oy + 0.5) / scale - 0.5])
        driz.add_image(data.astype(np.float32), exptime=t, pixmap=pixmap,
                       data2=var.astype(np.float32) if variance else None,
                       iscale=scale * scale, pixel_scale_ratio=scale, pixfrac=pixfrac,
                       in_units="counts", weight_map=np.full(data.shape, t, np.float32))
    err = np.sqrt(driz.out_img2[0]) if variance else None
    return driz.out_img.astype(np.float32), err, driz.out_wht.astype(np.float32)


def _native_position(u, v, scale, offset):
    """Output-grid position(s) -> native position(s) in an exposure pointed at ``offset``."""
    return ((np.asarray(u) + 0.5) * scale - 0.5 + 1.0 + offset[0],
            (np.asarray(v) + 0.5) * scale - 0.5 + 1.0 + offset[1])


def _source_noise_factor(native_shape, stars, galaxies, at, scale, offset, fwhm, beta,
                         oversample, sky_var):
    """``sqrt(sky_var / (sky_var + b))`` at each position ``at`` (output grid), with ``b``
    the static sources' light there (electrons per detector pixel, weighted by the PSF
    squared over 7x7 pixels): the loss of S/N to the Poisson noise of a host or a star."""
    if not sky_var > 0:  # no sky noise: nothing to compare the static light with
        return np.ones(len(at[0]))
    sx, sy, sflux = stars
    px, py = _native_position(sx, sy, scale, offset)
    gx, gy = _native_position(galaxies[0], galaxies[1], scale, offset)
    gals = list(zip(gx, gy, *galaxies[2:]))
    static = _render(native_shape, np.column_stack([px, py]), np.asarray(sflux, float), gals,
                     fwhm, beta, oversample, 0.0)
    qx, qy = _native_position(at[0], at[1], scale, offset)
    out = np.ones(len(qx))
    sig = fwhm / 2.3548200450309493
    for k, (x, y) in enumerate(zip(qx, qy)):
        ix, iy = int(round(x)), int(round(y))
        y0, y1 = max(iy - 3, 0), min(iy + 4, native_shape[0])
        x0, x1 = max(ix - 3, 0), min(ix + 4, native_shape[1])
        yy, xx = np.mgrid[y0:y1, x0:x1]
        w = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (sig * sig))  # PSF squared
        b = float((w * static[y0:y1, x0:x1]).sum() / w.sum())
        out[k] = math.sqrt(sky_var / (sky_var + max(b, 0.0)))
    return out


def _model_psf(size, scale, pixfrac, offsets, fwhm, beta, oversample):
    """A noise-free star at the centre of a ``size``² output stamp, drizzled like the data."""
    c = size // 2
    nat = int(math.ceil(size * scale)) + 3
    exps = []
    for off in offsets:
        x, y = _native_position(c, c, scale, off)
        img = _render((nat, nat), np.array([[x, y]]), np.array([1.0]), [], fwhm, beta,
                      oversample, 0.0)
        exps.append((img, None, 1.0, off))
    psf, _, _ = _drizzle_epoch((size, size), scale, pixfrac, exps, variance=False)
    psf = np.nan_to_num(psf.astype(np.float64))
    return psf / psf.sum()


def make_drizzled_pair(shape=(1024, 1024), *, seed=0, scale=0.5, pixfrac=0.8,
                       fwhm=1.5, beta=2.5, n_new=4, n_ref=8, exptime=400.0, sky=40.0,
                       read_noise=3.5, n_stars=150, star_flux=(100.0, 3e5), n_galaxies=20,
                       galaxy_flux=(2e3, 5e4), n_transients=16, transient_snr=(8.0, 60.0),
                       on_host=4, pointing_error=0.01, psf_error=0.0, ref_fwhm=None,
                       psf_size=31, oversample=5) -> DrizzledPair:
    """Simulate a drizzled new/reference pair of the same field.

    Parameters
    ----------
    shape : tuple of int
        Output (drizzled) grid ``(ny, nx)``.
    seed : int
        Seed of every random choice; the same seed gives the same pair.
    scale : float
        Output pixel side in detector pixels (0.5: twice as many pixels per axis).
    pixfrac : float
        Drizzle drop size, as a fraction of a detector pixel (0 < pixfrac <= 1).
    fwhm, beta : float
        Detector-pixel FWHM and Moffat beta of the optics' PSF (new epoch);
        ``ref_fwhm`` for the reference (default: the same).
    n_new, n_ref : int
        Dithered exposures per epoch (2x2 half-pixel boxes, the second box of the
        reference offset by a quarter pixel).
    exptime, sky, read_noise : float
        Seconds per exposure, sky electrons per detector pixel and exposure, and
        read noise in electrons (gain 1).
    n_stars, star_flux, n_galaxies, galaxy_flux : int, (float, float)
        Static sources per field and their total electrons per exposure (log-uniform).
    n_transients, transient_snr : int, (float, float)
        Point sources in the new epoch only, with S/N against the sky alone
        (``sky_snr``) log-uniform in the range.
    on_host : int
        How many of the transients sit on a galaxy (offset by up to one scale length).
    pointing_error : float
        RMS (detector pixels) of each exposure's true pointing about the offset the
        drizzle assumes: residual registration noise.
    psf_error : float
        Fractional FWHM error of the model PSFs (0: models from the true optics).
    psf_size : int
        Odd side of the model PSF stamps, output pixels.
    oversample : int
        Sub-samples per detector pixel and axis when rendering.

    Returns
    -------
    DrizzledPair

    Raises
    ------
    ConfigError
        A parameter is out of range.
    ImportError
        The ``drizzle`` package is not installed.
    """
    ny, nx = (int(v) for v in shape)
    ref_fwhm = fwhm if ref_fwhm is None else float(ref_fwhm)
    checks = [(ny >= 128 and nx >= 128, "shape", shape, "at least 128 x 128"),
              (0 < scale <= 1, "scale", scale, "in (0, 1]"),
              (0 < pixfrac <= 1, "pixfrac", pixfrac, "in (0, 1]"),
              (fwhm > 0 and ref_fwhm > 0, "fwhm", (fwhm, ref_fwhm), "> 0"),
              (beta > 1, "beta", beta, "> 1"),
              (n_new >= 1 and n_ref >= 1, "n_new/n_ref", (n_new, n_ref), ">= 1"),
              (exptime > 0 and sky >= 0 and read_noise >= 0, "exptime/sky/read_noise",
               (exptime, sky, read_noise), "> 0, >= 0, >= 0"),
              (psf_size % 2 == 1 and psf_size >= 9, "psf_size", psf_size, "odd and >= 9"),
              (0 <= on_host <= min(n_transients, n_galaxies), "on_host", on_host,
               "in [0, min(n_transients, n_galaxies)]")]
    for ok, name, value, req in checks:
        if not ok:
            raise ConfigError(f"{name} must be {req}, got {value!r}")
    rng = np.random.default_rng([seed, 7001])
    nat_shape = (int(math.ceil(ny * scale)) + 3, int(math.ceil(nx * scale)) + 3)
    # output pixels kept free of sources at the edges: stars 12; galaxies and
    # transients 40, so that no host is cut by the border (whose cut sources
    # the pipeline rightly keeps candidates away from)
    def uniform_xy(n, margin=12.0):
        return rng.uniform(margin, nx - margin, n), rng.uniform(margin, ny - margin, n)

    def loguni(lo_hi, n):
        lo, hi = lo_hi
        return np.exp(rng.uniform(math.log(lo), math.log(hi), n))

    sx, sy = uniform_xy(n_stars)
    sflux = loguni(star_flux, n_stars)
    gx, gy = uniform_xy(n_galaxies, 40.0)
    gflux = loguni(galaxy_flux, n_galaxies)
    gscale = rng.uniform(2.0, 8.0, n_galaxies)  # detector pixels
    gq = rng.uniform(0.4, 1.0, n_galaxies)
    gtheta = rng.uniform(0.0, math.pi, n_galaxies)

    off_new = _dithers(n_new, rng, 0.02, np.array([0.0, 0.0]))
    off_ref = _dithers(n_ref, rng, 0.02, np.array([0.1, 0.2]))
    psf_n = _model_psf(psf_size, scale, pixfrac, off_new, fwhm * (1 + psf_error), beta,
                       oversample)
    psf_r = _model_psf(psf_size, scale, pixfrac, off_ref, ref_fwhm * (1 + psf_error), beta,
                       oversample)
    # white-equivalent noise of the drizzled sky per output pixel: the sum of a source's
    # output pixels averages n exposures over its area in detector pixels (scale² each)
    rate_sigma = math.sqrt(sky + read_noise ** 2) / exptime
    sig_n = scale * rate_sigma / math.sqrt(n_new)
    sig_r = scale * rate_sigma / math.sqrt(n_ref)
    fs = background_fs(psf_n, psf_r, sig_n, sig_r)
    tx, ty = uniform_xy(n_transients, 40.0)
    host = np.full(n_transients, -1)
    hosts = rng.choice(n_galaxies, size=min(on_host, n_galaxies), replace=False)
    for k, g in enumerate(hosts):  # distinct hosts: one transient per galaxy
        r = rng.uniform(0.0, gscale[g]) / scale
        a = rng.uniform(0.0, 2 * math.pi)
        tx[k] = np.clip(gx[g] + r * math.cos(a), 40.0, nx - 40.0)
        ty[k] = np.clip(gy[g] + r * math.sin(a), 40.0, ny - 40.0)
        host[k] = g
    tsnr = loguni(transient_snr, n_transients)
    tflux = tsnr / math.sqrt(fs)  # e-/s

    def epoch(offsets, f, stream, with_transients):
        exps = []
        for k, off in enumerate(offsets):
            true = off + rng.normal(0.0, pointing_error, 2)
            px, py = _native_position(sx, sy, scale, true)
            pos, flux = np.column_stack([px, py]), sflux
            if with_transients:
                qx, qy = _native_position(tx, ty, scale, true)
                pos = np.vstack([pos, np.column_stack([qx, qy])])
                flux = np.concatenate([flux, tflux * exptime])
            hx, hy = _native_position(gx, gy, scale, true)
            gals = list(zip(hx, hy, gflux, gscale, gq, gtheta))
            model = _render(nat_shape, pos, flux, gals, f, beta, oversample, sky)
            var = model + read_noise ** 2
            noise = np.random.default_rng([seed, stream, k]).standard_normal(nat_shape)
            exps.append((model + np.sqrt(var) * noise, var, exptime, off))
        return _drizzle_epoch((ny, nx), scale, pixfrac, exps)

    new, new_err, new_wht = epoch(off_new, fwhm, 1, True)
    ref, ref_err, ref_wht = epoch(off_ref, ref_fwhm, 2, False)
    sky_rate = sky / exptime * scale * scale
    meta = dict(seed=seed, scale=scale, pixfrac=pixfrac, fwhm=fwhm, ref_fwhm=ref_fwhm,
                beta=beta, n_new=n_new, n_ref=n_ref, exptime=exptime, sky=sky,
                read_noise=read_noise, pointing_error=pointing_error, psf_error=psf_error,
                flux_ratio=1.0, sky_rate=sky_rate, sigma_new=sig_n, sigma_ref=sig_r, fs=fs,
                pix_sigma_new=float(np.nanmedian(new_err)),
                pix_sigma_ref=float(np.nanmedian(ref_err)))
    local = _source_noise_factor(nat_shape, (sx, sy, sflux), (gx, gy, gflux, gscale, gq, gtheta),
                                 (tx, ty), scale, off_new[0], fwhm, beta, oversample,
                                 sky + read_noise ** 2)
    transients = Table(dict(x=tx, y=ty, flux=tflux, sky_snr=tsnr, expected_snr=tsnr * local,
                            host=host))
    stars = Table(dict(x=sx, y=sy, flux=sflux / exptime))
    galaxies = Table(dict(x=gx, y=gy, flux=gflux / exptime, scale=gscale, q=gq, theta=gtheta))
    return DrizzledPair(new, ref, new_err.astype(np.float32), ref_err.astype(np.float32),
                        new_wht, ref_wht, psf_n, psf_r, transients, stars, galaxies, meta)


def write_drizzled_pair(outdir, shape=(1024, 1024), *, seed=0, **options) -> dict[str, Path]:
    """Simulate a pair (:func:`make_drizzled_pair`) and write it as drizzle products.

    Each epoch is one file with ``SCI``, ``ERR`` and ``WHT`` image extensions (as
    HST and JWST pipelines write them); the model PSFs go to ``new_psf.fits`` and
    ``ref_psf.fits`` and the transients to ``truth.ecsv``.

    Returns
    -------
    dict
        Paths: ``new``, ``ref`` (the files), ``new_psf``, ``ref_psf``, ``truth``; give
        the images as ``path[SCI]`` and the errors as ``path[ERR]``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    pair = make_drizzled_pair(shape, seed=seed, **options)
    m = pair.meta
    paths = {}
    for label, n_exp in (("new", m["n_new"]), ("ref", m["n_ref"])):
        h = fits.Header()
        h["TELESCOP"] = "SIMULATED"
        h["EXPTIME"] = (m["exptime"] * n_exp, "total exposure time (s)")
        h["NCOMBINE"] = (n_exp, "exposures drizzled")
        h["BUNIT"] = "ELECTRONS/S"
        h["PIXFRAC"] = m["pixfrac"]
        hdus = [fits.PrimaryHDU(header=h)]
        for ext, arr in (("SCI", getattr(pair, label)), ("ERR", getattr(pair, f"{label}_err")),
                         ("WHT", getattr(pair, f"{label}_wht"))):
            hdus.append(fits.ImageHDU(arr, name=ext))
        paths[label] = outdir / f"{label}.fits"
        fits.HDUList(hdus).writeto(paths[label], overwrite=True)
        paths[f"{label}_psf"] = outdir / f"{label}_psf.fits"
        fits.writeto(paths[f"{label}_psf"], getattr(pair, f"{label}_psf").astype(np.float32),
                     overwrite=True)
    truth = pair.transients.copy()
    truth.meta.update({k: v for k, v in m.items()})
    paths["truth"] = outdir / "truth.ecsv"
    truth.write(paths["truth"], overwrite=True)
    return paths
