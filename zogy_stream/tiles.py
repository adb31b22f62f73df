"""Tile geometry: pure integer arithmetic, no arrays.

A mosaic of shape ``(ny, nx)`` is cut into square *cores* of side ``core``.
Each core is processed inside a *window* that extends ``margin`` pixels on
every side (the overlap), rounded up to one FFT-friendly padded side ``size``
shared by every tile, so that one set of FFT plans serves the whole mosaic.
Windows may reach outside the image; the reader fills that part.

Coordinates are 0-based, ``(y, x)`` order, half-open slices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

__all__ = ["fft_size", "Box", "Tile", "TileGrid"]


def _is_smooth(n: int) -> bool:
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


def fft_size(n: int, *, even: bool = True) -> int:
    """Smallest 2^a 3^b 5^c 7^d integer >= ``n`` (even when ``even``).

    Real-to-complex transforms are fastest for even sizes made of small
    primes; rounding to powers of two would waste up to 4x FFT area.
    """
    if n < 1:
        raise ValueError(f"fft_size needs n >= 1, got {n}")
    m = n
    while not (_is_smooth(m) and (m % 2 == 0 or not even)):
        m += 1
    return m


@dataclass(frozen=True)
class Box:
    """Half-open pixel box ``[y0, y1) x [x0, x1)``."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def slices(self) -> tuple[slice, slice]:
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def clip(self, ny: int, nx: int) -> "Box":
        return Box(max(self.y0, 0), min(self.y1, ny), max(self.x0, 0), min(self.x1, nx))

    def shift(self, dy: int, dx: int) -> "Box":
        return Box(self.y0 + dy, self.y1 + dy, self.x0 + dx, self.x1 + dx)

    def grow(self, n: int) -> "Box":
        return Box(self.y0 - n, self.y1 + n, self.x0 - n, self.x1 + n)


@dataclass(frozen=True)
class Tile:
    """One tile: its core (kept) and its window (processed), in image pixels.

    ``window`` has the padded FFT shape and may extend beyond the image;
    ``valid`` is the part of the window inside the image; ``core_in_window``
    locates the core inside the padded window array.
    """

    index: int
    row: int
    col: int
    core: Box
    window: Box
    valid: Box

    @property
    def core_in_window(self) -> Box:
        return self.core.shift(-self.window.y0, -self.window.x0)

    @property
    def valid_in_window(self) -> Box:
        return self.valid.shift(-self.window.y0, -self.window.x0)


@dataclass(frozen=True)
class TileGrid:
    """Regular tiling of an image with overlapping, equally padded windows.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(ny, nx)``.
    core : int
        Side of the square core kept from each tile (clipped to the image).
    margin : int
        Minimum overlap on each side: the support radius of the convolution
        kernels, derived from the PSFs by the caller.
    """

    shape: tuple[int, int]
    core: int
    margin: int

    def __post_init__(self) -> None:
        ny, nx = self.shape
        if ny < 1 or nx < 1:
            raise ValueError(f"image shape must be positive, got {self.shape}")
        if self.core < 16:
            raise ValueError(f"tile core must be >= 16 pixels, got {self.core}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    @property
    def core_shape(self) -> tuple[int, int]:
        """Core side per axis: the requested core, never larger than the image."""
        ny, nx = self.shape
        return (min(self.core, ny), min(self.core, nx))

    @property
    def size(self) -> tuple[int, int]:
        """Padded window shape shared by all tiles (FFT-friendly)."""
        cy, cx = self.core_shape
        return (fft_size(cy + 2 * self.margin), fft_size(cx + 2 * self.margin))

    @property
    def n_tiles(self) -> tuple[int, int]:
        ny, nx = self.shape
        cy, cx = self.core_shape
        return (-(-ny // cy), -(-nx // cx))

    def __len__(self) -> int:
        r, c = self.n_tiles
        return r * c

    def tile(self, row: int, col: int) -> Tile:
        ny, nx = self.shape
        cy, cx = self.core_shape
        wy, wx = self.size
        core = Box(row * cy, min((row + 1) * cy, ny), col * cx, min((col + 1) * cx, nx))
        # Centre the core in the padded window; the extra padding from the
        # FFT rounding is split evenly, so the margin only grows.
        y0 = core.y0 - (wy - cy) // 2
        x0 = core.x0 - (wx - cx) // 2
        window = Box(y0, y0 + wy, x0, x0 + wx)
        return Tile(row * self.n_tiles[1] + col, row, col, core, window, window.clip(ny, nx))

    def __iter__(self) -> Iterator[Tile]:
        rows, cols = self.n_tiles
        for r in range(rows):
            for c in range(cols):
                yield self.tile(r, c)
