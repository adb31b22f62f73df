import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))  # for benchmarks.baseline_numpy (the independent oracle)


def gaussian(fwhm, n=None, offset=(0.0, 0.0)):
    """Point-sampled Gaussian PSF, odd or even ``n``, centre at n // 2 (+offset)."""
    n = n or (2 * int(3 * fwhm) + 1)
    s = fwhm / 2.3548
    y, x = np.indices((n, n)) - n // 2
    p = np.exp(-((x - offset[1]) ** 2 + (y - offset[0]) ** 2) / (2 * s * s))
    return p / p.sum()


def floored(psf):
    """``psf`` as the ZOGY kernels see it: unit sum plus a delta of weight PSF_FLOOR
    at the centre (see zogy_stream.zogy.PSF_FLOOR), for independent oracles."""
    from zogy_stream.zogy import PSF_FLOOR

    p = np.array(psf, dtype=float) / np.sum(psf)
    p[p.shape[0] // 2, p.shape[1] // 2] += PSF_FLOOR
    return p / p.sum()


def add_source(img, psf, flux, y, x):
    """Add ``flux * psf`` with the PSF centre on pixel (y, x)."""
    py, px = psf.shape
    img[y - py // 2: y - py // 2 + py, x - px // 2: x - px // 2 + px] += flux * psf


@pytest.fixture(autouse=True)
def _no_user_wisdom(tmp_path, monkeypatch):
    """Keep FFTW wisdom of tests out of the user's cache directory."""
    monkeypatch.setenv("ZOGY_STREAM_WISDOM", str(tmp_path / "wisdom"))


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
