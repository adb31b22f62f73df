"""FFT plans and FFTW wisdom.

:class:`RealFFT2` holds aligned work buffers for a batch of real 2-D planes
and their half spectra, and pyFFTW plans for forward (real to complex) and
inverse (complex to real) transforms of the first *k* planes.  Plans are made
once, on the buffers themselves before any data is put there (FFTW's planner
overwrites the arrays it plans on), and reused for every tile.

:class:`Wisdom` loads accumulated FFTW wisdom from a cache file and saves it
atomically, so a second run plans at once and concurrent writers can never
leave a corrupt file.
"""
from __future__ import annotations

import logging
import os
import struct
import tempfile
import time
from pathlib import Path

import numpy as np


def _import_pyfftw():
    """``import pyfftw`` without the two optional back-ends its package imports.

    ``pyfftw/__init__`` imports ``pyfftw.interfaces``, which imports
    ``scipy.fftpack`` and ``dask.array.fft`` (when installed) only to offer
    drop-in wrappers for them; nothing here uses those wrappers, and the two
    imports were 0.35 of the 1.06 s a run took to start (measured with
    ``python -X importtime``).  They are blocked for that one import and
    unblocked right after; a module already imported is left alone, and
    ``import pyfftw.interfaces.scipy_fftpack`` (or ``dask_fft``) still works.
    (Another thread importing scipy.fftpack or dask.array.fft during those
    ~60 ms of ``import zogy_stream`` would get an ImportError: import the
    package before starting such threads.)
    """
    import sys

    blocked = [n for n in ("scipy.fftpack", "dask.array.fft") if n not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # an import of it raises ImportError, which pyfftw skips
    try:
        import pyfftw as module
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return module


pyfftw = _import_pyfftw()

__all__ = ["RealFFT2", "Wisdom", "default_wisdom_path", "WISDOM_ENV"]

log = logging.getLogger(__name__)

WISDOM_ENV = "ZOGY_STREAM_WISDOM"
_MAGIC = b"ZSWISDOM1\n"


def default_wisdom_path() -> Path:
    """``$ZOGY_STREAM_WISDOM``, else ``$XDG_CACHE_HOME/zogy_stream/fftw_wisdom``."""
    env = os.environ.get(WISDOM_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zogy_stream" / "fftw_wisdom"


class Wisdom:
    """FFTW wisdom cache file (``path=None`` disables caching).

    Wisdom itself lives in the FFTW library of the process; this object only
    moves it to and from disk.
    """

    def __init__(self, path: os.PathLike | str | None) -> None:
        self.path = None if path is None else Path(path)
        self.loaded = False

    def load(self) -> bool:
        """Import wisdom from the file; a missing or unreadable file is ignored."""
        if self.path is None or not self.path.is_file():
            return False
        try:
            blob = self.path.read_bytes()
            if not blob.startswith(_MAGIC):
                raise ValueError("bad magic")
            parts, pos = [], len(_MAGIC)
            for _ in range(3):
                (n,) = struct.unpack_from("<Q", blob, pos)
                pos += 8
                parts.append(blob[pos:pos + n])
                pos += n
            pyfftw.import_wisdom(tuple(parts))
            self.loaded = True
        except (OSError, ValueError, struct.error) as exc:
            log.warning("ignoring unreadable FFTW wisdom file %s (%s)", self.path, exc)
            return False
        log.debug("imported FFTW wisdom from %s", self.path)
        return True

    def save(self, *, learned: bool = True) -> bool:
        """Write all wisdom of this process atomically (temporary file + rename).

        A failure is a warning when this run's planner ``learned`` something
        that would be lost, else a debug message: a process that knew its plans
        already (a daemon's later jobs, with a file it cannot write) loses
        nothing it has, and is not told so again for every job.
        """
        if self.path is None:
            return False
        parts = pyfftw.export_wisdom()
        blob = _MAGIC + b"".join(struct.pack("<Q", len(p)) + p for p in parts)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".wisdom.", dir=self.path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, self.path)
        except OSError as exc:
            (log.warning if learned else log.debug)(
                "could not save FFTW wisdom to %s (%s): later runs plan their FFTs afresh; "
                "point --wisdom (or $%s) at a writable file", self.path,
                exc.strerror or exc, WISDOM_ENV)
            return False
        log.debug("saved FFTW wisdom to %s", self.path)
        return True


class RealFFT2:
    """Batched real 2-D FFTs over preallocated, aligned buffers.

    Parameters
    ----------
    shape : (int, int)
        Plane shape (the padded tile).
    n_forward, n_inverse : int
        How many leading planes the forward and the inverse plan transform.
    dtype : numpy dtype
        ``float32`` (complex64 spectra) or ``float64``.
    threads : int
        FFTW threads.
    effort : str
        FFTW planner flag, e.g. ``"FFTW_MEASURE"`` or ``"FFTW_ESTIMATE"``.

    Attributes
    ----------
    real : ndarray, shape (max(n_forward, n_inverse), ny, nx)
    spec : ndarray, shape (max(...), ny, nx // 2 + 1)
    plan_seconds : float
        Time spent planning (near zero with warm wisdom).
    """

    def __init__(self, shape, *, n_forward: int, n_inverse: int, dtype=np.float32,
                 threads: int = 1, effort: str = "FFTW_MEASURE") -> None:
        dtype = np.dtype(dtype)
        cdtype = np.result_type(dtype, np.complex64)
        n = max(n_forward, n_inverse)
        ny, nx = shape
        self.shape = (ny, nx)
        self.real = pyfftw.empty_aligned((n, ny, nx), dtype=dtype)
        self.spec = pyfftw.empty_aligned((n, ny, nx // 2 + 1), dtype=cdtype)
        flags = (effort, "FFTW_DESTROY_INPUT")
        t0 = time.perf_counter()
        # On one thread, one plan per plane: a plane and its spectrum (9 MiB at
        # 1080^2) stay in the L3 cache between FFTW's row and column passes, a
        # batch of four (37 MiB) does not.  Four forward and four inverse 1080^2
        # transforms: 31 against 33 ms alone, 31-33 against 34-39 ms with two
        # such threads side by side (as tiles run).  On more threads the batch
        # plan: FFTW's threads then share whole planes (2 threads: 17-18 against
        # 21 ms plane by plane).  The planes are alike (shape, strides,
        # alignment), so FFTW plans one plane's problem once.
        self.per_plane = int(threads) == 1
        if self.per_plane:
            fwd = [(self.real[k], self.spec[k]) for k in range(n_forward)]
            inv = [(self.spec[k], self.real[k]) for k in range(n_inverse)]
        else:
            fwd = [(self.real[:n_forward], self.spec[:n_forward])]
            inv = [(self.spec[:n_inverse], self.real[:n_inverse])]
        self._fwd = [pyfftw.FFTW(a, b, axes=(-2, -1), direction="FFTW_FORWARD", flags=flags,
                                 threads=threads) for a, b in fwd]
        self._inv = [pyfftw.FFTW(a, b, axes=(-2, -1), direction="FFTW_BACKWARD", flags=flags,
                                 threads=threads) for a, b in inv]
        self.plan_seconds = time.perf_counter() - t0
        self.n_forward, self.n_inverse = n_forward, n_inverse

    def forward(self) -> np.ndarray:
        """Transform ``real[:n_forward]`` into ``spec[:n_forward]``."""
        for plan in self._fwd:
            plan()
        return self.spec[: self.n_forward]

    def inverse(self) -> np.ndarray:
        """Unnormalised inverse of ``spec[:n_inverse]`` into ``real[:n_inverse]``.

        The input spectra are destroyed; the 1/(ny nx) factor is the caller's.
        """
        for plan in self._inv:
            plan(normalise_idft=False)
        return self.real[: self.n_inverse]
