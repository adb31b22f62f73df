"""The ZOGY mathematics on one periodic tile: invariants of the paper."""
import numpy as np
import pytest

from benchmarks.baseline_numpy import zogy_numpy
from conftest import add_source, floored, gaussian
from zogy_stream import ConfigError, InputError
from zogy_stream.zogy import PsfSpectra, kernel_radius, make_kernels, zogy

SN, SR = 10.0, 7.0


@pytest.fixture(scope="module")
def blank():
    rng = np.random.default_rng(11)
    n = rng.normal(0, SN, (512, 512))
    r = rng.normal(0, SR, (512, 512))
    return n, r


def test_blank_sky_normalisation(blank):
    n, r = blank
    res = zogy(n, r, gaussian(4.0), gaussian(3.0), sigma_new=SN, sigma_ref=SR)
    # 262144 pixels: the sample std is known to ~0.2%
    assert res.d.std() == pytest.approx(1.0, abs=0.01)
    assert res.scorr.std() == pytest.approx(1.0, abs=0.01)
    assert res.s.var() / res.f_s == pytest.approx(1.0, abs=0.03)  # S is correlated: fewer dof
    assert np.allclose(res.flux_err, 1.0 / np.sqrt(res.f_s), rtol=1e-5)
    assert res.psf_d.sum() == pytest.approx(1.0, abs=1e-6)


def test_d_is_white(blank):
    n, r = blank
    d = zogy(n, r, gaussian(4.0), gaussian(2.5), sigma_new=SN, sigma_ref=SR).d
    for lag in (1, 2, 3):
        rho_x = np.mean(d[:, lag:] * d[:, :-lag]) / d.var()
        rho_y = np.mean(d[lag:, :] * d[:-lag, :]) / d.var()
        assert abs(rho_x) < 0.01 and abs(rho_y) < 0.01
    # whereas the score image is strongly correlated (a matched filter)
    s = zogy(n, r, gaussian(4.0), gaussian(2.5), sigma_new=SN, sigma_ref=SR).s
    assert np.mean(s[:, 1:] * s[:, :-1]) / s.var() > 0.5


@pytest.mark.parametrize("flux_ratio", [1.0, 0.7])
def test_point_source_flux_and_snr(blank, flux_ratio):
    n, r = blank
    pn, pr = gaussian(4.0), gaussian(3.0)
    alpha = 2500.0
    n = n.copy()
    add_source(n, pn, flux_ratio * alpha, 200, 300)  # the new image sees F_n * alpha
    res = zogy(n, r, pn, pr, sigma_new=SN, sigma_ref=SR, flux_ratio=flux_ratio)
    iy, ix = np.unravel_index(np.argmax(res.scorr), res.scorr.shape)
    assert (iy, ix) == (200, 300)
    # S peaks at alpha F_S (within its noise sqrt(F_S)), FLUX is unbiased
    assert res.s[iy, ix] == pytest.approx(alpha * res.f_s, abs=4 * np.sqrt(res.f_s))
    assert res.flux[iy, ix] == pytest.approx(alpha, abs=4 * res.flux_err[iy, ix])
    assert res.scorr[iy, ix] == pytest.approx(alpha * np.sqrt(res.f_s), abs=4.0)


def test_swap_negates_d_and_s(blank):
    n, r = blank
    a = zogy(n, r, gaussian(4.0), gaussian(3.0), sigma_new=SN, sigma_ref=SR, flux_ratio=1.3)
    # Swapping roles with F_r pinned to 1: the swapped reference is N / F_n
    # (unit flux scale, noise sigma_n / F_n) and the swapped flux ratio is 1.
    b = zogy(r, n / 1.3, gaussian(3.0), gaussian(4.0), sigma_new=SR, sigma_ref=SN / 1.3,
             flux_ratio=1.0)
    # D is dimensionless and unit-variance: it must flip sign exactly
    assert np.allclose(a.d, -b.d, atol=1e-9)
    c = zogy(r, n, gaussian(3.0), gaussian(4.0), sigma_new=SR, sigma_ref=SN)
    a1 = zogy(n, r, gaussian(4.0), gaussian(3.0), sigma_new=SN, sigma_ref=SR)
    assert np.allclose(a1.d, -c.d, atol=1e-9)
    assert np.allclose(a1.s, -c.s, atol=1e-9)


@pytest.mark.parametrize("size", [15, 16, 21, 24])
def test_psf_centring_odd_and_even(size):
    """A point source stays on its pixel whatever the PSF stamp parity."""
    psf = gaussian(3.0, n=size)
    img = np.zeros((128, 128))
    add_source(img, psf, 1000.0, 60, 70)
    res = zogy(img, np.zeros_like(img), psf, psf, sigma_new=1.0, sigma_ref=1.0)
    for plane in (res.s, res.d):
        assert np.unravel_index(np.argmax(plane), plane.shape) == (60, 70)
    # and symmetric around it: no half-pixel shift
    assert res.s[60, 69] == pytest.approx(res.s[60, 71], rel=1e-6)
    assert res.s[59, 70] == pytest.approx(res.s[61, 70], rel=1e-6)


def test_matches_plain_numpy_with_different_psfs_and_variance(blank):
    """Against an independent whole-image float64 implementation; P_r != P_n
    and asymmetric PSFs would expose a k_n/k_r swap or a conjugation slip."""
    n, r = blank
    rng = np.random.default_rng(3)
    pn = gaussian(4.5, n=27, offset=(0.3, -0.2)) + 0.3 * gaussian(2.0, n=27, offset=(1.0, 1.5))
    pr = gaussian(2.8, n=19, offset=(-0.4, 0.1))
    vn = SN ** 2 * rng.uniform(0.8, 1.5, n.shape)
    vr = SR ** 2 * rng.uniform(0.8, 1.5, n.shape)
    kw = dict(new_var=vn, ref_var=vr, flux_ratio=1.2, astrometric_sigma=(0.3, 0.1))
    ours = zogy(n, r, pn, pr, sigma_new=SN, sigma_ref=SR, **kw)
    ref = zogy_numpy(n, r, floored(pn), floored(pr), SN, SR, **kw)
    assert ours.f_s == pytest.approx(ref["f_s"], rel=1e-9)
    interior = (slice(2, -2), slice(2, -2))  # np.gradient is one-sided at the border
    for key in ("d", "s", "scorr", "flux", "flux_err"):
        a, b = getattr(ours, key)[interior], ref[key][interior]
        assert np.max(np.abs(a - b)) < 1e-6 * max(1.0, np.abs(b).max()), key
    # swapped kernels would not match: guard the test itself
    bad = zogy_numpy(n, r, pr, pn, SN, SR, **kw)
    assert np.max(np.abs(ours.s - bad["s"])) > 1e-3


def test_float32_matches_float64(blank):
    n, r = blank
    a = zogy(n, r, gaussian(4.0), gaussian(3.0), sigma_new=SN, sigma_ref=SR, dtype=np.float64)
    b = zogy(n, r, gaussian(4.0), gaussian(3.0), sigma_new=SN, sigma_ref=SR, dtype=np.float32)
    assert b.scorr.dtype == np.float32
    assert np.max(np.abs(a.scorr - b.scorr)) < 1e-4
    assert np.max(np.abs(a.d - b.d)) < 1e-4


def test_astrometric_noise_lowers_scorr_on_residual_star(blank):
    n, r = blank
    pn, pr = gaussian(4.0), gaussian(3.0)
    n, r = n.copy(), r.copy()
    add_source(n, pn, 1e5, 100, 100)
    add_source(r, gaussian(3.0, offset=(0.0, 0.2)), 1e5, 100, 100)  # misregistered by 0.2 px
    plain = zogy(n, r, pn, pr, sigma_new=SN, sigma_ref=SR)
    ast = zogy(n, r, pn, pr, sigma_new=SN, sigma_ref=SR, astrometric_sigma=(0.2, 0.2))
    win = (slice(90, 111), slice(90, 111))
    assert np.abs(plain.scorr[win]).max() > 10  # a false dipole without V_ast
    assert np.abs(ast.scorr[win]).max() < 5
    # far from the star only the (small) gradient of the noise in S_N, S_R adds
    far = (slice(300, 400), slice(300, 400))
    ratio = ast.scorr[far].std() / plain.scorr[far].std()
    assert 0.97 < ratio < 1.0


def test_vanishing_psf_transforms_give_no_nan():
    """Very wide PSFs: both transforms underflow at high frequencies."""
    rng = np.random.default_rng(5)
    n = rng.normal(0, 1, (256, 256))
    r = rng.normal(0, 1, (256, 256))
    res = zogy(n, r, gaussian(14.0, n=101), gaussian(12.0, n=101), sigma_new=1, sigma_ref=1)
    for key in ("d", "s", "scorr", "flux", "flux_err"):
        assert np.all(np.isfinite(getattr(res, key))), key


def test_kernel_radius_is_compact_and_grows_with_psf():
    r_small = kernel_radius(gaussian(3.0), gaussian(2.5), sigma_n=10, sigma_r=7)
    r_big = kernel_radius(gaussian(8.0), gaussian(6.0), sigma_n=10, sigma_r=7)
    assert 5 <= r_small < 30
    assert r_big > r_small


def test_kernel_radius_of_broad_psfs_is_not_round_off():
    """Beyond the band broad PSFs pass, their transforms are round-off of random sign,
    and D's kernels (eq. 13) followed it: radius 256 (the cap) for 5 / 5 px Gaussians
    before PSF_FLOOR, 15 with it.  The S kernels (eqs. 28-29) were compact
    either way."""
    kw = dict(sigma_n=10, sigma_r=10)
    assert kernel_radius(gaussian(5.0), gaussian(5.0), **kw) <= 20
    assert kernel_radius(gaussian(7.0), gaussian(5.0), **kw) <= 40
    # float32 PSF files: round-off ~1e-8, not 1e-17 (259 px before the floor was 1e-7)
    f32 = [gaussian(f).astype(np.float32) for f in (5.5, 5.0)]
    assert kernel_radius(*f32, **kw) <= 30


def test_kernels_follow_the_paper():
    """F_S equals its eq. (42) sum; var(S) = sigma_n^2 sum k_n^2 + sigma_r^2 sum k_r^2 = F_S."""
    spectra = PsfSpectra.from_psfs(gaussian(4.0), gaussian(3.0), (64, 64))
    ks = make_kernels(spectra, sigma_n=SN, sigma_r=SR, flux_ratio=1.4, dtype=np.float64)
    pn = np.fft.fft2(np.roll(np.pad(floored(gaussian(4.0)), ((0, 39), (0, 39))), (-12, -12),
                             (0, 1)))
    pr = np.fft.fft2(np.roll(np.pad(floored(gaussian(3.0)), ((0, 45), (0, 45))), (-9, -9),
                             (0, 1)))
    delta = SN ** 2 * abs(pr) ** 2 + SR ** 2 * 1.4 ** 2 * abs(pn) ** 2
    fs = (1.4 ** 2 * abs(pn) ** 2 * abs(pr) ** 2 / delta).sum() / 64 ** 2
    assert ks.f_s == pytest.approx(fs, rel=1e-10)
    assert SN ** 2 * ks.energy_n + SR ** 2 * ks.energy_r == pytest.approx(ks.f_s, rel=1e-10)
    assert ks.f_d == pytest.approx(1.4 / np.sqrt(SN ** 2 + SR ** 2 * 1.4 ** 2))


def test_bad_arrays_are_input_errors():
    g = gaussian(3.0)
    with pytest.raises(InputError, match="shape"):
        zogy(np.zeros((10, 10)), np.zeros((10, 11)), g, g, sigma_new=1, sigma_ref=1)
    with pytest.raises(InputError, match="NaN"):
        a = np.zeros((32, 32))
        a[3, 3] = np.nan
        zogy(a, np.zeros((32, 32)), g, g, sigma_new=1, sigma_ref=1)
    with pytest.raises(InputError, match="PSF"):
        zogy(np.zeros((32, 32)), np.zeros((32, 32)), -g, g, sigma_new=1, sigma_ref=1)


def test_fit_model_error_recovers_the_residual_level():
    """Static-source residuals S ~ N(0, V + eps^2 m^2): eps comes back; pure noise gives 0."""
    from zogy_stream.zogy import fit_model_error

    rng = np.random.default_rng(5)
    m = rng.uniform(20, 400, 300)
    v = np.full(300, 1.0)
    s = rng.normal(0, np.sqrt(v + (0.03 * m) ** 2))
    assert fit_model_error(s, v, m) == pytest.approx(0.03, rel=0.15)
    assert fit_model_error(rng.normal(0, 1, 300), v, m) < 0.002
    # a few variable stars among them do not move it
    s2 = s.copy()
    s2[:20] += 0.5 * m[:20]
    assert fit_model_error(s2, v, m) == pytest.approx(0.03, rel=0.25)
    assert np.isnan(fit_model_error(s[:4], v[:4], m[:4]))


def test_model_error_term_silences_static_residuals_only():
    """NEW's stars are wider than its PSF model says (a 4% FWHM error): bright stars leave
    > 5 sigma residuals unless the model-error term absorbs them; a transient on empty sky
    keeps its S_corr."""
    rng = np.random.default_rng(8)
    n = 256
    new = rng.normal(0, SN, (n, n))
    ref = rng.normal(0, SR, (n, n))
    k = 0
    while k < 40:
        y, x = rng.integers(20, n - 20, 2)
        if abs(y - 128) < 30 and abs(x - 128) < 30:
            continue  # keep the transient's surroundings empty
        f = 10 ** rng.uniform(3.5, 4.7)
        add_source(new, gaussian(4.16, n=31), f, y, x)
        add_source(ref, gaussian(3.0, n=31), f, y, x)
        k += 1
    add_source(new, gaussian(4.16, n=31), 800.0, 128, 128)  # transient, no star near
    kw = dict(sigma_new=SN, sigma_ref=SR)
    plain = zogy(new, ref, gaussian(4.0, n=31), gaussian(3.0, n=31), **kw)
    fit = zogy(new, ref, gaussian(4.0, n=31), gaussian(3.0, n=31), model_error="auto", **kw)
    far = np.ones((n, n), bool)
    far[118:139, 118:139] = False
    assert np.max(np.abs(plain.scorr[far])) > 8
    assert np.max(np.abs(fit.scorr[far])) < 5
    assert 0.005 < fit.model_error < 0.2
    assert plain.scorr[128, 128] > 7
    assert fit.scorr[128, 128] == pytest.approx(plain.scorr[128, 128], rel=0.01)
    assert plain.model_error == 0.0
    for bad in (-1, 1.5, "often", float("nan")):
        with pytest.raises(ConfigError, match="model_error"):
            zogy(new, ref, gaussian(4.0), gaussian(3.0), model_error=bad, **kw)


def test_run_into_caller_buffers():
    """TileSubtractor.run(out=...) writes the five products into the caller's
    (5, n) buffer as contiguous views, identical to fresh arrays; a buffer of the
    wrong size or type is refused."""
    from zogy_stream.tiles import Box
    from zogy_stream.zogy import KernelCache, TileSubtractor

    rng = np.random.default_rng(3)
    shape = (64, 72)
    psf = gaussian(2.0, 15)
    sub = TileSubtractor(shape, has_var=True, split=False, threads=1)
    ks = KernelCache(shape, dtype=np.float32).get(0, psf, psf, sigma_n=1.0, sigma_r=1.0,
                                                  flux_ratio=1.0)
    region = Box(5, 55, 6, 66)

    def fill():
        sub.inputs[0] = rng.normal(size=shape)
        sub.inputs[1] = rng.normal(size=shape)
        sub.inputs[2] = 1.0
        sub.inputs[3] = 1.0

    state = rng.bit_generator.state
    fill()
    a = sub.run(ks, region, var_const=1.0)
    rng.bit_generator.state = state
    fill()
    buf = np.full((5, 50 * 60 + 7), np.nan, np.float32)
    b = sub.run(ks, region, var_const=1.0, out=buf)
    for k in ("d", "s", "scorr", "flux", "flux_err"):
        assert b[k].flags.c_contiguous and np.shares_memory(b[k], buf)
        np.testing.assert_array_equal(a[k], b[k])
    for bad in (np.empty((5, 100), np.float32), np.empty((5, 3000), np.float64),
                np.empty((4, 3000), np.float32)):
        with pytest.raises(ValueError, match="out must be"):
            sub.run(ks, region, var_const=1.0, out=bad)


def _race(target, n, started, gate):
    """Run ``target`` in ``n`` threads; release ``gate`` once a build has ``started``
    and the other threads have had time to ask (and block) too."""
    import threading
    import time

    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    while not started and time.monotonic() - t0 < 5:
        time.sleep(0.001)
    time.sleep(0.2)  # the others reach the cache: they find the build under way
    gate.set()
    for t in threads:
        t.join(10)


def test_kernel_cache_is_shared_safely_between_threads(monkeypatch):
    """Tiles processed at once share one cache: a set being built by one thread is
    waited for by the others (built once, the same object), and a failed build is
    retried by the waiter, which then fails itself."""
    import importlib
    import threading

    from zogy_stream.simulate import gaussian_psf

    zogy = importlib.import_module("zogy_stream.zogy")  # the package's ``zogy`` is a function
    psf = gaussian_psf(3.0, size=15)
    cache = zogy.KernelCache((64, 64), dtype=np.float32)
    real, gate, calls = zogy.make_kernels, threading.Event(), []

    def slow(*a, **k):
        calls.append(1)
        gate.wait(5)  # hold the build until the other threads have asked
        return real(*a, **k)

    monkeypatch.setattr(zogy, "make_kernels", slow)
    got = []
    _race(lambda: got.append(cache.get(0, psf, psf, sigma_n=1.0, sigma_r=1.2, flux_ratio=1.0)),
          4, calls, gate)
    assert len(calls) == 1 and cache.builds == 1 and len(got) == 4
    assert all(g is got[0] for g in got) and got[0] is not None

    def broken(*a, **k):
        calls.append(1)
        gate2.wait(5)
        raise RuntimeError("build failed")

    gate2 = threading.Event()
    calls.clear()
    monkeypatch.setattr(zogy, "make_kernels", broken)
    errors = []

    def ask2():
        try:
            cache.get(1, psf, psf, sigma_n=1.0, sigma_r=1.0, flux_ratio=1.0)
        except RuntimeError as exc:
            errors.append(exc)

    _race(ask2, 2, calls, gate2)
    assert len(errors) == 2 and len(calls) == 2 and cache.builds == 1


@pytest.mark.parametrize("shape", [(64, 64), (63, 65), (64, 63), (31, 48)])
def test_origin_value_of_a_half_spectrum(shape):
    """F_S is read off the half spectrum (no inverse FFT): the image's value at the
    origin, for odd and even widths (the Nyquist column counted once)."""
    from zogy_stream.zogy import _origin_value

    a = np.random.default_rng(shape[1]).normal(size=shape) + 0.3
    assert _origin_value(np.fft.rfft2(a), shape[1]) == pytest.approx(a[0, 0], rel=1e-12,
                                                                     abs=1e-12)


def test_tile_kernels_leave_psf_d_out_and_keep_f_s():
    y, x = np.mgrid[-10:11, -10:11]
    pn, pr = np.exp(-(x * x + y * y) / 4.5), np.exp(-(x * x + y * y) / 3.0)
    spectra = PsfSpectra.from_psfs(pn, pr, (96, 90))
    full = make_kernels(spectra, sigma_n=1.0, sigma_r=1.3, flux_ratio=0.8)
    lean = make_kernels(spectra, sigma_n=1.0, sigma_r=1.3, flux_ratio=0.8, with_psf_d=False)
    assert lean.psf_d is None and full.psf_d.sum() == pytest.approx(1.0, rel=1e-6)
    assert lean.f_s == full.f_s
    # F_S (eq. 42) is S's response to a unit point source in N
    k_n = np.fft.irfft2(full.k_n.astype(np.complex128) * (96 * 90), s=(96, 90))
    src = np.fft.irfft2(spectra.pn, s=(96, 90)) * 0.8  # F_n P_n, centred at the origin
    response = np.real(np.fft.ifft2(np.fft.fft2(k_n) * np.fft.fft2(src)))[0, 0]
    assert full.f_s == pytest.approx(response, rel=1e-4)
