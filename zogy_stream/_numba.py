"""Numba kernels (private).

Each kernel works on plain arrays and scalars (no globals, no Python
objects), runs in parallel over rows where that pays (small passes stay
serial: a parallel loop adds seconds of compile time at a cold start), and
releases the GIL so I/O threads can run beside it.  Validation and array
allocation live in the thin wrappers of :mod:`zogy_stream.zogy` and
:mod:`zogy_stream.pipeline`.

Mask bits (also written to the MASK output plane) are defined in
:mod:`zogy_stream.masks`.
"""
from __future__ import annotations

import os

# Passive OpenMP waiting (see zogy_stream/__init__.py, which sets it before
# pyfftw is imported); repeated for a direct import of this module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

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
def _stencil(g, first, n, cell):
    """Bilinear stencil (index, weight of index + 1) of image coordinate g
    between the centres of mesh cells first..first+n-1; constant beyond."""
    c = min(max((g + 0.5) / cell - 0.5 - first, 0.0), n - 1.0)
    i = min(int(c), n - 2) if n > 1 else 0
    return i, (c - i) if n > 1 else 0.0


@njit(**_OPTS)
def _mesh_rows(mesh, i0, j0, cell, gy0, gx0, ly, lx, rows, xi, xw):
    """Separable bilinear interpolation set-up for a (ly, lx) window at image
    position (gy0, gx0): ``rows[y, j]`` is the mesh interpolated to row y at
    cell column j; ``xi``/``xw`` the column stencil of every window column."""
    ni, nj = mesh.shape
    for y in range(ly):
        i, t = _stencil(gy0 + y, i0, ni, cell)
        i1 = min(i + 1, ni - 1)
        for j in range(nj):
            rows[y, j] = (1.0 - t) * mesh[i, j] + t * mesh[i1, j]
    for x in range(lx):
        j, u = _stencil(gx0 + x, j0, nj, cell)
        xi[x] = j
        xw[x] = u


@njit(parallel=True, **_OPTS)
def _prepare(new_w, ref_w, vn_w, vr_w, mn_w, mr_w, has_vn, has_vr, has_mn, has_mr,
             oy, ox, rows_n, xi_n, xw_n, rows_r, xi_r, xw_r, sig_n, sig_r, sat_n, sat_r,
             igain_n, igain_r, var_planes, gy0, gx0, seed, out, mask, nonpos):
    """Fill the padded input planes of one tile.

    ``new_w`` etc. hold the part of the window inside the image, located at
    ``(oy, ox)`` in the padded planes; ``(gy0, gx0)`` is the image position
    of the planes' origin.  The background is interpolated bilinearly from
    the mesh (``rows_*``, ``xi_*``, ``xw_*`` from :func:`_mesh_rows`).  Good pixels
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
                jn = xi_n[x]
                jr = xi_r[x]
                njn = min(jn + 1, rows_n.shape[1] - 1)
                njr = min(jr + 1, rows_r.shape[1] - 1)
                dn = n - (rows_n[y, jn] + xw_n[x] * (rows_n[y, njn] - rows_n[y, jn]))
                dr = r - (rows_r[y, jr] + xw_r[x] * (rows_r[y, njr] - rows_r[y, jr]))
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
@njit(inline="always", **_OPTS)
def _both_bad(m):
    return (m & BAD_NEW) != 0 and (m & BAD_REF) != 0 and (m & (SATURATED | USER)) == 0


@njit(inline="always", **_OPTS)
def _seed(mask, a, b, thr_a, thr_b, y, x):
    """Whether pixel (y, x) seeds NEAR: saturated, user-masked or bad in one image only;
    or a pixel > thr in either image next to one bad in both (a source their common
    no-data region cuts: the cut does not commute with the convolutions)."""
    m = mask[y, x]
    if m & (SATURATED | USER):
        return True
    if m & (BAD_NEW | BAD_REF):
        return not _both_bad(m)
    if m & OUTSIDE:
        return False
    ly, lx = mask.shape  # neighbours first: the image values are read next to a gap only
    if not ((y > 0 and _both_bad(mask[y - 1, x])) or (y + 1 < ly and _both_bad(mask[y + 1, x]))
            or (x > 0 and _both_bad(mask[y, x - 1])) or (x + 1 < lx and _both_bad(mask[y, x + 1]))):
        return False
    return a[y, x] > thr_a or b[y, x] > thr_b


@njit(**_OPTS)
def _grow_mask(mask, radius, tmp, out, a, b, thr_a, thr_b):
    """``out = mask | NEAR`` where a square of half-side ``radius`` touches a seed
    pixel (see :func:`_seed`; ``a``, ``b`` are the two background-subtracted
    images).  A no-data region common to both images (zero-coverage mosaic
    borders) is filled alike in both, so it seeds NEAR only where it cuts a
    source; OUTSIDE is not grown.  Rows farther than ``radius`` from every
    seed are copied: on a 1080^2 tile without seeds, 0.2 ms against 2.7 ms
    for the full dilation (both measured when this kernel ran on 2 threads).
    Serial: with two tiles at once each runs on one thread anyway, and its
    four parallel loops took 5.2 s to compile at a cold start (1.5 s now)."""
    ly, lx = mask.shape
    bad = BAD_NEW | BAD_REF | SATURATED | USER
    flagged = np.zeros(ly, np.uint8)  # the row has a pixel flagged bad (a seed, or next to one)
    for y in range(ly):
        acc = 0
        for x in range(lx):
            acc |= mask[y, x]
        flagged[y] = acc & bad
    seeded = np.zeros(ly, np.uint8)
    for y in range(ly):  # seeds of the row (kept in ``out`` until the last pass), running count
        if not (flagged[y] or (y > 0 and flagged[y - 1]) or (y + 1 < ly and flagged[y + 1])):
            continue  # no seed here: seeds are flagged or have a flagged 4-neighbour
        n = 0
        for x in range(lx):
            s = 1 if _seed(mask, a, b, thr_a, thr_b, y, x) else 0
            out[y, x] = s
            n += s
        if n == 0:
            continue  # tmp[y] is never read
        seeded[y] = 1
        cnt = 0
        for x in range(min(radius, lx)):
            cnt += out[y, x]
        for x in range(lx):
            xa = x + radius
            if xa < lx:
                cnt += out[y, xa]
            tmp[y, x] = 1 if cnt > 0 else 0
            xr = x - radius
            if xr >= 0:
                cnt -= out[y, xr]
    csum = np.zeros(ly + 1, np.int64)  # seeded rows before row y
    for y in range(ly):
        csum[y + 1] = csum[y] + seeded[y]
    near = np.zeros(ly, np.uint8)
    for y in range(ly):
        near[y] = 1 if csum[min(y + radius + 1, ly)] > csum[max(y - radius, 0)] else 0
    for y in range(ly):
        if not near[y]:
            for x in range(lx):
                out[y, x] = mask[y, x]
    if csum[ly] == 0:
        return
    block = 64
    for b in range((lx + block - 1) // block):  # vertical running counts, row-major walk
        x0 = b * block
        x1 = min(x0 + block, lx)
        cnt = np.zeros(x1 - x0, np.int32)
        for y in range(min(radius, ly)):
            if seeded[y]:
                for x in range(x0, x1):
                    cnt[x - x0] += tmp[y, x]
        for y in range(ly):
            ya = y + radius
            yr = y - radius
            if ya < ly and seeded[ya]:
                for x in range(x0, x1):
                    cnt[x - x0] += tmp[ya, x]
            if near[y]:
                for x in range(x0, x1):
                    m = mask[y, x]
                    if cnt[x - x0] > 0 and not (m & bad):
                        m |= NEAR
                    out[y, x] = m
            if yr >= 0 and seeded[yr]:
                for x in range(x0, x1):
                    cnt[x - x0] -= tmp[yr, x]


@njit(**_OPTS)
def _edge_bits(mask, gy0, gx0, ny, nx, radius):
    """Set EDGE on pixels closer than ``radius`` to the image border (serial: 0.2 ms
    a tile either way, and a parallel loop costs compile time)."""
    ly, lx = mask.shape
    for y in range(ly):
        gy = gy0 + y
        for x in range(lx):
            gx = gx0 + x
            if gy < radius or gy >= ny - radius or gx < radius or gx >= nx - radius:
                mask[y, x] |= EDGE


# ------------------------------------------------------------ Fourier domain
@njit(parallel=True, **_OPTS)
def _combine(spec, kdn, kdr, kn, kr, kn2, kr2, has_var, split):
    """Frequency-domain ZOGY on one tile, in place.

    All complex arrays are passed as float views (re, im interleaved along
    the last axis) so the loops vectorise.
    In:  spec[0] = N^, spec[1] = R^ (and spec[2] = V_n^, spec[3] = V_r^).
    Out: spec[0] = D^ (eq. 13), then S^ (eq. 12) or S_N^, S_R^ when
    ``split`` (needed for the astrometric term), then (V_n (x) k_n^2 +
    V_r (x) k_r^2)^ (eqs. 26-27) when ``has_var``.
    """
    ny, nx2 = kdn.shape
    for i in prange(ny):
        for j in range(0, nx2, 2):
            nr = spec[0, i, j]
            ni = spec[0, i, j + 1]
            rr = spec[1, i, j]
            ri = spec[1, i, j + 1]
            # D^ = kd_n N^ - kd_r R^
            spec[0, i, j] = kdn[i, j] * nr - kdn[i, j + 1] * ni - (kdr[i, j] * rr - kdr[i, j + 1] * ri)
            spec[0, i, j + 1] = kdn[i, j] * ni + kdn[i, j + 1] * nr - (kdr[i, j] * ri + kdr[i, j + 1] * rr)
            snr = kn[i, j] * nr - kn[i, j + 1] * ni
            sni = kn[i, j] * ni + kn[i, j + 1] * nr
            srr = kr[i, j] * rr - kr[i, j + 1] * ri
            sri = kr[i, j] * ri + kr[i, j + 1] * rr
            vr = 0.0
            vi = 0.0
            if has_var:
                ar = spec[2, i, j]
                ai = spec[2, i, j + 1]
                br = spec[3, i, j]
                bi = spec[3, i, j + 1]
                vr = kn2[i, j] * ar - kn2[i, j + 1] * ai + kr2[i, j] * br - kr2[i, j + 1] * bi
                vi = kn2[i, j] * ai + kn2[i, j + 1] * ar + kr2[i, j] * bi + kr2[i, j + 1] * br
            if split:
                spec[1, i, j] = snr
                spec[1, i, j + 1] = sni
                spec[2, i, j] = srr
                spec[2, i, j + 1] = sri
                if has_var:
                    spec[3, i, j] = vr
                    spec[3, i, j + 1] = vi
            else:
                spec[1, i, j] = snr - srr
                spec[1, i, j + 1] = sni - sri
                if has_var:
                    spec[2, i, j] = vr
                    spec[2, i, j + 1] = vi


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
def _finish(planes, y0, y1, x0, x1, split, has_var, var_const, sx2, sy2, e2, inv_fs,
            d_out, s_out, sc_out, f_out, fe_out):
    """Assemble D, S, S_corr, FLUX and FLUX_ERR on rows y0:y1, cols x0:x1.

    ``planes`` holds D, then S (or S_N, S_R), then V(S_N)+V(S_R) when
    ``has_var`` (else the constant ``var_const``).  Gradients for the
    astrometric variance (eqs. 30-33) are central differences, with periodic
    neighbours at the plane border (the caller keeps that out of the core).
    With ``split``, the model-error term ``e2 * min(S_N, S_R)**2`` (static
    sources only: both scores positive) joins the variance of S_corr.

    The arithmetic is float32, the precision of the planes and the products
    (a sum of a few positive variance terms, a square root and a division: S_corr
    within 2e-7 of a float64 assembly).  With float64 square roots and divisions,
    and an integer modulo for each pixel's neighbours, this pass took 10.2 ms on
    a 1032^2 region of a 1080^2 tile (one thread), against 7.1 ms now.
    """
    ly = planes.shape[1]
    lx = planes.shape[2]
    ast = split and (sx2 > 0.0 or sy2 > 0.0)
    mod = split and e2 > 0.0
    vi = 3 if split else 2
    f0 = np.float32(0.0)
    half = np.float32(0.5)
    vc = np.float32(var_const)
    fx2, fy2, fe2, fs = np.float32(sx2), np.float32(sy2), np.float32(e2), np.float32(inv_fs)
    for i in prange(y1 - y0):
        y = y0 + i
        yp = y + 1 if y + 1 < ly else 0
        ym = y - 1 if y > 0 else ly - 1
        for j in range(x1 - x0):
            x = x0 + j
            # periodic neighbours without an integer division per pixel
            xp = x + 1 if x + 1 < lx else x + 1 - lx
            xm = x - 1 if x > 0 else x - 1 + lx
            if split:
                s = planes[1, y, x] - planes[2, y, x]
            else:
                s = planes[1, y, x]
            v = planes[vi, y, x] if has_var else vc
            vtot = v
            if ast:
                gxn = half * (planes[1, y, xp] - planes[1, y, xm])
                gyn = half * (planes[1, yp, x] - planes[1, ym, x])
                gxr = half * (planes[2, y, xp] - planes[2, y, xm])
                gyr = half * (planes[2, yp, x] - planes[2, ym, x])
                vtot += fx2 * (gxn * gxn + gxr * gxr) + fy2 * (gyn * gyn + gyr * gyr)
            if mod:
                m = min(planes[1, y, x], planes[2, y, x])
                if m > f0:
                    vtot += fe2 * m * m
            d_out[i, j] = planes[0, y, x]
            s_out[i, j] = s
            if vtot > f0:
                sc_out[i, j] = s / np.sqrt(vtot)
            else:
                sc_out[i, j] = f0
            f_out[i, j] = s * fs
            fe_out[i, j] = np.sqrt(max(v, f0)) * fs


# ------------------------------------------------------------- blank sky
@njit(**_OPTS)
def _blank_samples(a, b, thr_a, thr_b, grown, y0, y1, x0, x1, sy0, sx0, step, radius, out):
    """Blank-sky sample points of a tile: ``out[i, j] = 1`` where blank, else 0.

    A sample point ``(sy0 + step*i, sx0 + step*j)`` of the padded tile is blank
    when it is unmasked (``grown == 0``) and no pixel of the region
    ``[y0:y1, x0:x1]`` within a square of half-side ``radius`` around it
    exceeds ``thr_a`` in ``a`` or ``thr_b`` in ``b`` (a source in either
    image).  Separable: a running count along each row at the sampled
    columns, then along the sampled columns.  Serial: measured on a 1080^2
    tile as fast as the parallel version on 2 threads (2.4 vs 2.2 ms) and
    3 s less to compile at a cold start.
    """
    ni, nj = out.shape
    ny = y1 - y0
    near = np.zeros((ny, nj), np.uint8)
    for y in range(ny):
        cnt = np.zeros(x1 - x0 + 1, np.int32)  # prefix count of source pixels in the row
        c = 0
        for x in range(x0, x1):
            if a[y0 + y, x] > thr_a or b[y0 + y, x] > thr_b:
                c += 1
            cnt[x - x0 + 1] = c
        for j in range(nj):
            xs = sx0 + step * j
            lo = max(xs - radius, x0) - x0
            hi = min(xs + radius + 1, x1) - x0
            near[y, j] = 1 if cnt[hi] > cnt[lo] else 0
    for j in range(nj):
        cum = np.zeros(ny + 1, np.int32)
        c = 0
        for y in range(ny):
            c += near[y, j]
            cum[y + 1] = c
        xs = sx0 + step * j
        for i in range(ni):
            ys = sy0 + step * i
            lo = max(ys - radius, y0) - y0
            hi = min(ys + radius + 1, y1) - y0
            out[i, j] = 1 if cum[hi] == cum[lo] and grown[ys, xs] == 0 else 0


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
        hits = 0  # a branch-free (vectorised) look first: most rows have no candidate
        for x in range(b, nx - b):
            hits += abs(sc[y, x]) >= threshold
        if hits == 0:
            continue
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


@njit(**_OPTS)
def _above(img, level, y0, y1, x0, x1):
    """(rows, cols) of the pixels of ``img[y0:y1, x0:x1]`` above ``level``, in
    raster order: ``np.nonzero(img[y0:y1, x0:x1] > level)`` plus the offsets,
    without the boolean image.  A branch-free (vectorised) count per row
    first, then only the rows with hits are looked at again."""
    per_row = np.zeros(y1 - y0, np.int64)
    for y in range(y0, y1):
        c = 0
        for x in range(x0, x1):
            c += img[y, x] > level
        per_row[y - y0] = c
    n = per_row.sum()
    ys = np.empty(n, np.int64)
    xs = np.empty(n, np.int64)
    n = 0
    for y in range(y0, y1):
        if per_row[y - y0] == 0:
            continue
        for x in range(x0, x1):
            if img[y, x] > level:
                ys[n] = y
                xs[n] = x
                n += 1
    return ys, xs


# ------------------------------------------------------------- disk dilation
@njit(**_OPTS)
def _dilate_disk(mask, radius, out):
    """``out`` = ``mask`` dilated by the disk ``dx^2 + dy^2 <= radius^2``.

    Equal to scipy's ``binary_dilation`` with that structure (nothing beyond
    the border).  Per row of offsets a span of half-width ``w(dy)``: a prefix
    count of each row answers "any set pixel in the span" with one
    comparison, in a branch-free pass per offset; rows without a set pixel
    are skipped.
    """
    ny, nx = mask.shape
    big = int(np.ceil(radius))
    hw = np.full(2 * big + 1, -1, np.int64)  # half-width of the span at offset dy (-1: none)
    r2 = radius * radius
    for k in range(2 * big + 1):
        dy = k - big
        w = -1
        for dx in range(big + 1):
            if dx * dx + dy * dy <= r2:
                w = dx
        hw[k] = w
    cnt = np.zeros((ny, nx + 1), np.int32)
    has = np.zeros(ny, np.bool_)
    for y in range(ny):
        c = 0
        for x in range(nx):
            c += mask[y, x] != 0
            cnt[y, x + 1] = c
        has[y] = c > 0
    for y in range(ny):
        o = out[y]
        for x in range(nx):
            o[x] = False
        for k in range(2 * big + 1):
            yy = y + k - big
            w = hw[k]
            if w < 0 or yy < 0 or yy >= ny or not has[yy]:
                continue
            row = cnt[yy]
            for x in range(min(w, nx)):  # spans cut by the left border
                o[x] |= row[min(x + w + 1, nx)] > 0
            for x in range(w, nx - w - 1):  # whole spans: a branch-free, vectorised pass
                o[x] |= row[x + w + 1] > row[x - w]
            for x in range(max(nx - w - 1, w), nx):  # cut by the right border
                o[x] |= row[nx] > row[max(x - w, 0)]


# ------------------------------------------------------ cosmic-ray seeds
# Serial: it runs in the reader thread (or, with several tiles in flight, in one
# tile's context) beside the tiles' parallel kernels, which
# Numba's workqueue layer (no TBB, no OpenMP) cannot take from two threads at once
# (it aborts the process); 14 ms on a 1080^2 window against 7 ms on 2 idle threads.
@njit(**_OPTS)
def _lacosmic_seeds(e, rn2, thresh, rowmin, out):
    """Pixels where L.A.Cosmic's first test (S' > sigclip) can pass.

    ``e`` is the image in electrons.  L.A.Cosmic's Laplacian of the 2x
    subsampled image, clipped at 0 and rebinned, is at each pixel the mean
    over its four sub-pixels of ``max(2 p - l - u, 0)`` (``l``, ``u`` the
    pixel's neighbours on that sub-pixel's sides; 0 outside the image, as
    astroscrappy has it).  Its S' divides that by twice the noise from a
    median of ``e + rn2`` in a 7 x 7 box and subtracts a (non-negative)
    median of itself; using the box *minimum* instead of the median can only
    raise the value, so every pixel L.A.Cosmic's first pass flags is set in
    ``out``.  ``rowmin`` is scratch of ``e``'s shape.
    """
    ny, nx = e.shape
    for y in range(ny):
        for x in range(nx):
            m = e[y, x]
            for k in range(max(0, x - 3), min(nx, x + 4)):
                m = min(m, e[y, k])
            rowmin[y, x] = m + rn2
    for y in range(ny):
        for x in range(nx):
            v = rowmin[y, x]
            for k in range(max(0, y - 3), min(ny, y + 4)):
                v = min(v, rowmin[k, x])
            noise = np.sqrt(max(v, 1e-5))
            p2 = 2.0 * e[y, x]
            le = e[y, x - 1] if x > 0 else 0.0
            ri = e[y, x + 1] if x < nx - 1 else 0.0
            up = e[y - 1, x] if y > 0 else 0.0
            do = e[y + 1, x] if y < ny - 1 else 0.0
            lap = (max(p2 - le - up, 0.0) + max(p2 - ri - up, 0.0)
                   + max(p2 - le - do, 0.0) + max(p2 - ri - do, 0.0))
            out[y, x] = lap / 8.0 > thresh * noise


# ------------------------------------------------------------- threading layer
def threadsafe_layer() -> bool:
    """Whether Numba's threading layer runs parallel kernels called from several
    threads at once (``tbb`` and ``omp`` do; ``workqueue`` aborts the process).
    Numba chooses the layer when the first parallel kernel runs; False before."""
    import numba

    try:
        return numba.threading_layer() in ("tbb", "omp")
    except ValueError:
        return False


def launch_threads() -> bool:
    """Have Numba choose its threading layer and start its threads now, not at the
    first parallel kernel; False where this Numba cannot be asked to (the private
    ``numba.np.ufunc.parallel._launch_threads``, stable since Numba 0.4x, is gone)."""
    try:
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()
        import numba

        numba.threading_layer()  # raises ValueError if still not chosen
    except (ImportError, AttributeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------- reading
# pread(2) called from compiled code: one call per row of a tile window without the
# interpreter's ~1.5 us a call (a 1216-row window of an 8192-wide plane: 1.6 ms
# against 3.0 ms with os.preadv from Python).  The symbol is resolved at link time,
# so the kernel is cached like the others.
_pread = types.ExternalFunction("pread", types.intp(types.intc, types.voidptr, types.uintp,
                                                    types.int64))


@intrinsic
def _byte_address(typingctx, arr, offset):
    """``void *`` to byte ``offset`` of a C-contiguous uint8 array."""
    sig = types.voidptr(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        return builder.bitcast(ptr, ir.IntType(8).as_pointer())

    return sig, codegen


@intrinsic
def _bswap(typingctx, x):
    """``x`` (an unsigned integer) with its bytes in reverse order (``llvm.bswap``)."""
    if not isinstance(x, types.Integer) or x.bitwidth not in (8, 16, 32, 64):
        return None
    sig = x(x)

    def codegen(context, builder, signature, args):
        if signature.args[0].bitwidth == 8:
            return args[0]
        return builder.bswap(args[0])

    return sig, codegen


@njit(**_OPTS)
def _pread_convert(fd, word, vals, out, first, stride, step, swap, bscale, bzero, has_blank,
                   blank):
    """Read file rows into ``out`` (float32), one pread(2) per row, converting
    each row while it is in the cache instead of in a second pass over the window.

    ``word`` (unsigned, one file row of the window) and ``vals`` (the same bytes
    as the file's numeric type) are views of one scratch buffer.  Row ``i`` is
    read from ``first + i * stride``; every ``step``-th value goes to ``out[i]``,
    byte-swapped when ``swap``, the integer ``blank`` (if ``has_blank``) as NaN,
    else cast to float32, times float32 ``bscale`` unless 1, plus float32
    ``bzero`` unless 0: the operations, in float32, of the reader's NumPy path.
    Returns the rows done: fewer at end of file or on any error (errno is not
    looked at; the caller reads the rest with ``os.preadv``, which retries EINTR
    and raises the others).
    """
    raw = word.view(np.uint8)
    nbytes = raw.size
    f_scale = np.float32(bscale)
    f_zero = np.float32(bzero)
    scale = bscale != 1.0
    zero = bzero != 0.0
    for i in range(out.shape[0]):
        done = 0
        while done < nbytes:
            n = _pread(fd, _byte_address(raw, done), nbytes - done, first + i * stride + done)
            if n <= 0:
                return i
            done += n
        if swap:  # the whole row: a vectorised pass over a few kB in the L1 cache
            for k in range(word.size):
                word[k] = _bswap(word[k])
        row = out[i]
        if not (has_blank or scale or zero):  # the common case: a plain loop vectorises
            if step == 1:
                for j in range(row.size):
                    row[j] = np.float32(vals[j])
            else:
                for j in range(row.size):
                    row[j] = np.float32(vals[j * step])
            continue
        if not has_blank:  # scaled (BSCALE, BZERO): as above, unswitched by hand
            if scale and zero:
                for j in range(row.size):
                    row[j] = np.float32(vals[j * step]) * f_scale + f_zero
            elif scale:
                for j in range(row.size):
                    row[j] = np.float32(vals[j * step]) * f_scale
            else:
                for j in range(row.size):
                    row[j] = np.float32(vals[j * step]) + f_zero
            continue
        for j in range(row.size):
            x = vals[j * step]
            if x == blank:
                row[j] = np.nan
                continue
            v = np.float32(x)
            if scale:
                v = v * f_scale
            if zero:
                v = v + f_zero
            row[j] = v
    return out.shape[0]


# ------------------------------------------------------------------ deblending
@njit(**_OPTS)
def _keys(d):
    """Keys' cubic convolution weight (a = -0.5) at distance ``d``."""
    d = abs(d)
    if d <= 1.0:
        return (1.5 * d - 2.5) * d * d + 1.0
    if d < 2.0:
        return ((-0.5 * d + 2.5) * d - 4.0) * d + 2.0
    return 0.0


@njit(**_OPTS)
def _bicubic(a, y, x):
    """``a`` at the fractional position (y, x) by Keys' cubic convolution; the
    4x4 neighbourhood must lie inside ``a``."""
    iy = int(np.floor(y))
    ix = int(np.floor(x))
    ty = y - iy
    tx = x - ix
    wx0 = _keys(tx + 1.0)
    wx1 = _keys(tx)
    wx2 = _keys(tx - 1.0)
    wx3 = _keys(tx - 2.0)
    v = 0.0
    for k in range(4):
        row = a[iy - 1 + k]
        v += _keys(ty - (k - 1)) * (wx0 * row[ix - 1] + wx1 * row[ix] + wx2 * row[ix + 1]
                                    + wx3 * row[ix + 2])
    return v


@njit(**_OPTS)
def _pair_q(a0, g, b0, b1):
    """``b^T G^-1 b`` for ``G = [[a0, g], [g, a0]]``, or -1 when G is singular or
    an amplitude (``G^-1 b``) is not positive."""
    det = a0 * a0 - g * g
    if det <= 0.0 or a0 * b0 - g * b1 <= 0.0 or a0 * b1 - g * b0 <= 0.0:
        return -1.0
    return (a0 * (b0 * b0 + b1 * b1) - 2.0 * g * b0 * b1) / det


@njit(**_OPTS)
def _pair_gain(s, acorr, c, p, sign, min_sep2):
    """chi^2 removed by two point sources at ``p = (y0, x0, y1, x1)`` (see
    :func:`_blend_fit`), or -1 when they are too close or an amplitude has the
    wrong sign."""
    dy = p[2] - p[0]
    dx = p[3] - p[1]
    if dy * dy + dx * dx < min_sep2:
        return -1.0
    return _pair_q(acorr[c, c], _bicubic(acorr, c + dy, c + dx),
                   sign * _bicubic(s, p[0], p[1]), sign * _bicubic(s, p[2], p[3]))


@njit(**_OPTS)
def _source_gain(s, acorr, c, p, sign, min_sep2):
    """chi^2 removed by one point source at ``p = (y, x)`` (``p`` of size 2) or two
    (:func:`_pair_gain`); -1 where the amplitude has the wrong sign."""
    if p.size == 4:
        return _pair_gain(s, acorr, c, p, sign, min_sep2)
    v = sign * _bicubic(s, p[0], p[1])
    return v * v / acorr[c, c] if v > 0.0 else -1.0


@njit(**_OPTS)
def _refine_gain(s, acorr, c, p, best, i, j, r, sign, min_sep2):
    """Coordinate search of the positions ``p`` (y, x pairs, kept within ``r`` of
    (i, j)) for the largest :func:`_source_gain`, in steps halved from 1/2 to 1/32
    pixel; ``p`` is updated in place and the gain returned (``best`` at the start)."""
    step = 0.5
    while step > 1.0 / 64.0:
        moved = True
        while moved:
            moved = False
            for ax in range(p.size):
                for d in (-step, step):
                    p[ax] += d
                    if abs(p[ax] - (i if ax % 2 == 0 else j)) <= r:
                        q = _source_gain(s, acorr, c, p, sign, min_sep2)
                        if q > best:
                            best = q
                            moved = True
                            continue
                    p[ax] -= d
        step *= 0.5
    return best


@njit(**_OPTS)
def _blend_fit(s, i, j, r, sign, acorr, min_sep2):
    """One and two point sources fitted to the window of ``s`` within ``r`` of (i, j).

    ``s`` is the correlation of D with P_D (S / F_D, eq. 17), ``acorr`` P_D's
    autocorrelation, centred, of half size >= 2 r + 2; ``s`` must extend
    ``r + 2`` pixels beyond the window.  With white unit-variance noise in D,
    sources at positions p, q with amplitudes ``G^-1 b``, ``b = (s(p), s(q))``,
    ``G = [[A0, A(p-q)], [A(p-q), A0]]``, remove ``b^T G^-1 b`` from chi^2 (one
    source: ``s(p)^2 / A0``).  The best pixel pair (at least
    ``sqrt(min_sep2)`` apart, both amplitudes of ``sign``) is refined to
    1/32 pixel by coordinate search on ``s`` and ``A`` interpolated
    bicubically; the single source likewise.

    Returns (gain1, gain2, y0, x0, y1, x1, amp0, amp1, resid): the chi^2
    removals (gain2 -1 when no pair qualifies), the pair's positions (in
    ``s``'s pixels) and amplitudes (times ``sign``: positive), and the largest |s - model of s| over the
    window in units of its noise ``sqrt(A0)`` (a pair that describes the data
    leaves noise).
    """
    c = acorr.shape[0] // 2
    a0 = acorr[c, c]
    n = 2 * r + 1
    p = np.empty(4)
    best = -1.0
    by0, bx0, by1, bx1 = i, j, i, j
    for k in range(n * n):
        y0 = i - r + k // n
        x0 = j - r + k % n
        if sign * s[y0, x0] <= 0.0:
            continue
        for m in range(k + 1, n * n):
            y1 = i - r + m // n
            x1 = j - r + m % n
            if sign * s[y1, x1] <= 0.0:
                continue
            dy = y1 - y0
            dx = x1 - x0
            if dy * dy + dx * dx < min_sep2:
                continue
            q = _pair_q(a0, acorr[c + dy, c + dx], sign * s[y0, x0], sign * s[y1, x1])
            if q > best:
                best = q
                by0, bx0, by1, bx1 = y0, x0, y1, x1
    # the single source: the peak of s, refined
    one = np.empty(2)
    one[0] = i
    one[1] = j
    g1 = _refine_gain(s, acorr, c, one, (sign * s[i, j]) ** 2 / a0, i, j, r, sign, min_sep2)
    if best < 0.0:
        return g1, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    p[0] = by0
    p[1] = bx0
    p[2] = by1
    p[3] = bx1
    best = _refine_gain(s, acorr, c, p, best, i, j, r, sign, min_sep2)
    g = _bicubic(acorr, c + p[2] - p[0], c + p[3] - p[1])
    det = a0 * a0 - g * g
    b0 = sign * _bicubic(s, p[0], p[1])
    b1 = sign * _bicubic(s, p[2], p[3])
    amp0 = (a0 * b0 - g * b1) / det
    amp1 = (a0 * b1 - g * b0) / det
    resid = 0.0
    for k in range(n * n):
        y = i - r + k // n
        x = j - r + k % n
        mdl = (amp0 * _bicubic(acorr, c + y - p[0], c + x - p[1])
               + amp1 * _bicubic(acorr, c + y - p[2], c + x - p[3]))
        resid = max(resid, abs(sign * s[y, x] - mdl))
    return g1, best, p[0], p[1], p[2], p[3], amp0, amp1, resid / np.sqrt(a0)
