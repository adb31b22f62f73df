"""The command-line contract of ``zogy-stream subtract`` / ``demo`` (issue 2, section 7).

Everything is run in-process through ``zogy_stream.cli.main`` except one test
of the installed console script.
"""
import io
import os
import re
import shutil
import stat
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from zogy_stream.cli import main
from zogy_stream.simulate import write_scene

SIZE = 256
TILE = "128"
IMAGE_PLANES = ["D", "S", "SCORR", "FLUX", "FLUX_ERR", "MASK"]
EXTENSIONS = ["PRIMARY", "D", "S", "SCORR", "FLUX", "FLUX_ERR", "MASK", "PSF_D"]
CAT_COLUMNS = ["x", "y", "ra", "dec", "scorr", "flux", "flux_err", "sign", "x_peak", "y_peak",
               "mask", "tile"]
WCS_KEYS = re.compile(r"^(CTYPE\d|CRVAL\d|CRPIX\d|CDELT\d|CD\d_\d|PC\d_\d|CUNIT\d)$")
FLUX_RATIO = 1.25


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A small simulated pair (with a TAN WCS) plus assorted bad inputs."""
    d = tmp_path_factory.mktemp("scene")
    p = write_scene(d, (SIZE, SIZE), seed=11, n_transients=8, transient_snr=(15, 40),
                    flux_ratio=FLUX_RATIO)
    new = fits.getdata(p["new"]).astype(np.float32)
    var = fits.getdata(p["new_var"]).astype(np.float32)
    psf = fits.getdata(p["new_psf"])
    bad = {}

    def put(name, data, header=None):
        bad[name] = d / name
        fits.PrimaryHDU(data, header=header).writeto(bad[name])

    bad["random.fits"] = d / "random.fits"
    bad["random.fits"].write_bytes(np.random.default_rng(0).bytes(3 * 2880))
    put("cube.fits", np.stack([new, new]))
    put("narrow.fits", new[:, :200])
    put("short.fits", new[:250])
    put("psf3d.fits", np.stack([psf, psf, psf]))
    put("psf1d.fits", psf.sum(axis=0))
    put("psfneg.fits", -psf)
    put("psfzero.fits", np.zeros_like(psf))
    # sky and noise only: no star to estimate a PSF from (the scene itself has enough
    # faint stars and transients for a Moffat fit)
    put("blank.fits", (np.median(new) + np.sqrt(var) * np.random.default_rng(1).normal(
        size=new.shape)).astype(np.float32))
    v = var.copy()
    v[100, 100] = 0.0
    put("var_zero.fits", v)
    v = var.copy()
    v[200, 30] = -3.0
    put("var_neg.fits", v)
    m = np.zeros((SIZE, SIZE), np.int16)
    m[100, 100] = 1
    put("mask_ok.fits", m)
    put("mask_narrow.fits", m[:, :200])
    whole = p["new"].read_bytes()
    bad["trunc.fits"] = d / "trunc.fits"
    bad["trunc.fits"].write_bytes(whole[: len(whole) // 2])
    bad["trunc_header.fits"] = d / "trunc_header.fits"
    bad["trunc_header.fits"].write_bytes(whole[:1000])
    put("nodata.fits", None)
    a_file = d / "a_regular_file"
    a_file.write_text("not a directory\n")
    bad["a_file"] = a_file
    # a multi-extension copy of NEW and REF for HDU selection, with a 1-sigma ERR plane
    for k in ("new", "ref"):
        err = np.sqrt(fits.getdata(p[f"{k}_var"]).astype(np.float32))
        hdul = fits.HDUList([fits.PrimaryHDU(),
                             fits.ImageHDU(fits.getdata(p[k]), fits.getheader(p[k]), name="SCI"),
                             fits.ImageHDU(err, name="ERR")])
        bad[f"{k}_mef.fits"] = d / f"{k}_mef.fits"
        hdul.writeto(bad[f"{k}_mef.fits"])
    # NEW without any WCS
    bad["new_nowcs.fits"] = d / "new_nowcs.fits"
    fits.PrimaryHDU(new).writeto(bad["new_nowcs.fits"])
    return dict(p, bad=bad, dir=d)


def args(scene, out, *extra, new=None, ref=None, psf=True, var=True):
    a = ["subtract", str(new or scene["new"]), str(ref or scene["ref"]), "-o", str(out),
         "--tile", TILE, "--flux-ratio", str(FLUX_RATIO)]
    if psf:
        a += ["--new-psf", str(scene["new_psf"]), "--ref-psf", str(scene["ref_psf"])]
    if var:
        a += ["--new-var", str(scene["new_var"]), "--ref-var", str(scene["ref_var"])]
    return a + [str(e) for e in extra]


def run(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def listing(d):
    return sorted(p.name for p in Path(d).iterdir())


def hidden(d):
    return [n for n in listing(d) if n.startswith(".") or n.endswith(".tmp")]


@pytest.fixture
def outdir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


# ----------------------------------------------------------------- contract
@pytest.fixture(scope="module")
def contract_run(scene, tmp_path_factory):
    """One successful run with non-default parameters, shared by the contract tests."""
    d = tmp_path_factory.mktemp("contract")
    wisdom = tmp_path_factory.mktemp("wisdom") / "fftw_wisdom"  # never the user's cache
    out, cat = d / "diff.fits", d / "cands.ecsv"
    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main(args(scene, out, "--catalog", cat, "--astrometric-sigma", "0.05", "0.03",
                       "--overlap", "24", "--quiet", "--wisdom", wisdom))
    return dict(rc=rc, out=so.getvalue(), err=se.getvalue(), dir=d, fits=out, cat=cat)


def test_contract_exit_and_messages(contract_run):
    r = contract_run
    assert r["rc"] == 0, r["err"]
    assert r["err"] == "", "--quiet must leave stderr empty"
    lines = r["out"].splitlines()
    assert len(lines) == 1, r["out"]
    assert str(r["fits"]) in lines[0] or r["fits"].name in lines[0]
    assert "candidates" in lines[0]


def test_contract_files_and_no_leftovers(contract_run):
    assert listing(contract_run["dir"]) == ["cands.ecsv", "diff.fits"]


def test_contract_extensions(contract_run, scene):
    with fits.open(contract_run["fits"]) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul] == EXTENSIONS
        assert hdul[0].data is None
        for name in IMAGE_PLANES:
            h = hdul[name]
            assert h.data.shape == (SIZE, SIZE), name
            want = np.uint8 if name == "MASK" else np.float32
            assert h.data.dtype == np.dtype(want).newbyteorder(">"), name
            assert h.header["BITPIX"] == (8 if name == "MASK" else -32)
            if name != "MASK":
                assert np.all(np.isfinite(h.data)), name
        psf_d = hdul["PSF_D"].data
        assert psf_d.dtype == np.dtype(">f4") and psf_d.ndim == 2
        assert max(psf_d.shape) <= 512 and np.all(np.isfinite(psf_d)) and psf_d.sum() > 0
        # PSF_D peaks at its centre pixel
        assert np.unravel_index(np.argmax(psf_d), psf_d.shape) == (psf_d.shape[0] // 2,
                                                                   psf_d.shape[1] // 2)


def test_contract_wcs_copied(contract_run, scene):
    new_h = fits.getheader(scene["new"])
    keys = [k for k in new_h if WCS_KEYS.match(k)]
    assert {"CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2"} <= set(keys)
    assert any(k.startswith("CD1_") for k in keys) or "CDELT1" in keys
    w_new = WCS(new_h)
    px = np.array([[0.0, 0.0], [17.5, 200.0], [255.0, 128.0]])
    with fits.open(contract_run["fits"]) as hdul:
        for name in IMAGE_PLANES:
            h = hdul[name].header
            for k in keys:
                assert k in h, (name, k)
                assert h[k] == new_h[k], (name, k, h[k], new_h[k])
            np.testing.assert_allclose(WCS(h).all_pix2world(px, 0), w_new.all_pix2world(px, 0),
                                       rtol=0, atol=1e-10)


def test_contract_parameters_recorded(contract_run):
    with fits.open(contract_run["fits"]) as hdul:
        for hdu in [hdul[0]] + [hdul[n] for n in IMAGE_PLANES]:
            h = hdu.header
            assert h["FLUXRAT"] == pytest.approx(FLUX_RATIO), hdu.name
            assert h["ASTSIGX"] == pytest.approx(0.05), hdu.name
            assert h["ASTSIGY"] == pytest.approx(0.03), hdu.name
            assert h["TILE"] == int(TILE), hdu.name
            assert h["OVERLAP"] == 24, hdu.name


def test_contract_catalog(contract_run, scene):
    tab = Table.read(contract_run["cat"], format="ascii.ecsv")
    assert set(CAT_COLUMNS) <= set(tab.colnames), tab.colnames
    assert tab.colnames[:7] == CAT_COLUMNS[:7]
    assert len(tab) >= 4, "bright injected transients must be found"
    for c in ("x", "y", "ra", "dec", "scorr", "flux", "flux_err"):
        assert np.all(np.isfinite(tab[c])), c
    assert np.all(np.abs(tab["scorr"]) >= 5.0)
    assert np.all((tab["x"] >= 0) & (tab["x"] <= SIZE - 1) & (tab["y"] >= 0) & (tab["y"] <= SIZE - 1))
    assert np.all(np.sign(tab["scorr"]) == tab["sign"])
    # ra/dec are the NEW WCS at the 0-based (x, y)
    ra, dec = WCS(fits.getheader(scene["new"])).all_pix2world(tab["x"], tab["y"], 0)
    np.testing.assert_allclose(tab["ra"], ra, atol=1e-9)
    np.testing.assert_allclose(tab["dec"], dec, atol=1e-9)
    # the catalogue agrees with the SCORR plane at the peak pixels
    with fits.open(contract_run["fits"]) as hdul:
        sc = hdul["SCORR"].data
        mask = hdul["MASK"].data
    np.testing.assert_allclose(tab["scorr"], sc[tab["y_peak"], tab["x_peak"]], rtol=1e-5)
    assert np.all(mask[tab["y_peak"], tab["x_peak"]] == 0)
    # truth transients are among the candidates (0-based positions)
    truth = Table.read(scene["truth"])
    pos = tab[tab["sign"] > 0]
    for x, y in zip(truth["x"], truth["y"]):
        d = np.hypot(pos["x"] - x, pos["y"] - y)
        assert d.size and d.min() < 1.5, (x, y)


def test_summary_and_info_without_quiet(scene, outdir, capsys):
    rc, out, err = run(capsys, args(scene, outdir / "d.fits"))
    assert rc == 0, err
    assert len(out.splitlines()) == 1 and "d.fits" in out
    assert "Traceback" not in err
    assert listing(outdir) == ["d.fits"]


def test_catalog_as_fits_table(scene, outdir, capsys):
    rc, out, err = run(capsys, args(scene, outdir / "d.fits", "--catalog", outdir / "c.fits",
                                    "--quiet"))
    assert rc == 0, err
    assert listing(outdir) == ["c.fits", "d.fits"]
    with fits.open(outdir / "c.fits") as hdul:
        assert isinstance(hdul[1], fits.BinTableHDU)
    tab = Table.read(outdir / "c.fits")
    assert set(CAT_COLUMNS) <= set(tab.colnames) and len(tab) >= 4


def test_existing_output_replaced_atomically(scene, outdir, capsys):
    out = outdir / "d.fits"
    rc, _, err = run(capsys, args(scene, out, "--quiet"))
    assert rc == 0, err
    first = out.read_bytes()
    inode = out.stat().st_ino
    with fits.open(out) as h:
        assert h[0].header["THRESH"] == 5.0
    rc, _, err = run(capsys, args(scene, out, "--quiet", "--threshold", "6.5",
                                  "--astrometric-sigma", "0.1", "0.1"))
    assert rc == 0, err
    assert out.read_bytes() != first
    assert out.stat().st_ino != inode, "the output must be renamed into place, not rewritten"
    with fits.open(out) as h:
        assert h[0].header["THRESH"] == 6.5 and h["SCORR"].header["ASTSIGX"] == 0.1
    assert listing(outdir) == ["d.fits"]


def test_failed_run_keeps_existing_output(scene, outdir, capsys):
    out = outdir / "d.fits"
    out.write_bytes(b"previous result")
    rc, _, err = run(capsys, args(scene, out, "--new-var", scene["bad"]["var_zero.fits"],
                                  "--quiet"))
    assert rc != 0
    assert len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == b"previous result"
    assert listing(outdir) == ["d.fits"]


def test_output_permissions_follow_umask(scene, outdir, capsys):
    old = os.umask(0o022)
    try:
        rc, _, err = run(capsys, args(scene, outdir / "d.fits", "--catalog", outdir / "c.ecsv",
                                      "--quiet"))
    finally:
        os.umask(old)
    assert rc == 0, err
    for name in ("d.fits", "c.ecsv"):
        assert stat.S_IMODE((outdir / name).stat().st_mode) == 0o644, name


def test_hdu_selection_on_the_command_line(scene, outdir, capsys):
    bad = scene["bad"]
    rc, _, err = run(capsys, args(scene, outdir / "a.fits", "--quiet"))
    assert rc == 0, err
    rc, _, err = run(capsys, args(scene, outdir / "b.fits", "--quiet",
                                  new=f"{bad['new_mef.fits']}[SCI]", ref=f"{bad['ref_mef.fits']}[1]"))
    assert rc == 0, err
    with fits.open(outdir / "a.fits") as a, fits.open(outdir / "b.fits") as b:
        for name in ("D", "SCORR"):
            np.testing.assert_allclose(b[name].data, a[name].data, rtol=1e-5, atol=1e-5)
        assert b["D"].header["CTYPE1"] == a["D"].header["CTYPE1"]


def test_error_maps_equal_variance_maps(scene, outdir, capsys):
    """--new-err/--ref-err (1-sigma, here an ERR extension) give the --*-var products."""
    bad = scene["bad"]
    rc, _, err = run(capsys, args(scene, outdir / "a.fits", "--quiet"))
    assert rc == 0, err
    rc, _, err = run(capsys, args(scene, outdir / "b.fits", "--quiet", "--new-err",
                                  f"{bad['new_mef.fits']}[ERR]", "--ref-err",
                                  f"{bad['ref_mef.fits']}[2]", var=False))
    assert rc == 0, err
    with fits.open(outdir / "a.fits") as a, fits.open(outdir / "b.fits") as b:
        for name in ("D", "SCORR", "FLUX_ERR"):
            np.testing.assert_allclose(b[name].data, a[name].data, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(b["MASK"].data, a["MASK"].data)
        assert b[0].header["NEWERR"].endswith("[ERR]") and b[0].header["NEWVAR"] == "none"


def test_new_without_wcs(scene, outdir, capsys):
    rc, _, err = run(capsys, args(scene, outdir / "d.fits", "--catalog", outdir / "c.ecsv",
                                  "--quiet", new=scene["bad"]["new_nowcs.fits"]))
    assert rc == 0, err
    with fits.open(outdir / "d.fits") as hdul:
        assert [h.name for h in hdul] == EXTENSIONS
        assert "CTYPE1" not in hdul["D"].header
    tab = Table.read(outdir / "c.ecsv")
    assert {"x", "y", "scorr", "flux", "flux_err"} <= set(tab.colnames)
    if "ra" in tab.colnames and len(tab):
        assert not np.any(np.isfinite(tab["ra"]))


def test_masked_nonpositive_variance_is_accepted(scene, outdir, capsys):
    bad = scene["bad"]
    rc, _, err = run(capsys, args(scene, outdir / "d.fits", "--quiet",
                                  "--new-var", bad["var_zero.fits"],
                                  "--new-mask", bad["mask_ok.fits"]))
    assert rc == 0, err
    with fits.open(outdir / "d.fits") as hdul:
        mask = hdul["MASK"].data
        assert mask[100, 100] & 8  # MaskBit.USER
        assert mask[200, 200] & 15 == 0  # far away: not flagged bad
        assert np.all(np.isfinite(hdul["SCORR"].data))


# ---------------------------------------------------------------- bad input
def _bad_cases():
    """case id -> builder(scene, outdir) -> argv; each must fail before leaving anything."""

    def b(name):
        return lambda s: s["bad"][name]

    cases = {
        "missing-new": lambda s, o: args(s, o / "d.fits", new=s["dir"] / "missing.fits"),
        "missing-ref": lambda s, o: args(s, o / "d.fits", ref=s["dir"] / "missing.fits"),
        "missing-psf-file": lambda s, o: args(s, o / "d.fits", psf=False) + [
            "--new-psf", str(s["dir"] / "nope.fits"), "--ref-psf", str(s["ref_psf"])],
        "missing-var-file": lambda s, o: args(s, o / "d.fits", var=False) + [
            "--new-var", str(s["dir"] / "nope.fits")],
        "not-fits": lambda s, o: args(s, o / "d.fits", new=b("random.fits")(s)),
        "not-fits-ref": lambda s, o: args(s, o / "d.fits", ref=b("random.fits")(s)),
        "directory-as-input": lambda s, o: args(s, o / "d.fits", new=s["dir"]),
        "no-image-hdu": lambda s, o: args(s, o / "d.fits", new=b("nodata.fits")(s)),
        "no-such-hdu": lambda s, o: args(s, o / "d.fits", new=f"{s['new']}[5]"),
        "cube": lambda s, o: args(s, o / "d.fits", new=b("cube.fits")(s)),
        "shape-differs-x": lambda s, o: args(s, o / "d.fits", ref=b("narrow.fits")(s)),
        "shape-differs-y": lambda s, o: args(s, o / "d.fits", ref=b("short.fits")(s)),
        "var-shape": lambda s, o: args(s, o / "d.fits") + ["--ref-var", str(b("narrow.fits")(s))],
        "mask-shape": lambda s, o: args(s, o / "d.fits") + ["--new-mask", str(b("mask_narrow.fits")(s))],
        "psf-3d": lambda s, o: args(s, o / "d.fits", psf=False) + [
            "--new-psf", str(b("psf3d.fits")(s)), "--ref-psf", str(s["ref_psf"])],
        "psf-1d": lambda s, o: args(s, o / "d.fits", psf=False) + [
            "--new-psf", str(s["new_psf"]), "--ref-psf", str(b("psf1d.fits")(s))],
        "psf-negative-sum": lambda s, o: args(s, o / "d.fits", psf=False) + [
            "--new-psf", str(b("psfneg.fits")(s)), "--ref-psf", str(s["ref_psf"])],
        "psf-zero-sum": lambda s, o: args(s, o / "d.fits", psf=False) + [
            "--new-psf", str(s["new_psf"]), "--ref-psf", str(b("psfzero.fits")(s))],
        # the image itself given as the PSF (it would run, with warnings, into
        # thousands of candidates)
        "psf-is-the-image": lambda s, o: args(s, o / "d.fits", psf=False) + [
            "--new-psf", str(s["new"]), "--ref-psf", str(s["ref_psf"])],
        "psf-missing-new": lambda s, o: args(s, o / "d.fits", psf=False,
                                             new=s["bad"]["blank.fits"]) + [
            "--ref-psf", str(s["ref_psf"])],
        "psf-missing-both": lambda s, o: args(s, o / "d.fits", psf=False,
                                              new=s["bad"]["blank.fits"]),
        "var-and-err": lambda s, o: args(s, o / "d.fits") + [
            "--new-err", f"{s['bad']['new_mef.fits']}[ERR]"],
        "var-zero": lambda s, o: args(s, o / "d.fits", var=False) + [
            "--new-var", str(b("var_zero.fits")(s))],
        "var-negative": lambda s, o: args(s, o / "d.fits", var=False) + [
            "--ref-var", str(b("var_neg.fits")(s))],
        "outdir-missing": lambda s, o: args(s, o / "nodir" / "d.fits"),
        "outdir-is-a-file": lambda s, o: args(s, s["bad"]["a_file"] / "d.fits"),
        "catalog-dir-missing": lambda s, o: args(s, o / "d.fits", "--catalog", o / "nodir" / "c.ecsv"),
        "tile-0": lambda s, o: args(s, o / "d.fits") + ["--tile", "0"],
        "tile-too-small": lambda s, o: args(s, o / "d.fits") + ["--tile", "16"],
        "tile-not-int": lambda s, o: args(s, o / "d.fits") + ["--tile", "1.5"],
        "overlap-1": lambda s, o: args(s, o / "d.fits") + ["--overlap", "1"],
        "flux-ratio-negative": lambda s, o: args(s, o / "d.fits") + ["--flux-ratio", "-1"],
        "flux-ratio-zero": lambda s, o: args(s, o / "d.fits") + ["--flux-ratio", "0"],
        "flux-ratio-nan": lambda s, o: args(s, o / "d.fits") + ["--flux-ratio", "nan"],
        "astrometric-sigma-one-number": lambda s, o: args(s, o / "d.fits") + [
            "--astrometric-sigma", "0.1"],
        "astrometric-sigma-negative": lambda s, o: args(s, o / "d.fits") + [
            "--astrometric-sigma", "0.1", "-0.1"],
        "model-error-word": lambda s, o: args(s, o / "d.fits") + ["--model-error", "big"],
        "model-error-above-1": lambda s, o: args(s, o / "d.fits") + ["--model-error", "2"],
        "threshold-zero": lambda s, o: args(s, o / "d.fits") + ["--threshold", "0"],
        "threads-0": lambda s, o: args(s, o / "d.fits") + ["--threads", "0"],
        "unknown-option": lambda s, o: args(s, o / "d.fits") + ["--frobnicate"],
        "output-missing": lambda s, o: [a for a in args(s, o / "d.fits") if a not in ("-o", str(o / "d.fits"))],
        "truncated-data": lambda s, o: args(s, o / "d.fits", new=b("trunc.fits")(s)),
        "truncated-header": lambda s, o: args(s, o / "d.fits", ref=b("trunc_header.fits")(s)),
    }
    return cases


BAD = _bad_cases()


def _bad_params():
    for name in BAD:
        for quiet in (True, False):
            yield pytest.param(name, quiet, id=f"{name}-{'quiet' if quiet else 'default'}")


@pytest.mark.parametrize("case, quiet", list(_bad_params()))
def test_bad_input(scene, tmp_path, capsys, case, quiet):
    o = tmp_path / "out"
    o.mkdir()
    before_scene = listing(scene["dir"])
    argv = BAD[case](scene, o) + (["--quiet"] if quiet else [])
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors may exit directly
        rc = exc.code
    cap = capsys.readouterr()
    assert rc not in (0, None), cap
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    lines = cap.err.strip("\n").splitlines()
    assert len(lines) == 1, cap.err
    # argparse reports unknown options from the top-level parser
    prefix = "zogy-stream: error: " if case == "unknown-option" else "zogy-stream subtract: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert "internal error" not in lines[0]
    assert cap.out == ""
    assert listing(o) == [], "no output or temporary file may be left behind"
    assert listing(scene["dir"]) == before_scene


# The output path is an existing directory: the run only fails at the final rename.
def _run_into_directory(scene, tmp_path, capsys):
    o = tmp_path / "out"
    (o / "d.fits").mkdir(parents=True)
    rc = main(args(scene, o / "d.fits", "--catalog", o / "c.ecsv", "--quiet"))
    cap = capsys.readouterr()
    return rc, cap, o


def test_output_path_is_a_directory(scene, tmp_path, capsys):
    rc, cap, o = _run_into_directory(scene, tmp_path, capsys)
    assert rc != 0
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cap.err, cap.err
    assert listing(o / "d.fits") == []
    assert hidden(o) == []


def test_output_path_is_a_directory_leaves_no_catalog(scene, tmp_path, capsys):
    rc, cap, o = _run_into_directory(scene, tmp_path, capsys)
    assert rc != 0
    assert listing(o) == ["d.fits"], "the catalogue of a failed run must not be left behind"


def test_output_path_is_a_directory_message(scene, tmp_path, capsys):
    rc, cap, o = _run_into_directory(scene, tmp_path, capsys)
    assert rc != 0
    assert ".tmp" not in cap.err and str(o / "d.fits") in cap.err, cap.err


# ------------------------------------------------------------ demo, script
def test_demo(tmp_path, capsys):
    rc, out, err = run(capsys, ["demo", str(tmp_path / "demo"), "--size", "256", "--quiet"])
    assert rc == 0, err
    m = re.search(r"recovered (\d+)/(\d+) transients", out)
    assert m, out
    found, total = int(m.group(1)), int(m.group(2))
    assert total > 0 and found >= 0.75 * total, out
    files = listing(tmp_path / "demo")
    assert "diff.fits" in files and "candidates.ecsv" in files
    assert not [f for f in files if f.startswith(".")]


def _script():
    exe = Path(sys.executable).with_name("zogy-stream")
    return str(exe) if exe.exists() else shutil.which("zogy-stream")


def test_console_script_help():
    exe = _script()
    assert exe, "the zogy-stream console script is not installed"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "subtract" in r.stdout and "demo" in r.stdout
    r = subprocess.run([exe, "subtract", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for opt in ("--new-psf", "--ref-psf", "--new-var", "--ref-var", "--new-mask", "--ref-mask",
                "--flux-ratio", "--astrometric-sigma", "--tile", "--overlap", "--threads",
                "--image-space", "--wisdom", "--no-background", "--catalog", "--threshold",
                "--quiet", "-o"):
        assert opt in r.stdout, opt


def test_console_script_bad_input(tmp_path):
    exe = _script()
    assert exe
    r = subprocess.run([exe, "subtract", str(tmp_path / "nope.fits"), str(tmp_path / "nope2.fits"),
                        "-o", str(tmp_path / "d.fits"), "--new-psf", "x", "--ref-psf", "y"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert listing(tmp_path) == []


def test_console_script_quiet_with_medium_length_paths(scene, tmp_path):
    exe = _script()
    assert exe
    name = "d" * 40  # 'dddd.../new_psf.fits' is 53 characters: one card, no CONTINUE
    (tmp_path / name).mkdir()
    for k in ("new", "ref", "new_psf", "ref_psf", "new_var", "ref_var"):
        (tmp_path / name / f"{k}.fits").symlink_to(scene[k])
    argv = [exe] + args({k: f"{name}/{k}.fits" for k in scene if k not in ("bad", "dir")},
                        "d.fits", "--quiet", "--wisdom", "wisdom")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d.fits").exists()
    assert r.stderr == ""


def test_console_script_runs_blas_on_one_thread():
    """The console script (argv from the command line) limits BLAS to one thread for
    its process, also in a BLAS library loaded after it starts (scipy's own OpenBLAS,
    loaded where scipy.linalg is first used: its idle threads spun beside the tiles,
    2.7 % of a run's CPU samples at 8192^2); an error run still gets there and returns
    its exit code."""
    pytest.importorskip("threadpoolctl")
    code = ("import sys; from zogy_stream import cli; "
            "sys.argv = ['zogy-stream', 'subtract', 'nope.fits', 'nope2.fits', '-o', 'x.fits']; "
            "rc = cli.main(); import scipy.linalg; from threadpoolctl import threadpool_info; "
            "blas = [i for i in threadpool_info() if i['user_api'] == 'blas']; "
            "print(rc, len(blas), sorted({i['num_threads'] for i in blas}))")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=env)
    rc, n, threads = r.stdout.strip().split(maxsplit=2)
    assert rc == "2" and threads == "[1]", r.stdout + r.stderr
    assert int(n) >= 1


def test_subtract_starts_without_the_daemon_or_scipy_optimize(tmp_path):
    """Start-up of ``subtract``: the daemon's commands (its module pulls in astropy.wcs
    and the job journal) are only built for the commands that need them, and the star
    module imports scipy.optimize and scipy.spatial where used; ``--help`` and the
    daemon's commands still see everything."""
    code = ("import sys; from zogy_stream import cli, stars; "
            "rc = cli.main(['subtract', 'nope.fits', 'nope2.fits', '-o', 'x.fits']); "
            "print(rc, 'zogy_stream.daemon' in sys.modules, 'scipy.optimize' in sys.modules, "
            "'scipy.spatial' in sys.modules); "
            "p = cli.build_parser(); "
            "print(sorted(p._subparsers._group_actions[0].choices)); "
            "print('zogy_stream.daemon' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert lines[0] == "2 False False False", r.stdout + r.stderr
    assert lines[1] == "['daemon', 'demo', 'requeue', 'status', 'subtract']"
    assert lines[2] == "True"
    r = subprocess.run([sys.executable, "-m", "zogy_stream.cli", "status", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--state" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "zogy_stream.cli", "-h", "subtract"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "daemon" in r.stdout and "requeue" in r.stdout, r.stderr


def test_png_without_matplotlib(scene, tmp_path, capsys, monkeypatch):
    """--png where matplotlib is not installed: one line naming the fix, exit 2, checked
    before any work (so nothing is written)."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    o = tmp_path / "out"
    o.mkdir()
    rc = main(args(scene, o / "d.fits", "--png", o / "q.png", "--quiet"))
    cap = capsys.readouterr()
    assert rc == 2
    lines = cap.err.strip("\n").splitlines()
    assert len(lines) == 1 and "--png needs matplotlib" in lines[0], cap.err
    assert "pip install" in lines[0]
    assert listing(o) == []
