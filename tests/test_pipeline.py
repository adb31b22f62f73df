"""The streaming pipeline: physics on simulated scenes, tiling, masks, inputs."""

import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack

from benchmarks.baseline_numpy import zogy_numpy
from zogy_stream import ConfigError, InputError, stream
from zogy_stream.demo import match_truth
from zogy_stream.fft import Wisdom
from zogy_stream.masks import MaskBit
from zogy_stream.simulate import make_scene
from zogy_stream.zogy import snap_sigma
from conftest import floored

PLANES = ("d", "s", "scorr", "flux", "flux_err", "mask")


def run(new, ref, **kw):
    """Stitch the streamed tiles into whole images; return planes and candidates."""
    out, cands = {}, []
    for res in stream(new, ref, **kw):
        for name in PLANES:
            arr = getattr(res, name)
            if name not in out:
                out[name] = np.full(_shape(new), np.nan if name != "mask" else 0,
                                    dtype=arr.dtype)
            out[name][res.box.slices] = arr
        cands.append(res.candidates)
    assert all(np.all(np.isfinite(out[k])) for k in PLANES if k != "mask"), "tiles missing"
    return out, vstack(cands) if cands else None


def _shape(src):
    from zogy_stream.fitsio import ImageReader

    with ImageReader(src) as rd:
        return rd.shape


def scene_kwargs(scene, **extra):
    sat = scene.meta["saturation"]
    return dict(new_psf=scene.new_psf, ref_psf=scene.ref_psf, new_var=scene.new_var,
                ref_var=scene.ref_var, flux_ratio=scene.meta["flux_ratio"], wisdom=False,
                new_saturation=sat, ref_saturation=sat, **extra)


SATURATE = 30000.0


@pytest.fixture(scope="module")
def crowded():
    """Stars, galaxies, transients, F_n/F_r = 1.25, and saturated bright stars."""
    import dataclasses

    from conftest import add_source

    sc = make_scene((1024, 1024), seed=7, n_transients=60, transient_snr=(7, 60),
                    n_galaxies=30, new_fwhm=4.2, ref_fwhm=3.0, flux_ratio=1.25,
                    sky_new=800.0, sky_ref=1200.0, gain=2.0, star_density=3000)
    rng = np.random.default_rng(70)
    imgs = {}
    for name, psf, scale in (("new", sc.new_psf, 1.25), ("ref", sc.ref_psf, 1.0)):
        model = np.zeros(sc.new.shape)
        for y, x in ((150, 820), (700, 300), (880, 900), (420, 560)):
            add_source(model, psf, 2e6 * scale, y, x)
        var = getattr(sc, f"{name}_var") + model / 2.0  # gain 2
        img = getattr(sc, name) + model + rng.normal(0, 1, model.shape) * np.sqrt(model / 2.0)
        imgs[name] = np.minimum(img, SATURATE).astype(np.float32)
        imgs[f"{name}_var"] = var.astype(np.float32)
    return dataclasses.replace(sc, meta=dict(sc.meta, saturation=SATURATE), **imgs)


@pytest.fixture(scope="module")
def crowded_result(crowded):
    return run(crowded.new, crowded.ref, **scene_kwargs(crowded, tile=512))


def test_transients_recovered_at_expected_snr_with_unbiased_flux(crowded, crowded_result):
    out, cands = crowded_result
    tr = crowded.transients
    idx = match_truth(tr, cands, radius=2.0)
    ok = idx >= 0
    assert ok.mean() >= 0.95, f"recovered {ok.sum()}/{len(tr)}"
    peak = np.array([cands["scorr"][j] for j in idx[ok]])
    ratio = peak / np.asarray(tr["expected_snr"])[ok]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.15)
    flux = np.array([cands["flux"][j] for j in idx[ok]])
    err = np.array([cands["flux_err"][j] for j in idx[ok]])
    true = np.asarray(tr["flux"])[ok]
    assert np.median(flux / true) == pytest.approx(1.0, abs=0.05)
    pulls = (flux - true) / err
    assert 0.7 < np.std(pulls) < 1.3
    # positions: sub-pixel centroids close to the truth
    dx = np.array([cands["x"][j] for j in idx[ok]]) - np.asarray(tr["x"])[ok]
    dy = np.array([cands["y"][j] for j in idx[ok]]) - np.asarray(tr["y"])[ok]
    assert np.sqrt(np.mean(dx ** 2 + dy ** 2)) < 0.5


def test_crowded_field_noise_and_false_positives(crowded, crowded_result):
    out, cands = crowded_result
    clean = out["mask"] == 0
    yy, xx = np.indices(clean.shape)
    for x, y in zip(crowded.transients["x"], crowded.transients["y"]):
        box = (slice(max(int(y) - 15, 0), int(y) + 16), slice(max(int(x) - 15, 0), int(x) + 16))
        clean[box] = False   # the transients themselves are signal, not noise
    assert out["scorr"][clean].std() == pytest.approx(1.0, abs=0.05)
    assert out["d"][clean].std() == pytest.approx(1.0, abs=0.08)
    d = np.where(clean, out["d"], 0.0)
    rho = np.mean(d[:, 1:] * d[:, :-1]) / np.mean(d * d)
    assert abs(rho) < 0.05
    matched = set(match_truth(crowded.transients, cands, radius=2.0).tolist())
    false = [i for i in range(len(cands)) if i not in matched]
    assert len(false) <= 4  # 1 Mpix: the bound is 4 per Mpix
    # saturated stars are masked and never yield candidates
    assert np.any(out["mask"] & MaskBit.SATURATED)
    for row in cands:
        assert not (out["mask"][row["y_peak"], row["x_peak"]] & MaskBit.SATURATED)


def test_blank_sky_normalisation_without_variance_maps():
    scene = make_scene((768, 768), seed=3, blank=True, sky_new=500.0, sky_ref=900.0)
    out, cands = run(scene.new, scene.ref, new_psf=scene.new_psf, ref_psf=scene.ref_psf,
                     tile=256, wisdom=False)
    inner = (slice(20, -20), slice(20, -20))
    assert out["d"][inner].std() == pytest.approx(1.0, abs=0.02)
    assert out["scorr"][inner].std() == pytest.approx(1.0, abs=0.02)
    fs = out["s"][inner].var() / (out["s"][inner] / out["flux"][inner]).mean()
    assert fs == pytest.approx(1.0, abs=0.06)  # var(S) = F_S
    assert np.allclose(out["flux_err"][inner] * np.sqrt(out["s"][inner] / out["flux"][inner]),
                       1.0, rtol=0.03)
    # a Gaussian field gives ~ N * P(|x| > 5) = 0 false detections
    assert len(cands) <= 1


@pytest.mark.parametrize("variance", [True, False])
def test_tile_size_invariance(crowded, variance):
    kw = scene_kwargs(crowded)
    if not variance:
        kw.pop("new_var"), kw.pop("ref_var")
    a, _ = run(crowded.new, crowded.ref, tile=256, **kw)
    b, _ = run(crowded.new, crowded.ref, tile=384, **kw)
    diff = np.abs(a["scorr"] - b["scorr"])
    assert np.median(diff) < 0.005
    assert np.mean(diff > 0.1) < 0.01
    assert np.array_equal(a["mask"], b["mask"])


def test_streamed_equals_plain_whole_image_computation():
    """Tiled float32 pipeline vs an independent whole-image float64 NumPy ZOGY."""
    scene = make_scene((640, 640), seed=5, n_stars=150, n_transients=15, sky_new=0.0,
                       sky_ref=0.0, new_fwhm=3.6, ref_fwhm=2.7, flux_ratio=0.9)
    sn, sr = scene.meta["sigma_new"], scene.meta["sigma_ref"]
    vn = np.full(scene.new.shape, sn ** 2, np.float32)
    vr = np.full(scene.new.shape, sr ** 2, np.float32)
    out, _ = run(scene.new, scene.ref, new_psf=scene.new_psf, ref_psf=scene.ref_psf,
                 new_var=vn, ref_var=vr, flux_ratio=0.9, background=False, tile=200, wisdom=False)
    # the pipeline builds kernels at noise levels snapped to a 2% grid
    ref = zogy_numpy(scene.new.astype(float), scene.ref.astype(float), floored(scene.new_psf),
                     floored(scene.ref_psf), snap_sigma(sn), snap_sigma(sr), new_var=vn,
                     ref_var=vr, flux_ratio=0.9)
    inner = (slice(60, -60), slice(60, -60))  # away from the periodic wrap of the baseline
    for key in ("d", "scorr", "flux", "flux_err"):
        a, b = out[key][inner], ref[key][inner]
        scale = max(1.0, np.abs(b).max())
        assert np.max(np.abs(a - b)) < 2e-4 * scale, key


def test_estimated_psfs_overlap_keeps_d_within_0p02_sigma_of_the_whole_image():
    """With PSFs stacked from stars the overlap holds all but 1e-5 of the kernels'
    energy (1e-6 with PSFs given): smaller, and D still equals the whole-image
    computation with the same PSFs to < 0.02 sigma (a third of it: > 0.05)."""
    from zogy_stream import Options, plan_run
    from zogy_stream.plan import _KERNEL_TOL_GIVEN, Inputs
    from zogy_stream.zogy import kernel_radius

    scene = make_scene((768, 768), seed=3, n_transients=5, flux_ratio=1.2, saturation=60000,
                       new_fwhm=4.0, ref_fwhm=3.0, star_flux=(300, 3e5), star_density=2000)
    plan = plan_run(Inputs(new=scene.new, ref=scene.ref),
                    Options.from_kwargs(wisdom=False, tile=256, cosmic_rays="off",
                                        local_psf=False))
    src_n, src_r = plan.psf_sources
    assert src_n.method == src_r.method == "stars"
    kw = dict(sigma_n=plan.sigma[0], sigma_r=plan.sigma[1], flux_ratio=plan.flux_ratio)
    assert plan.kernel_radius < kernel_radius(src_n.psf, src_r.psf, tol=_KERNEL_TOL_GIVEN, **kw)
    common = dict(new_psf=src_n.psf, ref_psf=src_r.psf, flux_ratio=plan.flux_ratio,
                  astrometric_sigma=plan.astrometric_sigma, cosmic_rays="off", wisdom=False,
                  background=False)
    whole, _ = run(scene.new, scene.ref, tile=768, overlap=300, **common)
    inner = (slice(40, -40), slice(40, -40))
    for margin, lo, hi in ((plan.grid.margin, 0.0, 0.02), (plan.grid.margin // 3, 0.05, np.inf)):
        tiled, _ = run(scene.new, scene.ref, tile=256, overlap=margin, **common)
        err = np.abs(tiled["d"] - whole["d"])[inner].max()
        assert lo < err < hi, (margin, err)
    # PSFs given: the whole-image precision of the tiles stays
    given = plan_run(Inputs(new=scene.new, ref=scene.ref, new_psf=src_n.psf, ref_psf=src_r.psf),
                     Options.from_kwargs(wisdom=False, tile=256, cosmic_rays="off",
                                         flux_ratio=plan.flux_ratio))
    assert given.kernel_radius == kernel_radius(
        given.new_psf, given.ref_psf, tol=_KERNEL_TOL_GIVEN, sigma_n=given.sigma[0],
        sigma_r=given.sigma[1], flux_ratio=given.flux_ratio)


def test_fourier_and_image_space_agree():
    scene = make_scene((512, 512), seed=9, n_transients=10, new_fwhm=3.5, ref_fwhm=2.5)
    kw = scene_kwargs(scene, tile=256, astrometric_sigma=(0.05, 0.03))
    f, cf = run(scene.new, scene.ref, **kw)
    i, ci = run(scene.new, scene.ref, image_space=True, **kw)
    for key in ("d", "scorr"):
        assert np.max(np.abs(f[key] - i[key])) < 5e-3, key
    assert np.max(np.abs(f["flux"] - i["flux"]) / f["flux_err"]) < 5e-3
    assert len(cf) == len(ci)


def test_masks_nan_saturation_and_user_mask():
    scene = make_scene((512, 512), seed=4, n_transients=5)
    new = scene.new.copy()
    new[100:110, 200:260] = np.nan                    # a dead region in NEW
    ref = scene.ref.copy()
    ref[300, 300] = np.inf
    user = np.zeros(new.shape, np.uint8)
    user[400:420, 50:70] = 1
    out, cands = run(new, ref, new_psf=scene.new_psf, ref_psf=scene.ref_psf, new_mask=user,
                     new_saturation=float(np.nanpercentile(scene.new, 99.99)), tile=256,
                     wisdom=False)
    m = out["mask"]
    assert np.all(m[100:110, 200:260] & MaskBit.BAD_NEW)
    assert m[300, 300] & MaskBit.BAD_REF
    assert np.all(m[400:420, 50:70] & MaskBit.USER)
    assert m[95, 230] & MaskBit.NEAR and m[112, 230] & MaskBit.NEAR   # grown footprint
    assert not m[150, 230] & MaskBit.NEAR
    assert np.all(m[:3] & MaskBit.EDGE) and not m[256, 256] & MaskBit.EDGE
    assert np.any(m & MaskBit.SATURATED)
    for k in ("d", "s", "scorr", "flux", "flux_err"):
        assert np.all(np.isfinite(out[k]))
    bad = MaskBit.BAD_NEW | MaskBit.BAD_REF | MaskBit.USER | MaskBit.SATURATED | MaskBit.NEAR
    for row in cands:
        assert not m[row["y_peak"], row["x_peak"]] & bad
    # filled pixels do not ring: S_corr next to the dead region stays noise-like
    assert np.abs(out["scorr"][60:90, 200:260]).max() < 5


def test_nonpositive_variance_is_an_input_error():
    scene = make_scene((256, 256), seed=1, n_transients=0)
    var = scene.new_var.copy()
    var[10, 10] = 0.0
    with pytest.raises(InputError, match="variance"):
        run(scene.new, scene.ref, **dict(scene_kwargs(scene), new_var=var))


def test_wisdom_written_then_reused(tmp_path):
    scene = make_scene((256, 256), seed=2, n_transients=0)
    path = tmp_path / "w" / "wisdom.bin"
    kw = dict(new_psf=scene.new_psf, ref_psf=scene.ref_psf, tile=200, wisdom=path)
    for _ in stream(scene.new, scene.ref, **kw):
        pass
    assert path.is_file() and path.stat().st_size > 100
    w = Wisdom(path)
    assert w.load() and w.loaded
    # a corrupt file is ignored with a warning, never an error, and written anew
    path.write_bytes(b"garbage")
    for _ in stream(scene.new, scene.ref, **kw):
        pass
    assert Wisdom(path).load()
    # a new wisdom path is written even when this process already knows the plans
    other = tmp_path / "other" / "wisdom.bin"
    for _ in stream(scene.new, scene.ref, **dict(kw, wisdom=other)):
        pass
    assert Wisdom(other).load()


def test_unwritable_wisdom_warns_once_per_process(tmp_path):
    """A wisdom file that cannot be written: a warning naming the fix in the run
    that planned (what it learned is lost), a debug message only in later runs of
    the same process that knew their plans (a daemon's jobs), no error."""
    import subprocess
    import sys

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = (
        "import logging, sys; from zogy_stream import stream; "
        "from zogy_stream.simulate import make_scene; "
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format='%(levelname)s %(message)s'); "
        "logging.getLogger('numba').setLevel(logging.WARNING); "
        "sc = make_scene((256, 256), seed=2, n_transients=0); "
        f"kw = dict(new_psf=sc.new_psf, ref_psf=sc.ref_psf, tile=200, wisdom={str(blocker / 'w.bin')!r}); "
        "[None for run in range(3) for _ in stream(sc.new, sc.ref, **kw)]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    saves = [ln for ln in r.stdout.splitlines() if "could not save FFTW wisdom" in ln]
    assert len(saves) == 3, r.stdout  # every run tries (the file is missing) ...
    assert saves[0].startswith("WARNING") and "--wisdom" in saves[0]
    assert all(s.startswith("DEBUG") for s in saves[1:])  # ... but warns once



def test_pyfftw_imported_without_its_unused_backends():
    """A fresh process importing zogy_stream does not pay for pyfftw's scipy.fftpack
    and dask.array wrappers, leaves them importable, and leaves an already
    imported scipy.fftpack to pyfftw as usual."""
    import subprocess
    import sys

    code = ("import sys, zogy_stream; "
            "print('scipy.fftpack' in sys.modules, 'dask.array' in sys.modules, "
            "sys.modules.get('dask.array.fft', 0) is None); "
            "import pyfftw.interfaces.scipy_fftpack as m, numpy as np; "
            "print(np.allclose(m.fft(np.arange(8.0)), np.fft.fft(np.arange(8.0))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False", "False", "True"]
    code = ("import scipy.fftpack, zogy_stream, pyfftw; "
            "print(hasattr(pyfftw.interfaces, 'scipy_fftpack'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True"]

def _write(path, data, **header):
    hdu = fits.PrimaryHDU(data)
    for k, v in header.items():
        hdu.header[k] = v
    hdu.writeto(path, overwrite=True)
    return str(path)


def test_big_endian_bscale_compressed_and_extension_inputs(tmp_path):
    """FITS byte order, integer scaling, BLANK, tile compression and [EXT] all
    give the same result as the equivalent float arrays."""
    scene = make_scene((300, 300), seed=8, n_transients=3, sky_new=2000, sky_ref=2000)
    kw = dict(new_psf=scene.new_psf, ref_psf=scene.ref_psf, tile=128, wisdom=False)
    q_new = np.round((scene.new - 1000.0) / 0.5).astype(np.int16)   # BSCALE 0.5, BZERO 1000
    new_f = (q_new.astype(np.float32) * 0.5 + 1000.0).astype(np.float32)
    ref64 = scene.ref.astype(">f8")                                   # big-endian float64
    base, _ = run(new_f, scene.ref.astype(np.float32), **kw)
    # int16 + BSCALE/BZERO, written raw so astropy does not rescale it
    p_int = tmp_path / "new_int.fits"
    hdu = fits.PrimaryHDU(q_new)
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 1000.0
    hdu.writeto(p_int)
    p_ref = _write(tmp_path / "ref64.fits", ref64)
    got, _ = run(str(p_int), p_ref, **kw)
    for k in ("scorr", "d"):
        assert np.allclose(got[k], base[k], atol=1e-4), k
    # tile-compressed (lossless RICE on integers) in extension 1, and by name
    comp = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(q_new, compression_type="RICE_1",
                                                              name="SCI")])
    comp[1].header["BSCALE"] = 0.5
    comp[1].header["BZERO"] = 1000.0
    p_fz = tmp_path / "new.fits.fz"
    comp.writeto(p_fz)
    with fits.open(p_fz) as h:
        assert np.array_equal(h[1].data.astype(np.float32), new_f)  # what astropy reads
    for spec in (f"{p_fz}[1]", f"{p_fz}[SCI]", str(p_fz)):
        got, _ = run(spec, p_ref, **kw)
        assert np.allclose(got["scorr"], base["scorr"], atol=1e-4), spec
    # BLANK in integer data becomes NaN and is masked
    q2 = q_new.copy()
    q2[50, 60] = -32768
    hdu = fits.PrimaryHDU(q2)
    hdu.header["BLANK"] = -32768
    hdu.writeto(tmp_path / "blank.fits")
    got, _ = run(str(tmp_path / "blank.fits"), p_ref, **kw)
    assert got["mask"][50, 60] & MaskBit.BAD_NEW


@pytest.mark.parametrize("psf_size", [23, 24])
def test_pipeline_keeps_sources_on_their_pixel(psf_size):
    """Odd and even PSF stamps through the whole pipeline (tile edges included)."""
    from conftest import add_source, gaussian

    rng = np.random.default_rng(0)
    new = rng.normal(100, 5, (300, 300)).astype(np.float32)
    ref = rng.normal(100, 5, (300, 300)).astype(np.float32)
    psf = gaussian(3.0, n=psf_size)
    for y, x in ((64, 64), (127, 128), (128, 200)):   # on and next to a tile border
        add_source(new, psf, 4000.0, y, x)
    out, cands = run(new, ref, new_psf=psf, ref_psf=psf, tile=128, wisdom=False)
    found = {(int(r["y_peak"]), int(r["x_peak"])) for r in cands if r["scorr"] > 0}
    assert {(64, 64), (127, 128), (128, 200)} <= found
    assert len(cands) == 3


def test_source_cut_by_the_border_gives_no_candidate(monkeypatch):
    """A bright star centred on the image border: the border truncates it, so its
    convolutions cannot cancel and, unmasked, it leaves a > 20 sigma residual."""
    import zogy_stream.engine as eng
    from conftest import gaussian

    n = 256
    y, x = np.indices((n, n))

    def image(fwhm, seed):
        s = fwhm / 2.3548
        star = 3e5 / (2 * np.pi * s * s) * np.exp(-(x ** 2 + (y - 128) ** 2) / (2 * s * s))
        return (np.random.default_rng(seed).normal(0, 10, (n, n)) + star).astype(np.float32)

    new, ref = image(4.0, 1), image(3.0, 2)
    kw = dict(new_psf=gaussian(4.0, 25), ref_psf=gaussian(3.0, 25), flux_ratio=1.0,
              wisdom=False, tile=256, cosmic_rays="off",
              new_var=(100.0 + np.clip(new, 0, None)).astype(np.float32),
              ref_var=(100.0 + np.clip(ref, 0, None)).astype(np.float32))
    res = list(stream(new, ref, **kw))[0]
    assert len(res.candidates) == 0
    assert res.mask[128, 5] & MaskBit.NEAR  # the residual's neighbourhood is masked
    monkeypatch.setattr(eng, "_cut_sources", lambda *a, **k: None)
    bare = list(stream(new, ref, **kw))[0].candidates
    assert len(bare) >= 1 and np.max(np.abs(bare["scorr"])) > 10  # what it guards against


@pytest.mark.parametrize("side", ["left", "top", "right", "bottom"])
def test_bright_source_near_the_border_masked_over_its_footprint(side):
    """A star centred 3 px inside the border, bright enough to be cut by it: NEAR
    covers its whole > 5 sigma footprint widened by the radius (the square of
    ``radius`` around the hot border pixels alone ended inside the star), and
    a fainter star whose border pixels stay below 10 sigma is left alone."""
    import zogy_stream.engine as eng
    from zogy_stream.tiles import TileGrid

    n, sig, radius = 96, 10.0, 4
    y, x = np.indices((n, n), dtype=float)
    s = 4.0 / 2.3548

    def star(flux, cy, cx):
        return flux / (2 * np.pi * s * s) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))

    where = {"left": (30, 3), "top": (3, 30), "right": (30, n - 4), "bottom": (n - 4, 30)}
    bright = star(3e6, *where[side])
    faint = star(3e3, *((80, 3) if side in ("left", "right") else (3, 80)))
    if side in ("right", "bottom"):
        faint = faint[::-1, ::-1]
    img = (bright + faint).astype(np.float32)
    tile = next(iter(TileGrid((n, n), 128, 8)))
    w = tile.window
    planes = np.zeros((2, w.y1 - w.y0, w.x1 - w.x0), np.float32)
    vin = tile.valid_in_window
    planes[0][vin.slices] = img
    grown = np.zeros(planes.shape[1:], np.uint8)
    grown[:] = MaskBit.OUTSIDE
    grown[vin.slices] = 0
    eng._cut_sources(planes, grown, tile, (n, n), (sig, sig), radius)
    near = (grown[vin.slices] & MaskBit.NEAR) != 0
    foot = bright > 5 * sig  # the star's footprint
    depth = {"left": x[foot].max(), "top": y[foot].max(), "right": n - 1 - x[foot].min(),
             "bottom": n - 1 - y[foot].min()}[side]
    assert depth > radius + 2  # the star reaches further in than the old square
    grow = np.zeros((n, n), bool)
    for yy, xx in zip(*np.nonzero(foot)):
        grow[max(0, yy - radius):yy + radius + 1, max(0, xx - radius):xx + radius + 1] = True
    assert near[grow].all()
    assert not near[faint > 5 * sig].any()  # border pixels < 10 sigma: not cut
    assert near.sum() < 3 * grow.sum()


def test_band_settled_and_unsettled_outputs_are_identical(tmp_path, caplog):
    """Gathering row bands written with direct I/O (the default), writing tiles through
    the memory map and settling each finished band (``write_buffer=0``), and leaving
    the write-back to the kernel (``settle=False``) give the same output."""
    from zogy_stream import subtract
    from zogy_stream.simulate import make_scene

    sc = make_scene((600, 520), seed=3, n_transients=5)
    kw = dict(new_psf=sc.new_psf, ref_psf=sc.ref_psf, flux_ratio=sc.meta["flux_ratio"],
              tile=256, wisdom=False)
    with caplog.at_level(logging.DEBUG, logger="zogy_stream.pipeline"):
        bands = subtract(sc.new, sc.ref, tmp_path / "bands.fits", **kw)
    assert "output written in row bands of 3 MiB" in caplog.text
    caplog.clear()
    on = subtract(sc.new, sc.ref, tmp_path / "on.fits", write_buffer=0, **kw)
    off = subtract(sc.new, sc.ref, tmp_path / "off.fits", settle=False, write_buffer=0, **kw)
    assert bands.timings.get("settle", 0) > 0 and on.timings.get("settle", 0) > 0
    assert "settle" not in off.timings
    with fits.open(tmp_path / "bands.fits") as a, fits.open(tmp_path / "on.fits") as b, \
            fits.open(tmp_path / "off.fits") as c:
        for name in ("D", "S", "SCORR", "FLUX", "FLUX_ERR", "MASK"):
            np.testing.assert_array_equal(a[name].data, b[name].data)
            np.testing.assert_array_equal(c[name].data, b[name].data)
    # a band larger than the budget is written through the memory map
    with caplog.at_level(logging.DEBUG, logger="zogy_stream.pipeline"):
        small = subtract(sc.new, sc.ref, tmp_path / "small.fits", write_buffer=1, **kw)
    assert "writing tiles through the memory map" in caplog.text
    assert small.timings.get("settle", 0) > 0
    with fits.open(tmp_path / "small.fits") as a, fits.open(tmp_path / "on.fits") as b:
        np.testing.assert_array_equal(a["SCORR"].data, b["SCORR"].data)


def test_parallel_tiles_give_the_same_products(tmp_path, caplog, monkeypatch):
    """Two (or three) tiles processed at once, each on its own FFT plans and buffers,
    give the products and candidates of one tile at a time, byte for byte; the
    default takes 2 at once when the output is gathered in row bands.  So does the
    fallback where Numba cannot be asked for its threading layer up front (the
    first tile then runs alone)."""
    from zogy_stream import _numba as nk
    from zogy_stream import subtract
    from zogy_stream.simulate import make_scene

    sc = make_scene((600, 520), seed=4, n_transients=8, star_density=2000, star_flux=(300, 3e5))
    kw = dict(new_var=sc.new_var, ref_var=sc.ref_var, flux_ratio=sc.meta["flux_ratio"],
              tile=128, wisdom=False, threads=2)  # 25 tiles, PSFs estimated per tile
    # the reference on one thread, as each of the tiles at once: FFTW's plans for 1 and
    # 2 threads may use different algorithms, whose products differ in round-off
    one = subtract(sc.new, sc.ref, tmp_path / "one.fits", catalog=tmp_path / "one.ecsv",
                   parallel_tiles=1, **dict(kw, threads=1))
    with caplog.at_level(logging.DEBUG, logger="zogy_stream.pipeline"):
        auto = subtract(sc.new, sc.ref, tmp_path / "auto.fits", catalog=tmp_path / "auto.ecsv",
                        **kw)
    assert "2 tile(s) at once, 1 thread(s) each" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="zogy_stream.pipeline"):
        three = subtract(sc.new, sc.ref, tmp_path / "three.fits", parallel_tiles=3,
                         write_buffer=0, **dict(kw, threads=3))
    assert "3 tile(s) at once" in caplog.text
    monkeypatch.setattr(nk, "launch_threads", lambda: False)
    alone = subtract(sc.new, sc.ref, tmp_path / "alone.fits", parallel_tiles=2, **kw)
    assert one.n_tiles == auto.n_tiles == three.n_tiles == alone.n_tiles == 25
    with fits.open(tmp_path / "one.fits") as a, fits.open(tmp_path / "auto.fits") as b, \
            fits.open(tmp_path / "three.fits") as c, fits.open(tmp_path / "alone.fits") as d:
        for name in ("D", "S", "SCORR", "FLUX", "FLUX_ERR", "MASK"):
            np.testing.assert_array_equal(b[name].data, a[name].data)
            np.testing.assert_array_equal(c[name].data, a[name].data)
            np.testing.assert_array_equal(d[name].data, a[name].data)
    ta, tb = Table.read(tmp_path / "one.ecsv"), Table.read(tmp_path / "auto.ecsv")
    assert len(ta) == len(tb) >= 5
    for col in ("x", "y", "scorr", "flux", "flags", "tile"):
        np.testing.assert_array_equal(tb[col], ta[col])
    assert auto.timings["fft forward"] > 0 and auto.timings["candidates"] > 0  # summed back


def test_parallel_tiles_need_a_threadsafe_numba_layer(tmp_path, caplog, monkeypatch):
    """With Numba's workqueue layer (no TBB, no OpenMP) two threads must not run
    parallel kernels at once: after the first tile (where Numba picks its layer) the
    rest run one at a time, said in the log when asked for."""
    from zogy_stream import _numba as nk
    from zogy_stream import subtract
    from zogy_stream.simulate import make_scene

    assert nk.threadsafe_layer()  # this machine: omp or tbb
    monkeypatch.setattr(nk, "threadsafe_layer", lambda: False)
    sc = make_scene((256, 256), seed=6, n_transients=2)
    kw = dict(new_psf=sc.new_psf, ref_psf=sc.ref_psf, flux_ratio=1.0, tile=128, wisdom=False,
              threads=2)
    with caplog.at_level(logging.DEBUG, logger="zogy_stream.pipeline"):
        res = subtract(sc.new, sc.ref, tmp_path / "a.fits", parallel_tiles=2, **kw)
    assert "cannot run kernels from two threads at once" in caplog.text
    assert any(r.levelname == "WARNING" for r in caplog.records)
    # against one tile at a time on one thread, as the fallback ran (FFTW's plans for 1
    # and 2 threads may use different algorithms, whose products differ in round-off)
    subtract(sc.new, sc.ref, tmp_path / "b.fits", parallel_tiles=1, **dict(kw, threads=1))
    assert res.n_tiles == 4
    with fits.open(tmp_path / "a.fits") as a, fits.open(tmp_path / "b.fits") as b:
        np.testing.assert_array_equal(a["SCORR"].data, b["SCORR"].data)


def test_parallel_tiles_errors_propagate(tmp_path):
    """An input error in a tile processed beside another stops the run cleanly: the
    error is raised, nothing is left behind, and the option is validated."""
    from zogy_stream import subtract
    from zogy_stream.simulate import make_scene

    sc = make_scene((512, 512), seed=5, n_transients=3)
    var = sc.new_var.copy()
    var[400, 300] = -1.0  # a tile late in the run
    out = tmp_path / "out.fits"
    with pytest.raises(InputError, match="variance map has values <= 0"):
        subtract(sc.new, sc.ref, out, new_var=var, ref_var=sc.ref_var, new_psf=sc.new_psf,
                 ref_psf=sc.ref_psf, flux_ratio=1.0, tile=128, wisdom=False, threads=2,
                 parallel_tiles=2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="parallel_tiles must be >= 0"):
        subtract(sc.new, sc.ref, out, parallel_tiles=-1)


def test_error_maps_mask_nonpositive_errors():
    """A 1-sigma error map is variance = err**2; err <= 0 marks a pixel without data."""
    sc = make_scene((256, 256), seed=6, n_transients=4)
    kw = dict(new_psf=sc.new_psf, ref_psf=sc.ref_psf, flux_ratio=1.0, wisdom=False, tile=256)
    a = list(stream(sc.new, sc.ref, new_var=sc.new_var, ref_var=sc.ref_var, **kw))[0]
    en = np.sqrt(sc.new_var).astype(np.float32)
    en[10, 20] = 0.0
    b = list(stream(sc.new, sc.ref, new_err=en, ref_err=np.sqrt(sc.ref_var), **kw))[0]
    assert b.mask[10, 20] & MaskBit.BAD_NEW and not a.mask[10, 20] & MaskBit.BAD_NEW
    good = (a.mask == 0) & (b.mask == 0)
    assert good.mean() > 0.7  # masks of saturated stars and their kernel footprints aside
    np.testing.assert_allclose(b.scorr[good], a.scorr[good], atol=1e-3)
    with pytest.raises(InputError, match="--new-var and --new-err"):
        list(stream(sc.new, sc.ref, new_var=sc.new_var, new_err=en, **kw))


@pytest.mark.parametrize("geometric", [False, True])
def test_off_centre_psf_stamps_are_recentred(geometric, caplog, monkeypatch):
    """An even PSF stamp centred on its geometric middle (a common model convention) is
    half a pixel off ours: used as is, every star leaves a dipole in S_corr."""
    from conftest import add_source, gaussian

    from zogy_stream.psf import load_psf

    rng = np.random.default_rng(4)
    new = rng.normal(100, 5, (256, 256)).astype(np.float32)
    ref = rng.normal(100, 5, (256, 256)).astype(np.float32)
    for y, x in ((60, 70), (130, 190), (200, 40)):
        add_source(new, gaussian(3.5, n=25), 1.5e5, y, x)
        add_source(ref, gaussian(3.0, n=25), 1.5e5, y, x)
    stamp = gaussian(3.5, n=24, offset=(-0.5, -0.5) if geometric else (0.1, 0.0))
    kept = load_psf(stamp)
    assert ("re-centred" in caplog.text) == geometric
    assert np.array_equal(kept, stamp / stamp.sum()) != geometric  # 0.1 px: left alone
    if geometric:
        out, cands = run(new, ref, new_psf=stamp, ref_psf=gaussian(3.0, n=25), tile=128,
                         flux_ratio=1.0, wisdom=False)
        assert len(cands) == 0 and np.nanmax(np.abs(out["scorr"])) < 5
        # the same stamp taken as centred on pixel 12 leaves dipoles
        monkeypatch.setattr("zogy_stream.psf.centre_psf", lambda p, **k: p)
        _, bad = run(new, ref, new_psf=stamp, ref_psf=gaussian(3.0, n=25), tile=128,
                     flux_ratio=1.0, wisdom=False)
        assert len(bad) >= 3


def test_common_no_data_region_masks_only_where_it_cuts_a_source():
    """Zero coverage in both images (mosaic corners) is filled alike in both: it must not
    grow NEAR by the kernel radius, except around a source it cuts; no data in one image
    only still does."""
    from conftest import add_source, gaussian

    rng = np.random.default_rng(12)
    n = 256
    new = rng.normal(100, 5, (n, n)).astype(np.float32)
    ref = rng.normal(100, 5, (n, n)).astype(np.float32)
    add_source(new, gaussian(3.5, n=25), 2e5, 60, 20)  # on the corner's edge: cut
    add_source(ref, gaussian(3.0, n=25), 2e5, 60, 20)
    yy, xx = np.indices((n, n))
    corner = (xx + yy < 80) & ~((abs(yy - 60) < 3) & (xx > 17))  # the star's right half shows
    new[corner] = np.nan
    ref[corner] = np.nan
    new[200:204, 200:204] = np.nan  # NEW only
    kw = dict(new_psf=gaussian(3.5, n=25), ref_psf=gaussian(3.0, n=25), flux_ratio=1.0,
              tile=128, wisdom=False)
    out, cands = run(new, ref, **kw)
    near = (out["mask"] & MaskBit.NEAR) != 0
    assert (out["mask"][corner] & MaskBit.BAD_NEW).all()
    assert near[202, 195] and near[195, 202]  # around the NEW-only hole
    assert near[60, 25]  # the cut star
    away = (xx + yy > 95) & (xx + yy < 110) & (abs(yy - 60) > 40) & (abs(xx - 20) > 40)
    assert away.any() and not near[away].any()  # beside the common region, away from the star
    assert not any(abs(c["x"] - 20) < 15 and abs(c["y"] - 60) < 15 for c in cands)


def test_product_ring_reuses_buffers_and_changes_nothing():
    """subtract() computes each tile into one of two preallocated buffers in turn
    (tile k + 2 overwrites tile k, after tile k has been written); the products
    are those of fresh arrays, edge tiles (smaller cores) included."""
    import zogy_stream.pipeline as pl
    from zogy_stream.simulate import make_scene

    sc = make_scene((300, 260), seed=4, n_transients=5)
    inputs, opts = pl._make_inputs(sc.new, sc.ref, dict(
        new_psf=sc.new_psf, ref_psf=sc.ref_psf, new_var=sc.new_var, ref_var=sc.ref_var,
        flux_ratio=1.0, tile=128, wisdom=False))
    engine = pl.TileEngine(pl.plan_run(inputs, opts))
    try:
        fresh = [(r.tile.index, {k: getattr(r, k).copy() for k in ("d", "s", "scorr", "flux")})
                 for r in pl._iter_tiles(engine, iter(engine.plan.grid))]
        held, ringed = [], []
        for r in pl._iter_tiles(engine, iter(engine.plan.grid), ring=2):
            held.append(r)
            ringed.append({k: getattr(r, k).copy() for k in ("d", "s", "scorr", "flux")})
    finally:
        engine.close()
    assert len(fresh) == len(ringed) >= 6
    for (_, a), b in zip(fresh, ringed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert np.shares_memory(held[0].scorr, held[2].scorr)  # the buffers go round
    assert not np.shares_memory(held[0].scorr, held[1].scorr)


def test_window_pool_reuses_reader_buffers():
    """The reader's windows go into pooled buffers: a released tile's buffers
    serve the next load, the windows of a tile still loaded are left alone, and
    a run through the pool gives the products of fresh windows."""
    import zogy_stream.engine as eng
    import zogy_stream.pipeline as pl
    from zogy_stream.simulate import make_scene

    pool = eng._WindowPool(12, keep=2)
    a, buf_a = pool.take((3, 4))
    b, buf_b = pool.take((2, 5))
    assert a.shape == (3, 4) and a.flags.c_contiguous and b.shape == (2, 5)
    big, none = pool.take((4, 4))  # larger than the pool's buffers: a plain array
    assert none is None and big.shape == (4, 4)
    pool.give([buf_a, buf_b, None, np.empty(12, np.float32)])  # at most `keep` kept
    c, buf_c = pool.take((2, 2))
    d, buf_d = pool.take((3, 3))
    e, buf_e = pool.take((1, 1))
    assert {id(buf_c), id(buf_d)} == {id(buf_a), id(buf_b)}
    assert buf_e is not buf_a and buf_e is not buf_b

    sc = make_scene((300, 260), seed=4, n_transients=5)
    inputs, opts = pl._make_inputs(sc.new, sc.ref, dict(
        new_psf=sc.new_psf, ref_psf=sc.ref_psf, new_var=sc.new_var, ref_var=sc.ref_var,
        flux_ratio=1.0, tile=128, wisdom=False, prefetch=0))
    engine = pl.TileEngine(pl.plan_run(inputs, opts))
    try:
        tiles = list(engine.plan.grid)
        first, second = engine.load(tiles[0]), engine.load(tiles[1])
        kept = {k: v.copy() for k, v in second.windows.items()}
        fresh = engine.process(first)
        fresh = {k: getattr(fresh, k).copy() for k in ("d", "scorr", "flux")}
        old = list(first.windows.values())
        engine.release(first)
        assert first.windows == {} and first.buffers == []
        engine.release(first)  # twice: harmless
        third = engine.load(tiles[2])
        assert any(np.shares_memory(w, o) for w in third.windows.values() for o in old)
        for k, v in second.windows.items():
            np.testing.assert_array_equal(v, kept[k])
        engine.release(second)
        engine.release(third)
        pooled = next(pl._iter_tiles(engine, iter(tiles)))
        for k, v in fresh.items():
            np.testing.assert_array_equal(getattr(pooled, k), v)
    finally:
        engine.close()


def test_score_scene_counts_and_measures():
    """The scorer the demo, the accuracy benchmark and the mosaic tests share."""
    from astropy.table import Table

    from zogy_stream.demo import score_scene

    truth = Table(dict(x=[10.0, 50.0, 90.0, 130.0], y=[10.0, 50.0, 90.0, 130.0],
                       flux=[100.0, 200.0, 300.0, 400.0], expected_snr=[20.0, 8.0, 30.0, 5.0]))
    cands = Table(dict(x=[10.3, 50.0, 90.0, 130.0, 170.0, 92.5],
                       y=[10.4, 51.0, 90.0, 130.0, 20.0, 90.0],
                       flux=[110.0, 180.0, 330.0, 400.0, 50.0, 10.0], sign=[1, 1, -1, 1, 1, 1]))
    scorr = np.arange(100, dtype=np.float32).reshape(10, 10)
    mask = np.zeros((10, 10), np.uint8)
    mask[5:] = 1
    r = score_scene(truth, cands, scorr, mask)
    # 90,90 has only a negative candidate on it and one 2.5 px away: not recovered
    assert (r["recovered"], r["expected"]) == (2, 3)
    assert r["flux"] == pytest.approx(np.median([1.1, 0.9]))
    assert r["pos_rms"] == pytest.approx(0.5)          # only the S/N 20 one is >= 10
    assert r["false"] == 1                              # (170, 20); 92.5 is within 3 px
    assert r["std"] == pytest.approx(1.4826 * 12.5, rel=1e-3)   # MAD of 0..49


def test_positions_on_bright_hosts_come_from_the_score_peak():
    """Transients on bright galaxies: the host's Poisson and astrometric variance
    (eqs. 25-31) slopes across the transient and drags the S_corr peak up the host
    (measured: position RMS 1.0-1.2 px, worst 1.3-1.8 px over 4 such scenes); the
    peak of S, D's matched filter, is where the transient is (0.27-0.34 px)."""
    from scipy.spatial import cKDTree

    sc = make_scene((512, 512), seed=21, n_transients=16, transient_snr=(12, 40),
                    n_galaxies=16, galaxy_flux=(3e4, 3e5), transient_on_galaxy_fraction=1.0,
                    star_density=800, new_fwhm=4.0, ref_fwhm=3.0, fwhm_variation=0.0)
    res = list(stream(sc.new, sc.ref, flux_ratio=1.2, wisdom=False, tile=512,
                      new_psf=sc.new_psf, ref_psf=sc.ref_psf, gain=sc.meta["gain"],
                      astrometric_sigma=(0.05, 0.05)))[0]
    truth = sc.transients
    assert np.all(np.asarray(truth["host"]) >= 0)
    pos = res.candidates[res.candidates["sign"] > 0]
    d, _ = cKDTree(np.c_[pos["x"], pos["y"]]).query(np.c_[truth["x"], truth["y"]])
    ok = d < 2
    assert ok.sum() >= 4
    assert np.sqrt(np.mean(d[ok] ** 2)) < 0.45 and d[ok].max() < 0.8, d[ok]


def test_numba_threading_layer_chosen_before_the_first_tile():
    """Numba can be asked to choose its threading layer before any parallel kernel
    runs (so the first two tiles start together); in a fresh process, where no
    kernel has run, the layer is chosen and is one that runs kernels from several
    threads at once on this machine (omp or tbb)."""
    import subprocess
    import sys

    code = ("import numba; from zogy_stream import _numba as nk\n"
            "try:\n    numba.threading_layer(); print('early')\nexcept ValueError:\n    pass\n"
            "print(nk.launch_threads(), numba.threading_layer(), nk.threadsafe_layer())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() in (["True", "omp", "True"], ["True", "tbb", "True"]), \
        r.stdout + r.stderr


def test_parallel_tiles_a_free_context_takes_the_next_tile(monkeypatch):
    """With two tiles at once, a context whose tile is done takes the next tile
    while the one before is still running (a slow tile does not hold the other
    context idle); results still come in order, each stays intact until the
    consumer has asked for two more (its buffer is that of the tile 4 later), and
    the products are those of one tile at a time."""
    import threading
    import time

    import zogy_stream.pipeline as pl
    from zogy_stream.simulate import make_scene

    sc = make_scene((300, 260), seed=4, n_transients=5)
    inputs, opts = pl._make_inputs(sc.new, sc.ref, dict(
        new_psf=sc.new_psf, ref_psf=sc.ref_psf, new_var=sc.new_var, ref_var=sc.ref_var,
        flux_ratio=1.0, tile=128, wisdom=False, threads=2))
    plan = pl.plan_run(inputs, opts)
    names = ("d", "s", "scorr", "flux", "flux_err", "mask")
    engine = pl.TileEngine(plan, threads=1)
    try:
        want = [{k: getattr(r, k).copy() for k in names}
                for r in pl._iter_tiles(engine, iter(plan.grid))]
    finally:
        engine.close()
    spans, lock = {}, threading.Lock()
    process = pl.TileEngine.process

    def timed(self, loaded, buffer=None):
        t0 = time.perf_counter()
        if loaded.tile.index == 0:
            time.sleep(0.5)  # tile 0 is slow
        res = process(self, loaded, buffer)
        with lock:
            spans[loaded.tile.index] = (t0, time.perf_counter())
        return res

    monkeypatch.setattr(pl.TileEngine, "process", timed)
    engine = pl.TileEngine(plan, threads=1)
    got, held = [], []
    try:
        for res in pl._iter_parallel(engine, iter(plan.grid), None, 2):
            got.append({k: getattr(res, k).copy() for k in names})
            held.append(res)
            if len(held) >= 2:  # the result before is still intact
                for k in names:
                    np.testing.assert_array_equal(getattr(held[-2], k), got[-2][k])
    finally:
        engine.close()
    assert [r.tile.index for r in held] == list(range(len(want))) and len(want) >= 6
    assert spans[2][0] < spans[0][1]  # tile 2 started while tile 0 was still running
    assert spans[3][0] >= spans[0][1]  # tile 3 waits for tile 0 to be yielded (j < last + 4)
    for a, b in zip(want, got):
        for k in names:
            np.testing.assert_array_equal(b[k], a[k])


def test_kernels_of_the_mosaic_wide_psfs_built_ahead():
    """warm_kernels() builds the set that tiles with the mosaic-wide PSFs and an even
    noise level ask for (the tiles then build nothing), and nothing when the PSFs
    vary by tile."""
    import dataclasses

    import zogy_stream.pipeline as pl
    from zogy_stream.simulate import make_scene

    sc = make_scene((300, 260), seed=4, n_transients=5)
    base = dict(new_var=sc.new_var, ref_var=sc.ref_var, flux_ratio=1.0, tile=128,
                wisdom=False, prefetch=0)
    inputs, opts = pl._make_inputs(sc.new, sc.ref, dict(base, new_psf=sc.new_psf,
                                                        ref_psf=sc.ref_psf))
    plan = pl.plan_run(inputs, opts)
    engine = pl.TileEngine(plan)
    try:
        engine.warm_kernels()
        assert engine.kernels.builds == 1
        results = [r.tile.index for r in pl._iter_tiles(engine, iter(engine.plan.grid))]
        assert len(results) >= 6 and engine.kernels.builds == 1
    finally:
        engine.close()
    src_n, src_r = plan.psf_sources
    for srcs in ((dataclasses.replace(src_n, kind="auto", local=True), src_r),
                 (src_n, dataclasses.replace(src_r, kind="psfex"))):  # PSFs vary by tile
        engine = pl.TileEngine(dataclasses.replace(plan, psf_sources=srcs))
        try:
            engine.warm_kernels()
            assert engine.kernels.builds == 0
        finally:
            engine.close()


def test_reader_thread_runs_no_parallel_kernel(monkeypatch):
    """Tiles are read (and calibrated: cosmic rays, stars) in a thread of their own
    beside the tiles' parallel kernels; Numba's workqueue layer aborts the process when
    two threads run parallel kernels at once, so every compiled kernel a tile's load
    calls must be serial."""
    pytest.importorskip("astroscrappy")
    import numba

    import zogy_stream.pipeline as pl
    from zogy_stream import _numba as nk
    from zogy_stream import background as bg

    called = set()
    for mod in (nk, bg):
        kernels = {n: f for n, f in vars(mod).items()
                   if isinstance(f, numba.core.registry.CPUDispatcher)}
        inner = {n for f in kernels.values() for n in f.py_func.__code__.co_names}
        for name, f in kernels.items():
            if name in inner:  # called from compiled code, not from Python
                continue
            def rec(*a, _f=f, _n=name, **k):
                called.add((_n, bool(_f.targetoptions.get("parallel"))))
                return _f(*a, **k)
            monkeypatch.setattr(mod, name, rec)
    sc = make_scene((300, 300), seed=5, n_transients=3, star_density=2000,
                    star_flux=(300, 3e5))
    new = sc.new.copy()
    new[100:102, 50:52] += 1500.0  # a cosmic-ray hit
    inputs, opts = pl._make_inputs(new, sc.ref, dict(tile=128, wisdom=False,
                                                     cosmic_rays="on", flux_ratio=1.0))
    plan = pl.plan_run(inputs, opts)
    engine = pl.TileEngine(plan)
    try:
        called.clear()
        for t in list(plan.grid)[:4]:
            engine.load(t)
    finally:
        engine.close()
    names = {n for n, _ in called}
    assert {"_mesh_rows", "_lacosmic_seeds"} <= names, names
    assert not [n for n, par in called if par]


def test_tile_calibration_in_the_processing_contexts(tmp_path, monkeypatch):
    """With tiles processed at once and costly per-tile calibration (here L.A.Cosmic
    on both images), each tile is calibrated by the context that processes it
    instead of one by one in the reader thread: the same masks, cosmic-ray counts
    and products, byte for byte, as one tile at a time."""
    import threading

    from zogy_stream import _numba as nk
    from zogy_stream import pipeline as pl
    from zogy_stream import subtract
    from zogy_stream.simulate import make_scene

    sc = make_scene((512, 512), seed=7, n_transients=6, star_density=1500,
                    star_flux=(300, 3e5))
    new = sc.new.copy()
    rng = np.random.default_rng(7)
    for y, x in rng.integers(20, 490, size=(12, 2)):  # 2x2 cosmic-ray hits
        new[y:y + 2, x:x + 2] += 40 * sc.meta["sigma_new"]
    kw = dict(new_psf=sc.new_psf, ref_psf=sc.ref_psf, new_var=sc.new_var, ref_var=sc.ref_var,
              flux_ratio=sc.meta["flux_ratio"], tile=128, wisdom=False, cosmic_rays="on")
    where: list = []  # (thread name, tile index) of every tile calibration
    real = pl.TileEngine._tile_calibration

    def spy(self, tile, win):
        where.append((threading.current_thread().name, tile.index))
        return real(self, tile, win)

    monkeypatch.setattr(pl.TileEngine, "_tile_calibration", spy)
    one = subtract(new, sc.ref, tmp_path / "one.fits", parallel_tiles=1, threads=1, **kw)
    assert {t for t, _ in where} == {"zogy-read_0"} and len(where) == one.n_tiles == 16
    where.clear()
    two = subtract(new, sc.ref, tmp_path / "two.fits", parallel_tiles=2, threads=2, **kw)
    assert all(t.startswith("zogy-tile") for t, _ in where), where
    assert sorted(i for _, i in where) == list(range(16))  # each tile once
    assert "calibrate" not in one.timings and one.timings["cosmics"] > 0
    assert two.timings["calibrate"] >= two.timings["cosmics"] > 0
    # where Numba's threading layer allows one context only, the reader calibrates
    # again once that is known (the tiles read before, in that context)
    where.clear()
    monkeypatch.setattr(nk, "threadsafe_layer", lambda: False)
    alone = subtract(new, sc.ref, tmp_path / "alone.fits", parallel_tiles=2, threads=2, **kw)
    assert sorted(i for _, i in where) == list(range(16))
    assert sum(t == "zogy-read_0" for t, _ in where) >= 16 - 4
    with fits.open(tmp_path / "one.fits") as a, fits.open(tmp_path / "two.fits") as b, \
            fits.open(tmp_path / "alone.fits") as c:
        assert (a["MASK"].data & int(MaskBit.COSMIC) != 0).sum() >= 12 * 4
        for name in ("D", "S", "SCORR", "FLUX", "FLUX_ERR", "MASK"):
            np.testing.assert_array_equal(b[name].data, a[name].data)
            np.testing.assert_array_equal(c[name].data, a[name].data)
        assert a[0].header["NCOSMIC"] == b[0].header["NCOSMIC"] >= 12 * 4
    assert alone.n_tiles == 16
