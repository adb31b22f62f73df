"""subtract on Dask distributed equals the single-process result."""
import contextlib

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from zogy_stream import ConfigError, InputError, subtract
from zogy_stream.distributed import parse_dask
from zogy_stream.simulate import write_scene

pytest.importorskip("distributed")


def test_parse_dask():
    assert parse_dask("local:3") == (None, 3)
    assert parse_dask("tcp://10.0.0.1:8786") == ("tcp://10.0.0.1:8786", None)
    with pytest.raises(ConfigError):
        parse_dask("local:x")
    with pytest.raises(ConfigError):
        parse_dask("local:0")


def test_dask_local_matches_single_process(tmp_path):
    p = write_scene(tmp_path, (600, 520), seed=4, n_transients=12)
    kw = dict(new_psf=p["new_psf"], ref_psf=p["ref_psf"], new_var=p["new_var"],
              ref_var=p["ref_var"], tile=256, threads=1, wisdom=False)
    one = subtract(p["new"], p["ref"], tmp_path / "one.fits", catalog=tmp_path / "one.ecsv", **kw)
    two = subtract(p["new"], p["ref"], tmp_path / "two.fits", catalog=tmp_path / "two.ecsv",
                   dask="local:2", **kw)
    assert one.n_tiles == two.n_tiles == 9
    with fits.open(one.out) as a, fits.open(two.out) as b:
        assert [h.name for h in a] == [h.name for h in b]
        for name in ("D", "SCORR", "MASK"):  # dimensionless: the 1e-4
            assert np.max(np.abs(a[name].data.astype(float) - b[name].data)) < 1e-4, name
        err = a["FLUX_ERR"].data.astype(float)
        for name in ("FLUX", "FLUX_ERR"):    # in ADU: float32 round-off relative to the error
            assert np.max(np.abs(a[name].data.astype(float) - b[name].data) / err) < 1e-4, name
    ta, tb = Table.read(one.catalog), Table.read(two.catalog)
    assert len(ta) == len(tb) > 0
    assert np.allclose(ta["scorr"], tb["scorr"], atol=1e-4)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporaries


def test_dask_local_workers_run_one_task_at_a_time(tmp_path, monkeypatch):
    """--dask local:N starts N workers of one task slot each: a task already runs its
    tiles on --threads threads (two tasks at once would oversubscribe the cores, and
    Numba's workqueue layer aborts on two tasks' parallel kernels at once)."""
    import zogy_stream.distributed as zd

    seen = []
    real = zd.dask_client

    @contextlib.contextmanager
    def spy(spec, **kw):
        with real(spec, **kw) as client:
            seen.append(sorted(client.nthreads().values()))
            yield client

    monkeypatch.setattr(zd, "dask_client", spy)
    p = write_scene(tmp_path, (300, 260), seed=4, n_transients=3)
    res = subtract(p["new"], p["ref"], tmp_path / "d.fits", new_psf=p["new_psf"],
                   ref_psf=p["ref_psf"], tile=128, threads=2, wisdom=False, dask="local:2")
    assert res.n_tiles >= 4 and seen == [[1, 1]]


def test_dask_refuses_in_memory_arrays(tmp_path):
    a = np.zeros((64, 64), np.float32)
    with pytest.raises(InputError, match="shared filesystem"):
        subtract(a, a, tmp_path / "x.fits", new_psf=np.ones((5, 5)), ref_psf=np.ones((5, 5)),
                 dask="local:1")
    assert not list(tmp_path.iterdir())
