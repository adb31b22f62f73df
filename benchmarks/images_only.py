"""Speed of ``zogy-stream subtract`` with nothing but the two images.

The path an astronomer with two single exposures takes: per-tile PSFs estimated from the
tile's stars, the flux ratio, registration offset and astrometric sigma fitted from
matched stars at plan time, L.A.Cosmic on both images (the simulator's headers describe
single exposures), the correlated-noise and model-error corrections on.  The scene is
the nominal one of ``accuracy.py`` (seed 3) at N x N, simulated once into
``<out>/scene_<N>``; each repeat is a fresh ``python -m zogy_stream.cli subtract`` process
(FFTW wisdom in ``<out>``, warm after the first run, which is not timed) and reports its
wall time, CPU time and the CLI's per-stage ``--timings``.

Run from the repository root::

    python benchmarks/images_only.py --size 2048 --repeats 2 --out images_only_out
"""
from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import time
from pathlib import Path


def ensure_scene(out: Path, n: int) -> Path:
    from accuracy import NOMINAL
    from zogy_stream.simulate import write_scene

    d = out / f"scene_{n}"
    if not (d / "truth.ecsv").is_file():
        write_scene(d, (n, n), seed=3, **NOMINAL)
    return d


def run_once(scene: Path, out: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "zogy_stream.cli", "subtract", str(scene / "new.fits"),
           str(scene / "ref.fits"), "-o", str(out / "out.fits"), "--threads", str(threads),
           "--wisdom", str(out / "fftw_wisdom"), "--timings", "-q"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"zogy-stream failed: {proc.stderr.strip().splitlines()[-1]}")
    stages = {m.group(1): float(m.group(2))
              for m in re.finditer(r"^\s+(\S+)\s+([\d.]+) s$", proc.stdout, re.M)}
    return dict(wall=wall, cpu=(r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                stages=stages)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="scene side in pixels")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("images_only_out"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    scene = ensure_scene(args.out, args.size)
    run_once(scene, args.out, args.threads)  # warms the wisdom and the Numba cache
    mpix = args.size ** 2 / 1e6
    for i in range(args.repeats):
        r = run_once(scene, args.out, args.threads)
        st = r["stages"]
        print(f"{args.size}^2 run {i + 1}: wall {r['wall']:.2f} s ({mpix / r['wall']:.2f} "
              f"Mpix/s), CPU {r['cpu']:.1f} s; cosmics {st.get('cosmics', 0):.2f} s, "
              f"psf+stars {st.get('psf+stars', 0):.2f} s, calibrate "
              f"{st.get('calibrate', 0):.2f} s, read+stats {st.get('read+stats', 0):.2f} s "
              "(summed over threads)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
