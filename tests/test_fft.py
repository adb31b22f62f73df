"""FFT plans against NumPy's transforms."""
import numpy as np
import pytest

from zogy_stream.fft import RealFFT2


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(48, 60), (45, 51)])
def test_real_fft2_planes_match_numpy(shape, threads):
    """Each plane of the batch is transformed (one plan per plane on one thread,
    a batch plan on more), the first ``n_forward`` forward and the first
    ``n_inverse`` inverse, unnormalised."""
    rng = np.random.default_rng(3)
    fft = RealFFT2(shape, n_forward=4, n_inverse=3, dtype=np.float64, threads=threads,
                   effort="FFTW_ESTIMATE")
    assert fft.per_plane == (threads == 1)
    data = rng.normal(size=(4,) + shape)
    fft.real[:] = data
    spec = fft.forward()
    assert spec.shape == (4, shape[0], shape[1] // 2 + 1)
    np.testing.assert_allclose(spec, np.fft.rfft2(data), rtol=1e-10, atol=1e-9)
    want = np.fft.irfft2(spec[:3], s=shape) * (shape[0] * shape[1])
    out = fft.inverse()
    assert out.shape == (3,) + shape
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(out, data[:3] * (shape[0] * shape[1]), rtol=1e-9, atol=1e-8)


def test_real_fft2_float32():
    rng = np.random.default_rng(4)
    fft = RealFFT2((64, 64), n_forward=2, n_inverse=2, dtype=np.float32, effort="FFTW_ESTIMATE")
    assert fft.spec.dtype == np.complex64
    data = rng.normal(size=(2, 64, 64)).astype(np.float32)
    fft.real[:2] = data
    fft.forward()
    np.testing.assert_allclose(fft.inverse() / 64 ** 2, data, atol=2e-5)
