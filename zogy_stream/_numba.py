"""Numba kernels (private).

Each kernel works on plain arrays and scalars (no globals, no Python
objects), runs in parallel over rows, and releases the GIL so I/O threads can
run beside it.  Validation and array allocation live in the thin wrappers of
:mod:`zogy_stream.zogy` and :mod:`zogy_stream.pipeline`.

Mask bits (also written to the MASK output plane) are defined in
:mod:`zogy_stream.masks`.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True)

from .masks import MaskBit

# Plain ints: numba freezes them as compile-time constants.
BAD_NEW = int(MaskBit.BAD_NEW)
BAD_REF = int(MaskBit.BAD_REF)
SATURATED = int(MaskBit.SATURATED)
USER = int(MaskBit.USER)
NEAR = int(MaskBit.NEAR)
EDGE = int(MaskBit.EDGE)
OUTSIDE = int(MaskBit.OUTSIDE)


# ------------------------------------------------------------------ noise fill
@njit(inline="always", **_OPTS)
def _mix(z):
    # splitmix64 finaliser on uint64 (all operands uint64 so arithmetic wraps)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(inline="always", **_OPTS)
def _gauss_at(gy, gx, seed):
    """Standard normal deviate that depends only on (gy, gx, seed).

    Fill noise is a function of absolute pixel position, so every tiling of
    the mosaic fills the same pixel with the same value.
    """
    key = np.uint64((gy + 2147483648) & 0xFFFFFFFF) * np.uint64(4294967296) + np.uint64(
        (gx + 2147483648) & 0xFFFFFFFF)
    h1 = _mix(key ^ _mix(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15)))
    h2 = _mix(h1 + np.uint64(0x9E3779B97F4A7C15))
    u1 = (np.float64(h1 >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)
    u2 = np.float64(h2 >> np.uint64(11)) * (1.0 / 9007199254740992.0)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@njit(inline="always", **_OPTS)
def _bilinear(mesh, i0, j0, cell, gy, gx):
    """Mesh value at image pixel (gy, gx): bilinear between cell centres,
    constant beyond the outermost centres."""
    ni, nj = mesh.shape
    cy = min(max((gy + 0.5) / cell - 0.5 - i0, 0.0), ni - 1.0)
    cx = min(max((gx + 0.5) / cell - 0.5 - j0, 0.0), nj - 1.0)
    i = min(int(cy), ni - 1)
    j = min(int(cx), nj - 1)
    t = cy - i
    u = cx - j
    i1 = min(i + 1, ni - 1)
    j1 = min(j + 1, nj - 1)
    return ((1 - t) * ((1 - u) * mesh[i, j] + u * mesh[i, j1])
            + t * ((1 - u) * mesh[i1, j] + u * mesh[i1, j1]))


@njit(parallel=True, **_OPTS)
def _prepare(new_w, ref_w, vn_w, vr_w, mn_w, mr_w, has_vn, has_vr, has_mn, has_mr,
             oy, ox, mesh_n, i0n, j0n, mesh_r, i0r, j0r, cell, sig_n, sig_r, sat_n, sat_r,
             igain_n, igain_r, var_planes, gy0, gx0, seed, out, mask, nonpos):
    """Fill the padded input planes of one tile.

    ``new_w`` etc. hold the part of the window inside the image, located at
    ``(oy, ox)`` in the padded planes; ``(gy0, gx0)`` is the image position
    of the planes' origin.  The background is interpolated from the mesh
    cells ``mesh_n`` (first cell ``(i0n, j0n)``, side ``cell``).  Good pixels
    get image - background (and their variance); pixels that are bad in either image, saturated,
    user-masked or outside the image get background-level noise (variance
    sigma^2) in both images, so nothing rings.  ``nonpos[y]`` counts good
    pixels of row y with a variance <= 0.
    """
    ly, lx = mask.shape
    vny, vnx = new_w.shape
    for y in prange(ly):
        nonpos[y] = 0
        wy = y - oy
        for x in range(lx):
            wx = x - ox
            m = 0
            n = 0.0
            r = 0.0
            vn = 0.0
            vr = 0.0
            if wy < 0 or wy >= vny or wx < 0 or wx >= vnx:
                m = OUTSIDE
            else:
                n = new_w[wy, wx]
                r = ref_w[wy, wx]
                if not np.isfinite(n):
                    m |= BAD_NEW
                elif n >= sat_n:
                    m |= SATURATED
                if not np.isfinite(r):
                    m |= BAD_REF
                elif r >= sat_r:
                    m |= SATURATED
                if has_mn and mn_w[wy, wx] != 0:
                    m |= USER
                if has_mr and mr_w[wy, wx] != 0:
                    m |= USER
                if has_vn:
                    vn = vn_w[wy, wx]
                    if not np.isfinite(vn):
                        m |= BAD_NEW
                if has_vr:
                    vr = vr_w[wy, wx]
                    if not np.isfinite(vr):
                        m |= BAD_REF
            mask[y, x] = m
            if m == 0:
                dn = n - _bilinear(mesh_n, i0n, j0n, cell, gy0 + y, gx0 + x)
                dr = r - _bilinear(mesh_r, i0r, j0r, cell, gy0 + y, gx0 + x)
                out[0, y, x] = dn
                out[1, y, x] = dr
                if var_planes:
                    if not has_vn:
                        vn = sig_n * sig_n + max(dn, 0.0) * igain_n
                    if not has_vr:
                        vr = sig_r * sig_r + max(dr, 0.0) * igain_r
                    if vn <= 0.0 or vr <= 0.0:
                        nonpos[y] += 1
                    out[2, y, x] = vn
                    out[3, y, x] = vr
            else:
                gy = gy0 + y
                gx = gx0 + x
                out[0, y, x] = sig_n * _gauss_at(gy, gx, seed)
                out[1, y, x] = sig_r * _gauss_at(gy, gx, seed + 1)
                if var_planes:
                    out[2, y, x] = sig_n * sig_n
                    out[3, y, x] = sig_r * sig_r


# ---------------------------------------------------------------------- masks
@njit(parallel=True, **_OPTS)
def _grow_mask(mask, radius, tmp, out):
    """``out = mask | NEAR`` where a square of half-side ``radius`` touches an
    excluded (bad, saturated, user-masked) pixel; OUTSIDE is not grown."""
    ly, lx = mask.shape
    bad = BAD_NEW | BAD_REF | SATURATED | USER
    for y in prange(ly):  # horizontal running count
        cnt = 0
        for x in range(min(radius, lx)):
            if mask[y, x] & bad:
                cnt += 1
        for x in range(lx):
            xa = x + radius
            if xa < lx and (mask[y, xa] & bad):
                cnt += 1
            tmp[y, x] = 1 if cnt > 0 else 0
            xr = x - radius
            if xr >= 0 and (mask[y, xr] & bad):
                cnt -= 1
    for x in prange(lx):  # vertical running count
        cnt = 0
        for y in range(min(radius, ly)):
            cnt += tmp[y, x]
        for y in range(ly):
            ya = y + radius
            if ya < ly:
                cnt += tmp[ya, x]
            m = mask[y, x]
            if cnt > 0 and not (m & bad):
                m |= NEAR
            out[y, x] = m
            yr = y - radius
            if yr >= 0:
                cnt -= tmp[yr, x]


@njit(parallel=True, **_OPTS)
def _edge_bits(mask, gy0, gx0, ny, nx, radius):
    """Set EDGE on pixels closer than ``radius`` to the image border."""
    ly, lx = mask.shape
    for y in prange(ly):
        gy = gy0 + y
        for x in range(lx):
            gx = gx0 + x
            if gy < radius or gy >= ny - radius or gx < radius or gx >= nx - radius:
                mask[y, x] |= EDGE


# ------------------------------------------------------------ Fourier domain
@njit(parallel=True, **_OPTS)
def _combine(spec, kdn, kdr, kn, kr, kn2, kr2, has_var, split):
    """Frequency-domain ZOGY on one tile, in place.

    In:  spec[0] = N^, spec[1] = R^ (and spec[2] = V_n^, spec[3] = V_r^).
    Out: spec[0] = D^ (eq. 13), then S^ (eq. 12) or S_N^, S_R^ when
    ``split`` (needed for the astrometric term), then (V_n (x) k_n^2 +
    V_r (x) k_r^2)^ (eqs. 26-27) when ``has_var``.
    """
    ny, nx = kdn.shape
    for i in prange(ny):
        for j in range(nx):
            nh = spec[0, i, j]
            rh = spec[1, i, j]
            vs = spec[0, i, j]
            if has_var:
                vs = kn2[i, j] * spec[2, i, j] + kr2[i, j] * spec[3, i, j]
            spec[0, i, j] = kdn[i, j] * nh - kdr[i, j] * rh
            sn = kn[i, j] * nh
            sr = kr[i, j] * rh
            k = 2
            if split:
                spec[1, i, j] = sn
                spec[2, i, j] = sr
                k = 3
            else:
                spec[1, i, j] = sn - sr
            if has_var:
                spec[k, i, j] = vs


# ---------------------------------------------------------------- image space
@njit(parallel=True, **_OPTS)
def _convolve_pair(a, ka, b, kb, sign, y0, y1, x0, x1, out):
    """``out = ka (x) a + sign * kb (x) b`` on rows y0:y1, cols x0:x1.

    Kernels are odd-sized with their centre at ``(k // 2, k // 2)``; the
    caller guarantees the footprint stays inside the padded planes.
    """
    ky, kx = ka.shape
    ry = ky // 2
    rx = kx // 2
    for y in prange(y0, y1):
        for x in range(x0, x1):
            acc = 0.0
            for u in range(ky):
                yy = y + ry - u
                for v in range(kx):
                    xx = x + rx - v
                    acc += ka[u, v] * a[yy, xx] + sign * kb[u, v] * b[yy, xx]
            out[y, x] = acc


# ------------------------------------------------------------------ assembly
@njit(parallel=True, **_OPTS)
def _finish(planes, y0, y1, x0, x1, split, has_var, var_const, sx2, sy2, inv_fs,
            d_out, s_out, sc_out, f_out, fe_out):
    """Assemble D, S, S_corr, FLUX and FLUX_ERR on rows y0:y1, cols x0:x1.

    ``planes`` holds D, then S (or S_N, S_R), then V(S_N)+V(S_R) when
    ``has_var`` (else the constant ``var_const``).  Gradients for the
    astrometric variance (eqs. 30-33) are central differences, with periodic
    neighbours at the plane border (the caller keeps that out of the core).
    """
    ly = planes.shape[1]
    lx = planes.shape[2]
    ast = split and (sx2 > 0.0 or sy2 > 0.0)
    vi = 3 if split else 2
    for i in prange(y1 - y0):
        y = y0 + i
        yp = (y + 1) % ly
        ym = (y - 1) % ly
        for j in range(x1 - x0):
            x = x0 + j
            xp = (x + 1) % lx
            xm = (x - 1) % lx
            if split:
                s = planes[1, y, x] - planes[2, y, x]
            else:
                s = planes[1, y, x]
            v = planes[vi, y, x] if has_var else var_const
            vtot = v
            if ast:
                gxn = 0.5 * (planes[1, y, xp] - planes[1, y, xm])
                gyn = 0.5 * (planes[1, yp, x] - planes[1, ym, x])
                gxr = 0.5 * (planes[2, y, xp] - planes[2, y, xm])
                gyr = 0.5 * (planes[2, yp, x] - planes[2, ym, x])
                vtot += sx2 * (gxn * gxn + gxr * gxr) + sy2 * (gyn * gyn + gyr * gyr)
            d_out[i, j] = planes[0, y, x]
            s_out[i, j] = s
            if vtot > 0.0:
                sc_out[i, j] = s / np.sqrt(vtot)
            else:
                sc_out[i, j] = 0.0
            f_out[i, j] = s * inv_fs
            fe_out[i, j] = np.sqrt(max(v, 0.0)) * inv_fs


# --------------------------------------------------------------------- peaks
@njit(**_OPTS)
def _peaks(sc, mask, b, threshold, radius, exclude):
    """Local extrema of S_corr with |S_corr| >= threshold in the core.

    ``sc`` and ``mask`` cover the core grown by ``b >= radius`` pixels.  A
    positive peak is >= every neighbour within ``radius`` and > those earlier
    in raster order (so plateaus give one peak); negative peaks likewise.
    Returns (row, col) indices into ``sc``.
    """
    ny, nx = sc.shape
    ys = []
    xs = []
    for y in range(b, ny - b):
        for x in range(b, nx - b):
            v = sc[y, x]
            if not (v >= threshold or v <= -threshold):
                continue
            if mask[y, x] & exclude:
                continue
            sgn = 1.0 if v > 0 else -1.0
            av = sgn * v
            ok = True
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    if dy == 0 and dx == 0:
                        continue
                    w = sgn * sc[y + dy, x + dx]
                    if w > av or (w == av and (dy < 0 or (dy == 0 and dx < 0))):
                        ok = False
                        break
                if not ok:
                    break
            if ok:
                ys.append(y)
                xs.append(x)
    return np.array(ys, dtype=np.int64), np.array(xs, dtype=np.int64)
