"""zogy_stream: streaming ZOGY proper image subtraction.

Zackay, Ofek & Gal-Yam (2016, ApJ 830, 27) on mosaics of any size: tiles are
read from memory-mapped FITS, subtracted with cached pyFFTW plans and Numba
kernels, and written in place into pre-sized outputs.

Main entry points
-----------------
zogy      the mathematics on one periodic tile (arrays in, arrays out)
stream    generator of finished tiles (paths or arrays in)
subtract  stream into a multi-extension FITS file and a candidate catalogue
"""
import os

# OpenMP workers (Numba's and the libgomp that pyFFTW bundles) otherwise spin
# after every parallel region and steal the two cores from each other and from
# the I/O threads (measured on 2 cores: +50% FFT time with Numba's spinning,
# and 10% of all CPU samples in pyFFTW's libgomp spin loop).  libgomp reads
# this when it is loaded, so it is set here, before anything imports pyfftw or
# numba; a user's explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .deblend import split_blends
from .errors import Cancelled, ConfigError, InputError, ProcessingError, ZogyError
from .masks import EXCLUDE_CANDIDATE, MaskBit
from .options import Options
from .pipeline import SubtractSummary, TileResult, plan_run, stream, subtract
from .tiles import Box, Tile, TileGrid, fft_size
from .zogy import KernelSet, ZogyResult, make_kernels, zogy

__version__ = "0.1.0"

__all__ = [
    "zogy", "stream", "subtract", "plan_run",
    "ZogyResult", "TileResult", "SubtractSummary", "Options", "KernelSet", "make_kernels",
    "split_blends", "MaskBit", "EXCLUDE_CANDIDATE", "Box", "Tile", "TileGrid", "fft_size",
    "ZogyError", "InputError", "ConfigError", "ProcessingError", "Cancelled",
    "__version__",
]
