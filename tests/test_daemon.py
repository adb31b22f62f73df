"""Tests of the daemon: configuration, pick-up, jobs and crash safety, and the daemon as a real process.

This file is also a script: ``python tests/test_daemon.py daemon ...`` runs the daemon with a fake
subtraction (a few "tiles" of ``ZOGY_STREAM_FAKE_DELAY`` seconds each, checking ``stop`` between
them; ``ZOGY_STREAM_FAKE_IGNORE_STOP=1`` makes it deaf to ``stop``).  With
``ZOGY_STREAM_FAKE_SUBTRACT=0`` it runs the real one.  These variables are read only here.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from zogy_stream import daemon as zd
from zogy_stream.errors import Cancelled, InputError
from zogy_stream.journal import Journal
from zogy_stream.templates import TemplateLibrary

SCRIPT = Path(__file__).resolve()
SHAPE = (128, 128)


# ============================================================================ helpers
def fake_subtract(new, ref, out, *, stop=None, catalog=None, new_psf=None, ref_psf=None, progress=False,
                  **options):
    """Stand-in for zogy_stream.pipeline.subtract with the same contract, slow on demand."""
    delay = float(os.environ.get("ZOGY_STREAM_FAKE_DELAY", "0"))
    deaf = os.environ.get("ZOGY_STREAM_FAKE_IGNORE_STOP") == "1"
    t0 = time.monotonic()
    try:
        a, b = (fits.getdata(str(p).split("[")[0]).astype(np.float32) for p in (new, ref))
    except Exception as exc:
        raise InputError(f"cannot read input: {exc}") from exc
    if a.shape != b.shape:
        raise InputError(f"shape mismatch {a.shape} vs {b.shape}")
    if new_psf is None or ref_psf is None:
        raise InputError("no PSF")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.fake.tmp")
    try:
        with open(tmp, "wb") as fh:
            for _ in range(4):
                end = time.monotonic() + delay
                while True:
                    if stop is not None and stop.is_set() and not deaf:
                        raise Cancelled("stopped on request")
                    if time.monotonic() >= end:
                        break
                    time.sleep(min(0.05, delay))
                fh.write(b"\0" * 2880)
        d = a - b
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(d, name="D"), fits.ImageHDU(d, name="SCORR"),
                      fits.ImageHDU((~np.isfinite(d)).astype(np.int16), name="MASK")]).writeto(tmp, overwrite=True)
        if catalog is not None:
            Table({"x": [1.0], "y": [2.0], "scorr": [6.0]}).write(catalog, format="ascii.ecsv", overwrite=True)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return SimpleNamespace(out=out, catalog=catalog, n_candidates=1, shape=d.shape, n_tiles=4,
                           seconds=time.monotonic() - t0)


def gaussian_psf(fwhm: float, n: int = 15) -> np.ndarray:
    y, x = np.indices((n, n)) - n // 2
    p = np.exp(-(x ** 2 + y ** 2) / (2 * (fwhm / 2.3548) ** 2))
    return p / p.sum()


@pytest.fixture(scope="module")
def scene():
    """(new, ref, new_psf, ref_psf) of a small scene with a few stars and transients."""
    try:
        from zogy_stream.simulate import make_scene
        s = make_scene(SHAPE, seed=3, n_transients=3)
        return s.new, s.ref, s.new_psf, s.ref_psf
    except ImportError:  # pragma: no cover - the simulator is part of the package
        rng = np.random.default_rng(3)
        ref = rng.normal(1000, 30, SHAPE).astype(np.float32)
        new = rng.normal(1000, 30, SHAPE).astype(np.float32)
        return new, ref, gaussian_psf(4.0), gaussian_psf(3.0)


def image_header(field="F1", filt="r", ra=150.0, dec=2.0) -> fits.Header:
    h = fits.Header()
    h["FILTER"], h["FIELD"], h["GAIN"] = filt, field, 1.0
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRPIX1"], h["CRPIX2"] = (SHAPE[1] + 1) / 2, (SHAPE[0] + 1) / 2
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CDELT1"], h["CDELT2"] = -0.27 / 3600, 0.27 / 3600
    return h


def fits_bytes(data, header=None) -> bytes:
    from io import BytesIO
    buf = BytesIO()
    fits.PrimaryHDU(data, header=header).writeto(buf)
    return buf.getvalue()


def drop(inbox: Path, name: str, data, header=None, psf=None, how="rename", chunk_delay=0.05) -> Path:
    """Put an exposure (and its PSF sidecar first) into the inbox, by rename or slowly in chunks."""
    stem = name.removesuffix(".fits")
    if psf is not None:
        tmp = inbox / f".{stem}.psf.fits.part"
        tmp.write_bytes(fits_bytes(psf))
        os.rename(tmp, inbox / f"{stem}.psf.fits")
    raw = data if isinstance(data, bytes) else fits_bytes(data, header)
    final = inbox / name
    if how == "rename":
        tmp = inbox / f"{name}.tmp"
        tmp.write_bytes(raw)
        os.rename(tmp, final)
    else:
        with open(final, "wb") as fh:
            step = max(len(raw) // 6, 1)
            for i in range(0, len(raw), step):
                fh.write(raw[i:i + step])
                fh.flush()
                time.sleep(chunk_delay)
    return final


def make_tree(tmp_path: Path, scene, **settings) -> Path:
    """Directories, a template library (field F1) and daemon.toml; returns the TOML path."""
    new, ref, new_psf, ref_psf = scene
    for d in ("inbox", "templates"):
        (tmp_path / d).mkdir(exist_ok=True)
    fits.writeto(tmp_path / "templates" / "tpl_f1.fits", ref, image_header("F1"), overwrite=True)
    fits.writeto(tmp_path / "templates" / "tpl_f1.psf.fits", ref_psf, overwrite=True)
    values = dict(inbox="inbox", templates="templates", outbox="outbox", quarantine="quarantine",
                  state="state/journal.sqlite", poll_interval=0.2, settle_seconds=0.6, shutdown_timeout=10.0,
                  retry_delay=0.2, max_crashes=20, log_json=True, tile=64, threads=1, fft_effort="estimate")
    values.update(settings)
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n"
    (tmp_path / "daemon.toml").write_text(text)
    return tmp_path / "daemon.toml"


class DaemonProcess:
    """The daemon as a subprocess of this script (fake subtraction unless ``real``)."""

    def __init__(self, root: Path, *args: str, real=False, delay=0.0, env=None):
        self.root, self.n = root, 0
        self.args, self.real, self.delay, self.env = args, real, delay, env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        self.n += 1
        env = dict(os.environ, ZOGY_STREAM_FAKE_SUBTRACT="0" if self.real else "1",
                   ZOGY_STREAM_FAKE_DELAY=str(self.delay), **self.env)
        self.log = self.root / f"daemon-{self.n}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "daemon", "--config",
                                          str(self.root / "daemon.toml"), *self.args],
                                         stdout=subprocess.DEVNULL, stderr=err, env=env)
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout=15.0) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        return rc, time.monotonic() - t0

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.root.glob("daemon-*.log")))


def counts(root: Path) -> dict[str, int]:
    db = root / "state" / "journal.sqlite"
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return dict(con.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    except sqlite3.OperationalError:  # schema not created yet
        return {}


def wait_for(predicate, timeout: float, what: str, proc: DaemonProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"; logs:\n{proc.logs()[-4000:]}" if proc else ""))


def expected_outputs(stem: str) -> set[str]:
    return {f"{stem}.zogy.fits", f"{stem}.cands.ecsv"}


def check_output_set(outbox: Path, stems: list[str]) -> None:
    """Exactly one complete output set per stem and nothing else in the outbox (but an empty staging dir)."""
    names = {p.name for p in outbox.iterdir()}
    if zd.STAGING in names and not any((outbox / zd.STAGING).iterdir()):
        names.remove(zd.STAGING)
    assert names == set().union(*(expected_outputs(s) for s in stems))
    for stem in stems:
        with fits.open(outbox / f"{stem}.zogy.fits") as hdul:
            assert "D" in hdul and "SCORR" in hdul and hdul["D"].data.shape == SHAPE
        Table.read(outbox / f"{stem}.cands.ecsv", format="ascii.ecsv")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zogy_stream.cli", *args], capture_output=True, text=True,
                          timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ============================================================================ configuration
def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    zd.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_config_from_toml_and_flags(tmp_path, scene):
    toml = make_tree(tmp_path, scene, workers=2, template_keys=["FILTER", "NIGHT"], archive="done",
                     threshold=6.5)
    args = parse(["daemon", "--config", str(toml), "--tile", "32", "--workers", "3", "--no-catalog",
                  "--settle-seconds", "1.5"])
    cfg = zd.config_from_args(args)
    assert cfg.inbox == tmp_path / "inbox" and cfg.state == tmp_path / "state" / "journal.sqlite"
    assert cfg.archive == tmp_path / "done"  # relative to the TOML file
    assert cfg.workers == 3 and cfg.settle_seconds == 1.5 and cfg.catalog is False  # flags win
    assert cfg.template_keys == ("FILTER", "NIGHT") and cfg.poll_interval == 0.2
    opts = cfg.options
    assert opts["tile"] == 32 and opts["threshold"] == 6.5 and opts["threads"] == 1
    assert opts["background"] is True and "new_psf" not in opts and "catalog" not in opts
    with pytest.raises(AttributeError):
        cfg.workers = 5  # frozen
    assert zd.config_from_args(parse(["daemon", "--config", str(toml), "--template-keys", "FIELD"])) \
        .template_keys == ("FIELD",)


@pytest.mark.parametrize("extra, toml_extra, message", [
    ([], {"bogus_key": 1}, "unknown key"),
    ([], {"new_psf": "x.fits"}, "sidecar"),
    (["--new-psf", "x.fits"], {}, "sidecar"),
    (["--workers", "0"], {}, "workers"),
    (["--poll-interval", "soon"], {}, "poll_interval"),
    (["--inbox", "/nonexistent/inbox"], {}, "inbox"),
    (["--outbox", "inbox"], {}, "differ"),
    (["--dask", "local:x"], {}, "dask"),
    ([], {"tile": 8}, "tile"),
])
def test_config_errors(tmp_path, scene, monkeypatch, extra, toml_extra, message):
    toml = make_tree(tmp_path, scene, **toml_extra)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(zd.ConfigError, match=message):
        zd.config_from_args(parse(["daemon", "--config", str(toml), *extra]))


def test_config_missing_keys(tmp_path):
    with pytest.raises(zd.ConfigError, match="missing setting.*outbox"):
        zd.make_config({"inbox": str(tmp_path), "templates": str(tmp_path)})


def test_daemon_command_reports_config_errors(tmp_path, capsys):
    assert zd.main(["daemon", "--inbox", str(tmp_path)]) == 2
    assert "missing setting" in capsys.readouterr().err


# ============================================================================ pick-up, logs, metrics
def test_arrival_tracker(tmp_path):
    clock = [100.0]
    wall = [1_000_000.0]
    tr = zd.ArrivalTracker(2.0, clock=lambda: clock[0], wall=lambda: wall[0])

    def st(size, mtime):
        return SimpleNamespace(st_size=size, st_mtime_ns=int(mtime * 1e9), st_mtime=mtime)

    # a file being written: not ready while it grows, ready once unchanged for settle_seconds
    assert not tr.ready("a", st(10, wall[0]))
    clock[0] += 1
    assert not tr.ready("a", st(20, wall[0] + 1))
    clock[0] += 1.5
    assert not tr.ready("a", st(20, wall[0] + 1))
    clock[0] += 0.6
    assert tr.ready("a", st(20, wall[0] + 1))
    # an old file found at start is complete at once; an empty one is not
    assert tr.ready("old", st(10, wall[0] - 60))
    assert not tr.ready("empty", st(0, wall[0] - 60))
    # a file renamed in is complete at once, and stays so while unchanged
    tr.moved("b")
    assert tr.ready("b", st(10, wall[0])) and tr.ready("b", st(10, wall[0]))
    assert not tr.ready("b", st(11, wall[0] + 1))
    tr.prune({"a"})
    assert set(tr._seen) == {"a"}


def test_json_formatter():
    fmt = zd.JsonFormatter()
    rec = logging_record("job %d done", 7, extra={"job": 7, "input": "/in/a.fits"})
    out = json.loads(fmt.format(rec))
    assert out["message"] == "job 7 done" and out["level"] == "INFO" and out["job"] == 7
    assert out["input"] == "/in/a.fits" and out["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging_record("failed", exc_info=sys.exc_info())
    assert "ValueError: boom" in json.loads(fmt.format(rec))["exception"]


def logging_record(msg, *args, extra=None, exc_info=None):
    import logging
    rec = logging.getLogger("zogy_stream.test").makeRecord("zogy_stream.test", logging.INFO, __file__, 1, msg,
                                                           args, exc_info, extra=extra)
    return rec


def test_metrics_text():
    m = zd.Metrics()
    m.observe("done", mpix=0.5, duration=0.7, latency=3.0)
    m.observe("done", mpix=0.25, duration=40.0, latency=50.0)
    m.observe("failed")
    text = m.render({"queued": 2, "done": 2}, inflight=1)
    assert 'zogy_stream_jobs{state="queued"} 2' in text and 'zogy_stream_jobs{state="failed"} 0' in text
    assert "zogy_stream_mpix_processed_total 0.750000" in text
    assert 'zogy_stream_job_duration_seconds_bucket{le="1"} 1' in text
    assert 'zogy_stream_job_latency_seconds_bucket{le="+Inf"} 2' in text
    assert 'zogy_stream_job_attempts_total{outcome="failed"} 1' in text


# ============================================================================ jobs in-process
@pytest.fixture
def runner_env(tmp_path, scene):
    """A JobRunner on a tmp tree with a configurable subtract; returns a namespace."""
    toml = make_tree(tmp_path, scene, max_attempts=2, retry_delay=0.0)
    cfg = zd.config_from_args(parse(["daemon", "--config", str(toml)]))
    for d in (cfg.outbox, cfg.quarantine):
        d.mkdir(parents=True, exist_ok=True)
    journal = Journal(cfg.state)
    calls = []

    def subtract(new, ref, out, **kw):
        calls.append(kw)
        env.fault(len(calls))
        return fake_subtract(new, ref, out, **kw)

    env = SimpleNamespace(cfg=cfg, journal=journal, calls=calls, fault=lambda n: None, scene=scene, n=0)
    env.runner = zd.JobRunner(cfg, journal, TemplateLibrary(cfg.templates), subtract)

    def submit(name="e1.fits", field="F1", data=None, psf=True):
        env.n += 1  # distinct content: equal checksums would make duplicates
        new = scene[0] + env.n if data is None else data
        path = drop(cfg.inbox, name, new, image_header(field), scene[2] if psf else None)
        st = path.stat()
        return journal.submit(str(path), zd.file_checksum(path), st.st_size, st.st_mtime_ns)[0]

    env.submit = submit
    yield env
    journal.close()


def test_job_done_with_sidecars(runner_env):
    env = runner_env
    job = env.submit()
    assert env.runner.run(env.journal.claim()) == "done"
    done = env.journal.get(job.id)
    assert done.state == "done" and done.template.endswith("tpl_f1.fits") and done.mpix == pytest.approx(0.016384)
    assert {Path(p).name for p in done.outputs} == expected_outputs("e1")
    check_output_set(env.cfg.outbox, ["e1"])
    kw = env.calls[0]
    assert kw["new_psf"].endswith("inbox/e1.psf.fits") and kw["ref_psf"].endswith("tpl_f1.psf.fits")
    assert kw["tile"] == 64 and kw["progress"] is False and kw["stop"] is env.runner.cancel
    assert oct(os.stat(env.cfg.outbox / "e1.zogy.fits").st_mode & 0o777) != "0o600"
    assert (env.cfg.inbox / "e1.fits").exists()  # no archive: inputs stay


def test_transient_errors_are_retried_then_quarantined(runner_env):
    env = runner_env
    env.fault = lambda n: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")) if n == 1 else None
    job = env.submit()
    assert env.runner.run(env.journal.claim()) == "retry"
    mid = env.journal.get(job.id)
    assert mid.state == "queued" and "No space left" in mid.error and mid.attempts == 1
    assert not (env.cfg.outbox / zd.STAGING / "job1-a1").exists()
    assert env.runner.run(env.journal.claim()) == "done" and env.journal.get(job.id).attempts == 2
    # always failing: gives up after max_attempts (2) and quarantines
    env.fault = lambda n: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error"))
    job2 = env.submit("e2.fits")
    assert env.runner.run(env.journal.claim()) == "retry"
    assert env.runner.run(env.journal.claim()) == "failed"
    failed = env.journal.get(job2.id)
    assert failed.state == "failed" and "gave up after 2 attempts" in failed.error
    assert (env.cfg.quarantine / "e2.fits").exists() and (env.cfg.quarantine / "e2.psf.fits").exists()
    reason = (env.cfg.quarantine / "e2.fits.reason.txt").read_text().splitlines()[0]
    assert reason.startswith("OSError") and "I/O error" in reason
    assert {p.name for p in env.cfg.outbox.iterdir()} <= expected_outputs("e1") | {zd.STAGING}


def test_permanent_errors_quarantine_at_once(runner_env, scene):
    env = runner_env
    bad = {"nan.fits": np.full(SHAPE, np.nan, np.float32), "small.fits": scene[0][:64, :64]}
    for name, data in bad.items():
        env.submit(name, data=data)
    env.submit("lost.fits", field="NOWHERE")
    path = drop(env.cfg.inbox, "corrupt.fits", b"SIMPLE  =  garbage" * 400)
    env.journal.submit(str(path), "sha256:c", path.stat().st_size, path.stat().st_mtime_ns)
    results = {}
    while (job := env.journal.claim()) is not None:
        results[job.name] = env.runner.run(job)
    assert results == dict.fromkeys(["nan.fits", "small.fits", "lost.fits", "corrupt.fits"], "failed")
    reasons = {p.name.removesuffix(".reason.txt"): p.read_text().splitlines()[0]
               for p in env.cfg.quarantine.glob("*.reason.txt")}
    assert "no finite pixel" in reasons["nan.fits"] and "shape mismatch" in reasons["small.fits"]
    assert reasons["lost.fits"].startswith("NoTemplateError") and "unreadable" in reasons["corrupt.fits"]
    assert all(j.attempts == 1 and j.moved_to for j in env.journal.jobs(["failed"]))
    assert sorted(p.name for p in env.cfg.inbox.iterdir()) == []  # sidecars went along
    assert not any(env.cfg.outbox.iterdir()) or {p.name for p in env.cfg.outbox.iterdir()} == {zd.STAGING}


def test_cancel_requeues_without_charge(runner_env):
    env = runner_env
    env.runner.cancel.set()
    job = env.submit()
    assert env.runner.run(env.journal.claim()) == "cancelled"
    again = env.journal.get(job.id)
    assert again.state == "queued" and again.attempts == 0 and not any(env.cfg.outbox.rglob("*.fits"))


def test_input_changed_while_processed(runner_env, scene):
    env = runner_env

    def rewrite(n):
        path = env.cfg.inbox / "e1.fits"
        path.write_bytes(fits_bytes(scene[0] + 1, image_header()))
        raise InputError("broken by the rewrite")

    env.fault = rewrite
    job = env.submit()
    assert env.runner.run(env.journal.claim()) == "changed"
    assert env.journal.get(job.id).state == "queued" and (env.cfg.inbox / "e1.fits").exists()


def test_weight_sidecar_passed_as_weight_map(runner_env, scene):
    """No staged variance copy: the weight map goes to the subtraction as is (which masks
    w <= 0 itself; tests/test_realworld.py), with the mask sidecar beside it."""
    env = runner_env
    fits.writeto(env.cfg.inbox / "e1.weight.fits", np.full(SHAPE, 0.25, np.float32))
    fits.writeto(env.cfg.inbox / "e1.mask.fits", np.zeros(SHAPE, np.int16))
    env.submit()
    assert env.runner.run(env.journal.claim()) == "done"
    kw = env.calls[-1]
    assert kw["new_weight"] == str(env.cfg.inbox / "e1.weight.fits")
    assert kw["new_mask"] == str(env.cfg.inbox / "e1.mask.fits") and "new_var" not in kw


def test_err_sidecar_passed_as_error_map(runner_env, scene):
    env = runner_env
    fits.writeto(env.cfg.inbox / "e1.err.fits", np.full(SHAPE, 2.0, np.float32))
    env.submit()
    assert env.runner.run(env.journal.claim()) == "done"
    kw = env.calls[-1]
    assert kw["new_err"] == str(env.cfg.inbox / "e1.err.fits") and "new_var" not in kw


def test_archive_and_duplicate_checksum(tmp_path, scene):
    toml = make_tree(tmp_path, scene, archive="archive")
    cfg = zd.config_from_args(parse(["daemon", "--config", str(toml)]))
    with Journal(cfg.state) as journal:
        runner = zd.JobRunner(cfg, journal, TemplateLibrary(cfg.templates), fake_subtract)
        path = drop(cfg.inbox, "e1.fits", scene[0], image_header(), scene[2])
        st = path.stat()
        journal.submit(str(path), zd.file_checksum(path), st.st_size, st.st_mtime_ns)
        assert runner.run(journal.claim()) == "done"
        assert (tmp_path / "archive" / "e1.fits").exists() and (tmp_path / "archive" / "e1.psf.fits").exists()
        assert not path.exists() and journal.get(1).moved_to == str(tmp_path / "archive" / "e1.fits")
        copy = drop(cfg.inbox, "copy.fits", scene[0], image_header())
        st = copy.stat()
        job, action = journal.submit(str(copy), zd.file_checksum(copy), st.st_size, st.st_mtime_ns)
        assert action == "duplicate" and job.state == "done" and journal.claim() is None


def test_recovery_rolls_commits_forward_or_back(runner_env):
    env = runner_env
    out = env.cfg.outbox
    stage = out / zd.STAGING / "jobX"
    stage.mkdir(parents=True)
    jobs = [env.submit(f"e{i}.fits") for i in (1, 2, 3, 4)]
    for _ in jobs:
        env.journal.claim()
    # e1: crashed after staging, before any rename; e2: after one of two renames;
    # e3: files lost (roll back); e4: died while subtracting (re-queued)
    for i in (1, 2, 3):
        plan = [(str(stage / f"e{i}.zogy.fits"), str(out / f"e{i}.zogy.fits")),
                (str(stage / f"e{i}.cands.ecsv"), str(out / f"e{i}.cands.ecsv"))]
        for staged, _ in plan:
            Path(staged).write_text("complete")
        env.journal.begin_commit(jobs[i - 1].id, plan, duration=1.0, mpix=0.1)
    os.replace(stage / "e2.zogy.fits", out / "e2.zogy.fits")
    (stage / "e3.cands.ecsv").unlink()
    (out / "e3.zogy.fits").write_text("stale")
    (out / (zd.TMP_PREFIX + "x")).write_text("orphan")
    (env.cfg.quarantine / (zd.TMP_PREFIX + "y.reason.txt")).write_text("orphan")
    env.runner.recover()
    states = {j.name: (j.state, j.crashes) for j in env.journal.jobs()}
    assert states == {"e1.fits": ("done", 0), "e2.fits": ("done", 0), "e3.fits": ("queued", 0),
                      "e4.fits": ("queued", 1)}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected_outputs("e1") | expected_outputs("e2"))
    assert not list(env.cfg.quarantine.iterdir())
    assert env.journal.get(jobs[0].id).outputs == (str(out / "e1.zogy.fits"), str(out / "e1.cands.ecsv"))


def test_recovery_finishes_interrupted_quarantine(runner_env):
    env = runner_env
    job = env.submit()
    env.journal.claim()
    # died after the journal said "failed, goes to quarantine" but before the move
    env.journal.mark_failed(job.id, "InputError: bad", moved_to=str(env.cfg.quarantine / "e1.fits"))
    env.runner.recover()
    assert (env.cfg.quarantine / "e1.fits").exists() and not (env.cfg.inbox / "e1.fits").exists()
    assert (env.cfg.quarantine / "e1.fits.reason.txt").read_text().startswith("InputError: bad")


def test_one_daemon_per_journal(tmp_path):
    state = tmp_path / "j.sqlite"
    with zd.state_lock(state):
        assert zd.daemon_pid(state) == os.getpid()
        with pytest.raises(zd.ConfigError, match="another daemon"):
            with zd.state_lock(state, wait=0.2):
                pass
    assert zd.daemon_pid(state) is None


# ============================================================================ the daemon as a process
def test_sigkill_at_random_moments_loses_nothing(tmp_path, scene):
    """8 exposures dropped (half by rename, half slowly) while the daemon is SIGKILLed 3 times."""
    toml = make_tree(tmp_path, scene)
    d = DaemonProcess(tmp_path, delay=0.1, env={"ZOGY_STREAM_FAKE_SLOW_COMMIT": "0.25"}).start()
    stems = [f"exp{i}" for i in range(8)]
    rng = random.Random(20260101)

    def dropper():
        for i, stem in enumerate(stems):
            drop(tmp_path / "inbox", f"{stem}.fits", scene[0] + i, image_header(), scene[2],
                 how="rename" if i % 2 == 0 else "slow")
            time.sleep(rng.uniform(0.0, 0.4))

    thread = threading.Thread(target=dropper)
    thread.start()
    for _ in range(3):
        wait_for(lambda: "daemon started" in d.log.read_text(), 30, "the daemon to start", d)
        time.sleep(rng.uniform(0.2, 2.0))
        d.kill()
        d.start()
    thread.join()
    wait_for(lambda: counts(tmp_path).get("done") == 8, 90, "8 done jobs", d)
    rc, secs = d.stop()
    assert rc == 0, d.logs()[-3000:]
    check_output_set(tmp_path / "outbox", stems)
    with Journal(tmp_path / "state" / "journal.sqlite", create=False) as j:
        jobs = j.jobs()
        assert len(jobs) == 8 and all(job.state == "done" and job.commit_plan == () for job in jobs)
        for job in jobs:
            stem = job.name.removesuffix(".fits")
            assert {Path(p).name for p in job.outputs} == expected_outputs(stem)
            assert all(Path(p).is_file() for p in job.outputs)
    inbox = sorted(p.name for p in (tmp_path / "inbox").iterdir())
    assert inbox == sorted([f"{s}.fits" for s in stems] + [f"{s}.psf.fits" for s in stems])
    assert not list((tmp_path / "quarantine").iterdir())
    assert toml.exists()
    events = [json.loads(line).get("event") for line in d.logs().splitlines() if line.startswith("{")]
    print(f"kills hit {events.count('recovered')} running job(s); "
          f"{d.logs().count('rolled forward')} commit(s) rolled forward")


def test_sigterm_stops_cleanly_within_timeout(tmp_path, scene):
    make_tree(tmp_path, scene, shutdown_timeout=3.0)
    d = DaemonProcess(tmp_path, delay=1.0).start()  # 4 s per job
    drop(tmp_path / "inbox", "e1.fits", scene[0], image_header(), scene[2])
    wait_for(lambda: counts(tmp_path).get("running") == 1, 30, "a running job", d)
    time.sleep(0.3)
    rc, secs = d.stop()
    assert rc == 0 and secs < 3.0 + 1.0, (rc, secs)
    assert counts(tmp_path) == {"queued": 1}  # abandoned cleanly between tiles, back in the queue
    assert not list((tmp_path / "outbox").iterdir())
    # even a subtraction deaf to the stop request cannot hold the daemon beyond the timeout
    d2 = DaemonProcess(tmp_path, delay=30.0, env={"ZOGY_STREAM_FAKE_IGNORE_STOP": "1"}).start()
    wait_for(lambda: counts(tmp_path).get("running") == 1, 30, "a running job", d2)
    rc, secs = d2.stop()
    assert rc == 0 and secs < 3.0 + 1.5, (rc, secs)
    # the next start picks the job up again and finishes it
    d3 = DaemonProcess(tmp_path).start()
    wait_for(lambda: counts(tmp_path) == {"done": 1}, 30, "the job done", d3)
    assert d3.stop()[0] == 0
    assert {p.name for p in (tmp_path / "outbox").iterdir()} == expected_outputs("e1")
    lines = [json.loads(line) for line in d3.log.read_text().splitlines() if line.startswith("{")]
    assert any(rec.get("event") == "recovered" for rec in lines)
    assert any(rec.get("event") == "done" and rec.get("job") == 1 for rec in lines)


def test_real_subtraction_bad_inputs_status_requeue_metrics(tmp_path, scene):
    """The real core end to end: good inputs done; corrupt, truncated, all-NaN, mismatched and
    unmatched inputs quarantined with reasons; ``status`` and ``requeue`` through the CLI."""
    pytest.importorskip("zogy_stream.pipeline")
    make_tree(tmp_path, scene)
    inbox = tmp_path / "inbox"
    new, ref, new_psf, _ = scene
    drop(inbox, "good1.fits", new, image_header(), new_psf)
    drop(inbox, "good2.fits", new, image_header(), new_psf, how="slow")
    drop(inbox, "corrupt.fits", b"\x00garbage" * 1000)
    raw = fits_bytes(new, image_header())
    drop(inbox, "truncated.fits", raw[: len(raw) // 2], psf=new_psf)
    drop(inbox, "allnan.fits", np.full(SHAPE, np.nan, np.float32), image_header(), new_psf)
    drop(inbox, "mismatch.fits", new[:96, :96], image_header(), new_psf)
    drop(inbox, "field9.fits", new, image_header("F9", ra=30.0), new_psf)
    port = free_port()
    d = DaemonProcess(tmp_path, "--metrics-port", str(port), real=True).start()
    wait_for(lambda: counts(tmp_path) == {"done": 2, "failed": 5}, 120, "2 done, 5 failed", d)
    quarantine = tmp_path / "quarantine"
    bad = ["corrupt.fits", "truncated.fits", "allnan.fits", "mismatch.fits", "field9.fits"]
    assert sorted(p.name for p in quarantine.glob("*.fits")) == sorted(
        bad + ["truncated.psf.fits", "allnan.psf.fits", "mismatch.psf.fits", "field9.psf.fits"])
    reasons = {n: (quarantine / f"{n}.reason.txt").read_text().splitlines()[0] for n in bad}
    assert "unreadable" in reasons["corrupt.fits"] and "truncated" in reasons["truncated.fits"]
    assert "no finite pixel" in reasons["allnan.fits"] and reasons["field9.fits"].startswith("NoTemplateError")
    assert reasons["mismatch.fits"].startswith("InputError")
    check_output_set(tmp_path / "outbox", ["good1", "good2"])
    with fits.open(tmp_path / "outbox" / "good1.zogy.fits") as hdul:
        assert {"D", "S", "SCORR", "FLUX", "FLUX_ERR", "MASK", "PSF_D"} <= {h.name for h in hdul}
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'zogy_stream_jobs{state="failed"} 5' in metrics and "zogy_stream_mpix_processed_total 0.03" in metrics
    assert "zogy_stream_job_latency_seconds_count 2" in metrics
    state = str(tmp_path / "state" / "journal.sqlite")
    res = cli("status", "--state", state)
    assert res.returncode == 0, res.stderr
    assert "daemon running" in res.stdout and "NoTemplateError" in res.stdout
    assert any(line.split() == ["failed", "5"] for line in res.stdout.splitlines())
    js = json.loads(cli("status", "--state", state, "--json").stdout)
    assert js["counts"]["done"] == 2 and len(js["last_failures"]) == 5
    # the missing template arrives; the unmatched exposure is put back and now succeeds
    fits.writeto(tmp_path / "templates" / ".tpl_f9.fits.part", ref, image_header("F9", ra=30.0))
    fits.writeto(tmp_path / "templates" / "tpl_f9.psf.fits", scene[3])
    os.rename(tmp_path / "templates" / ".tpl_f9.fits.part", tmp_path / "templates" / "tpl_f9.fits")
    res = cli("requeue", "--state", state, "field9.fits")
    assert res.returncode == 0 and "1 job(s) requeued" in res.stdout, res.stderr
    assert not (quarantine / "field9.fits.reason.txt").exists()
    wait_for(lambda: counts(tmp_path) == {"done": 3, "failed": 4}, 60, "the requeued job done", d)
    assert (tmp_path / "outbox" / "field9.zogy.fits").exists() and (inbox / "field9.fits").exists()
    # requeue --failed brings the others back; they fail again, each once more
    res = cli("requeue", "--state", state, "--failed")
    assert "4 job(s) requeued" in res.stdout
    wait_for(lambda: counts(tmp_path) == {"done": 3, "failed": 4}
             and len(list(quarantine.glob("*.reason.txt"))) == 4, 60, "the bad ones failed again", d)
    rc, _ = d.stop()
    assert rc == 0
    assert not (tmp_path / "outbox" / zd.STAGING).exists()


def run_in_thread(cfg, subtract=None):
    daemon = zd.Daemon(cfg, subtract=subtract)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    return daemon, thread


def test_polling_only_pickup_in_process(tmp_path, scene):
    """Without the inotify observer: files written slowly or renamed in while running are taken
    once complete; temporary and hidden names never are."""
    make_tree(tmp_path, scene, watch=False, settle_seconds=0.4, poll_interval=0.1)
    cfg = zd.config_from_args(parse(["daemon", "--config", str(tmp_path / "daemon.toml")]))
    inbox = tmp_path / "inbox"
    daemon, thread = run_in_thread(cfg, fake_subtract)
    try:
        (inbox / ".hidden.fits").write_bytes(fits_bytes(scene[0], image_header()))
        (inbox / "x.fits.part").write_bytes(fits_bytes(scene[0], image_header()))
        drop(inbox, "slow.fits", scene[0] + 1, image_header(), scene[2], how="slow", chunk_delay=0.15)
        drop(inbox, "fast.fits", scene[0] + 2, image_header(), scene[2])
        wait_for(lambda: counts(tmp_path) == {"done": 2}, 30, "2 jobs done")
        time.sleep(0.5)
        assert counts(tmp_path) == {"done": 2}
    finally:
        daemon.request_stop()
        thread.join(30)
    assert not thread.is_alive()
    check_output_set(tmp_path / "outbox", ["fast", "slow"])
    with Journal(cfg.state, create=False) as j:
        assert sorted(job.name for job in j.jobs()) == ["fast.fits", "slow.fits"]
        assert all(job.attempts == 1 for job in j.jobs())


def test_dask_local_cluster_runs_jobs(tmp_path, scene):
    """``dask = "local:2"``: one job per task on a LocalCluster, the journal stays in the daemon;
    the outputs equal a direct in-process subtraction."""
    pytest.importorskip("distributed")
    subtract = pytest.importorskip("zogy_stream.pipeline").subtract
    make_tree(tmp_path, scene, dask="local:2")
    cfg = zd.config_from_args(parse(["daemon", "--config", str(tmp_path / "daemon.toml")]))
    for i in range(3):
        drop(tmp_path / "inbox", f"e{i}.fits", scene[0] + i, image_header(), scene[2])
    daemon, thread = run_in_thread(cfg)
    try:
        wait_for(lambda: counts(tmp_path).get("done") == 3, 120, "3 jobs done on dask")
    finally:
        daemon.request_stop()
        thread.join(30)
    assert not thread.is_alive()
    check_output_set(tmp_path / "outbox", ["e0", "e1", "e2"])
    with Journal(cfg.state, create=False) as j:
        assert all(job.state == "done" and job.worker.endswith(f":{os.getpid()}") for job in j.jobs())
    local = tmp_path / "local.fits"
    subtract(str(tmp_path / "inbox" / "e1.fits"), str(tmp_path / "templates" / "tpl_f1.fits"), local,
             new_psf=str(tmp_path / "inbox" / "e1.psf.fits"), ref_psf=str(tmp_path / "templates" / "tpl_f1.psf.fits"),
             **cfg.options)
    with fits.open(local) as a, fits.open(tmp_path / "outbox" / "e1.zogy.fits") as b:
        for name in ("D", "SCORR", "FLUX"):
            np.testing.assert_array_equal(a[name].data, b[name].data)


# ============================================================================ script entry point
def _slow_commits(seconds: float) -> None:
    """Widen the crash windows of a commit: sleep at each directory fsync (before the commit
    plan is recorded, and between the renames and the final 'done')."""
    fsync = zd._fsync

    def slow(path, directory=False):
        if directory:
            time.sleep(seconds)
        fsync(path, directory)

    zd._fsync = slow


if __name__ == "__main__":
    use_fake = os.environ.get("ZOGY_STREAM_FAKE_SUBTRACT", "1") != "0"
    if os.environ.get("ZOGY_STREAM_FAKE_SLOW_COMMIT"):
        _slow_commits(float(os.environ["ZOGY_STREAM_FAKE_SLOW_COMMIT"]))
    sys.exit(zd.main(sys.argv[1:], subtract=fake_subtract if use_fake else None))
