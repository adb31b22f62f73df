"""FITS reading windows and writing pre-sized outputs, checked against astropy."""
import os
import stat

import numpy as np
import pytest
from astropy.io import fits

from zogy_stream.errors import InputError
from zogy_stream.fitsio import ImageReader, OutputFile, Plane, parse_image_spec, wcs_cards
from zogy_stream.tiles import Box

SHAPE = (61, 83)  # odd, not page-aligned rows

BOXES = [Box(0, 61, 0, 83), Box(0, 1, 0, 1), Box(60, 61, 82, 83), Box(5, 40, 7, 80),
         Box(17, 18, 0, 83), Box(0, 61, 41, 42), Box(30, 61, 0, 10)]


def _astropy(path, ext=0):
    with fits.open(path) as hdul:
        return np.array(hdul[ext].data)


def _write_raw_int16(path, raw, **cards):
    """A FITS file of big-endian int16 ``raw`` with ``cards`` (BSCALE, BZERO, BLANK) as given;
    astropy is not trusted to keep scaling keywords of unscaled data."""
    hdr = fits.Header()
    hdr["SIMPLE"] = True
    hdr["BITPIX"] = 16
    hdr["NAXIS"] = 2
    hdr["NAXIS1"] = raw.shape[1]
    hdr["NAXIS2"] = raw.shape[0]
    for k, v in cards.items():
        hdr[k] = v
    body = raw.astype(">i2").tobytes()
    with open(path, "wb") as fh:
        fh.write(hdr.tostring().encode("ascii"))
        fh.write(body + b"\0" * (-len(body) % 2880))


def _no_pread(rd):
    """Make ``rd`` read through its memory map (the path where there is no preadv)."""
    if rd._fd is not None:
        os.close(rd._fd)
        rd._fd = None
    return rd


def _check_windows(path, expected, spec=None):
    assert expected.dtype.kind == "f"
    for how in ("pread", "mmap"):
        with ImageReader(spec or str(path), label="T") as rd:
            if how == "mmap":
                _no_pread(rd)
            assert rd.shape == expected.shape
            for box in BOXES:
                got = rd.read(box)
                assert got.dtype == np.float32 and got.dtype.isnative
                assert got.shape == box.shape
                np.testing.assert_array_equal(got, expected[box.slices].astype(np.float32))
                for step in (2, 3):  # every step-th row and column
                    np.testing.assert_array_equal(
                        rd.read(box, step=step),
                        expected[box.slices][::step, ::step].astype(np.float32))


# ------------------------------------------------------------------- reading
@pytest.mark.parametrize("dtype", [">f4", ">f8", "<f4", "<f8"])
def test_float_images(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = (rng.normal(100, 30, SHAPE)).astype(dtype)
    path = tmp_path / "f.fits"
    fits.PrimaryHDU(data).writeto(path)
    ref = _astropy(path)
    assert ref.dtype.byteorder == ">"  # FITS is big-endian whatever we gave astropy
    _check_windows(path, ref.astype(np.float64))


def test_int16_bscale_bzero(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(-30000, 30000, SHAPE).astype(np.int16)
    path = tmp_path / "i16.fits"
    _write_raw_int16(path, raw, BSCALE=0.25, BZERO=-100.0)
    with fits.open(path, do_not_scale_image_data=True) as hdul:  # what is on disk
        assert hdul[0].header["BITPIX"] == 16
        np.testing.assert_array_equal(hdul[0].data, raw)
    expected = raw.astype(np.float64) * 0.25 - 100.0
    np.testing.assert_allclose(_astropy(path), expected)
    _check_windows(path, expected)


def test_uint16_via_bzero(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 65536, SHAPE).astype(np.uint16)
    data[0, 0], data[-1, -1] = 0, 65535
    path = tmp_path / "u16.fits"
    fits.PrimaryHDU(data).writeto(path)
    h = fits.getheader(path)
    assert h["BITPIX"] == 16 and h["BZERO"] == 32768
    _check_windows(path, data.astype(np.float64))


def test_int32_and_uint8(tmp_path):
    rng = np.random.default_rng(3)
    i32 = rng.integers(-2 ** 23, 2 ** 23, SHAPE).astype(np.int32)  # exact in float32
    u8 = rng.integers(0, 256, SHAPE).astype(np.uint8)
    fits.PrimaryHDU(i32).writeto(tmp_path / "i32.fits")
    fits.PrimaryHDU(u8).writeto(tmp_path / "u8.fits")
    _check_windows(tmp_path / "i32.fits", i32.astype(np.float64))
    _check_windows(tmp_path / "u8.fits", u8.astype(np.float64))


@pytest.mark.parametrize("bzero, bscale", [(0.0, 1.0), (32768.0, 1.0), (10.0, 2.0)])
def test_blank_becomes_nan(tmp_path, bzero, bscale):
    rng = np.random.default_rng(4)
    raw = rng.integers(-1000, 1000, SHAPE).astype(np.int16)
    raw[3, 4] = raw[60, 82] = raw[0, 0] = -32768
    path = tmp_path / "blank.fits"
    _write_raw_int16(path, raw, BSCALE=bscale, BZERO=bzero, BLANK=-32768)
    expected = raw * bscale + bzero
    expected[raw == -32768] = np.nan
    with ImageReader(str(path)) as rd:
        got = rd.read(Box(0, SHAPE[0], 0, SHAPE[1]))
        assert np.isnan(got).sum() == 3
        np.testing.assert_array_equal(got, expected.astype(np.float32))
        np.testing.assert_array_equal(rd.read(Box(2, 5, 3, 6)), expected[2:5, 3:6].astype(np.float32))
    ref = _astropy(path)
    if ref.dtype.kind == "f":  # astropy turns BZERO=32768 into uint16 and keeps BLANK raw
        np.testing.assert_array_equal(ref, expected.astype(np.float32))


def _mef(path):
    rng = np.random.default_rng(5)
    a = rng.normal(size=SHAPE).astype(np.float32)
    b = rng.normal(size=(20, 30))
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(a, name="SCI"),
                         fits.ImageHDU(b, name="VAR")])
    hdus[1].header["OBJECT"] = "first"
    hdus.writeto(path)
    return a, b


def test_hdu_selection_by_number_and_name(tmp_path):
    path = tmp_path / "mef.fits"
    a, b = _mef(path)
    for spec in (f"{path}[1]", f"{path}[SCI]", f"{path}[sci]", str(path)):
        with ImageReader(spec) as rd:
            assert rd.shape == a.shape, spec
            assert rd.header["OBJECT"] == "first"
            np.testing.assert_array_equal(rd.read(Box(3, 9, 10, 50)), a[3:9, 10:50])
    for spec in (f"{path}[2]", f"{path}[VAR]"):
        with ImageReader(spec) as rd:
            assert rd.shape == b.shape
            np.testing.assert_array_equal(rd.read(Box(0, 20, 0, 30)), b.astype(np.float32))
    for spec in (f"{path}[3]", f"{path}[NOPE]", f"{path}[0]"):
        with pytest.raises(InputError):
            ImageReader(spec)


def test_parse_image_spec(tmp_path):
    assert parse_image_spec("a/b.fits[1]") == (parse_image_spec("a/b.fits")[0], 1)
    assert parse_image_spec("a/b.fits[sci]")[1] == "SCI"
    assert parse_image_spec("b.fits")[1] is None
    literal = tmp_path / "odd[1].fits"
    literal.write_bytes(b"")
    assert parse_image_spec(str(literal)) == (literal, None)


def test_degenerate_third_axis_accepted(tmp_path):
    rng = np.random.default_rng(6)
    cube = rng.normal(size=(1,) + SHAPE).astype(np.float32)
    path = tmp_path / "cube1.fits"
    fits.PrimaryHDU(cube).writeto(path)
    assert fits.getheader(path)["NAXIS"] == 3
    _check_windows(path, cube[0].astype(np.float64))


def test_real_cube_rejected(tmp_path):
    path = tmp_path / "cube2.fits"
    fits.PrimaryHDU(np.zeros((2,) + SHAPE, np.float32)).writeto(path)
    with pytest.raises(InputError, match="2-D"):
        ImageReader(str(path))


def test_bad_files_rejected(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        ImageReader(str(tmp_path / "missing.fits"))
    junk = tmp_path / "junk.fits"
    junk.write_bytes(np.random.default_rng(0).bytes(5760))
    with pytest.raises(InputError):
        ImageReader(str(junk))
    good = tmp_path / "good.fits"
    fits.PrimaryHDU(np.ones((200, 200), np.float32)).writeto(good)
    cut = tmp_path / "cut.fits"
    cut.write_bytes(good.read_bytes()[: 2880 + 50_000])
    with pytest.raises(InputError, match="truncated"):
        ImageReader(str(cut))
    nodata = tmp_path / "nodata.fits"
    fits.PrimaryHDU().writeto(nodata)
    with pytest.raises(InputError):
        ImageReader(str(nodata))


def test_release_then_read(tmp_path):
    rng = np.random.default_rng(7)
    data = rng.normal(size=(700, 300)).astype(">f4")  # several pages per band
    path = tmp_path / "big.fits"
    fits.PrimaryHDU(data).writeto(path)
    with ImageReader(str(path)) as rd:
        for y0 in range(0, 700, 128):
            box = Box(y0, min(y0 + 128, 700), 0, 300)
            first = rd.read(box)
            rd.release(box)
            again = rd.read(box)
            rd.release(Box(0, 700, 0, 300))
            np.testing.assert_array_equal(first, data[box.slices])
            np.testing.assert_array_equal(again, data[box.slices])
        np.testing.assert_array_equal(rd.read(Box(0, 700, 0, 300)), data)


def test_file_truncated_after_opening(tmp_path):
    data = np.arange(40 * 50, dtype=">f4").reshape(40, 50)
    path = tmp_path / "t.fits"
    fits.PrimaryHDU(data).writeto(path)
    with ImageReader(str(path), label="NEW") as rd:
        np.testing.assert_array_equal(rd.read(Box(30, 40, 0, 50)), data[30:])
        with open(path, "r+b") as fh:  # another process cuts the file short
            fh.truncate(2880 + 20 * 50 * 4)
        with pytest.raises(InputError, match="NEW: file ends before row 20"):
            rd.read(Box(10, 40, 5, 20))
        with pytest.raises(InputError, match="ends before row 30"):
            rd.read(Box(30, 40, 0, 50))  # whole rows: one read


def test_compiled_row_reads_match_python_reads(tmp_path, monkeypatch, caplog):
    """Windows read by the compiled pread loop equal those read row by
    row from Python and astropy's scaled data, for every BITPIX (scaled integers with
    BLANK, scaled floats, NaN and -0.0), every row and every 3rd, full-width boxes
    too; where the loop cannot be built the reader says so and reads from Python."""
    import logging

    from zogy_stream import _numba as nk

    rng = np.random.default_rng(4)
    shape = (97, 131)
    images = {}
    ints = rng.integers(-3000, 3000, size=shape).astype(">i2")
    ints[5, 7] = -32768
    images["i2.fits"] = (ints, dict(BSCALE=0.5, BZERO=100.0, BLANK=-32768))
    bytes_ = rng.integers(0, 256, size=shape).astype(">u1")
    bytes_[5, 7] = 255
    images["u1.fits"] = (bytes_, dict(BSCALE=0.25, BZERO=3.0, BLANK=255))
    images["i4.fits"] = (rng.integers(-2 ** 31, 2 ** 31 - 1, size=shape).astype(">i4"), {})
    images["i8.fits"] = (rng.integers(-2 ** 40, 2 ** 40, size=shape).astype(">i8"),
                         dict(BSCALE=2.0))
    floats = rng.normal(size=shape).astype(">f4")
    floats[5, 7], floats[6, 8] = np.nan, -0.0
    images["f4.fits"] = (floats, {})
    images["f4s.fits"] = (floats, dict(BSCALE=3.0, BZERO=-1.5))
    images["f4z.fits"] = (floats, dict(BZERO=-1.5))  # BZERO alone (each case its own loop)
    images["i2z.fits"] = (rng.integers(-3000, 3000, size=shape).astype(">i2"),
                          dict(BZERO=32768.0))
    images["f8.fits"] = (rng.normal(size=shape).astype(">f8"), {})
    boxes = [(Box(0, 97, 3, 60), 1), (Box(2, 90, 40, 131), 3), (Box(5, 6, 7, 8), 1),
             (Box(4, 50, 0, 131), 1), (Box(0, 97, 0, 131), 2)]
    for name, (data, keys) in images.items():
        hdu = fits.PrimaryHDU(data)
        hdu.header.update(keys)
        hdu.writeto(tmp_path / name)
        want = fits.getdata(tmp_path / name).astype(np.float32)  # astropy's scaling, BLANK
        with ImageReader(str(tmp_path / name)) as fast, ImageReader(str(tmp_path / name)) as slow:
            slow._compiled_reads = False
            for box, step in boxes:
                a, b = fast.read(box, step=step), slow.read(box, step=step)
                assert fast._compiled_reads and a.dtype == np.float32
                np.testing.assert_array_equal(a, b)
                # into a reused buffer (the pipeline's window pool): the same values
                out = np.full(a.shape, 7.0, np.float32)
                for rd in (fast, slow):
                    got = rd.read(box, step=step, out=out)
                    assert got is out
                    np.testing.assert_array_equal(got, a)
                    assert np.array_equal(np.signbit(got), np.signbit(a)), name
                assert np.array_equal(np.signbit(a), np.signbit(b)), name
                ref = want[box.y0:box.y1:step, box.x0:box.x1:step]
                np.testing.assert_allclose(a, ref, rtol=1e-6, err_msg=name)
        if "BLANK" in keys:
            with ImageReader(str(tmp_path / name)) as rd:
                got = rd.read(Box(0, 10, 0, 10))
                assert np.isnan(got[5, 7]) and np.isfinite(np.delete(got.ravel(), 57)).all()

    def unavailable(*args):
        raise RuntimeError("Symbol not found: pread")

    monkeypatch.setattr(nk, "_pread_convert", unavailable)
    with ImageReader(str(tmp_path / "f8.fits"), label="REF") as rd, \
            caplog.at_level(logging.DEBUG, logger="zogy_stream.fitsio"):
        got = rd.read(Box(2, 90, 40, 131), step=3)
    assert "REF: compiled row reads unavailable" in caplog.text and not rd._compiled_reads
    want = fits.getdata(tmp_path / "f8.fits")[2:90:3, 40:131:3].astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_mapped_reads_into_a_buffer(tmp_path):
    """Without pread (memory-map path) ``out`` is filled the same way."""
    rng = np.random.default_rng(5)
    data = rng.normal(size=(60, 45)).astype(">f4")
    fits.PrimaryHDU(data).writeto(tmp_path / "m.fits")
    with _no_pread(ImageReader(str(tmp_path / "m.fits"))) as rd:
        for box, step in ((Box(3, 50, 2, 40), 1), (Box(0, 60, 0, 45), 4)):
            want = data[box.y0:box.y1:step, box.x0:box.x1:step].astype(np.float32)
            out = np.full(want.shape, np.nan, np.float32)
            assert rd.read(box, step=step, out=out) is out
            np.testing.assert_array_equal(out, want)


def test_sample(tmp_path):
    rng = np.random.default_rng(8)
    data = rng.normal(size=(301, 257)).astype(np.float32)
    path = tmp_path / "s.fits"
    fits.PrimaryHDU(data).writeto(path)
    with ImageReader(str(path)) as rd:
        for step in (1, 3, 16):
            np.testing.assert_array_equal(rd.sample(step), data[::step, ::step])


def test_array_source():
    data = np.arange(12.0).reshape(3, 4)
    with ImageReader(data) as rd:
        assert rd.shape == (3, 4)
        got = rd.read(Box(1, 3, 1, 3))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, data[1:3, 1:3])
        np.testing.assert_array_equal(rd.read(Box(0, 3, 0, 4), step=2), data[::2, ::2])
        with pytest.raises(ValueError, match="step"):
            rd.read(Box(0, 3, 0, 4), step=0)
        out = np.zeros((2, 2), np.float32)
        assert rd.read(Box(1, 3, 1, 3), out=out) is out
        np.testing.assert_array_equal(out, data[1:3, 1:3])
        for bad in (np.zeros((2, 3), np.float32), np.zeros((2, 2)),
                    np.zeros((2, 4), np.float32)[:, ::2]):
            with pytest.raises(ValueError, match="out must be a writeable C-contiguous "
                                                 r"float32 array of shape \(2, 2\)"):
                rd.read(Box(1, 3, 1, 3), out=bad)
    with pytest.raises(InputError):
        ImageReader(np.zeros((2, 3, 4)))


@pytest.mark.parametrize("kind", ["int", "float"])
def test_tile_compressed(tmp_path, kind):
    rng = np.random.default_rng(9)
    if kind == "int":
        data = rng.integers(-5000, 5000, (130, 90)).astype(np.int32)
    else:
        data = rng.normal(100, 5, (130, 90)).astype(np.float32)
    path = tmp_path / "c.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="RICE_1",
                                                       tile_shape=(16, 90))]).writeto(path)
    ref = _astropy(path, 1).astype(np.float64)
    if kind == "int":
        np.testing.assert_array_equal(ref, data)
    with ImageReader(str(path)) as rd:
        assert rd.shape == data.shape
        for box in (Box(0, 130, 0, 90), Box(10, 47, 3, 60), Box(129, 130, 89, 90)):
            np.testing.assert_array_equal(rd.read(box), ref[box.slices].astype(np.float32))
            np.testing.assert_array_equal(rd.read(box, step=3),
                                          ref[box.slices][::3, ::3].astype(np.float32))
            out = np.empty(box.shape, np.float32)
            assert rd.read(box, out=out) is out
            np.testing.assert_array_equal(out, ref[box.slices].astype(np.float32))
        np.testing.assert_array_equal(rd.sample(4), ref[::4, ::4].astype(np.float32))


def test_wcs_cards():
    h = fits.Header()
    for k, v in [("NAXIS", 2), ("BITPIX", -32), ("OBJECT", "x"), ("CTYPE1", "RA---TAN"),
                 ("CTYPE2", "DEC--TAN"), ("CRVAL1", 10.0), ("CRVAL2", 2.0), ("CRPIX1", 5.0),
                 ("CRPIX2", 6.0), ("CD1_1", -1e-4), ("CD1_2", 0.0), ("CD2_1", 0.0),
                 ("CD2_2", 1e-4), ("A_ORDER", 2), ("A_0_2", 1e-6), ("GAIN", 2.0)]:
        h[k] = v
    w = wcs_cards(h)
    assert list(w.keys()) == ["CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
                              "CD1_1", "CD1_2", "CD2_1", "CD2_2", "A_ORDER", "A_0_2"]


# ------------------------------------------------------------------- writing
def _planes(psf):
    h = fits.Header()
    h["CTYPE1"] = "RA---TAN"
    h["FOO"] = (3, "a comment")
    return [Plane("A", np.float32, (50, 70), h), Plane("M", np.int16, (50, 70)),
            Plane("B", np.float64, (50, 70)), Plane("P", np.float32, psf.shape, data=psf)]


def _hidden(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_output_round_trip(tmp_path):
    rng = np.random.default_rng(10)
    psf = rng.random((7, 9)).astype(np.float32)
    a = rng.normal(size=(50, 70)).astype(np.float32)
    m = rng.integers(-300, 300, (50, 70)).astype(np.int16)
    b = rng.normal(size=(50, 70))
    prim = fits.Header()
    prim["RUNPAR"] = (1.5, "a run parameter")
    final = tmp_path / "out.fits"
    of = OutputFile(final, _planes(psf), primary_header=prim)
    # before commit: a hidden temporary beside the final path, nothing at the final path
    assert not final.exists()
    assert of.tmp.parent == final.parent and of.tmp.name.startswith(".") and of.tmp.exists()
    boxes = [Box(y, min(y + 16, 50), x, min(x + 32, 70)) for y in range(0, 50, 16)
             for x in range(0, 70, 32)]
    for i, box in enumerate(boxes):
        of.write("A", box, a[box.slices])
        of.write("M", box, m[box.slices])
        if i % 2 == 0:
            of.write("B", box, b[box.slices])
    assert not final.exists()
    assert of.commit() == final
    assert final.exists() and not of.tmp.exists() and _hidden(tmp_path) == []
    assert final.stat().st_size % 2880 == 0
    expect_b = np.zeros_like(b)  # never-written areas read as zeros
    for i, box in enumerate(boxes):
        if i % 2 == 0:
            expect_b[box.slices] = b[box.slices]
    with fits.open(final) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul] == ["PRIMARY", "A", "M", "B", "P"]
        assert hdul[0].data is None and hdul[0].header["RUNPAR"] == 1.5
        assert hdul["A"].header["BITPIX"] == -32 and hdul["M"].header["BITPIX"] == 16
        assert hdul["B"].header["BITPIX"] == -64 and hdul["P"].header["BITPIX"] == -32
        assert "BZERO" not in hdul["M"].header
        assert hdul["A"].header["CTYPE1"] == "RA---TAN" and hdul["A"].header["FOO"] == 3
        np.testing.assert_array_equal(hdul["A"].data, a)
        np.testing.assert_array_equal(hdul["M"].data, m)
        assert hdul["M"].data.dtype == np.dtype(">i2")
        np.testing.assert_array_equal(hdul["B"].data, expect_b)
        np.testing.assert_array_equal(hdul["P"].data, psf)
    # and our own reader agrees
    with ImageReader(f"{final}[M]") as rd:
        np.testing.assert_array_equal(rd.read(Box(0, 50, 0, 70)), m.astype(np.float32))


def test_output_replaces_existing_file(tmp_path):
    final = tmp_path / "out.fits"
    final.write_bytes(b"old contents")
    of = OutputFile(final, [Plane("A", np.float32, (4, 4))])
    assert final.read_bytes() == b"old contents"  # untouched until commit
    of.write("A", Box(0, 4, 0, 4), np.full((4, 4), 7, np.float32))
    of.commit()
    np.testing.assert_array_equal(fits.getdata(final, "A"), np.full((4, 4), 7, np.float32))
    assert _hidden(tmp_path) == []


def test_output_abort(tmp_path):
    final = tmp_path / "out.fits"
    of = OutputFile(final, [Plane("A", np.float32, (40, 40))])
    of.write("A", Box(0, 10, 0, 10), np.ones((10, 10), np.float32))
    tmp = of.tmp
    assert tmp.exists()
    of.abort()
    assert not tmp.exists() and not final.exists()
    of.abort()  # idempotent
    assert list(tmp_path.iterdir()) == []


def test_output_context_manager_aborts_on_error(tmp_path):
    final = tmp_path / "out.fits"
    with pytest.raises(RuntimeError):
        with OutputFile(final, [Plane("A", np.float32, (8, 8))]) as of:
            of.write("A", Box(0, 8, 0, 8), np.ones((8, 8), np.float32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_output_directory_missing(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        OutputFile(tmp_path / "nope" / "out.fits", [Plane("A", np.float32, (8, 8))])
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError):
        OutputFile(tmp_path / "file" / "out.fits", [Plane("A", np.float32, (8, 8))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_output_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        final = tmp_path / "out.fits"
        of = OutputFile(final, [Plane("A", np.float32, (8, 8))])
        of.commit()
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(old)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o644
    assert stat.S_IMODE(final.stat().st_mode) == 0o644


def test_output_settled_rows_keep_their_data(tmp_path):
    """Rows written back and dropped from the page cache mid-run read back intact."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(64, 48)).astype(np.float32)
    m = rng.integers(0, 255, (64, 48)).astype(np.uint8)
    final = tmp_path / "out.fits"
    of = OutputFile(final, [Plane("A", np.float32, (64, 48)), Plane("M", np.uint8, (64, 48))])
    for y0 in range(0, 64, 16):
        for x0 in (0, 24):
            box = Box(y0, y0 + 16, x0, x0 + 24)
            of.write("A", box, a[box.slices])
            of.write("M", box, m[box.slices])
        of.settle_rows(y0, y0 + 16)
    of.commit()
    with fits.open(final) as hl:
        np.testing.assert_array_equal(hl["A"].data, a)
        np.testing.assert_array_equal(hl["M"].data, m)
        assert hl["M"].header["BITPIX"] == 8


# --------------------------------------------------------------- row bands
BAND_SHAPE = (70, 1531)  # odd width: each band starts at a different offset modulo 4 KiB


def _band_planes():
    return [Plane("A", np.float32, BAND_SHAPE), Plane("M", np.uint8, BAND_SHAPE),
            Plane("B", np.float64, BAND_SHAPE),
            Plane("P", np.float32, (5, 5), data=np.arange(25, dtype=np.float32).reshape(5, 5))]


def _band_data():
    rng = np.random.default_rng(21)
    return {"A": rng.normal(size=BAND_SHAPE).astype(np.float32),
            "M": rng.integers(0, 256, BAND_SHAPE).astype(np.uint8),
            "B": rng.normal(size=BAND_SHAPE)}


def _write_tiles(of, data, *, band_rows=16, tile_cols=400, end=True):
    ny, nx = BAND_SHAPE
    for y0 in range(0, ny, band_rows):
        y1 = min(y0 + band_rows, ny)
        for x0 in range(0, nx, tile_cols):
            box = Box(y0, y1, x0, min(x0 + tile_cols, nx))
            for name, arr in data.items():
                of.write(name, box, arr[box.slices])
        if end:
            of.end_rows(y0, y1)


@pytest.mark.parametrize("direct", [True, False])
def test_output_bands_byte_identical_to_mapped(tmp_path, monkeypatch, direct):
    """Bands gathered in aligned buffers and written with direct I/O (or, without
    O_DIRECT, through the page cache) give the same file, byte for byte, as
    tiles written through the memory map."""
    data = _band_data()
    mapped = OutputFile(tmp_path / "mapped.fits", _band_planes())
    _write_tiles(mapped, data)
    mapped.commit()
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    of = OutputFile(tmp_path / "bands.fits", _band_planes())
    got = of.use_bands(16)
    if direct and not got:
        pytest.skip("this filesystem has no direct I/O")
    assert got is direct and of.bands
    _write_tiles(of, data)
    of.commit()
    assert (tmp_path / "bands.fits").read_bytes() == (tmp_path / "mapped.fits").read_bytes()
    with fits.open(tmp_path / "bands.fits") as hl:
        for name, arr in data.items():
            np.testing.assert_array_equal(hl[name].data, arr)
    assert _hidden(tmp_path) == []


def test_output_bands_direct_refused_mid_run(tmp_path, monkeypatch):
    """A filesystem that refuses a direct write (EINVAL) gets the band through the
    page cache, and every later band too."""
    import errno

    data = _band_data()
    of = OutputFile(tmp_path / "out.fits", _band_planes())
    if not of.use_bands(16):
        pytest.skip("this filesystem has no direct I/O")
    bands = of._bands
    real = os.pwrite
    refused = []

    def pwrite(fd, buf, at):
        if fd == bands._dfd and at > 50_000:  # the first bands go direct
            refused.append(at)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buf, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    _write_tiles(of, data)
    assert refused and not bands.direct
    of.commit()
    with fits.open(tmp_path / "out.fits") as hl:
        for name, arr in data.items():
            np.testing.assert_array_equal(hl[name].data, arr)


def test_output_bands_must_be_complete_and_in_order(tmp_path):
    from zogy_stream.errors import ProcessingError

    data = _band_data()
    of = OutputFile(tmp_path / "out.fits", _band_planes())
    of.use_bands(16)
    box = Box(0, 16, 0, 400)
    for name, arr in data.items():
        of.write(name, box, arr[box.slices])
    with pytest.raises(ProcessingError, match="written while rows 0-16 are unfinished"):
        of.write("A", Box(16, 32, 0, 400), data["A"][16:32, :400])
    with pytest.raises(ProcessingError, match=r"columns 400-1531 were never written"):
        of.end_rows(0, 16)
    for name, arr in data.items():  # the same tile again covers nothing new
        of.write(name, box, arr[box.slices])
    with pytest.raises(ProcessingError, match=r"\(1131 of 1531\)"):
        of.end_rows(0, 16)
    with pytest.raises(ProcessingError, match="rows 16-32 are not the band"):
        of.end_rows(16, 32)
    with pytest.raises(ProcessingError, match="never completed"):
        of.commit()
    of.abort()
    assert list(tmp_path.iterdir()) == []
    # a band taller than the buffers
    of = OutputFile(tmp_path / "out.fits", _band_planes())
    of.use_bands(8)
    with pytest.raises(ProcessingError, match="exceeds the 8 buffered"):
        of.write("A", box, data["A"][box.slices])
    of.abort()


def test_output_bands_full_disk_is_an_error(tmp_path, monkeypatch):
    """A direct write failing for a real reason (a full disk) is not retried through
    the cache: the error reaches the caller (one line from the CLI), and abort leaves
    nothing behind."""
    import errno

    data = _band_data()
    of = OutputFile(tmp_path / "out.fits", _band_planes())
    if not of.use_bands(16):
        pytest.skip("this filesystem has no direct I/O")
    dfd = of._bands._dfd
    real = os.pwrite

    def pwrite(fd, buf, at):
        if fd == dfd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buf, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as info:
        _write_tiles(of, data)
    assert info.value.errno == errno.ENOSPC
    of.abort()
    assert list(tmp_path.iterdir()) == []


def test_output_needs_room_on_its_filesystem(tmp_path, monkeypatch):
    """An output larger than the free space fails at creation (a memory-mapped write
    to a full disk would kill the process with SIGBUS), with a message naming both
    sizes, and leaves nothing behind."""
    real = os.statvfs

    class Small:
        def __init__(self, st):
            self.f_frsize = st.f_frsize
            self.f_bavail = (1 << 20) // st.f_frsize  # 1 MiB free

    monkeypatch.setattr(os, "statvfs", lambda path: Small(real(path)))
    import errno

    with pytest.raises(OSError, match=r"needs 4 MiB but its filesystem has 1 MiB free") as info:
        OutputFile(tmp_path / "out.fits", [Plane("A", np.float32, (1024, 1024))])
    # an OSError (a daemon retries those), not a permanent input error
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, InputError)
    assert info.value.filename == str(tmp_path / "out.fits")
    assert list(tmp_path.iterdir()) == []
    OutputFile(tmp_path / "out.fits", [Plane("A", np.float32, (256, 256))]).commit()
