#!/usr/bin/env python
"""Benchmark suite of zogy_stream: throughput, peak memory, FFT-only bound, baselines.

Usage (from the repository root)::

    python benchmarks/bench.py --sizes 2048 4096 8192 16384 --out bench_out
    python benchmarks/bench.py --quick            # 2048 only, smoke check (< 1 min)

For every size N it

1. simulates an N x N scene once into ``<out>/scene_<N>`` (reused when present);
2. runs ``zogy-stream subtract`` in a child process with all inputs given (PSFs and
   variance maps), ``--threads``, ``--timings`` and an FFTW wisdom file in ``<out>``:
   a first (warm-up) run, then the measured run with the wisdom warm.  Wall time is from
   process start to exit, peak RSS is the child's ``ru_maxrss`` from ``os.wait4``;
3. times, in this process, the FFT-only bound: a ``RealFFT2`` of the run's padded tile
   shape (``FFTSHAPE`` of the output header), 4 forward + 4 inverse real transforms with
   the same threads and the same wisdom, times the number of tiles;
4. runs the plain whole-image NumPy ZOGY of ``baseline_numpy.py`` in a child process
   (sizes up to ``--baseline-max-size``), and reports whether ``properimage`` imports.

``--cold-start`` adds one run of the first size with an empty Numba cache and no wisdom.

Results go to stdout, ``<out>/results.md`` and ``<out>/results.json``.  See
``benchmarks/README.md`` for what every column means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SCENE_FILES = ("new", "ref", "new_var", "ref_var", "new_psf", "ref_psf", "truth")
SCENE_DONE = ".complete"
SUMMARY_RE = re.compile(r"^(?P<out>.+): (?P<nx>\d+)x(?P<ny>\d+), (?P<tiles>\d+) tiles, "
                        r"(?P<cands>\d+) candidates.*, (?P<secs>[0-9.]+) s \(")
STAGE_RE = re.compile(r"^\s+(?P<stage>\S.*?)\s+(?P<secs>[0-9.]+) s\s*$")  # names may hold spaces
BUSY_LOAD = 0.25  # other processes' average cores above which a measurement is flagged


# ------------------------------------------------------------------------- machine load
def busy_cpu_seconds() -> float | None:
    """CPU seconds spent by the whole machine so far (all cores, not idle), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float = 0.1, window: float = 0.5, timeout: float = 20.0) -> float | None:
    """Wait until the machine keeps fewer than ``limit`` cores busy over ``window`` s
    (the kernel's clean-up after a previous step: write-back, discards of deleted
    files, compaction after a large process), at most ``timeout`` s; the last load."""
    t_end = time.perf_counter() + timeout
    load = None
    while True:
        b0, t0 = busy_cpu_seconds(), time.perf_counter()
        time.sleep(window)
        b1 = busy_cpu_seconds()
        if b0 is None or b1 is None:
            return None
        load = (b1 - b0) / (time.perf_counter() - t0)
        if load < limit or time.perf_counter() > t_end:
            return load


def other_load(busy0: float | None, busy1: float | None, own_cpu_s: float,
               wall_s: float) -> float | None:
    """Average number of cores kept busy by *other* processes during a measurement."""
    if busy0 is None or busy1 is None or wall_s <= 0:
        return None
    return max(0.0, (busy1 - busy0 - own_cpu_s) / wall_s)


def settle() -> None:
    """Flush dirty pages of the previous step, so its writeback does not overlap the next."""
    if hasattr(os, "sync"):
        os.sync()


# ------------------------------------------------------------------------- child processes
@dataclass
class ChildRun:
    """One child process: command, exit code, wall time and peak RSS."""

    cmd: list
    returncode: int
    wall_s: float
    peak_rss_mib: float
    other_load: float | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}"


def run_child(cmd: list, log_stem: Path, env: dict | None = None) -> ChildRun:
    """Run ``cmd`` to completion; its stdout/stderr go to ``log_stem``.out/.err.

    Peak RSS is ``ru_maxrss`` of the child (and of any process it waited for), exact and
    independent of this process's own memory.  ``other_load`` is the average number of
    cores that other processes kept busy meanwhile (0 on a quiet machine).
    """
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    settle()
    wait_quiet()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        busy0 = busy_cpu_seconds()
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy1 = busy_cpu_seconds()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(cmd=[str(c) for c in cmd], returncode=proc.returncode, wall_s=wall,
                    peak_rss_mib=usage.ru_maxrss / 1024.0,  # Linux: kilobytes
                    other_load=other_load(busy0, busy1, usage.ru_utime + usage.ru_stime, wall),
                    stdout=out_path.read_text(), stderr=err_path.read_text())


# ----------------------------------------------------------------------------------- scenes
def scene_options(n: int) -> dict:
    """Scene content for an n x n mosaic: default stars, transients and galaxies per area."""
    area = (n / 2048) ** 2
    return dict(n_transients=int(round(40 * area)), n_galaxies=int(round(20 * area)))


def ensure_scene(out: Path, n: int, seed: int) -> dict:
    """Simulate the n x n scene into ``out/scene_<n>`` unless a complete one is there."""
    sdir = out / f"scene_{n}"
    paths = {k: sdir / ("truth.ecsv" if k == "truth" else f"{k}.fits") for k in SCENE_FILES}
    if (sdir / SCENE_DONE).is_file() and all(p.is_file() for p in paths.values()):
        print(f"[{n}] reusing scene {sdir}", flush=True)
        return paths
    print(f"[{n}] simulating scene into {sdir} ...", flush=True)
    t0 = time.perf_counter()
    (sdir / SCENE_DONE).unlink(missing_ok=True)
    # In a child process: on Linux a process's ru_maxrss includes the resident size
    # of the process it was forked from (the kernel keeps the high-water mark across
    # exec), so a bench process that had simulated a 16384^2 scene itself made every
    # later child's peak RSS read 520-600 MiB instead of its own ~440.
    cmd = [sys.executable, Path(__file__).resolve(), "--worker", "scene", "--worker-scene",
           sdir, "--worker-size", str(n), "--worker-seed", str(seed)]
    subprocess.run([str(c) for c in cmd], check=True)
    (sdir / SCENE_DONE).write_text(f"seed={seed}\n")
    print(f"[{n}] scene written in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


def scene_worker(sdir: Path, n: int, seed: int) -> None:
    from zogy_stream.simulate import write_scene

    written = write_scene(sdir, (n, n), seed=seed, **scene_options(n))
    missing = [k for k in SCENE_FILES if k not in written]
    if missing:
        raise SystemExit(f"scene worker: write_scene gave no {missing}")


def scene_flux_ratio(paths: dict) -> float:
    from astropy.table import Table

    return float(Table.read(paths["truth"], format="ascii.ecsv").meta.get("flux_ratio", 1.0))


# ------------------------------------------------------------------------------ zogy_stream
def subtract_cmd(paths: dict, out_fits: Path, *, threads: int, tile: int | None,
                 wisdom: Path, flux_ratio: float, extra: list) -> list:
    cmd = [sys.executable, "-m", "zogy_stream.cli", "subtract", paths["new"], paths["ref"],
           "-o", out_fits, "--new-psf", paths["new_psf"], "--ref-psf", paths["ref_psf"],
           "--new-var", paths["new_var"], "--ref-var", paths["ref_var"],
           "--flux-ratio", repr(flux_ratio), "--threads", str(threads),
           "--wisdom", wisdom, "--timings", "-q"]
    if tile is not None:
        cmd += ["--tile", str(tile)]
    return cmd + list(extra)


def parse_summary(stdout: str) -> dict:
    """Tiles, candidates, the CLI's own seconds and the per-stage seconds."""
    info = {"tiles": None, "candidates": None, "run_s": None, "stages": {}}
    for line in stdout.splitlines():
        m = SUMMARY_RE.match(line)
        if m:
            info.update(tiles=int(m["tiles"]), candidates=int(m["cands"]), run_s=float(m["secs"]))
            continue
        m = STAGE_RE.match(line)
        if m:
            info["stages"][m["stage"]] = float(m["secs"])
    return info


def output_geometry(out_fits: Path) -> dict:
    from astropy.io import fits

    hdr = fits.getheader(out_fits, 0)
    ny, nx = (int(v) for v in str(hdr["FFTSHAPE"]).lower().split("x"))
    return {"fft_shape": [ny, nx], "tile": int(hdr["TILE"]), "overlap": int(hdr["OVERLAP"])}


# ------------------------------------------------------------------------- FFT-only bound
def fft_bound(shape, *, threads: int, wisdom: Path, repeats: int, min_seconds: float) -> dict:
    """Best seconds of 4 forward + 4 inverse real FFTs of one padded tile.

    At least ``repeats`` rounds and at least ``min_seconds`` of timed rounds; the best
    round counts (the least disturbed by anything else on the machine).

    The plans are made as the engine makes them (float32, FFTW_MEASURE, same threads) after
    importing the run's wisdom: on ``threads`` threads for one tile (the batch plan when
    threads > 1), where a run with two tiles at once gives each one thread.
    """
    import resource

    import numpy as np
    from zogy_stream.fft import RealFFT2, Wisdom

    Wisdom(wisdom).load()
    fft = RealFFT2(tuple(shape), n_forward=4, n_inverse=4, dtype=np.float32,
                   threads=threads, effort="FFTW_MEASURE")
    data = np.random.default_rng(0).normal(size=fft.real.shape).astype(np.float32)
    settle()
    wait_quiet()
    fwd, inv = [], []
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    busy0, start = busy_cpu_seconds(), time.perf_counter()
    while len(fwd) <= repeats or sum(fwd[1:]) + sum(inv[1:]) < min_seconds:
        fft.real[...] = data  # inverse output is unnormalised: refill, untimed
        t0 = time.perf_counter()
        fft.forward()
        t1 = time.perf_counter()
        fft.inverse()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        inv.append(t2 - t1)
    wall, busy1 = time.perf_counter() - start, busy_cpu_seconds()
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    own = self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
    totals = [f + i for f, i in zip(fwd[1:], inv[1:])]  # round 0 warms caches: dropped
    best = min(range(len(totals)), key=totals.__getitem__) + 1
    return {"plan_s": fft.plan_seconds, "forward_s": fwd[best], "inverse_s": inv[best],
            "per_tile_s": fwd[best] + inv[best],
            "median_per_tile_s": sorted(totals)[len(totals) // 2],
            "rounds": len(totals), "other_load": other_load(busy0, busy1, own, wall)}


# ---------------------------------------------------------------------------- baselines
def baseline_worker(scene_dir: Path, out_fits: Path, result_json: Path, flux_ratio: float) -> None:
    """Child process: whole-image NumPy ZOGY from FITS on disk to FITS on disk."""
    import numpy as np
    from astropy.io import fits

    from baseline_numpy import zogy_numpy

    t0 = time.perf_counter()
    img = {k: fits.getdata(scene_dir / f"{k}.fits").astype(np.float64)
           for k in ("new", "ref", "new_var", "ref_var", "new_psf", "ref_psf")}
    for k in ("new", "ref"):
        img[k] -= np.median(img[k])
    sigma_new = float(np.sqrt(np.median(img["new_var"])))
    sigma_ref = float(np.sqrt(np.median(img["ref_var"])))
    t1 = time.perf_counter()
    res = zogy_numpy(img["new"], img["ref"], img["new_psf"], img["ref_psf"], sigma_new,
                     sigma_ref, new_var=img["new_var"], ref_var=img["ref_var"],
                     flux_ratio=flux_ratio)
    t2 = time.perf_counter()
    del img
    hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(res[k].astype(np.float32), name=name)
                                  for k, name in (("d", "D"), ("s", "S"), ("scorr", "SCORR"),
                                                  ("flux", "FLUX"), ("flux_err", "FLUX_ERR"))]
    fits.HDUList(hdus).writeto(out_fits, overwrite=True)
    t3 = time.perf_counter()
    result_json.write_text(json.dumps({"read_s": t1 - t0, "compute_s": t2 - t1,
                                       "write_s": t3 - t2}))


def run_baseline(paths: dict, n: int, out: Path, flux_ratio: float) -> dict:
    res_json = out / "logs" / f"baseline_{n}.json"
    out_fits = out / f"baseline_{n}.fits"
    res_json.unlink(missing_ok=True)
    cmd = [sys.executable, Path(__file__).resolve(), "--worker", "baseline",
           "--worker-scene", paths["new"].parent, "--worker-out", out_fits,
           "--worker-json", res_json, "--worker-flux-ratio", repr(flux_ratio)]
    print(f"[{n}] NumPy baseline ...", flush=True)
    run = run_child(cmd, out / "logs" / f"baseline_{n}")
    out_fits.unlink(missing_ok=True)
    if not run.ok:
        return {"status": "failed", "error": run.error_line()}
    return {"status": "ok", "wall_s": run.wall_s, "peak_rss_mib": run.peak_rss_mib,
            "other_load": run.other_load, **json.loads(res_json.read_text())}


def properimage_status() -> dict:
    import importlib.util

    if importlib.util.find_spec("properimage") is None:
        return {"status": "not installed",
                "note": "its dependency tinynpydb does not build from PyPI here; "
                        "see benchmarks/README.md"}
    try:
        import properimage  # noqa: F401
    except Exception as exc:  # broken install: report, do not fail the benchmark
        return {"status": "import failed", "note": f"{type(exc).__name__}: {exc}"}
    return {"status": "importable", "note": "no runner: see benchmarks/README.md"}


# ---------------------------------------------------------------------------- one size
@dataclass
class SizeResult:
    size: int
    status: str = "ok"
    error: str | None = None
    tiles: int | None = None
    fft_shape: list | None = None
    tile: int | None = None
    overlap: int | None = None
    candidates: int | None = None
    wall_s: float | None = None
    run_s: float | None = None
    mpix_s: float | None = None
    run_mpix_s: float | None = None
    peak_rss_mib: float | None = None
    other_load: float | None = None
    first_wall_s: float | None = None
    first_run_s: float | None = None
    first_stages: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    fft: dict | None = None
    fft_bound_s: float | None = None
    fft_bound_mpix_s: float | None = None
    ratio: float | None = None
    run_ratio: float | None = None
    baseline: dict | None = None


def bench_size(n: int, args, out: Path) -> SizeResult:
    r = SizeResult(size=n)
    paths = ensure_scene(out, n, args.seed)
    flux_ratio = scene_flux_ratio(paths)
    out_fits = out / f"zogy_{n}.fits"
    cmd = subtract_cmd(paths, out_fits, threads=args.threads, tile=args.tile,
                       wisdom=out / "fftw_wisdom", flux_ratio=flux_ratio, extra=args.extra)
    runs = []
    for label in ("first", "measured"):
        print(f"[{n}] zogy-stream subtract ({label} run) ...", flush=True)
        # Each run writes a new file, as a pipeline does for each exposure: replacing
        # the previous run's output would add the file system's cost of freeing it
        # (on this project's VM, ext4 mounted with `discard`: ~0.25 s at 8192^2).
        out_fits.unlink(missing_ok=True)
        run = run_child(cmd, out / "logs" / f"zogy_{n}_{label}")
        if not run.ok:
            r.status, r.error = "failed", run.error_line()
            print(f"[{n}] FAILED: {r.error}", flush=True)
            return r
        runs.append(run)
    first, meas = runs
    info0, info = parse_summary(first.stdout), parse_summary(meas.stdout)
    if info["tiles"] is None or info["run_s"] is None:
        r.status, r.error = "failed", "could not parse the zogy-stream summary line"
        return r
    r.first_wall_s, r.first_run_s, r.first_stages = first.wall_s, info0["run_s"], info0["stages"]
    r.wall_s, r.run_s, r.stages = meas.wall_s, info["run_s"], info["stages"]
    r.tiles, r.candidates, r.peak_rss_mib = info["tiles"], info["candidates"], meas.peak_rss_mib
    r.other_load = meas.other_load
    r.mpix_s = n * n / 1e6 / meas.wall_s
    r.run_mpix_s = n * n / 1e6 / r.run_s if r.run_s else None
    geo = output_geometry(out_fits)
    r.fft_shape, r.tile, r.overlap = geo["fft_shape"], geo["tile"], geo["overlap"]
    if not args.keep_outputs:
        out_fits.unlink(missing_ok=True)
    print(f"[{n}] {r.tiles} tiles of {r.fft_shape[0]}x{r.fft_shape[1]}: {r.wall_s:.2f} s wall, "
          f"{r.mpix_s:.2f} Mpix/s, {r.peak_rss_mib:.0f} MiB; FFT-only bound ...", flush=True)
    r.fft = fft_bound(r.fft_shape, threads=args.threads, wisdom=out / "fftw_wisdom",
                      repeats=args.fft_repeats, min_seconds=args.fft_min_seconds)
    r.fft_bound_s = r.fft["per_tile_s"] * r.tiles
    r.fft_bound_mpix_s = n * n / 1e6 / r.fft_bound_s
    r.ratio = r.mpix_s / r.fft_bound_mpix_s
    r.run_ratio = r.run_mpix_s / r.fft_bound_mpix_s if r.run_mpix_s else None
    return r


def add_baseline(r: SizeResult, args, out: Path) -> None:
    """The NumPy baseline of ``r``'s size (run after every zogy_stream size: its
    several-GB process disturbed the next timed run while the kernel cleaned up)."""
    n = r.size
    if not args.baseline or r.status != "ok":
        return
    if n > args.baseline_max_size:
        r.baseline = {"status": "skipped", "note": f"size > --baseline-max-size "
                                                   f"{args.baseline_max_size}"}
        return
    paths = ensure_scene(out, n, args.seed)
    r.baseline = run_baseline(paths, n, out, scene_flux_ratio(paths))


def cold_start(n: int, args, out: Path) -> dict:
    """One run with an empty Numba cache and no wisdom file, for the cold-start overhead."""
    cold = out / "cold"
    shutil.rmtree(cold, ignore_errors=True)
    (cold / "numba_cache").mkdir(parents=True)
    paths = ensure_scene(out, n, args.seed)
    cmd = subtract_cmd(paths, cold / "out.fits", threads=args.threads, tile=args.tile,
                       wisdom=cold / "fftw_wisdom", flux_ratio=scene_flux_ratio(paths),
                       extra=args.extra)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cold / "numba_cache"))
    print(f"[{n}] cold-start run (empty NUMBA_CACHE_DIR, no wisdom) ...", flush=True)
    run = run_child(cmd, out / "logs" / f"zogy_{n}_cold", env=env)
    shutil.rmtree(cold, ignore_errors=True)
    if not run.ok:
        return {"size": n, "status": "failed", "error": run.error_line()}
    info = parse_summary(run.stdout)
    return {"size": n, "status": "ok", "wall_s": run.wall_s, "run_s": info["run_s"],
            "other_load": run.other_load, "stages": info["stages"]}


def image_space_vs_fourier(n: int, args, out: Path) -> dict:
    """Wall time of the Fourier (default) and the --image-space paths on one scene."""
    paths = ensure_scene(out, n, args.seed)
    res = {"size": n}
    for label, extra in (("fourier", []), ("image_space", ["--image-space"])):
        cmd = subtract_cmd(paths, out / f"paths_{n}.fits", threads=args.threads, tile=args.tile,
                           wisdom=out / "fftw_wisdom", flux_ratio=scene_flux_ratio(paths),
                           extra=list(args.extra) + extra)
        print(f"[{n}] {label} path ...", flush=True)
        run_child(cmd, out / "logs" / f"paths_{n}_{label}_warm")  # compile / plan once
        run = run_child(cmd, out / "logs" / f"paths_{n}_{label}")
        if not run.ok:
            return {"size": n, "status": "failed", "error": run.error_line()}
        info = parse_summary(run.stdout)
        res[label] = {"run_s": info["run_s"], "mpix_s": n * n / 1e6 / info["run_s"],
                      "other_load": run.other_load}
    (out / f"paths_{n}.fits").unlink(missing_ok=True)
    res["status"] = "ok"
    return res


# ------------------------------------------------------------------------------ reporting
def machine_info(threads: int) -> dict:
    import numba
    import numpy
    import pyfftw

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "threads": threads,
            "python": platform.python_version(), "numpy": numpy.__version__,
            "numba": numba.__version__, "pyfftw": pyfftw.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def busy_note(*loads) -> str:
    worst = max((v for v in loads if v is not None), default=None)
    return "" if worst is None or worst < BUSY_LOAD else f"machine busy (other load {worst:.1f})"


def _f(v, fmt=".2f"):
    return "-" if v is None else format(v, fmt)


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: list, machine: dict, cold: dict | None, propimg: dict,
           paths: dict | None = None) -> str:
    ok = [r for r in results if r.status == "ok"]
    out = [f"# zogy_stream benchmark ({machine['date']})", "",
           f"{machine['cpu']}, {machine['cpus']} CPUs available, --threads {machine['threads']}; "
           f"Python {machine['python']}, NumPy {machine['numpy']}, Numba {machine['numba']}, "
           f"pyFFTW {machine['pyfftw']}; commit {machine['commit']}.", "",
           "## Throughput (measured run: second run, FFTW wisdom warm)", ""]
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append([f"{r.size}²"] + ["-"] * 12 + [f"failed: {r.error}"])
            continue
        rows.append([f"{r.size}²", r.tiles, f"{r.fft_shape[0]}x{r.fft_shape[1]}",
                     _f(r.wall_s), _f(r.mpix_s), _f(r.peak_rss_mib, ".0f"),
                     _f(r.fft_bound_mpix_s), _f(r.ratio), _f(r.first_wall_s), _f(r.run_s),
                     _f(r.run_mpix_s), _f(r.run_ratio), _f(r.other_load),
                     busy_note(r.other_load, r.fft.get("other_load"))])
    out += [_table(["size", "tiles", "FFT shape", "wall s", "Mpix/s", "peak RSS MiB",
                    "FFT-bound Mpix/s", "ratio", "first-run wall s", "run s", "run Mpix/s",
                    "run ratio", "other load", "note"], rows), ""]
    by_size = {r.size: r for r in ok}
    lin = [f"t({2 * n}²)/t({n}²) = {by_size[2 * n].wall_s / by_size[n].wall_s:.2f} "
           f"(run s: {by_size[2 * n].run_s / by_size[n].run_s:.2f})"
           for n in sorted(by_size) if 2 * n in by_size]
    if lin:
        out += ["Time linearity (wall time of the measured runs; the area ratio is 4): "
                + ", ".join(lin) + ".", ""]
    if 8192 in by_size and 16384 in by_size:
        out += [f"Linearity check: t(16384²)/t(8192²) = "
                f"{by_size[16384].wall_s / by_size[8192].wall_s:.2f} (target ≤ 4.4).", ""]
    if cold:
        if cold["status"] == "ok" and cold["size"] in by_size:
            warm = by_size[cold["size"]].wall_s
            out += [f"Cold start ({cold['size']}², empty Numba cache, no wisdom file): "
                    f"{cold['wall_s']:.2f} s wall vs {warm:.2f} s warm, i.e. "
                    f"+{cold['wall_s'] - warm:.2f} s once.", ""]
        elif cold["status"] != "ok":
            out += [f"Cold start run failed: {cold['error']}", ""]
    stages = []
    for r in ok:
        stages += [s for s in r.stages if s not in stages]
    if stages:
        out += ["## Per-stage breakdown (measured run, `--timings`, seconds)", "",
                "Stages in background threads overlap with compute, so they need not add up "
                "to the run time.", ""]
        rows = [[f"{r.size}²"] + [_f(r.stages.get(s), ".3f") for s in stages] + [_f(r.run_s)]
                for r in ok]
        out += [_table(["size"] + stages + ["run s"], rows), ""]
        rows = [[f"{r.size}²", r.tiles, _f(1e3 * r.fft["forward_s"], ".1f"),
                 _f(1e3 * r.fft["inverse_s"], ".1f"), _f(r.fft_bound_s, ".3f"),
                 _f(1e3 * r.fft["median_per_tile_s"], ".1f"), r.fft["rounds"],
                 _f(r.fft["plan_s"], ".3f"), _f(r.fft["other_load"])] for r in ok]
        out += ["## FFT-only bound (4 forward + 4 inverse real FFTs per tile, same plans)", "",
                _table(["size", "tiles", "forward ms/tile", "inverse ms/tile", "bound s",
                        "median round ms", "rounds", "plan s", "other load"], rows), ""]
    rows = []
    for r in ok:
        b = r.baseline
        if b is None:
            continue
        if b["status"] != "ok":
            rows.append([f"{r.size}²", "-", "-", "-", _f(r.wall_s), "-",
                         f"{b['status']}: {b.get('note') or b.get('error')}"])
            continue
        rows.append([f"{r.size}²", _f(b["wall_s"]), _f(b["compute_s"]),
                     _f(b["peak_rss_mib"], ".0f"), _f(r.wall_s), _f(r.wall_s / b["wall_s"], ".3f"),
                     busy_note(b["other_load"])])
    if rows:
        out += ["## Baseline: plain whole-image NumPy ZOGY (`benchmarks/baseline_numpy.py`)", "",
                _table(["size", "baseline wall s", "baseline compute s", "baseline peak RSS MiB",
                        "zogy_stream wall s", "ratio zogy_stream/baseline", "note"], rows), ""]
    if paths is not None:
        if paths["status"] == "ok":
            f, i = paths["fourier"], paths["image_space"]
            out += [f"## Fourier vs image-space path ({paths['size']}², run s)", "",
                    _table(["path", "run s", "Mpix/s", "other load"],
                           [["Fourier (default)", _f(f["run_s"]), _f(f["mpix_s"]),
                             _f(f["other_load"])],
                            ["--image-space", _f(i["run_s"]), _f(i["mpix_s"]),
                             _f(i["other_load"])]]), ""]
        else:
            out += [f"Fourier vs image-space run failed: {paths['error']}", ""]
    out += [f"properimage: {propimg['status']} ({propimg['note']}).", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384],
                   metavar="N", help="mosaic sides to run")
    p.add_argument("--out", type=Path, default=Path("bench_out"),
                   help="directory for scenes, wisdom, logs and results")
    p.add_argument("--threads", type=int, default=2, help="--threads of zogy-stream and FFTW")
    p.add_argument("--tile", type=int, default=None, help="--tile of zogy-stream (default: its own)")
    p.add_argument("--seed", type=int, default=0, help="scene seed")
    p.add_argument("--fft-repeats", type=int, default=5,
                   help="least number of rounds of the FFT-only timing (the best counts)")
    p.add_argument("--fft-min-seconds", type=float, default=2.0,
                   help="least total time of the FFT-only rounds")
    p.add_argument("--baseline-max-size", type=int, default=4096,
                   help="largest size for the NumPy baseline (it holds ~20 full-size arrays)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the NumPy baseline")
    p.add_argument("--cold-start", action="store_true",
                   help="also time one run of the first size with an empty Numba cache and no "
                        "wisdom file")
    p.add_argument("--keep-outputs", action="store_true", help="keep the subtraction outputs")
    p.add_argument("--image-space-size", type=int, default=1024,
                   help="scene size for the Fourier vs --image-space comparison (0: skip)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 2048 only, 3 FFT repeats (overrides --sizes)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further zogy-stream subtract options (must come last)")
    p.add_argument("--worker", choices=("baseline", "scene"), help=argparse.SUPPRESS)
    p.add_argument("--worker-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-scene", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-flux-ratio", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.fft_repeats, args.fft_min_seconds = [2048], 3, 0.5
        args.image_space_size = min(args.image_space_size, 512)
    if args.threads < 1 or any(n < 64 for n in args.sizes):
        p.error("--threads must be >= 1 and every size >= 64")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "baseline":
        baseline_worker(args.worker_scene, args.worker_out, args.worker_json,
                        args.worker_flux_ratio)
        return 0
    if args.worker == "scene":
        scene_worker(args.worker_scene, args.worker_size, args.worker_seed)
        return 0
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.threads)
    cold = cold_start(args.sizes[0], args, out) if args.cold_start else None
    results = [bench_size(n, args, out) for n in args.sizes]
    for r in results:
        add_baseline(r, args, out)
    paths = (image_space_vs_fourier(args.image_space_size, args, out)
             if args.image_space_size else None)
    propimg = properimage_status()
    text = render(results, machine, cold, propimg, paths)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        {"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v)
                                      for k, v in vars(args).items()
                                      if not k.startswith("worker")},
         "cold_start": cold, "properimage": propimg, "paths": paths,
         "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(f"results: {out / 'results.md'}, {out / 'results.json'}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
