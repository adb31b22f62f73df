"""Scale-out on Dask distributed: tiles of one subtraction as tasks.

The client plans the run once (:func:`~zogy_stream.plan.plan_run`) and
creates the pre-sized temporary output; each task takes a band of tiles,
builds its own :class:`~zogy_stream.engine.TileEngine` from the picklable
plan, reads the inputs from the shared filesystem, writes the finished cores
in place into the temporary output and returns its candidates.  The client
gathers them, writes the catalogue and renames the output.  Background,
noise levels and kernels are functions of the pixels alone, so the result is
the single-process result (up to float32 round-off of different FFT plans).

Dask is an optional dependency: ``pip install zogy-stream[dask]``.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from collections import defaultdict

from .errors import Cancelled, ConfigError

__all__ = ["dask_client", "run_bands", "parse_dask"]

log = logging.getLogger(__name__)


def parse_dask(spec: str) -> tuple[str | None, int | None]:
    """``"local:N"`` -> (None, N); an address -> (address, None).

    Raises
    ------
    ConfigError
        ``local:N`` with N not a positive integer, or an empty spec.
    """
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("--dask needs a scheduler address or local:N")
    if spec.startswith("local"):
        _, _, n = spec.partition(":")
        try:
            workers = int(n) if n else 2
        except ValueError:
            raise ConfigError(f"--dask {spec}: expected local:N with N a whole number") from None
        if workers < 1:
            raise ConfigError(f"--dask {spec}: N must be >= 1")
        return None, workers
    return spec, None


@contextlib.contextmanager
def dask_client(spec: str, *, threads_per_worker: int = 1):
    """A ``distributed.Client`` for ``spec`` (a LocalCluster for ``local:N``).

    ``threads_per_worker`` is the number of tasks a local worker runs at once.
    Each task runs its tiles on ``--threads`` FFT and Numba threads of its own,
    so the default of 1 gives ``N x --threads`` busy threads. More would
    oversubscribe the cores, and Numba's ``workqueue`` layer (no TBB, no
    OpenMP) aborts when two tasks' parallel kernels run at once.

    Raises
    ------
    ConfigError
        dask.distributed is not installed, or the scheduler cannot be reached.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("--dask needs dask.distributed: pip install 'zogy-stream[dask]'") from None
    address, workers = parse_dask(spec)
    if address is None:
        with LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                          processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"--dask {address}: cannot reach the scheduler ({exc})") from None
    with client:
        yield client


def _run_band(plan, tmp, planes, primary_header, tiles):
    """Task body: process ``tiles`` and write their cores into ``tmp``."""
    from .fitsio import OutputFile
    from .engine import TileEngine, _wisdom_for
    from .pipeline import _gather_bands, _iter_tiles, _write_tile

    engine = TileEngine(plan, wisdom=_wisdom_for(plan.opts))
    out = OutputFile.attach(tmp, planes, primary_header=primary_header)
    _gather_bands(out, plan)
    parts = []
    try:
        for res in _iter_tiles(engine, iter(tiles)):
            _write_tile(out, res, engine.timings, plan.shape[1], plan.opts.settle)
            parts.append(res.candidates)
    finally:
        out.close()
        engine.close()
    return parts, dict(engine.timings)


def run_bands(client, plan, outfile, *, stop=None, progress=None):
    """Run every tile of ``plan`` on ``client`` writing into ``outfile.tmp``.

    One task per row of tiles.  Returns (candidate tables, summed timings).

    Raises
    ------
    Cancelled
        ``stop`` was set while tasks were running (they are cancelled).
    """
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]
    rows: dict[int, list] = defaultdict(list)
    for tile in plan.grid:
        rows[tile.row].append(tile)
    futures = [client.submit(_run_band, plan, outfile.tmp, outfile.planes,
                             outfile.primary_header, band, pure=False, key=f"zogy-{run_id}-band-{r}")
               for r, band in sorted(rows.items())]
    parts, timings = [], defaultdict(float)
    try:
        for fut in as_completed(futures):
            if stop is not None and stop.is_set():
                raise Cancelled("stopped on request")
            band_parts, band_times = fut.result()
            parts.extend(band_parts)
            for k, v in band_times.items():
                timings[k] += v
            if progress is not None:
                progress.update(len(band_parts))
    except BaseException:
        client.cancel(futures)
        raise
    return parts, dict(timings)
