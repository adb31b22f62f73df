"""Tests of the daemon's template library and file-naming rules."""
from __future__ import annotations

import os

import numpy as np
import pytest
from astropy.io import fits

from zogy_stream.errors import InputError
from zogy_stream.templates import (NoTemplateError, TemplateLibrary, find_sidecars, footprint, image_stem,
                                   is_sidecar, is_temporary, overlap_fraction, read_image_header)

SCALE = 1.0 / 3600  # 1 arcsec pixels


def header(filt="r", field=None, ra=150.0, dec=2.0, shape=(100, 100), dx=0.0, dy=0.0, wcs=True, **extra):
    """Header of an image whose pixel (dx, dy) from the centre of a reference grid is at (ra, dec)."""
    h = fits.Header()
    if filt is not None:
        h["FILTER"] = filt
    if field is not None:
        h["FIELD"] = field
    if wcs:
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
        h["CRVAL1"], h["CRVAL2"] = ra, dec
        h["CRPIX1"], h["CRPIX2"] = (shape[1] + 1) / 2 - dx, (shape[0] + 1) / 2 - dy
        h["CDELT1"], h["CDELT2"] = -SCALE, SCALE
    for k, v in extra.items():
        h[k] = v
    return h


def write(path, hdr, shape=(100, 100)):
    fits.writeto(path, np.zeros(shape, np.float32), hdr, overwrite=True)
    return path


def test_naming_rules(tmp_path):
    assert all(is_temporary(n) for n in (".a.fits", "a.fits.tmp", "a.tmp.fits", "a.fits.part", "a.fits~",
                                         "a.partial", ".a.fits.XYZ123"))
    assert not any(is_temporary(n) for n in ("a.fits", "partial_a.fits", "tmpfile.fits"))
    assert all(is_sidecar(n) for n in ("a.psf.fits", "a.psf", "a.var.fits", "a.weight.fits", "a.err.fits", "a.mask.fits",
                                       "a.fits.reason.txt"))
    assert image_stem("exp1.fits") == "exp1" and image_stem("exp1.fits.fz") == "exp1"
    assert image_stem("exp1.fit") == "exp1" and image_stem("x.y.fits") == "x.y"
    for name in ("exp1.psf.fits", "exp1.mask.fits", ".exp1.fits", "exp1.fits.part", "notes.txt", ".fits"):
        assert image_stem(name) is None, name
    for name in ("e.fits", "e.psf.fits", "e.psf", "e.weight.fits", "e.mask.fits", "other.var.fits"):
        (tmp_path / name).write_bytes(b"")
    side = find_sidecars(tmp_path / "e.fits")
    assert side.psf == tmp_path / "e.psf.fits"  # the PSF image wins over the PSFEx model
    assert side.weight == tmp_path / "e.weight.fits" and side.mask == tmp_path / "e.mask.fits"
    assert side.var is None and len(side.files()) == 3
    (tmp_path / "e.psf.fits").unlink()
    assert find_sidecars(tmp_path / "e.fits").psf == tmp_path / "e.psf"


def test_read_image_header_hdus_and_damage(tmp_path):
    data = np.ones((20, 30), np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=header(field="F1", shape=(20, 30)), name="SCI"),
                  fits.ImageHDU(data * 2, name="VAR")]).writeto(tmp_path / "mef.fits")
    h, shape = read_image_header(tmp_path / "mef.fits")
    assert shape == (20, 30) and h["FIELD"] == "F1"  # the first 2-D image HDU
    assert read_image_header(tmp_path / "mef.fits", "VAR")[1] == (20, 30)
    assert read_image_header(tmp_path / "mef.fits", "1")[0]["EXTNAME"] == "SCI"
    fits.CompImageHDU(data, header=header(field="C", shape=(20, 30))).writeto(tmp_path / "c.fits.fz")
    assert read_image_header(tmp_path / "c.fits.fz")[0]["FIELD"] == "C"
    raw = (tmp_path / "mef.fits").read_bytes()
    (tmp_path / "trunc.fits").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(InputError, match="truncated"):
        read_image_header(tmp_path / "trunc.fits", "VAR")
    (tmp_path / "junk.fits").write_bytes(b"this is not FITS" * 300)
    with pytest.raises(InputError, match="unreadable"):
        read_image_header(tmp_path / "junk.fits")
    fits.writeto(tmp_path / "cube.fits", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(InputError):
        read_image_header(tmp_path / "cube.fits", "0")


def test_overlap_fraction_geometry():
    fp = footprint(header(dx=30), (100, 100))
    assert fp is not None and fp.radius == pytest.approx(np.hypot(50, 50) * SCALE, rel=1e-3)
    assert overlap_fraction(header(), (100, 100), footprint(header(), (100, 100))) == pytest.approx(1.0)
    assert overlap_fraction(header(), (100, 100), fp) == pytest.approx(0.7, abs=2e-3)
    assert overlap_fraction(header(), (100, 100), footprint(header(dx=60, dy=50), (100, 100))) == \
        pytest.approx(0.4 * 0.5, abs=2e-3)
    assert overlap_fraction(header(), (100, 100), footprint(header(ra=10.0), (100, 100))) == 0.0
    assert overlap_fraction(header(wcs=False), (100, 100), fp) == 0.0
    assert footprint(header(wcs=False), (100, 100)) is None


def test_match_by_keywords(tmp_path):
    lib_dir = tmp_path / "lib"
    (lib_dir / "sub").mkdir(parents=True)
    write(lib_dir / "r_f1.fits", header("r", "F1"))
    write(lib_dir / "g_f1.fits", header("g", "F1"))
    write(lib_dir / "sub" / "r_f2.fits", header("r", 2, ra=10.0))  # numeric FIELD, in a subdirectory
    write(lib_dir / "r_f1.psf.fits", header(), shape=(5, 5))  # sidecar: not a template
    write(lib_dir / ".hidden.fits", header("r", "F1"))
    lib = TemplateLibrary(lib_dir)
    assert sorted(t.path.name for t in lib.templates) == ["g_f1.fits", "r_f1.fits", "r_f2.fits"]
    m = lib.match(header(" R ", "f1"), (100, 100))  # case and blanks do not matter
    assert m.template.path.name == "r_f1.fits" and m.method == "keywords" and m.overlap == pytest.approx(1.0)
    assert m.template.sidecars.psf == lib_dir / "r_f1.psf.fits"
    assert lib.match(header("r", "2", wcs=False), (100, 100)).template.path.name == "r_f2.fits"
    assert lib.match(header("r", 2.0, wcs=False), (100, 100)).template.path.name == "r_f2.fits"
    with pytest.raises(NoTemplateError, match="no template matches"):
        lib.match(header("i", "F1"), (100, 100))  # wrong filter everywhere, even where it overlaps
    # configurable keywords
    write(lib_dir / "night.fits", header("r", "F9", NIGHT="2026-01-01", ra=40.0))
    by_night = TemplateLibrary(lib_dir, keys=("NIGHT",))
    assert by_night.match(header("z", "F1", NIGHT="2026-01-01", wcs=False), (100, 100)).template.path.name \
        == "night.fits"


def test_match_by_wcs_overlap(tmp_path):
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    write(lib_dir / "a.fits", header("r", "A", dx=30))   # 70 % overlap
    write(lib_dir / "b.fits", header("r", "B", dx=-60))  # 40 % overlap
    write(lib_dir / "c.fits", header("r", "C", ra=200.0))  # elsewhere
    write(lib_dir / "g.fits", header("g", "G"))  # same place, other filter: never chosen
    write(lib_dir / "nowcs.fits", header("r", "N", wcs=False))
    lib = TemplateLibrary(lib_dir)
    m = lib.match(header("r", None), (100, 100))  # no FIELD: the largest overlap wins
    assert m.template.path.name == "a.fits" and m.method == "wcs" and m.overlap == pytest.approx(0.7, abs=0.01)
    m = lib.match(header("r", None, dx=-50), (100, 100))
    assert m.template.path.name == "b.fits" and m.overlap == pytest.approx(0.9, abs=0.01)
    with pytest.raises(NoTemplateError):
        lib.match(header("r", None, ra=300.0), (100, 100))
    with pytest.raises(NoTemplateError):
        TemplateLibrary(lib_dir, min_overlap=0.8).match(header("r", None), (100, 100))
    # several templates agree on every keyword: the best overlap among them
    write(lib_dir / "a2.fits", header("r", "A", dx=5))
    assert lib.match(header("r", "A"), (100, 100)).template.path.name == "a2.fits"


def test_reindex_only_on_change(tmp_path):
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    write(lib_dir / "r1.fits", header("r", "F1"))
    lib = TemplateLibrary(lib_dir)
    assert lib.n_indexed == 1 and not lib.refresh() and lib.n_indexed == 1
    with pytest.raises(NoTemplateError):
        lib.match(header("r", "F2"), (100, 100))
    write(lib_dir / "r2.fits", header("r", "F2"))
    assert lib.match(header("r", "F2"), (100, 100)).template.path.name == "r2.fits"  # picked up by match
    assert lib.n_indexed == 2  # only the new file was read
    write(lib_dir / "r2.fits", header("r", "F3"))
    st = os.stat(lib_dir / "r2.fits")
    os.utime(lib_dir / "r2.fits", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert lib.refresh() and lib.n_indexed == 3
    assert lib.match(header("r", "F3"), (100, 100)).template.path.name == "r2.fits"
    (lib_dir / "r1.fits").unlink()
    assert lib.refresh() and [t.path.name for t in lib.templates] == ["r2.fits"]
    (lib_dir / "broken.fits").write_bytes(b"garbage" * 100)  # skipped, not fatal
    assert lib.refresh() and [t.path.name for t in lib.templates] == ["r2.fits"]
    assert not lib.refresh()
